"""Negative sampling on the device: uniform items the user never interacted with."""

from __future__ import annotations

import numpy as np


def _first_draw(count: int, n_items: int, n_excluded: int) -> int:
    return max(16, int(count * n_items / (n_items - n_excluded) * 1.2) + 8)


def sample_negatives(rng, n_items: int, exclude_sorted: np.ndarray, count: int,
                     exclude_mask: np.ndarray | None = None, start=None) -> np.ndarray:
    """`count` uniform items not in `exclude_sorted` (with replacement), by vectorised rejection.

    exclude_mask (optional, bool over items) is the same set as a lookup table: faster, same
    result (the accept/reject decisions and so the random stream are identical).
    """
    free = n_items - len(exclude_sorted)
    if free <= 0:
        raise ValueError("the user has interacted with every item: no negatives exist")
    out = start
    while out is None or len(out) < count:
        need = count - (0 if out is None else len(out))
        cand = rng.integers(0, n_items, size=_first_draw(need, n_items, len(exclude_sorted)))
        if exclude_mask is not None:
            ok = ~exclude_mask[cand]
        elif len(exclude_sorted):
            pos = np.searchsorted(exclude_sorted, cand)
            pos[pos == len(exclude_sorted)] = 0
            ok = exclude_sorted[pos] != cand
        else:
            ok = np.ones(len(cand), bool)
        out = cand[ok] if out is None else np.concatenate([out, cand[ok]])
    return out[:count]


def sample_negatives_cohort(clients, rngs, counts) -> list:
    """sample_negatives for several clients at once: the same draws from each client's own
    generator, the accept/reject lookups done in one pass. Identical results."""
    n_items = clients[0].model.n_items
    excl = [len(c.known_sorted) for c in clients]
    draws = [_first_draw(n, n_items, e) for n, e in zip(counts, excl)]
    cands = [r.integers(0, n_items, size=d) for r, d in zip(rngs, draws)]
    cand = np.concatenate(cands)
    owner = np.repeat(np.arange(len(clients)), draws)
    # each client's draws looked up in its own table, as they are drawn (a 2-D lookup in the
    # cohort's stacked tables costs more: the stack copies clients x n_items bytes)
    acc = np.flatnonzero(~np.concatenate([c.exclusion_mask()[x] for c, x in zip(clients, cands)]))
    acc_owner = owner[acc]
    got = np.bincount(acc_owner, minlength=len(clients))
    first = np.cumsum(got) - got
    rank = np.arange(len(acc)) - first[acc_owner]
    counts = np.asarray(counts)
    taken = cand[acc[rank < counts[acc_owner]]]
    bounds = np.concatenate([[0], np.cumsum(np.minimum(got, counts))])
    out = []
    for i, c in enumerate(clients):
        neg = taken[bounds[i] : bounds[i + 1]]
        if len(neg) < counts[i]:  # rare: continue this client's own stream, as one by one
            neg = sample_negatives(rngs[i], n_items, c.known_sorted, int(counts[i]),
                                   c.exclusion_mask(), start=neg)
        out.append(neg)
    return out
