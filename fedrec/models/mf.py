"""Matrix factorisation with BPR: score(u, i) = u . v_i.

The gradient is written out by hand in numpy, for a whole cohort of clients at once: a
client has ~150 pairs, so per-client autograd (or even per-client numpy) overhead would
cost more than the arithmetic. A single client is a cohort of one, and every operation is
row-wise or a per-client sequential sum, so a client's upload is bit-identical whichever
way it is computed (tests/test_models.py pins this).
"""

from __future__ import annotations

import numpy as np

from fedrec.models.base import (ClientGrad, CohortModel, dropout_bits, dropout_threshold,
                                segment_sum, xavier_normal)


class MF(CohortModel):
    """Dot-product MF. Dropout (inverted) applies to every embedding lookup of every pair."""

    name = "mf"

    def init_global(self, rng):
        return xavier_normal(rng, (self.n_items, self.dim)), []

    def init_user(self, rng):
        std = np.sqrt(2.0 / (self.n_items + self.dim))
        return (rng.standard_normal(self.dim) * std).astype(np.float32)

    def gradients_cohort(self, item_table, predictor, users, pos_list, neg_list, rngs, *,
                         weight_decay=0.0, weight_decay_all=False, train=True):
        """Per pair n (client c): x = u'.(vi' - vj'), loss = softplus(-x), with inverted dropout
        u' = s*ku*u, vi' = s*ki*vi, vj' = s*kj*vj (k in {0,1}, s = 1/(1-p)). With
        D = ku*(ki*vi - kj*vj) and G = -sigmoid(-x) * s^2 / n_c:
            x = s^2 u.D,   dL/du = sum_n G D,   dL/dvi = G ku*ki*u,   dL/dvj = -G ku*kj*u.
        Written this way the (pairs x dim) work is ~10 passes over memory; the per-client dot
        products are small matrix-vector products.
        """
        d, n_items = self.dim, self.n_items
        counts = np.array([len(p) for p in pos_list], dtype=np.int64)
        n_clients = len(counts)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        owner = np.repeat(np.arange(n_clients), counts)
        pos = np.concatenate(pos_list).astype(np.int64, copy=False)
        neg = np.concatenate(neg_list).astype(np.int64, copy=False)
        U = np.asarray(np.stack(users), dtype=np.float32)
        n = len(pos)
        vi, vj = item_table[pos], item_table[neg]
        drop = train and self.dropout > 0
        if drop:
            # each client draws its own bits (laid out mask, pair, dim); one compare for all
            bits = np.empty((3, n, d), dtype=np.uint16)
            for c, r in enumerate(rngs):
                a, b = bounds[c], bounds[c + 1]
                bits[:, a:b, :] = dropout_bits(r, 3 * int(b - a) * d).reshape(3, b - a, d)
            keep = bits >= dropout_threshold(self.dropout)
            vi *= keep[1]
            vj *= keep[2]
            scale2 = np.float32(1.0 / (1.0 - self.dropout)) ** 2
        else:
            scale2 = np.float32(1.0)
        D = np.subtract(vi, vj, out=vi)
        if drop:
            D *= keep[0]
        x = np.empty(n, dtype=np.float32)
        for c in range(n_clients):
            a, b = bounds[c], bounds[c + 1]
            np.matmul(D[a:b], U[c], out=x[a:b])
        x *= scale2
        x64 = x.astype(np.float64)
        # BPR: loss = softplus(-x), dloss/dx = -sigmoid(-x); each client averages its pairs
        G = ((-0.5 * (1.0 + np.tanh(-0.5 * x64))) / counts[owner]).astype(np.float32) * scale2
        user_grads = np.empty((n_clients, d), dtype=np.float32)
        for c in range(n_clients):
            a, b = bounds[c], bounds[c + 1]
            np.matmul(G[a:b], D[a:b], out=user_grads[c])
        user_grads += np.float32(weight_decay) * U
        losses = np.bincount(owner, weights=np.logaddexp(0.0, -x64),
                             minlength=n_clients) / np.maximum(counts, 1)
        # item rows: G * (ku * u) * ki for positives, the negative of that with kj for negatives
        gu = U[owner]
        if drop:
            gu *= keep[0]
        gu *= G[:, None]
        rows = np.empty((2 * n, d), dtype=np.float32)
        if drop:
            np.multiply(gu, keep[1], out=rows[:n])
            np.multiply(gu, keep[2], out=rows[n:])
        else:
            rows[:n] = gu
            rows[n:] = gu
        np.negative(rows[n:], out=rows[n:])
        keys = np.concatenate([owner * n_items + pos, owner * n_items + neg])
        uniq, inv = np.unique(keys, return_inverse=True)
        item_rows = segment_sum(inv, rows, len(uniq))
        key_owner, key_item = np.divmod(uniq, n_items)
        kb = np.searchsorted(key_owner, np.arange(n_clients + 1))
        out = []
        for c in range(n_clients):
            ids = key_item[kb[c] : kb[c + 1]]
            r = item_rows[kb[c] : kb[c + 1]]
            if weight_decay_all:
                full = np.float32(weight_decay) * item_table
                full[ids] += r
                ids, r = np.arange(n_items), full
            elif weight_decay:
                r += np.float32(weight_decay) * item_table[ids]
            out.append(ClientGrad(ids, r, [], user_grads[c], float(losses[c]), int(counts[c])))
        return out

    def score(self, users, item_table, predictor):
        # float64 so that batch and single-user evaluation rank identically
        return np.asarray(users, np.float64) @ np.asarray(item_table, np.float64).T
