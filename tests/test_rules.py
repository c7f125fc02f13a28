"""Robust aggregation rules: hand-computed rounds in both forms, misconfiguration, the
round-size fallback, the shared order-statistics machinery, and engine runs."""


import numpy as np
import pytest

from fedrec.config import from_dict
from fedrec.errors import ConfigError
from fedrec.protocol import Upload
from fedrec.registry import RULES, make_rule
from fedrec.runtime import configure_threads
from strategies.bulyan import BulyanRule
from strategies.krum import KrumRule, MultiKrumRule
from strategies.median import MedianRule
from strategies.norm_bound import NormBoundRule, clip_updates
from strategies.groups import sort_slots, sorting_network
from strategies.robust import MEDIAN, coordinate_trimmed_mean
from strategies.rule import RoundUpdates
from strategies.trimmed_mean import TrimmedMeanRule

configure_threads()  # as the engine does: two torch threads make index_add_ ~80x slower


def _round(uploads, n_items, weights=None, dim=2):
    """uploads: list of (ids, rows[, predictor]) per client."""
    ups = []
    for c, up in enumerate(uploads):
        ids, rows = up[0], up[1]
        pred = [np.asarray(p, np.float32) for p in up[2]] if len(up) > 2 else []
        ups.append(Upload(np.asarray(ids, np.int64), np.asarray(rows, np.float32).reshape(-1, dim),
                          pred, 1, str(c)))
    w = np.ones(len(ups)) if weights is None else np.asarray(weights, np.float64)
    return RoundUpdates(ups, w, n_items, dim)


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b, np.float32), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------- median and trimmed mean
# 5 clients, 3 items, dim 2. Item 0: everyone; item 1: client 0 only; item 2: clients 0-2.
ORDER_ROUND = [
    ([0, 1, 2], [[1, 10], [5, -5], [1, 1]]),
    ([0, 2], [[2, 20], [2, 5]]),
    ([0, 2], [[3, 30], [9, 9]]),
    ([0], [[4, 40]]),
    ([0], [[100, -100]]),
]


def test_median_both_forms():
    u = _round(ORDER_ROUND, 3)
    item = MedianRule("item")(u)
    # item 0: {1,2,3,4,100} -> 3, {-100,10,20,30,40} -> 20; item 1: its one row;
    # item 2: {1,2,9} -> 2, {1,5,9} -> 5
    _close(item.item_grad, [[3, 20], [5, -5], [2, 5]])
    dense = MedianRule("dense")(u)
    # item 1: {5,0,0,0,0} -> 0 (most clients did not send it); item 2: {0,0,1,2,9} -> 1,
    # {0,0,1,5,9} -> 1
    _close(dense.item_grad, [[3, 20], [0, 0], [1, 1]])
    assert item.dropped == dense.dropped == [] and dense.info == {"fallback": 0, "dropped": 0}


def test_median_even_counts_average_the_middle_pair():
    u = _round([([0], [[1, -2]]), ([0], [[3, 4]]), ([1], [[7, 7]]), ([1], [[8, 8]])], 2)
    # item-level: (1+3)/2, (-2+4)/2; dense over 4 clients: {0,0,1,3} -> 0.5, {-2,0,0,4} -> 0
    _close(MedianRule("item")(u).item_grad, [[2, 1], [7.5, 7.5]])
    _close(MedianRule("dense")(u).item_grad, [[0.5, 0], [3.5, 3.5]])


def test_trimmed_mean_both_forms():
    u = _round(ORDER_ROUND, 3)
    item = TrimmedMeanRule("item", f=1)(u)
    # item 0 drops 1 and 100 -> mean(2,3,4) = 3, drops -100 and 40 -> mean(10,20,30) = 20;
    # item 1 (m=1) keeps its row; item 2 (m=3) keeps its middle value
    _close(item.item_grad, [[3, 20], [5, -5], [2, 5]])
    dense = TrimmedMeanRule("dense", f=1)(u)
    # item 1: {0,0,0,0,5} -> mean(0,0,0) = 0; item 2: {0,0,1,2,9} -> mean(0,1,2) = 1,
    # {0,0,1,5,9} -> mean(0,1,5) = 2  (the median is 1: the two forms of trimming differ)
    _close(dense.item_grad, [[3, 20], [0, 0], [1, 2]])
    # f=2 on 5 clients leaves the median
    _close(TrimmedMeanRule("dense", f=2)(u).item_grad, MedianRule("dense")(u).item_grad)


def test_order_rules_aggregate_the_predictor_densely():
    u = _round([([0], [[1, 1]], [[1, 2]]), ([0], [[2, 2]], [[3, 4]]), ([], [], [[100, -100]])], 1)
    # predictor: coordinate-wise median of {1,3,100}, {2,4,-100}
    for g in ("item", "dense"):
        _close(MedianRule(g)(u).predictor[0], [3, 2])
        _close(TrimmedMeanRule(g, f=1)(u).predictor[0], [3, 2])
    _close(TrimmedMeanRule("dense", f=0)(u).predictor[0], [104 / 3, -94 / 3])


# --------------------------------------------------------------- Krum and Multi-Krum
# f=1, 5 clients. Item 0 from everyone, item 1 from client 4 only, item 2 from clients 0, 1.
KRUM_ROUND = [
    ([0, 2], [[0, 0], [0, 1]]),
    ([0, 2], [[1, 0], [0, 3]]),
    ([0], [[0, 2]]),
    ([0], [[2, 2]]),
    ([0, 1], [[10, 10], [7, 7]]),
]
KRUM_WEIGHTS = [1, 2, 1, 1, 1]


def test_krum_dense_scores_whole_updates():
    u = _round(KRUM_ROUND, 3, KRUM_WEIGHTS)
    # squared distances of whole updates (items 0-2 flattened, absent rows 0):
    #   d01=5 d02=5 d03=9 d04=299 d12=14 d13=14 d14=288 d23=4 d24=262 d34=226
    # scores, sum of the n-f-2 = 2 nearest: c0 10, c1 19, c2 9, c3 13, c4 488 -> client 2
    agg = KrumRule("dense", f=1)(u)
    _close(agg.item_grad, [[0, 2], [0, 0], [0, 0]])
    assert agg.dropped == [0, 1, 3, 4] and agg.info["dropped"] == 4


def test_multikrum_dense_keeps_m_best_weighted():
    u = _round(KRUM_ROUND, 3, KRUM_WEIGHTS)
    agg = MultiKrumRule("dense", f=1)(u)  # m = n - f = 4: drops client 4
    # weights 1,2,1,1 over the kept: item 0 (0+2+0+2, 0+0+2+2)/5, item 2 (0, 1+6)/5
    _close(agg.item_grad, [[0.8, 0.8], [0, 0], [0, 1.4]])
    assert agg.dropped == [4]
    assert MultiKrumRule("dense", f=1, m=2)(u).dropped == [1, 3, 4]  # keeps c2 (9), c0 (10)


def test_krum_item_level_selects_per_item():
    u = _round(KRUM_ROUND, 3, KRUM_WEIGHTS)
    # item 0 (m=5 >= f+3): row distances d01=1 d02=4 d03=8 d04=200 d12=5 d13=5 d14=181
    #   d23=4 d24=164 d34=128 -> scores c0 5, c1 6, c2 8, c3 9, c4 292 -> client 0's row.
    # item 1 (m=1) and item 2 (m=2 <= f+2): the median of their rows
    agg = KrumRule("item", f=1)(u)
    _close(agg.item_grad, [[0, 0], [7, 7], [0, 2]])
    # clients 2 and 3 sent only item 0 and lost there; client 4's item 1 was used
    assert agg.dropped == [2, 3]
    assert agg.info == {"fallback": 0, "dropped": 2, "rows_dropped": 4, "items_median": 2}
    multi = MultiKrumRule("item", f=1)(u)  # each item drops n - m = 1 row: item 0 loses c4
    _close(multi.item_grad, [[0.8, 0.8], [7, 7], [0, 2]])
    assert multi.dropped == [] and multi.info["rows_dropped"] == 1


def test_krum_dense_distance_includes_the_predictor():
    rows = [[1, 1]]
    u = _round([([0], rows, [[0, 0]]), ([0], rows, [[0, 1]]), ([0], rows, [[1, 0]]),
                ([0], rows, [[50, 50]])], 1)
    # equal rows: the predictors decide; k = n - f - 2 = 1: c0, c1, c2 score 1 (ties: the
    # earlier client), c3 4901
    assert KrumRule("dense", f=1)(u).dropped == [1, 2, 3]
    multi = MultiKrumRule("item", f=1)(u)  # item-level: dense Multi-Krum on predictors alone
    _close(multi.predictor[0], [1 / 3, 1 / 3])
    # item 0 keeps 3 of its 4 equal rows (all score 0: the earlier clients), so client 3
    # has neither a kept row nor a kept predictor
    assert multi.dropped == [3]


# --------------------------------------------------------------- Bulyan
# f=1, n=7 (= 4f + 3). Clients 0-4 form a cluster, 5 and 6 are far apart outliers; item 0
# from everyone, item 1 from client 0 only.
BULYAN_ROUND = [([0, 1], [[0, 5], [1, 1]]), ([0], [[1, 1]]), ([0], [[2, 0]]), ([0], [[5, 2]]),
                ([0], [[9, 3]]), ([0], [[100, 0]]), ([0], [[0, -100]])]


def test_bulyan_both_forms():
    u = _round(BULYAN_ROUND, 2)
    # step 1: theta = n - 2f = 5 Krum picks; each pick is a cluster member (their nearest
    # are the cluster; at the last pick the member left and the outlier nearest to it tie,
    # and the earlier client wins), so clients 5 and 6 are left out.
    # step 2: beta = theta - 2f = 3 values nearest the median, per coordinate:
    #   {0,1,2,5,9}: median 2 -> {1,2,0} -> 1;  {5,1,0,2,3}: median 2 -> {2,1,3} -> 2
    for g in ("item", "dense"):
        agg = BulyanRule(g, f=1)(u)
        assert agg.dropped == [5, 6], g
        _close(agg.item_grad[0], [1, 2])
    # item 1 (client 0 only): item-level keeps the row (m < 4f + 3: median), dense sees
    # {1, 0, 0, 0, 0} among the selected: median 0 and the 3 nearest are zeros
    _close(BulyanRule("item", f=1)(u).item_grad[1], [1, 1])
    _close(BulyanRule("dense", f=1)(u).item_grad[1], [0, 0])
    info = BulyanRule("item", f=1)(u).info
    assert info["rows_dropped"] == 2 and info["items_median"] == 1


def test_bulyan_with_f_zero_is_the_unweighted_mean():
    u = _round(ORDER_ROUND, 3, weights=[5, 1, 1, 1, 1])
    _close(BulyanRule("dense", f=0)(u).item_grad,
           [[110 / 5, 0], [1, -1], [12 / 5, 15 / 5]])


# --------------------------------------------------------------- norm bound
NORM_ROUND = [([0, 1], [[3, 0], [0, 4]]), ([0], [[0.3, 0.4]])]


def test_norm_bound_both_forms():
    u = _round(NORM_ROUND, 2)
    dense = NormBoundRule("dense", bound=1.0)(u)
    # client 0's update has norm 5 -> x 0.2; client 1's has norm 0.5; mean over 2 clients
    _close(dense.item_grad, [[0.45, 0.2], [0, 0.4]])
    assert dense.info == {"fallback": 0, "dropped": 0, "clipped": 1}
    item = NormBoundRule("item", bound=1.0)(u)
    # rows clipped one by one: [1, 0], [0, 1]; item-level mean
    _close(item.item_grad, [[0.65, 0.2], [0, 1]])
    assert item.info["clipped"] == 2


def test_clip_updates_returns_a_clipped_round():
    u = _round([([0], [[3, 4]], [[0, 0]]), ([0], [[0.3, 0.4]], [[0, 0]])], 1)
    c = clip_updates(u, 1.0)
    _close(c.uploads[0].item_rows, [[0.6, 0.8]])
    _close(c.uploads[1].item_rows, [[0.3, 0.4]])
    _close(c.stacked[1], [[0.6, 0.8], [0.3, 0.4]])
    assert u.uploads[0].item_rows[0, 0] == 3  # the input round is untouched


# --------------------------------------------------------------- misconfiguration


def _cfg(rule, **server):
    return from_dict({"server": {"rule": rule, **server}, "train": {"clients_per_round": 10}})


@pytest.mark.parametrize("rule, server, words", [
    ("bulyan", {"rule_f": 2}, "4 * server.rule_f + 3 = 11"),
    ("krum", {"rule_f": 8}, "server.rule_f + 3 = 11"),
    ("multikrum", {"rule_f": 1, "multikrum_m": 11}, "server.multikrum_m = 11"),
    ("trimmed_mean", {"rule_f": 5}, "n > 2f = 10"),
])
def test_misconfiguration_is_a_config_error(rule, server, words):
    with pytest.raises(ConfigError) as e:
        make_rule(_cfg(rule, **server))
    assert words in str(e.value) and "train.clients_per_round=10" in str(e.value)


def test_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="server.rule_f"):
        _cfg("krum", rule_f=-1)
    with pytest.raises(ConfigError, match="server.norm_bound"):
        _cfg("norm_bound", norm_bound=0)
    with pytest.raises(ConfigError, match="server.rule_f"):
        MedianRule("item", f=-1)
    with pytest.raises(ConfigError, match="not one of"):
        make_rule(_cfg("geomed"))


def test_registry_builds_every_rule_with_its_parameters():
    assert {"median", "trimmed_mean", "krum", "multikrum", "bulyan", "norm_bound"} <= set(RULES)
    rule = make_rule(_cfg("multikrum", aggregation="item", rule_f=1, multikrum_m=6))
    assert isinstance(rule, MultiKrumRule) and (rule.granularity, rule.f, rule.m) == ("item", 1, 6)
    assert make_rule(_cfg("norm_bound", norm_bound=2)).bound == 2.0
    assert make_rule(_cfg("bulyan", rule_f=1)).f == 1


def test_a_short_round_falls_back_to_the_median():
    rule = BulyanRule("dense", f=1)
    u = _round(ORDER_ROUND, 3)  # 5 uploads < 4f + 3
    agg = rule(u)
    assert agg.info == {"fallback": 1, "dropped": 0}
    _close(agg.item_grad, MedianRule("dense")(u).item_grad)
    assert KrumRule("item", f=3)(u).info["fallback"] == 1  # n = 5 < f + 3


def test_huge_finite_rows_do_not_break_the_rules():
    big = np.float32(3e38)
    u = _round([([0], [[1, 1]]), ([0], [[1.1, 0.9]]), ([0], [[0.9, 1.1]]), ([0], [[1, 1.05]]),
                ([0], [[big, -big]])], 1)
    for rule in (TrimmedMeanRule("dense", f=1), KrumRule("item", f=1), KrumRule("dense", f=1),
                 MultiKrumRule("item", f=1), NormBoundRule("item", bound=1.0)):
        agg = rule(u)
        assert np.isfinite(agg.item_grad).all() and np.abs(agg.item_grad).max() < 2, rule.name
    assert KrumRule("dense", f=1)(u).dropped == [0, 1, 2, 4]  # client 3 is the most central


# --------------------------------------------------------------- shared machinery


def test_sorting_network_sorts_every_width():
    rng = np.random.default_rng(0)
    for width in range(1, 40):
        x = rng.standard_normal((width, 33)).astype(np.float32)
        x[:, :3] = np.round(x[:, :3])  # ties
        np.testing.assert_array_equal(sort_slots(x.copy()), np.sort(x, axis=0))
    assert len(sorting_network(8)) == 19 and len(sorting_network(16)) == 63


def test_order_statistics_match_a_brute_force():
    rng = np.random.default_rng(1)
    n, n_items, dim = 9, 12, 3
    dense = np.zeros((n, n_items, dim), np.float32)
    sent = rng.random((n, n_items)) < 0.4
    dense[sent] = rng.standard_normal((sent.sum(), dim)).astype(np.float32)
    ids = np.concatenate([np.flatnonzero(sent[c]) for c in range(n)])
    rows = np.concatenate([dense[c, sent[c]] for c in range(n)])
    for trim in (MEDIAN, 0, 1, 3):
        t = (n - 1) // 2 if trim is MEDIAN else trim
        expect = np.sort(dense, axis=0)[t:n - t].mean(axis=0)
        _close(coordinate_trimmed_mean(ids, rows, n_items, trim, n_clients=n), expect)
        got = coordinate_trimmed_mean(ids, rows, n_items, trim)
        for i in range(n_items):
            v = np.sort(dense[sent[:, i], i], axis=0)
            m = len(v)
            tt = (m - 1) // 2 if trim is MEDIAN else min(trim, (m - 1) // 2)
            _close(got[i], v[tt:m - tt].mean(axis=0) if m else np.zeros(dim))


# --------------------------------------------------------------- engine runs


@pytest.mark.parametrize("rule, aggregation", [
    ("median", "item"), ("trimmed_mean", "dense"), ("krum", "item"), ("multikrum", "dense"),
    ("bulyan", "item"), ("norm_bound", "dense")])
def test_engine_applies_exactly_what_each_rule_returns(tmp_path, monkeypatch, rule, aggregation):
    """Every round the rule gets the round's uploads and the server optimizer steps on exactly
    its aggregate: replaying the recorded aggregates from the initial model gives the final
    model bit for bit, and metrics.csv records each round's drops and fallbacks."""
    import csv

    from fedrec.build import build_env, initial_arrays
    from fedrec.optim import ServerOptimizer
    from fedrec.registry import RULES as TABLE, load_class

    cfg = from_dict({"name": f"rule-{rule}",
                     "data": {"synthetic": {"n_users": 60, "n_items": 80, "mean_history": 12},
                              "cache_dir": str(tmp_path / "cache")},
                     "model": {"dim": 8}, "train": {"rounds": 5, "clients_per_round": 10},
                     "server": {"lr": 0.01, "rule": rule, "aggregation": aggregation,
                                "rule_f": 1},
                     "eval": {"every": 0}, "output": {"progress": False, "dir": str(tmp_path)}})
    cls = load_class(TABLE[rule][0])
    real, seen = cls.__call__, []

    def recording(self, updates):
        agg = real(self, updates)
        seen.append((len(updates), agg))
        return agg

    monkeypatch.setattr(cls, "__call__", recording)
    from conftest import engine_run_capturing_arrays

    s, final = engine_run_capturing_arrays(cfg, tmp_path, monkeypatch)
    assert s["status"] == "complete" and len(seen) == cfg.train.rounds
    env = build_env(cfg)
    opt = ServerOptimizer(initial_arrays(cfg, env.model), "adam", cfg.server.lr, cfg.server.betas,
                          cfg.server.eps)
    for _, agg in seen:
        opt.step([agg.item_grad, *agg.predictor])
    for a, b in zip(opt.arrays(), final):
        assert np.array_equal(a, b)
    with open(tmp_path / s["run_dir"] / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["rule_dropped"]) for r in rows] == [len(agg.dropped) for _, agg in seen]
    assert [int(r["rule_fallback"]) for r in rows] == [agg.info["fallback"] for _, agg in seen]
    assert [int(r["accepted"]) for r in rows] == [n for n, _ in seen]
