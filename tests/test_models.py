"""MF / NCF gradients against independent float64 torch references; cohort invariance."""

import numpy as np
import pytest
import torch

from fedrec.models import make_model
from fedrec.models import base
from fedrec.models.base import (client_chunks, dropout_bits, dropout_threshold, scatter_rows,
                                unique_inverse)
from fedrec.models.mf import MF
from fedrec.models.ncf import NCF
from fedrec.protocol import joined_rows

N_ITEMS, DIM = 30, 8


def _setup(seed=0, n=12):
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal((N_ITEMS, DIM)) * 0.5).astype(np.float32)
    user = (rng.standard_normal(DIM) * 0.5).astype(np.float32)
    pos = rng.integers(0, N_ITEMS, n)
    neg = rng.integers(0, N_ITEMS, n)
    neg[:3] = neg[3]  # repeated negatives
    pos[5] = neg[6]  # an item that is both a positive and a negative
    return table, user, pos, neg


def _sfc(seed):
    return np.random.Generator(np.random.SFC64(seed))


def _mf_reference(table, user, pos, neg, wd, keep=None, p=0.0, loss_name="bpr"):
    """Mean softplus(-(u'.(vi' - vj'))) + wd/2 (|u|^2 + sum over touched rows |v|^2), float64.
    loss_name="bce" (pos = each positive repeated q times): PipAttack's Eq. 2 over the distinct
    positives and the negatives, divided by the number of positives (without dropout), or its
    per-pair form mean(softplus(-s_pos) + q softplus(s_neg)) (with dropout)."""
    V = torch.tensor(table, dtype=torch.float64, requires_grad=True)
    u = torch.tensor(user, dtype=torch.float64, requires_grad=True)
    n = len(pos)
    uu, vi, vj = u.expand(n, -1), V[torch.from_numpy(pos)], V[torch.from_numpy(neg)]
    if keep is not None:
        k = torch.from_numpy(keep).double() / (1.0 - p)
        uu, vi, vj = uu * k[0], vi * k[1], vj * k[2]
    softplus = torch.nn.functional.softplus
    if loss_name == "bpr":
        loss = softplus(-(uu * (vi - vj)).sum(1)).mean()
    elif keep is None:
        distinct = torch.from_numpy(np.unique(pos))
        loss = (softplus(-(V[distinct] @ u)).sum() + softplus(vj @ u).sum()) / len(distinct)
    else:
        q = n / len(np.unique(pos))
        loss = (softplus(-(uu * vi).sum(1)) + q * softplus((uu * vj).sum(1))).mean()
    touched = torch.from_numpy(np.unique(np.concatenate([pos, neg])))
    total = loss + 0.5 * wd * ((u * u).sum() + (V[touched] ** 2).sum())
    total.backward()
    return V.grad.numpy(), u.grad.numpy(), float(loss.detach())


@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_mf_gradients_match_autograd(wd):
    table, user, pos, neg = _setup()
    model = MF(N_ITEMS, DIM, dropout=0.0)
    g = model.gradients(table, [], user, pos, neg, _sfc(1), weight_decay=wd)
    Vg, ug, loss = _mf_reference(table, user, pos, neg, wd)
    touched = np.unique(np.concatenate([pos, neg]))
    np.testing.assert_array_equal(g.item_ids, touched)
    assert g.item_ids.dtype == np.int64 and g.item_rows.dtype == np.float32
    np.testing.assert_allclose(g.item_rows, Vg[touched], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g.user_grad, ug, rtol=1e-5, atol=1e-7)
    assert g.loss == pytest.approx(loss, rel=1e-6)
    assert g.n_samples == len(pos) and g.predictor == []
    # rows the client never touched have a zero gradient in the reference too
    assert np.abs(np.delete(Vg, touched, axis=0)).max() == 0


def test_mf_gradients_with_dropout_match_autograd_on_the_same_masks():
    p = 0.3
    table, user, pos, neg = _setup(seed=3, n=20)
    model = MF(N_ITEMS, DIM, dropout=p)
    g = model.gradients(table, [], user, pos, neg, _sfc(5), weight_decay=1e-3)
    keep = (dropout_bits(_sfc(5), 3 * len(pos) * DIM) >= dropout_threshold(p)).reshape(3, -1, DIM)
    assert 0.2 < 1 - keep.mean() < 0.4
    Vg, ug, loss = _mf_reference(table, user, pos, neg, 1e-3, keep=keep, p=p)
    np.testing.assert_allclose(g.item_rows, Vg[g.item_ids], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g.user_grad, ug, rtol=1e-5, atol=1e-7)
    assert g.loss == pytest.approx(loss, rel=1e-6)
    # train=False disables dropout
    g0 = model.gradients(table, [], user, pos, neg, _sfc(5), weight_decay=1e-3, train=False)
    Vg0, ug0, _ = _mf_reference(table, user, pos, neg, 1e-3)
    np.testing.assert_allclose(g0.user_grad, ug0, rtol=1e-5, atol=1e-7)


def test_mf_cohort_equals_single_bit_for_bit():
    rng = np.random.default_rng(11)
    n_items, d = 500, 16
    model = MF(n_items, d, dropout=0.2)
    table = (rng.standard_normal((n_items, d)) * 0.3).astype(np.float32)
    sizes = [1, 7, 150, 33, 600, 2]
    users = [(rng.standard_normal(d) * 0.3).astype(np.float32) for _ in sizes]
    pos = [rng.integers(0, n_items, s) for s in sizes]
    neg = [rng.integers(0, n_items, s) for s in sizes]
    for kw in ({"weight_decay": 1e-5}, {"weight_decay": 0.0}, {"weight_decay": 1e-5, "weight_decay_all": True}):
        cohort = model.gradients_cohort(table, [], users, pos, neg, [_sfc([7, c]) for c in range(len(sizes))], **kw)
        for c in range(len(sizes)):
            single = model.gradients(table, [], users[c], pos[c], neg[c], _sfc([7, c]), **kw)
            assert np.array_equal(cohort[c].item_ids, single.item_ids)
            assert np.array_equal(cohort[c].item_rows, single.item_rows)
            assert np.array_equal(cohort[c].user_grad, single.user_grad)
            assert cohort[c].loss == single.loss and cohort[c].n_samples == sizes[c]
    # and the clients really differ (the masks are per client)
    assert not np.array_equal(cohort[0].user_grad, cohort[5].user_grad)


def test_client_chunks():
    assert client_chunks([1, 7, 150, 33, 600, 2], 100) == [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6)]
    assert client_chunks([3, 3, 3], 100) == [(0, 3)]
    assert client_chunks([], 100) == []


@pytest.mark.parametrize("name", ["mf", "ncf"])
def test_cohort_in_chunks_changes_no_number(name, monkeypatch):
    """A cohort computed in chunks of clients (base.CHUNK_PAIRS) gives every client the
    numbers of the cohort in one piece: masks from its own generator, per-client sums."""
    rng = np.random.default_rng(3)
    n_items, d = 200, 8
    sizes = [1, 7, 150, 33, 90, 2, 41]
    if name == "mf":
        model, pred = MF(n_items, d, dropout=0.2), []
    else:
        model = NCF(n_items, d, dropout=0.2, mlp_layers=(8, 4))
        pred = model.init_global(np.random.default_rng(4))[1]
    table = (rng.standard_normal((n_items, d)) * 0.3).astype(np.float32)
    users = [(rng.standard_normal(d) * 0.3).astype(np.float32) for _ in sizes]
    pos = [rng.integers(0, n_items, s) for s in sizes]
    neg = [rng.integers(0, n_items, s) for s in sizes]

    def cohort(chunk_pairs):
        monkeypatch.setattr(base, "CHUNK_PAIRS", chunk_pairs)
        return model.gradients_cohort(table, pred, users, pos, neg,
                                      [_sfc([9, c]) for c in range(len(sizes))], weight_decay=1e-5)

    whole, chunked = cohort(10**9), cohort(40)
    assert len(client_chunks(sizes, 40)) == 6 and len(chunked) == len(sizes)
    for a, b in zip(whole, chunked):
        assert np.array_equal(a.item_ids, b.item_ids) and np.array_equal(a.item_rows, b.item_rows)
        assert np.array_equal(a.user_grad, b.user_grad) and a.loss == b.loss
        assert all(np.array_equal(x, y) for x, y in zip(a.predictor, b.predictor))
    assert not np.array_equal(whole[1].user_grad, whole[2].user_grad)


def test_weight_decay_scope_all_is_dense():
    table, user, pos, neg = _setup()
    wd = 1e-2
    for model in (MF(N_ITEMS, DIM, dropout=0.0), NCF(N_ITEMS, DIM, mlp_layers=(6, 4))):
        pred = model.init_global(np.random.default_rng(0))[1]
        sparse = model.gradients(table, pred, user, pos, neg, _sfc(1), weight_decay=wd)
        dense = model.gradients(table, pred, user, pos, neg, _sfc(1), weight_decay=wd,
                                weight_decay_all=True)
        np.testing.assert_array_equal(dense.item_ids, np.arange(N_ITEMS))
        assert dense.item_rows.shape == (N_ITEMS, DIM) and dense.item_rows.dtype == np.float32
        untouched = np.setdiff1d(np.arange(N_ITEMS), sparse.item_ids)
        assert len(untouched) > 0
        np.testing.assert_allclose(dense.item_rows[untouched], wd * table[untouched], rtol=1e-6)
        np.testing.assert_allclose(dense.item_rows[sparse.item_ids], sparse.item_rows, rtol=1e-5, atol=1e-8)
        # a cohort's dense tables lie back to back in one block: the server stacks them as a
        # view (fedrec.protocol.joined_rows), not by copying 50 tables a round
        cohort = model.gradients_cohort(table, pred, [user] * 3, [pos] * 3, [neg] * 3,
                                        [_sfc(c) for c in range(3)], weight_decay=wd,
                                        weight_decay_all=True)
        stacked = joined_rows([c.item_rows for c in cohort])
        assert stacked.shape == (3 * N_ITEMS, DIM) and np.shares_memory(stacked, cohort[0].item_rows)


def _ncf_reference(table, user, pred, pos, neg, wd):
    """score = h.(u*v) + w.tanh(W2 tanh(W1 [u; v] + b1) + b2) + b, float64 autograd."""
    V = torch.tensor(table, dtype=torch.float64, requires_grad=True)
    u = torch.tensor(user, dtype=torch.float64, requires_grad=True)
    P = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in pred]
    h, w1, b1, w2, b2, wo, bo = P

    def score(item_ids):
        v = V[torch.from_numpy(item_ids)]
        uu = u.expand(len(item_ids), -1)
        hidden = torch.tanh(torch.cat([uu, v], 1) @ w1.T + b1)
        return (uu * v * h).sum(1) + torch.tanh(hidden @ w2.T + b2) @ wo + bo[0]

    loss = torch.nn.functional.softplus(-(score(pos) - score(neg))).mean()
    touched = torch.from_numpy(np.unique(np.concatenate([pos, neg])))
    reg = (u * u).sum() + sum((a * a).sum() for a in P) + (V[touched] ** 2).sum()
    (loss + 0.5 * wd * reg).backward()
    return V.grad.numpy(), u.grad.numpy(), [a.grad.numpy() for a in P], float(loss.detach()), score


@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_ncf_gradients_match_reference(wd):
    table, user, pos, neg = _setup(seed=4)
    model = NCF(N_ITEMS, DIM, dropout=0.0, mlp_layers=(6, 5))
    _, pred = model.init_global(np.random.default_rng(2))
    rng = np.random.default_rng(9)
    pred = [(a + 0.3 * rng.standard_normal(a.shape)).astype(np.float32) for a in pred]  # non-trivial biases
    assert [a.shape for a in pred] == model.predictor_shapes
    g = model.gradients(table, pred, user, pos, neg, _sfc(1), weight_decay=wd)
    Vg, ug, pg, loss, _ = _ncf_reference(table, user, pred, pos, neg, wd)
    np.testing.assert_array_equal(g.item_ids, np.unique(np.concatenate([pos, neg])))
    np.testing.assert_allclose(g.item_rows, Vg[g.item_ids], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g.user_grad, ug, rtol=1e-4, atol=1e-6)
    assert len(g.predictor) == 7
    for a, b in zip(g.predictor, pg):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert g.loss == pytest.approx(loss, rel=1e-5)


def test_ncf_reference_against_finite_differences():
    # the float64 reference itself, on one predictor weight and one item coordinate
    table, user, pos, neg = _setup(seed=4)
    model = NCF(N_ITEMS, DIM, mlp_layers=(6, 5))
    _, pred = model.init_global(np.random.default_rng(2))
    pred = [a.astype(np.float64) for a in pred]
    table, user = table.astype(np.float64), user.astype(np.float64)
    Vg, _, pg, _, _ = _ncf_reference(table, user, pred, pos, neg, 0.0)
    eps = 1e-6

    def loss_at(t, p):
        return _ncf_reference(t, user, p, pos, neg, 0.0)[3]

    p_hi = [a.copy() for a in pred]; p_hi[1][2, 3] += eps
    p_lo = [a.copy() for a in pred]; p_lo[1][2, 3] -= eps
    assert (loss_at(table, p_hi) - loss_at(table, p_lo)) / (2 * eps) == pytest.approx(pg[1][2, 3], rel=1e-5)
    i = int(pos[0])
    t_hi, t_lo = table.copy(), table.copy()
    t_hi[i, 1] += eps
    t_lo[i, 1] -= eps
    assert (loss_at(t_hi, pred) - loss_at(t_lo, pred)) / (2 * eps) == pytest.approx(Vg[i, 1], rel=1e-5)


def test_ncf_score_matches_pairwise_forward_and_reference():
    table, user, pos, neg = _setup(seed=6)
    model = NCF(N_ITEMS, DIM, mlp_layers=(6, 5))
    _, pred = model.init_global(np.random.default_rng(3))
    pred = [(a + 0.2).astype(np.float32) for a in pred]
    users = np.stack([user, -user, user * 2])
    S = model.score(users, table, pred)
    assert S.shape == (3, N_ITEMS)
    p = [torch.from_numpy(a) for a in pred]
    for b in range(3):
        f = _ncf_pair_scores(torch.from_numpy(users[b]).expand(N_ITEMS, -1), torch.from_numpy(table), p)
        np.testing.assert_allclose(S[b], f.detach().numpy(), rtol=1e-5, atol=1e-6)
    ref_score = _ncf_reference(table, users[0], pred, pos, neg, 0.0)[4]
    np.testing.assert_allclose(S[0], ref_score(np.arange(N_ITEMS)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_mf_score_and_init():
    table, user, _, _ = _setup()
    model = MF(N_ITEMS, DIM)
    S = model.score(np.stack([user, user]), table, [])
    assert S.dtype == np.float64
    np.testing.assert_allclose(S[0], table.astype(np.float64) @ user.astype(np.float64))
    np.testing.assert_array_equal(S[0], S[1])
    t, pred = model.init_global(np.random.default_rng(0))
    assert t.shape == (N_ITEMS, DIM) and t.dtype == np.float32 and pred == []
    t2, _ = model.init_global(np.random.default_rng(0))
    np.testing.assert_array_equal(t, t2)
    assert model.init_user(np.random.default_rng(0)).shape == (DIM,)


def test_make_model_and_scatter_rows():
    from fedrec.config import from_dict
    from fedrec.errors import ConfigError

    assert isinstance(make_model(from_dict({"model": {"name": "ncf", "dim": 4}}).model, 10), NCF)
    m = make_model(from_dict({"model": {"dim": 4, "dropout": 0.1}}).model, 10)
    assert isinstance(m, MF) and m.dim == 4 and m.dropout == 0.1 and m.n_items == 10
    with pytest.raises(ConfigError, match="model.name"):
        make_model(from_dict({"model": {"name": "gru"}}).model, 10)
    ids, rows = scatter_rows(np.array([3, 1, 3]), np.array([[1.0], [2.0], [4.0]], np.float32))
    np.testing.assert_array_equal(ids, [1, 3])
    np.testing.assert_array_equal(rows, [[2.0], [5.0]])


def _ncf_pair_scores(u, v, p):
    """NCF scores of aligned rows u, v; p = predictor tensors (7: neumf, 6: mlp form)."""
    *gmf, w1, b1, w2, b2, wo, bo = p
    d = u.shape[-1]
    z = torch.tanh(torch.tanh(u @ w1[:, :d].T + v @ w1[:, d:].T + b1) @ w2.T + b2)
    return z @ wo + bo + ((u * v) @ gmf[0] if gmf else 0.0)


def _ncf_autograd(model, table, pred, user, pos, neg, wd, keep=None, wd_all=False):
    """fedrec's former NCF gradient (float32 torch autograd per client over its touched rows),
    kept as the reference; dropout masks are given (layout mask, pair, dim) instead of drawn."""
    n = len(pos)
    ids, inv = np.unique(np.concatenate([pos, neg]), return_inverse=True)
    rows = torch.tensor(table[ids], requires_grad=True)
    u = torch.tensor(user, requires_grad=True)
    p = [torch.tensor(a, requires_grad=True) for a in pred]
    inv_t = torch.from_numpy(inv)
    vi, vj, uu = rows[inv_t[:n]], rows[inv_t[n:]], u.expand(n, -1)
    if keep is not None:
        masks = torch.from_numpy(keep).float() / (1.0 - model.dropout)
        uu, vi, vj = uu * masks[0], vi * masks[1], vj * masks[2]
    s = _ncf_pair_scores(torch.cat([uu, uu]), torch.cat([vi, vj]), p)
    softplus = torch.nn.functional.softplus
    if model.loss == "bpr":
        loss = softplus(-(s[:n] - s[n:])).mean()
    else:
        loss = (softplus(-s[:n]) + n / len(np.unique(pos)) * softplus(s[n:])).mean()
    reg = (u * u).sum() + sum((a * a).sum() for a in p) + (0.0 if wd_all else (rows * rows).sum())
    (loss + 0.5 * wd * reg).backward()
    item_rows = rows.grad.numpy()
    if wd_all:
        full = wd * table
        full[ids] += item_rows
        ids, item_rows = np.arange(len(table)), full
    return ids, item_rows, u.grad.numpy(), [a.grad.numpy() for a in p], float(loss.detach())


def _close(actual, desired):
    """Equal to float32 round-off, relative to the array's scale (sums cancel)."""
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-7 + 1e-5 * np.abs(desired).max())


def _ncf_cohort_case(form, loss, dropout, seed=0):
    rng = np.random.default_rng(seed)
    n_items, d, q = 200, 8, 4
    model = NCF(n_items, d, dropout=dropout, mlp_layers=(6, 5), loss=loss, ncf_form=form)
    table, pred = model.init_global(rng)
    pred = [(a + 0.3 * rng.standard_normal(a.shape)).astype(np.float32) for a in pred]
    table *= 3
    sizes = [1, 9, 40, 3]  # distinct positives per client
    users = [(rng.standard_normal(d) * 0.5).astype(np.float32) for _ in sizes]
    pos = [np.repeat(rng.choice(n_items, s, replace=False), q) for s in sizes]
    neg = [rng.integers(0, n_items, len(p)) for p in pos]
    return model, table, pred, users, pos, neg


@pytest.mark.parametrize("form", ["neumf", "mlp"])
@pytest.mark.parametrize("loss", ["bpr", "bce"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_ncf_cohort_matches_the_former_autograd_path(form, loss, dropout):
    model, table, pred, users, pos, neg = _ncf_cohort_case(form, loss, dropout)
    assert [a.shape for a in pred] == model.predictor_shapes
    assert len(pred) == (7 if form == "neumf" else 6)
    d = model.dim
    for kw in ({"weight_decay": 1e-2}, {"weight_decay": 1e-2, "weight_decay_all": True}):
        rngs = [_sfc([3, c]) for c in range(len(users))]
        cohort = model.gradients_cohort(table, pred, users, pos, neg, rngs, **kw)
        for c, g in enumerate(cohort):
            n = len(pos[c])
            keep = None
            if dropout:
                keep = (dropout_bits(_sfc([3, c]), 3 * n * d) >= dropout_threshold(dropout)).reshape(3, n, d)
            ids, rows, ug, pg, ref_loss = _ncf_autograd(model, table, pred, users[c], pos[c], neg[c],
                                                        kw["weight_decay"], keep,
                                                        kw.get("weight_decay_all", False))
            np.testing.assert_array_equal(g.item_ids, ids)
            _close(g.item_rows, rows)
            _close(g.user_grad, ug)
            assert len(g.predictor) == len(pg)
            for a, b in zip(g.predictor, pg):
                assert a.shape == b.shape and a.dtype == np.float32
                _close(a, b)
            assert g.loss == pytest.approx(ref_loss, rel=1e-5) and g.n_samples == n


@pytest.mark.parametrize("form,loss", [("neumf", "bpr"), ("mlp", "bce")])
def test_ncf_cohort_equals_single_bit_for_bit(form, loss):
    for dropout in (0.0, 0.2):
        model, table, pred, users, pos, neg = _ncf_cohort_case(form, loss, dropout, seed=5)
        for kw in ({"weight_decay": 1e-5}, {"weight_decay": 0.0},
                   {"weight_decay": 1e-5, "weight_decay_all": True}):
            rngs = [_sfc([7, c]) for c in range(len(users))]
            cohort = model.gradients_cohort(table, pred, users, pos, neg, rngs, **kw)
            for c in range(len(users)):
                single = model.gradients(table, pred, users[c], pos[c], neg[c], _sfc([7, c]), **kw)
                assert np.array_equal(cohort[c].item_ids, single.item_ids)
                assert np.array_equal(cohort[c].item_rows, single.item_rows)
                assert np.array_equal(cohort[c].user_grad, single.user_grad)
                assert all(np.array_equal(a, b) for a, b in zip(cohort[c].predictor, single.predictor))
                assert cohort[c].loss == single.loss
        if dropout:  # the masks are per client
            assert not np.array_equal(cohort[0].user_grad, cohort[3].user_grad)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_mf_bce_matches_autograd(dropout):
    rng = np.random.default_rng(8)
    table, user, _, _ = _setup(seed=8)
    pos = np.repeat(rng.choice(N_ITEMS, 6, replace=False), 4)  # q = 4
    neg = rng.integers(0, N_ITEMS, len(pos))
    model = MF(N_ITEMS, DIM, dropout=dropout, loss="bce")
    g = model.gradients(table, [], user, pos, neg, _sfc(5), weight_decay=1e-3)
    keep = None
    if dropout:
        keep = (dropout_bits(_sfc(5), 3 * len(pos) * DIM) >= dropout_threshold(dropout)).reshape(3, -1, DIM)
    Vg, ug, loss = _mf_reference(table, user, pos, neg, 1e-3, keep=keep, p=dropout, loss_name="bce")
    np.testing.assert_allclose(g.item_rows, Vg[g.item_ids], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g.user_grad, ug, rtol=1e-5, atol=1e-7)
    assert g.loss == pytest.approx(loss, rel=1e-6)
    cohort = model.gradients_cohort(table, [], [user, -user], [pos, pos[:8]], [neg, neg[:8]],
                                    [_sfc(5), _sfc(6)], weight_decay=1e-3)
    assert np.array_equal(cohort[0].item_rows, g.item_rows)
    assert np.array_equal(cohort[0].user_grad, g.user_grad)


def test_pairwise_loss_and_ncf_form_keys():
    from fedrec.config import from_dict
    from fedrec.errors import ConfigError

    m = make_model(from_dict({"model": {"name": "ncf", "dim": 4, "loss": "bce", "ncf_form": "mlp"}}).model, 10)
    assert (m.loss, m.form, len(m.predictor_shapes)) == ("bce", "mlp", 6)
    m = make_model(from_dict({"model": {"name": "mf", "dim": 4}}).model, 10)
    assert m.loss == "bpr"
    for bad in ({"name": "mf", "loss": "sampled_softmax"}, {"name": "ncf", "ncf_form": "gmf"},
                {"name": "sasrec", "loss": "bpr"}):
        with pytest.raises(ConfigError, match=f"model.{'loss' if 'loss' in bad else 'ncf_form'}"):
            from_dict({"model": bad})


@pytest.mark.parametrize("n_keys", [50, 10**9])  # a bitmap over the range; np.unique's sort
def test_unique_inverse_equals_np_unique(n_keys):
    rng = np.random.default_rng(2)
    for size in (0, 1, 7, 300):
        keys = rng.integers(0, min(n_keys, 10**9), size)
        uniq, inv = unique_inverse(keys, n_keys)
        ref_uniq, ref_inv = np.unique(keys, return_inverse=True)
        assert np.array_equal(uniq, ref_uniq) and np.array_equal(inv, ref_inv.reshape(-1))
        assert np.array_equal(uniq[inv], keys)


def test_sorted_unique_equals_np_unique():
    rng = np.random.default_rng(4)
    for size in (0, 1, 2, 9, 500):
        for dtype in (np.int64, np.int32):
            a = rng.integers(0, 40, size).astype(dtype)
            got, ref = base.sorted_unique(a), np.unique(a)
            assert got.dtype == ref.dtype and np.array_equal(got, ref)


@pytest.mark.parametrize("bit_generator", [np.random.PCG64, np.random.SFC64, np.random.MT19937])
@pytest.mark.parametrize("n", [1, 7, 4095, 4096, 20_000])
def test_raw_words_are_random_raw(bit_generator, n):
    """raw_words and the dropout bits are the generator's raw words (the layout every stored
    run's dropout masks came from: 4096 and up were once drawn through `integers`, which
    gives the same words) and leave the generator in the same state."""
    a, b = np.random.Generator(bit_generator(11)), np.random.Generator(bit_generator(11))
    a.random(3), b.random(3)  # mid-stream, not at a fresh seed
    assert np.array_equal(base.raw_words(a, n), b.bit_generator.random_raw(n))
    assert np.array_equal(a.bit_generator.random_raw(5), b.bit_generator.random_raw(5))
    assert np.array_equal(dropout_bits(a, 4 * n - 1), b.bit_generator.random_raw(n).view(np.uint16)[:-1])


@pytest.mark.parametrize("form", ["neumf", "mlp"])
def test_ncf_score_sigmoid_form_matches_tanh_in_float64_across_chunks(form, monkeypatch):
    """score() computes each tanh as 2 sigmoid(2x) - 1 with the constants folded into the
    weights: it must equal the plain tanh network in float64 (to float32 rounding), for both
    forms, with saturated units (pre-activations of +-30) and whatever the chunk size (several
    users a chunk, one a chunk, a last chunk shorter than the rest)."""
    import fedrec.models.ncf as ncf

    rng = np.random.default_rng(11)
    model = NCF(N_ITEMS, DIM, mlp_layers=(6, 5), ncf_form=form)
    table, pred = model.init_global(np.random.default_rng(3))
    pred = [(a + 0.5 * rng.standard_normal(a.shape)).astype(np.float32) for a in pred]
    pred[-6 if form == "neumf" else 0] *= 8  # W1 large: some hidden units saturate
    users = (rng.standard_normal((7, DIM)) * 3).astype(np.float32)
    u, v, p = (users.astype(np.float64), table.astype(np.float64),
               [a.astype(np.float64) for a in pred])
    *gmf, w1, b1, w2, b2, wo, bo = p
    want = np.empty((7, N_ITEMS))
    for b in range(7):  # the obvious loop: one user, every item
        x = np.concatenate([np.broadcast_to(u[b], v.shape), v], axis=1)
        pre = x @ w1.T + b1
        assert np.abs(pre).max() > 10 or b  # saturation is exercised
        want[b] = np.tanh(np.tanh(pre) @ w2.T + b2) @ wo + bo[0] + (
            (u[b] * v) @ gmf[0] if gmf else 0.0)
    for elements in (1 << 20, N_ITEMS * 6 * 3, 1):  # all at once; 3 users (7 = 3+3+1); 1
        monkeypatch.setattr(ncf, "SCORE_CHUNK_ELEMENTS", elements)
        got = model.score(users, table, pred)
        assert got.dtype == np.float64 and got.shape == (7, N_ITEMS)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


def test_ncf_sigmoid_form_constants_by_hand():
    """h1 = h2 = 1, d = 1: tanh(a u + c v + b1) -> 2 sigmoid(2a u + 2c v + 2 b1) - 1, etc."""
    from fedrec.models.ncf import NCFWeights, _sigmoid_form

    W = NCFWeights(None, np.array([[0.5, -1.0]], np.float32), np.array([0.25], np.float32),
                   np.array([[3.0]], np.float32), np.array([-0.5], np.float32),
                   np.array([2.0], np.float32), np.array([0.125], np.float32))
    w1u, w1v, b1, w2, b2, wo, bo = _sigmoid_form(W, 1)
    np.testing.assert_array_equal(np.concatenate([w1u, w1v, b1[:, None], w2, b2[:, None]], 1),
                                  [[1.0, -2.0, 0.5, 12.0, 2 * (-0.5 - 3.0)]])
    np.testing.assert_array_equal(np.concatenate([wo, bo]), [4.0, 0.125 - 2.0])
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    uu, vv = 0.7, -0.3
    s1 = sig(w1u[0, 0] * uu + w1v[0, 0] * vv + b1[0])
    s2 = sig(w2[0, 0] * s1 + b2[0])
    direct = 2.0 * np.tanh(3.0 * np.tanh(0.5 * uu - 1.0 * vv + 0.25) - 0.5) + 0.125
    assert wo[0] * s2 + bo[0] == pytest.approx(direct, abs=1e-6)
