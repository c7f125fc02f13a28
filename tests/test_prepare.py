"""Preprocessing: leave-one-out splits, k-core, duplicates, attacker pool, cache, fixed splits."""

import numpy as np
import pytest

from fedrec.data.prepare import PreparedData, cached_prepare, kcore, prepare
from fedrec.data.synthetic import generate_synthetic
from fedrec.data.types import SPLIT_TEST, SPLIT_TRAIN, Interactions
from fedrec.errors import ConfigError


def _hand_made():
    # raw user 10: items 100..103 at times 3,1,4,2 plus a later repeat of 101 (dropped)
    # raw user 20: two interactions only
    # raw user 30: times 5,5,1 (a tie: file order decides, 104 before 100)
    users = [10, 10, 10, 10, 20, 20, 30, 30, 30, 10]
    items = [100, 101, 102, 103, 101, 104, 104, 100, 102, 101]
    order = [3, 1, 4, 2, 1, 2, 5, 5, 1, 9]
    return Interactions(users, items, order=order, name="hand")


def test_time_split_last_is_test_second_to_last_is_val():
    d = prepare(_hand_made(), split="time", attacker_pool=0.0)
    assert d.split_kind == "time" and d.name == "hand"
    assert d.n_users == 3 and d.n_items == 5
    np.testing.assert_array_equal(d.user_raw_ids, [10, 20, 30])
    np.testing.assert_array_equal(d.item_raw_ids, [100, 101, 102, 103, 104])
    # user 10 (0): history 101, 103, 100, 102 -> test 102, val 100, train [101, 103]
    # user 20 (1): < 3 interactions -> all training, no held-out items
    # user 30 (2): history 102, 104, 100 -> test 100, val 104, train [102]
    np.testing.assert_array_equal(d.test_item, [2, -1, 0])
    np.testing.assert_array_equal(d.val_item, [0, -1, 4])
    np.testing.assert_array_equal(d.train_of(0), [1, 3])
    np.testing.assert_array_equal(d.train_of(1), [1, 4])
    np.testing.assert_array_equal(d.train_of(2), [2])
    np.testing.assert_array_equal(d.train_indptr, [0, 2, 4, 5])
    np.testing.assert_array_equal(d.item_popularity, [0, 2, 1, 1, 1])
    np.testing.assert_array_equal(d.eval_users("test"), [0, 2])
    np.testing.assert_array_equal(d.eval_users("val"), [0, 2])
    assert d.summary()["eval_users_test"] == 2 and d.summary()["train_interactions"] == 5


def test_auto_split_and_time_without_order():
    inter = _hand_made()
    assert prepare(inter, attacker_pool=0.0).split_kind == "time"
    no_order = Interactions(inter.users, inter.items)
    assert prepare(no_order, attacker_pool=0.0).split_kind == "random"
    with pytest.raises(ConfigError, match="order"):
        prepare(no_order, split="time")


def test_duplicates_dropped_keeping_first_in_history():
    inter = Interactions([1, 1, 1, 1, 1], [5, 6, 5, 7, 8], order=[0, 1, 2, 3, 4])
    d = prepare(inter, split="time", attacker_pool=0.0)
    # history 5, 6, 7, 8 (the second 5 is a duplicate) -> test 8, val 7, train [5, 6]
    assert len(d.train_items) == 2
    np.testing.assert_array_equal(d.train_of(0), [0, 1])
    assert d.val_item[0] == 2 and d.test_item[0] == 3


def _random_data():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(40), 10)
    items = np.concatenate([rng.choice(50, 10, replace=False) for _ in range(40)])
    return Interactions(users, items)


def test_random_split_seeded_and_distinct_holdouts():
    inter = _random_data()
    a = prepare(inter, split="random", attacker_pool=0.0, seed=1)
    b = prepare(inter, split="random", attacker_pool=0.0, seed=1)
    c = prepare(inter, split="random", attacker_pool=0.0, seed=2)
    assert a.split_kind == "random"
    np.testing.assert_array_equal(a.test_item, b.test_item)
    np.testing.assert_array_equal(a.val_item, b.val_item)
    np.testing.assert_array_equal(a.train_items, b.train_items)
    assert not np.array_equal(a.test_item, c.test_item)
    for d in (a, c):
        assert (d.test_item >= 0).all() and (d.val_item >= 0).all()
        assert (d.test_item != d.val_item).all()
        for user in range(d.n_users):
            raw = set(d.item_raw_ids[inter.items[inter.users == d.user_raw_ids[user]]])
            train = set(d.item_raw_ids[d.train_of(user)])
            held = {d.item_raw_ids[d.val_item[user]], d.item_raw_ids[d.test_item[user]]}
            assert len(d.train_of(user)) == 8 and train | held == raw and not train & held


def test_kcore_iterative_hand_computed():
    # u0: i0 i1 i2 | u1: i0 i1 | u2: i0 i3 | u3: i3 (three copies)
    users = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3, 3])
    items = np.array([0, 1, 2, 0, 1, 0, 3, 3, 3, 3])
    # pass 1 drops u3 (one distinct item) and i2 (one user); pass 2 drops u2-i3 (i3 now has
    # one user); pass 3 drops u2-i0 (u2 now has one item); what is left is u0, u1 x i0, i1
    keep = kcore(users, items, 2)
    np.testing.assert_array_equal(keep, [1, 1, 0, 1, 1, 0, 0, 0, 0, 0])
    assert kcore(users, items, 1).all() and kcore(users, items, 0).all()
    assert not kcore(users, items, 3).any()
    d = prepare(Interactions(users + 100, items + 200), kcore_k=2, attacker_pool=0.0)
    assert d.n_users == 2 and d.n_items == 2
    np.testing.assert_array_equal(d.user_raw_ids, [100, 101])
    np.testing.assert_array_equal(d.item_raw_ids, [200, 201])


def test_kcore_counts_distinct_pairs():
    # u1 has one distinct item repeated: with k=2 it must go, and then item 1 too
    keep = kcore(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 0, 1]), 2)
    np.testing.assert_array_equal(keep, [1, 1, 0, 0, 1, 1])


def test_attacker_pool_size_seeded_and_not_evaluated():
    inter = generate_synthetic(n_users=60, n_items=80, mean_history=10, seed=0)
    a = prepare(inter, seed=0)
    b = prepare(inter, seed=0)
    c = prepare(inter, seed=1)
    assert len(a.attacker_pool) == round(0.05 * 60) == 3
    np.testing.assert_array_equal(a.attacker_pool, b.attacker_pool)
    assert not np.array_equal(a.attacker_pool, c.attacker_pool)
    assert len(np.unique(a.attacker_pool)) == 3
    assert not set(a.attacker_pool) & set(a.eval_users("test"))
    assert not set(a.attacker_pool) & set(a.eval_users("val"))
    assert a.pool_mask.sum() == 3 and a.pool_mask[a.attacker_pool].all()
    # every non-pool user has >= 5 interactions here, so all of them are evaluated
    assert len(a.eval_users("test")) == 57
    assert len(prepare(inter, attacker_pool=0.2).attacker_pool) == 12
    assert len(prepare(inter, attacker_pool=0.0).attacker_pool) == 0


def test_cached_prepare_hits_cache(tmp_path):
    calls = []

    def loader():
        calls.append(1)
        return generate_synthetic(n_users=30, n_items=40, mean_history=8, seed=2)

    key = {"synthetic": {"n_users": 30, "seed": 2}}
    a = cached_prepare(key, tmp_path, loader, kcore_k=0, split="auto", attacker_pool=0.1, seed=0)
    b = cached_prepare(key, tmp_path, loader, kcore_k=0, split="auto", attacker_pool=0.1, seed=0)
    assert len(calls) == 1
    assert len(list(tmp_path.glob("prepared-*.npz"))) == 1
    for k in PreparedData._ARRAYS:
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    assert (a.n_users, a.n_items, a.split_kind, a.name) == (b.n_users, b.n_items, b.split_kind, b.name)
    # another preprocessing setting is another cache entry
    c = cached_prepare(key, tmp_path, loader, kcore_k=0, split="auto", attacker_pool=0.1, seed=1)
    assert len(calls) == 2 and not np.array_equal(a.attacker_pool, c.attacker_pool)
    # a torn cache file is rebuilt
    for f in tmp_path.glob("prepared-*.npz"):
        f.write_bytes(b"garbage")
    d = cached_prepare(key, tmp_path, loader, kcore_k=0, split="auto", attacker_pool=0.1, seed=0)
    assert len(calls) == 3
    np.testing.assert_array_equal(d.train_items, a.train_items)
    # no cache dir: always loads
    cached_prepare(key, "", loader, attacker_pool=0.1)
    assert len(calls) == 4


def test_fixed_split_keeps_test_and_carves_validation_from_train():
    T, R = SPLIT_TEST, SPLIT_TRAIN
    rows = [  # (user, item, split)
        (0, 0, R), (0, 1, R), (0, 2, R), (0, 3, T),  # test 3, val one of 0/1/2
        (1, 0, R), (1, 4, T),  # one training item: test 4, no validation
        (2, 1, R), (2, 2, R), (2, 3, T), (2, 0, T),  # two test rows: the first listed is the target
        (3, 2, T),  # no training item: not evaluated
    ]
    u, i, s = map(np.array, zip(*rows))
    inter = Interactions(u, i, fixed_split=s)
    d = prepare(inter, attacker_pool=0.0, seed=0)
    assert d.split_kind == "fixed"
    np.testing.assert_array_equal(d.test_item, [3, 4, 3, -1])
    assert d.val_item[0] in (0, 1, 2) and d.val_item[1] == -1 and d.val_item[2] in (1, 2)
    assert d.val_item[3] == -1
    assert sorted(d.train_of(0).tolist() + [d.val_item[0]]) == [0, 1, 2]
    np.testing.assert_array_equal(d.train_of(1), [0])
    assert sorted(d.train_of(2).tolist() + [d.val_item[2]]) == [1, 2]
    assert len(d.train_of(3)) == 0
    for user in range(4):  # test rows never leak into training
        assert 3 not in d.train_of(user) and 4 not in d.train_of(user)
    np.testing.assert_array_equal(d.eval_users("test"), [0, 1, 2])
    # validation draws are seeded
    vals = {tuple(prepare(inter, attacker_pool=0.0, seed=s).val_item) for s in range(8)}
    assert len(vals) > 1
    assert tuple(prepare(inter, attacker_pool=0.0, seed=0).val_item) == tuple(d.val_item)
