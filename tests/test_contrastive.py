"""UNION's client side: the contrastive term in benign uploads."""

import numpy as np
import pytest

from conftest import tiny_cfg


def _fit(cfg, users, cohort):
    from clients.cohort import fit_cohort
    from clients.state import DictStore
    from fedrec.build import build_client, build_env, initial_arrays

    env = build_env(cfg)
    arrays = initial_arrays(cfg, env.model)
    clients = [build_client(env, u, DictStore()) for u in users]
    if cohort:
        return fit_cohort(clients, arrays, {"round": 3}), env, arrays
    return [c.fit(arrays, {"round": 3}) for c in clients], env, arrays


def test_contrastive_term_adds_exactly_alpha_times_its_gradient(tmp_path):
    from clients.streams import CONTRASTIVE as _CONTRASTIVE
    from fedrec.models.losses import contrastive_grad, contrastive_samples

    base, env, arrays = _fit(tiny_cfg(tmp_path), [4], cohort=False)
    cl, _, _ = _fit(tiny_cfg(tmp_path, train__contrastive_alpha=0.5), [4], cohort=False)
    (b_up, bn, bm), (c_up, cn, cm) = base[0], cl[0]
    assert bn == cn and cm["loss"] > bm["loss"]
    # rebuild the expected rows: BPR rows + 0.5 * contrastive rows on the union of ids
    from clients.state import DictStore
    from fedrec.build import build_client

    c = build_client(env, 4, DictStore())
    s = contrastive_samples(c.train_items, env.model.n_items, c.exclusion_mask(), 15,
                            c.stream(_CONTRASTIVE, 3))
    ids, rows, _ = contrastive_grad(arrays[0], *s)
    want = {int(i): r.copy() for i, r in zip(b_up[0], b_up[1])}
    for i, r in zip(ids, rows):
        want[int(i)] = want.get(int(i), np.zeros_like(r)) + np.float32(0.5) * r
    assert np.array_equal(c_up[0], np.array(sorted(want)))
    np.testing.assert_allclose(c_up[1], np.stack([want[i] for i in sorted(want)]), rtol=1e-6, atol=1e-8)
    assert len(c_up[0]) > len(b_up[0])  # the negatives' rows are uploaded too


@pytest.mark.parametrize("scope", ["touched", "all"])  # all: dense uploads, summed in place
def test_contrastive_uploads_do_not_depend_on_the_cohort(tmp_path, scope):
    cfg = tiny_cfg(tmp_path, train__contrastive_alpha=1.0, train__weight_decay=1e-2,
                   train__weight_decay_scope=scope)
    one, env, _ = _fit(cfg, [1, 2, 3, 5], cohort=False)
    many, _, _ = _fit(cfg, [1, 2, 3, 5], cohort=True)
    for (a, _, ma), (b, _, mb) in zip(one, many):
        assert ma == mb  # the loss too, bit for bit
        for x, y in zip(a, b):
            assert np.array_equal(x, y) and np.array_equal(np.signbit(x), np.signbit(y))
    if scope == "all":
        assert all(len(up[0]) == env.model.n_items for up, _, _ in many)


@pytest.mark.parametrize("block", [2048, 16])  # 16: users in several blocks
def test_contrastive_grads_of_a_cohort_equal_each_users_alone(monkeypatch, block):
    """Users of 0, 1, 2 and many anchors, concatenated: each user's ids, rows and loss bit
    for bit those of `contrastive_grad` on its samples alone."""
    from fedrec.models import losses
    from fedrec.models.losses import contrastive_grad, contrastive_grads, contrastive_samples

    monkeypatch.setattr(losses, "CONTRASTIVE_BLOCK", block)

    rng = np.random.default_rng(3)
    n_items = 300
    table = rng.standard_normal((n_items, 8)).astype(np.float32)
    samples = []
    for k in (5, 0, 1, 2, 120, 40):
        items = rng.choice(n_items, k, replace=False)
        known = np.zeros(n_items, bool)
        known[items] = True
        samples.append(contrastive_samples(items, n_items, known, 7, rng))
    parts = [np.concatenate(p) for p in zip(*samples)]
    together = contrastive_grads(table, *parts, [len(s[0]) for s in samples])
    for s, (ids, rows, loss) in zip(samples, together):
        a_ids, a_rows, a_loss = contrastive_grad(table, *s)
        if len(s[0]):  # and the plain formula: rows concatenated, summed per id in order
            r_ids, r_rows, r_loss = _reference_grad(table, *s)
            assert np.array_equal(a_ids, r_ids) and np.array_equal(a_rows, r_rows)
            assert a_loss == r_loss
        assert np.array_equal(ids, a_ids) and ids.dtype == a_ids.dtype
        assert np.array_equal(rows, a_rows) and rows.dtype == np.float32 and loss == a_loss


def _reference_grad(table, anchors, positives, negatives):
    """L_cl's gradient of one user, written plainly: every touched row's contribution in the
    order anchors, positives, negatives, added from 0 per id (np.add.at: sequential)."""
    L = len(anchors)
    A, X = table[anchors], table[np.concatenate([positives[:, None], negatives], 1)]
    z = np.matmul(X, A[:, :, None])[:, :, 0]
    z -= z.max(1, keepdims=True)
    s = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    loss = float(-np.log(np.maximum(s[:, 0].astype(np.float64), 1e-300)).mean())
    s[:, 0] -= 1.0
    s /= L
    dX = s[:, :, None] * A[:, None, :]
    ids = np.concatenate([anchors, positives, negatives.ravel()])
    rows = np.concatenate([np.matmul(s[:, None, :], X)[:, 0], dX[:, 0],
                           dX[:, 1:].reshape(-1, table.shape[1])]).astype(np.float32)
    uniq, inv = np.unique(ids, return_inverse=True)
    out = np.zeros((len(uniq), table.shape[1]), np.float32)
    np.add.at(out, inv, rows)
    return uniq, out, loss


def test_added_rows_is_zero_plus_rows_plus_extra_bit_for_bit():
    """The union and sums of added_rows: on the sorted union of the ids, 0 + rows, then
    + extra_rows, per element, whatever the order it adds them in (signed zeros, tiny and
    overflowing values included)."""
    from clients.contrastive import added_rows

    rng = np.random.default_rng(1)
    values = np.array([0.0, -0.0, 1.5, -2.25, 1e-30, -1e-30, 3e38], np.float32)
    for _ in range(200):
        n = int(rng.integers(5, 60))
        ids = np.sort(rng.choice(n, int(rng.integers(0, n)), replace=False))
        extra = np.sort(rng.choice(n, int(rng.integers(0, n)), replace=False))
        rows, extra_rows = rng.choice(values, (len(ids), 3)), rng.choice(values, (len(extra), 3))
        union = np.union1d(ids, extra)
        expect = np.zeros((len(union), 3), np.float32)
        with np.errstate(over="ignore"):
            expect[np.searchsorted(union, ids)] += rows
            expect[np.searchsorted(union, extra)] += extra_rows
            got_ids, got = added_rows(ids, rows, extra, extra_rows, n)
        np.testing.assert_array_equal(got_ids, union)
        assert got.tobytes() == expect.tobytes()
