"""The upload a client would send: what the server can compute for any guess of the private
data (a set of positives among the uploaded ids, a user row) at a recorded global model.

`RoundModel` is one observed round: the global model restricted to the uploaded ids, written
out in torch (float64) for MF and NCF (neumf and mlp forms), batched over B guesses. For a
per-id coefficient c (dL/ds of each id's score), the upload is

    item rows  = c_i * ds_i/dv_i (+ wd * v_i)      predictor = sum_i c_i ds_i/dP (+ wd * P)
    user grad  = sum_i c_i ds_i/du + wd * u        (stays on the device; used for coupling)

times n under train.loss_reduction = sum. The coefficients come from the loss
(fedrec.models.losses):
- `pair_coefficients`: the exact ones, from explicit pairs (pos_k, neg_k) (BPR needs the
  pairing); with the true pairs and user row this reproduces the client's upload (tested
  against uploads recorded from a real run, tests/test_privacy.py);
- `relaxed_coefficients`: the server's relaxation, from a membership x in [0,1] per id
  (1 = positive): BCE is pointwise, so exact for hard x up to negatives drawn twice (counted
  by their mean multiplicity); BPR pairs each positive with the x-weighted negatives (the
  expected pairing under a random one).
Every operation is batched over ids and guesses (no Python loop over items).

`fedrec.privacy.replay.replay_upload` is the other simulator: the package's own client code
on a given user row and pairs; it runs a device object, so it lives apart from the attack.
"""

from __future__ import annotations

import numpy as np
import torch

DT = torch.float64


def _t(a):
    return torch.as_tensor(np.asarray(a), dtype=DT)


class RoundModel:
    """One observed round: global arrays, the uploaded ids, the protocol's constants."""

    def __init__(self, kind: str, arrays, ids, *, loss="bce", q=1, weight_decay=0.0,
                 reduction="mean", form="neumf"):
        self.kind, self.loss, self.q = kind, loss, int(q)
        self.wd, self.reduction, self.form = float(weight_decay), reduction, form
        self.ids = np.asarray(ids, np.int64)
        self.V = _t(np.asarray(arrays[0])[self.ids])  # (m, d)
        self.P = [_t(p) for p in arrays[1:]]
        if kind == "ncf":
            P = self.P if form == "neumf" else [None] + self.P
            self.h, self.W1, self.b1, self.W2, self.b2, self.wo, self.bo = P
            d = self.V.shape[1]
            self.W1u, self.W1v = self.W1[:, :d], self.W1[:, d:]
            self.Vw = self.V @ self.W1v.T  # (m, h1): the item half of the first layer

    @property
    def m(self) -> int:
        return len(self.ids)

    # --- scores and their derivatives ----------------------------------------------------
    def forward(self, u):
        """u (B, d) -> dict with s (B, m), ds_dv (B, m, d) and what the predictor needs."""
        if self.kind == "mf":
            s = u @ self.V.T
            return {"s": s, "ds_dv": u[:, None, :].expand(-1, self.m, -1), "u": u}
        pre = (u @ self.W1u.T)[:, None, :] + self.Vw[None] + self.b1  # (B, m, h1)
        a = torch.tanh(pre)
        z = torch.tanh(a @ self.W2.T + self.b2)  # (B, m, h2)
        s = z @ self.wo + self.bo
        dz = self.wo * (1 - z * z)
        da = (dz @ self.W2) * (1 - a * a)
        ds_dv = da @ self.W1v
        if self.h is not None:
            s = s + (u * self.h) @ self.V.T
            ds_dv = ds_dv + (u * self.h)[:, None, :]
        return {"s": s, "ds_dv": ds_dv, "a": a, "z": z, "dz": dz, "da": da, "u": u}

    def upload(self, f, c):
        """(rows (B, m, d), [predictor grads (B, *shape)], user grad (B, d)) for coefficients
        c (B, m), from `forward`'s f."""
        u, scale = f["u"], 1.0
        rows = c[:, :, None] * f["ds_dv"] + self.wd * self.V
        if self.kind == "mf":
            ug = c @ self.V + self.wd * u
            pred = []
        else:
            da, dz = f["da"], f["dz"]
            cda = c[:, :, None] * da  # (B, m, h1)
            sda = cda.sum(1)  # (B, h1)
            gW1 = torch.cat([sda[:, :, None] * u[:, None, :],
                             cda.transpose(1, 2) @ self.V], dim=2)
            cdz = c[:, :, None] * dz
            pred = [gW1, sda, cdz.transpose(1, 2) @ f["a"], cdz.sum(1),
                    (c[:, :, None] * f["z"]).sum(1), c.sum(1, keepdim=True)]
            ug = sda @ self.W1u
            if self.h is not None:
                cv = c @ self.V  # (B, d)
                pred = [u * cv] + pred
                ug = ug + self.h * cv
            own = [self.h, self.W1, self.b1, self.W2, self.b2, self.wo, self.bo]
            own = own if self.h is not None else own[1:]
            pred = [g + self.wd * p for g, p in zip(pred, own)]
            ug = ug + self.wd * u
        if self.reduction == "sum":
            raise NotImplementedError("loss_reduction: sum (scale by n) is not simulated")
        return rows * scale, pred, ug

    # --- coefficients --------------------------------------------------------------------
    def pair_coefficients(self, s, pos_idx, neg_idx):
        """Exact dL/ds per id from explicit pairs (positions into ids), s (B, m)."""
        n = len(pos_idx)
        pi = torch.as_tensor(np.asarray(pos_idx, np.int64))
        ni = torch.as_tensor(np.asarray(neg_idx, np.int64))
        sp, sn = s[:, pi], s[:, ni]
        c = torch.zeros_like(s)
        if self.loss == "bce":
            q = n / max(len(np.unique(pos_idx)), 1)
            c = c.index_add(1, pi, -torch.sigmoid(-sp) / n)
            c = c.index_add(1, ni, q * torch.sigmoid(sn) / n)
        else:
            G = -torch.sigmoid(-(sp - sn)) / n
            c = c.index_add(1, pi, G).index_add(1, ni, -G)
        return c

    def relaxed_coefficients(self, s, x, n_pairs: int):
        """dL/ds per id for a soft membership x (B, m) in [0, 1] (1 = positive). n_pairs: the
        upload's num_examples (pairs); negatives are n_pairs draws spread over the ids with
        1 - x weight (mean multiplicity n_pairs / sum(1 - x))."""
        n, q = float(n_pairs), self.q
        xn = 1.0 - x
        mult = n / xn.sum(1, keepdim=True).clamp_min(1e-6)
        if self.loss == "bce":
            return x * q * (-torch.sigmoid(-s)) / n + xn * mult * q * torch.sigmoid(s) / n
        # bpr: each of a positive's q pairs meets a negative drawn with weight (1 - x) mult
        w = xn * mult / n  # (B, m): expected negative occurrences / n per id, sums to 1
        sig = torch.sigmoid(-(s[:, :, None] - s[:, None, :]))  # (B, pos i, neg j)
        c_pos = -x * q * (sig * w[:, None, :]).sum(2) / n
        pw = x / x.sum(1, keepdim=True).clamp_min(1e-6)  # the positive a negative meets
        c_neg = xn * mult * (sig * pw[:, :, None]).sum(1) / n
        return c_pos + c_neg


def round_model(model, cfg, arrays, ids) -> RoundModel:
    """A RoundModel for the package's model object and config (what the server knows)."""
    t = cfg.train
    wd = t.weight_decay
    if t.weight_decay_scope == "all":
        raise NotImplementedError("dense uploads (weight_decay_scope: all) are not simulated")
    return RoundModel(model.name, arrays, ids, loss=model.loss, q=cfg.data.neg_ratio,
                      weight_decay=wd, reduction=t.loss_reduction,
                      form=getattr(model, "form", "neumf"))


def simulate_pairs(rm: RoundModel, user, pos, neg):
    """The upload (ids, rows, predictor) for a user row and explicit pairs (item ids):
    the differentiable simulator's exact mode, as numpy float64."""
    index = {int(i): k for k, i in enumerate(rm.ids)}
    pi = np.array([index[int(i)] for i in pos], np.int64)
    ni = np.array([index[int(i)] for i in neg], np.int64)
    with torch.no_grad():
        u = _t(user)[None]
        f = rm.forward(u)
        c = rm.pair_coefficients(f["s"], pi, ni)
        rows, pred, ug = rm.upload(f, c)
    return rows[0].numpy(), [p[0].numpy() for p in pred], ug[0].numpy()


def simulate_membership(rm: RoundModel, user, x, n_pairs):
    """The relaxed upload for a membership vector x over rm.ids (numpy float64)."""
    with torch.no_grad():
        u = _t(user)[None]
        f = rm.forward(u)
        c = rm.relaxed_coefficients(f["s"], _t(x)[None], n_pairs)
        rows, pred, ug = rm.upload(f, c)
    return rows[0].numpy(), [p[0].numpy() for p in pred], ug[0].numpy()


def relative_l2(sim_rows, sim_pred, obs_rows, obs_pred) -> float:
    a = np.concatenate([np.ravel(sim_rows)] + [np.ravel(p) for p in sim_pred])
    b = np.concatenate([np.ravel(obs_rows)] + [np.ravel(p) for p in obs_pred]).astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
