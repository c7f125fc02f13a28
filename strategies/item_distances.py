"""Squared L2 distances for Krum, Multi-Krum and Bulyan: between the rows of each item's
group (item-level) and between whole sparse updates (dense), from Gram matrices,
||a||^2 + ||b||^2 - 2<a, b>.

- `block_sq_distances`: per group, a batched (k x k) float32 product of its rows (float64
  where float32 could overflow), pairs too close to trust recomputed from their exact
  differences;
- `client_sq_distances`: Gram[a, b] = sum over the items both a and b sent of the products
  of their rows, added to the client pairs (float64), so no dense (n, n_items * dim) matrix
  is ever built. Items come in exact-size blocks (all items sent by exactly k clients at
  once) or padded size classes: the Python loops run over blocks, never items.

Both are exactly symmetric (`mirror_upper`): Krum's exact ties must not depend on rounding.
"""

from __future__ import annotations

import numpy as np
import torch

from strategies.common_rows import candidate_clients, common_rows
from strategies.dense_distances import dense_sq_distances, every_item_sent, gram_to_sq_distances
from strategies.groups import count_blocks
from strategies.robust import row_sq_norms


def block_sq_distances(x: np.ndarray) -> np.ndarray:
    """(U, k, k) float32 squared L2 distances between the k rows of each of U groups
    (x: (U, k, dim)), clamped to [0, float32's maximum]. A group may end in padding rows,
    which must be zero (their entries are left meaningless: the callers mask them).

    Fast path: ||a||^2 + ||b||^2 - 2<a, b> from the Gram of the rows, in float32 while every squared norm stays below float32's maximum / 8 (then, by
    Cauchy-Schwarz, no product, partial sum or distance overflows), else again in float64
    (crafted rows near float32's limit). Its rounding error is about
    eps * (||a||^2 + ||b||^2): every pair of rows whose distance is not at least 1e4 times
    that error bound is recomputed from its exact differences in float64
    (`exact_sq_distances`; a group of near-zero rows next to a few large ones has a few
    such pairs among many). The rows are not centred first: on ML-1M uploads centring on
    each group's mean put ~40x more pairs under the bound (1,200 of 1.2 million on a
    contrastive round, against 30), and its pass over the (U, k, dim) block cost a third of
    the function. The checks read the (U, k, k) result, not the (U, k, dim) rows: with
    k < dim the result is the smaller array."""
    U, width, _ = x.shape
    big = np.finfo(np.float32).max
    for dtype in (np.float32, np.float64):
        with np.errstate(over="ignore", invalid="ignore"):
            dist = gram_of(x.astype(dtype, copy=False))
        sq = np.diagonal(dist, axis1=1, axis2=2).copy()
        if np.isfinite(sq).all() and sq.max(initial=0) < big / 8:
            break  # else float32 sums could overflow: again in float64
    mirror_upper(dist)
    norms = sq[:, :, None] + sq[:, None, :]  # (a + b) - 2g: symmetric to the last bit
    dist *= 2
    dist = np.subtract(norms, dist, out=dist)
    # unsure: dist < 1e4 * (4 eps) * (||a||^2 + ||b||^2) for a real pair a != b (padding
    # rows are 0: their pairs have dist = ||a||^2 and never qualify)
    diagonal = dist.reshape(U, width * width)[:, ::width + 1]
    diagonal[:] = np.inf
    norms *= 1e4 * 4 * np.finfo(dist.dtype).eps
    unsure = dist < norms
    diagonal[:] = 0.0
    np.clip(dist, 0, big, out=dist)
    dist = dist.astype(np.float32, copy=False)
    unsure_groups = np.flatnonzero(unsure.any(axis=(1, 2)))
    if len(unsure_groups):
        groups, a, b = np.nonzero(unsure[unsure_groups])
        groups = unsure_groups[groups]
        dist[groups, a, b] = exact_sq_distances(x, groups, a, b)
    return dist


def mirror_upper(gram: np.ndarray) -> np.ndarray:
    """gram (..., k, k) made exactly symmetric in place: the lower triangle replaced by the
    mirror of the upper one. Batched float32 products (torch.bmm on rows of 64 coordinates)
    need not give <a, b> and <b, a> the same last bit, and Krum's exact ties must be broken
    by the members' places, as the definition says, not by rounding: with k = 1 neighbour
    (m = f + 3 rows, or Bulyan's last picks) the closest pair a, b both score d(a, b)."""
    k = gram.shape[-1]
    np.copyto(gram, np.swapaxes(gram, -1, -2), where=np.tri(k, k, -1, dtype=bool))
    return gram


def exact_sq_distances(x: np.ndarray, groups, a, b) -> np.ndarray:
    """(P,) float32: sum_d (x[g, a] - x[g, b])^2 for the P pairs (groups, a, b), from the
    differences in float64 (clamped to float32's range), in blocks of 2**16 pairs."""
    out = np.empty(len(groups), np.float32)
    big = np.finfo(np.float32).max
    for lo in range(0, len(groups), 1 << 16):
        sl = slice(lo, lo + (1 << 16))
        with np.errstate(over="ignore"):
            diff = x[groups[sl], a[sl]].astype(np.float64) - x[groups[sl], b[sl]]
            out[sl] = np.minimum(np.einsum("pd,pd->p", diff, diff), big)
    return out


def gram_of(x: np.ndarray) -> np.ndarray:
    """(U, k, k) Gram matrices of a (U, k, dim) stack. torch.bmm (one thread, see
    fedrec.runtime): ~1.4x faster than numpy's matmul on these many small matrices."""
    with np.errstate(over="ignore", invalid="ignore"):
        t = torch.from_numpy(x)
        return torch.bmm(t, t.transpose(1, 2)).numpy()


# client grams: items of m_i < 65 rows in exact-size blocks (one per m_i, ~30 us each), the
# rest padded to power-of-two classes. Padding items of 17-32 rows (contrastive uploads: most
# items of an ML-1M round) to 32 doubled the Gram products and their scatter (43 -> 21 ms)
EXACT_BLOCKS = 65


# items sent by k < 5 clients: their k (k - 1) / 2 cross products one by one (a rowwise dot
# product over all items of the block) instead of the batched (k x k) Gram, whose diagonal
# is thrown away (the squared norms come from the rows) and whose per-matrix cost dominates
# at k <= 4: ~12% less CPU for the client Gram of an ML-1M round
PAIR_BLOCKS = 5


def pair_products(x: np.ndarray):
    """(a, b, products (U, P)): <x[u, a[p]], x[u, b[p]]> for the P = k (k - 1) / 2 pairs
    a < b of each of U groups (x (U, k, dim)): float32, float64 where float32 overflows."""
    a, b = np.triu_indices(x.shape[1], 1)
    out = np.empty((len(x), len(a)), np.promote_types(x.dtype, np.float32))
    for p in range(len(a)):
        np.einsum("ud,ud->u", x[:, a[p]], x[:, b[p]], out=out[:, p])
    if not np.isfinite(out).all():  # crafted rows near float32's limit
        wide = x.astype(np.float64)
        return a, b, np.einsum("upd,upd->up", wide[:, a], wide[:, b])
    return a, b, out


def client_sq_distances(ids, rows, owner, n_clients: int, predictors=None) -> np.ndarray:
    """(n, n) squared L2 distances between whole updates (untouched rows 0, + predictor).

    Gram[a, b] = sum over the items i that both a and b sent of <g_a[i], g_b[i]>: per item
    the (m_i x m_i) Gram of its rows, added to the client pairs (a client sends an item at
    most once), O(sum_i m_i^2 dim) in all. Items of up to 64 rows come in exact-size
    blocks (groups.count_blocks), the rest in padded size classes (padding rows
    are zeros, booked to a dummy client n): one batched product and bincount per block
    (blocks of k < PAIR_BLOCKS: the cross products only, into the upper triangle, which
    `mirror_upper` copies down).
    The diagonal (squared norms) in float64. Float64 rows keep float64 products. Dense
    uploads (every client sends items 0..k-1 in order, `every_item_sent`): where at least
    COMMON_ROW_SHARE of the rows are their item's common row, their own rows' deviations
    from it (`common_row_sq_distances`), else one float64 Gram of the stacked tables
    (`dense_sq_distances`).
    """
    n = n_clients
    if every_item_sent(ids, n):
        tables = rows.reshape(n, len(ids) // n, -1)
        middle, share = candidate_clients(tables)
        if share >= COMMON_ROW_SHARE:
            return common_row_sq_distances(tables, predictors, middle)
        return dense_sq_distances(rows.reshape(n, -1), predictors)
    size = (n + 1) ** 2
    gram = np.zeros(size)

    def add(who, x):  # who (U, k) clients, x (U, k, dim) their rows
        if x.shape[1] < PAIR_BLOCKS:
            a, b, g = pair_products(x)
            who_a, who_b = who[:, a], who[:, b]  # the lower client first: upper triangle
            keys = np.minimum(who_a, who_b) * (n + 1) + np.maximum(who_a, who_b)
        else:
            g = gram_of(x)
            if not np.isfinite(g).all():  # float32 overflow: crafted rows near its limit
                g = gram_of(x.astype(np.float64))
            keys = who[:, :, None] * (n + 1) + who[:, None, :]
        gram[:] += np.bincount(keys.ravel(), g.ravel(), size)

    # only items two clients share add cross terms
    order, exact, padded = count_blocks(ids, 2, EXACT_BLOCKS)
    who_all = owner[order]
    cut = exact[-1][2] if exact else 0  # the exact blocks come first (sorted by m_i)
    x_all = np.take(rows, order[:cut], axis=0)
    for k, a, b in exact:
        add(who_all[a:b].reshape(-1, k), x_all[a:b].reshape(-1, k, rows.shape[1]))
    for rows_idx in padded:  # (U, width), -1 = padding: zero rows of a dummy client n
        x = np.take(rows, np.maximum(rows_idx, 0).ravel(), axis=0)
        x = x.reshape(rows_idx.shape + rows.shape[1:])
        x[rows_idx < 0] = 0.0
        add(np.where(rows_idx >= 0, owner[np.maximum(rows_idx, 0)], n), x)
    gram = mirror_upper(gram.reshape(n + 1, n + 1)[:n, :n].copy())
    gram[np.diag_indices(n)] = np.bincount(owner, weights=row_sq_norms(rows), minlength=n)
    if predictors is not None:
        p = predictors.astype(np.float64)
        gram += p @ p.T
    return gram_to_sq_distances(gram)


# dense uploads: the own-row distances where at least this share of the rows are common
# (an ML-1M round: ~94%; with UNION's contrastive term ~63%, where the per-item float64
# Grams of the many own rows cost more than one Gram of the whole tables in BLAS)
COMMON_ROW_SHARE = 0.85


def common_row_sq_distances(tables: np.ndarray, predictors=None, middle=None) -> np.ndarray:
    """(n, n) squared L2 distances between n whole tables (n, k, dim) of dense uploads
    (+ predictors), from their own rows alone: a row that is its item's common row
    (strategies.common_rows) is the same in every table that holds it, so
    ||x_a - x_b||^2 = ||y_a - y_b||^2 with y = x - common, 0 on the common rows. The own
    rows' deviations are exact in float64 (a difference of two float32 values) and go
    through `client_sq_distances`'s per-item Grams in float64: ~6% of the rows of an ML-1M
    round (~37% with UNION's contrastive term) instead of a Gram over every row, and no
    cancellation of the common part's norm."""
    n, k, dim = tables.shape
    common, same = common_rows(tables, middle)
    own = np.flatnonzero(~same.ravel())
    owner, item = np.divmod(own, k)
    deviation = tables.reshape(n * k, dim)[own].astype(np.float64)
    deviation -= common[item]
    return client_sq_distances(item, deviation, owner, n, predictors)
