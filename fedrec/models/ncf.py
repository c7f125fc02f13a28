"""Neural collaborative filtering, in two forms (`model.ncf_form`):

- neumf (FedAttack's, the default): GMF plus a 2-layer tanh MLP, summed,
      score(u, i) = h . (u * v_i) + w . tanh(W2 tanh(W1 [u; v_i] + b1) + b2) + b
- mlp (PipAttack's base recommender): the MLP part alone, score = w . tanh(...) + b,
  with P(interaction) = sigmoid(score) under the pointwise BCE loss.

The predictor (h, W1, b1, W2, b2, w, b; no h in the mlp form) is global; u is private; V is
the item table. Trained with BPR or pointwise BCE (`model.loss`, fedrec.models.losses).

The gradient is written out by hand in numpy for a whole cohort at once, replacing one torch
autograd graph per client. Elementwise work runs over the cohort's concatenated rows; every
product that sums over rows or features runs per client on that client's block, so a client's
upload is bit-identical alone or in a cohort (tests/test_models.py pins this). Without dropout
a client's rows share u, so the first layer's user half is one vector per client.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedrec.models.base import (ChunkedPairModel, ClientGrad, client_item_uploads, cohort_layout,
                                dropout_bits, dropout_threshold, pairwise_loss,
                                positives_per_negative, segment_sum, xavier_normal)
from fedrec.models.losses import bce_score_grad, bpr_score_grad

NCF_FORMS = ("neumf", "mlp")


@dataclass
class NCFWeights:
    """The predictor arrays by name; gmf_h is None in the mlp form."""

    gmf_h: np.ndarray | None
    mlp_w1: np.ndarray  # (h1, 2d), acting on [u; v]
    mlp_b1: np.ndarray
    mlp_w2: np.ndarray  # (h2, h1)
    mlp_b2: np.ndarray
    out_w: np.ndarray  # (h2,)
    out_b: np.ndarray  # (1,)

    @classmethod
    def from_list(cls, arrays, form: str) -> NCFWeights:
        arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
        return cls(*arrays) if form == "neumf" else cls(None, *arrays)

    def to_list(self) -> list:
        rest = [self.mlp_w1, self.mlp_b1, self.mlp_w2, self.mlp_b2, self.out_w, self.out_b]
        return rest if self.gmf_h is None else [self.gmf_h] + rest


class NCF(ChunkedPairModel):
    name = "ncf"

    def __init__(self, n_items, dim, dropout=0.0, mlp_layers=(64, 32), loss="auto",
                 ncf_form="neumf", **kwargs):
        super().__init__(n_items, dim, dropout)
        if len(mlp_layers) != 2:
            raise ValueError("NCF takes exactly two MLP widths (model.mlp_layers)")
        if ncf_form not in NCF_FORMS:
            raise ValueError(f"model.ncf_form: expected one of {NCF_FORMS}, got {ncf_form!r}")
        self.h1, self.h2 = int(mlp_layers[0]), int(mlp_layers[1])
        self.loss = pairwise_loss(loss)
        self.form = ncf_form

    @property
    def predictor_shapes(self):
        d, h1, h2 = self.dim, self.h1, self.h2
        mlp = [(h1, 2 * d), (h1,), (h2, h1), (h2,), (h2,), (1,)]
        return [(d,)] + mlp if self.form == "neumf" else mlp

    def init_global(self, rng):
        d, h1, h2 = self.dim, self.h1, self.h2
        mlp = [
            xavier_normal(rng, (h1, 2 * d)), np.zeros(h1, np.float32),
            xavier_normal(rng, (h2, h1)), np.zeros(h2, np.float32),
            xavier_normal(rng, (1, h2))[0].copy(), np.zeros(1, np.float32),
        ]
        gmf = [np.full(d, 1.0, dtype=np.float32)] if self.form == "neumf" else []  # a dot product
        return xavier_normal(rng, (self.n_items, d)), gmf + mlp

    def _chunk_gradients(self, item_table, predictor, users, pos_list, neg_list, rngs, *,
                         weight_decay=0.0, weight_decay_all=False, train=True, arena=None):
        """Client c's block of rows: its n_c positive rows then its n_c negative rows, each
        row a = [u'; v'] with inverted dropout (u' = s*ku*u, shared by a pair's two rows;
        v' = s*kv*v; masks drawn from the client's generator as MF's). Loss (mean over the
        client's pairs) + wd/2 (|u|^2 + |P|^2 + touched rows |v|^2, or every row for
        weight_decay_all: added to the upload densely)."""
        W = NCFWeights.from_list(predictor, self.form)
        d = self.dim
        counts = np.array([len(p) for p in pos_list], dtype=np.int64)
        n_clients = len(counts)
        bounds, owner = cohort_layout(counts)
        blocks = 2 * bounds  # client c's rows
        row_owner = np.repeat(np.arange(n_clients), 2 * counts)
        items = np.concatenate([np.asarray(x, np.int64) for p, n in zip(pos_list, neg_list)
                                for x in (p, n)] or [np.zeros(0, np.int64)])
        U = np.asarray(np.stack(users), dtype=np.float32)
        V = np.take(item_table, items, axis=0)
        Ur = mask = None  # no dropout: a client's rows share its u (see _forward)
        if train and self.dropout > 0:
            mask = _dropout_mask(rngs, counts, blocks, d, self.dropout)
            Ur = np.take(U, row_owner, axis=0) * mask[:, :d]
            V *= mask[:, d:]
        Ha, Z, S, VU = _forward(Ur, U, V, W, blocks)
        # pair k (client c) scores at rows blocks[c] + (k - bounds[c]) and that + n_c
        pos_rows = np.arange(len(owner)) + bounds[owner]
        neg_rows = pos_rows + counts[owner]
        dS = np.empty_like(S)
        if self.loss == "bce":
            q = positives_per_negative(pos_list)[owner]
            dS[pos_rows], dS[neg_rows], pair_loss = bce_score_grad(
                S[pos_rows].astype(np.float64), S[neg_rows].astype(np.float64), counts[owner], q)
        else:
            x = (S[pos_rows] - S[neg_rows]).astype(np.float64)
            G, pair_loss = bpr_score_grad(x, counts[owner])
            dS[pos_rows], dS[neg_rows] = G, -G
        losses = np.bincount(owner, weights=pair_loss, minlength=n_clients) / np.maximum(counts, 1)
        grads, dU, dV = _backward(Ur, None if mask is None else mask[:, :d], U, V, Ha, Z, VU, dS,
                                  W, blocks)
        if mask is not None:
            dV *= mask[:, d:]
        wd = np.float32(weight_decay)
        uploads = client_item_uploads(row_owner, items, dV, n_clients, item_table,
                                      weight_decay, weight_decay_all, arena)
        # weight decay over the stacked clients: elementwise, the same numbers as per client
        user_grads = dU + wd * U
        pred = [g + wd * p for g, p in zip(grads.to_list(), W.to_list())]
        return [ClientGrad(ids, rows, [g[c] for g in pred], user_grads[c], float(losses[c]),
                           int(counts[c])) for c, (ids, rows) in enumerate(uploads)]

    def score(self, users, item_table, predictor):
        """(B, N) scores, the MLP's (users x items x h1) activations built a few users at a
        time (~4 MB, so they stay in cache between the layers).

        Each tanh is computed as 2 sigmoid(2x) - 1 with the 2s and -1s folded into the
        weights (`_sigmoid_form`): the same function, but torch's float32 tanh costs ~4 ns an
        element on the CPUs measured, its sigmoid ~1 ns, and the elementwise work over
        users x items x h1 is most of a full ranking (benchmarks/ncf_score.py). Scores agree
        with the tanh form to float32 rounding (tests/test_models.py)."""
        import torch  # here only: training is numpy, and a deployment's ClientApp (a process per
        # message) then imports torch on evaluation rounds alone

        W = NCFWeights.from_list(predictor, self.form)
        w1u, w1v, b1, w2, b2, wo, bo = (torch.from_numpy(a) for a in _sigmoid_form(W, self.dim))
        u_all = torch.from_numpy(np.asarray(users, dtype=np.float32))
        v = torch.from_numpy(np.asarray(item_table, dtype=np.float32))
        n_items = v.shape[0]
        item_part = torch.addmm(b1, v, w1v.T)  # (N, h1), shared by every user
        user_part = u_all @ w1u.T  # (B, h1)
        gmf = None if W.gmf_h is None else (u_all * torch.from_numpy(W.gmf_h)) @ v.T  # (B, N)
        chunk = max(1, int(SCORE_CHUNK_ELEMENTS // max(1, n_items * self.h1)))
        out = torch.empty((u_all.shape[0], n_items), dtype=torch.float32)
        for start in range(0, u_all.shape[0], chunk):
            stop = min(start + chunk, u_all.shape[0])
            hidden = user_part[start:stop, None, :] + item_part[None, :, :]  # (b, N, h1)
            torch.sigmoid_(hidden)
            z = torch.addmm(b2, hidden.view(-1, self.h1), w2.T)
            torch.sigmoid_(z)
            s = torch.addmv(bo, z, wo).view(stop - start, n_items)
            if gmf is not None:
                s += gmf[start:stop]
            out[start:stop] = s
        return out.numpy().astype(np.float64)


# elements of one chunk of score()'s (users x items x h1) activations: 4 MB of float32
SCORE_CHUNK_ELEMENTS = 1 << 20


def _sigmoid_form(W: NCFWeights, d: int) -> list:
    """The MLP's weights for tanh(x) = 2 sigmoid(2x) - 1 (folded in float64, then float32):
        tanh(W1u u + W1v v + b1)   = 2 s1 - 1,  s1 = sigmoid(2 W1u u + 2 W1v v + 2 b1)
        tanh(W2 (2 s1 - 1) + b2)   = 2 s2 - 1,  s2 = sigmoid(4 W2 s1 + 2 (b2 - W2 1))
        w . (2 s2 - 1) + b         = 2 w . s2 + (b - w . 1)
    Returns (2 W1u, 2 W1v, 2 b1, 4 W2, 2 (b2 - W2 1), 2 w, b - w . 1)."""
    w1 = W.mlp_w1.astype(np.float64)
    w2 = W.mlp_w2.astype(np.float64)
    wo = W.out_w.astype(np.float64)
    folded = [2 * w1[:, :d], 2 * w1[:, d:], 2 * W.mlp_b1.astype(np.float64), 4 * w2,
              2 * (W.mlp_b2.astype(np.float64) - w2.sum(axis=1)), 2 * wo,
              W.out_b.astype(np.float64) - wo.sum()]
    return [np.ascontiguousarray(a, dtype=np.float32) for a in folded]


def _dropout_mask(rngs, counts, blocks, d: int, p: float) -> np.ndarray:
    """(rows, 2d) inverted-dropout multipliers: per client 3 x n_c x d draws (user, positive
    item, negative item masks per pair, as MF), the user mask shared by a pair's two rows."""
    mask = np.empty((int(blocks[-1]), 2 * d), dtype=np.float32)
    scale, threshold = np.float32(1.0 / (1.0 - p)), dropout_threshold(p)
    for c, (r, n) in enumerate(zip(rngs, counts)):
        n = int(n)
        keep = (dropout_bits(r, 3 * n * d) >= threshold).reshape(3, n, d)
        block = mask[blocks[c] : blocks[c + 1]]
        block[:n, :d] = keep[0]
        block[n:, :d] = keep[0]
        block[:n, d:] = keep[1]
        block[n:, d:] = keep[2]
    mask *= scale
    return mask


def _forward(Ur, U, V, W: NCFWeights, blocks):
    """(tanh hidden 1, tanh hidden 2, scores, v' * u' per row or None) of rows [u'; v'], one
    client's block at a time (its ~300 rows stay in the core's cache through every layer:
    ~1.2x faster than each step over the whole chunk; elementwise, so the same numbers). Ur:
    the rows' dropped-out u', or None without dropout, where a client's rows all share u and
    its share of the first layer is one vector (half the first layer's work)."""
    d = V.shape[1]
    w1u, w1v = W.mlp_w1[:, :d], W.mlp_w1[:, d:]
    Ha = np.empty((len(V), len(W.mlp_b1)), dtype=np.float32)
    Z = np.empty((len(V), len(W.mlp_b2)), dtype=np.float32)
    S = np.empty(len(V), dtype=np.float32)
    VU = None if W.gmf_h is None else np.empty_like(V)
    for c, (a, b) in enumerate(zip(blocks[:-1].tolist(), blocks[1:].tolist())):
        ha = np.matmul(V[a:b], w1v.T, out=Ha[a:b])
        ha += U[c] @ w1u.T if Ur is None else Ur[a:b] @ w1u.T
        ha += W.mlp_b1
        np.tanh(ha, out=ha)
        z = np.matmul(ha, W.mlp_w2.T, out=Z[a:b])
        z += W.mlp_b2
        np.tanh(z, out=z)
        s = np.matmul(z, W.out_w, out=S[a:b])
        if VU is not None:
            s += np.multiply(V[a:b], U[c] if Ur is None else Ur[a:b], out=VU[a:b]) @ W.gmf_h
        s += W.out_b[0]
    return Ha, Z, S, VU


def _backward(Ur, user_mask, U, V, Ha, Z, VU, dS, W: NCFWeights, blocks):
    """(per-client predictor gradients (each array stacked over clients), dL/du per client,
    dL/dv' per row); Ur and VU as in _forward, user_mask Ur's dropout multipliers (dL/du'
    goes through them before the per-client sum). One client's block at a time, as _forward.
    Ha and Z are overwritten."""
    d = V.shape[1]
    w1u, w1v = W.mlp_w1[:, :d], W.mlp_w1[:, d:]
    pairs = list(zip(blocks[:-1].tolist(), blocks[1:].tolist()))
    n_clients, gmf = len(pairs), W.gmf_h is not None
    g_out_w = np.empty((n_clients,) + W.out_w.shape, dtype=np.float32)
    g_w2 = np.empty((n_clients,) + W.mlp_w2.shape, dtype=np.float32)
    g_b2 = np.empty((n_clients,) + W.mlp_b2.shape, dtype=np.float32)
    g_w1 = np.empty((n_clients,) + W.mlp_w1.shape, dtype=np.float32)
    g_b1 = np.empty((n_clients,) + W.mlp_b1.shape, dtype=np.float32)
    g_h = np.empty((n_clients, d), dtype=np.float32) if gmf else None
    dZ, dH, dV = np.empty_like(Z), np.empty_like(Ha), np.empty_like(V)
    for c, (a, b) in enumerate(pairs):
        ds = dS[a:b]
        # Z and Ha are consumed in place once their own products are taken (fewer passes
        # over memory; the same operations as dZ *= 1 - Z*Z, dH *= 1 - Ha*Ha)
        g_out_w[c] = ds @ Z[a:b]
        dz = np.multiply(ds[:, None], W.out_w, out=dZ[a:b])
        dz *= _one_minus_square(Z[a:b])  # through tanh
        g_w2[c] = dz.T @ Ha[a:b]
        dh = np.matmul(dz, W.mlp_w2, out=dH[a:b])
        dh *= _one_minus_square(Ha[a:b])
        dv = np.matmul(dh, w1v, out=dV[a:b])
        np.matmul(dh.T, V[a:b], out=g_w1[c, :, d:])
        if gmf:
            g_h[c] = ds @ VU[a:b]
            rows = np.multiply(ds[:, None], W.gmf_h)
            rows *= U[c] if Ur is None else Ur[a:b]  # times u'
            dv += rows
    # the bias gradients: every client's column sums in one sequential segment sum per layer,
    # its rows added one after another from 0.0 as numpy's sum(0) of one client's
    # C-contiguous block adds them (so the same bits), not 2 numpy sums per client
    row_client = np.repeat(np.arange(n_clients), np.diff(blocks))
    segment_sum(row_client, dZ, n_clients, out=g_b2)
    segment_sum(row_client, dH, n_clients, out=g_b1)
    if Ur is None:  # every row's u' is u: sum over the rows first
        dU = np.stack([g @ w1u for g in g_b1]) if pairs else np.zeros((0, d), np.float32)
        np.multiply(g_b1[:, :, None], U[:, None, :], out=g_w1[:, :, :d])  # np.outer per client
        if gmf:
            dU += W.gmf_h * np.stack([dS[a:b] @ V[a:b] for a, b in pairs])
    else:  # per-row dL/du' through the mask, then summed per client
        dUr = np.empty_like(Ur)
        for c, (a, b) in enumerate(pairs):
            np.matmul(dH[a:b].T, Ur[a:b], out=g_w1[c, :, :d])
            np.matmul(dH[a:b], w1u, out=dUr[a:b])
        if gmf:
            dUr += dS[:, None] * W.gmf_h * V
        dUr *= user_mask
        dU = _client_sums(dUr, pairs)
    grads = NCFWeights(g_h, g_w1, g_b1, g_w2, g_b2, g_out_w,
                       np.stack([dS[a:b].sum(0, keepdims=True) for a, b in pairs]))
    return grads, dU, dV


def _one_minus_square(X: np.ndarray) -> np.ndarray:
    """1 - X*X, computed in X's own memory (X is overwritten)."""
    np.multiply(X, X, out=X)
    return np.subtract(1.0, X, out=X)


def _client_sums(X, pairs) -> np.ndarray:
    """(clients, ...) sums of each client's rows of X, one client at a time."""
    return np.stack([X[a:b].sum(0) for a, b in pairs]) if pairs else np.zeros((0,) + X.shape[1:], X.dtype)
