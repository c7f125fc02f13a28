"""Where a device keeps its private state (user row, optimizer moments, negatives, clock).

Both stores hold one dict of numpy arrays per user and never send it anywhere: `DictStore`
in process memory (the in-process runner), `FlowerStore` in Flower's `context.state` (per
node and run).
"""

from __future__ import annotations

import numpy as np


class DictStore:
    """Private state held in process memory (the in-process runner)."""

    def __init__(self):
        self.state: dict = {}

    def load(self) -> dict:
        return self.state

    def save(self, state: dict):
        self.state = state


class FlowerStore:
    """Private state in Flower's `context.state`: per node and run, never sent anywhere."""

    KEY = "fedrec_user"

    def __init__(self, context):
        self.context = context

    def load(self) -> dict:
        rec = self.context.state.array_records.get(self.KEY)
        return {} if rec is None else {k: rec[k].numpy() for k in rec.keys()}

    def save(self, state: dict):
        from flwr.app import Array, ArrayRecord

        self.context.state.array_records[self.KEY] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in state.items()})
