"""FedAttack (Wu et al., KDD 2022): hard sampling as data poisoning.

Threat model: local. A malicious client knows its own data, its private user embedding and
the global model it receives (and, with params.item_pool < 1, only that fraction of the
items). From round attack.start_round on it scores every item it knows with its user
embedding under the current model, then trains normally on poisoned pairs:

- negatives: the highest-scored items it has not interacted with (the hardest negatives);
- positives: the lowest-scored items (replacing its real positives), as many as its real
  positives; the k-th lowest is paired with the k-th highest.
Only the data changes: the gradient, the upload and the user-row update are the honest code.

The ClusterAttack/UNION reference code's FedAttack differs on two points, each a parameter
(its form: single_positive true, exclude_known false): params.single_positive pairs every
negative with the one lowest-scored item (instead of the n lowest), and params.exclude_known
false ranks all items, the user's own included, for both ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clients.malicious.base import MaliciousClient
from fedrec.errors import ConfigError

_POOL = 11  # the client's stream for its known item pool


def hard_pairs(scores: np.ndarray, candidates: np.ndarray, known_mask: np.ndarray | None, n: int,
               n_neg: int | None = None, single_positive: bool = False):
    """(positives, negatives): the n lowest- and n highest-scored candidate items the user has
    not interacted with (known_mask; None: every candidate), lowest first / highest first; n
    shrinks to half the candidates if there are too few. single_positive: the lowest one, n
    times. With n_neg (a sequential model's own number of negatives) the negatives are
    exactly n_neg: the hardest ones, cycled if there are fewer candidates."""
    cand = candidates if known_mask is None else candidates[~known_mask[candidates]]
    n = int(min(n, len(cand) // 2))
    if n <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(scores[cand], kind="stable")
    pos = cand[order[:1 if single_positive else n]].astype(np.int64)
    if single_positive:
        pos = np.repeat(pos, n)
    if n_neg is None:
        return pos, cand[order[::-1][:n]].astype(np.int64)
    hardest = cand[order[::-1][:max(min(n_neg, len(cand) - n), 1)]].astype(np.int64)
    return pos, np.resize(hardest, n_neg)


@dataclass
class FedAttackParams:
    item_pool: float = 1.0  # fraction of the items the attacker knows (drawn once per client)
    single_positive: bool = False  # every pair's positive the one lowest-scored item
    exclude_known: bool = True  # false: the user's own items are ranked too (the reference's)

    def validate(self):
        if not 0.0 < self.item_pool <= 1.0:
            raise ConfigError(f"attack.params.item_pool: {self.item_pool!r} is outside (0, 1]")


class FedAttackClient(MaliciousClient):
    name = "fedattack"
    knowledge_levels = ("local",)
    Params = FedAttackParams
    pairs_need_model = True

    def _item_pool(self) -> np.ndarray:
        n = self.model.n_items
        if self.params.item_pool >= 1.0:
            return np.arange(n, dtype=np.int64)
        k = max(2, int(round(self.params.item_pool * n)))
        return np.sort(self.stream(_POOL).choice(n, size=k, replace=False)).astype(np.int64)

    def poison_pairs(self, pos, neg, state, rng):
        table, predictor = self._global[0], list(self._global[1:])
        # the representation as of the current model (sequential models: the global encoder)
        u = self.user_vector(self._round - 1, arrays=self._global, state=state)
        scores = self.model.score(u[None, :], table, predictor)[0]
        # as many as the model consumes: pairs for MF/NCF; the sequential models take the
        # history's length and the loss's own number of negatives (0 for a full softmax)
        hp, hn = hard_pairs(scores, self._item_pool(),
                            self.exclusion_mask() if self.params.exclude_known else None, len(pos),
                            len(neg) if self.model.sequential else None, self.params.single_positive)
        return hp, hn
