"""Losses shared by models and attacks.

Pairwise models (MF, NCF; `model.loss`), over a client's n pairs (pos_k, neg_k), where the
pairs repeat each of its P distinct positives q = n / P times (data.neg_ratio):
- bpr (default): L = mean_k softplus(-(s(pos_k) - s(neg_k)));
- bce (PipAttack, Eq. 2): per positive with its q negatives, averaged over positives,
      L = 1/P sum_p [ -log sigma(s_p) - sum_{j in negs(p)} log(1 - sigma(s_j)) ]
        = 1/n sum_k [ softplus(-s(pos_k)) + q softplus(s(neg_k)) ],
  i.e. Eq. 2 (a sum over the labelled examples, 1:q) divided by P.

UNION's contrastive loss (Yu et al., AAAI 2023, client side): for every positive item i of a
user, anchor f(v_i), one positive f(v_i+) = another random positive of the same user, and P
random items the user never interacted with as negatives; cross-entropy over the raw dot
products

    L_cl = mean_i -log( exp(a.p) / (exp(a.p) + sum_j exp(a.n_j)) ),   a = f(v_i), ...

Here f is the item embedding itself (MF, NCF's item rows). Its gradient touches only the rows
of the anchors, positives and negatives, so uploads stay sparse.
"""

from __future__ import annotations

import numpy as np


def _sigmoid(x64: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x64))  # overflow-free


def bpr_score_grad(x64: np.ndarray, pairs: np.ndarray):
    """BPR on score differences x (float64): (dL/dx float32, per-pair loss float64), where each
    pair's loss is divided by its client's pair count `pairs` (the mean over the pairs)."""
    return (-_sigmoid(-x64) / pairs).astype(np.float32), np.logaddexp(0.0, -x64)


def bce_score_grad(s_pos64: np.ndarray, s_neg64: np.ndarray, pairs: np.ndarray, q: np.ndarray):
    """BCE (see the module docstring) per pair: (dL/ds_pos, dL/ds_neg float32, per-pair loss),
    `pairs` and `q` per pair (its client's n and q)."""
    d_pos = (-_sigmoid(-s_pos64) / pairs).astype(np.float32)
    d_neg = (q * _sigmoid(s_neg64) / pairs).astype(np.float32)
    return d_pos, d_neg, np.logaddexp(0.0, -s_pos64) + q * np.logaddexp(0.0, s_neg64)


def contrastive_samples(items: np.ndarray, n_items: int, known_mask: np.ndarray, n_neg: int, rng):
    """(anchors (L,), positives (L,), negatives (L, P)) for a user's positive `items`.

    The positive of anchor k is another of the user's items (itself only when it has one);
    negatives are uniform over the items outside `known_mask`, by rejection."""
    items = np.asarray(items, np.int64)
    L = len(items)
    if L >= 2:
        pos = items[(np.arange(L) + rng.integers(1, L, size=L)) % L]
    else:
        pos = items.copy()
    need = L * n_neg
    neg = np.zeros(0, np.int64)
    while len(neg) < need:
        cand = rng.integers(0, n_items, size=int((need - len(neg)) * 1.2) + 8)
        neg = np.concatenate([neg, cand[~known_mask[cand]]])
    return items, pos, neg[:need].reshape(L, n_neg)


def contrastive_grad(table: np.ndarray, anchors, positives, negatives, keep=None,
                     dropout: float = 0.0):
    """(ids, rows, loss): the gradient of L_cl w.r.t. the touched item rows (sorted ids).
    keep: (L, 2 + P, dim) bool keep-masks of inverted dropout (rate `dropout`) on the anchor,
    positive and negative rows as looked up (None: no dropout)."""
    return contrastive_grads(table, anchors, positives, negatives, [len(anchors)], keep,
                             dropout)[0]


def contrastive_grads(table: np.ndarray, anchors, positives, negatives, lengths, keep=None,
                      dropout: float = 0.0) -> list:
    """`contrastive_grad` of several users at once: [(ids, rows, loss)] per user, user c
    owning the next lengths[c] anchors (with their positives and negatives).

    Each anchor's softmax and products are computed on its own row (batched matmuls, row-wise
    reductions) and each user's rows summed per item in the order `contrastive_grad` alone
    adds them (its anchors, positives, then negatives: `segment_sum` on (user, item) keys),
    so every user's numbers are bit-identical alone or in a cohort (tests/test_contrastive.py);
    its loss is the mean over its own anchors (np.mean of its slice, the same summation).
    Users go in blocks of about CONTRASTIVE_BLOCK anchors (a user is never split), so the
    block's candidate rows and products stay in cache.

    keep (sum(lengths), 2 + P, dim) bool, with `dropout` p > 0: inverted dropout on the rows
    as looked up, as the UNION reference code's item embedding applies it to this term too
    (train.contrastive_dropout): each looked-up row times keep / (1 - p) before the products,
    and its gradient times the same factor."""
    lengths = np.asarray(lengths, np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    block_of = starts[:-1] // CONTRASTIVE_BLOCK
    cuts = [0, *(np.flatnonzero(np.diff(block_of)) + 1).tolist(), len(lengths)]
    out = []
    for u0, u1 in zip(cuts[:-1], cuts[1:]):
        sl = slice(starts[u0], starts[u1])
        out += contrastive_block(table, anchors[sl], positives[sl], negatives[sl],
                                 lengths[u0:u1], None if keep is None else keep[sl], dropout)
    return out


# anchors per block of contrastive_grads: 2,048 x 16 candidates x 64 float32 = 8 MB
CONTRASTIVE_BLOCK = 2048


def contrastive_block(table: np.ndarray, anchors, positives, negatives, lengths, keep=None,
                      dropout: float = 0.0) -> list:
    """contrastive_grads of one block of users, all at once."""
    from fedrec.models.base import segment_sum_parts, unique_inverse

    n_items, dim = table.shape
    n_users = len(lengths)
    owner = np.repeat(np.arange(n_users), lengths)
    if len(owner) == 0:
        return [(np.zeros(0, np.int64), np.zeros((0, dim), np.float32), 0.0)] * n_users
    # in the table's precision (float32 in training: the 16-candidate softmax is well
    # conditioned after the max shift); batched matmuls rather than einsum
    A = table[anchors]  # (L, d)
    X = table[np.concatenate([positives[:, None], negatives], 1)]  # (L, 1+P, d)
    if keep is not None:  # inverted dropout on every looked-up row (the masks are the caller's)
        scale = np.float32(1.0 / (1.0 - dropout))
        keep_a = keep[:, 0] * scale  # (L, d) float32: 0 or 1 / (1 - p)
        keep_x = keep[:, 1:] * scale
        A = A * keep_a
        X = X * keep_x
    z = np.matmul(X, A[:, :, None])[:, :, 0]
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    s = e / e.sum(1, keepdims=True)
    nll = -np.log(np.maximum(s[:, 0].astype(np.float64), 1e-300))
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    losses = [float(nll[a:b].mean()) if b > a else 0.0 for a, b in zip(bounds[:-1], bounds[1:])]
    dz = s
    dz[:, 0] -= 1.0
    dz /= lengths.astype(dz.dtype)[owner, None]  # mean over each user's anchors
    dA = np.matmul(dz[:, None, :], X)[:, 0]
    d_pos = dz[:, 0, None] * A  # dX[:, 0] and dX[:, 1:] of dX = dz[:, :, None] * A[:, None]
    d_neg = dz[:, 1:, None] * A[:, None, :]
    if keep is not None:  # through the dropout: the same factor on each gradient row
        dA *= keep_a
        d_pos *= keep_x[:, 0]
        d_neg *= keep_x[:, 1:]
    ids = np.concatenate([anchors, positives, negatives.ravel()])
    who = np.concatenate([owner, owner, np.repeat(owner, negatives.shape[1])])
    keys, inv = unique_inverse(who * n_items + ids, n_users * n_items)
    L = len(anchors)  # the rows in contrastive_grad's order: anchors, positives, negatives
    summed = segment_sum_parts([(inv[:L], dA), (inv[L:2 * L], d_pos),
                                (inv[2 * L:], d_neg.reshape(-1, dim))], len(keys), dim)
    key_owner, key_item = np.divmod(keys, n_items)
    kb = np.searchsorted(key_owner, np.arange(n_users + 1)).tolist()
    return [(key_item[a:b], summed[a:b], loss)
            for a, b, loss in zip(kb[:-1], kb[1:], losses)]


def contrastive_table_grad(table: np.ndarray, items, n_neg: int, rng) -> np.ndarray:
    """The gradient of L_cl on the user's `items` as a dense (n_items, d) array."""
    known = np.zeros(table.shape[0], bool)
    known[np.asarray(items, np.int64)] = True
    ids, rows, _ = contrastive_grad(table, *contrastive_samples(items, table.shape[0], known, n_neg, rng))
    out = np.zeros(table.shape, np.float32)
    out[ids] = rows
    return out
