"""Replies to every fit with the same `reply-rows` sparse rows: [item_ids, item_rows]."""

from __future__ import annotations

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context

_REPLY: dict = {}


def _reply(n_items: int, dim: int, rows: int) -> list:
    key = (n_items, dim, rows)
    if key not in _REPLY:
        rng = np.random.default_rng(0)
        ids = np.sort(rng.choice(n_items, size=min(rows, n_items), replace=False)).astype(np.int64)
        _REPLY[key] = [ids, rng.standard_normal((len(ids), dim)).astype(np.float32)]
    return _REPLY[key]


class BareClient(NumPyClient):
    def __init__(self, reply):
        self.reply = reply

    def get_parameters(self, config):
        return []

    def fit(self, parameters, config):
        return self.reply, 1, {}

    def evaluate(self, parameters, config):
        return 0.0, 1, {}


def client_fn(context: Context):
    rc = context.run_config
    return BareClient(_reply(int(rc["n-items"]), int(rc["dim"]), int(rc["reply-rows"]))).to_client()


app = ClientApp(client_fn=client_fn)
