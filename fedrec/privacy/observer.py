"""The honest-but-curious server's recorder (MGradInv's threat model).

`Observer.see(round, results, global_arrays)` receives exactly what the strategy's
`aggregate_uploads` receives in a round (client id, upload arrays, num_examples, metrics) and
the global model the round was computed on, and keeps, for its target users only: the
uploaded item ids, item rows, predictor gradients and num_examples, plus one copy of the
global arrays per round in which it saw a target. It is neither a client nor part of any
defense: nothing reads it during training, and it imports nothing that knows the ground truth
(tests/test_privacy.py checks the import graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Observation:
    """One target upload as the server received it."""

    user: int
    round: int
    item_ids: np.ndarray
    item_rows: np.ndarray
    predictor: list
    num_examples: int


class Observer:
    def __init__(self, targets):
        self.targets = {int(u) for u in targets}
        self.records: dict = {}  # user -> [Observation] in round order
        self.models: dict = {}  # round -> [item_table, *predictor] (copies)

    def see(self, rnd: int, results, global_arrays):
        """results: [(client_id, arrays, num_examples, metrics)] as handed to the strategy."""
        for client, arrays, n, _metrics in results:
            try:
                user = int(client)
            except (TypeError, ValueError):
                continue
            if user not in self.targets or isinstance(arrays, Exception) or int(n) <= 0:
                continue
            if rnd not in self.models:
                self.models[rnd] = [np.array(a, copy=True) for a in global_arrays]
            self.records.setdefault(user, []).append(Observation(
                user, int(rnd), np.asarray(arrays[0], np.int64).copy(),
                np.asarray(arrays[1], np.float32).copy(),
                [np.asarray(p, np.float32).copy() for p in arrays[2:]], int(n)))

    def observations(self, user: int, rounds=None) -> list:
        obs = self.records.get(int(user), [])
        if rounds is None:
            return list(obs)
        want = set(int(r) for r in rounds)
        return [o for o in obs if o.round in want]

    def model_at(self, rnd: int) -> list:
        return self.models[int(rnd)]
