"""Hostile: a client that sends whatever bytes and metrics a Byzantine device may send.

Threat model: local, and the strongest one a server must survive: the attacker controls every
byte its devices send (the upload's arrays, its `num_examples`, its reported metrics), not
only the values an honest training step could produce. It is not an attack on the model but a
test of the server: each round, each hostile client replaces its honest upload, with
probability `params.rate`, by a payload of a kind drawn from `fedrec.fuzz` (non-finite and
huge values, malformed ids, wrong shapes and dtypes, objects that are not arrays, absurd
sample counts) and its metrics, with probability `params.metric_rate`, by hostile ones. Under
Flower (`to_client`) a share `params.byte_rate` of its uploads is also corrupted after
serialisation (random, empty, truncated or pickled tensors, headers declaring 745 GiB).

Every draw comes from the client's own stream for (seed, user, purpose, round), so a run is
reproducible, and the in-process runner and Flower's simulation draw the same payloads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clients.malicious.base import MaliciousClient
from fedrec.errors import ConfigError
from fedrec.fuzz import ARRAY_KINDS, BYTE_KINDS, hostile_arrays, hostile_metrics, hostile_tensors
from fedrec.fuzz import METRIC_KINDS

_HOSTILE, _BYTES, _EVAL = 21, 22, 23  # its streams: payloads, byte corruption, reports


@dataclass
class HostileParams:
    kinds: str = "all"  # comma-separated fedrec.fuzz.ARRAY_KINDS, or "all"
    rate: float = 1.0  # share of rounds whose upload is replaced
    metric_rate: float = 0.5  # share of rounds whose metrics are replaced
    byte_rate: float = 0.0  # under Flower: share of uploads corrupted after serialisation

    def validate(self):
        for name in ("rate", "metric_rate", "byte_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"attack.params.{name}: expected a number in [0, 1], got {v!r}")
        unknown = sorted(set(self.kind_list()) - set(ARRAY_KINDS))
        if unknown:
            raise ConfigError(f"attack.params.kinds: {unknown[0]!r} is not one of "
                              f"all, {', '.join(ARRAY_KINDS)}")

    def kind_list(self) -> list:
        if self.kinds.strip() == "all":
            return list(ARRAY_KINDS)
        return [k.strip() for k in self.kinds.split(",") if k.strip()]


class HostileClient(MaliciousClient):
    name = "hostile"
    knowledge_levels = ("local",)
    Params = HostileParams

    def finish_fit(self, job, grad, arrays):
        upload, n, metrics = super().finish_fit(job, grad, arrays)
        rnd = job.round
        if not self.attacking(rnd):
            return upload, n, metrics
        rng = self.stream(_HOSTILE, rnd)
        if rng.random() < self.params.rate:
            kind = str(rng.choice(self.params.kind_list()))
            upload, n = hostile_arrays(rng, kind, self.model.n_items, self.model.dim,
                                       self.model.predictor_shapes)
        if rng.random() < self.params.metric_rate:
            metrics = hostile_metrics(rng, str(rng.choice(METRIC_KINDS)))
        return upload, n, metrics

    def evaluate(self, parameters, config):
        rnd = int(config.get("round", 0))
        if not self.attacking(rnd):
            return super().evaluate(parameters, config)
        rng = self.stream(_EVAL, rnd)
        # evaluation reports count as one example each, whatever their values claim
        return 0.0, 1, hostile_metrics(rng, str(rng.choice(METRIC_KINDS)))

    def to_client(self):
        inner = super().to_client()
        if self.params.byte_rate <= 0:
            return inner
        return _CorruptingTransport(inner, self)


class _CorruptingTransport:
    """Flower's Client for a HostileClient: its serialised tensors corrupted at byte level."""

    def __init__(self, inner, client: HostileClient):
        self._inner, self._client = inner, client

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def fit(self, ins):
        res = self._inner.fit(ins)
        c = self._client
        rnd = int(ins.config.get("round", 0))
        rng = c.stream(_BYTES, rnd)
        if c.attacking(rnd) and rng.random() < c.params.byte_rate and res.parameters.tensors:
            import io

            arrays = [np.load(io.BytesIO(t), allow_pickle=False) for t in res.parameters.tensors]
            res.parameters.tensors = hostile_tensors(rng, str(rng.choice(BYTE_KINDS)), arrays)
        return res
