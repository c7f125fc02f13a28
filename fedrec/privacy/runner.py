"""The privacy simulation: the package's in-process Engine with three additions.

- a schedule that forces target users into chosen rounds (for the interval and progress
  sweeps): a target with forced rounds t1 < ... < tk trains normally before t1, is left out of
  the random sample inside [t1, tk] except at its forced rounds, and trains normally after tk;
- on-device countermeasures (fedrec.privacy.countermeasures) applied to every client's upload
  before it leaves the device;
- the `Observer`, handed each round's uploads exactly as the strategy receives them.

Ground truth for scoring (each observed target's user row before its step, positives and
negatives) is read from the simulated devices into `truth`, which the observer never sees.
Single process only (workers = 1): the engine's clients live here.
"""

from __future__ import annotations

import numpy as np

from clients.cohort import fit_clients
from clients.streams import ROUND
from fedrec.engine import Engine
from fedrec.privacy.observer import Observer


class Schedule:
    """{user: sorted forced rounds}."""

    def __init__(self, forced: dict):
        self.forced = {int(u): sorted(int(r) for r in rs) for u, rs in forced.items()}
        self.at: dict = {}
        for u, rs in self.forced.items():
            for r in rs:
                self.at.setdefault(r, set()).add(u)

    def adjust(self, rnd: int, users) -> list:
        here = self.at.get(rnd, set())
        keep = [u for u in users if u in here or not self._in_window(u, rnd)]
        return sorted(set(keep) | here)

    def _in_window(self, u: int, rnd: int) -> bool:
        rs = self.forced.get(int(u))
        return bool(rs) and rs[0] <= rnd <= rs[-1]


class PrivacyEngine(Engine):
    def __init__(self, cfg, targets, forced=None, protect=None, **kw):
        kw["workers"] = 1
        super().__init__(cfg, **kw)
        self.observer = Observer(targets)
        self.schedule = Schedule(forced or {})
        self.protect = protect  # countermeasure: (client, rnd, upload arrays, n, arrays) -> arrays
        self.truth: dict = {}  # (user, round) -> {"user", "pos", "neg"}: scoring only

    def run_round(self, rnd: int) -> dict:
        users = self.schedule.adjust(rnd, self.strategy.sample(rnd, self.users))
        clients = [self.client(u) for u in users]
        arrays = self.strategy.global_arrays()
        for c in clients:
            if c.user in self.observer.targets:
                self.truth[(c.user, rnd)] = self._truth(c, rnd)
        outs = fit_clients(clients, arrays, {"round": rnd})
        if self.protect is not None:
            outs = [(self.protect(c, rnd, up, n, arrays), n, m) if n > 0 else (up, n, m)
                    for c, (up, n, m) in zip(clients, outs)]
        results = [(u, up, n, metrics) for u, (up, n, metrics) in zip(users, outs)]
        self.observer.see(rnd, results, arrays)  # before the server step changes `arrays`
        result = self.strategy.aggregate_uploads(rnd, results)
        return self.ledger.fit(rnd, users, result, {})

    def _truth(self, client, rnd: int) -> dict:
        state = client.private_state()
        pos, neg = client.training_pairs(state, client.stream(ROUND, rnd))
        return {"user": client.user_vector(rnd - 1).astype(np.float32),
                "pos": np.asarray(pos, np.int64).copy(), "neg": np.asarray(neg, np.int64).copy(),
                "train_items": np.asarray(client.train_items, np.int64).copy()}
