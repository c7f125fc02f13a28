"""Squared L2 distances between whole updates held as dense vectors (n, P), by Gram, and
the test for dense item uploads.

||a - b||^2 = ||a||^2 + ||b||^2 - 2 <a, b> from one float64 Gram of the stacked vectors
(predictors), and of dense item uploads (every client sends every item, in order:
train.weight_decay_scope all, `every_item_sent`) whose rows are mostly each client's own;
where most rows are their item's common row, `strategies.item_distances` takes the own rows
alone (`common_row_sq_distances`).
"""

from __future__ import annotations

import numpy as np


def every_item_sent(ids, n_clients: int) -> bool:
    """Whether the n stacked uploads all send the same items 0..k-1, each in order (dense
    uploads: train.weight_decay_scope all): client c's rows are then rows[c k:(c + 1) k]."""
    if n_clients == 0 or len(ids) == 0 or len(ids) % n_clients:
        return False
    k = len(ids) // n_clients
    return bool((ids.reshape(n_clients, k) == np.arange(k)).all())


# columns per float64 slice of the dense Gram (50 clients x 2**14 = 6.5 MB, in cache)
DENSE_GRAM_COLUMNS = 1 << 14


def dense_sq_distances(flat: np.ndarray, predictors=None) -> np.ndarray:
    """(n, n) squared L2 distances between the rows of flat (n, k * dim), every client's
    whole item table (dense uploads), + the predictors: one float64 Gram, accumulated over
    slices of columns (a float64 copy of one slice at a time, not of the whole stack)."""
    n = len(flat)
    gram = np.zeros((n, n))
    for lo in range(0, flat.shape[1], DENSE_GRAM_COLUMNS):
        part = flat[:, lo:lo + DENSE_GRAM_COLUMNS].astype(np.float64)
        gram += part @ part.T
    if predictors is not None:
        p = predictors.astype(np.float64)
        gram += p @ p.T
    return gram_to_sq_distances(gram)


def vector_sq_distances(stack: np.ndarray) -> np.ndarray:
    """(n, n) squared L2 distances between the rows of a (n, P) stack."""
    p = stack.astype(np.float64)
    return gram_to_sq_distances(p @ p.T)


def gram_to_sq_distances(gram: np.ndarray) -> np.ndarray:
    sq = np.diag(gram).copy()
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)
    dist[np.diag_indices(len(gram))] = 0.0
    return dist
