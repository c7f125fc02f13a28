"""Baselines in the same table as MGradInv. Each returns (candidate ids, scores, user row or
None) from what the server holds: observed uploads, round models, |P| = n/q.

- random: uniform scores (seeded): F1 ~ the base rate |P| / |candidates|, AUC ~ 0.5;
- sign split (MF): every uploaded MF row is c_i * u (+ wd * v_i, known), with c_i < 0 for a
  positive and > 0 for a negative (BCE: -sigmoid(-s)/n against q*sigmoid(s)/n; BPR: +-G).
  So the rows minus wd*V are rank one, the top singular vector is +-u/|u|, and the sign of
  each row's projection splits positives from negatives, up to ONE global sign. The sign is
  resolved by simulating both (u = +-alpha*e over a grid of alpha, labels from the split) and
  keeping the one whose upload is closer to the observed one; the oracle-sign variant
  reports the better of the two (an upper bound). On NCF the same projection is a heuristic
  (the rows are not rank one);
- intersection: an id in every observed upload scores higher (with fresh negatives the
  positives are what uploads share; with static negatives every upload has the same ids, so
  it is no better than random);
- IMIA-style iterative selection (Yuan et al., WWW'23): a random user row, then rounds of
  (fit u to the current labels by gradient matching; label as positive the ids whose observed
  row is closer to the simulated positive row than to the negative one), the positive set
  growing by 20% of |P| per round.
"""

from __future__ import annotations

import numpy as np
import torch

from fedrec.privacy.inversion import _distance, _target, candidate_ids
from fedrec.privacy.simulator import DT


def random_guess(observations, seed: int):
    cand = candidate_ids(observations)
    return cand, np.random.default_rng([int(seed), 7]).random(len(cand)) - 0.5, None


def intersection(observations, seed: int):
    ids = np.concatenate([o.item_ids for o in observations])
    uniq, counts = np.unique(ids, return_counts=True)
    tie = np.random.default_rng([int(seed), 11]).random(len(uniq)) * 1e-3
    return uniq, counts - len(observations) + 0.5 + tie, None


def _hard_upload_distance(rm, o, U, x):
    with torch.no_grad():
        f = rm.forward(U)
        c = rm.relaxed_coefficients(f["s"], x, o.num_examples)
        rows, pred, _ = rm.upload(f, c)
        orows, opred = _target(o)
        return _distance(rows, pred, orows, opred, "l2")


def sign_split(observation, rm, n_positive: int, oracle_labels=None):
    """-> (ids, scores, user row) from one upload. oracle_labels (scoring only): pick the
    global sign that agrees with them (the oracle-sign variant)."""
    R = observation.item_rows.astype(np.float64) - rm.wd * rm.V.numpy()
    _, sv, vt = np.linalg.svd(R, full_matrices=False)
    e = vt[0]
    p = R @ e  # rows = c * alpha * e: positives have p < 0 when alpha > 0
    if oracle_labels is not None:
        sign = 1.0 if np.mean(-p[oracle_labels]) >= np.mean(-p[~oracle_labels]) else -1.0
        return rm.ids, -sign * p, sign * e
    # resolve the sign by simulation: u = s * alpha * e, labels = top-|P| of -s*p
    alphas = np.geomspace(1e-3, 10.0, 40)
    best = (np.inf, 1.0, 1.0)
    for sgn in (1.0, -1.0):
        lab = np.zeros(len(p))
        lab[np.argsort(sgn * p)[:n_positive]] = 1.0
        U = torch.as_tensor(sgn * alphas[:, None] * e[None], dtype=DT)
        X = torch.as_tensor(np.repeat(lab[None], len(alphas), 0), dtype=DT)
        dist = _hard_upload_distance(rm, observation, U, X).numpy()
        i = int(np.argmin(dist))
        if dist[i] < best[0]:
            best = (dist[i], sgn, alphas[i])
    _, sgn, alpha = best
    return rm.ids, -sgn * p, sgn * alpha * e


def imia(observation, rm, n_positive: int, user_scale: float, seed: int, rounds: int = 5,
         steps: int = 60, lr: float = 0.1):
    gen = torch.Generator().manual_seed(int(seed))
    m = rm.m
    rng = np.random.default_rng([int(seed), 13])
    x = np.zeros(m)
    x[rng.choice(m, size=max(1, n_positive // 5), replace=False)] = 1.0
    w = torch.randn(1, rm.V.shape[1], generator=gen, dtype=DT).requires_grad_()
    orows, opred = _target(observation)
    n = float(observation.num_examples)
    margin = np.zeros(m)
    for it in range(rounds):
        X = torch.as_tensor(x[None], dtype=DT)
        opt = torch.optim.Adam([w], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            f = rm.forward(user_scale * w)
            rows, pred, _ = rm.upload(f, rm.relaxed_coefficients(f["s"], X, n))
            loss = _distance(rows, pred, orows, opred, "cos").sum()
            loss.backward()
            opt.step()
        with torch.no_grad():  # per id: observed row against its positive and negative form
            f = rm.forward(user_scale * w)
            s, g = f["s"][0], f["ds_dv"][0]
            q = rm.q
            c_pos = -q * torch.sigmoid(-s) / n
            c_neg = q * torch.sigmoid(s) / n * (n / max(m - x.sum(), 1.0))
            wdv = rm.wd * rm.V
            d_pos = ((c_pos[:, None] * g + wdv - orows) ** 2).sum(1)
            d_neg = ((c_neg[:, None] * g + wdv - orows) ** 2).sum(1)
            margin = (d_neg - d_pos).numpy()
        size = int(round(n_positive * min(1.0, 0.2 * (it + 2))))
        x = np.zeros(m)
        x[np.argsort(-margin, kind="mergesort")[:size]] = 1.0
    return rm.ids, margin, (user_scale * w[0]).detach().numpy()
