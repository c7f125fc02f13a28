"""Spattack (AAAI 2025): item-level poisoning that cancels or swamps the benign item updates.

Four variants, params.variant = O-D | O-S | L-D | L-S:
- O (omniscient; simulation only): the attacker knows the round's benign item gradients.
  Each malicious upload for item j is -(weighted sum of the benign gradients for j) /
  (total weight of the malicious uploads of j), so under a (weighted) mean the item's
  aggregate, and its update, cancel. The predictor is cancelled the same way.
- L (local: no knowledge of others): each malicious client draws one N(0, 1) gradient for its
  item set once, and replays it every round (the predictor: its honest gradient).
- D: every client uploads every item. S: each client uploads a popularity-weighted sample
  (O: popularity = how many benign uploads sent the row this round; L: uniform) of as many
  items as the largest benign upload (L: its own honest upload), and the malicious clients
  together cover every item the benign clients sent.
The reference setting: all clients every round, SGD lr 0.01, d = 32, item-level aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clients.malicious.base import MaliciousClient
from fedrec.errors import ConfigError

_REPLAY = 12  # the client's stream for Spattack-L's fixed gradient


def cancel_rows(benign: list, n_items: int, dim: int, weighting: str):
    """(weighted sum of benign rows (n_items, dim) float64, per-item count of benign senders)."""
    total = np.zeros((n_items, dim), np.float64)
    count = np.zeros(n_items, np.int64)
    for u in benign:  # one vectorised scatter per upload (<= clients per round)
        w = u.num_examples if weighting == "samples" else 1.0
        np.add.at(total, u.item_ids, w * u.item_rows.astype(np.float64))
        count[u.item_ids] += 1
    return total, count


def cover_samples(n_clients: int, n_items: int, size: int, popularity: np.ndarray, must: np.ndarray,
                  rng) -> list:
    """Per client, a popularity-weighted sample (without replacement) of `size` items; items in
    `must` that no client drew are dealt out round-robin, so together they cover `must`."""
    size = int(min(max(size, 1), n_items))
    p = popularity.astype(np.float64) + 1e-12
    p /= p.sum()
    picks = [rng.choice(n_items, size=size, replace=False, p=p) for _ in range(n_clients)]
    covered = np.zeros(n_items, bool)
    for s in picks:
        covered[s] = True
    missing = must[~covered[must]]
    for c in range(n_clients):
        extra = missing[c::n_clients]
        if len(extra):
            picks[c] = np.concatenate([picks[c], extra])
    return [np.unique(s).astype(np.int64) for s in picks]


@dataclass
class SpattackParams:
    variant: str = "O-D"  # O-D | O-S | L-D | L-S

    def validate(self):
        if self.variant not in ("O-D", "O-S", "L-D", "L-S"):
            raise ConfigError(f"attack.params.variant: {self.variant!r} is not one of O-D, O-S, L-D, L-S")


class SpattackClient(MaliciousClient):
    name = "spattack"
    knowledge_levels = ("omniscient", "local")  # O needs the hook; L runs anywhere
    Params = SpattackParams

    @classmethod
    def knowledge_from(cls, cfg) -> str:
        from clients.malicious.base import parse_params

        variant = parse_params(SpattackParams, cfg.attack.params, cls.name).variant
        level = "omniscient" if variant.startswith("O") else "local"
        if cfg.attack.knowledge not in ("default", level):
            raise ConfigError(f"attack.knowledge: Spattack-{variant} is {level}, not {cfg.attack.knowledge!r}")
        return level

    # --- L: a fixed N(0, 1) gradient, replayed ---------------------------------------------
    def poison_upload(self, ids, rows, predictor, state, rnd):
        n, dim = self.model.n_items, self.model.dim
        rng = self.stream(_REPLAY)
        if self.params.variant == "L-D":
            item_ids = np.arange(n, dtype=np.int64)
        else:
            size = min(max(len(ids), 1), n)
            item_ids = np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)
        return item_ids, rng.standard_normal((len(item_ids), dim)).astype(np.float32), predictor

    # --- O: cancel the benign sum -------------------------------------------------------------
    @classmethod
    def craft_round(cls, view, params, memory, rng):
        n, dim = view.n_items, view.item_table.shape[1]
        weighting = view.weighting
        total, count = cancel_rows(view.benign, n, dim, weighting)
        w = np.array([u.num_examples if weighting == "samples" else 1.0 for u in view.own], np.float64)
        if params.variant == "O-D":
            sets = [np.arange(n, dtype=np.int64) for _ in view.own]
        else:
            size = max((len(u.item_ids) for u in view.benign), default=1)
            sets = cover_samples(len(view.own), n, size, count, np.flatnonzero(count), rng)
        weight_of_item = np.zeros(n, np.float64)
        for s, wi in zip(sets, w):
            weight_of_item[s] += wi
        share = -total / np.maximum(weight_of_item, 1e-30)[:, None]  # per unit of weight
        wb = [u.num_examples if weighting == "samples" else 1.0 for u in view.benign]
        pred_total = [sum((wi * u.predictor[j].astype(np.float64) for wi, u in zip(wb, view.benign)),
                          np.zeros(view.predictor[j].shape)) for j in range(len(view.predictor))]
        out = [(s, share[s].astype(np.float32), [(-p / w.sum()).astype(np.float32) for p in pred_total])
               for s in sets]
        return out, {"rows": int(np.mean([len(s) for s in sets])), "benign_items": int((count > 0).sum())}
