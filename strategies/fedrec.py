"""FedRecStrategy: seeded sampling, upload validation, a pluggable rule, the server step.

The class only moves messages. The round's work is split into plain methods that take and
return numpy arrays (`sample`, `aggregate_uploads`, `evaluate_results`), which the Flower
methods wrap and the in-process runner calls directly, so both ways of running execute the
same code.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.common import (
    EvaluateIns,
    FitIns,
    ndarrays_to_parameters,
)
from flwr.server.strategy import Strategy

from fedrec.optim import ServerOptimizer
from fedrec.protocol import (
    UploadError,
    decode_tensors,
    decode_uploads,
    max_tensor_bytes,
    valid_loss,
    valid_ranking_metrics,
)
from strategies.mean import MeanRule
from strategies.rule import RoundUpdates


def sample_round(rng: np.random.Generator, n_candidates: int, k: int, mode: str, epoch_state: dict):
    """Positions of the clients sampled this round.

    uniform: k distinct clients uniformly at random every round (the reference).
    epoch: a seeded permutation dealt out k at a time; a new permutation once it runs out.
    When k does not divide the number of clients, an epoch's last round is short (as in
    FedAttack's batching), so every client is sampled exactly once per epoch.
    """
    k = min(k, n_candidates)
    if mode == "uniform":
        if k == n_candidates:
            return np.arange(n_candidates)
        return np.sort(rng.choice(n_candidates, size=k, replace=False))
    queue = epoch_state.get("queue")
    if queue is None or len(queue) == 0:
        queue = rng.permutation(n_candidates)
    epoch_state["queue"] = queue[k:]
    return np.sort(queue[:k])


def is_empty_upload(arrays, num_examples) -> bool:
    """A client with nothing to train on this round (0 examples, no rows): not an attack."""
    return (isinstance(num_examples, (int, np.integer)) and not isinstance(num_examples, bool)
            and num_examples == 0 and isinstance(arrays, (list, tuple)) and len(arrays) > 0
            and isinstance(arrays[0], np.ndarray) and arrays[0].size == 0)


def decoded_or_error(fit_res, n_arrays: int, max_bytes: int):
    """A FitRes's arrays, or the UploadError its bytes earned."""
    try:
        return decode_tensors(fit_res.parameters.tensors, n_arrays, max_bytes)
    except UploadError as e:
        return e


def rule_chain(rule) -> list:
    """The pre-aggregation steps and the rule (strategies.rule.FilterChain.parts), in order."""
    parts = getattr(rule, "parts", None)
    return parts() if parts is not None else [rule]


def rule_memory(rule) -> list:
    """Per step of the chain, its memory across rounds (None for stateless steps)."""
    return [s.state_dict() if hasattr(s, "state_dict") else None for s in rule_chain(rule)]


def load_rule_memory(rule, memory: list):
    chain = rule_chain(rule)
    if len(chain) != len(memory):
        raise ValueError(f"checkpoint holds {len(memory)} rule steps, the strategy has {len(chain)}")
    for step, state in zip(chain, memory):
        if state is not None:
            step.load_state_dict(state)


@dataclass
class RoundResult:
    """What one round's aggregation did, returned to the runner (which alone records it).

    metrics: the round's fit metrics (clients, accepted, empty, invalid, train_loss, rule_*);
    invalid: validation drops of this round by reason; dropped: ids of the clients whose valid
    uploads the filters and the rule left out; dropped_by: a filter stage's own drops
    ({stage: client ids}), so evaluation can score each stage apart; stepped: whether the server
    optimizer took a step (False when no upload survived validation).
    """

    metrics: dict
    invalid: Counter = field(default_factory=Counter)
    dropped: list = field(default_factory=list)
    dropped_by: dict = field(default_factory=dict)
    stepped: bool = False


class FedRecStrategy(Strategy):
    """Federated recommendation on sparse item uploads.

    model_arrays: initial [item_table, *predictor]; rule: an AggregationRule (default mean).
    The strategy keeps no record of the run: its plain methods return a `RoundResult` (fit) or
    a metrics dict (evaluation), and the runner writes them (fedrec.engine, fedrec.server_app).
    """

    def __init__(self, model_arrays, *, n_items, dim, predictor_shapes, server_cfg, seed=0,
                 clients_per_round=50, sampling="uniform", num_rounds=1, eval_every=0, eval_from=0,
                 fraction_evaluate=0.1, min_available_clients=1, rule=None, ks=(5, 10, 20)):
        super().__init__()
        self.n_items, self.dim = int(n_items), int(dim)
        self.predictor_shapes = [tuple(s) for s in predictor_shapes]
        self.server_cfg = server_cfg
        self.optimizer = ServerOptimizer(model_arrays, server_cfg.optimizer, server_cfg.lr,
                                         server_cfg.betas, server_cfg.eps)
        self.rule = rule if rule is not None else MeanRule(server_cfg.aggregation)
        check = getattr(self.rule, "check_model", None)  # e.g. a detector trained on other shapes
        if check is not None:
            check(self.n_items, self.dim, self.predictor_shapes)
        self.rng = np.random.default_rng([seed, 104729])  # sampling only
        self.eval_rng = np.random.default_rng([seed, 130363])
        self.clients_per_round = clients_per_round
        self.sampling = sampling
        self.epoch_state: dict = {}
        self.num_rounds = num_rounds
        self.eval_every, self.eval_from = eval_every, eval_from
        self.fraction_evaluate = fraction_evaluate
        self.min_available_clients = min_available_clients
        self.ks = list(ks)

    # --- plain methods (shared by Flower and the in-process runner) ---------------------
    def global_arrays(self) -> list:
        return self.optimizer.arrays()

    def sample(self, server_round: int, candidates: list) -> list:
        idx = sample_round(self.rng, len(candidates), self.clients_per_round, self.sampling,
                           self.epoch_state)
        return [candidates[i] for i in idx]

    def is_eval_round(self, server_round: int) -> bool:
        return server_round == self.num_rounds or (
            self.eval_every > 0 and server_round % self.eval_every == 0
            and server_round >= self.eval_from)

    def aggregate_uploads(self, server_round: int, results) -> RoundResult:
        """results: list of (client_id, arrays, num_examples, metrics): validate, filter,
        aggregate and step the server optimizer; returns what the round did."""
        items, metrics_of, dropped = [], {}, Counter()
        empty = 0
        for client_id, arrays, num_examples, metrics in results:
            if is_empty_upload(arrays, num_examples):
                empty += 1  # a client with nothing to train on this round: not an attack
                continue
            items.append((arrays, num_examples, str(client_id)))
            metrics_of[str(client_id)] = metrics
        uploads, stacked, errors = decode_uploads(
            items, n_items=self.n_items, dim=self.dim, predictor_shapes=self.predictor_shapes,
            max_rows=self.server_cfg.max_upload_rows, max_examples=self.server_cfg.max_samples,
            max_abs=self.server_cfg.max_abs_value)
        for _, e in errors:
            dropped[e.reason] += 1
        # the accepted uploads' reported losses, where believable (clients choose them)
        reported = [metrics_of[u.client] for u in uploads]
        losses = [valid_loss(m.get("loss")) if isinstance(m, Mapping) else None for m in reported]
        good = [v for v in losses if v is not None]
        out = {"clients": len(results), "accepted": len(uploads), "empty": empty,
               "invalid": sum(dropped.values()), "invalid_metrics": len(losses) - len(good),
               "train_loss": math.fsum(good) / len(good) if good else float("nan")}
        result = RoundResult(out, invalid=dropped)
        if uploads and self.server_cfg.step == "upload":
            # one step per upload, in sampling order (server.step upload: the mean rule of
            # one upload is that upload; the config allows no other rule and no filter)
            for upload in uploads:
                agg = self.rule(RoundUpdates([upload], np.ones(1), self.n_items, self.dim,
                                             server_round, self.optimizer.arrays()[0],
                                             self.optimizer.item_state()))
                result.stepped |= self._step(agg, out)
            out["rule_dropped"] = 0
            out["server_steps"] = len(uploads)
        elif uploads:
            weights = (np.array([u.num_examples for u in uploads], dtype=np.float64)
                       if self.server_cfg.weighting == "samples" else np.ones(len(uploads)))
            # the rows were concatenated during validation already
            updates = RoundUpdates(uploads, weights, self.n_items, self.dim, server_round,
                                   self.optimizer.arrays()[0], self.optimizer.item_state(),
                                   stacked_rows=stacked)
            agg = self.rule(updates)
            result.dropped = [uploads[i].client for i in agg.dropped]
            result.dropped_by = {k: [uploads[i].client for i in v] for k, v in agg.dropped_by.items()}
            out["rule_dropped"] = len(agg.dropped)
            out.update({f"rule_{k}": v for k, v in agg.info.items()})
            result.stepped = self._step(agg, out)
        return result

    def _step(self, agg, out: dict) -> bool:
        """One server optimizer step on an aggregate; False (and `nonfinite_aggregate` in the
        round's metrics) where it is not finite."""
        grads = [agg.item_grad, *agg.predictor] if agg.predictor else \
            [agg.item_grad, *[np.zeros(s, np.float32) for s in self.predictor_shapes]]
        if all(np.isfinite(g).all() for g in grads):
            self.optimizer.step(grads)
            return True
        out["nonfinite_aggregate"] = 1  # validated inputs cannot get here; never let a rule's
        return False  # bug reach the model

    def evaluate_results(self, server_round: int, per_client_metrics: list) -> dict:
        """Mean of per-user metrics (order-independent sums), e.g. from federated evaluation.
        Clients report these themselves: only {val,test}_{hr,ndcg}@k for the run's ks, each in
        [0, 1], count; the others are dropped and counted (eval_invalid_metrics)."""
        checked = [valid_ranking_metrics(m, self.ks) for m in per_client_metrics]
        per_client_metrics = [m for m, _ in checked]
        invalid = sum(bad for _, bad in checked)
        keys = sorted({k for m in per_client_metrics for k in m})
        out = {"eval_invalid_metrics": invalid} if invalid else {}
        for k in keys:
            vals = [float(m[k]) for m in per_client_metrics if k in m]
            out[k] = math.fsum(vals) / len(vals)
            split = k.split("_", 1)[0]
            out[f"{split}_users"] = len(vals)
        return out

    def state_dict(self) -> dict:
        """What the server carries from round to round (a checkpoint, fedrec.checkpoint): the
        global arrays, the optimizer's moments, the sampling generators and epoch queue, and
        the memory of the rule and filters (their `state_dict`, where they have one)."""
        return copy.deepcopy({
            "arrays": self.global_arrays(), "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.bit_generator.state, "eval_rng": self.eval_rng.bit_generator.state,
            "epoch_state": self.epoch_state, "rule": rule_memory(self.rule)})

    def load_state_dict(self, state: dict):
        """Restore `state_dict()`; the global arrays are written in place (they may live in
        memory shared with worker processes)."""
        state = copy.deepcopy(state)
        for a, saved in zip(self.global_arrays(), state["arrays"]):
            np.copyto(a, saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        self.eval_rng.bit_generator.state = state["eval_rng"]
        self.epoch_state = state["epoch_state"]
        load_rule_memory(self.rule, state["rule"])

    # --- Flower Strategy API ------------------------------------------------------------
    def initialize_parameters(self, client_manager):
        return ndarrays_to_parameters(self.global_arrays())

    def _clients(self, client_manager):
        client_manager.wait_for(self.min_available_clients, timeout=3600)
        proxies = client_manager.all()
        return [proxies[cid] for cid in sorted(proxies)]

    def configure_fit(self, server_round, parameters, client_manager):
        chosen = self.sample(server_round, self._clients(client_manager))
        ins = FitIns(ndarrays_to_parameters(self.global_arrays()), {"round": server_round})
        return [(proxy, ins) for proxy in chosen]

    def aggregate_fit_result(self, server_round, results, failures) -> RoundResult:
        """aggregate_fit's work on Flower's (proxy, FitRes) pairs, returning the RoundResult
        (the ServerApp's runner records it); client failures are counted in its metrics. Each
        upload's bytes are decoded under size limits (fedrec.protocol.decode_tensors): one
        that does not decode is dropped and counted, never raised."""
        raw = [(proxy.cid, self.decode_fit_res(res), res.num_examples, res.metrics)
               for proxy, res in results]
        result = self.aggregate_uploads(server_round, raw)
        result.metrics["failures"] = len(failures)
        return result

    def decode_fit_res(self, fit_res):
        """A FitRes's arrays, or the UploadError its bytes earned (never raises)."""
        limit = max_tensor_bytes(self.n_items, self.dim, self.predictor_shapes,
                                 self.server_cfg.max_upload_rows)
        return decoded_or_error(fit_res, 2 + len(self.predictor_shapes), limit)

    def aggregate_fit(self, server_round, results, failures):
        result = self.aggregate_fit_result(server_round, results, failures)
        return ndarrays_to_parameters(self.global_arrays()), result.metrics

    def configure_evaluate(self, server_round, parameters, client_manager):
        if not self.is_eval_round(server_round):
            return []
        clients = self._clients(client_manager)
        final = server_round == self.num_rounds
        if not final and self.fraction_evaluate < 1.0:
            k = max(1, int(round(self.fraction_evaluate * len(clients))))
            idx = np.sort(self.eval_rng.choice(len(clients), size=k, replace=False))
            clients = [clients[i] for i in idx]
        ins = EvaluateIns(ndarrays_to_parameters(self.global_arrays()), {"round": server_round})
        return [(proxy, ins) for proxy in clients]

    def aggregate_evaluate(self, server_round, results, failures):
        per_client = [res.metrics for _, res in results if res.num_examples > 0]
        out = self.evaluate_results(server_round, per_client)
        loss = None  # ranking metrics only; Flower's loss slot is unused
        return loss, out

    def evaluate(self, server_round, parameters):
        return None  # no centralised evaluation: the server holds no user data
