"""Fang / STAT-OPT (Fang et al., USENIX Security 2020; the statistics form of Shejwalkar &
Houmansadr, NDSS 2021): a constant-magnitude step against the benign direction.

Threat model: omniscient by default (the round's benign updates; simulation only) or
colluding (the malicious clients' own honest updates in the round). With attack.pool_sample
= N > 0 the colluding knowledge is instead the honest updates of up to N malicious clients
drawn from all of them (sampled in the round or not) at the current model, as the
ClusterAttack/UNION reference's attacker; omniscient adds those to the benign updates. With
mu and sigma the per-coordinate mean and standard deviation of the known updates (dense
vectors over the rows they sent), every malicious client uploads

    g_mal = mu - gamma * sigma_bar * sign(mu)

where sigma_bar is the mean of sigma over the nonzero coordinates (so the deviation has the
same magnitude in every coordinate, opposite to the benign mean's sign).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clients.malicious.base import MaliciousClient, statistical_round


def stat_opt(mean: np.ndarray, std: np.ndarray, gamma: float) -> np.ndarray:
    nz = std[std > 0]
    scale = float(nz.mean()) if nz.size else float(np.abs(mean).mean())
    return (mean - gamma * scale * np.sign(mean)).astype(np.float32)


@dataclass
class FangParams:
    gamma: float = 3.0  # deviation in units of the mean benign standard deviation


class FangClient(MaliciousClient):
    name = "fang"
    knowledge_levels = ("omniscient", "colluding")
    Params = FangParams

    @classmethod
    def craft_round(cls, view, params, memory, rng):
        return statistical_round(view, lambda mean, std: stat_opt(mean, std, params.gamma))
