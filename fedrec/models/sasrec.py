"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over the item history.

Input: the last `max_len` training items but one, oldest first; the target at position t is
item t+1 (every position predicts the next item). Item embeddings are scaled by sqrt(dim) and
added to learned position embeddings counted from the end of the sequence (the most recent
item always sits at position max_len - 1, as with SASRec's left padding). Two pre-LN blocks
(one attention head by default, a ReLU feed-forward layer of width dim), a final LayerNorm,
dropout on the input, the attention output and the feed-forward layers (not on the attention
weights). The representation of a history is the output at its last position; evaluation
encodes the last `max_len` items of the training history (validation) or of the training
history plus the validation item (test).
"""

from __future__ import annotations

import math

import numpy as np

from fedrec.models.sequential import Example, SequentialModel
from fedrec.models.transformer import EncoderSpec


class SASRec(SequentialModel):
    name = "sasrec"
    min_history = 2  # one input and one target
    default_loss = "bce"

    def encoder_spec(self):
        return EncoderSpec(dim=self.dim, heads=self.heads, blocks=self.blocks, ffn_dim=self.dim,
                           max_len=self.max_len, causal=True, pre_norm=True, activation="relu")

    def n_targets(self, n_train: int) -> int:
        return max(0, min(n_train - 1, self.max_len))

    def train_example(self, history, neg, rng, train):
        window = history[-(self.max_len + 1):]
        n = len(window) - 1
        if self.loss == "bce":  # q negatives per target, in target order
            q = len(neg) // max(n, 1)
            if q < 1:
                raise ValueError(f"SASRec's bce loss needs a negative per target: {len(neg)} for {n}")
            neg = neg[: n * q].reshape(n, q)
        ex = Example(ids=window[:-1], replace=None, tpos=np.arange(n), titems=window[1:],
                     neg=neg, length=self.padded_length(n))
        return self._draw_drops(ex, rng, train)

    def eval_example(self, history):
        ids = history[-self.max_len:]
        return Example(ids=ids, replace=None, tpos=np.zeros(0, np.int64),
                       titems=np.zeros(0, np.int64), neg=None, length=self.padded_length(len(ids)))

    def input_embeddings(self, E, P, replace, pos):
        return E * math.sqrt(self.dim) + pos
