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

The ClusterAttack/UNION reference code's "Fang" differs on three points, each a parameter
(its form: direction along, deviation coordinate, gamma 3, gamma_max 4):
- params.direction: "against" (above) or "along": mu + gamma * s * sign(mu), a deviation in
  the direction of the mean gradient itself;
- params.deviation: "mean" (s = sigma_bar, above) or "coordinate" (s = sigma, per coordinate);
- params.gamma_max > gamma: each malicious upload draws its own gamma ~ U[gamma, gamma_max)
  (the reference: U(3, 4)) from the adversary's round generator, in the order of the round's
  malicious clients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clients.malicious.base import MaliciousClient, dense_stats, knowledge_set, statistical_round
from fedrec.errors import ConfigError


def stat_opt(mean: np.ndarray, std: np.ndarray, gamma: float, direction: str = "against",
             deviation: str = "mean") -> np.ndarray:
    """mu -+ gamma * s * sign(mu) (float32): - for direction "against", + for "along"; s the
    mean nonzero sigma ("mean") or sigma itself ("coordinate")."""
    if deviation == "coordinate":
        scale = std
    else:
        nz = std[std > 0]
        scale = float(nz.mean()) if nz.size else float(np.abs(mean).mean())
    sign = -1.0 if direction == "against" else 1.0
    return (mean + sign * gamma * scale * np.sign(mean)).astype(np.float32)


@dataclass
class FangParams:
    gamma: float = 3.0  # deviation in units of the benign standard deviation
    gamma_max: float = 0.0  # > gamma: gamma ~ U[gamma, gamma_max) per malicious upload
    direction: str = "against"  # against | along (the sign of the deviation against mu's)
    deviation: str = "mean"  # mean | coordinate (sigma_bar for every coordinate, or sigma)

    def validate(self):
        if self.direction not in ("against", "along"):
            raise ConfigError(f"attack.params.direction: {self.direction!r} is not one of against, along")
        if self.deviation not in ("mean", "coordinate"):
            raise ConfigError(f"attack.params.deviation: {self.deviation!r} is not one of mean, coordinate")
        if not (np.isfinite(self.gamma) and self.gamma >= 0):
            raise ConfigError(f"attack.params.gamma: expected a number >= 0, got {self.gamma!r}")
        if not np.isfinite(self.gamma_max):
            raise ConfigError(f"attack.params.gamma_max: {self.gamma_max!r} is not a finite number")


class FangClient(MaliciousClient):
    name = "fang"
    knowledge_levels = ("omniscient", "colluding")
    Params = FangParams

    @classmethod
    def craft_round(cls, view, params, memory, rng):
        if params.gamma_max <= params.gamma:  # one gamma: every malicious client the same upload
            return statistical_round(view, lambda mean, std: stat_opt(
                mean, std, params.gamma, params.direction, params.deviation))
        ids, mean, std, pred = dense_stats(knowledge_set(view))
        gammas = rng.uniform(params.gamma, params.gamma_max, size=len(view.own))
        out = [(ids, stat_opt(mean, std, g, params.direction, params.deviation),
                [stat_opt(m, s, g, params.direction, params.deviation) for m, s in pred])
               for g in gammas.tolist()]
        return out, {"rows": len(ids), "gamma": float(gammas.mean()) if len(gammas) else 0.0}
