"""The transformer encoder shared by SASRec and BERT4Rec, with a client axis on every weight.

Every weight tensor has a leading axis of size B, one slice per client of the group. In
training each slice is that client's own leaf copy of the global weights, so a single backward
pass over the summed per-client losses yields every client's own encoder gradient (clients
never mix: all operations are per client - batched matrix products, row-wise norms and
softmaxes). In evaluation the slices are copies of the same weights.

A client's sequence is left-padded to its own bucket length, a multiple of BUCKET = 32, and
so is its list of targets. Then every per-client block of every tensor is a whole number of
32-float chunks: torch's CPU kernels compute elementwise functions (exp, log1p, erf) with
vector code on whole chunks and scalar code on a tensor's tail, which round differently, so
this is what makes a client's numbers depend on nothing but its own data. That is what lets
the in-process runner batch clients and still upload exactly what a lone client would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedrec.models.base import xavier_normal

NEG_INF = -1e9  # additive attention mask: exp() of it underflows to exactly 0 in float32
BUCKET = 32  # 2 AVX-512 vectors of float32 (the widest chunk torch's CPU loops use)


def bucket_length(n: int, max_len: int) -> int:
    """The padded length of a sequence of n items: n rounded up to a multiple of BUCKET."""
    cap = -(-max_len // BUCKET) * BUCKET
    return min(cap, max(BUCKET, -(-n // BUCKET) * BUCKET))


@dataclass(frozen=True)
class EncoderSpec:
    dim: int
    heads: int
    blocks: int
    ffn_dim: int
    max_len: int
    causal: bool  # SASRec: position t sees positions <= t; BERT4Rec: every position
    pre_norm: bool  # SASRec: x + f(LN(x)) and a final LN; BERT4Rec: LN(x + f(x))
    activation: str  # "relu" | "gelu"
    eps: float = 1e-8

    def block_shapes(self) -> list:
        d, h = self.dim, self.ffn_dim
        return [("ln1_w", (d,)), ("ln1_b", (d,)), ("attn_in_w", (3 * d, d)),
                ("attn_in_b", (3 * d,)), ("attn_out_w", (d, d)), ("attn_out_b", (d,)),
                ("ln2_w", (d,)), ("ln2_b", (d,)), ("ffn1_w", (h, d)), ("ffn1_b", (h,)),
                ("ffn2_w", (d, h)), ("ffn2_b", (d,))]

    def shapes(self) -> list:
        """[(name, shape)] of the encoder's arrays, in upload order."""
        out = [("pos_emb", (self.max_len, self.dim))]
        for b in range(self.blocks):
            out += [(f"b{b}.{n}", s) for n, s in self.block_shapes()]
        if self.pre_norm:
            out += [("ln_f_w", (self.dim,)), ("ln_f_b", (self.dim,))]
        return out

    def dropout_widths(self) -> list:
        """Widths of the dropout masks `encode` consumes, in order: the input, then per block
        the attention output, the FFN hidden layer and the FFN output."""
        return [self.dim] + [self.dim, self.ffn_dim, self.dim] * self.blocks


def init_arrays(rng: np.random.Generator, shapes) -> list:
    """Xavier-normal matrices (position table included), zero biases, unit norm scales, and
    N(0, 0.02^2) for other vectors (BERT4Rec's mask embedding)."""
    out = []
    for name, shape in shapes:
        leaf = name.split(".")[-1]
        if leaf.endswith("_b"):
            out.append(np.zeros(shape, np.float32))
        elif leaf.endswith("_w") and any(p.startswith("ln") for p in leaf.split("_")[:-1]):
            out.append(np.ones(shape, np.float32))
        elif len(shape) == 2:
            out.append(xavier_normal(rng, shape))
        else:
            out.append((rng.standard_normal(shape) * 0.02).astype(np.float32))
    return out


def layer_norm(x, w, b, eps):
    """Row-wise LayerNorm with per-client scale and shift w, b: (B, d)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * w[:, None, :] + b[:, None, :]


def linear(x, w, b):
    """x (B, L, in) @ w(B, out, in)^T + b (B, out), one product per client."""
    return torch.baddbmm(b[:, None, :], x, w.transpose(1, 2))


def attention_bias(n_valid: torch.Tensor, length: int, causal: bool, device) -> torch.Tensor:
    """(B, 1, L, L) additive mask: 0 where query i may attend key j, NEG_INF elsewhere.

    Left padding: a sequence of n items occupies the last n positions. Keys that are padding
    are masked; with `causal`, so are keys after the query. A padded query may see nothing
    (its row is uniform over masked keys; its output is zeroed afterwards).
    """
    pos = torch.arange(length, device=device)
    key_ok = pos[None, :] >= (length - n_valid)[:, None]  # (B, L)
    ok = key_ok[:, None, :].expand(-1, length, -1)
    if causal:
        ok = ok & (pos[None, :, None] >= pos[None, None, :])
    bias = torch.zeros(ok.shape, dtype=torch.float32, device=device)
    bias.masked_fill_(~ok, NEG_INF)
    return bias[:, None]


def self_attention(x, P, pre: str, bias, heads: int):
    B, L, d = x.shape
    dh = d // heads
    qkv = linear(x, P[pre + "attn_in_w"], P[pre + "attn_in_b"])  # (B, L, 3d)
    qkv = qkv.view(B, L, 3, heads, dh).permute(2, 0, 3, 1, 4).reshape(3, B * heads, L, dh)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = torch.baddbmm(bias.expand(B, heads, L, L).reshape(B * heads, L, L), q,
                           k.transpose(1, 2), alpha=1.0 / math.sqrt(dh))
    out = torch.bmm(torch.softmax(scores, dim=-1), v)  # (B*heads, L, dh)
    out = out.view(B, heads, L, dh).transpose(1, 2).reshape(B, L, d)
    return linear(out, P[pre + "attn_out_w"], P[pre + "attn_out_b"])


def encode(spec: EncoderSpec, P: dict, x, n_valid, drops=None):
    """Hidden states (B, L, d) of input embeddings x (B, L, d) (positions already added).

    P: name -> tensor with a leading client axis; n_valid: (B,) items per sequence;
    drops: None (no dropout) or the inverted-dropout multipliers, (B, L, width) for each width
    of `spec.dropout_widths()`, in that order.
    """
    B, L, _ = x.shape
    valid = (torch.arange(L, device=x.device)[None, :] >= (L - n_valid)[:, None])
    keep = valid[..., None].to(x.dtype)
    bias = attention_bias(n_valid, L, spec.causal, x.device)
    act = F.relu if spec.activation == "relu" else F.gelu
    it = iter(drops) if drops is not None else None

    def drop(t):
        return t if it is None else t * next(it)

    x = drop(x) * keep
    for b in range(spec.blocks):
        pre = f"b{b}."
        if spec.pre_norm:
            h = layer_norm(x, P[pre + "ln1_w"], P[pre + "ln1_b"], spec.eps)
            x = x + drop(self_attention(h, P, pre, bias, spec.heads))
            h = layer_norm(x, P[pre + "ln2_w"], P[pre + "ln2_b"], spec.eps)
            f = drop(act(linear(h, P[pre + "ffn1_w"], P[pre + "ffn1_b"])))
            x = (x + drop(linear(f, P[pre + "ffn2_w"], P[pre + "ffn2_b"]))) * keep
        else:
            a = drop(self_attention(x, P, pre, bias, spec.heads))
            x = layer_norm(x + a, P[pre + "ln1_w"], P[pre + "ln1_b"], spec.eps)
            f = drop(act(linear(x, P[pre + "ffn1_w"], P[pre + "ffn1_b"])))
            f = drop(linear(f, P[pre + "ffn2_w"], P[pre + "ffn2_b"]))
            x = layer_norm(x + f, P[pre + "ln2_w"], P[pre + "ln2_b"], spec.eps) * keep
    if spec.pre_norm:
        x = layer_norm(x, P["ln_f_w"], P["ln_f_b"], spec.eps) * keep
    return x
