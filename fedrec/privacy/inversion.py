"""MGradInv: invert k observed uploads of one client for its positives and its user row.

Unknowns: z (one logit per candidate id; x = sigmoid(z), 1 = positive) and the user row. The
candidates are the ids present in every observed upload (a client uploads all its positives
every round; an id missing from one upload is a negative). Objective, summed over the k
observed rounds t_1 < ... < t_k:

    sum_k D(sim(x, u_k; theta_{t_k}), observed_k) + lam * ((sum x - n/q) / m)^2

with D = 1 - cosine (Inverting Gradients) or squared L2 relative to |observed|^2 (DLG), over
the concatenation [item rows | predictor gradients]. The user row is
- "coupled": one u, carried from t_k to t_{k+1} by replaying the client's own step
  (u <- u - user_lr * dL/du, from the same simulation; exact under user_optimizer: sgd when
  the client trains only in the observed rounds within the window, as `runner.Schedule`
  arranges);
- "shared": one u for all rounds (no replay);
- "free": one u_k per round (when private optimizer state makes the coupling impossible).
k = 1 is single-step inversion. Adam (lr 0.1, restarts batched) or L-BFGS; the restart with the
lowest objective wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedrec.privacy.simulator import DT, RoundModel


@dataclass
class AttackConfig:
    distance: str = "cos"  # cos | l2
    optimizer: str = "adam"  # adam | lbfgs
    iterations: int = 300
    restarts: int = 4
    lr: float = 0.1
    lam: float = 1.0
    user_mode: str = "coupled"  # coupled | shared | free
    user_lr: float = 1.0  # the protocol's user-row SGD rate (public)


@dataclass
class AttackResult:
    candidates: np.ndarray  # ids scored
    scores: np.ndarray  # membership score per candidate (higher = positive)
    user: np.ndarray  # the recovered user row at t_1
    objective: float


def candidate_ids(observations) -> np.ndarray:
    ids = observations[0].item_ids
    for o in observations[1:]:
        ids = np.intersect1d(ids, o.item_ids)
    return ids


def _target(o):
    rows = torch.as_tensor(o.item_rows, dtype=DT)
    pred = [torch.as_tensor(p, dtype=DT) for p in o.predictor]
    return rows, pred


def _distance(rows, pred, obs_rows, obs_pred, kind):
    """(B,) distance of simulated uploads (batched) to one observed upload."""
    B = rows.shape[0]
    a = torch.cat([rows.reshape(B, -1)] + [p.reshape(B, -1) for p in pred], 1)
    b = torch.cat([obs_rows.reshape(-1)] + [p.reshape(-1) for p in obs_pred])
    if kind == "cos":
        return 1 - (a @ b) / (a.norm(dim=1) * b.norm()).clamp_min(1e-30)
    return ((a - b) ** 2).sum(1) / (b @ b).clamp_min(1e-30)


class Inversion:
    """The attack on one target's observed uploads (in round order) and the round models."""

    def __init__(self, observations, round_models: list[RoundModel], n_positive: int,
                 cfg: AttackConfig, user_scale: float):
        self.obs, self.rms, self.cfg = observations, round_models, cfg
        self.n_pos = int(n_positive)
        self.cand = candidate_ids(observations)
        # per round: positions of the candidates among that round's ids
        self.where = [torch.as_tensor(np.searchsorted(rm.ids, self.cand)) for rm in round_models]
        self.targets = [_target(o) for o in observations]
        self.user_scale = float(user_scale)

    def objective(self, z, U):
        """(B,) objective for logits z (B, m) and user rows U (B, d) or (k, B, d) (free)."""
        x = torch.sigmoid(z)
        total = self.cfg.lam * ((x.sum(1) - self.n_pos) / x.shape[1]) ** 2
        u = U if U.dim() == 2 else U[0]
        for k, (rm, o, (orows, opred)) in enumerate(zip(self.rms, self.obs, self.targets)):
            if self.cfg.user_mode == "free":
                u = U[k]
            xk = torch.zeros((x.shape[0], rm.m), dtype=DT)
            xk = xk.index_copy(1, self.where[k], x)
            f = rm.forward(u)
            c = rm.relaxed_coefficients(f["s"], xk, o.num_examples)
            rows, pred, ug = rm.upload(f, c)
            total = total + _distance(rows, pred, orows, opred, self.cfg.distance)
            if self.cfg.user_mode == "coupled":
                u = u - self.cfg.user_lr * ug
        return total

    def run(self, seed: int) -> AttackResult:
        cfg = self.cfg
        gen = torch.Generator().manual_seed(int(seed))
        B, m, d = cfg.restarts, len(self.cand), self.rms[0].V.shape[1]
        z = (0.01 * torch.randn(B, m, generator=gen, dtype=DT)).requires_grad_()
        shape = (len(self.rms), B, d) if cfg.user_mode == "free" else (B, d)
        w = torch.randn(*shape, generator=gen, dtype=DT).requires_grad_()  # u = scale * w

        def loss_fn():
            return self.objective(z, self.user_scale * w)

        if cfg.optimizer == "lbfgs":
            opt = torch.optim.LBFGS([z, w], lr=cfg.lr, max_iter=cfg.iterations,
                                    line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = loss_fn().sum()
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt = torch.optim.Adam([z, w], lr=cfg.lr)
            for _ in range(cfg.iterations):
                opt.zero_grad()
                loss = loss_fn().sum()  # restarts are independent: the sum's grads are theirs
                loss.backward()
                opt.step()
        with torch.no_grad():
            final = loss_fn()
            final = torch.where(torch.isfinite(final), final, torch.full_like(final, np.inf))
            best = int(torch.argmin(final))
            u = self.user_scale * (w[0, best] if cfg.user_mode == "free" else w[best])
            return AttackResult(self.cand, z[best].numpy().copy(), u.numpy().copy(),
                                float(final[best]))
