"""The honest client: what it uploads, what it keeps, determinism, negatives, evaluation."""

import numpy as np
import pytest

from clients.benign import BenignClient
from clients.cohort import fit_cohort
from clients.negatives import sample_negatives
from clients.state import DictStore
from clients.streams import ROUND as _ROUND
from fedrec.build import build_env, initial_arrays
from fedrec.config import from_dict



def _env(tmp_path, **over):
    raw = {"data": {"synthetic": {"n_users": 60, "n_items": 80, "mean_history": 12},
                    "cache_dir": str(tmp_path / "cache")},
           "model": {"dim": 8}, "train": {"weight_decay": 1e-3}}
    for k, v in over.items():
        if "__" in k:
            section, key = k.split("__")
            raw.setdefault(section, {})[key] = v
        else:
            raw[k] = v
    cfg = from_dict(raw)
    env = build_env(cfg)
    return env, initial_arrays(cfg, env.model)


def _client(env, user, store=None):
    return BenignClient(user, env, store or DictStore())


def _user_with(env, min_items=6):
    d = env.data
    return next(u for u in range(d.n_users) if len(d.train_of(u)) >= min_items and not d.pool_mask[u])


def test_upload_is_the_sparse_gradient_and_never_the_user_row(tmp_path):
    env, arrays = _env(tmp_path)
    user = _user_with(env)
    store = DictStore()
    c = _client(env, user, store)
    u0 = c.private_state()["user"].copy()  # the initial row (state not saved yet)
    up, n, metrics = c.fit(arrays, {"round": 1})
    state = store.state
    train = env.data.train_of(user)
    assert n == len(train) and np.isfinite(metrics["loss"])
    assert len(up) == 2 + len(env.model.predictor_shapes) == 2
    ids, rows = up
    np.testing.assert_array_equal(ids, np.unique(np.concatenate([train, state["negatives"]])))
    assert ids.dtype == np.int64 and rows.shape == (len(ids), 8) and rows.dtype == np.float32
    # exactly the model's gradient at the global model, with this round's generator
    g = env.model.gradients(arrays[0], [], u0, train, state["negatives"], c.stream(_ROUND, 1),
                            weight_decay=1e-3)
    assert np.array_equal(rows, g.item_rows)
    # the user row (before or after its update) is nowhere in the upload
    assert not np.array_equal(state["user"], u0)
    for vec in (u0, state["user"], g.user_grad):
        for a in up:
            assert a.shape != vec.shape or not np.allclose(a, vec)
        assert not np.any(np.all(np.isclose(rows, vec), axis=1))
    assert c.get_parameters({}) == []


def test_private_state_persists_across_fit_calls(tmp_path):
    env, arrays = _env(tmp_path)
    user = _user_with(env)
    store = DictStore()
    _client(env, user, store).fit(arrays, {"round": 1})
    s1 = {k: np.array(v, copy=True) for k, v in store.state.items()}
    assert list(s1["clock"]) == [1, 1] and np.abs(s1["m"]).sum() > 0
    # a new client object on the same store continues from the saved state
    _client(env, user, store).fit(arrays, {"round": 4})
    s2 = store.state
    assert list(s2["clock"]) == [4, 2]
    assert not np.array_equal(s1["user"], s2["user"])
    assert np.array_equal(s1["negatives"], s2["negatives"])
    # a fresh store starts over: same initial row, so round 1 gives the same state as before
    other = DictStore()
    _client(env, user, other).fit(arrays, {"round": 1})
    assert np.array_equal(other.state["user"], s1["user"])


def test_same_seed_same_upload_different_seed_differs(tmp_path):
    env, arrays = _env(tmp_path)
    user = _user_with(env)
    a = _client(env, user).fit(arrays, {"round": 2})[0]
    b = _client(env, user).fit(arrays, {"round": 2})[0]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = _client(env, user).fit(arrays, {"round": 3})[0]  # another round: other dropout masks
    assert not np.array_equal(a[1], c[1])
    env1, _ = _env(tmp_path, seed=1)  # same training data; same global model handed in
    np.testing.assert_array_equal(env1.data.train_items, env.data.train_items)
    d = _client(env1, user).fit(arrays, {"round": 2})[0]
    assert not (np.array_equal(d[0], a[0]) and np.array_equal(d[1], a[1]))


def test_cohort_fit_equals_single_fit_bit_for_bit(tmp_path):
    env, arrays = _env(tmp_path)
    users = [u for u in range(12) if len(env.data.train_of(u))]
    single = [_client(env, u).fit(arrays, {"round": 5}) for u in users]
    cohort = fit_cohort([_client(env, u) for u in users], arrays, {"round": 5})
    for (up1, n1, m1), (up2, n2, m2) in zip(single, cohort):
        assert n1 == n2 and m1 == m2
        assert all(np.array_equal(x, y) for x, y in zip(up1, up2))


def test_static_negatives(tmp_path):
    env, arrays = _env(tmp_path)
    for user in range(20):
        store = DictStore()
        c = _client(env, user, store)
        if not len(c.train_items):
            continue
        up1 = c.fit(arrays, {"round": 1})[0]
        neg1 = store.state["negatives"].copy()
        up2 = c.fit(arrays, {"round": 2})[0]
        train = set(env.data.train_of(user).tolist())
        assert len(neg1) == len(train) and not set(neg1.tolist()) & train
        assert np.array_equal(store.state["negatives"], neg1)
        np.testing.assert_array_equal(up1[0], up2[0])  # same pairs, so the same touched rows
        assert neg1.min() >= 0 and neg1.max() < env.data.n_items


def test_fresh_negatives_change_per_round(tmp_path):
    env, arrays = _env(tmp_path, data__negatives="fresh", data__neg_ratio=2)
    user = _user_with(env, 8)
    store = DictStore()
    c = _client(env, user, store)
    train = env.data.train_of(user)
    negs = []
    for rnd in (1, 2, 3):
        state = c.private_state()
        assert "negatives" not in state
        pos, neg = c.training_pairs(state, c.stream(_ROUND, rnd))
        np.testing.assert_array_equal(pos, np.repeat(train, 2))
        assert len(neg) == 2 * len(train) and not set(neg.tolist()) & set(train.tolist())
        negs.append(neg)
        up = c.fit(arrays, {"round": rnd})[0]
        np.testing.assert_array_equal(up[0], np.unique(np.concatenate([train, neg])))
    assert not np.array_equal(negs[0], negs[1]) and not np.array_equal(negs[1], negs[2])


def test_sample_negatives_excludes():
    rng = np.random.default_rng(0)
    excl = np.array([0, 1, 2, 5, 9])
    out = sample_negatives(rng, 10, excl, 500)
    assert len(out) == 500 and set(out.tolist()) == {3, 4, 6, 7, 8}
    assert set(sample_negatives(rng, 3, np.array([], np.int64), 50).tolist()) == {0, 1, 2}
    with pytest.raises(ValueError):
        sample_negatives(rng, 3, np.array([0, 1, 2]), 1)


def test_evaluate_pool_users_and_hand_ranked(tmp_path):
    env, arrays = _env(tmp_path)
    d = env.data
    for user in d.attacker_pool:
        assert _client(env, int(user)).evaluate(arrays, {"round": 0}) == (0.0, 0, {})
    user = int(d.eval_users("test")[0])
    c = _client(env, user)
    loss, n, m = c.evaluate(arrays, {"round": 0})
    assert n == 1 and set(m) == {f"{s}_{k}@{K}" for s in ("val", "test") for k in ("hr", "ndcg")
                                 for K in (5, 10, 20)}
    scores = arrays[0].astype(np.float64) @ c.private_state()["user"].astype(np.float64)
    train = set(d.train_of(user).tolist())
    for split, target, masked in (("val", d.val_item[user], train),
                                  ("test", d.test_item[user], train | {d.val_item[user]})):
        rank = sum(1 for i in range(d.n_items) if i not in masked and scores[i] > scores[target])
        for K in (5, 10, 20):
            assert m[f"{split}_hr@{K}"] == float(rank < K)
            assert m[f"{split}_ndcg@{K}"] == pytest.approx((rank < K) / np.log2(rank + 2))
    # a malicious subclass never reports metrics
    evil = type("Evil", (BenignClient,), {"is_malicious": True})(user, env, DictStore())
    assert evil.evaluate(arrays, {"round": 0})[1] == 0


def test_local_epochs_upload_is_pseudo_gradient(tmp_path):
    lr = 0.05
    env, arrays = _env(tmp_path, train__local_epochs=1, train__local_lr=lr, train__batch_size=512)
    user = _user_with(env)
    store = DictStore()
    c = _client(env, user, store)
    u0 = c.private_state()["user"].copy()
    up, n, _ = c.fit(arrays, {"round": 1})
    state = store.state
    pos, neg = env.data.train_of(user), state["negatives"]
    # replay: one epoch, one batch (batch_size > pairs) in the client's shuffled order
    rng = c.stream(_ROUND, 1)
    order = rng.permutation(len(pos))
    g = env.model.gradients(arrays[0], [], u0, pos[order], neg[order], rng, weight_decay=1e-3)
    local = arrays[0].copy()
    local[g.item_ids] -= lr * g.item_rows
    np.testing.assert_array_equal(up[0], g.item_ids)
    np.testing.assert_array_equal(up[1], ((arrays[0][g.item_ids] - local[g.item_ids]) / lr).astype(np.float32))
    np.testing.assert_allclose(up[1], g.item_rows, rtol=2e-2, atol=1e-6)  # one SGD step: the gradient
    assert n == len(pos)
    np.testing.assert_allclose(state["user"], u0 - lr * g.user_grad, rtol=1e-6)
    assert list(state["clock"]) == [1, 1]
    # the global table handed in is untouched
    assert not np.shares_memory(local, arrays[0])


@pytest.mark.parametrize("negatives", ["fresh", "static"])
def test_cohort_fit_equals_one_by_one(tmp_path, negatives):
    """The in-process runner's cohort path gives every client exactly its single-client result
    (uploads and private state), over several rounds: the basis of engine == Flower."""
    env, arrays = _env(tmp_path, data__negatives=negatives, model__dropout=0.2)
    users = [u for u in range(env.data.n_users) if not env.data.pool_mask[u]][:12]
    solo = {u: _client(env, u) for u in users}
    group = {u: _client(env, u) for u in users}
    for rnd in (1, 2, 5):
        chosen = users[rnd % 3::2]
        outs = fit_cohort([group[u] for u in chosen], arrays, {"round": rnd})
        for u, (up, n, m) in zip(chosen, outs):
            up1, n1, m1 = solo[u].fit(arrays, {"round": rnd})
            assert n == n1 and m == m1
            assert all(np.array_equal(a, b) for a, b in zip(up, up1))
            s, s1 = group[u].store.state, solo[u].store.state
            assert all(np.array_equal(s[k], s1[k]) for k in s1)


def test_cohort_negatives_equal_per_client_even_when_a_draw_falls_short(tmp_path):
    from clients.negatives import sample_negatives_cohort

    # few items and long histories: the first draw often accepts too few candidates
    env, _ = _env(tmp_path, data__synthetic={"n_users": 40, "n_items": 30, "mean_history": 14})
    users = [u for u in range(env.data.n_users) if len(env.data.train_of(u)) >= 8][:10]
    a = [_client(env, u) for u in users]
    b = [_client(env, u) for u in users]
    counts = [c.negatives_count() for c in a]
    got = sample_negatives_cohort(a, [c.stream(_ROUND, 4) for c in a], counts)
    for c, neg in zip(b, got):
        expect = c.draw_negatives(c.stream(_ROUND, 4))
        assert np.array_equal(neg, expect)
        assert not np.isin(neg, c.known_sorted).any()


def test_sum_reduction_scales_the_mean_gradient_by_the_pair_count(tmp_path):
    from clients.state import DictStore
    from conftest import tiny_cfg
    from fedrec.build import build_client, build_env, initial_arrays

    out = {}
    for red in ("mean", "sum"):
        cfg = tiny_cfg(tmp_path, train__loss_reduction=red)
        env = build_env(cfg)
        c = build_client(env, 3, DictStore())
        out[red] = c.fit(initial_arrays(cfg, env.model), {"round": 1})
    (m, n, _), (s, n2, _) = out["mean"], out["sum"]
    assert n == n2 > 1
    np.testing.assert_array_equal(m[0], s[0])
    np.testing.assert_allclose(s[1], m[1] * np.float32(n), rtol=1e-6)


@pytest.mark.parametrize("high", [3706, 7, (1 << 31) + 1, (1 << 32) - 1])
def test_fresh_integers_equal_generator_integers_and_leave_the_same_state(high):
    """The cohort's vectorised bounded draws: the numbers of Generator.integers and the same
    generator state after (raw word count, 32-bit buffer), for odd and even sizes; a high
    near 2**31 makes Lemire's method reject about half its draws (the rewind-and-redraw
    path); other bit generators go to integers itself."""
    from clients.negatives import fresh_integers

    sizes = [1, 2, 7, 200, 201, 0, 33]
    for seed in range(6):
        def gens(kind=np.random.PCG64):
            out = []
            for j in range(len(sizes)):
                bg = kind(seed * 100 + j)
                if kind is np.random.PCG64:
                    bg.advance((seed + 1) << 70)  # as clients.streams does
                out.append(np.random.Generator(bg))
            return out
        for kind in (np.random.PCG64, np.random.Philox):
            a, b = gens(kind), gens(kind)
            got = fresh_integers(a, high, sizes)
            ref = [r.integers(0, high, size=d) for r, d in zip(b, sizes)]
            for x, y, ra, rb in zip(got, ref, a, b):
                assert x.dtype == y.dtype and np.array_equal(x, y)
                sa, sb = ra.bit_generator.state, rb.bit_generator.state
                if kind is np.random.PCG64:  # a stale high half is kept but never read
                    assert sa["state"] == sb["state"] and sa["has_uint32"] == sb["has_uint32"]
                    assert not sa["has_uint32"] or sa["uinteger"] == sb["uinteger"]
                else:
                    assert repr(sa) == repr(sb)
                assert np.array_equal(ra.integers(0, 1000, size=3), rb.integers(0, 1000, size=3))
