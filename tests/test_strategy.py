"""FedRecStrategy: validation of uploads, aggregation, the server step, sampling."""

import numpy as np
import pytest

from fedrec.config import from_dict
from fedrec.ledger import RunLedger
from fedrec.protocol import Upload, encode_upload
from strategies.aggregate import dense_mean, item_level_mean, weighted_mean_arrays
from strategies.fedrec import FedRecStrategy, sample_round
from strategies.mean import MeanRule
from strategies.rule import RoundUpdates

N_ITEMS, DIM = 6, 2
SHAPES = [(3,)]


class Recorder:
    def __init__(self):
        self.fit, self.eval = [], []

    def log_fit(self, rnd, metrics):
        self.fit.append((rnd, metrics))

    def log_eval(self, rnd, metrics, final):
        self.eval.append((rnd, metrics, final))


def _metrics(strategy, rnd, results):
    return strategy.aggregate_uploads(rnd, results).metrics


def _strategy(seed=0, optimizer="sgd", lr=1.0, aggregation="dense", weighting="samples", **kw):
    server = from_dict({"server": {"optimizer": optimizer, "lr": lr, "aggregation": aggregation,
                                   "weighting": weighting}}).server
    table = np.arange(N_ITEMS * DIM, dtype=np.float32).reshape(N_ITEMS, DIM) / 10
    return FedRecStrategy([table, np.zeros(3, np.float32)], n_items=N_ITEMS, dim=DIM,
                          predictor_shapes=SHAPES, server_cfg=server, seed=seed, **kw)


def _up(ids, rows, pred=(0.0, 0.0, 0.0)):
    return encode_upload(np.array(ids, np.int64), np.array(rows, np.float32), [np.array(pred, np.float32)])


GOOD = [
    ("a", _up([0, 2], [[1, 1], [2, 0]], (1, 0, 0)), 1, {"loss": 0.5}),
    ("b", _up([2, 3], [[4, 4], [1, -1]], (0, 4, 0)), 3, {"loss": 0.7}),
]
BAD = [
    ("nan", _up([1], [[np.nan, 0]]), 2, {"loss": 0.1}),
    ("range", _up([1, 6], [[1, 1], [1, 1]]), 2, {"loss": 0.1}),
    ("rep", _up([1, 1], [[1, 1], [1, 1]]), 2, {}),
    ("n0", _up([1], [[1, 1]]), 0, {}),
    ("short", [np.array([1]), np.ones((1, DIM), np.float32)], 2, {}),
]


def test_dense_and_item_level_mean_hand_computed():
    ids = [np.array([0, 2]), np.array([2, 3])]
    rows = [np.array([[1, 1], [2, 0]], np.float32), np.array([[4, 4], [1, -1]], np.float32)]
    w = [1.0, 3.0]
    dense = dense_mean(ids, rows, w, 4)
    np.testing.assert_allclose(dense, [[0.25, 0.25], [0, 0], [3.5, 3.0], [0.75, -0.75]], rtol=1e-6)
    item = item_level_mean(ids, rows, w, 4)
    np.testing.assert_allclose(item, [[1, 1], [0, 0], [3.5, 3.0], [1, -1]], rtol=1e-6)
    # uniform weights
    np.testing.assert_allclose(dense_mean(ids, rows, [1, 1], 4)[2], [3.0, 2.0])
    np.testing.assert_allclose(item_level_mean(ids, rows, [1, 1], 4)[0], [1.0, 1.0])
    pred = weighted_mean_arrays([[np.array([1.0, 0.0])], [np.array([0.0, 4.0])]], w)
    np.testing.assert_allclose(pred[0], [0.25, 3.0])
    # the rule object dispatches on granularity
    ups = [Upload(i, r, [], 1) for i, r in zip(ids, rows)]
    upd = RoundUpdates(ups, np.array(w), 4, 2)
    np.testing.assert_allclose(MeanRule("dense")(upd).item_grad, dense)
    np.testing.assert_allclose(MeanRule("item")(upd).item_grad, item)
    with pytest.raises(ValueError):
        MeanRule("sparse")


def test_good_uploads_sgd_update_hand_computed():
    s = _strategy()
    table0 = s.global_arrays()[0].copy()
    m = _metrics(s, 1, GOOD)
    assert m["accepted"] == 2 and m["invalid"] == 0 and m["clients"] == 2
    assert m["train_loss"] == pytest.approx(0.6)
    expect = table0.copy()
    expect[[0, 2, 3]] -= [[0.25, 0.25], [3.5, 3.0], [0.75, -0.75]]  # lr 1 times the dense mean
    np.testing.assert_allclose(s.global_arrays()[0], expect, rtol=1e-6)
    np.testing.assert_allclose(s.global_arrays()[1], [-0.25, -3.0, 0.0], rtol=1e-6)


def test_item_level_aggregation_in_strategy():
    s = _strategy(aggregation="item")
    table0 = s.global_arrays()[0].copy()
    s.aggregate_uploads(1, GOOD)
    np.testing.assert_allclose(table0 - s.global_arrays()[0],
                               [[1, 1], [0, 0], [3.5, 3], [1, -1], [0, 0], [0, 0]], rtol=1e-6)


def test_uniform_weighting():
    s = _strategy(weighting="uniform")
    table0 = s.global_arrays()[0].copy()
    s.aggregate_uploads(1, GOOD)
    np.testing.assert_allclose((table0 - s.global_arrays()[0])[2], [3.0, 2.0], rtol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_bad_uploads_dropped_counted_and_update_from_good_only(optimizer):
    rec = Recorder()
    ledger = RunLedger(rec)
    mixed = _strategy(optimizer=optimizer)
    clean = _strategy(optimizer=optimizer)
    results = [BAD[0], GOOD[0], BAD[1], BAD[2], GOOD[1], BAD[3], BAD[4]]
    r = mixed.aggregate_uploads(1, results)
    m = r.metrics
    clean.aggregate_uploads(1, GOOD)
    assert m["clients"] == 7 and m["accepted"] == 2 and m["invalid"] == 5
    assert dict(r.invalid) == {"non_finite": 1, "ids_range": 1, "ids_repeated": 1,
                               "num_examples": 1, "array_count": 1}
    assert r.stepped and r.dropped == [] and r.dropped_by == {}
    assert m["train_loss"] == pytest.approx(0.6)  # the dropped uploads' losses are ignored
    for a, b in zip(mixed.global_arrays(), clean.global_arrays()):
        assert np.array_equal(a, b)
    row = ledger.fit(1, list("abcdefg"), r)
    assert rec.fit == [(1, row)] and row == {**m, "invalid_total": 5}
    # the run goes on: a second round adds to the running total
    r2 = mixed.aggregate_uploads(2, [BAD[0], GOOD[1]])
    row2 = ledger.fit(2, ["x", "b"], r2)
    assert row2["invalid"] == 1 and row2["invalid_total"] == 6 and row2["accepted"] == 1
    assert ledger.totals()["invalid_uploads"]["non_finite"] == 2
    assert ledger.totals()["invalid_uploads_total"] == 6


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_all_bad_round_leaves_model_unchanged(optimizer):
    s = _strategy(optimizer=optimizer)
    if optimizer == "adam":
        s.aggregate_uploads(1, GOOD)  # momentum would move rows on any step
    before = [a.copy() for a in s.global_arrays()]
    r = s.aggregate_uploads(2, BAD)
    m = r.metrics
    assert m["accepted"] == 0 and m["invalid"] == len(BAD) and not r.stepped
    assert np.isnan(m["train_loss"])
    for a, b in zip(before, s.global_arrays()):
        assert np.array_equal(a, b)
    m = _metrics(s, 3, [])
    assert m["clients"] == 0 and m["accepted"] == 0


def test_max_rows_and_samples_settings():
    server = from_dict({"server": {"optimizer": "sgd", "max_upload_rows": 1, "max_samples": 2}}).server
    s = FedRecStrategy([np.zeros((N_ITEMS, DIM), np.float32), np.zeros(3, np.float32)],
                       n_items=N_ITEMS, dim=DIM, predictor_shapes=SHAPES, server_cfg=server)
    r = s.aggregate_uploads(1, GOOD)  # a: 2 rows; b: 3 samples
    assert r.metrics["accepted"] == 0 and dict(r.invalid) == {"too_many_rows": 2}
    ok = ("c", _up([1], [[1, 1]]), 2, {})
    assert _metrics(s, 2, [ok])["accepted"] == 1


def test_uniform_sampling_is_seeded():
    def seq(seed):
        rng = np.random.default_rng(seed)
        return [tuple(sample_round(rng, 20, 5, "uniform", {})) for _ in range(6)]

    a, b, c = seq(1), seq(1), seq(2)
    assert a == b and a != c
    for r in a:
        assert len(set(r)) == 5 and list(r) == sorted(r) and max(r) < 20
    assert len(set(a)) > 1  # different clients in different rounds
    assert list(sample_round(np.random.default_rng(0), 4, 10, "uniform", {})) == [0, 1, 2, 3]


@pytest.mark.parametrize("n, k", [(10, 3), (12, 4), (7, 7), (5, 9)])
def test_epoch_sampling_covers_every_client_once_per_epoch(n, k):
    rng, state = np.random.default_rng(0), {}
    per_epoch = -(-n // k)
    for epoch in range(3):
        seen = []
        for _ in range(per_epoch):
            seen += list(sample_round(rng, n, k, "epoch", state))
        assert sorted(seen) == list(range(n)), f"epoch {epoch}"
    # seeded
    a = [tuple(sample_round(np.random.default_rng(5), 10, 3, "epoch", {}))]
    assert a == [tuple(sample_round(np.random.default_rng(5), 10, 3, "epoch", {}))]


def test_strategy_sample_seeded_and_maps_candidates():
    cands = [f"user{i}" for i in range(30)]

    def picks(seed, sampling="uniform"):
        s = _strategy(seed=seed, clients_per_round=4, sampling=sampling)
        return [s.sample(r, cands) for r in range(1, 5)]

    assert picks(3) == picks(3) and picks(3) != picks(4)
    assert all(len(p) == 4 and set(p) <= set(cands) for p in picks(3))
    ep = picks(3, "epoch")
    assert len({c for p in ep for c in p}) == 16  # no repeats inside an epoch


def test_eval_rounds_and_evaluate_results():
    s = _strategy(num_rounds=10, eval_every=4)
    assert [r for r in range(1, 11) if s.is_eval_round(r)] == [4, 8, 10]
    assert [r for r in range(1, 6) if _strategy(num_rounds=5).is_eval_round(r)] == [5]
    late = _strategy(num_rounds=20, eval_every=4, eval_from=10)  # eval.from_round
    assert [r for r in range(1, 21) if late.is_eval_round(r)] == [12, 16, 20]
    out = s.evaluate_results(10, [{"test_hr@5": 1.0, "val_hr@5": 0.0},
                                  {"test_hr@5": 0.0, "val_hr@5": 1.0},
                                  {"test_hr@5": 1.0}])
    assert out == {"test_hr@5": pytest.approx(2 / 3), "test_users": 3, "val_hr@5": 0.5, "val_users": 2}


def test_weighted_sum_in_blocks_is_the_one_pass_sum_bit_for_bit():
    """sparse_weighted_sum weights and adds WEIGHTED_SUM_BLOCK rows at a time; index_add_
    adds in row order, so the result is the same bits as weighting every row first and
    adding them all in one index_add_ (a dense round: many more rows than a block)."""
    import torch

    from strategies import aggregate

    rng = np.random.default_rng(5)
    n_rows = 3 * aggregate.WEIGHTED_SUM_BLOCK + 17
    ids = rng.integers(0, 40, n_rows)
    rows = (rng.standard_normal((n_rows, 8)) * 10.0 ** rng.integers(-6, 3, (n_rows, 1))).astype(np.float32)
    weights = rng.random(n_rows)
    one_pass = torch.zeros((40, 8), dtype=torch.float32)
    one_pass.index_add_(0, torch.from_numpy(ids),
                        torch.from_numpy(rows) * torch.from_numpy(weights.astype(np.float32))[:, None])
    assert np.array_equal(aggregate.sparse_weighted_sum(ids, rows, weights, 40), one_pass.numpy())
    # and the loop in float64 agrees to float32 rounding
    slow = np.zeros((40, 8))
    for i, r, w in zip(ids, rows.astype(np.float64), weights):
        slow[i] += w * r
    np.testing.assert_allclose(aggregate.sparse_weighted_sum(ids, rows, weights, 40), slow,
                               rtol=1e-4, atol=1e-6)


def test_weighted_sum_of_whole_tables_is_the_index_add_sum_bit_for_bit():
    """Dense uploads (every client sends every row, in id order) take the table-by-table
    path of sparse_weighted_sum: the same bits as index_add_ over the rows; a stack that
    is not whole tables (a row missing, ids out of order) takes index_add_ itself."""
    import torch

    from strategies import aggregate

    rng = np.random.default_rng(6)
    n_items, k = 37, 5
    rows = (rng.standard_normal((k * n_items, 4)) * 10.0 ** rng.integers(-6, 3, (k * n_items, 1))).astype(np.float32)
    weights = rng.random(k * n_items)
    ids = np.tile(np.arange(n_items), k)
    assert aggregate.whole_tables(ids, n_items)
    assert not aggregate.whole_tables(ids[:-1], n_items)
    assert not aggregate.whole_tables(np.roll(ids, 1), n_items)
    one_pass = torch.zeros((n_items, 4), dtype=torch.float32)
    one_pass.index_add_(0, torch.from_numpy(ids),
                        torch.from_numpy(rows) * torch.from_numpy(weights.astype(np.float32))[:, None])
    assert np.array_equal(aggregate.sparse_weighted_sum(ids, rows, weights, n_items), one_pass.numpy())


def _step_strategy(step, optimizer="adam", lr=0.01, **server):
    cfg = from_dict({"server": {"optimizer": optimizer, "lr": lr, "step": step, **server}}).server
    table = np.arange(N_ITEMS * DIM, dtype=np.float32).reshape(N_ITEMS, DIM) / 10
    return FedRecStrategy([table, np.zeros(3, np.float32)], n_items=N_ITEMS, dim=DIM,
                          predictor_shapes=SHAPES, server_cfg=cfg)


def test_step_per_upload_is_one_step_per_upload_in_order():
    """server.step upload: each accepted upload is its own optimizer step, in the order the
    clients came (bad uploads skipped), whatever its sample count: the same arrays, bit for
    bit, as a round-mode strategy given the uploads one round each; under SGD, hand-computed."""
    per_upload, one_each = _step_strategy("upload"), _step_strategy("round")
    m = _metrics(per_upload, 1, [GOOD[0], BAD[0], GOOD[1]])
    assert m["server_steps"] == 2 and m["accepted"] == 2 and m["invalid"] == 1
    _metrics(one_each, 1, [GOOD[0]])
    _metrics(one_each, 2, [GOOD[1]])
    for a, b in zip(per_upload.global_arrays(), one_each.global_arrays()):
        assert np.array_equal(a, b)
    # the order matters under Adam (not under SGD): the other order gives other arrays
    swapped = _step_strategy("upload")
    _metrics(swapped, 1, [GOOD[1], GOOD[0]])
    assert not np.array_equal(swapped.global_arrays()[0], per_upload.global_arrays()[0])
    # SGD, lr 1: the table minus each upload's rows (sample counts 1 and 3 do not weigh)
    sgd = _step_strategy("upload", optimizer="sgd", lr=1.0)
    table0 = sgd.global_arrays()[0].copy()
    _metrics(sgd, 1, GOOD)
    expect = table0.copy()
    expect[[0, 2]] -= [[1, 1], [2, 0]]
    expect[[2, 3]] -= [[4, 4], [1, -1]]
    np.testing.assert_allclose(sgd.global_arrays()[0], expect, rtol=1e-6)
    np.testing.assert_allclose(sgd.global_arrays()[1], [-1.0, -4.0, 0.0], rtol=1e-6)


def test_step_per_upload_needs_the_mean_rule_and_no_filter():
    from fedrec.errors import ConfigError

    with pytest.raises(ConfigError, match="server.step: upload .* needs server.rule mean"):
        from_dict({"server": {"step": "upload", "rule": "median"}})
    with pytest.raises(ConfigError, match="server.step"):
        from_dict({"server": {"step": "upload", "filters": ["clip"]}})
    with pytest.raises(ConfigError, match="server.step"):
        from_dict({"server": {"step": "each"}})
    # the default keeps every older run's digest: no step key in it
    assert from_dict({}).digest() == from_dict({"server": {"step": "round"}}).digest()
    assert from_dict({}).digest() != from_dict({"server": {"step": "upload"}}).digest()
