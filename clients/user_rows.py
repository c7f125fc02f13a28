"""The private user row's optimizer, on the device (MF and NCF; sequential models have none).

`train.user_optimizer`:
- `adam_sync` replays exactly what the reference's server-side Adam does to the row, the
  momentum-only steps of the rounds the user sat out included (`catch_up`, closed form);
- `adam`: Adam steps counted in the user's own rounds;
- `sgd`: row -= lr * grad.
Every function works row-wise on a stacked cohort (U, M, V), so a row's numbers do not depend
on the cohort it is computed in.
"""

from __future__ import annotations

import numpy as np

from fedrec.optim import adam_catch_up, adam_step


def hyperparameters(cfg) -> tuple:
    """(lr, beta1, beta2, eps) of the user row: train.user_lr (< 0: server.lr), server betas."""
    s = cfg.server
    lr = cfg.train.user_lr if cfg.train.user_lr >= 0 else s.lr
    return lr, float(s.betas[0]), float(s.betas[1]), float(s.eps)


def catch_up(cfg, U, M, V, last_rounds, to_round: int):
    """adam_sync: the momentum-only steps from each row's last round to `to_round`, in place."""
    if cfg.train.user_optimizer == "adam_sync" and len(U):
        adam_catch_up(U, M, V, list(last_rounds), [to_round] * len(U), *hyperparameters(cfg))


def step(cfg, states, U, M, V, grads: np.ndarray, rnd: int):
    """The cohort's user-row step, in place on U, M, V; advances each state's clock."""
    kind = cfg.train.user_optimizer
    lr, b1, b2, eps = hyperparameters(cfg)
    if kind == "adam_sync":
        adam_step(U, M, V, grads, rnd, lr, b1, b2, eps)
    elif kind == "adam":
        adam_step(U, M, V, grads, [int(s["clock"][1]) + 1 for s in states], lr, b1, b2, eps)
    else:
        U -= (lr * grads).astype(U.dtype)
    for s in states:
        s["clock"][0] = rnd
        s["clock"][1] += 1
