"""Aggregation math as small stateless functions (cf. flwr/server/strategy/aggregate.py).

Uploads are sparse: client c sends rows g_c[i] for its touched ids T_c. With weights w_c:
- dense mean:      G[i] = sum_{c: i in T_c} w_c g_c[i] / sum_c w_c        (untouched = 0)
- item-level mean: G[i] = sum_{c: i in T_c} w_c g_c[i] / sum_{c: i in T_c} w_c
The dense form is the reference protocol's; the item-level form averages each row only over
the clients that sent it (Spattack's point about sparse aggregation).
"""

from __future__ import annotations

import numpy as np
import torch


def stack_uploads(ids_list, rows_list):
    """Concatenate sparse uploads: (all_ids, all_rows, owner index per row)."""
    lens = np.fromiter((len(i) for i in ids_list), dtype=np.int64, count=len(ids_list))
    if lens.sum() == 0:
        dim = rows_list[0].shape[1] if rows_list else 0
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32), np.zeros(0, np.int64)
    return (np.concatenate(ids_list), np.concatenate(rows_list),
            np.repeat(np.arange(len(ids_list)), lens))


WEIGHTED_SUM_BLOCK = 4096  # rows weighted at a time: a 1 MB block (dim 64) stays in cache


def sparse_weighted_sum(ids, rows, row_weights, n_items: int):
    """sum over uploaded rows of weight * row, scattered into an (n_items, dim) table.

    Rows are weighted and added block by block, in row order: index_add_ adds sequentially,
    so the sums are the same bits as weighting every row first. A dense round (50 tables of
    3,706 rows) no longer writes and rereads a 47 MB weighted copy: ~1.4x faster there."""
    out = torch.zeros((n_items, rows.shape[1]), dtype=torch.float32)
    if len(ids) and whole_tables(ids, n_items):
        return _table_weighted_sum(rows, row_weights, n_items, out)
    if len(ids):
        src = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
        weights = torch.from_numpy(np.asarray(row_weights).astype(np.float32))[:, None]
        index = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        block = torch.empty((min(WEIGHTED_SUM_BLOCK, len(ids)), rows.shape[1]),
                            dtype=torch.float32)
        for a in range(0, len(ids), WEIGHTED_SUM_BLOCK):
            b = min(a + WEIGHTED_SUM_BLOCK, len(ids))
            out.index_add_(0, index[a:b], torch.mul(src[a:b], weights[a:b], out=block[: b - a]))
    return out.numpy()


def whole_tables(ids, n_items: int) -> bool:
    """Whether the stacked ids are whole tables one after another (0..n_items-1, repeated):
    the dense uploads of weight_decay_scope all."""
    return n_items > 0 and len(ids) % n_items == 0 and \
        bool((np.asarray(ids).reshape(-1, n_items) == np.arange(n_items)).all())


def _table_weighted_sum(rows, row_weights, n_items: int, out):
    """sparse_weighted_sum of whole tables: table by table, out += weight * table. Each
    entry receives the same float32 additions in the same order as index_add_ over the rows
    (table 0's row, then table 1's, ...), so the same bits, at the pace of whole-array adds
    rather than index_add_'s per-row steps (~2x on 50 ML-1M tables)."""
    k = len(rows) // n_items
    src = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).view(k, n_items, -1)
    weights = torch.from_numpy(np.asarray(row_weights).astype(np.float32)).view(k, n_items, 1)
    block = torch.empty(src.shape[1:], dtype=torch.float32)
    for table, weight in zip(src, weights):
        out.add_(torch.mul(table, weight, out=block))
    return out.numpy()


def dense_mean(ids_list, rows_list, weights, n_items: int) -> np.ndarray:
    """Weighted mean over clients, untouched rows counting as zeros."""
    return dense_mean_stacked(*stack_uploads(ids_list, rows_list), weights, n_items)


def dense_mean_stacked(ids, rows, owner, weights, n_items: int) -> np.ndarray:
    """dense_mean on stacked uploads (ids, rows, owner = upload index of each row)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum() if w.sum() > 0 else w
    return sparse_weighted_sum(ids, rows, w[owner], n_items)


def item_level_mean(ids_list, rows_list, weights, n_items: int) -> np.ndarray:
    """Weighted mean of each row over only the clients that uploaded it."""
    return item_level_mean_stacked(*stack_uploads(ids_list, rows_list), weights, n_items)


def item_level_mean_stacked(ids, rows, owner, weights, n_items: int) -> np.ndarray:
    """item_level_mean on stacked uploads."""
    w = np.asarray(weights, dtype=np.float64)
    return item_level_weighted_mean(ids, rows, w[owner], w[owner], n_items)


def item_level_weighted_mean(ids, rows, row_weights, denom_weights, n_items: int):
    """G[i] = sum_r a_r rows[r] / sum_r b_r over the rows r of item i (0 where sum b = 0):
    a = row_weights, b = denom_weights (a = b * scale for clipped rows)."""
    total = sparse_weighted_sum(ids, rows, row_weights, n_items)
    denom = np.bincount(ids, weights=denom_weights, minlength=n_items)
    # where sum b = 0 the sum is 0 too: divide by 1 there (one pass over the table; a
    # boolean gather and scatter of the touched rows costs ~2x more)
    total /= np.where(denom > 0, denom, 1.0).astype(np.float32)[:, None]
    return total


def weighted_mean_arrays(arrays_list, weights) -> list:
    """Weighted mean of equally shaped dense arrays (predictor gradients)."""
    if not arrays_list or not arrays_list[0]:
        return []
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return [np.tensordot(w, np.stack([a[j] for a in arrays_list]), axes=1).astype(np.float32)
            for j in range(len(arrays_list[0]))]
