"""Sequential recommenders: the user representation is computed from the private history.

There is no private user row. A client's device encodes its own item history with the global
encoder; the encoder's output at the last position is the user representation, and
score(u, i) = h_u . v_i with the item table V (tied input and output embeddings). The
representation is never uploaded: a client sends the gradients of the item rows it touched
(its history, its targets and its sampled negatives) and of the encoder weights.

Losses (`model.loss`):
- `bce`: per target position, -log s(h.v_pos) - sum over its q negatives of log s(-h.v_neg)
  (SASRec's loss; q = data.neg_ratio negatives per target);
- `sampled_softmax`: cross-entropy over the positive and `model.softmax_samples` negatives
  shared by the client's positions (uniform over items the user never interacted with, so the
  log-Q correction is a constant and cancels);
- `full_softmax_dense`: cross-entropy over every item. Every upload then carries every item
  row (dense): allowed, and labelled so.

Batching: clients are grouped by padded length (`transformer.bucket_length`), and a group runs
as one batched forward and backward with a private copy of the encoder per client, so a
client's upload is bit-identical whether it is computed alone or in a cohort (on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedrec.models.base import ClientGrad, CohortModel, dropout_keep, segment_sum, xavier_normal
from fedrec.models.transformer import BUCKET, EncoderSpec, bucket_length, encode, init_arrays
from fedrec.runtime import resolve_device

LOSSES = ("bce", "sampled_softmax", "full_softmax_dense")
EVAL_GROUP = 256  # users per batched forward in evaluation (bounds the attention tensors)


@dataclass
class Example:
    """One client's training (or evaluation) input, in the frame of its own sequence.

    ids: (n,) input items, oldest first; replace: (n,) bool, positions whose input is the
    [MASK] embedding (BERT4Rec) or None; tpos/titems: (T,) target positions (into ids) and
    their target items; neg: (T, q) per-target negatives (bce), (S,) shared ones (sampled
    softmax) or None; length: padded length; drops: dropout multipliers or None.
    Clients are batched only with clients of the same (length, padded target count).
    """

    ids: np.ndarray
    replace: np.ndarray | None
    tpos: np.ndarray
    titems: np.ndarray
    neg: np.ndarray | None
    length: int
    drops: list | None = None

    @property
    def group(self) -> tuple:
        return self.length, -(-max(len(self.tpos), 1) // BUCKET) * BUCKET


class SequentialModel(CohortModel):
    sequential = True
    has_user_row = False
    min_history = 1
    default_loss = "bce"
    losses = LOSSES

    def __init__(self, n_items, dim, dropout=0.0, *, max_len=200, blocks=2, heads=1,
                 loss="auto", softmax_samples=100, mask_prob=0.2, mask_last_prob=0.0,
                 device="cpu", **kwargs):
        super().__init__(n_items, dim, dropout)
        from fedrec.errors import ConfigError

        self.max_len, self.blocks, self.heads = int(max_len), int(blocks), int(heads)
        self.loss = self.default_loss if loss == "auto" else loss
        if self.loss not in self.losses:
            raise ConfigError(f"model.loss: {self.name} supports {', '.join(self.losses)}, "
                              f"not {loss!r}")
        if dim % self.heads:
            raise ConfigError(f"model.dim ({dim}) must be a multiple of model.heads ({heads})")
        self.softmax_samples = int(softmax_samples)
        self.mask_prob = float(mask_prob)
        self.mask_last_prob = float(mask_last_prob)
        self.device = resolve_device(device, "model.device")
        self.spec = self.encoder_spec()
        self.param_names = [n for n, _ in self.param_shapes()]

    # --- parameters ------------------------------------------------------------------------
    def encoder_spec(self) -> EncoderSpec:
        raise NotImplementedError

    def param_shapes(self) -> list:
        return self.spec.shapes()

    @property
    def predictor_shapes(self):
        return [s for _, s in self.param_shapes()]

    def init_global(self, rng):
        return xavier_normal(rng, (self.n_items, self.dim)), init_arrays(rng, self.param_shapes())

    def init_user(self, rng):
        return np.zeros(0, np.float32)  # no user row: the history is the representation

    @property
    def dense_upload(self) -> bool:
        return self.loss == "full_softmax_dense"

    def negatives_needed(self, n_train: int, neg_ratio: int) -> int:
        if n_train < self.min_history or self.loss == "full_softmax_dense":
            return 0
        if self.loss == "sampled_softmax":
            return self.softmax_samples
        return self.n_targets(n_train) * neg_ratio

    def n_targets(self, n_train: int) -> int:
        raise NotImplementedError

    # --- per-client inputs (subclasses) ----------------------------------------------------
    def train_example(self, history, neg, rng, train: bool) -> Example:
        raise NotImplementedError

    def eval_example(self, history) -> Example:
        raise NotImplementedError

    def input_embeddings(self, E, P, replace, pos):
        """Inputs to the encoder from item embeddings E (B, L, d) and positions (B, L, d)."""
        raise NotImplementedError

    def head(self, h, P):
        """Output transform applied to hidden states before the dot product with items."""
        return h

    def _draw_drops(self, ex: Example, rng, train: bool):
        if train and self.dropout > 0:
            widths = self.spec.dropout_widths()
            keep = dropout_keep(rng, (ex.length * sum(widths),), self.dropout)
            scale = np.float32(1.0 / (1.0 - self.dropout))
            cuts = np.cumsum([ex.length * w for w in widths])[:-1]
            parts = np.split(keep.astype(np.float32) * scale, cuts)
            ex.drops = [p.reshape(ex.length, w) for p, w in zip(parts, widths)]
        return ex

    # --- the batched forward ---------------------------------------------------------------
    def _params(self, predictor, B: int, grad: bool) -> dict:
        P = {}
        for name, a in zip(self.param_names, predictor):
            t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)
            t = t.expand(B, *a.shape).clone()
            P[name] = t.requires_grad_() if grad else t
        return P

    def _forward(self, item_table, P, exs, E_leaf: bool):
        """Hidden states (B, L, d) of a group of examples sharing one padded length."""
        B, L, dev = len(exs), exs[0].length, self.device
        n = np.array([len(e.ids) for e in exs])
        ids = np.zeros((B, L), np.int64)
        replace = np.zeros((B, L), bool)
        valid = np.arange(L)[None, :] >= (L - n)[:, None]
        ids[valid] = np.concatenate([e.ids for e in exs])
        if exs[0].replace is not None:
            replace[valid] = np.concatenate([e.replace for e in exs])
        E = torch.from_numpy(item_table[ids]).to(dev)
        if E_leaf:
            E.requires_grad_()
        pos_idx = torch.from_numpy(np.maximum(self.max_len - L + np.arange(L), 0)).to(dev)
        pos = P["pos_emb"].index_select(1, pos_idx)
        x = self.input_embeddings(E, P, torch.from_numpy(replace).to(dev), pos)
        drops = None
        if exs[0].drops is not None:
            drops = [torch.from_numpy(np.stack([e.drops[k] for e in exs])).to(dev)
                     for k in range(len(exs[0].drops))]
        h = encode(self.spec, P, x, torch.from_numpy(n).to(dev), drops)
        return h, E, ids, valid

    def _targets(self, item_table, h, P, exs):
        """Output states at each client's target positions, padded to the group's target
        length: (ht (B, T, d), their items (B, T), mask (B, T), counts (B,), item leaf)."""
        B, L, d, dev = len(exs), exs[0].length, self.dim, self.device
        T = np.array([len(e.tpos) for e in exs])
        tmask = np.arange(exs[0].group[1])[None, :] < T[:, None]
        n = np.array([len(e.ids) for e in exs])
        tidx = np.zeros(tmask.shape, np.int64)
        titems = np.zeros(tmask.shape, np.int64)
        tidx[tmask] = np.concatenate([e.tpos for e in exs]) + np.repeat(L - n, T)
        titems[tmask] = np.concatenate([e.titems for e in exs])
        ht = self.head(h.gather(1, torch.from_numpy(tidx).to(dev)[..., None].expand(-1, -1, d)), P)
        Epos = torch.from_numpy(item_table[titems]).to(dev).requires_grad_()
        return ht, titems, tmask, T, Epos

    def _target_losses(self, item_table, ht, Epos, exs, tmask):
        """Loss per target (B, T), and the candidate items' leaf, ids and validity mask."""
        B, dev = len(exs), self.device
        lpos = (ht * Epos).sum(-1)
        if self.loss == "bce":
            neg = np.zeros(tmask.shape + exs[0].neg.shape[1:], np.int64)
            neg[tmask] = np.concatenate([e.neg for e in exs])
            C = torch.from_numpy(item_table[neg]).to(dev).requires_grad_()
            per_target = F.softplus(-lpos) + F.softplus((ht[:, :, None, :] * C).sum(-1)).sum(-1)
            return per_target, C, neg, np.broadcast_to(tmask[..., None], neg.shape)
        if self.loss == "sampled_softmax":
            neg = np.stack([e.neg for e in exs])
            C = torch.from_numpy(item_table[neg]).to(dev).requires_grad_()
            logits = torch.cat([lpos[..., None], torch.bmm(ht, C.transpose(1, 2))], dim=-1)
        else:  # full softmax over every item: a dense upload
            neg = np.broadcast_to(np.arange(self.n_items), (B, self.n_items))
            C = torch.from_numpy(item_table).to(dev).expand(B, *item_table.shape).clone()
            logits = torch.bmm(ht, C.requires_grad_().transpose(1, 2))
        return torch.logsumexp(logits, dim=-1) - lpos, C, neg, np.ones(neg.shape, bool)

    def _group_grads(self, item_table, predictor, exs, weight_decay, weight_decay_all):
        """Each client's ClientGrad for a group of examples sharing one padded shape."""
        B = len(exs)
        P = self._params(predictor, B, grad=True)
        h, E, in_ids, in_valid = self._forward(item_table, P, exs, E_leaf=True)
        ht, titems, tmask, T, Epos = self._targets(item_table, h, P, exs)
        per_target, C, cand_ids, cand_valid = self._target_losses(item_table, ht, Epos, exs, tmask)
        weights = torch.from_numpy((tmask / T[:, None]).astype(np.float32)).to(self.device)
        per_client = (per_target * weights).sum(-1)  # each client's mean over its targets
        per_client.sum().backward()  # clients share nothing: each gets its own gradient
        # item rows of each client: inputs, then targets, then candidates, summed per item
        keys, rows = [], []
        for ids, ok, leaf in ((in_ids, in_valid, E), (titems, tmask, Epos), (cand_ids, cand_valid, C)):
            ok = np.ascontiguousarray(ok)
            owner = np.broadcast_to(np.arange(B).reshape((B,) + (1,) * (ids.ndim - 1)), ids.shape)
            keys.append(owner[ok] * self.n_items + ids[ok])
            rows.append(leaf.grad.detach().cpu().numpy()[ok])
        uniq, inv = np.unique(np.concatenate(keys), return_inverse=True)
        summed = segment_sum(inv, np.concatenate(rows), len(uniq))
        key_owner, key_item = np.divmod(uniq, self.n_items)
        kb = np.searchsorted(key_owner, np.arange(B + 1))
        pgrads = [P[name].grad.detach().cpu().numpy() for name in self.param_names]
        losses = per_client.detach().cpu().numpy().astype(np.float64)
        wd = np.float32(weight_decay)
        out = []
        for b in range(B):
            ids_b, r = key_item[kb[b]:kb[b + 1]], summed[kb[b]:kb[b + 1]]
            if weight_decay_all:
                full = wd * item_table
                full[ids_b] += r
                ids_b, r = np.arange(self.n_items), full
            elif weight_decay:
                r += wd * item_table[ids_b]
            pred = [g[b] + wd * a if weight_decay else g[b] for g, a in zip(pgrads, predictor)]
            out.append(ClientGrad(ids_b, r, pred, np.zeros(0, np.float32), float(losses[b]),
                                  int(T[b])))
        return out

    # --- RecModel API ----------------------------------------------------------------------
    def gradients_cohort(self, item_table, predictor, users, pos_list, neg_list, rngs, *,
                         weight_decay=0.0, weight_decay_all=False, train=True):
        """pos_list: each client's history in order (the model builds inputs and targets from
        it); neg_list: its negatives (`negatives_needed` of them); users: ignored."""
        exs = [self.train_example(np.asarray(p, np.int64),
                                  None if n is None else np.asarray(n, np.int64), r, train)
               for p, n, r in zip(pos_list, neg_list, rngs)]
        out = [None] * len(exs)
        groups: dict = {}
        for i, e in enumerate(exs):
            groups.setdefault(e.group, []).append(i)
        for idx in groups.values():
            for i, g in zip(idx, self._group_grads(item_table, predictor, [exs[i] for i in idx],
                                                   weight_decay, weight_decay_all)):
                out[i] = g
        return out

    @torch.no_grad()
    def user_vectors_from_history(self, item_table, predictor, histories) -> np.ndarray:
        """(B, dim) float32 representations of item histories (each oldest first)."""
        out = np.zeros((len(histories), self.dim), np.float32)
        exs = [self.eval_example(np.asarray(h, np.int64)) for h in histories]
        lengths = np.array([e.length for e in exs], dtype=np.int64)
        for L in np.unique(lengths):
            idx = np.flatnonzero(lengths == L)
            for start in range(0, len(idx), EVAL_GROUP):
                part = idx[start:start + EVAL_GROUP]
                P = self._params(predictor, len(part), grad=False)
                h, *_ = self._forward(item_table, P, [exs[i] for i in part], E_leaf=False)
                out[part] = self.head(h[:, -1:, :], P)[:, 0].cpu().numpy()
        return out

    def score(self, users, item_table, predictor):
        """(B, n_items) float64 scores h_u . v_i (float64 so that batch and single-user
        evaluation rank identically, as for MF)."""
        if self.device.type == "cuda":
            u = torch.as_tensor(np.asarray(users), device=self.device, dtype=torch.float64)
            v = torch.as_tensor(np.asarray(item_table), device=self.device, dtype=torch.float64)
            return (u @ v.T).cpu().numpy()
        return np.asarray(users, np.float64) @ np.asarray(item_table, np.float64).T

    def padded_length(self, n: int) -> int:
        return bucket_length(n, self.max_len)


__all__ = ["BUCKET", "Example", "LOSSES", "SequentialModel"]
