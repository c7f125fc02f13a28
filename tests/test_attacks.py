"""Each attack's math on a hand-computed case (pure functions, no training)."""

import math

import numpy as np
import pytest

from clients.malicious.base import AdversaryView, HonestUpdate, dense_updates, parse_params
from clients.malicious.clusterattack import (AdaptiveK, ClusterAttackClient, ClusterAttackParams, lloyd_kmeans,
                                             cluster_gradient, cluster_sums, match_norms)
from clients.malicious.dynopt import dyn_opt_gamma
from clients.malicious.fang import stat_opt
from clients.malicious.fedattack import hard_pairs
from clients.malicious.lie import lie_update, lie_z
from clients.malicious.spattack import SpattackClient, SpattackParams, cover_samples
from fedrec.errors import ConfigError
from fedrec.models.losses import contrastive_grad


def upd(user, ids, rows, n=1, pred=()):
    return HonestUpdate(user, np.array(ids, np.int64), np.array(rows, np.float32), list(pred), n)


def view(own, benign=None, table=None, n_items=4, n_clients=None, weighting="samples"):
    table = np.zeros((n_items, 2), np.float32) if table is None else table
    return AdversaryView(round=1, item_table=table, predictor=[], own=own, benign=benign,
                         n_clients=n_clients or len(own) + len(benign or []), n_items=n_items,
                         weighting=weighting)


def test_cluster_gradient_is_2_v_minus_c_over_k():
    table = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [12.0, 10.0]], np.float32)
    labels = np.array([0, 0, 1, 1])
    cent = np.array([[1.0, 0.0], [11.0, 10.0]])
    g, loss = cluster_gradient(table, labels, cent, 2)
    # v - c = (-1,0), (1,0), (-1,0), (1,0); gradient 2 (v - c) / K with K = 2
    np.testing.assert_allclose(g, [[-1, 0], [1, 0], [-1, 0], [1, 0]])
    assert loss == pytest.approx(4 * 1.0 / 2)


def test_norm_matching_rescales_each_row_to_mu_plus_lambda_sigma():
    g = np.array([[3.0, 4.0], [0.0, 0.5], [6.0, 8.0]], np.float32)  # norms 5, 0.5, 10
    lam = np.array([0.0, 1.0, 2.0])
    out = match_norms(g, mu=1.0, sigma=0.5, lam=lam)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), [1.0, 1.5, 2.0], rtol=1e-6)
    np.testing.assert_allclose(out[0], [0.6, 0.8], rtol=1e-6)  # direction kept
    clipped = match_norms(g, 1.0, 0.5, lam, mode="clip")  # only shrinks: row 1 (0.5 <= 1.5) kept
    np.testing.assert_allclose(clipped[1], g[1])
    np.testing.assert_allclose(np.linalg.norm(clipped[2]), 2.0, rtol=1e-6)


def test_adaptive_k_follows_algorithm_1():
    a = AdaptiveK(k=2, k_min=1, k_max=50, r=3, beta=0.5)
    for loss in [1.0, 2.0, 3.0]:  # rises after the first value: n_inc 2, not yet R = 3
        assert a.update(loss) == 2
    assert a.update(4.0) == math.floor(2 + math.sqrt(48))  # third rise: K = floor(K + sqrt(Kmax-K)) = 8
    assert (a.t, a.n_inc, a.n_dec) == (0, 0, 0)
    b = AdaptiveK(k=10, k_min=1, k_max=50, r=2, beta=0.5)
    for loss in [5.0, 4.0]:
        b.update(loss)
    assert b.update(3.0) == math.floor(10 - math.sqrt(9))  # two falls: K = floor(K - sqrt(K-Kmin)) = 7
    c = AdaptiveK(k=2, r=2, beta=0.5, r_growth=0.5)
    for loss in [1.0, 2.0, 3.0]:
        c.update(loss)
    assert c.r == pytest.approx(3.0)  # R grew by (1 + rate) after the change


def test_adaptive_k_rounding_of_the_reference_code():
    a = AdaptiveK(k=2, k_min=1, k_max=50, r=2, beta=0.5, rounding="round")
    for loss in [1.0, 2.0, 3.0]:
        a.update(loss)
    assert a.k == round(2 + math.sqrt(48)) == 9  # floor would give 8
    c = AdaptiveK(k=6, k_min=1, k_max=50, r=2, beta=0.5, rounding="round")
    for loss in [5.0, 4.0, 3.0]:
        c.update(loss)
    assert c.k == round(6 - math.sqrt(5)) == 4 and math.floor(6 - math.sqrt(5)) == 3


def test_lloyd_kmeans_as_the_reference_code():
    rng = np.random.default_rng(0)
    table = np.concatenate([rng.normal(0, 0.1, (30, 3)), rng.normal(4, 0.1, (20, 3))])
    labels, cent, inertia = lloyd_kmeans(table, 2, np.random.default_rng(5))
    # the two blobs, whatever the random start
    assert len(set(labels[:30])) == 1 and len(set(labels[30:])) == 1 and labels[0] != labels[30]
    np.testing.assert_allclose(cent[labels[0]], table[:30].mean(0), atol=1e-12)
    np.testing.assert_allclose(cent[labels[30]], table[30:].mean(0), atol=1e-12)
    assert inertia == pytest.approx(((table - cent[labels]) ** 2).sum())
    # the initial centroids come from the generator: same seed, same result
    again = lloyd_kmeans(table, 2, np.random.default_rng(5))
    np.testing.assert_array_equal(again[0], labels)
    # an empty cluster keeps its centroid: 3 identical rows, k = 2
    same = np.ones((3, 2))
    lab, c2, _ = lloyd_kmeans(same, 2, np.random.default_rng(0))
    assert np.isfinite(c2).all() and (lab == lab[0]).all()


def test_cluster_sums_equal_ufunc_at_bit_for_bit():
    """Row order from 0.0, as np.add.at: the same float64 numbers (an empty cluster: 0)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 6)) * rng.uniform(1e-6, 1e6, (500, 1))
    x[7] = -0.0
    labels = rng.choice([0, 1, 3, 4], 500)  # label 2 empty
    expect = np.zeros((5, 6))
    np.add.at(expect, labels, x)
    got = cluster_sums(x, labels, 5)
    assert np.array_equal(got, expect) and not got[2].any()


def test_clusterattack_round_uploads_every_row_at_matched_norms():
    rng = np.random.default_rng(0)
    table = np.concatenate([rng.normal(0, 0.1, (20, 4)), rng.normal(5, 0.1, (20, 4))]).astype(np.float32)
    own = [upd(7, [1, 2], [[3, 4, 0, 0], [0, 0, 6, 8]]), upd(9, [3], [[0, 0, 0, 7.5]])]
    own[0].train_items = np.array([1, 2])
    own[1].train_items = np.array([3])
    params = parse_params(ClusterAttackParams, {"k0": 2}, "clusterattack")
    memory = {}
    out, diag = ClusterAttackClient.craft_round(view(own, table=table, n_items=40), params, memory,
                                                np.random.default_rng(1))
    assert len(out) == 2 and diag["K"] == 2
    assert diag["norm_mu"] == pytest.approx(np.mean([5, 10, 7.5]))
    assert diag["norm_sigma"] == pytest.approx(np.std([5, 10, 7.5]))
    for ids, rows, _ in out:
        np.testing.assert_array_equal(ids, np.arange(40))
        norms = np.linalg.norm(rows, axis=1)
        lo, hi = diag["norm_mu"], diag["norm_mu"] + 3 * diag["norm_sigma"]
        assert (norms >= lo - 1e-4).all() and (norms < hi + 1e-4).all()
        # each row points from its centroid toward the item (the within-cluster gradient)
        cent = memory["centroids"]
        lab = np.argmin(((table[:, None] - cent[None]) ** 2).sum(-1), 1)
        d = table - cent[lab]
        cos = (rows * d).sum(1) / (np.linalg.norm(d, axis=1) * norms)
        assert (cos > 0.999).all()


def test_lie_z_from_client_counts():
    # n = 50, m = 10: s = floor(26) - 10 = 16, z = Phi^-1((50 - 16) / 50) = Phi^-1(0.68)
    assert lie_z(50, 10) == pytest.approx(0.467699, abs=1e-5)
    assert lie_z(50, 1) == pytest.approx(0.0, abs=1e-12)  # s = 25: Phi^-1(0.5)
    np.testing.assert_allclose(lie_update(np.array([1.0, -2.0]), np.array([0.5, 1.0]), 2.0), [0.0, -4.0])


def test_fang_moves_against_the_benign_sign_by_a_constant_magnitude():
    mean, std = np.array([0.5, -1.0, 0.0]), np.array([1.0, 3.0, 0.0])
    # sigma_bar = mean(1, 3) = 2; gamma = 3: deviation 6 opposite to sign(mean)
    np.testing.assert_allclose(stat_opt(mean, std, 3.0), [-5.5, 5.0, 0.0])


def test_fang_reference_form_along_the_mean_sign_per_coordinate():
    """The ClusterAttack/UNION reference's form: mu + gamma * sigma * sign(mu), per coordinate."""
    mean, std = np.array([0.5, -1.0, 0.0]), np.array([1.0, 3.0, 2.0])
    np.testing.assert_allclose(stat_opt(mean, std, 3.0, "along", "coordinate"), [3.5, -10.0, 0.0])
    np.testing.assert_allclose(stat_opt(mean, std, 3.0, "against", "coordinate"), [-2.5, 8.0, 0.0])
    np.testing.assert_allclose(stat_opt(mean, std, 3.0, "along", "mean"), [6.5, -7.0, 0.0])


def test_fang_draws_one_gamma_per_malicious_upload():
    """gamma_max > gamma: each malicious upload its own gamma ~ U[gamma, gamma_max) from the
    adversary's generator (same seed, same draws); rows and predictor share it."""
    from types import SimpleNamespace

    from clients.malicious.fang import FangClient, FangParams
    from clients.malicious.base import dense_stats

    rng = np.random.default_rng(0)
    known = [SimpleNamespace(item_ids=np.array([1, 4]), item_rows=rng.standard_normal((2, 3)).astype(np.float32),
                             predictor=[rng.standard_normal(2).astype(np.float32)]) for _ in range(5)]
    view = SimpleNamespace(benign=None, pool=known, own=known[:3])
    params = FangParams(gamma=3.0, gamma_max=4.0, direction="along", deviation="coordinate")
    out, diag = FangClient.craft_round(view, params, {}, np.random.default_rng(7))
    again, _ = FangClient.craft_round(view, params, {}, np.random.default_rng(7))
    ids, mean, std, pred = dense_stats(known)
    gammas = np.random.default_rng(7).uniform(3.0, 4.0, size=3)
    assert len(out) == 3 and 3.0 <= diag["gamma"] < 4.0
    for (up_ids, rows, p), (_, rows2, _), g in zip(out, again, gammas):
        np.testing.assert_array_equal(up_ids, ids)
        np.testing.assert_array_equal(rows, rows2)
        np.testing.assert_array_equal(rows, stat_opt(mean, std, g, "along", "coordinate"))
        np.testing.assert_array_equal(p[0], stat_opt(pred[0][0], pred[0][1], g, "along", "coordinate"))
    assert not np.array_equal(out[0][1], out[1][1])
    with pytest.raises(Exception, match="direction"):
        FangParams(direction="sideways").validate()


@pytest.mark.parametrize("mode", ["min-max", "min-sum"])
def test_dyn_opt_gamma_is_the_largest_within_the_benign_spread(mode):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(6, 5))
    p = -X.std(0)
    g = dyn_opt_gamma(X, p, mode, gamma_init=10.0, tau=1e-7)

    def worst(gamma):
        m = X.mean(0) + gamma * p
        d = ((X - m) ** 2).sum(1)
        pair = ((X[:, None] - X[None]) ** 2).sum(-1)
        return (d.max() - pair.max()) if mode == "min-max" else (d.sum() - pair.sum(1).max())

    assert g > 0 and worst(g) <= 1e-9 and worst(g + 1e-4) > 0


def test_fedattack_picks_bottom_positives_and_top_negatives():
    scores = np.array([5.0, 1.0, 9.0, 3.0, 7.0, 0.0, 8.0, 2.0])
    known = np.zeros(8, bool)
    known[[2, 5]] = True  # interacted: never chosen
    pos, neg = hard_pairs(scores, np.arange(8), known, 2)
    np.testing.assert_array_equal(pos, [1, 7])  # lowest scores 1.0, 2.0
    np.testing.assert_array_equal(neg, [6, 4])  # highest 8.0, 7.0 (9.0 is interacted)
    pos, neg = hard_pairs(scores, np.array([0, 1, 3]), known, 5)  # pool of 3 items: n shrinks to 1
    assert len(pos) == len(neg) == 1
    # a sequential model's own number of negatives: exactly that many, the hardest first, cycled
    pos, neg = hard_pairs(scores, np.arange(8), known, 2, n_neg=3)
    np.testing.assert_array_equal(pos, [1, 7])
    np.testing.assert_array_equal(neg, [6, 4, 0])
    pos, neg = hard_pairs(scores, np.arange(8), known, 2, n_neg=6)  # 6 candidates, 2 positives
    np.testing.assert_array_equal(neg, [6, 4, 0, 3, 6, 4])
    # the reference's form: one positive (the lowest) for every pair, the user's items ranked too
    pos, neg = hard_pairs(scores, np.arange(8), None, 3, single_positive=True)
    np.testing.assert_array_equal(pos, [5, 5, 5])  # 0.0, an interacted item
    np.testing.assert_array_equal(neg, [2, 6, 4])  # 9.0 (interacted), 8.0, 7.0
    pos, neg = hard_pairs(scores, np.arange(8), known, 3, single_positive=True)
    np.testing.assert_array_equal(pos, [1, 1, 1])
    # FedAttack's notebook: every pair (the lowest, the highest), the second-highest (6, score
    # 8.0) where the highest (2, score 9.0) is the pair's own real positive
    pos, neg = hard_pairs(scores, np.arange(8), None, 3, single_positive=True,
                          single_negative_of=np.array([4, 2, 0]))
    np.testing.assert_array_equal(pos, [5, 5, 5])
    np.testing.assert_array_equal(neg, [2, 6, 2])


def test_fedattack_notebook_ranking_is_the_initial_user_row_dot_the_table(tmp_path):
    """ranking: initial_dot scores items by item_table @ u0 (u0: the user row as initialised,
    never the trained one), whatever the model (NCF here); single_negative pairs every
    positive with the top item."""
    from conftest import tiny_cfg

    from clients.malicious.fedattack import FedAttackClient, FedAttackParams
    from clients.state import DictStore
    from fedrec.build import build_client, build_env, malicious_set

    cfg = tiny_cfg(tmp_path, model__name="ncf", data__attacker_pool=0.2, attack__name="fedattack",
                   attack__malicious_fraction=0.1,
                   attack__params={"single_positive": True, "single_negative": True,
                                   "exclude_known": False, "ranking": "initial_dot"})
    env = build_env(cfg)
    client = build_client(env, min(malicious_set(env)), DictStore())
    assert isinstance(client, FedAttackClient)
    rng = np.random.default_rng(0)
    table = rng.standard_normal((env.data.n_items, 8)).astype(np.float32)
    client._global = [table, *[np.zeros(1, np.float32)]]
    client._round = 5
    state = client.private_state()
    state["user"] = state["user"] + 10.0  # trained far away: must not be what ranks
    real = client.train_items
    pos, neg = client.poison_pairs(real, None, state, rng)
    scores = table.astype(np.float64) @ client.initial_user_row().astype(np.float64)
    order = np.argsort(scores, kind="stable")
    assert (pos == order[0]).all() and len(pos) == len(real)
    np.testing.assert_array_equal(neg, np.where(real == order[-1], order[-2], order[-1]))
    with pytest.raises(ConfigError, match="ranking"):
        parse_params(FedAttackParams, {"ranking": "bogus"}, "fedattack").validate()


@pytest.mark.parametrize("variant", ["O-D", "O-S"])
@pytest.mark.parametrize("weighting", ["samples", "uniform"])
def test_spattack_o_rows_cancel_the_benign_sum(variant, weighting):
    rng = np.random.default_rng(0)
    n_items, dim = 12, 3
    benign = [upd(u, np.sort(rng.choice(n_items, 5, replace=False)), rng.normal(size=(5, dim)),
                  n=int(rng.integers(1, 9))) for u in range(4)]
    own = [upd(10, [0], [[0, 0, 0]], n=3), upd(11, [1], [[0, 0, 0]], n=5)]
    params = parse_params(SpattackParams, {"variant": variant}, "spattack")
    out, _ = SpattackClient.craft_round(view(own, benign, np.zeros((n_items, dim), np.float32),
                                             n_items, weighting=weighting), params, {}, rng)
    total = np.zeros((n_items, dim))
    w = (lambda u: u.num_examples) if weighting == "samples" else (lambda u: 1.0)
    for u in benign:
        np.add.at(total, u.item_ids, w(u) * u.item_rows)
    for (ids, rows, _), u in zip(out, own):
        np.add.at(total, ids, w(u) * rows)
    np.testing.assert_allclose(total, 0, atol=1e-4)  # every item's weighted sum cancels
    sent = np.unique(np.concatenate([u.item_ids for u in benign]))
    if variant == "O-D":
        assert all(np.array_equal(ids, np.arange(n_items)) for ids, _, _ in out)
    else:  # a sample as large as the largest benign upload (5), plus a share of the uncovered
        # benign items; together the malicious uploads cover every item a benign client sent
        extra = -(-len(sent) // len(own))
        assert all(5 <= len(ids) <= 5 + extra and len(ids) < n_items for ids, _, _ in out)
        assert all(np.array_equal(ids, np.unique(ids)) for ids, _, _ in out)
        assert set(sent) <= set(np.concatenate([ids for ids, _, _ in out]))


def test_spattack_s_samples_cover_every_required_item():
    rng = np.random.default_rng(0)
    pop = np.zeros(100)
    pop[:10] = 1.0  # only 10 items are popular: the samples alone would miss the rest
    must = np.arange(0, 100, 7)
    picks = cover_samples(3, 100, 5, pop, must, rng)
    assert set(must) <= set(np.concatenate(picks))


def test_dense_updates_zero_fills_unsent_rows():
    ids, X, _ = dense_updates([upd(0, [1, 3], [[1, 1], [2, 2]]), upd(1, [3, 5], [[4, 4], [5, 5]])])
    np.testing.assert_array_equal(ids, [1, 3, 5])
    np.testing.assert_array_equal(X[0], [[1, 1], [2, 2], [0, 0]])
    np.testing.assert_array_equal(X[1], [[0, 0], [4, 4], [5, 5]])


def test_contrastive_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(10, 3))
    anchors, pos, neg = np.array([0, 1]), np.array([1, 0]), np.array([[2, 3], [4, 5]])
    ids, rows, loss = contrastive_grad(table, anchors, pos, neg)

    def f(t):
        return contrastive_grad(t, anchors, pos, neg)[2]

    num = np.zeros_like(table)
    for i in range(6):
        for j in range(3):
            e = np.zeros_like(table)
            e[i, j] = 1e-6
            num[i, j] = (f(table + e) - f(table - e)) / 2e-6
    np.testing.assert_array_equal(ids, np.arange(6))
    np.testing.assert_allclose(rows, num[:6], atol=1e-5)


def test_bad_attack_parameters_are_clear_errors():
    with pytest.raises(ConfigError, match="attack.params.kk"):
        parse_params(ClusterAttackParams, {"kk": 3}, "clusterattack")
    with pytest.raises(ConfigError, match="attack.params.variant"):
        parse_params(SpattackParams, {"variant": "X"}, "spattack")
    with pytest.raises(ConfigError, match="k_min"):
        parse_params(ClusterAttackParams, {"k0": 0}, "clusterattack")


def test_dense_stats_equal_mean_and_std_of_the_dense_updates():
    from clients.malicious.base import dense_stats

    rng = np.random.default_rng(0)
    ups = [upd(u, np.sort(rng.choice(30, int(rng.integers(1, 12)), replace=False)),
               rng.normal(size=(12, 4))[:0].reshape(0, 4), pred=[rng.normal(size=3)]) for u in range(5)]
    for u in ups:
        u.item_rows = rng.normal(size=(len(u.item_ids), 4)).astype(np.float32)
    ids, X, pred = dense_updates(ups)
    ids2, mean, std, pstats = dense_stats(ups)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_allclose(mean, X.mean(0), atol=1e-6)
    np.testing.assert_allclose(std, X.std(0), atol=1e-6)
    np.testing.assert_allclose(pstats[0][0], pred[0].mean(0), atol=1e-6)


@pytest.mark.parametrize("block_rows", [1, 7, 25, 1 << 15])
def test_dense_stats_in_blocks_of_updates_are_the_same_bits(block_rows, monkeypatch):
    """dense_stats adds the updates' rows block by block (whole updates, STATS_BLOCK_ROWS
    rows at most, an update longer than that alone): the same bits as one sequential sum over
    every row in upload order, the obvious loop here."""
    import clients.malicious.base as base

    rng = np.random.default_rng(1)
    ups = [upd(u, np.sort(rng.choice(40, int(rng.integers(1, 15)), replace=False)),
               np.zeros((0, 4)), pred=[rng.normal(size=3)]) for u in range(9)]
    for u in ups:  # values over a wide range, so the order of the float64 sums shows in bits
        u.item_rows = (rng.normal(size=(len(u.item_ids), 4))
                       * 10.0 ** rng.integers(-6, 6, size=(len(u.item_ids), 1))).astype(np.float32)
    monkeypatch.setattr(base, "STATS_BLOCK_ROWS", block_rows)
    ids, mean, std, _ = base.dense_stats(ups)
    s1 = np.zeros((len(ids), 4))
    s2 = np.zeros((len(ids), 4))
    for u in ups:  # row by row, in upload order
        for i, row in zip(u.item_ids, u.item_rows.astype(np.float64)):
            j = np.searchsorted(ids, i)
            s1[j] += row
            s2[j] += row * row
    expect_mean = s1 / len(ups)
    np.testing.assert_array_equal(mean, expect_mean)
    np.testing.assert_array_equal(std, np.sqrt(np.maximum(s2 / len(ups) - expect_mean ** 2, 0.0)))
    assert base._update_blocks([3, 5, 40, 2, 2], 8) == [[0, 1], [2], [3, 4]]


def test_dense_stats_of_updates_sending_the_same_ids_take_the_aligned_sums(monkeypatch):
    """Updates that all send the same sorted ids (dense tables) are summed array by array,
    without the index: the same bits as the indexed sums, which must not run."""
    import clients.malicious.base as base

    rng = np.random.default_rng(2)
    ids = np.array([0, 3, 4, 9, 11])
    ups = [upd(u, ids.copy(), (rng.normal(size=(5, 4)) * 10.0 ** rng.integers(-6, 6, size=(5, 1)))
               .astype(np.float32), pred=[rng.normal(size=3)]) for u in range(7)]
    _, pos = np.unique(np.concatenate([u.item_ids for u in ups]), return_inverse=True)
    expect = base._indexed_sums([u.item_rows for u in ups], pos, (5, 4))

    def refuse(*args):
        raise AssertionError("the indexed path ran for aligned updates")

    monkeypatch.setattr(base, "_indexed_sums", refuse)
    got_ids, mean, std, _ = base.dense_stats(ups)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(mean, expect[0] / 7)
    np.testing.assert_array_equal(std, np.sqrt(np.maximum(expect[1] / 7 - (expect[0] / 7) ** 2, 0.0)))
    ups[3].item_ids = np.array([0, 3, 4, 9, 12])  # one differs: the indexed path
    with pytest.raises(AssertionError, match="indexed path"):
        base.dense_stats(ups)
