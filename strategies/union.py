"""UNION's server-side filter (Yu et al., AAAI'23), a wrapper around any aggregation rule.

Each round (REFERENCE.md section 4):

1. sample s = server.union_sample_items item ids with replacement (a seeded generator);
2. for each client c, simulate the server optimizer's step with c's item gradient alone and
   take the updated rows y_1..y_s of the sampled items (`simulated_item_rows`);
3. uniformity d_c = mean pairwise L2 distance among them,
       d_c = 1 / (s (s - 1)) * sum_{a != b} ||y_a - y_b||_2     (`uniformity`);
4. min-max normalise the d_c; gap statistic (Tibshirani et al. 2001) for k in {1, 2} against
   uniform 1-D reference sets of the same size (`gap_statistic_split`);
5. drop the minor cluster of the 2-means split of the d_c iff the gap statistic finds more
   than one cluster, or the minor cluster has at most server.union_expected_attackers members.

`UnionFilter` is a pre-aggregation step (server.filters: [union]): it drops those uploads
and hands the rest to the next step or the rule (server.rule); with Multi-Krum the dropped
set is the union of both; with norm bound the kept uploads are clipped ("filter, then clip").

Differences from the reference code, none of which changes a decision it would take:
- 2-means in 1-D is solved exactly (sort, try every split) where the reference runs
  k-means++ / Lloyd (which may stop in a local optimum); the null pool is drawn the same way
  (exact, vectorised, seeded: the reference's pool and its B-draws are unseeded).
- The sampled ids and the B reference draws come from the rule's own generator seeded by
  the experiment seed (not the strategy's client-sampling stream, so switching the filter on
  does not change which clients are sampled).
- When the two clusters of the split are the same size there is no minor cluster and
  nothing is dropped (the reference drops k-means' label 1, an arbitrary half).
- The reference runs Multi-Krum on all n uploads and unions its drop set with UNION's; here
  the inner rule runs on the uploads UNION kept (so its own f outliers are sought among them).

Cost: only the rows a client uploaded differ between its simulated table and the common
one (the step with a zero gradient; for an item that more clients sent with one same
gradient row than sent none, e.g. the weight decay alone of dense uploads, the step with that
row: `shared_gradients`), so d_c is computed from the common pairwise distances
plus the pairs that touch the client's own sampled rows (`client_uniformities` in
strategies/uniformity.py): O(s^2 d) once plus O(k_c s d) per client with k_c its sampled
rows, instead of O(n s^2 d); with the contrastive term (k_c ~ s / 2) each client's rows
against the common rows it did not upload and against each other. Distances in float64
(on ML-1M the d_c of a round differ by ~1e-3 of their value; tests hold them to 1e-9 of
the definition), each cache-sized block clamped, rooted and summed with its weights right
after its product.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from fedrec.errors import ConfigError
from fedrec.optim import adam_update
from strategies.rule import Filtered, PreAggregationStep, RoundUpdates, drop_uploads
from strategies.uniformity import client_uniformities, uniformity, weighted_pair_sums

__all__ = ["UnionFilter", "union_filter", "union_uniformities", "simulated_item_rows",
           "stepped_rows", "shared_gradients", "gap_statistic_split", "null_log_inertias",
           "two_means_1d", "client_uniformities", "uniformity", "weighted_pair_sums"]

NULL_DRAWS = 10_000  # size of the cached pool of reference log-inertias
NULL_SEED = 0x554E494F  # "UNIO"
_BLOCK = 1 << 22  # float64 elements per block of the null pool (32 MiB)
_null_cache: dict = {}


# ---------------------------------------------------------------------- simulated step


def simulated_item_rows(item_rows, grads, adam_state_rows=None, step=0, lr=2e-3,
                        betas=(0.9, 0.999), eps=1e-8):
    """The rows after one server optimizer step driven by `grads` alone (float64).

    item_rows (..., d) broadcasts against grads (clients, s, d) or (K, d). Adam
    (adam_state_rows = (exp_avg_rows, exp_avg_sq_rows), step = steps taken so far): exactly
    torch.optim.Adam without weight decay at t = step + 1 (fedrec.optim.adam_update).
    SGD (adam_state_rows None):  row' = row - lr * g.
    """
    if adam_state_rows is None:
        return np.asarray(item_rows, np.float64) - lr * np.asarray(grads, np.float64)
    rows, _, _ = adam_update(item_rows, adam_state_rows[0], adam_state_rows[1], grads,
                             int(step) + 1, lr, float(betas[0]), float(betas[1]), eps)
    return rows


STEP_ROWS = 2048  # rows per block of stepped_rows (its working set stays in cache)


def stepped_rows(item, grads, base, moments=None, step=0, lr=2e-3, betas=(0.9, 0.999),
                 eps=1e-8, block: int = STEP_ROWS):
    """simulated_item_rows(base[item], grads, (m[item], v[item]), ...) bit for bit (the same
    operations in the same order), for K rows of gradients grads (K, d) on the rows `item`
    of the U rows base (U, d), moments = (m, v) (U, d) or None (SGD): the step's factors of
    the U rows once, gathered per row; the K rows in blocks, each block's arithmetic in place
    on two block-sized arrays (in cache, rather than a dozen (K, d) temporaries)."""
    base = np.asarray(base, np.float64)
    out = np.empty(np.shape(grads), np.float64)
    if moments is not None:
        b1, b2 = float(betas[0]), float(betas[1])
        t = int(step) + 1
        b1m = b1 * np.asarray(moments[0], np.float64)
        b2v = b2 * np.asarray(moments[1], np.float64)
    for lo in range(0, len(out), block):
        g = out[lo:lo + block]
        g[...] = grads[lo:lo + block]  # float64
        rows = item[lo:lo + block]
        if moments is None:  # row - lr * grad
            g *= lr
            np.subtract(np.take(base, rows, axis=0), g, out=g)
            continue
        m = np.multiply(g, 1 - b1)  # m' = b1 m + (1 - b1) g
        m += np.take(b1m, rows, axis=0)
        v = np.multiply(g, 1 - b2)  # v' = b2 v + (1 - b2) g g
        v *= g
        v += np.take(b2v, rows, axis=0)
        denom = np.sqrt(v, out=v)
        denom /= np.sqrt(1 - b2 ** t)
        denom += eps
        m *= lr / (1 - b1 ** t)
        m /= denom
        np.subtract(np.take(base, rows, axis=0), m, out=g)
    return out


# ---------------------------------------------------------------------- gap statistic


def two_means_1d(values):
    """Exact 1-D k-means for k = 1 and 2 along the last axis: (W1, W2, labels).

    W_k = within-cluster sum of squares. The optimal 2-means clusters of 1-D points are the
    two sides of a split of the sorted values: with prefix sums S_j = sum of the j smallest
    x, Q_j = sum of their squares, and totals S, Q, the split after j (1 <= j < n) costs

        (Q_j - S_j^2 / j) + ((Q - Q_j) - (S - S_j)^2 / (n - j)),

    all splits at once. labels: 0 for the smaller-valued side, 1 for the other, in the
    input's order (same shape as values).
    """
    x = np.asarray(values, np.float64)
    n = x.shape[-1]
    order = np.argsort(x, axis=-1, kind="stable")
    xs = np.take_along_axis(x, order, axis=-1)
    xs = xs - xs.mean(axis=-1, keepdims=True)  # less cancellation in Q - S^2 / n
    c1 = np.cumsum(xs, axis=-1)
    c2 = np.cumsum(xs * xs, axis=-1)
    tot1, tot2 = c1[..., -1:], c2[..., -1:]
    w1 = np.maximum(tot2[..., 0] - tot1[..., 0] ** 2 / n, 0.0)
    if n < 2:
        return w1, w1.copy(), np.zeros(x.shape, np.int64)
    j = np.arange(1, n, dtype=np.float64)
    l1, l2 = c1[..., :-1], c2[..., :-1]
    cost = (np.maximum(l2 - l1 ** 2 / j, 0.0)
            + np.maximum((tot2 - l2) - (tot1 - l1) ** 2 / (n - j), 0.0))
    best = np.argmin(cost, axis=-1)
    w2 = np.take_along_axis(cost, best[..., None], axis=-1)[..., 0]
    sorted_labels = (np.arange(n) > best[..., None]).astype(np.int64)
    labels = np.empty_like(sorted_labels)
    np.put_along_axis(labels, order, sorted_labels, axis=-1)
    return w1, w2, labels


def null_log_inertias(n: int, cache_dir=None, draws: int = NULL_DRAWS) -> np.ndarray:
    """(draws, 2): log W_1, log W_2 of exact 1-D k-means on n uniform points in [0, 1].

    Seeded (NULL_SEED, n), computed in blocks of draws, cached in memory and, with a
    cache_dir, on disk as <cache_dir>/union-null-n{n}.npz.
    """
    if n < 3:
        raise ValueError(f"the gap statistic needs at least 3 values, got {n}")
    name = f"union-null-n{n}.npz" if draws == NULL_DRAWS else f"union-null-n{n}-d{draws}.npz"
    path = Path(cache_dir) / name if cache_dir else None
    key = str(path) if path is not None else name
    if key in _null_cache:
        return _null_cache[key]
    pool = None
    if path is not None and path.is_file():
        try:
            with np.load(path) as f:
                pool = f["log_inertia"]
            if pool.shape != (draws, 2):
                pool = None
        except (OSError, ValueError, KeyError):
            pool = None  # unreadable (e.g. a half-written file): recompute
    if pool is None:
        rng = np.random.default_rng([NULL_SEED, n])
        pool = np.empty((draws, 2))
        per_block = max(1, _BLOCK // n)
        for lo in range(0, draws, per_block):
            m = min(per_block, draws - lo)
            w1, w2, _ = two_means_1d(rng.random((m, n)))
            pool[lo:lo + m, 0], pool[lo:lo + m, 1] = np.log(w1), np.log(w2)
        try:
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
                np.savez(tmp, log_inertia=pool)
                os.replace(tmp, path)  # atomic: concurrent runs never read half a file
        except OSError:
            pass  # a read-only cache only costs the recomputation
    _null_cache[key] = pool
    return pool


def gap_statistic_split(values, null_log_inertia, B: int = 50, rng=None):
    """(more_than_one, labels): the gap statistic for k in {1, 2} on 1-D values.

    x = min-max normalised values; W_k = within-cluster sum of squares of exact k-means on x
    (`two_means_1d`); B reference log-inertias log W*_kb are drawn without replacement from
    the pool (`null_log_inertias(len(values))`: uniform points of the same count):

        Gap_k = mean_b(log W*_kb) - log W_k,   s_k = sd_b(log W*_kb) * sqrt(1 + 1/B)

    more_than_one iff Gap_1 < Gap_2 - s_2. labels: the 2-means split (0 = lower values).
    Fewer than 3 values, or all equal: (False, zeros).
    """
    x = np.asarray(values, np.float64)
    n = len(x)
    lo, hi = (x.min(), x.max()) if n else (0.0, 0.0)
    if n < 3 or not hi > lo:
        return False, np.zeros(n, np.int64)
    x = (x - lo) / (hi - lo)
    w1, w2, labels = two_means_1d(x)
    rng = np.random.default_rng() if rng is None else rng
    pool = np.asarray(null_log_inertia)
    ref = pool[rng.choice(len(pool), size=min(B, len(pool)), replace=False)]
    tiny = np.finfo(np.float64).tiny  # W_2 = 0: two distinct values, Gap_2 ~ +700
    gap = ref.mean(axis=0) - np.log(np.maximum([w1, w2], tiny))
    s2 = ref[:, 1].std() * math.sqrt(1 + 1 / len(ref))
    return bool(gap[0] < gap[1] - s2), labels


# ---------------------------------------------------------------------- the filter


def union_uniformities(updates: RoundUpdates, sample_ids: np.ndarray, state: dict,
                       device=None) -> np.ndarray:
    """(n,) d_c of every upload for the sampled item ids (with repeats) under `state`."""
    if updates.item_table is None:
        raise ValueError("UNION needs the current item table (RoundUpdates.item_table)")
    uniq, weights = np.unique(sample_ids, return_counts=True)
    base = np.asarray(updates.item_table)[uniq].astype(np.float64)
    adam = state.get("optimizer", "adam") == "adam"
    kw = {}
    if adam:
        if state.get("exp_avg") is None:  # before the first step: zero moments
            m = v = np.zeros_like(base)
        else:
            m = np.asarray(state["exp_avg"])[uniq]
            v = np.asarray(state["exp_avg_sq"])[uniq]
        kw = dict(step=state.get("step", 0), betas=state["betas"], eps=state["eps"])
    lr = state["lr"]
    ids, rows, owner = updates.stacked
    pos_of = np.full(updates.n_items, -1, np.int64)
    pos_of[uniq] = np.arange(len(uniq))
    pos = pos_of[ids]
    sel = pos >= 0
    item, own, grads = pos[sel], owner[sel], rows[sel]
    common_grad, differs = shared_gradients(grads, item, len(uniq), len(updates))
    common = simulated_item_rows(base, common_grad, (m, v) if adam else None, lr=lr, **kw)
    if not differs.all():  # rows equal to their item's common gradient: common rows
        item, own, grads = item[differs], own[differs], grads[differs]
    sim = stepped_rows(item, grads, base, (m, v) if adam else None, lr=lr, **kw)
    return client_uniformities(common, weights, sim, own, item, len(updates), device)


def shared_gradients(grads, item, n_sampled: int, n_clients: int):
    """(common_grad (U, d), differs (K,) bool) for the K uploaded gradient rows `grads` on
    the sampled items item (K,) (positions among the U distinct ones) of n_clients clients.

    The "common" row of an item is the step that every client leaving the item common
    applies: no gradient (a client that did not send the item) unless more clients sent
    one same row, bit for bit, than sent none. With train.weight_decay_scope all every
    client sends every item, most of them only the weight decay of the row, the same bits
    for all: those rows simulate to the common row exactly, and only the others (`differs`)
    are a client's own rows (~6% of them on ML-1M MF, ~37% with the contrastive term,
    instead of all). Candidates per item: the first, middle and last row sent (bitwise
    matches counted, a first-coordinate test before the full rows); any choice gives the
    same d_c, a frequent one gives fewer own rows."""
    K, d = grads.shape
    common_grad = np.zeros((n_sampled, d), grads.dtype)
    differs = np.ones(K, bool)
    senders = np.bincount(item, minlength=n_sampled)
    best = n_clients - senders  # the clients that send nothing take the zero step
    if K == 0 or not (senders > best).any():
        return common_grad, differs
    bits = np.ascontiguousarray(grads).view(f"u{grads.dtype.itemsize}")
    order = np.argsort(item, kind="stable")
    starts = np.searchsorted(item[order], np.arange(n_sampled))
    best_row = np.full(n_sampled, -1)
    same_best = np.zeros(K, bool)
    for frac in (0.0, 0.5, 1.0):
        offset = (frac * np.maximum(senders - 1, 0)).astype(np.int64)
        cand = order[np.minimum(starts + offset, K - 1)]
        ref = cand[item]
        maybe = bits[:, 0] == bits[ref, 0]
        check = maybe & (np.bincount(item[maybe], minlength=n_sampled) > best)[item]
        same = np.zeros(K, bool)
        same[check] = (bits[check] == bits[ref[check]]).all(axis=1)
        count = np.bincount(item[same], minlength=n_sampled)
        better = count > best
        best[better], best_row[better] = count[better], cand[better]
        same_best = np.where(better[item], same, same_best)
    chosen = best_row >= 0
    common_grad[chosen] = grads[best_row[chosen]]
    return common_grad, ~same_best


def union_filter(updates: RoundUpdates, rng, *, sample_items: int = 500, gap_b: int = 50,
                 expected_attackers: int = 1, state: dict | None = None, cache_dir=None,
                 device=None):
    """(positions to drop (sorted list), info) for one round; see the module docstring.
    device: None/"cpu" (numpy), or a torch device ("cuda") for the pairwise distances.

    state: the item table's optimizer state (RoundUpdates.server_state's format,
    fedrec.optim.ServerOptimizer.item_state); None = updates.server_state.
    """
    n = len(updates)
    info = {"union_dropped": 0, "union_gap_more_than_one": 0}
    if n < 3:  # no gap statistic on fewer than 3 values
        return [], info
    state = updates.server_state if state is None else state
    if state is None:
        raise ValueError("UNION needs the server optimizer's settings (RoundUpdates.server_state)")
    sample_ids = rng.choice(updates.n_items, size=sample_items, replace=True)
    d = union_uniformities(updates, sample_ids, state, device)
    finite = np.isfinite(d)
    drop = ~finite  # cannot happen with validated uploads; never trust a nan
    values = d[finite]
    if len(values) < 3:
        return [int(i) for i in np.flatnonzero(drop)], {**info, "union_dropped": int(drop.sum())}
    more, labels = gap_statistic_split(values, null_log_inertias(len(values), cache_dir),
                                       gap_b, rng)
    sizes = np.bincount(labels, minlength=2)
    if sizes[0] != sizes[1]:
        minor = int(np.argmin(sizes))
        if more or sizes[minor] <= expected_attackers:
            drop[np.flatnonzero(finite)[labels == minor]] = True
    info = {"union_dropped": int(drop.sum()), "union_gap_more_than_one": int(more)}
    return [int(i) for i in np.flatnonzero(drop)], info


class UnionFilter(PreAggregationStep):
    """UNION's server-side filter as a pre-aggregation step (server.filters: [union]): drops
    the uploads `union_filter` flags; the rule (or the next step) gets the rest.

    info: union_dropped, union_gap_more_than_one. optimizer: the server optimizer's settings
    ({"optimizer", "lr", "betas", "eps"}) used when a round carries no server_state (moments
    then start at zero). cache_dir: where the null pool is cached on disk (None: memory only).
    device: cpu | cuda for the pairwise distances.
    """

    name = "union"

    def __init__(self, *, sample_items: int = 500, gap_b: int = 50, expected_attackers: int = 1,
                 seed: int = 0, cache_dir=None, optimizer: dict | None = None,
                 device: str = "cpu"):
        for key, value, lo in (("union_sample_items", sample_items, 2), ("union_gap_b", gap_b, 2),
                               ("union_expected_attackers", expected_attackers, 0)):
            if isinstance(value, bool) or int(value) != value or value < lo:
                raise ConfigError(f"server.{key}: expected an integer >= {lo}, got {value!r}")
        if gap_b > NULL_DRAWS:
            raise ConfigError(f"server.union_gap_b: at most {NULL_DRAWS} (the null pool), "
                              f"got {gap_b}")
        self.sample_items, self.gap_b = int(sample_items), int(gap_b)
        self.expected_attackers = int(expected_attackers)
        self.cache_dir = cache_dir
        self.optimizer = optimizer or {"optimizer": "adam", "lr": 2e-3, "betas": (0.9, 0.999),
                                       "eps": 1e-8}
        self.rng = np.random.default_rng([int(seed), NULL_SEED])
        self.device = device

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict):
        self.rng.bit_generator.state = state["rng"]

    def __call__(self, updates: RoundUpdates) -> Filtered:
        state = updates.server_state if updates.server_state is not None else self.optimizer
        dropped, info = union_filter(updates, self.rng, sample_items=self.sample_items,
                                     gap_b=self.gap_b, expected_attackers=self.expected_attackers,
                                     state=state, cache_dir=self.cache_dir, device=self.device)
        return drop_uploads(updates, dropped, info)
