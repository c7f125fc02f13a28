"""BenignClient: an honest user's device, the protocol as written (clients/base.py)."""

from __future__ import annotations

from clients.base import FedRecClient


class BenignClient(FedRecClient):
    """An honest user's device: trains on its own data and uploads the true gradient."""
