"""Gaussian: noise with the statistics of honest updates.

Threat model: omniscient by default (the round's benign updates; simulation only) or
colluding (the malicious clients' own honest updates in the round). With attack.pool_sample
= N > 0 the colluding knowledge is instead the honest updates of up to N malicious clients
drawn from all of them (sampled in the round or not) at the current model, as the
ClusterAttack/UNION reference's attacker; omniscient adds those to the benign updates. Each
malicious client uploads, for every item row in the known updates, a draw from N(mu,
sigma^2) per coordinate, where mu and sigma are the per-coordinate mean and standard
deviation of the known updates taken as dense vectors (zeros for rows an update did not
send); the predictor likewise.
"""

from __future__ import annotations

from clients.malicious.base import MaliciousClient, dense_stats, knowledge_set


def gaussian_rows(mean, std, rng, shape_prefix=()):
    """mean + std * N(0, 1), float32."""
    return (mean + std * rng.standard_normal((*shape_prefix, *mean.shape))).astype("float32")


class GaussianClient(MaliciousClient):
    name = "gaussian"
    knowledge_levels = ("omniscient", "colluding")

    @classmethod
    def craft_round(cls, view, params, memory, rng):
        ids, mu, sd, pred = dense_stats(knowledge_set(view))
        pmu = [m for m, _ in pred]
        psd = [s for _, s in pred]
        out = [(ids, gaussian_rows(mu, sd, rng), [gaussian_rows(m, s, rng) for m, s in zip(pmu, psd)])
               for _ in view.own]
        return out, {"rows": len(ids)}
