"""Negative sampling on the device: uniform items the user never interacted with."""

from __future__ import annotations

import numpy as np

from fedrec.evaluation import csr_gather


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


def fresh_integers(rngs, high: int, sizes) -> list:
    """[r.integers(0, high, size=d) for r, d in zip(rngs, sizes)], the same numbers and the
    generators left in the same states, for generators whose 32-bit buffer is empty (a fresh
    or just-advanced PCG64: `clients.streams.Streams`).

    numpy draws each bounded integer below 2**32 by Lemire's method from the generator's
    32-bit outputs, which PCG64 serves as the low then the high half of each raw 64-bit word
    (keeping an unused high half for the next call). Here the raw words come in one call per
    client and the multiply-shift runs over the whole cohort at once (~2 us a client against
    ~5 for `integers`). A draw that Lemire's method would reject and redraw (probability
    ((2**32 - high) mod high) / 2**32, ~6e-7 for ML-1M) sends its client back to `integers`,
    after rewinding its generator. Other bit generators take `integers` itself."""
    sizes = [int(d) for d in sizes]
    out = [None] * len(rngs)
    fast, words = [], []
    for i, (r, d) in enumerate(zip(rngs, sizes)):
        if type(r.bit_generator) is np.random.PCG64 and 0 < high < (1 << 32) and d > 0:
            fast.append(i)
            words.append(r.bit_generator.random_raw((d + 1) // 2))
        else:
            out[i] = r.integers(0, high, size=d)
    if not fast:
        return out
    halves = np.concatenate(words).view("<u4")  # little-endian: low half, then high half
    starts = np.cumsum([0] + [2 * len(w) for w in words[:-1]])
    lens = np.array([sizes[i] for i in fast], dtype=np.int64)
    scaled = halves[csr_gather(starts, lens)].astype(np.uint64) * np.uint64(high)
    leftover = scaled & np.uint64(0xFFFFFFFF)
    rejected = leftover < np.uint64(((1 << 32) - high) % high)
    values = (scaled >> np.uint64(32)).astype(np.int64)
    bounds = np.concatenate([[0], np.cumsum(lens)])
    for j, i in enumerate(fast):
        bg, d = rngs[i].bit_generator, sizes[i]
        if rejected[bounds[j] : bounds[j + 1]].any():  # rare: numpy's own redraw loop
            bg.advance((1 << 128) - len(words[j]))  # back to where this client started
            out[i] = rngs[i].integers(0, high, size=d)
            continue
        out[i] = values[bounds[j] : bounds[j + 1]]
        if d % 2:  # the last word's high half stays in the generator's 32-bit buffer
            state = bg.state
            state["has_uint32"], state["uinteger"] = 1, int(words[j][-1] >> np.uint64(32))
            bg.state = state
    return out


def sample_negatives_cohort(clients, rngs, counts, fresh_streams: bool = False) -> list:
    """sample_negatives for several clients at once: the same draws from each client's own
    generator, the accept/reject lookups done in one pass. Identical results. fresh_streams:
    the generators' 32-bit buffers are empty (just advanced), so the first draws may come
    from `fresh_integers`."""
    n_items = clients[0].model.n_items
    excl = [len(c.known_sorted) for c in clients]
    draws = [_first_draw(n, n_items, e) for n, e in zip(counts, excl)]
    cands = fresh_integers(rngs, n_items, draws) if fresh_streams else \
        [r.integers(0, n_items, size=d) for r, d in zip(rngs, draws)]
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
