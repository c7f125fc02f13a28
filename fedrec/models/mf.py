"""Matrix factorisation: score(u, i) = u . v_i, trained with BPR or pointwise BCE (model.loss).

The gradient is written out by hand in numpy, for a whole cohort of clients at once: a
client has ~150 pairs, so per-client autograd (or even per-client numpy) overhead would
cost more than the arithmetic. A single client is a cohort of one, and every operation is
row-wise or a per-client sequential sum, so a client's upload is bit-identical whichever
way it is computed (tests/test_models.py pins this).
"""

from __future__ import annotations

import numpy as np

from fedrec.models.base import (ChunkedPairModel, ClientGrad, client_item_uploads, cohort_layout,
                                dropout_keep_cohort, pairwise_loss,
                                positives_per_negative, xavier_normal)
from fedrec.models.losses import bce_score_grad, bpr_score_grad


class MF(ChunkedPairModel):
    """Dot-product MF. Dropout (inverted) applies to every embedding lookup of every pair."""

    name = "mf"

    def __init__(self, n_items, dim, dropout=0.0, loss="auto", **kwargs):
        super().__init__(n_items, dim, dropout)
        self.loss = pairwise_loss(loss)

    def init_global(self, rng):
        return xavier_normal(rng, (self.n_items, self.dim)), []

    def _chunk_gradients(self, item_table, predictor, users, pos_list, neg_list, rngs, *,
                         weight_decay=0.0, weight_decay_all=False, train=True, arena=None):
        """Per pair n (client c), with inverted dropout u' = s*ku*u, vi' = s*ki*vi,
        vj' = s*kj*vj (k in {0,1}, s = 1/(1-p)):
        - bpr: x = u'.(vi' - vj'), loss = softplus(-x). With D = ku*(ki*vi - kj*vj) and
          G = -sigmoid(-x) * s^2 / n_c:  x = s^2 u.D,  dL/du = sum_n G D,  dL/dvi = G ku*ki*u,
          dL/dvj = -G ku*kj*u;
        - bce: scores xi = s^2 u.Di, xj = s^2 u.Dj with Di = ku*ki*vi, Dj = ku*kj*vj, and the
          pointwise losses of fedrec.models.losses: dL/du = sum_n Gi Di + Gj Dj, and so on.
        Written this way the (pairs x dim) work is ~10 passes over memory; the per-client dot
        products are small matrix-vector products.
        """
        d = self.dim
        counts = np.array([len(p) for p in pos_list], dtype=np.int64)
        n_clients = len(counts)
        bounds, owner = cohort_layout(counts)
        pos = np.concatenate(pos_list).astype(np.int64, copy=False)
        neg = np.concatenate(neg_list).astype(np.int64, copy=False)
        U = np.asarray(np.stack(users), dtype=np.float32)
        n = len(pos)
        vi, vj = np.take(item_table, pos, axis=0), np.take(item_table, neg, axis=0)
        keep = None
        if train and self.dropout > 0:
            keep = dropout_keep_cohort(rngs, bounds, d, self.dropout)
            vi *= keep[1]
            vj *= keep[2]
            scale2 = np.float32(1.0 / (1.0 - self.dropout)) ** 2
        else:
            scale2 = np.float32(1.0)
        if self.loss == "bce":
            q = positives_per_negative(pos_list)[owner]
            user_grads, G_pos, G_neg, pair_loss = _bce_pairs(U, vi, vj, keep, scale2, bounds,
                                                             counts[owner], q)
        else:
            user_grads, G_pos, G_neg, pair_loss = _bpr_pairs(U, vi, vj, keep, scale2, bounds,
                                                             counts[owner])
        user_grads += np.float32(weight_decay) * U
        losses = np.bincount(owner, weights=pair_loss, minlength=n_clients) / np.maximum(counts, 1)
        # item rows: G * (ku * u) * ki for positives, the same with the negatives' G and kj
        gu = np.take(U, owner, axis=0)
        if keep is not None:
            gu *= keep[0]
        rows = np.empty((2 * n, d), dtype=np.float32)
        # bpr: G_neg = -G_pos, and (ku*u) * -G = -((ku*u) * G) exactly
        np.multiply(gu, (-G_pos if G_neg is None else G_neg)[:, None], out=rows[n:])
        np.multiply(gu, G_pos[:, None], out=rows[:n])
        if keep is not None:
            rows[:n] *= keep[1]
            rows[n:] *= keep[2]
        uploads = client_item_uploads(np.concatenate([owner, owner]), np.concatenate([pos, neg]),
                                      rows, n_clients, item_table, weight_decay, weight_decay_all,
                                      arena)
        return [ClientGrad(ids, r, [], user_grads[c], float(losses[c]), int(counts[c]))
                for c, (ids, r) in enumerate(uploads)]

    def score(self, users, item_table, predictor):
        # float64 so that batch and single-user evaluation rank identically
        return np.asarray(users, np.float64) @ np.asarray(item_table, np.float64).T


def _client_matvec(X, U, bounds, out):
    """out[a:b] = X[a:b] @ U[c] per client c: per-client products, so a client's values do
    not depend on the rest of the cohort."""
    for c in range(len(bounds) - 1):
        a, b = bounds[c], bounds[c + 1]
        np.matmul(X[a:b], U[c], out=out[a:b])
    return out


def _client_vecmat(G, X, bounds, n_clients):
    """(n_clients, d): sum over client c's pairs of G[n] X[n], one product per client."""
    out = np.empty((n_clients, X.shape[1]), dtype=np.float32)
    for c in range(n_clients):
        a, b = bounds[c], bounds[c + 1]
        np.matmul(G[a:b], X[a:b], out=out[c])
    return out


def _bpr_pairs(U, vi, vj, keep, scale2, bounds, pairs):
    """(user grads, G, None, per-pair loss) of BPR; vi is overwritten with D."""
    D = np.subtract(vi, vj, out=vi)
    if keep is not None:
        D *= keep[0]
    x = _client_matvec(D, U, bounds, np.empty(len(D), dtype=np.float32))
    x *= scale2
    G, pair_loss = bpr_score_grad(x.astype(np.float64), pairs)
    G *= scale2
    return _client_vecmat(G, D, bounds, len(U)), G, None, pair_loss


def _bce_pairs(U, vi, vj, keep, scale2, bounds, pairs, q):
    """(user grads, G_pos, G_neg, per-pair loss) of the pointwise BCE; vi, vj are overwritten
    with Di = ku*ki*vi and Dj = ku*kj*vj."""
    if keep is not None:
        vi *= keep[0]
        vj *= keep[0]
    x_pos = _client_matvec(vi, U, bounds, np.empty(len(vi), dtype=np.float32)) * scale2
    x_neg = _client_matvec(vj, U, bounds, np.empty(len(vj), dtype=np.float32)) * scale2
    G_pos, G_neg, pair_loss = bce_score_grad(x_pos.astype(np.float64), x_neg.astype(np.float64),
                                             pairs, q)
    G_pos *= scale2
    G_neg *= scale2
    n_clients = len(U)
    user_grads = _client_vecmat(G_pos, vi, bounds, n_clients)
    user_grads += _client_vecmat(G_neg, vj, bounds, n_clients)
    return user_grads, G_pos, G_neg, pair_loss
