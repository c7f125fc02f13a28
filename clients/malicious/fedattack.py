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

FedAttack's own notebook (wuch15/FedAttack) goes further, again each a parameter (its form:
single_positive true, single_negative true, exclude_known false, ranking initial_dot):
every pair is (the lowest-ranked item, the highest-ranked one; the second where the highest
is that pair's real item), and it ranks with a dot product of the item table and the user
embedding as initialised (read once before training, NCF included), not the model's score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clients.malicious.base import MaliciousClient
from fedrec.errors import ConfigError

_POOL = 11  # the client's stream for its known item pool


def hard_pairs(scores: np.ndarray, candidates: np.ndarray, known_mask: np.ndarray | None, n: int,
               n_neg: int | None = None, single_positive: bool = False,
               single_negative_of: np.ndarray | None = None):
    """(positives, negatives): the n lowest- and n highest-scored candidate items the user has
    not interacted with (known_mask; None: every candidate), lowest first / highest first; n
    shrinks to half the candidates if there are too few. single_positive: the lowest one, n
    times. single_negative_of (the pairs' real positives, n of them): every negative is the
    highest-scored item, or the second-highest for a pair whose real positive it is (FedAttack's
    notebook). With n_neg (a sequential model's own number of negatives) the negatives are
    exactly n_neg: the hardest ones, cycled if there are fewer candidates."""
    cand = candidates if known_mask is None else candidates[~known_mask[candidates]]
    n = int(min(n, len(cand) // 2))
    if n <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(scores[cand], kind="stable")
    pos = cand[order[:1 if single_positive else n]].astype(np.int64)
    if single_positive:
        pos = np.repeat(pos, n)
    if single_negative_of is not None:
        first, second = cand[order[::-1][:2]].astype(np.int64)
        real = np.asarray(single_negative_of, np.int64)[:n]
        return pos, np.where(real == first, second, first)
    if n_neg is None:
        return pos, cand[order[::-1][:n]].astype(np.int64)
    hardest = cand[order[::-1][:max(min(n_neg, len(cand) - n), 1)]].astype(np.int64)
    return pos, np.resize(hardest, n_neg)


@dataclass
class FedAttackParams:
    item_pool: float = 1.0  # fraction of the items the attacker knows (drawn once per client)
    single_positive: bool = False  # every pair's positive the one lowest-scored item
    exclude_known: bool = True  # false: the user's own items are ranked too (the reference's)
    single_negative: bool = False  # every pair's negative the one highest-ranked item (notebook)
    ranking: str = "model"  # model: the current model's score; initial_dot: FedAttack's notebook

    def validate(self):
        if not 0.0 < self.item_pool <= 1.0:
            raise ConfigError(f"attack.params.item_pool: {self.item_pool!r} is outside (0, 1]")
        if self.ranking not in RANKINGS:
            raise ConfigError(f"attack.params.ranking: {self.ranking!r} is not one of "
                              f"{', '.join(RANKINGS)}")


RANKINGS = ("model", "initial_dot")


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
        if self.params.ranking == "initial_dot":
            if not self.model.has_user_row:
                raise ConfigError("attack.params.ranking: initial_dot needs a model with a user "
                                  f"embedding ({self.model.name} has none)")
            # the notebook reads the user embeddings once, before training, and ranks by a dot
            # product with the current item table whatever the model's scorer
            scores = np.asarray(table, np.float64) @ np.asarray(self.initial_user_row(), np.float64)
        else:
            # the representation as of the current model (sequential models: the global encoder)
            u = self.user_vector(self._round - 1, arrays=self._global, state=state)
            scores = self.model.score(u[None, :], table, predictor)[0]
        if self.params.single_negative and self.model.sequential:
            raise ConfigError("attack.params.single_negative: pairs only (MF, NCF)")
        # as many as the model consumes: pairs for MF/NCF; the sequential models take the
        # history's length and the loss's own number of negatives (0 for a full softmax)
        hp, hn = hard_pairs(scores, self._item_pool(),
                            self.exclusion_mask() if self.params.exclude_known else None, len(pos),
                            len(neg) if self.model.sequential else None, self.params.single_positive,
                            pos if self.params.single_negative else None)
        return hp, hn
