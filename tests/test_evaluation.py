"""Full-ranking evaluation: ranks, HR/NDCG, masking, and engine vs per-client agreement."""

import numpy as np
import pytest

from fedrec.config import from_dict
from fedrec.data.prepare import PreparedData
from fedrec.engine import Engine
from fedrec.evaluation import (detection_metrics, evaluate_users, metrics_from_ranks,
                               per_user_metrics, ranks_of_targets)
from fedrec.models.mf import MF


def test_ranks_of_targets_hand_made():
    scores = np.array([[0.5, 0.9, 0.1, 0.9, 0.5],
                       [1.0, 2.0, 3.0, 4.0, 5.0]])
    targets = np.array([0, 2])
    # row 0: item 1 masked; item 3 is higher; item 4 ties (counted against the target) -> 2
    # row 1: items 3, 4 masked -> nothing higher -> rank 0
    ranks = ranks_of_targets(scores, targets, np.array([0, 1, 1]), np.array([1, 3, 4]))
    np.testing.assert_array_equal(ranks, [2, 0])
    np.testing.assert_array_equal(ranks_of_targets(scores, targets, [], []), [3, 2])
    assert scores[0, 1] == 0.9  # the input is not modified


def test_ties_count_against_the_target():
    """A model that scores every item alike earns no hit (an optimistic tie rule gave a
    diverged NCF whose tanh units saturate HR@10 = 0.97 on ML-1M), and a tie with a masked
    item does not count."""
    n = 50
    flat = np.zeros((3, n), np.float32)
    ranks = ranks_of_targets(flat, np.array([0, 7, 49]), [], [])
    np.testing.assert_array_equal(ranks, [n - 1] * 3)
    assert metrics_from_ranks(ranks, [10])["hr@10"] == 0.0
    # masked ties do not count; an unmasked tie does
    scores = np.array([[1.0, 1.0, 1.0, 0.0]])
    assert ranks_of_targets(scores, np.array([0]), [0, 0], [1, 2])[0] == 0
    assert ranks_of_targets(scores, np.array([0]), [0], [1])[0] == 1
    # slow, obvious loop on random scores with many ties
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, size=(20, 12)).astype(np.float32)
    t = rng.integers(0, 12, size=20)
    mask = rng.random((20, 12)) < 0.3
    mask[np.arange(20), t] = False
    mr, mc = np.nonzero(mask)
    expect = [sum(1 for j in range(12) if j != t[b] and not mask[b, j] and s[b, j] >= s[b, t[b]])
              for b in range(20)]
    np.testing.assert_array_equal(ranks_of_targets(s, t, mr, mc), expect)


def test_nan_scores_never_rank_first():
    scores = np.array([[np.nan, 1.0, 2.0, 0.0], [0.5, np.nan, 0.1, 0.2]])
    ranks = ranks_of_targets(scores, np.array([0, 0]), [], [])
    assert ranks[0] == 3  # a NaN target ranks last: a miss at every K below the item count
    assert ranks[1] == 1  # a NaN competitor counts as higher
    assert metrics_from_ranks(ranks[:1], [1, 3])["hr@3"] == 0.0


def test_hr_ndcg_hand_computed():
    ranks = np.array([0, 2, 5, 9])
    m = metrics_from_ranks(ranks, [1, 5, 10])
    assert m["hr@1"] == 0.25 and m["ndcg@1"] == 0.25
    assert m["hr@5"] == 0.5
    assert m["ndcg@5"] == pytest.approx((1.0 + 0.5) / 4)  # rank 0 -> 1, rank 2 -> 1/log2(4)
    assert m["hr@10"] == 1.0
    assert m["ndcg@10"] == pytest.approx((1 + 0.5 + 1 / np.log2(7) + 1 / np.log2(11)) / 4)
    per = per_user_metrics(ranks, [5])
    np.testing.assert_array_equal(per["hr@5"], [1, 1, 0, 0])
    np.testing.assert_allclose(per["ndcg@5"], [1, 0.5, 0, 0])
    assert metrics_from_ranks(np.array([], np.int64), [5]) == {"hr@5": 0.0, "ndcg@5": 0.0}


def _tiny_data():
    # user 0: train [0, 1], val 2, test 3; user 1: train [4], no val, test 0
    return PreparedData(
        n_users=2, n_items=5, train_indptr=np.array([0, 2, 3]), train_items=np.array([0, 1, 4]),
        val_item=np.array([2, -1]), test_item=np.array([3, 0]), attacker_pool=np.zeros(0, np.int64),
        item_popularity=np.array([1, 1, 0, 0, 1]), split_kind="time")


def test_evaluate_users_masks_training_and_validation_items():
    data = _tiny_data()
    model = MF(5, 1)
    table = np.array([[5.0], [4.0], [3.0], [2.0], [1.0]], np.float32)  # score = u * v
    vecs = np.array([[1.0], [-1.0]], np.float32)
    users = np.array([0, 1])
    # user 0, test: items 0, 1 (train) and 2 (val) masked -> rank 0 (else 3)
    # user 1, test (scores -5..-1): item 4 masked; items 1, 2, 3 are higher -> rank 3
    for batch in (1, 2, 1024):
        res = evaluate_users(model, table, [], vecs, users, data, "test", [1, 5], batch)
        np.testing.assert_array_equal(res["ranks"], [0, 3])
        assert res["hr@1"] == 0.5 and res["hr@5"] == 1.0
        assert res["ndcg@5"] == pytest.approx((1 + 1 / np.log2(5)) / 2)
    # user 0, val: items 0, 1 masked (item 2 is the target) -> rank 0; test item 3 is not masked
    res = evaluate_users(model, table, [], vecs[:1], users[:1], data, "val", [1])
    np.testing.assert_array_equal(res["ranks"], [0])
    vecs0 = np.array([[-1.0]], np.float32)  # reversed: items 3 (-2) and 4 (-1) are higher than 2 (-3)
    res = evaluate_users(model, table, [], vecs0, users[:1], data, "val", [1])
    np.testing.assert_array_equal(res["ranks"], [2])


def test_evaluate_users_without_history_masks_ranks_among_all_items():
    """eval.mask_history false (FedAttack's protocol): user 0's test item 3 (score 2) now
    ranks below its training items 0, 1 and validation item 2 -> rank 3; user 1's item 0
    (score -5) below items 1-4, its training item 4 included -> rank 4 (3 when masked)."""
    data = _tiny_data()
    table = np.array([[5.0], [4.0], [3.0], [2.0], [1.0]], np.float32)
    vecs = np.array([[1.0], [-1.0]], np.float32)
    res = evaluate_users(MF(5, 1), table, [], vecs, np.array([0, 1]), data, "test", [1, 5],
                         mask_history=False)
    np.testing.assert_array_equal(res["ranks"], [3, 4])
    assert res["hr@1"] == 0.0 and res["hr@5"] == 1.0


@pytest.mark.parametrize("mask_history", [True, False])
def test_engine_and_clients_agree_with_and_without_history_masks(tmp_path, mask_history):
    cfg = from_dict({
        "data": {"synthetic": {"n_users": 40, "n_items": 50, "mean_history": 10},
                 "cache_dir": str(tmp_path)},
        "model": {"dim": 8}, "train": {"rounds": 2, "clients_per_round": 10},
        "server": {"lr": 0.05}, "eval": {"mask_history": mask_history}, "output": {"progress": False},
    })
    engine = Engine(cfg, progress=False)
    engine.run()
    out = engine.evaluate(3, final=False)
    arrays = engine.strategy.global_arrays()
    per_client = [m for user in range(40)
                  for _, n, m in [engine.client(user).evaluate(arrays, {"round": 3})] if n]
    assert engine.strategy.evaluate_results(3, per_client) == out
    if not mask_history:  # fewer hits than with the history masked (the history ranks high)
        masked = Engine(from_dict({**cfg.to_dict(), "eval": {"mask_history": True}}), progress=False)
        masked.run()
        assert out["test_hr@20"] <= masked.evaluate(3, final=False)["test_hr@20"]
        assert cfg.digest() != masked.cfg.digest()


def test_detection_metrics():
    m = detection_metrics([1, 2, 3, 4], [3, 4, 5])
    assert m["tp"] == 2 and m["precision"] == 0.5 and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert detection_metrics([], [])["precision"] == 1.0 and detection_metrics([], [1])["recall"] == 0.0


def test_engine_evaluate_equals_mean_of_client_evaluate(tmp_path):
    cfg = from_dict({
        "data": {"synthetic": {"n_users": 60, "n_items": 80, "mean_history": 12},
                 "cache_dir": str(tmp_path)},
        "model": {"dim": 8}, "train": {"rounds": 3, "clients_per_round": 20},
        "server": {"lr": 0.01}, "eval": {"batch_users": 16}, "output": {"progress": False},
    })
    engine = Engine(cfg, progress=False)
    engine.run()
    rnd = 5  # later than the last round: every user's row catches up on momentum
    out = engine.evaluate(rnd, final=False)
    arrays = engine.strategy.global_arrays()
    per_client = []
    for user in range(engine.env.data.n_users):
        _, n, m = engine.client(user).evaluate(arrays, {"round": rnd})
        if n:
            per_client.append(m)
    assert len(per_client) == 57  # 60 users less the 3 in the attacker pool
    fed = engine.strategy.evaluate_results(rnd, per_client)
    assert fed == out
    assert out["test_users"] == 57 and 0 < out["test_hr@20"] < 1


def test_detection_tracker_scores_drops_per_round_and_overall():
    from fedrec.evaluation import DetectionTracker

    t = DetectionTracker(malicious=[3, 7, 9])
    r1 = t.update(users=[1, 3, 5, 7], dropped=[3, 5])  # tp 1 (3), fp 1 (5), fn 1 (7)
    assert (r1["det_tp"], r1["det_fp"], r1["det_fn"]) == (1, 1, 1)
    assert r1["det_precision"] == 0.5 and r1["det_recall"] == 0.5 and r1["det_f1"] == 0.5
    r2 = t.update(users=[2, 4], dropped=[])  # nothing malicious, nothing dropped: undefined
    assert "det_precision" not in r2 and "det_recall" not in r2
    r3 = t.update(users=[9, 4], dropped=[9, 11])  # 11 was not in the round: ignored
    assert (r3["det_tp"], r3["det_fp"], r3["det_fn"]) == (1, 0, 0)
    s = t.summary()
    assert (s["tp"], s["fp"], s["fn"], s["rounds"]) == (2, 1, 1, 3)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
