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


def test_contrastive_dropout_gradient_matches_autograd_with_the_same_masks():
    """With keep-masks, the gradient is that of the loss on the dropped-out rows (each
    looked-up row times keep / (1 - p)), as torch's autograd computes it; no masks = p 0."""
    import torch

    from fedrec.models.losses import contrastive_grad, contrastive_samples

    rng = np.random.default_rng(5)
    n_items, dim, p = 40, 6, 0.2
    table = rng.standard_normal((n_items, dim)).astype(np.float32)
    items = rng.choice(n_items, 9, replace=False)
    known = np.zeros(n_items, bool)
    known[items] = True
    anchors, positives, negatives = contrastive_samples(items, n_items, known, 5, rng)
    keep = rng.random((len(anchors), 2 + 5, dim)) >= p
    ids, rows, loss = contrastive_grad(table, anchors, positives, negatives, keep, p)

    t = torch.tensor(table, dtype=torch.float64, requires_grad=True)
    m = torch.tensor(keep, dtype=torch.float64) / (1 - p)
    looked = t[torch.tensor(np.concatenate([anchors[:, None], positives[:, None], negatives], 1))]
    dropped = looked * m  # (L, 2 + P, dim)
    scores = torch.einsum("lkd,ld->lk", dropped[:, 1:], dropped[:, 0])
    ce = torch.nn.functional.cross_entropy(scores, torch.zeros(len(anchors), dtype=torch.long))
    ce.backward()
    want = t.grad.numpy()
    assert np.array_equal(ids, np.unique(np.concatenate([anchors, positives, negatives.ravel()])))
    assert not np.delete(want, ids, axis=0).any()  # no other row has a gradient
    np.testing.assert_allclose(rows, want[ids], rtol=2e-5, atol=1e-6)
    assert abs(loss - float(ce.detach())) < 1e-5
    # a dropped coordinate gets no gradient through that lookup: all dropped -> all zero
    _, zero_rows, _ = contrastive_grad(table, anchors, positives, negatives,
                                       np.zeros_like(keep), p)
    assert not zero_rows.any()
    # keep everything at p = 0: the plain gradient, bit for bit
    plain = contrastive_grad(table, anchors, positives, negatives)
    ones = contrastive_grad(table, anchors, positives, negatives, np.ones_like(keep), 0.0)
    assert np.array_equal(plain[1], ones[1]) and plain[2] == ones[2]


def test_contrastive_dropout_uploads_do_not_depend_on_the_cohort_and_differ_from_none(tmp_path):
    cfg = tiny_cfg(tmp_path, train__contrastive_alpha=1.0, train__contrastive_dropout=0.2)
    one, _, _ = _fit(cfg, [1, 2, 3, 5], cohort=False)
    many, _, _ = _fit(cfg, [1, 2, 3, 5], cohort=True)
    for (a, _, ma), (b, _, mb) in zip(one, many):
        assert ma == mb
        for x, y in zip(a, b):
            assert np.array_equal(x, y)
    plain, _, _ = _fit(tiny_cfg(tmp_path, train__contrastive_alpha=1.0), [1, 2, 3, 5],
                       cohort=True)
    for (a, _, _), (b, _, _) in zip(plain, many):
        assert np.array_equal(a[0], b[0])  # the same samples, so the same ids
        assert not np.array_equal(a[1], b[1])  # other rows


def test_contrastive_dropout_key_keeps_old_digests_and_is_checked(tmp_path):
    from fedrec.errors import ConfigError
    from fedrec.run_index import computation_digest

    from pathlib import Path

    from fedrec.config_load import from_dict, read_yaml

    # the archived UNION runs (contrastive term, no dropout) keep the names they were run under
    archived = sorted(Path(__file__).resolve().parent.parent.glob("results/union-table3/*union*"))
    for run in archived:
        cfg = from_dict(read_yaml(run / "config.yaml"))
        assert cfg.train.contrastive_dropout == 0 and run.name.endswith("-" + cfg.digest()[:6])
    base = tiny_cfg(tmp_path, train__contrastive_alpha=1.0)
    on = tiny_cfg(tmp_path, train__contrastive_alpha=1.0, train__contrastive_dropout=0.2)
    assert on.digest() != base.digest()
    # without a contrastive term the rate reads nothing: the same computation
    assert computation_digest(tiny_cfg(tmp_path, train__contrastive_dropout=0.2)) == \
        computation_digest(tiny_cfg(tmp_path))
    with pytest.raises(ConfigError, match="train.contrastive_dropout"):
        tiny_cfg(tmp_path, train__contrastive_dropout=1.0)
