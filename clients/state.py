"""Where a device keeps its private state (user row, optimizer moments, negatives, clock).

The stores hold one dict of numpy arrays per user and never send it anywhere: `DictStore`
in process memory (the in-process runner), `FlowerStore` in Flower's `context.state` (per
node and run), `DeviceDiskStore` in `context.state` and on the device's own disk, so that a
resumed `flwr run` finds every device as it was at the server's last checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

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


class DeviceDiskStore(FlowerStore):
    """FlowerStore that also keeps the state in a file on the device's own disk, in two
    versions: `latest` (after the device's last fit) and `committed` (the newest one no later
    than a round the server has checkpointed). The server's checkpoint at round c and the
    devices' files then agree: on resume (`resume_round` = c) a device whose latest state is
    from round <= c takes it, any other its committed one (or starts fresh: it had not trained
    by round c). The round of a state is its clock (state["clock"][0]). The server only
    tells the devices the two round numbers (public), never sees the files."""

    def __init__(self, context, path):
        super().__init__(context)
        self.path = Path(path)
        self.checkpoint_round = 0  # the server's last checkpoint (from the fit instructions)
        self.resume_round = -1  # >= 0: this run resumed from the server's checkpoint at it

    def _read(self) -> dict:
        out: dict = {"latest": {}, "committed": {}}
        try:
            with np.load(self.path) as f:
                for key in f.files:
                    version, name = key.split(".", 1)
                    out[version][name] = f[key]
        except (OSError, ValueError, KeyError):
            pass  # no file yet (or an unreadable one: as if the device had never trained)
        return out

    def load(self) -> dict:
        state = super().load()
        if state or self.resume_round < 0:
            return state
        saved = self._read()
        latest = saved["latest"]
        if latest and int(latest["clock"][0]) <= self.resume_round:
            return latest
        return saved["committed"]

    def save(self, state: dict):
        super().save(state)
        saved = self._read()
        committed = saved["committed"]
        latest = saved["latest"]
        if latest and int(latest["clock"][0]) <= self.checkpoint_round:
            committed = latest
        arrays = {f"latest.{k}": v for k, v in state.items()}
        arrays.update({f"committed.{k}": v for k, v in committed.items()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, self.path)  # atomic: a kill leaves the old file or the new one
