"""Fixed splits kept whole (data.fixed_test: all): every test item held out and evaluated."""

import numpy as np
import pytest

from fedrec.data.prepare import PreparedData, prepare
from fedrec.data.types import SPLIT_TEST, SPLIT_TRAIN, Interactions
from fedrec.evaluation import (evaluate_users, multi_target_metrics, per_user_metrics,
                               ranks_of_targets, user_metrics)
from fedrec.models.mf import MF


def test_multi_target_metrics_by_hand():
    scores = np.array([[9.0, 8.0, 7.0, 6.0, 5.0, 4.0],
                       [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    # row 0 holds out items 1 and 4; item 0 is masked -> ranks 0 and 3
    # row 1 holds out item 0 only -> rank 5
    res = multi_target_metrics(scores, np.array([2, 1]), np.array([1, 4, 0]),
                               np.array([0]), np.array([0]), [1, 2, 5])
    np.testing.assert_array_equal(res["hr@1"], [1, 0])
    np.testing.assert_array_equal(res["hr@5"], [1, 0])
    idcg2 = 1 + 1 / np.log2(3)
    assert res["ndcg@1"][0] == 1.0  # IDCG over min(K, n) = 1 item
    assert res["ndcg@2"][0] == pytest.approx(1 / idcg2)
    assert res["ndcg@5"][0] == pytest.approx((1 + 1 / np.log2(5)) / idcg2)
    assert res["ndcg@5"][1] == 0.0


def test_one_held_out_item_gives_the_leave_one_out_numbers_exactly():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((30, 40))
    scores[::3] = np.round(scores[::3])  # ties in every third row: the same tie rule in both
    targets = rng.integers(0, 40, 30)
    rows, cols = np.repeat(np.arange(30), 3), rng.integers(0, 40, 90)
    keep = cols != targets[rows]
    ref = per_user_metrics(ranks_of_targets(scores, targets, rows[keep], cols[keep]), [5, 10])
    multi = multi_target_metrics(scores, np.ones(30, np.int64), targets, rows[keep], cols[keep],
                                 [5, 10])
    masked = [cols[keep][rows[keep] == r] for r in range(30)]
    via_user = user_metrics(scores, [[t] for t in targets], masked, [5, 10])
    for k in ref:
        assert np.array_equal(ref[k], multi[k]) and np.array_equal(ref[k], via_user[k])


def test_several_held_out_items_earn_nothing_from_tied_scores():
    """Ties count against each held-out item (as in ranks_of_targets): flat scores give no
    hit, and a tie with a masked item does not count."""
    res = multi_target_metrics(np.zeros((2, 6)), np.array([2, 1]), np.array([1, 4, 0]),
                               [], [], [2])
    np.testing.assert_array_equal(res["hr@2"], [0, 0])
    res = multi_target_metrics(np.array([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]]), np.array([2]),
                               np.array([0, 1]), np.array([0, 0]), np.array([2, 3]), [1, 2])
    np.testing.assert_array_equal(res["hr@1"], [0])  # items 0 and 1 tie with each other
    np.testing.assert_array_equal(res["hr@2"], [1])  # each ranks 1: the masked ties not counted


def _fixed():
    T, R = SPLIT_TEST, SPLIT_TRAIN
    rows = [(0, 0, R), (0, 1, R), (0, 2, R), (0, 3, T), (0, 5, T),
            (1, 0, R), (1, 4, T),
            (2, 1, R), (2, 2, R), (2, 3, T), (2, 0, T), (2, 5, T),
            (3, 2, T)]  # no training item: not evaluated
    u, i, s = map(np.array, zip(*rows))
    return Interactions(u, i, fixed_split=s)


def test_prepare_keeps_every_test_item_when_asked():
    first = prepare(_fixed(), attacker_pool=0.0, seed=0)
    allt = prepare(_fixed(), attacker_pool=0.0, seed=0, fixed_test="all")
    assert first.test_indptr is None and allt.test_indptr is not None
    for name in ("train_items", "train_indptr", "val_item", "test_item"):
        assert np.array_equal(getattr(first, name), getattr(allt, name))  # only the CSR is new
    assert [allt.test_of(u).tolist() for u in range(4)] == [[3, 5], [4], [3, 0, 5], []]
    assert [first.test_of(u).tolist() for u in range(4)] == [[3], [4], [3], []]


def test_evaluate_users_with_several_test_items(tmp_path):
    d = prepare(_fixed(), attacker_pool=0.0, seed=0, fixed_test="all")
    d.save(tmp_path / "d.npz")
    d = PreparedData.load(tmp_path / "d.npz")  # the CSR survives the cache
    model = MF(d.n_items, 1)
    table = np.arange(d.n_items, 0, -1, dtype=np.float32)[:, None]  # item 0 scores highest
    users = np.array([0, 1, 2])
    res = evaluate_users(model, table, [], np.ones((3, 1), np.float32), users, d, "test", [1, 3])
    # user 0: items 0,1,2 masked (train + val); ranking 3,4,5 -> test 3 at 0, 5 at 2
    assert res["per_user"]["hr@1"][0] == 1.0
    assert res["per_user"]["ndcg@3"][0] == pytest.approx((1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3)))
    # user 1: item 0 masked, test 4 ranks below 1, 2, 3 -> rank 3: no hit at 3
    assert res["per_user"]["hr@3"][1] == 0.0
    assert "ranks" not in res and res["hr@3"] == pytest.approx(res["per_user"]["hr@3"].mean())
