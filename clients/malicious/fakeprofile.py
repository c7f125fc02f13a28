"""Data-poisoning baselines of PipAttack (WSDM'22): the random attack (RA) and the popular
attack (PA). Each malicious client replaces its training data by a fake profile: the targets
(`attack.target`) plus `params.fillers` filler items, random ones (RA, drawn once per client
from its own stream) or the most popular ones by the public interaction counts (PA), and
then trains and uploads honestly on that profile: q = data.neg_ratio negatives per fake
positive, drawn each round (its round stream) among the items outside the profile.

Threat model: local (own device, the public item set and counts); it trains honestly before
`attack.start_round`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clients.malicious.base import MaliciousClient
from fedrec.errors import ConfigError

_FILLERS = 25  # the client's stream for its random fillers


@dataclass
class FakeProfileParams:
    fillers: int = 29  # filler items beside the targets (PoisonFedDLRS: 30 items, target included)

    def validate(self):
        if not 0 <= self.fillers <= 100_000:
            raise ConfigError(f"attack.params.fillers: {self.fillers!r} is outside [0, 100000]")


class RandomAttackClient(MaliciousClient):
    name = "random_attack"
    knowledge_levels = ("local",)
    Params = FakeProfileParams

    def targets(self) -> np.ndarray:
        from clients.malicious.pipattack import PipAttackClient

        return PipAttackClient.targets(self)

    def fillers(self, n: int) -> np.ndarray:
        rest = np.setdiff1d(np.arange(self.model.n_items), self.targets())
        return self.stream(_FILLERS).choice(rest, size=min(n, len(rest)), replace=False)

    def profile(self) -> np.ndarray:
        return np.union1d(self.targets(), self.fillers(self.params.fillers)).astype(np.int64)

    def poison_pairs(self, pos, neg, state, rng):
        fake = self.profile()
        q = self.cfg.data.neg_ratio
        pos = np.repeat(fake, q)
        outside = np.setdiff1d(np.arange(self.model.n_items), fake)
        neg = outside[rng.integers(0, len(outside), size=len(pos))].astype(np.int64)
        return pos.astype(np.int64), neg


class PopularAttackClient(RandomAttackClient):
    name = "popular_attack"

    def fillers(self, n: int) -> np.ndarray:
        from fedrec.targets import item_counts, popularity_order

        order = popularity_order(item_counts(self.data))
        order = order[~np.isin(order, self.targets())]
        return order[:n]
