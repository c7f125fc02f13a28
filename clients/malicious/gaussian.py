"""Gaussian: noise with the statistics of honest updates.

Threat model: omniscient by default (the round's benign updates; simulation only) or
colluding (the malicious clients' own honest updates). Each malicious client uploads, for
every item row in the known updates, a draw from N(mu, sigma^2) per coordinate, where mu and
sigma are the per-coordinate mean and standard deviation of the known updates taken as dense
vectors (zeros for rows an update did not send); the predictor likewise.
"""

from __future__ import annotations

from clients.malicious.base import MaliciousClient, dense_updates, knowledge_set


def gaussian_rows(mean, std, rng, shape_prefix=()):
    """mean + std * N(0, 1), float32."""
    return (mean + std * rng.standard_normal((*shape_prefix, *mean.shape))).astype("float32")


class GaussianClient(MaliciousClient):
    name = "gaussian"
    knowledge_levels = ("omniscient", "colluding")

    @classmethod
    def craft_round(cls, view, params, memory, rng):
        ids, X, pred = dense_updates(knowledge_set(view))
        mu, sd = X.mean(0), X.std(0)
        pmu = [p.mean(0) for p in pred]
        psd = [p.std(0) for p in pred]
        out = [(ids, gaussian_rows(mu, sd, rng), [gaussian_rows(m, s, rng) for m, s in zip(pmu, psd)])
               for _ in view.own]
        return out, {"rows": len(ids)}
