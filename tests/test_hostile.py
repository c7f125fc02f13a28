"""The server survives anything a client sends: hostile bytes, arrays and metrics, through
decoding, validation, every rule in both forms and every filter chain (property-based), and
through the in-process runner with hostile clients (fedrec.fuzz, attack.name: hostile)."""

import io

import numpy as np
import pytest
from flwr.common import Code, FitRes, Parameters, Status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_cfg
from fedrec.config import from_dict
from fedrec.fuzz import (ARRAY_KINDS, BYTE_KINDS, METRIC_KINDS, hostile_arrays, hostile_metrics,
                         hostile_tensors)
from fedrec.protocol import UploadError, decode_tensor, encode_upload
from fedrec.registry import RULES
from strategies.clip import ClipFilter
from strategies.fedrec import FedRecStrategy
from strategies.rule import FilterChain
from strategies.union import UnionFilter

N_ITEMS, DIM, SHAPES = 40, 4, [(3,)]
RULE_ARGS = {"mean": {}, "median": {"f": 1}, "trimmed_mean": {"f": 1}, "krum": {"f": 1},
             "multikrum": {"f": 1}, "bulyan": {"f": 1}, "norm_bound": {"bound": 0.5}}


def _strategy(rule="mean", aggregation="dense", steps=(), optimizer="adam"):
    from fedrec.registry import load_class

    server = from_dict({"server": {"aggregation": aggregation, "optimizer": optimizer,
                                   "lr": 0.01}}).server
    agg = load_class(RULES[rule][0])(aggregation, **RULE_ARGS[rule])
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((N_ITEMS, DIM)) * 0.1).astype(np.float32)
    return FedRecStrategy([table, np.zeros(3, np.float32)], n_items=N_ITEMS, dim=DIM,
                          predictor_shapes=SHAPES, server_cfg=server,
                          rule=FilterChain(list(steps), agg) if steps else agg)


def _benign(rng, n):
    out = []
    for c in range(n):
        ids = np.sort(rng.choice(N_ITEMS, size=int(rng.integers(3, 12)), replace=False))
        rows = (rng.standard_normal((len(ids), DIM)) * 1e-2).astype(np.float32)
        out.append((f"b{c}", encode_upload(ids, rows, [(rng.standard_normal(3) * 1e-2).astype(np.float32)]),
                    int(rng.integers(1, 30)), {"loss": float(rng.random())}))
    return out


# ----------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("kind", BYTE_KINDS)
def test_every_hostile_byte_payload_is_an_upload_error(kind):
    rng = np.random.default_rng(0)
    honest = [np.arange(3, dtype=np.int64), np.ones((3, DIM), np.float32), np.zeros(3, np.float32)]
    for _ in range(20):
        tensors = hostile_tensors(rng, kind, honest)
        with pytest.raises(UploadError) as e:
            for t in tensors:
                decode_tensor(t, 8 * N_ITEMS * DIM)
        assert e.value.reason.startswith(("tensor_", "array_count"))


def test_honest_tensors_decode_exactly():
    for a in (np.arange(5, dtype=np.int64), np.ones((3, DIM), np.float32),
              np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)), np.zeros(0, np.int64)):
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        got = decode_tensor(buf.getvalue(), 1 << 20)
        assert got.dtype == a.dtype and np.array_equal(got, a)
    with pytest.raises(UploadError, match="tensor_size"):  # declared, never allocated
        decode_tensor(hostile_tensors(np.random.default_rng(0), "huge_header", [a])[0], 1 << 20)


class _Proxy:
    def __init__(self, cid):
        self.cid = cid


def _fit_res(arrays, n, metrics, tensors=None):
    if tensors is None:
        tensors = []
        for a in arrays:
            buf = io.BytesIO()
            np.save(buf, np.asarray(a), allow_pickle=False)
            tensors.append(buf.getvalue())
    return FitRes(Status(Code.OK, ""), Parameters(tensors, "numpy.ndarray"), n, metrics)


def test_flower_aggregate_fit_survives_hostile_bytes_and_metrics():
    """Benign FitRes mixed with hostile bytes and metrics: aggregate_fit never raises, every
    bad upload is counted by reason, and the model equals the benign-only aggregate's."""
    rng = np.random.default_rng(1)
    benign = _benign(rng, 8)
    hostile = []
    for i, kind in enumerate(BYTE_KINDS * 3):
        honest = benign[i % len(benign)][1]
        hostile.append((_Proxy(f"h{i}"), _fit_res(None, 5, hostile_metrics(rng, str(rng.choice(METRIC_KINDS))),
                                                  hostile_tensors(rng, kind, honest))))
    good = [(_Proxy(c), _fit_res(a, n, m)) for c, a, n, m in benign]
    mixed, clean = _strategy(), _strategy()
    order = rng.permutation(len(good) + len(hostile))
    both = [(good + hostile)[i] for i in order]
    _, metrics = mixed.aggregate_fit(1, both, [])
    clean.aggregate_fit(1, [both[i] for i in range(len(both)) if both[i][0].cid.startswith("b")], [])
    assert metrics["accepted"] == len(good) and metrics["invalid"] == len(hostile)
    for a, b in zip(mixed.global_arrays(), clean.global_arrays()):
        assert np.array_equal(a, b)
    assert metrics["train_loss"] == pytest.approx(np.mean([m["loss"] for _, _, _, m in benign]))


def test_hostile_metrics_never_crash_or_poison_the_aggregates():
    s = _strategy()
    rng = np.random.default_rng(2)
    benign = _benign(rng, 4)
    results = benign + [(f"h{i}", up, n, hostile_metrics(rng, kind))
                        for i, (kind, (_, up, n, _)) in enumerate(zip(METRIC_KINDS, benign * 4))]
    r = s.aggregate_uploads(1, results)
    expect = [m["loss"] for _, _, _, m in benign] * 5
    bad = sum(1 for k in METRIC_KINDS if k != "many_keys")  # many_keys carries no loss at all
    assert r.metrics["invalid_metrics"] == bad + 1
    assert np.isfinite(r.metrics["train_loss"]) and 0 <= r.metrics["train_loss"] <= 1
    good_eval = [{"test_hr@5": 1.0, "val_hr@5": 0.0}, {"test_hr@5": 0.0, "val_hr@5": 1.0}]
    evil = [hostile_metrics(rng, k) for k in METRIC_KINDS]
    out = s.evaluate_results(3, good_eval + evil)
    assert out["test_hr@5"] == 0.5 and out["val_hr@5"] == 0.5 and out["test_users"] == 2
    assert out["eval_invalid_metrics"] > 0 and not any(k.startswith("k1") for k in out)
    assert len(expect) == 20


# ----------------------------------------------------------------------------- property-based

_STEPS = {"none": lambda: (), "union": lambda: (UnionFilter(expected_attackers=1),),
          "clip": lambda: (ClipFilter(0.5, "dense"),),
          "union+clip": lambda: (UnionFilter(expected_attackers=1), ClipFilter(0.5, "dense"))}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), rule=st.sampled_from(sorted(RULE_ARGS)),
       aggregation=st.sampled_from(["dense", "item"]), chain=st.sampled_from(sorted(_STEPS)),
       kinds=st.lists(st.sampled_from(ARRAY_KINDS), min_size=1, max_size=6))
def test_invalid_hostile_uploads_change_nothing_under_any_rule(seed, rule, aggregation, chain, kinds):
    """Hostile uploads that validation must reject, mixed with 9 benign ones, over 3 rounds:
    never a raise, the model always finite, every drop counted, and the model exactly the
    one the benign uploads alone give (every rule, both forms, every chain)."""
    rng = np.random.default_rng(seed)
    mixed = _strategy(rule, aggregation, _STEPS[chain]())
    clean = _strategy(rule, aggregation, _STEPS[chain]())
    for rnd in (1, 2, 3):
        benign = _benign(rng, 9)
        hostile = []
        for i, kind in enumerate(kinds):
            arrays, n = hostile_arrays(rng, kind, N_ITEMS, DIM, SHAPES)
            hostile.append((f"h{i}", arrays, n, hostile_metrics(rng, str(rng.choice(METRIC_KINDS)))))
        rejected = [h for h, k in zip(hostile, kinds) if k not in ("denormal", "zeros", "ids_unsorted")]
        r = mixed.aggregate_uploads(rnd, benign + rejected)
        clean.aggregate_uploads(rnd, benign)
        assert r.metrics["invalid"] + r.metrics["empty"] == len(rejected)
        assert sum(r.invalid.values()) == r.metrics["invalid"]
        for a, b in zip(mixed.global_arrays(), clean.global_arrays()):
            assert np.isfinite(a).all() and np.array_equal(a, b)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rule=st.sampled_from(sorted(RULE_ARGS)),
       aggregation=st.sampled_from(["dense", "item"]), colluders=st.integers(1, 8))
def test_valid_extreme_uploads_keep_the_model_finite(seed, rule, aggregation, colluders):
    """More colluders than f, each sending the largest values validation lets through
    (+-server.max_abs_value, alternating signs on items nobody else sends, or everywhere):
    whatever the rule promises, the model and the optimizer state stay finite."""
    rng = np.random.default_rng(seed)
    s = _strategy(rule, aggregation)
    for rnd in range(1, 6):
        sign = 1.0 if rnd % 2 else -1.0
        evil = [(f"x{c}", encode_upload(np.arange(N_ITEMS - 5, N_ITEMS) if c % 2 else np.arange(N_ITEMS),
                                        np.full((5 if c % 2 else N_ITEMS, DIM), sign * 1e4, np.float32),
                                        [np.full(3, -sign * 1e4, np.float32)]), 10**7, {})
                for c in range(colluders)]
        s.aggregate_uploads(rnd, _benign(rng, 9) + evil)
        assert all(np.isfinite(a).all() for a in s.global_arrays())
        state = s.optimizer.state_dict()["state"]
        assert all(np.isfinite(v.numpy()).all() for st_ in state.values() for v in st_.values()
                   if hasattr(v, "numpy"))


# ----------------------------------------------------------------------------- whole runs


@pytest.mark.parametrize("aggregation", ["dense", "item"])
@pytest.mark.parametrize("rule, filters", [("mean", []), ("median", []), ("trimmed_mean", ["clip"]),
                                           ("krum", []), ("multikrum", ["union"]), ("bulyan", []),
                                           ("norm_bound", ["union", "clip"])])
def test_runs_with_hostile_clients_complete_with_a_finite_model(tmp_path, monkeypatch, aggregation,
                                                                rule, filters):
    """A quarter of the users send fedrec.fuzz payloads every round (attack.name: hostile):
    the run completes, the model is finite after every round, and the summary's counts by
    reason add up to the per-round invalid counts."""
    import csv
    from pathlib import Path

    from conftest import engine_run_capturing_arrays
    from strategies.fedrec import FedRecStrategy as S

    finite = []
    real = S.aggregate_uploads

    def check(self, rnd, results):
        out = real(self, rnd, results)
        finite.append(all(np.isfinite(a).all() for a in self.global_arrays()))
        return out

    monkeypatch.setattr(S, "aggregate_uploads", check)
    cfg = tiny_cfg(tmp_path, data__attacker_pool=0.3, attack__name="hostile",
                   attack__malicious_fraction=0.25, server__aggregation=aggregation,
                   server__rule=rule, server__rule_f=1, server__filters=filters,
                   train__rounds=8, train__clients_per_round=16)
    s, arrays = engine_run_capturing_arrays(cfg, tmp_path, monkeypatch)
    assert s["status"] == "complete" and all(finite) and len(finite) == 8
    with open(Path(s["run_dir"]) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sum(int(r["invalid"]) for r in rows) == s["invalid_uploads_total"] > 0
    assert sum(s["invalid_uploads"].values()) == s["invalid_uploads_total"]
    assert np.isfinite(s["final"]["test_hr@10"])


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), cut=st.integers(0, 200), flip=st.integers(0, 255))
def test_any_bytes_decode_or_raise_upload_error(data, cut, flip):
    """Random bytes, and honest tensors truncated or with one byte changed: decode_tensor
    returns an array within the size limit or raises UploadError, nothing else."""
    buf = io.BytesIO()
    np.save(buf, np.arange(12, dtype=np.float32).reshape(3, 4), allow_pickle=False)
    honest = bytearray(buf.getvalue())
    mutated = bytes(honest[:len(honest) - cut]) if cut else bytes(honest)
    if flip < len(mutated):
        b = bytearray(mutated)
        b[flip] ^= 0xFF
        mutated = bytes(b)
    for payload in (data, mutated, b"\x93NUMPY\x01\x00" + data):
        try:
            a = decode_tensor(payload, 1024)
        except UploadError:
            continue
        assert isinstance(a, np.ndarray) and a.nbytes <= 1024 and a.dtype.kind in "biuf"
