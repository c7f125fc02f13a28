"""UNION's uniformity statistic: sums of pairwise L2 distances between embedding rows.

    d_c = 1 / (s (s - 1)) * sum_{a != b} ||y_a - y_b||_2

over the s sampled rows of client c's simulated item table (strategies/union.py). Every
distance comes from the Gram form ||a||^2 + ||b||^2 - 2 <a, b> in float64 (the rows centred
first), as one matrix product of augmented rows per block, each block clamped, rooted and
summed with its weights while it is in cache. The Python loops run over blocks and tiles,
never over clients or rows.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from strategies.groups import class_width, group_bounds, grouped_order

GPU_BLOCK = 1 << 22  # float64 distances per block on a torch device (32 MiB)
CPU_BLOCK = 1 << 18  # the same on the CPU (2 MiB: a block stays in cache)
TILE = 96  # rows per tile of a set's distance matrix (only the upper tiles are computed)
# the widths of client groups (cross term, own pairs): ~12% padding at most beyond 8
GROUP_WIDTHS = tuple(sorted({int(8 * 1.125 ** k) for k in range(40)}))


def gram_factors(a, b):
    """(left, right), float64: left @ right^T = ||a||^2 + ||b||^2 - 2 <a, b> for the rows of
    a (..., m, d) and b (..., k, d): [-2a, ||a||^2, 1] and [b, 1, ||b||^2]."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    left = np.concatenate([-2 * a, np.einsum("...ij,...ij->...i", a, a)[..., None],
                           np.ones(a.shape[:-1] + (1,))], axis=-1)
    right = np.concatenate([b, np.ones(b.shape[:-1] + (1,)),
                            np.einsum("...ij,...ij->...i", b, b)[..., None]], axis=-1)
    return left, right


def root(d2):
    """sqrt(max(d2, 0)) in place."""
    np.maximum(d2, 0, out=d2)
    return np.sqrt(d2, out=d2)


def root_sums(product, weights, diagonal: bool = False) -> np.ndarray:
    """(..., m): sum_b weights[..., b] sqrt(max(d2, 0))[..., a, b] for the squared
    distances d2 = product() (..., m, k) (one product of Gram factors); diagonal: the
    diagonal of each square left out (set to exactly 0).

    The roots are taken straight away, without the clamp: a negative square (rounding,
    between equal rows) then shows as a non-finite sum, and only then is the product taken
    again and clamped (`root`). Same numbers as clamping first, one pass less over the
    distances."""
    for clamp in (False, True):
        d2 = product()
        if clamp:
            dist = root(d2)
        else:
            with np.errstate(invalid="ignore"):
                dist = np.sqrt(d2, out=d2)
        if diagonal:
            zero_diagonal(dist)
        sums = np.matmul(dist, weights[..., None])[..., 0]
        if clamp or np.isfinite(sums).all():
            return sums


def distances(a, b):
    """(..., m, k) L2 distances between the rows of a (..., m, d) and b (..., k, d), float64:
    sqrt(max(||a||^2 + ||b||^2 - 2 <a, b>, 0)), the three terms out of one product
    (`gram_factors`)."""
    left, right = gram_factors(a, b)
    return root(np.matmul(left, np.swapaxes(right, -1, -2)))


def zero_diagonal(square):
    """Set the diagonal of each (..., m, m) matrix to 0 in place (a strided view)."""
    m = square.shape[-1]
    square.reshape(square.shape[:-2] + (m * m,))[..., ::m + 1] = 0.0
    return square


def weighted_pair_sums_torch(y, w, device) -> np.ndarray:
    """weighted_pair_sums in float64 on a torch device (e.g. "cuda"): same formula, whole
    matrices in blocks of sets; sums may differ from the CPU's in the last bits (another
    summation order)."""
    import torch

    G, m, _ = y.shape
    out = np.zeros(G)
    per_block = max(1, GPU_BLOCK // (m * m))
    eye = torch.eye(m, dtype=torch.bool, device=device)
    for lo in range(0, G, per_block):
        x = torch.as_tensor(y[lo:lo + per_block], device=device)
        x = x - x.mean(dim=1, keepdim=True)
        sq = (x * x).sum(-1)
        d2 = torch.baddbmm(sq[:, :, None] + sq[:, None, :], x, x.transpose(1, 2), alpha=-2.0)
        dist = d2.clamp_min_(0).sqrt_().masked_fill_(eye, 0.0)
        wb = torch.as_tensor(np.ascontiguousarray(w[lo:lo + per_block]), device=device)
        out[lo:lo + per_block] = torch.einsum("ga,gab,gb->g", wb, dist, wb).cpu().numpy()
    return out


def weighted_pair_sums(y, w, device=None) -> np.ndarray:
    """(G,) sum_{a != b} w[g, a] w[g, b] ||y[g, a] - y[g, b]|| for y (G, m, d), w (G, m).

    Rows are centred per set (distances do not change; less cancellation in the Gram form).
    The distance matrix is symmetric: its rows are cut into tiles of about TILE and only
    the tiles on and above the diagonal are computed (those above counted twice), all sets
    of a block at once, blocks of at most CPU_BLOCK distances. The diagonal is left out
    exactly (the Gram form would give sqrt(rounding) ~ 1e-9 there, not 0).
    """
    y = np.asarray(y, np.float64)
    w = np.broadcast_to(np.asarray(w, np.float64), y.shape[:2])
    G, m, _ = y.shape
    out = np.zeros(G)
    if m < 2:
        return out
    if device not in (None, "cpu"):
        return weighted_pair_sums_torch(y, w, device)
    left, right = gram_factors(*(2 * [y - y.mean(axis=1, keepdims=True)]))
    left[w == 0] = 0.0  # rows weighing nothing (padding): squares of exactly 0, never < 0
    right[w == 0] = 0.0
    right = np.swapaxes(right, 1, 2)
    cuts = np.linspace(0, m, -(-m // TILE) + 1).astype(np.int64)
    tile = int(np.diff(cuts).max())
    per_block = max(1, CPU_BLOCK // (tile * tile))
    for i, (a0, a1) in enumerate(zip(cuts[:-1], cuts[1:])):
        for b0, b1 in zip(cuts[i:-1], cuts[i + 1:]):
            for lo in range(0, G, per_block):  # blocks of sets
                sets = slice(lo, lo + per_block)
                pairs = root_sums(partial(np.matmul, left[sets, a0:a1], right[sets, :, b0:b1]),
                                  w[sets, b0:b1], diagonal=a0 == b0)
                out[sets] += (1 if a0 == b0 else 2) * np.einsum("ga,ga->g", w[sets, a0:a1], pairs)
    return out


def uniformity(emb, device=None) -> np.ndarray:
    """(clients,) mean pairwise L2 distance among each client's s rows of emb (clients, s, d):

        d_c = 1 / (s (s - 1)) * sum_{a != b} ||emb[c, a] - emb[c, b]||_2
    """
    emb = np.asarray(emb, np.float64)
    n, s, _ = emb.shape
    if s < 2:
        return np.zeros(n)
    return weighted_pair_sums(emb, np.ones((n, s)), device) / (s * (s - 1))


def client_groups(owner: np.ndarray):
    """The uploaded rows grouped by client in blocks of similar row counts (GROUP_WIDTHS):
    a list of (clients (G,), rows (G, width) indices into owner, -1 = padding)."""
    order, _ = grouped_order(owner)
    if len(order) == 0:
        return []
    clients, starts, counts = group_bounds(owner, order)
    widths = class_width(counts, GROUP_WIDTHS)
    blocks = []
    for width in np.unique(widths):
        sel = widths == width
        slot = np.arange(width)[None, :]
        pos = np.minimum(starts[sel][:, None] + slot, len(order) - 1)
        blocks.append((clients[sel], np.where(slot < counts[sel][:, None], order[pos], -1)))
    return blocks


def shared_product(left, cols, k: int) -> np.ndarray:
    """left (G, k, d + 2) @ cols (d + 2, U) as one 2-D product: (G, k, U)."""
    return (left.reshape(-1, left.shape[-1]) @ cols).reshape(-1, k, cols.shape[1])


def free_column_sums(left, right, free, w) -> np.ndarray:
    """(G, k): sum_{v free} w_v ||a_gi - b_v|| for each of the k rows a_gi of G clients, the
    rows as left (G, k, d + 2) and the U columns b_v as right (U, d + 2) (`gram_factors`),
    free (G, U): the columns each client sums over.

    When most columns are free, each block of clients takes all U columns in one product
    (the others weighted 0); otherwise each client's free columns are gathered (their count
    padded, padding weighted 0): ~40% less work for contrastive uploads (half the columns)."""
    G, k, _ = left.shape
    U = len(right)
    n_free = free.sum(axis=1)
    out = np.zeros((G, k))
    n_cols = int(n_free.max(initial=0))
    if n_cols == 0:
        return out
    if 4 * n_cols > 3 * U:  # all columns, shared
        cols, weights = right.T, np.where(free, w, 0.0)
    else:  # each client's own free columns (stable: in column order)
        comp = np.argsort(~free, axis=1, kind="stable")[:, :n_cols]
        cols = np.swapaxes(right[comp], 1, 2)  # (G, d + 2, n_cols)
        weights = np.where(np.arange(n_cols) < n_free[:, None], w[comp], 0.0)
    per_block = max(1, CPU_BLOCK // (k * n_cols if cols.ndim == 3 else k * U))
    for lo in range(0, G, per_block):
        sl = slice(lo, lo + per_block)
        if cols.ndim == 2:  # one 2-D product, seen as (clients, k, U)
            product = partial(shared_product, left[sl], cols, k)
        else:
            product = partial(np.matmul, left[sl], cols[sl])
        out[sl] = root_sums(product, weights[sl])
    return out


def client_uniformities(common, weights, rows, owner, item, n_clients, device=None) -> np.ndarray:
    """`uniformity` of every client's simulated sampled rows, from the rows that differ.

    common (U, d): the U distinct sampled items after the step with a zero gradient (what
    every client that did not upload an item leaves of it); weights w (U,): how often each
    was drawn (sum = s); rows (K, d): item[k]'s row after the step with client owner[k]'s
    gradient, for the K (client, sampled item) pairs the clients uploaded. With D the
    common distances, T_c client c's items, y its rows (y_u = common_u outside T_c) and
    t_c = w on T_c, 0 elsewhere,

        s (s - 1) d_c = w' D w + sum_{u, v in T_c} w_u w_v ||y_u - y_v|| - t_c' D t_c
                        + 2 sum_{u in T_c, v not in T_c} w_u w_v (||y_u - common_v|| - D_uv)

    (positions drawing the same item are at distance 0, as in `uniformity`), the last
    D term being t_c' D (w - t_c): the common distances once, then, clients grouped by row
    count (`client_groups`, padding rows weighing 0), each client's rows against the
    common rows it did not upload (`free_column_sums`) and against each other
    (`weighted_pair_sums`): sum_c K_c (U - K_c) + K_c^2 / 2 distances, at most the n U^2 / 2
    of every client's full set. On a GPU device, when the uploads cover most sampled
    items (K U + sum_c K_c^2 / 2 > n U^2 / 2), every client's full set is built instead and
    `weighted_pair_sums` runs on it there.
    """
    common = np.asarray(common, np.float64)
    rows = np.asarray(rows, np.float64)
    w = np.asarray(weights, np.float64)
    s = w.sum()
    U = len(w)
    per_client = np.bincount(owner, minlength=n_clients)
    if (device not in (None, "cpu")
            and 2 * len(rows) * U + per_client @ per_client > n_clients * U * U):
        y = np.broadcast_to(common, (n_clients, U, common.shape[1])).copy()
        y[owner, item] = rows
        return weighted_pair_sums(y, w, device) / (s * (s - 1))
    center = (w @ common) / s
    common = common - center
    rows = rows - center
    dist = zero_diagonal(distances(common, common))
    dist_w = dist @ w
    total = np.full(n_clients, w @ dist_w)
    if len(rows):
        own_w = np.zeros((n_clients, U))  # t_c
        own_w[owner, item] = w[item]
        # - t' D t - 2 t' D (w - t) = t' D t - 2 t' D w  (D symmetric)
        total += np.einsum("cu,cu->c", own_w, own_w @ dist - 2 * dist_w)
        free = own_w == 0
        # clients that uploaded every sampled item (dense uploads) have no cross term
        # (2 w'0 = 0 exactly, so leaving it out changes no bit): no factors, no gather
        left, right = gram_factors(rows, common) if free.any() else (None, None)
        for clients, idx in client_groups(owner):
            safe = np.where(idx >= 0, idx, 0)
            wy = np.where(idx >= 0, w[item[safe]], 0.0)
            pairs = weighted_pair_sums(rows[safe], wy, device)
            if free[clients].any():
                cross = free_column_sums(left[safe], right, free[clients], w)
                pairs = 2 * np.einsum("ga,ga->g", wy, cross) + pairs
            total[clients] += pairs
    return total / (s * (s - 1))
