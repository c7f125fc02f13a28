"""What every client of an experiment shares, read-only."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ClientEnv:
    """Read-only things every client of an experiment shares: config, model, data."""

    cfg: object  # ExperimentConfig
    model: object  # RecModel
    data: object  # PreparedData
