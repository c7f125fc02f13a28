"""Client-side Adam catch-up and step; the server optimizer."""

import numpy as np
import pytest
import torch

from fedrec.optim import ServerOptimizer, adam_catch_up, adam_step

LR, B1, B2, EPS = 2e-3, 0.9, 0.999, 1e-8


def _loop_reference(U, M, V, last, to, lr=LR, b1=B1, b2=B2, eps=EPS):
    """Plain per-round zero-gradient Adam steps (float64), exactly as torch.optim.Adam does them."""
    U, M, V = U.astype(np.float64).copy(), M.astype(np.float64).copy(), V.astype(np.float64).copy()
    for c in range(len(U)):
        for s in range(last[c] + 1, to[c] + 1):
            M[c] *= b1
            V[c] *= b2
            U[c] -= lr * (M[c] / (1 - b1 ** s)) / (np.sqrt(V[c] / (1 - b2 ** s)) + eps)
    return U, M, V


def _moments(rng, C, d):
    # a real history: a few Adam updates with gradients of various sizes
    M = np.zeros((C, d))
    V = np.zeros((C, d))
    for scale in (0.1, 0.01, 1.0, 1e-3):
        g = rng.standard_normal((C, d)) * scale
        M = B1 * M + (1 - B1) * g
        V = B2 * V + (1 - B2) * g * g
    return M, V


def test_catch_up_equals_round_loop():
    rng = np.random.default_rng(0)
    C, d = 9, 6
    U = rng.standard_normal((C, d))
    M, V = _moments(rng, C, d)
    # coordinates never touched by a gradient (v = 0 = m), and tiny v with a sizeable m
    M[1, :2] = V[1, :2] = 0.0
    V[2, 0], M[2, 0] = 0.0, 1e-4  # v = 0 exactly: the step is m_hat / eps
    V[2, 1], M[2, 1] = 1e-19, 3e-9  # sqrt(v) comparable to eps: the exact branch
    V[2, 2], M[2, 2] = 1e-14, 1e-7
    last = np.array([0, 3, 10, 7, 100, 5, 42, 1, 3])
    to = np.array([0, 4, 60, 207, 130, 5 + 199, 43, 20, 2])  # gaps 0,1,50,200,30,199,1,19,<0
    M[0] = V[0] = 0.0  # a row that never trained
    U0 = U.copy()
    Ur, Mr, Vr = _loop_reference(U, M, V, last, to)
    adam_catch_up(U, M, V, last, to, LR, B1, B2, EPS)
    move, ref_move = U - U0, Ur - U0
    assert np.abs(ref_move).max() > 1e-3  # the test moves something
    np.testing.assert_allclose(move, ref_move, rtol=1e-6, atol=1e-15)
    np.testing.assert_allclose(M, Mr, rtol=1e-12)
    np.testing.assert_allclose(V, Vr, rtol=1e-12)
    assert (move[1, :2] == 0).all() and (move[0] == 0).all() and (move[8] == 0).all()


def test_catch_up_of_a_row_does_not_depend_on_the_cohort_fresh_rows_included():
    """Rows that never trained (no momentum) stay where they are, and every other row comes
    out bit-identical with or without them and alone (float32, as on a device)."""
    rng = np.random.default_rng(4)
    C, d = 6, 5
    U = rng.standard_normal((C, d)).astype(np.float32)
    M, V = (a.astype(np.float32) for a in _moments(rng, C, d))
    M[[1, 4]] = V[[1, 4]] = 0.0  # fresh devices
    last, to = [3, 0, 10, 7, 0, 2], [30] * C
    rows = [(U.copy(), M.copy(), V.copy())]
    adam_catch_up(*rows[0], last, to, LR, B1, B2, EPS)
    trained = [0, 2, 3, 5]
    sub = (U[trained].copy(), M[trained].copy(), V[trained].copy())
    adam_catch_up(*sub, [last[i] for i in trained], [30] * len(trained), LR, B1, B2, EPS)
    for j, i in enumerate(trained):
        alone = (U[i:i + 1].copy(), M[i:i + 1].copy(), V[i:i + 1].copy())
        adam_catch_up(*alone, [last[i]], [30], LR, B1, B2, EPS)
        for a, b, c in zip(rows[0], sub, alone):
            assert a[i].tobytes() == b[j].tobytes() == c[0].tobytes()
    assert np.abs(rows[0][0][trained] - U[trained]).max() > 1e-4  # the trained rows moved
    assert rows[0][0][[1, 4]].tobytes() == U[[1, 4]].tobytes()
    assert not rows[0][1][[1, 4]].any() and not rows[0][2][[1, 4]].any()


def test_catch_up_long_gap_truncation_below_float32():
    rng = np.random.default_rng(1)
    U = rng.standard_normal((3, 4))
    M, V = _moments(rng, 3, 4)
    U0 = U.copy()
    last, to = np.array([1, 50, 400]), np.array([700, 650, 1000])
    Ur, Mr, Vr = _loop_reference(U, M, V, last, to)
    adam_catch_up(U, M, V, last, to, LR, B1, B2, EPS)
    np.testing.assert_allclose(U - U0, Ur - U0, rtol=1e-6)
    np.testing.assert_allclose(M, Mr, rtol=1e-9)


def test_catch_up_cohort_equals_single_rows_bit_for_bit():
    rng = np.random.default_rng(2)
    C, d = 7, 16
    U = rng.standard_normal((C, d)).astype(np.float32)
    M, V = (a.astype(np.float32) for a in _moments(rng, C, d))
    V[3, :4] = 0.0
    M[3, :4] = 0.0
    V[4, :3] = 1e-20
    last = rng.integers(0, 50, C)
    to = last + np.array([0, 1, 2, 30, 199, 250, 7])
    Uc, Mc, Vc = U.copy(), M.copy(), V.copy()
    adam_catch_up(Uc, Mc, Vc, last, to, LR, B1, B2, EPS)
    assert Uc.dtype == np.float32
    for c in range(C):
        u, m, v = U[c:c + 1].copy(), M[c:c + 1].copy(), V[c:c + 1].copy()
        adam_catch_up(u, m, v, last[c:c + 1], to[c:c + 1], LR, B1, B2, EPS)
        assert np.array_equal(u[0], Uc[c]) and np.array_equal(m[0], Mc[c]) and np.array_equal(v[0], Vc[c])
    assert not np.array_equal(Uc, U)


def test_adam_step_matches_torch():
    rng = np.random.default_rng(3)
    U = rng.standard_normal((4, 5)).astype(np.float32)
    M, V = np.zeros_like(U), np.zeros_like(U)
    p = torch.tensor(U.copy(), requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    for t in range(1, 4):
        G = rng.standard_normal((4, 5)).astype(np.float32)
        adam_step(U, M, V, G, t, 0.01, 0.9, 0.999, 1e-8)
        p.grad = torch.from_numpy(G.copy())
        opt.step()
        np.testing.assert_allclose(U, p.detach().numpy(), rtol=1e-6, atol=1e-7)
    st = opt.state[p]
    np.testing.assert_allclose(M, st["exp_avg"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(V, st["exp_avg_sq"].numpy(), rtol=1e-6)
    # first step moves each coordinate by lr * sign(g) (up to eps)
    U1, M1, V1 = np.ones((1, 2), np.float32), np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32)
    adam_step(U1, M1, V1, np.array([[0.5, -2.0]], np.float32), 1, 0.1, 0.9, 0.999, 1e-8)
    np.testing.assert_allclose(U1, [[0.9, 1.1]], rtol=1e-6)


def test_adam_step_per_row_step_counts():
    U = np.zeros((2, 1), np.float32)
    M, V = np.zeros_like(U), np.zeros_like(U)
    G = np.ones((2, 1), np.float32)
    adam_step(U, M, V, G, [1, 5], 1.0, 0.9, 0.999, 0.0)
    # m = 0.1, v = 0.001; row 0 (t=1): m_hat/sqrt(v_hat) = 1; row 1 (t=5): bias corrections differ
    expect1 = (0.1 / (1 - 0.9 ** 5)) / np.sqrt(0.001 / (1 - 0.999 ** 5))
    np.testing.assert_allclose(U[:, 0], [-1.0, -expect1], rtol=1e-6)


def test_server_optimizer_arrays_share_memory_and_move():
    table = np.ones((5, 3), np.float32)
    pred = np.zeros(4, np.float32)
    opt = ServerOptimizer([table, pred], "adam", lr=0.1)
    arrays = opt.arrays()
    assert np.shares_memory(arrays[0], opt.params[0].numpy())
    assert np.shares_memory(arrays[1], opt.params[1].numpy())
    g = np.zeros((5, 3), np.float32)
    g[1] = [1.0, -1.0, 0.5]
    opt.step([g, np.full(4, 2.0, np.float32)])
    # the arrays handed out before the step see the new values
    np.testing.assert_allclose(arrays[0][1], [0.9, 1.1, 0.9], rtol=1e-6)
    np.testing.assert_array_equal(arrays[0][0], [1, 1, 1])
    np.testing.assert_allclose(arrays[1], -0.1, rtol=1e-6)
    assert all(p.grad is None for p in opt.params)
    # a zero gradient next round: row 1 keeps moving on momentum (dense Adam, as the reference)
    before = arrays[0][1].copy()
    opt.step([np.zeros((5, 3), np.float32), np.zeros(4, np.float32)])
    assert (np.sign(arrays[0][1] - before) == [-1, 1, -1]).all()
    np.testing.assert_array_equal(arrays[0][0], [1, 1, 1])
    sd = opt.state_dict()
    opt2 = ServerOptimizer([arrays[0].copy(), arrays[1].copy()], "adam", lr=0.1)
    opt2.load_state_dict(sd)
    assert opt2.state_dict()["state"][0]["step"] == 2


def test_server_sgd_and_unknown_kind():
    opt = ServerOptimizer([np.ones((2, 2), np.float32)], "sgd", lr=0.5)
    opt.step([np.array([[1, 2], [0, -4]], np.float32)])
    np.testing.assert_allclose(opt.arrays()[0], [[0.5, 0.0], [1.0, 3.0]])
    with pytest.raises(ValueError, match="rmsprop"):
        ServerOptimizer([np.ones(2, np.float32)], "rmsprop")


def _pow_form_move(M, V, last, gap, lr=LR, b1=B1, b2=B2, eps=EPS):
    """The catch-up move with (-1/a)^n by np.power (the form before the product form)."""
    k = np.arange(1, 201, dtype=np.float64)
    valid = k[None, :] <= gap[:, None]
    s = last[:, None] + k[None, :]
    inv_sqrt_c = np.sqrt((1.0 - b2 ** s) / (b2 ** k)[None, :])
    r = np.where(valid, (b1 ** k)[None, :] / (1.0 - b1 ** s) * inv_sqrt_c, 0.0)
    e = np.where(valid, eps * inv_sqrt_c, 0.0)
    a = np.sqrt(V.astype(np.float64))
    series = a > 1e3 * e.max(axis=1, keepdims=True)
    inv_a = 1.0 / np.where(series, a, 1.0)
    total, en = np.zeros_like(a), np.ones_like(e)
    for n in range(4):
        total += (r * en).sum(axis=1, keepdims=True) * (-inv_a) ** n
        en = en * e
    total *= inv_a
    rows, cols = np.nonzero(~series)
    den = a[rows, cols][:, None] + e[rows]
    den[~valid[rows]] = 1.0
    total[rows, cols] = (r[rows] / den).sum(axis=1)
    return lr * M.astype(np.float64) * total


def test_catch_up_move_products_equal_the_pow_form_in_float32():
    """(-1/a)^3 by products differs from np.power in its last bit now and then, in a term below
    1e-9 of the sum: the float32 moves (what a device applies) are the same bits, and the
    float64 moves agree to 1e-15."""
    from fedrec.optim import _catch_up_move

    rng = np.random.default_rng(3)
    C, d = 4000, 64
    M, V = _moments(rng, C, d)
    V[rng.random((C, d)) < 0.01] = 1e-19  # some coordinates in the exact branch
    last = rng.integers(0, 5000, C)
    gap = rng.integers(1, 260, C)
    new = _catch_up_move(M, V, last, gap, LR, B1, B2, EPS)
    old = _pow_form_move(M, V, last, gap)
    np.testing.assert_allclose(new, old, rtol=1e-15, atol=0)
    assert np.array_equal(new.astype(np.float32), old.astype(np.float32))


def test_server_adam_fast_step_equals_torch_adam_bit_for_bit():
    """The direct fused step (after the first) gives torch.optim.Adam(fused=True)'s bits:
    parameters, both moments and the step count, also after a state_dict round trip."""
    rng = np.random.default_rng(7)
    arrays = [rng.standard_normal((50, 8)).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    ours = ServerOptimizer([a.copy() for a in arrays], "adam", lr=0.01)
    params = [torch.from_numpy(a.copy()) for a in arrays]
    ref = torch.optim.Adam(params, lr=0.01, fused=True)
    for step in range(6):
        grads = [rng.standard_normal(a.shape).astype(np.float32) * 10.0 ** -step for a in arrays]
        grads[0][rng.random(50) < 0.5] = 0.0  # rows nobody touched this round
        ours.step(grads)
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g)
        ref.step()
        if step == 3:  # resume from a checkpoint: the fast path continues from loaded state
            sd = ours.state_dict()
            ours = ServerOptimizer([a.copy() for a in ours.arrays()], "adam", lr=0.01)
            ours.load_state_dict(sd)
    for a, p in zip(ours.arrays(), params):
        assert np.array_equal(a, p.numpy())
    for i, p in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ours.opt.state[ours.params[i]][key], ref.state[p][key])
        assert int(ours.opt.state[ours.params[i]]["step"]) == 6


def test_server_optimizer_arrays_follow_relocate():
    """arrays() hands out views of the parameters' current storage: after `relocate` (the
    worker pool's shared memory) the new buffers, which later steps update in place."""
    opt = ServerOptimizer([np.ones((3, 2), np.float32)], "adam", lr=0.1)
    before = opt.arrays()[0]
    buffers = []

    def alloc(shape, dtype):
        buffers.append(np.zeros(shape, dtype))
        return buffers[-1]

    opt.relocate(alloc)
    after = opt.arrays()[0]
    assert np.shares_memory(after, buffers[0]) and not np.shares_memory(after, before)
    opt.step([np.ones((3, 2), np.float32)])
    assert np.allclose(buffers[0], 0.9) and np.array_equal(opt.arrays()[0], buffers[0])


def test_server_optimizer_checkpoints_interchange_with_torch_optim():
    """A checkpoint written by torch.optim.Adam (fused; the runs before the native step) resumes
    in ServerOptimizer bit for bit, and ServerOptimizer's state_dict loads into torch.optim.Adam."""
    import copy

    rng = np.random.default_rng(11)
    arrays = [rng.standard_normal((20, 4)).astype(np.float32), rng.standard_normal(3).astype(np.float32)]
    grads = [[rng.standard_normal(a.shape).astype(np.float32) for a in arrays] for _ in range(6)]
    params = [torch.from_numpy(a.copy()) for a in arrays]
    ref = torch.optim.Adam(params, lr=0.02, fused=True)

    def torch_step(opt, ps, gs):
        for p, g in zip(ps, gs):
            p.grad = torch.from_numpy(g)
        opt.step()

    for g in grads[:3]:
        torch_step(ref, params, g)
    ours = ServerOptimizer([p.numpy().copy() for p in params], "adam", lr=0.5)  # lr from the state
    ours.load_state_dict(ref.state_dict())
    assert ours.item_state()["lr"] == 0.02 and ours.item_state()["step"] == 3
    for g in grads[3:]:
        torch_step(ref, params, g)
        ours.step(g)
    for a, p in zip(ours.arrays(), params):
        assert np.array_equal(a, p.numpy())
    back_params = [torch.from_numpy(a.copy()) for a in ours.arrays()]
    back = torch.optim.Adam(back_params, lr=0.5, fused=True)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))  # as a checkpoint file would
    extra = [rng.standard_normal(a.shape).astype(np.float32) for a in arrays]
    torch_step(back, back_params, extra)
    ours.step(extra)
    for a, p in zip(ours.arrays(), back_params):
        assert np.array_equal(a, p.numpy())
    with pytest.raises(ValueError, match="parameter groups"):
        ServerOptimizer([arrays[0].copy()], "adam").load_state_dict(ref.state_dict())


def test_server_sgd_equals_torch_sgd_bit_for_bit():
    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal((30, 8)).astype(np.float32)]
    ours = ServerOptimizer([arrays[0].copy()], "sgd", lr=0.037)
    params = [torch.from_numpy(arrays[0].copy())]
    ref = torch.optim.SGD(params, lr=0.037)
    for _ in range(4):
        g = rng.standard_normal((30, 8)).astype(np.float32)
        ours.step([g])
        params[0].grad = torch.from_numpy(g)
        ref.step()
    assert np.array_equal(ours.arrays()[0], params[0].numpy())
    restored = ServerOptimizer([arrays[0].copy()], "sgd", lr=1.0)
    restored.load_state_dict(ref.state_dict())
    assert restored.item_state() == {"optimizer": "sgd", "lr": 0.037}


def test_a_run_does_not_import_torch_dynamo(tmp_path):
    """Constructing a torch.optim optimizer imports torch._dynamo (~1.5 s per process); a plain
    MF run (and so every worker process of a grid) must not pay it."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; from fedrec.config import load; from fedrec.engine import run_experiment\n"
            f"cfg = load({str(tmp_path / 'x.yaml')!r}, ['train.rounds=2'])[0]\n"
            f"run_experiment(cfg, output_root={str(tmp_path / 'out')!r}, progress=False)\n"
            "print('torch._dynamo' in sys.modules)")
    (tmp_path / "x.yaml").write_text(
        "name: nodyn\ndata: {dataset: synthetic, synthetic: {n_users: 40, n_items: 60, "
        f"mean_history: 8}}, cache_dir: {tmp_path / 'cache'}}}\nmodel: {{dim: 8}}\n"
        "train: {clients_per_round: 4}\neval: {every: 0}\noutput: {progress: false}\n")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
