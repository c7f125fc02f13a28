"""BERT4Rec (Sun et al., CIKM 2019): bidirectional self-attention trained by cloze masking.

Training input: the last `max_len` training items, oldest first. Each position is replaced by
the [MASK] embedding with probability `model.mask_prob` (at least one position per client: the
last one when the draw masks none), and the model predicts the original items at the masked
positions from both sides. As in the BERT4Rec paper's data generation (one extra instance per
user that masks only the last item, next to ten random ones), a client masks only its last item
in a share `model.mask_last_prob` of its rounds: that is the task evaluation poses, and a model
trained on interior positions alone does poorly at the edge. Every masked position is replaced by [MASK] (no 10% random / 10%
unchanged variants). Embeddings: item + learned position (counted from the end), then
LayerNorm and dropout; two post-LN blocks (GELU feed-forward of width 4 x dim, `model.heads`
heads); an output head (dense, GELU, LayerNorm) before the dot product with the item table
(tied embeddings, no per-item output bias, which would be a dense item parameter).

Loss: a softmax over the target and `model.softmax_samples` negatives shared by the client's
masked positions (`sampled_softmax`, sparse), or over every item (`full_softmax_dense`).
Evaluation appends [MASK] to the last max_len - 1 items of the history and reads the output
there.

The mask draws come from the client's per-round generator, right before its dropout draws.
"""

from __future__ import annotations

import numpy as np
import torch

from fedrec.models.base import dropout_bits, dropout_threshold
from fedrec.models.sequential import Example, SequentialModel
from fedrec.models.transformer import EncoderSpec, layer_norm, linear


class BERT4Rec(SequentialModel):
    name = "bert4rec"
    min_history = 1
    default_loss = "sampled_softmax"
    losses = ("sampled_softmax", "full_softmax_dense")

    def encoder_spec(self):
        return EncoderSpec(dim=self.dim, heads=self.heads, blocks=self.blocks,
                           ffn_dim=4 * self.dim, max_len=self.max_len, causal=False,
                           pre_norm=False, activation="gelu", eps=1e-12)

    def param_shapes(self):
        d = self.dim
        return [("mask_emb", (d,)), ("emb_ln_w", (d,)), ("emb_ln_b", (d,)), *self.spec.shapes(),
                ("head_w", (d, d)), ("head_b", (d,)), ("head_ln_w", (d,)), ("head_ln_b", (d,))]

    def init_global(self, rng):
        """As the other models, but BERT's N(0, 0.02^2) for the position table: Xavier's
        0.09 at (200, 64) would drown the item embeddings (std 0.02) they are added to."""
        table, pred = super().init_global(rng)
        pred[self.param_names.index("pos_emb")] = \
            (rng.standard_normal((self.max_len, self.dim)) * 0.02).astype(np.float32)
        return table, pred

    def n_targets(self, n_train: int) -> int:
        return min(n_train, self.max_len)  # at most; the masked count is drawn per round

    def cloze_mask(self, n: int, rng) -> np.ndarray:
        """Which of n positions to mask: with probability mask_last_prob only the last one (the
        task evaluation poses), else each with probability mask_prob, at least one."""
        if self.mask_last_prob > 0 and \
                dropout_bits(rng, 1)[0] < dropout_threshold(self.mask_last_prob):
            masked = np.zeros(n, bool)
        else:
            masked = dropout_bits(rng, n) < dropout_threshold(self.mask_prob)
        if not masked.any():
            masked[-1] = True
        return masked

    def train_example(self, history, neg, rng, train):
        ids = history[-self.max_len:]
        masked = self.cloze_mask(len(ids), rng)
        tpos = np.flatnonzero(masked)
        ex = Example(ids=ids, replace=masked, tpos=tpos, titems=ids[tpos],
                     neg=neg if self.loss == "sampled_softmax" else None,
                     length=self.padded_length(len(ids)))
        return self._draw_drops(ex, rng, train)

    def eval_example(self, history):
        ids = np.append(history[-(self.max_len - 1):], 0) if self.max_len > 1 else np.zeros(1, np.int64)
        replace = np.zeros(len(ids), bool)
        replace[-1] = True
        return Example(ids=ids, replace=replace, tpos=np.zeros(0, np.int64),
                       titems=np.zeros(0, np.int64), neg=None, length=self.padded_length(len(ids)))

    def input_embeddings(self, E, P, replace, pos):
        x = torch.where(replace[..., None], P["mask_emb"][:, None, :], E) + pos
        return layer_norm(x, P["emb_ln_w"], P["emb_ln_b"], self.spec.eps)

    def head(self, h, P):
        z = torch.nn.functional.gelu(linear(h, P["head_w"], P["head_b"]))
        return layer_norm(z, P["head_ln_w"], P["head_ln_b"], self.spec.eps)
