"""Optimizers: the server's step on global parameters, and the client's on its user row.

`adam_sync` is the client-side equivalent of what the ClusterAttack/UNION reference does:
there the server owns every user row inside one Adam-optimised table, so a row keeps moving
on its momentum in every round, also in rounds its user sat out (zero gradient). A device
can replay exactly that from its own (m, v) and the round number, with no extra messages:
the momentum-only steps of skipped rounds have a closed form per round, summed here as a
vector (terms beyond 0.9**200 ~ 7e-10 of the first are dropped: below float32 resolution).
"""

from __future__ import annotations

import numpy as np

# torch is imported by the server's optimizers only, when they are built or used: the device's
# user-row functions above them are numpy, and a deployment's ClientApp (a fresh process per
# message) would otherwise import torch for every message

_MAX_CATCHUP = 200


def adam_catch_up(U, M, V, last_round, to_round, lr, b1, b2, eps):
    """Apply Adam's zero-gradient steps for rounds last_round+1 .. to_round, in place.

    U, M, V: (C, dim) user rows and their Adam moments; last_round, to_round: (C,) ints.
    After k empty rounds (s = last_round + k) the moments are b1^k M and b2^k V, so the total
    move is  lr * M * sum_k r_k / (a + e_k)  with  a = sqrt(V),  c_k = b2^k / (1 - b2^s),
    r_k = b1^k / (1 - b1^s) / sqrt(c_k),  e_k = eps / sqrt(c_k).  Where a >> e_k (every
    coordinate with a real gradient history) 1/(a + e) is expanded in e/a, which needs only
    per-client sums over k; coordinates with a tiny V are summed exactly. The error is below
    float32 resolution. k always runs over the same fixed window (zero-padded), and every
    operation is per row, so a client's result does not depend on the cohort it is in.
    """
    last = np.asarray(last_round, dtype=np.int64).reshape(-1)
    gap = np.maximum(np.asarray(to_round, dtype=np.int64).reshape(-1) - last, 0)
    if not gap.any():
        return
    # a row with no momentum (a device that never trained) does not move: its move, all
    # zeros, is skipped (the rest is per row, so the other rows' numbers are unchanged)
    moving = np.flatnonzero((gap > 0) & M.any(axis=1))
    if len(moving):
        U[moving] -= _catch_up_move(M[moving], V[moving], last[moving], gap[moving],
                                    lr, b1, b2, eps).astype(U.dtype)
    M *= (b1 ** gap)[:, None].astype(M.dtype)
    V *= (b2 ** gap)[:, None].astype(V.dtype)


def _catch_up_move(M, V, last, gap, lr, b1, b2, eps) -> np.ndarray:
    """adam_catch_up's total move (float64) of rows with gap > 0."""
    k = np.arange(1, _MAX_CATCHUP + 1, dtype=np.float64)
    valid = k[None, :] <= gap[:, None]
    s = last[:, None] + k[None, :]
    inv_sqrt_c = np.sqrt((1.0 - b2 ** s) / (b2 ** k)[None, :])
    r = np.where(valid, (b1 ** k)[None, :] / (1.0 - b1 ** s) * inv_sqrt_c, 0.0)
    e = np.where(valid, eps * inv_sqrt_c, 0.0)
    a = np.sqrt(V.astype(np.float64))
    series = a > 1e3 * e.max(axis=1, keepdims=True)  # e/a < 1e-3: 4 terms, < 1e-12 error
    inv_a = 1.0 / np.where(series, a, 1.0)
    total = np.zeros_like(a)
    en = np.ones_like(e)
    # (-1/a)^n by products: numpy's pow of a negative base takes libm's slow path (~0.35 ms a
    # round for n = 3); the n = 3 term is < 1e-9 of the sum, so its last-bit difference from
    # pow never reaches the result (tests/test_optim.py compares with the pow form)
    neg_inv = -inv_a
    square = neg_inv * neg_inv
    # sum_k r_k / (a + e_k) = sum_n (-1/a)^n sum_k r_k e_k^n / a
    for power in (1.0, neg_inv, square, square * neg_inv):
        total += (r * en).sum(axis=1, keepdims=True) * power
        en = en * e
    total *= inv_a
    if not series.all():
        rows, cols = np.nonzero(~series)
        den = a[rows, cols][:, None] + e[rows]
        den[~valid[rows]] = 1.0  # padded terms have r = 0; keep 0/0 out
        total[rows, cols] = (r[rows] / den).sum(axis=1)
    return lr * M.astype(np.float64) * total


def adam_update(theta, m, v, g, t: int, lr, b1, b2, eps):
    """torch.optim.Adam's step (no weight decay) out of place, in float64: -> (theta', m', v').

        m' = b1 m + (1 - b1) g,   v' = b2 v + (1 - b2) g^2
        theta' = theta - lr / (1 - b1^t) * m' / (sqrt(v') / sqrt(1 - b2^t) + eps)

    Arrays broadcast (e.g. rows (K, d) against many clients' gradients (C, K, d))."""
    theta, g = np.asarray(theta, np.float64), np.asarray(g, np.float64)
    m = b1 * np.asarray(m, np.float64) + (1 - b1) * g
    v = b2 * np.asarray(v, np.float64) + (1 - b2) * g * g
    denom = np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps
    return theta - (lr / (1 - b1 ** t)) * m / denom, m, v


def adam_step(U, M, V, G, t, lr, b1, b2, eps):
    """One Adam step for rows U (C, dim) with gradients G; t: step count (scalar or (C,))."""
    t = np.asarray(t, dtype=np.float64).reshape(-1, 1)
    M *= b1
    M += (1 - b1) * G
    V *= b2
    V += (1 - b2) * G * G
    denom = np.sqrt(V / (1 - b2 ** t)) + eps
    U -= ((lr / (1 - b1 ** t)) * M / denom).astype(U.dtype)


class _ServerAdam:
    """torch.optim.Adam(fused=True)'s step without torch.optim: the same kernel
    (`torch._fused_adam_`) on the same state, and the same `state_dict()` layout, so the
    checkpoints of either load into the other (tests/test_optim.py compares the bits).

    Constructing any torch.optim.Optimizer imports torch._dynamo (~1.5 s of a process's
    start, paid by every run of a grid's worker processes); the server's Adam needs none of it.
    """

    def __init__(self, params, lr, betas, eps):
        self.params = params
        self.param_groups = [{"lr": float(lr), "betas": tuple(float(b) for b in betas),
                              "eps": float(eps), "weight_decay": 0, "amsgrad": False,
                              "maximize": False, "foreach": None, "capturable": False,
                              "differentiable": False, "fused": True,
                              "decoupled_weight_decay": False}]
        self.state: dict = {}

    def step(self, grads):
        import torch

        group = self.param_groups[0]
        for p in self.params:
            if p not in self.state:  # torch's lazy state: a float32 step (fused), zero moments
                self.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                 "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        states = [self.state[p] for p in self.params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        torch._fused_adam_(self.params, grads, [s["exp_avg"] for s in states],
                           [s["exp_avg_sq"] for s in states], [], steps, amsgrad=False,
                           lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=0.0,
                           eps=group["eps"], maximize=False, grad_scale=None, found_inf=None)

    def state_dict(self) -> dict:
        return {"state": {i: dict(self.state[p]) for i, p in enumerate(self.params)
                          if p in self.state},
                "param_groups": [dict(self.param_groups[0],
                                      params=list(range(len(self.params))))]}

    def load_state_dict(self, state_dict: dict):
        import torch

        _load_group(self.param_groups[0], state_dict, len(self.params), ("lr", "betas", "eps"))
        self.state = {}
        for i, saved in state_dict["state"].items():
            p = self.params[int(i)]
            self.state[p] = {"step": saved["step"].to(dtype=torch.float32).clone(),
                             "exp_avg": saved["exp_avg"].to(dtype=p.dtype).clone(),
                             "exp_avg_sq": saved["exp_avg_sq"].to(dtype=p.dtype).clone()}


class _ServerSGD:
    """torch.optim.SGD's step on CPU tensors (no momentum, no decay: `p.add_(g, alpha=-lr)`,
    its single-tensor path), with its `state_dict()` layout, without importing torch._dynamo."""

    def __init__(self, params, lr):
        self.params = params
        self.param_groups = [{"lr": float(lr), "momentum": 0, "dampening": 0, "weight_decay": 0,
                              "nesterov": False, "maximize": False, "foreach": None,
                              "differentiable": False, "fused": None}]
        self.state: dict = {}

    def step(self, grads):
        lr = self.param_groups[0]["lr"]
        for p, g in zip(self.params, grads):
            p.add_(g, alpha=-lr)

    def state_dict(self) -> dict:
        return {"state": {}, "param_groups": [dict(self.param_groups[0],
                                                   params=list(range(len(self.params))))]}

    def load_state_dict(self, state_dict: dict):
        _load_group(self.param_groups[0], state_dict, len(self.params), ("lr",))


def _load_group(group: dict, state_dict: dict, n_params: int, keys):
    """Take the saved hyperparameters (as torch's load_state_dict does) after checking that the
    saved optimizer had the same parameters."""
    saved = state_dict["param_groups"]
    if len(saved) != 1 or len(saved[0]["params"]) != n_params:
        raise ValueError("optimizer state: the saved parameter groups do not match this model")
    for key in keys:
        group[key] = tuple(saved[0][key]) if key == "betas" else float(saved[0][key])


class ServerOptimizer:
    """Adam (default) or SGD over the global arrays, kept as torch tensors.

    The arrays handed out by `arrays()` share memory with the tensors, so clients read the
    current model without copies. Rows with a zero gradient still move under Adam's
    momentum, as in the reference (a dense torch Adam over the whole table).
    """

    def __init__(self, arrays, kind="adam", lr=2e-3, betas=(0.9, 0.999), eps=1e-8):
        import torch

        self.params = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in arrays]
        self._views = None
        if kind == "adam":
            # fused: one pass over each array per step instead of the foreach path's seven
            # (~0.3 ms less per round on ML-1M's 3706 x 64 table, one thread)
            self.opt = _ServerAdam(self.params, lr, betas, eps)
        elif kind == "sgd":
            self.opt = _ServerSGD(self.params, lr)
        else:
            raise ValueError(f"unknown server optimizer {kind!r}")

    def arrays(self) -> list:
        # the numpy views of the parameters' storage, made once (until `relocate` moves it):
        # a round asks several times, and each p.numpy() costs a few microseconds
        if self._views is None:
            self._views = [p.numpy() for p in self.params]
        return list(self._views)

    def item_state(self) -> dict:
        """The item table's optimizer state, as read-only views (no copies).

        Adam: {"optimizer": "adam", "lr", "betas", "eps", "step" (steps taken),
        "exp_avg", "exp_avg_sq" (None before the first step)}; SGD: {"optimizer": "sgd", "lr"}.
        """
        group = self.opt.param_groups[0]
        if not isinstance(self.opt, _ServerAdam):
            return {"optimizer": "sgd", "lr": float(group["lr"])}
        state = self.opt.state.get(self.params[0], {})
        moments = [None, None]
        if state:
            moments = [state[k].numpy() for k in ("exp_avg", "exp_avg_sq")]
            for a in moments:
                a.flags.writeable = False
        return {"optimizer": "adam", "lr": float(group["lr"]), "betas": tuple(group["betas"]),
                "eps": float(group["eps"]), "step": int(state["step"]) if state else 0,
                "exp_avg": moments[0], "exp_avg_sq": moments[1]}

    def relocate(self, alloc):
        """Move the parameters into buffers from alloc(shape, dtype) (e.g. shared memory).

        Same tensors (the optimizer and its state keep referring to them), same values; later
        steps write into the new buffers in place.
        """
        import torch

        for p in self.params:
            buf = alloc(tuple(p.shape), np.float32)
            buf[...] = p.numpy()
            p.set_(torch.from_numpy(buf))
        self._views = None

    def step(self, grads):
        import torch

        self.opt.step([torch.from_numpy(np.asarray(g, dtype=np.float32)) for g in grads])

    def state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, state):
        self.opt.load_state_dict(state)
