"""UNION's server-side filter: uniformity, the simulated step, the gap statistic, the null
pool, composition with mean / Multi-Krum / norm bound, engine runs, a collapse attack."""


import numpy as np
import pytest

from fedrec.config import from_dict
from fedrec.engine import run_experiment
from fedrec.errors import ConfigError
from fedrec.optim import ServerOptimizer
from fedrec.protocol import Upload
from fedrec.registry import make_rule
from fedrec.runtime import configure_threads
from strategies.krum import MultiKrumRule
from strategies.mean import MeanRule
from strategies.norm_bound import NormBoundRule, clip_updates
from strategies.rule import FilterChain, RoundUpdates
from strategies.union import (
    UnionFilter,
    gap_statistic_split,
    null_log_inertias,
    simulated_item_rows,
    stepped_rows,
    two_means_1d,
    union_filter,
    union_uniformities,
    uniformity,
)

configure_threads()

N_ITEMS, DIM = 120, 8


def _table(seed=0):
    return (np.random.default_rng(seed).standard_normal((N_ITEMS, DIM)) * 0.3).astype(np.float32)


def _benign_round(n=12, seed=0, table=None, state=None, predictor=False):
    """n clients with small gradients on 10-40 random items each."""
    rng = np.random.default_rng(seed)
    ups = []
    for c in range(n):
        k = int(rng.integers(10, 40))
        ids = np.sort(rng.choice(N_ITEMS, k, replace=False))
        pred = [rng.standard_normal(3).astype(np.float32) * 0.01] if predictor else []
        ups.append(Upload(ids, (rng.standard_normal((k, DIM)) * 0.01).astype(np.float32), pred,
                          int(rng.integers(5, 50)), str(c)))
    table = _table() if table is None else table
    state = state or {"optimizer": "sgd", "lr": 0.05}
    return RoundUpdates(ups, np.array([u.num_examples for u in ups], float), N_ITEMS, DIM, 1,
                        table, state)


def _collapse_upload(table, lr, optimizer, client="attacker", predictor=False):
    """A ClusterAttack-like upload: every item row pulled to one point, hugely."""
    target = table.mean(axis=0)
    grad = (table - target) / lr  # SGD: row - lr * grad = target
    if optimizer == "adam":
        grad = grad * 1e3  # Adam moves each coordinate by ~lr toward the point
    pred = [np.zeros(3, np.float32)] if predictor else []
    return Upload(np.arange(N_ITEMS), grad.astype(np.float32), pred, 30, client)


def _with(updates, uploads):
    return RoundUpdates(uploads, np.array([u.num_examples for u in uploads], float),
                        updates.n_items, updates.dim, updates.server_round, updates.item_table,
                        updates.server_state)


# ----------------------------------------------------------------- uniformity and the step


def test_uniformity_by_hand():
    # 3 points on a line at 0, 1, 3: distances 1, 3, 2 -> mean over ordered pairs 2 * 6 / 6
    emb = np.array([[[0.0, 0], [1, 0], [3, 0]], [[0, 0], [0, 2], [0, 2]]])
    # second client: distances 2, 2, 0 -> 4 / 3
    np.testing.assert_allclose(uniformity(emb), [2.0, 4 / 3], rtol=1e-12)


def test_simulated_adam_step_equals_torch_adam():
    rng = np.random.default_rng(3)
    table = _table()
    opt = ServerOptimizer([table, np.zeros(3, np.float32)], "adam", 2e-3, (0.9, 0.999), 1e-8)
    for _ in range(3):  # non-zero moments and a step count
        opt.step([rng.standard_normal((N_ITEMS, DIM)).astype(np.float32), np.zeros(3, np.float32)])
    state = opt.item_state()
    assert state["step"] == 3 and not state["exp_avg"].flags.writeable
    sample = rng.choice(N_ITEMS, 50)
    grad = rng.standard_normal((N_ITEMS, DIM)).astype(np.float32)
    sim = simulated_item_rows(opt.arrays()[0][sample], grad[sample][None],
                              (state["exp_avg"][sample], state["exp_avg_sq"][sample]),
                              state["step"], state["lr"], state["betas"], state["eps"])
    opt.step([grad, np.zeros(3, np.float32)])  # torch's own step with this gradient alone
    np.testing.assert_allclose(sim[0], opt.arrays()[0][sample], rtol=0, atol=1e-6)
    # SGD: row - lr * grad
    sgd = ServerOptimizer([table, np.zeros(3, np.float32)], "sgd", 0.01)
    assert sgd.item_state() == {"optimizer": "sgd", "lr": 0.01}
    np.testing.assert_allclose(simulated_item_rows(table[:4], grad[:4]),
                               table[:4] - 2e-3 * grad[:4], rtol=1e-6)


def test_root_sums_clamp_negative_squares():
    """A square that rounding made negative (equal rows) counts as distance 0, never nan,
    also when the roots are taken before any clamp."""
    from strategies.uniformity import root_sums

    d2 = np.array([[[-2e-18, -1e-18, 9.0], [-1e-18, 4.0, 16.0], [9.0, 16.0, -5e-17]]])
    w = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(root_sums(d2.copy, w), [[9.0, 16.0, 11.0]])
    np.testing.assert_array_equal(root_sums(d2.copy, w, diagonal=True), [[9.0, 12.0, 11.0]])


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_stepped_rows_are_the_simulated_step_bit_for_bit(optimizer):
    """The in-place step of gathered rows (union_uniformities' hot path) computes exactly
    simulated_item_rows' numbers, rows repeated and in any order."""
    rng = np.random.default_rng(11)
    base = _table().astype(np.float64)[:30]
    item = rng.integers(0, 30, 200)
    scale = 10.0 ** rng.integers(-4, 3, (200, 1))  # tiny to huge gradients
    grads = (rng.standard_normal((200, DIM)) * scale).astype(np.float32)
    kept = grads.copy()
    if optimizer == "adam":
        moments = ((rng.standard_normal((30, DIM)) * 1e-2).astype(np.float32),
                   (rng.random((30, DIM)) * 1e-4).astype(np.float32))
        kw = dict(step=6, lr=2e-3, betas=(0.9, 0.999), eps=1e-8)
        expect = simulated_item_rows(base[item], grads, (moments[0][item], moments[1][item]),
                                     **kw)
    else:
        moments, kw = None, dict(lr=0.05)
        expect = simulated_item_rows(base[item], grads, lr=0.05)
    np.testing.assert_array_equal(stepped_rows(item, grads, base, moments, **kw), expect)
    np.testing.assert_array_equal(grads, kept)  # the caller's gradients are not written


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_sparse_uniformities_equal_the_dense_definition(optimizer):
    rng = np.random.default_rng(5)
    table = _table()
    if optimizer == "adam":
        state = {"optimizer": "adam", "lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-8, "step": 4,
                 "exp_avg": (rng.standard_normal((N_ITEMS, DIM)) * 1e-2).astype(np.float32),
                 "exp_avg_sq": (rng.random((N_ITEMS, DIM)) * 1e-4).astype(np.float32)}
    else:
        state = {"optimizer": "sgd", "lr": 0.05}
    u = _benign_round(10, table=table, state=state)
    u = _with(u, u.uploads + [_collapse_upload(table, 0.05, optimizer)])  # one dense client
    sample = rng.choice(N_ITEMS, 300)  # with repeats
    dense_grad = np.zeros((len(u), N_ITEMS, DIM))
    for c, up in enumerate(u.uploads):
        dense_grad[c, up.item_ids] = up.item_rows
    moments = None
    if optimizer == "adam":
        moments = (state["exp_avg"][sample], state["exp_avg_sq"][sample])
    kw = {k: state[k] for k in ("step", "betas", "eps") if k in state}
    sim = simulated_item_rows(table[sample], dense_grad[:, sample], moments, lr=state["lr"], **kw)
    expect = uniformity(sim)
    np.testing.assert_allclose(union_uniformities(u, sample, state), expect, rtol=1e-9, atol=1e-12)
    # all uploads dense: the dense path gives the same values
    full = _with(u, [Upload(np.arange(N_ITEMS), dense_grad[c].astype(np.float32), [], 1, str(c))
                     for c in range(len(u))])
    np.testing.assert_allclose(union_uniformities(full, sample, state), expect, rtol=1e-9,
                               atol=1e-12)


# ----------------------------------------------------------------- gap statistic


def test_two_means_is_exact_and_batched():
    x = np.array([0.0, 0.1, 0.2, 5.0, 5.2])
    w1, w2, labels = two_means_1d(x)
    assert np.isclose(w1, ((x - x.mean()) ** 2).sum())
    assert np.isclose(w2, 0.02 + 0.02) and labels.tolist() == [0, 0, 0, 1, 1]
    batch = np.random.default_rng(0).random((200, 7))
    bw1, bw2, _ = two_means_1d(batch)
    masks = [np.array([(k >> i) & 1 for i in range(7)], bool) for k in range(1, 127)]
    for row, a, b in zip(batch[:20], bw1, bw2):  # brute force over every 2-partition
        best = min(((row[m] - row[m].mean()) ** 2).sum() + ((row[~m] - row[~m].mean()) ** 2).sum()
                   for m in masks)
        assert np.isclose(b, best) and np.isclose(a, ((row - row.mean()) ** 2).sum())


def test_null_pool_is_cached_seeded_and_vectorised(tmp_path):
    pool = null_log_inertias(20, tmp_path)
    assert pool.shape == (10_000, 2) and (pool[:, 1] < pool[:, 0]).all()
    assert (tmp_path / "union-null-n20.npz").is_file()
    import strategies.union as union_mod
    union_mod._null_cache.clear()
    np.testing.assert_array_equal(null_log_inertias(20, tmp_path), pool)  # read back
    union_mod._null_cache.clear()
    np.testing.assert_array_equal(null_log_inertias(20, tmp_path / "other"), pool)  # seeded
    # uniform on [0, 1]: E[W_1] = (n - 1) / 12
    assert abs(np.exp(pool[:, 0]).mean() - 19 / 12) < 0.02


def test_gap_statistic_one_cluster_on_unimodal_two_on_bimodal(tmp_path):
    pool = null_log_inertias(50, tmp_path)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        more, _ = gap_statistic_split(rng.standard_normal(50), pool, 50, rng)
        assert not more, seed
        values = np.r_[rng.normal(0, 0.5, 45), rng.normal(10, 0.5, 5)]
        more, labels = gap_statistic_split(values, pool, 50, rng)
        assert more and labels.tolist() == [0] * 45 + [1] * 5, seed
    assert gap_statistic_split(np.ones(50), pool, 50, rng) == (False, pytest.approx(np.zeros(50)))


# ----------------------------------------------------------------- the rule


def _union(inner, **kw):
    return FilterChain([UnionFilter(cache_dir=kw.pop("cache_dir"), **{"expected_attackers": 1, **kw})],
                       inner)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_collapse_attack_is_dropped(tmp_path, optimizer):
    table = _table()
    opt = ServerOptimizer([table.copy()], optimizer, 2e-3 if optimizer == "adam" else 0.05)
    rng = np.random.default_rng(1)
    for _ in range(2):
        opt.step([rng.standard_normal((N_ITEMS, DIM)).astype(np.float32) * 0.01])
    state = opt.item_state()
    u = _benign_round(15, seed=2, table=opt.arrays()[0], state=state)
    attack = _collapse_upload(opt.arrays()[0], state["lr"], optimizer)
    u = _with(u, u.uploads[:6] + [attack] + u.uploads[6:])
    drop, info = union_filter(u, np.random.default_rng(0), expected_attackers=0,
                              cache_dir=tmp_path)
    assert drop == [6] and info == {"union_dropped": 1, "union_gap_more_than_one": 1}
    agg = _union(MeanRule(), cache_dir=tmp_path)(u)
    assert agg.dropped == [6] and agg.info["union_dropped"] == 1
    assert agg.dropped_by == {"union": [6]}
    rest = [x for i, x in enumerate(u.uploads) if i != 6]
    np.testing.assert_allclose(agg.item_grad, MeanRule()(_with(u, rest)).item_grad, atol=1e-7)


def test_benign_round_keeps_everyone(tmp_path):
    u = _benign_round(30, seed=4)
    drop, info = union_filter(u, np.random.default_rng(0), expected_attackers=0, cache_dir=tmp_path)
    assert drop == [] and info["union_gap_more_than_one"] == 0


def test_union_composes_with_multikrum_and_norm_bound(tmp_path):
    table = _table()
    u = _benign_round(12, seed=6, table=table, predictor=True)
    attack = _collapse_upload(table, u.server_state["lr"], "sgd", predictor=True)
    # far from everyone in L2 (Multi-Krum's catch) but a small move of the table (UNION's miss)
    outlier = Upload(u.uploads[3].item_ids, u.uploads[3].item_rows * 50,
                     [np.full(3, 5, np.float32)], 10, "far")
    ups = u.uploads[:2] + [attack] + u.uploads[2:]
    ups[4] = outlier
    u = _with(u, ups)
    # Multi-Krum (f=1) on the 12 uploads UNION kept: the drop sets are unioned
    mk = _union(MultiKrumRule("dense", f=1), cache_dir=tmp_path)(u)
    assert mk.dropped == [2, 4]
    assert (mk.info["union_dropped"], mk.info["inner_dropped"], mk.info["dropped"]) == (1, 1, 2)
    keep = [i for i in range(len(u)) if i != 2]
    inner = MultiKrumRule("dense", f=1)(_with(u, [u.uploads[i] for i in keep]))
    assert [keep[i] for i in inner.dropped] == [4]
    np.testing.assert_allclose(mk.item_grad, inner.item_grad, atol=1e-7)
    # norm bound: filter, then clip: the kept clients' clipped mean
    nb = _union(NormBoundRule("dense", bound=0.05), cache_dir=tmp_path)(u)
    kept = _with(u, [x for i, x in enumerate(u.uploads) if i not in nb.dropped])
    clipped = clip_updates(kept, 0.05)
    np.testing.assert_allclose(nb.item_grad, MeanRule()(clipped).item_grad, atol=1e-7)
    for a, b in zip(nb.predictor, MeanRule()(clipped).predictor):
        np.testing.assert_allclose(a, b, atol=1e-7)
    assert nb.dropped == [2] and nb.info["inner_dropped"] == 0 and nb.info["clipped"] == 12


def test_round_without_server_state_uses_the_configured_optimizer(tmp_path):
    u = _benign_round(8)
    u.server_state = None
    rule = FilterChain([UnionFilter(cache_dir=tmp_path, optimizer={"optimizer": "sgd", "lr": 0.05})],
                       MeanRule())
    assert rule(u).info["union_dropped"] >= 0
    small = _with(u, u.uploads[:2])  # too few for a gap statistic: nothing dropped
    small.server_state = {"optimizer": "sgd", "lr": 0.05}
    assert rule(small).dropped == []


# ----------------------------------------------------------------- config and engine


def _cfg(tmp_path, rule="mean", **server):
    return from_dict({"name": f"union-{rule}",
                      "data": {"synthetic": {"n_users": 60, "n_items": 80, "mean_history": 12},
                               "cache_dir": str(tmp_path / "cache")},
                      "model": {"dim": 8}, "train": {"rounds": 5, "clients_per_round": 10},
                      "server": {"lr": 0.01, "rule": rule, "rule_f": 1, "filter": "union",
                                 **server},
                      "eval": {"every": 0}, "output": {"progress": False, "dir": str(tmp_path)}})


def test_config_builds_the_chain_and_validates(tmp_path):
    rule = make_rule(_cfg(tmp_path, "multikrum", union_sample_items=100, union_gap_b=20))
    assert isinstance(rule, FilterChain) and isinstance(rule.rule, MultiKrumRule)
    (union,) = rule.steps
    assert (union.sample_items, union.gap_b, union.expected_attackers) == (100, 20, 1)  # = rule_f
    assert union.cache_dir == tmp_path / "cache" and union.device == "cpu"
    assert make_rule(_cfg(tmp_path, union_expected_attackers=3)).steps[0].expected_attackers == 3
    assert isinstance(make_rule(_cfg(tmp_path, filter="none")), MeanRule)
    # the list form, and the older single key, build the same chain
    listed = make_rule(_cfg(tmp_path, "multikrum", filter="none", filters=["union"]))
    assert [type(s) for s in listed.steps] == [UnionFilter] and isinstance(listed.rule, MultiKrumRule)
    for key, bad in (("filter", "krum"), ("union_sample_items", 1), ("union_gap_b", 1),
                     ("union_expected_attackers", -2), ("filters", "union")):
        with pytest.raises(ConfigError, match=f"server.{key}"):
            _cfg(tmp_path, **{key: bad})
    with pytest.raises(ConfigError, match="server.filter and server.filters"):
        _cfg(tmp_path, filters=["clip"])
    with pytest.raises(ConfigError, match="server.filters: 'krum' is not one of union, detector, clip"):
        make_rule(_cfg(tmp_path, filter="none", filters=["krum"]))


@pytest.mark.parametrize("rule, aggregation", [("mean", "dense"), ("multikrum", "item"),
                                               ("norm_bound", "dense")])
def test_engine_runs_with_union(tmp_path, rule, aggregation):
    """Under ClusterAttack: every round's UNION drops reach metrics.csv, and the union stage's
    detection counts in summary.json are exactly those drops, scored against the attackers."""
    import csv

    cfg = _cfg(tmp_path, rule, aggregation=aggregation)
    cfg = from_dict({**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "attacker_pool": 0.2},
                     "attack": {"name": "clusterattack", "malicious_fraction": 0.1},
                     "train": {**cfg.to_dict()["train"], "rounds": 12}})
    s = run_experiment(cfg, progress=False)
    assert s["status"] == "complete"
    with open(tmp_path / s["run_dir"] / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    union_drops = sum(int(r["rule_union_dropped"]) for r in rows)
    stage = s["detection"]["union"]
    assert stage["tp"] + stage["fp"] == union_drops == sum(int(r["det_union_tp"]) + int(r["det_union_fp"])
                                                           for r in rows)
    assert s["detection"]["tp"] + s["detection"]["fp"] == sum(int(r["rule_dropped"]) for r in rows)
    assert stage["tp"] + stage["fn"] == sum(int(r["attack_uploads"] or 0) for r in rows)
    assert (tmp_path / "cache" / "union-null-n10.npz").is_file()


def test_union_device_resolution_and_torch_path_agree():
    import torch

    from fedrec.errors import ConfigError
    from fedrec.runtime import resolve_device
    from strategies.uniformity import weighted_pair_sums, weighted_pair_sums_torch

    assert resolve_device("cpu", "server.union_device").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="server.union_device"):
        resolve_device("tpu", "server.union_device")
    rng = np.random.default_rng(0)
    y, w = rng.normal(size=(5, 30, 4)), rng.random((5, 30))
    # the torch path (here on the CPU device) computes the same sums as numpy
    np.testing.assert_allclose(weighted_pair_sums_torch(y, w, "cpu"), weighted_pair_sums(y, w), rtol=1e-10)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_dense_uploads_of_mostly_shared_rows_equal_the_dense_definition(optimizer):
    """Dense uploads (every client sends every item) that are mostly one same row per item
    (the weight decay alone): those rows are taken as the common rows (shared_gradients),
    the d_c still those of the definition, and only the other rows are clients' own."""
    from strategies.union import shared_gradients

    rng = np.random.default_rng(4)
    table = _table(1)
    state = {"optimizer": "sgd", "lr": 0.05}
    if optimizer == "adam":
        state = {"optimizer": "adam", "lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-8, "step": 3,
                 "exp_avg": (rng.standard_normal((N_ITEMS, DIM)) * 1e-2).astype(np.float32),
                 "exp_avg_sq": (rng.random((N_ITEMS, DIM)) * 1e-4).astype(np.float32)}
    decay = (1e-3 * table).astype(np.float32)
    decay[5] = -0.0  # a row of negative zeros: the same bits for all, not those of 0.0
    grads = np.repeat(decay[None], 10, axis=0)
    # each client's own rows: 1-2 clients an item, never the 1st and the 5th client both
    # (two of the rows shared_gradients tries as the common one)
    own = (np.arange(N_ITEMS)[None, :] + np.arange(10)[:, None]) % 7 == 0
    grads[own] += (rng.standard_normal((int(own.sum()), DIM)) * 0.01).astype(np.float32)
    grads[:6, 7] = (rng.standard_normal(DIM) * 0.01).astype(np.float32)  # 6 alike: common
    ups = [Upload(np.arange(N_ITEMS), grads[c], [], 10, str(c)) for c in range(10)]
    u = RoundUpdates(ups, np.full(10, 10.0), N_ITEMS, DIM, 1, table, state)
    sample = rng.choice(N_ITEMS, 200)
    moments = None
    if optimizer == "adam":
        moments = (state["exp_avg"][sample], state["exp_avg_sq"][sample])
    kw = {k: state[k] for k in ("step", "betas", "eps") if k in state}
    sim = simulated_item_rows(table[sample], grads[:, sample].astype(np.float64), moments,
                              lr=state["lr"], **kw)
    np.testing.assert_allclose(union_uniformities(u, sample, state), uniformity(sim),
                               rtol=1e-9, atol=1e-12)
    ids, rows, _ = u.stacked
    item = ids  # every item, positions = ids here
    common, differs = shared_gradients(rows, item, N_ITEMS, 10)
    expect_common = decay.copy()
    expect_common[7] = grads[0, 7]
    assert common.tobytes() == expect_common.tobytes()
    np.testing.assert_array_equal(differs.reshape(10, N_ITEMS), own & (np.arange(N_ITEMS) != 7)
                                  | (np.arange(10)[:, None] >= 6) & (np.arange(N_ITEMS) == 7))


def test_half_covering_uploads_equal_the_dense_definition():
    """Uploads touching about half the sampled items (the contrastive term's): each client's
    rows are compared with the common rows it did not upload, gathered per client."""
    rng = np.random.default_rng(8)
    table = _table(2)
    state = {"optimizer": "adam", "lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-8, "step": 7,
             "exp_avg": (rng.standard_normal((N_ITEMS, DIM)) * 1e-2).astype(np.float32),
             "exp_avg_sq": (rng.random((N_ITEMS, DIM)) * 1e-4).astype(np.float32)}
    ups = []
    for c in range(9):
        ids = np.sort(rng.choice(N_ITEMS, int(rng.integers(45, 75)), replace=False))
        ups.append(Upload(ids, (rng.standard_normal((len(ids), DIM)) * 0.01).astype(np.float32),
                          [], 10, str(c)))
    u = RoundUpdates(ups, np.full(len(ups), 10.0), N_ITEMS, DIM, 1, table, state)
    sample = rng.choice(N_ITEMS, 200)  # with repeats
    dense_grad = np.zeros((len(u), N_ITEMS, DIM))
    for c, up in enumerate(u.uploads):
        dense_grad[c, up.item_ids] = up.item_rows
    sim = simulated_item_rows(table[sample], dense_grad[:, sample],
                              (state["exp_avg"][sample], state["exp_avg_sq"][sample]),
                              state["step"], state["lr"], state["betas"], state["eps"])
    np.testing.assert_allclose(union_uniformities(u, sample, state), uniformity(sim),
                               rtol=1e-9, atol=1e-12)
