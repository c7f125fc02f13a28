"""DYN-OPT (Shejwalkar & Houmansadr, NDSS 2021), the AGR-agnostic min-max and min-sum attacks.

Threat model: omniscient by default (the round's benign updates; simulation only) or
colluding (the malicious clients' own honest updates in the round). With attack.pool_sample
= N > 0 the colluding knowledge is instead the honest updates of up to N malicious clients
drawn from all of them (sampled in the round or not) at the current model, as the
ClusterAttack/UNION reference's attacker; omniscient adds those to the benign updates. With
mu the mean of the known updates (as dense vectors: item rows they sent, then the predictor)
and p a perturbation direction, every malicious client uploads g = mu + gamma * p with the
largest gamma that keeps g inside the benign spread:

    min-max:  max_i ||g - g_i||   <= max_{i,j} ||g_i - g_j||
    min-sum:  sum_i ||g - g_i||^2 <= max_i sum_j ||g_i - g_j||^2

found by binary search (gamma_init, halving steps, tolerance tau). p: "std" = -sigma
(the paper's best), "uv" = -mu / ||mu||, "sgn" = -sign(mu).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clients.malicious.base import MaliciousClient, dense_updates, knowledge_set
from fedrec.errors import ConfigError


def perturbation(X: np.ndarray, kind: str) -> np.ndarray:
    mu = X.mean(0)
    if kind == "std":
        return -X.std(0)
    if kind == "uv":
        n = np.linalg.norm(mu)
        return -mu / n if n > 0 else np.zeros_like(mu)
    return -np.sign(mu)


def dyn_opt_gamma(X: np.ndarray, p: np.ndarray, mode: str, gamma_init: float = 10.0,
                  tau: float = 1e-5, max_iter: int = 200) -> float:
    """The binary search on gamma. X: (k, D) known updates (float64), p: (D,)."""
    mu = X.mean(0)
    sq = (X * X).sum(1)
    G = X @ X.T
    pair = np.maximum(sq[:, None] + sq[None, :] - 2 * G, 0.0)  # ||g_i - g_j||^2
    # ||mu + gamma p - g_i||^2 = a_i + 2 gamma b_i + gamma^2 c, with:
    a = np.maximum(mu @ mu - 2 * (X @ mu) + sq, 0.0)
    b = p @ mu - X @ p
    c = p @ p

    def ok(gamma):
        d = np.maximum(a + 2 * gamma * b + gamma * gamma * c, 0.0)
        if mode == "min-max":
            return d.max() <= pair.max()
        return d.sum() <= pair.sum(1).max()

    gamma, step, best = gamma_init, gamma_init, 0.0  # moves by step / 2, then halves: reaches (0, 2 gamma_init)
    for _ in range(max_iter):
        if abs(best - gamma) <= tau:
            break
        if ok(gamma):
            best = gamma
            gamma += step / 2
        else:
            gamma -= step / 2
        step /= 2
    return best


@dataclass
class DynOptParams:
    mode: str = "min-max"  # min-max | min-sum
    perturbation: str = "std"  # std | uv | sgn
    gamma_init: float = 10.0
    tau: float = 1e-5

    def validate(self):
        if self.mode not in ("min-max", "min-sum"):
            raise ConfigError(f"attack.params.mode: {self.mode!r} is not one of min-max, min-sum")
        if self.perturbation not in ("std", "uv", "sgn"):
            raise ConfigError(f"attack.params.perturbation: {self.perturbation!r} is not one of std, uv, sgn")


class DynOptClient(MaliciousClient):
    name = "dynopt"
    knowledge_levels = ("omniscient", "colluding")
    Params = DynOptParams

    @classmethod
    def craft_round(cls, view, params, memory, rng):
        ids, X3, pred = dense_updates(knowledge_set(view))
        k = X3.shape[0]
        X = np.concatenate([X3.reshape(k, -1), *[a.reshape(k, -1) for a in pred]], 1).astype(np.float64)
        p = perturbation(X, params.perturbation)
        gamma = dyn_opt_gamma(X, p, params.mode, params.gamma_init, params.tau)
        g = (X.mean(0) + gamma * p).astype(np.float32)
        n_rows = X3.shape[1] * X3.shape[2]
        rows = g[:n_rows].reshape(X3.shape[1:])
        preds, off = [], n_rows
        for a in pred:
            size = int(np.prod(a.shape[1:]))
            preds.append(g[off:off + size].reshape(a.shape[1:]))
            off += size
        return [(ids, rows, preds) for _ in view.own], {"gamma": gamma, "rows": len(ids)}
