"""Neural collaborative filtering as in FedAttack: GMF plus a 2-layer tanh MLP, summed.

score(u, i) = h . (u * v_i) + w . tanh(W2 tanh(W1 [u; v_i] + b1) + b2) + b

The predictor (h, W1, b1, W2, b2, w, b) is global; u is private; V is the item table.
Gradients come from torch autograd over just the touched rows.
"""

from __future__ import annotations

import numpy as np
import torch

from fedrec.models.base import ClientGrad, RecModel, xavier_normal

PREDICTOR_NAMES = ("gmf_h", "mlp_w1", "mlp_b1", "mlp_w2", "mlp_b2", "out_w", "out_b")


class NCF(RecModel):
    name = "ncf"

    def __init__(self, n_items, dim, dropout=0.0, mlp_layers=(64, 32), **kwargs):
        super().__init__(n_items, dim, dropout)
        if len(mlp_layers) != 2:
            raise ValueError("NCF takes exactly two MLP widths (model.mlp_layers)")
        self.h1, self.h2 = int(mlp_layers[0]), int(mlp_layers[1])

    @property
    def predictor_shapes(self):
        d, h1, h2 = self.dim, self.h1, self.h2
        return [(d,), (h1, 2 * d), (h1,), (h2, h1), (h2,), (h2,), (1,)]

    def init_global(self, rng):
        d, h1, h2 = self.dim, self.h1, self.h2
        pred = [
            np.full(d, 1.0, dtype=np.float32),  # GMF starts as a plain dot product
            xavier_normal(rng, (h1, 2 * d)), np.zeros(h1, np.float32),
            xavier_normal(rng, (h2, h1)), np.zeros(h2, np.float32),
            xavier_normal(rng, (1, h2))[0].copy(), np.zeros(1, np.float32),
        ]
        return xavier_normal(rng, (self.n_items, d)), pred

    def init_user(self, rng):
        std = np.sqrt(2.0 / (self.n_items + self.dim))
        return (rng.standard_normal(self.dim) * std).astype(np.float32)

    @staticmethod
    def _forward(u, v, p):
        """Scores for aligned rows u (n, d) and v (n, d); p = predictor tensors."""
        h, w1, b1, w2, b2, wo, bo = p
        d = u.shape[-1]
        gmf = (u * v) @ h
        pre = u @ w1[:, :d].T + v @ w1[:, d:].T + b1
        z = torch.tanh(torch.tanh(pre) @ w2.T + b2)
        return gmf + z @ wo + bo

    def gradients(self, item_table, predictor, user, pos, neg, rng, *, weight_decay=0.0,
                  weight_decay_all=False, train=True):
        n = len(pos)
        ids, inv = np.unique(np.concatenate([pos, neg]), return_inverse=True)
        rows = torch.tensor(item_table[ids], requires_grad=True)
        u = torch.tensor(np.asarray(user, dtype=np.float32), requires_grad=True)
        p = [torch.tensor(a, requires_grad=True) for a in predictor]
        inv_t = torch.from_numpy(inv)
        vi, vj = rows[inv_t[:n]], rows[inv_t[n:]]
        uu = u.expand(n, -1)
        if train and self.dropout > 0:
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            keep = 1.0 - self.dropout
            masks = (torch.rand((3, n, self.dim), generator=gen) < keep).float() / keep
            uu, vi, vj = uu * masks[0], vi * masks[1], vj * masks[2]
        # one batched forward for positives and negatives
        s = self._forward(torch.cat([uu, uu]), torch.cat([vi, vj]), p)
        x = s[:n] - s[n:]
        loss = torch.nn.functional.softplus(-x).mean()
        if weight_decay:
            reg = (u * u).sum() + sum((a * a).sum() for a in p)
            if not weight_decay_all:
                reg = reg + (rows * rows).sum()
            loss_total = loss + 0.5 * weight_decay * reg
        else:
            loss_total = loss
        loss_total.backward()
        item_rows = rows.grad.numpy()
        if weight_decay and weight_decay_all:
            full = weight_decay * item_table
            full[ids] += item_rows
            ids, item_rows = np.arange(self.n_items), full
        return ClientGrad(ids, item_rows.astype(np.float32, copy=False),
                          [a.grad.numpy() for a in p], u.grad.numpy(), float(loss.detach()), n)

    @torch.no_grad()
    def score(self, users, item_table, predictor):
        """(B, N) scores; the MLP's (users x items x h1) activations are built in chunks of
        users so memory stays bounded (~64 MB) whatever the batch size."""
        p = [torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in predictor]
        h, w1, b1, w2, b2, wo, bo = p
        d = self.dim
        u_all = torch.from_numpy(np.asarray(users, dtype=np.float32))
        v = torch.from_numpy(np.asarray(item_table, dtype=np.float32))
        item_part = v @ w1[:, d:].T + b1  # (N, h1), shared by every user
        chunk = max(1, int(16_000_000 // max(1, v.shape[0] * self.h1)))
        out = []
        for start in range(0, u_all.shape[0], chunk):
            u = u_all[start : start + chunk]
            gmf = (u * h) @ v.T  # (b, N)
            pre = (u @ w1[:, :d].T)[:, None, :] + item_part[None, :, :]  # (b, N, h1)
            z = torch.tanh(torch.tanh(pre) @ w2.T + b2)
            out.append(gmf + z @ wo + bo)
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, v.shape[0]))
