"""LIE, "A Little Is Enough" (Baruch et al., NeurIPS 2019).

Threat model: omniscient by default (the round's benign updates; simulation only) or
colluding (the malicious clients' own honest updates in the round, the paper's setting).
With attack.pool_sample = N > 0 the colluding knowledge is instead the honest updates of up
to N malicious clients drawn from all of them (sampled in the round or not) at the current
model, as the ClusterAttack/UNION reference's attacker; omniscient adds those to the benign
updates. Every malicious client uploads mu - z * sigma (per coordinate, over the known
updates as dense vectors), with

    s = floor(n / 2 + 1) - m,    z = Phi^{-1}((n - s) / n)

for n clients in the round, m of them malicious (params.z >= 0 overrides z). The rows are the
union of the rows the known updates sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from clients.malicious.base import MaliciousClient, statistical_round


def lie_z(n: int, m: int) -> float:
    """Baruch et al.'s z for n clients of which m are malicious (0 when the formula has none)."""
    s = math.floor(n / 2 + 1) - m
    p = (n - s) / n
    if not 0.0 < p < 1.0:
        return 0.0
    return max(NormalDist().inv_cdf(p), 0.0)


def lie_update(mean, std, z):
    return (mean - z * std).astype("float32")


@dataclass
class LIEParams:
    z: float = -1.0  # < 0: from the client counts


class LIEClient(MaliciousClient):
    name = "lie"
    knowledge_levels = ("omniscient", "colluding")
    Params = LIEParams

    @classmethod
    def craft_round(cls, view, params, memory, rng):
        z = params.z if params.z >= 0 else lie_z(view.n_clients, len(view.own))
        return statistical_round(view, lambda mean, std: lie_update(mean, std, z), {"z": z})
