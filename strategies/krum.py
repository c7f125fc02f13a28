"""Krum and Multi-Krum (Blanchard et al. 2017), dense and item-level.

Among a set S of updates, with f the assumed number of Byzantine ones,

    score(a) = sum of ||x_a - x_b||^2 over the k = |S| - f - 2 nearest other b in S;

Krum keeps the update of lowest score, Multi-Krum the m lowest and returns their mean
weighted by sample count (Krum is Multi-Krum with m = 1).

- dense: x_c is client c's whole update flattened (its rows scattered into the item table,
  untouched rows 0, then the predictor). Needs n >= f + 3; m = server.multikrum_m
  (0 = n - f). Dropped: every client not kept.
- item-level: per item i, among the rows of its contributors C_i, with distances between
  rows: k_i = m_i - f - 2 neighbours, and each item drops as many rows as the dense form
  drops clients: it keeps max(1, m_i - (n - m)) rows (Krum: 1) and takes their weighted
  mean. An item with m_i <= f + 2 has too few rows for a score that reaches past f
  outliers; it takes the coordinate-wise median of its rows. The predictor is aggregated by
  dense (Multi-)Krum on the predictor vectors alone. Dropped: clients none of whose upload
  was used (no row kept, predictor not kept).

Squared distances come from Gram matrices (strategies.item_distances): per item among its
rows, and for whole updates summed over items to client pairs.
"""

from __future__ import annotations

import numpy as np

from fedrec.errors import ConfigError
from strategies.aggregate import sparse_weighted_sum
from strategies.dense_distances import vector_sq_distances
from strategies.groups import NETWORK_MAX_WIDTH, group_rows, sort_slots
from strategies.item_distances import block_sq_distances, client_sq_distances
from strategies.robust import (
    MEDIAN,
    RobustRule,
    coordinate_trimmed_mean,
    flat_predictors,
    unflatten,
)
from strategies.rule import Aggregate, RoundUpdates


def sort_lists(values: np.ndarray) -> np.ndarray:
    """(B, c, c) values sorted along the last axis: for c <= NETWORK_MAX_WIDTH by a
    sorting network over all lanes at once along the first axis of a transposed copy
    (groups.sort_slots), beyond by numpy's sort of the contiguous lanes themselves."""
    B, c, _ = values.shape
    if c > NETWORK_MAX_WIDTH:
        return np.sort(values, axis=2)
    lanes = np.ascontiguousarray(values.transpose(2, 0, 1)).reshape(c, B * c)
    return np.ascontiguousarray(sort_slots(lanes).reshape(c, B, c).transpose(1, 2, 0))


def sort_neighbours(sq_dist: np.ndarray, others: np.ndarray, order: bool = True):
    """(order, nearest_first) of each member's list: order[b, a, j] = the j-th nearest of
    member a in set b (ties: the earlier member; entries where not `others` last, among
    the distances clamped to float32's maximum) and nearest_first (B, c, c) float32 its
    distance (float32's maximum where not `others`: finite, so a product with a 0 weight
    is 0, not nan). Distances are clamped to float32's maximum first (they stay the
    largest; rounding to float32 keeps their order).

    Sorted as int64 keys (the float32's bits, which order non-negative floats, above the
    index) by `sort_lists`: no argsort. order=False: (None, the values sorted alone,
    without keys)."""
    B, c, _ = sq_dist.shape
    big = np.finfo(np.float32).max
    values = np.where(others, np.minimum(sq_dist, big), big).astype(np.float32)
    values += np.float32(0)  # -0.0 (sign bit set: a negative key) to +0.0
    if not order:  # the values alone
        return None, sort_lists(values)
    shift = max(1, (c - 1).bit_length())
    keys = values.view(np.int32).astype(np.int64) << shift
    keys |= np.arange(c)
    keys = sort_lists(keys)
    nearest_first = (keys >> shift).astype(np.int32).view(np.float32)
    return keys & ((1 << shift) - 1), nearest_first


class NeighbourOrder:
    """Each member's other members sorted by squared distance: the Krum scores of a set, and
    again as members leave (Bulyan's repeated picks).

    sq_dist (B, c, c) within B sets; members (B, c) marks real members (the rest is
    padding). Sorting once lets Bulyan rescore after every pick without sorting again;
    `remove` takes a member out of its set's lists (one entry per list, not a rescan) and
    keeps before[b, a, j] = the live entries ahead of place j in a's list up to date (one
    elementwise decrement: a running count along the short lists would cost ~4x more).
    """

    def __init__(self, sq_dist: np.ndarray, members: np.ndarray):
        B, c, _ = sq_dist.shape
        others = members[:, None, :] & ~np.eye(c, dtype=bool)[None]
        order, nearest_first = sort_neighbours(sq_dist, others)
        self.rank = np.empty_like(order)  # rank[b, a, p]: where p sits in a's list
        lanes = (np.arange(B * c) * c)[:, None]  # row (b, a) of the (B * c, c) tables
        self.rank.ravel()[(lanes + order.reshape(B * c, c)).ravel()] = np.tile(np.arange(c), B * c)
        # live[b, a, j]: a's j-th nearest is another member still in the set
        live = np.take_along_axis(others, order, axis=2)
        # 0 where not a live neighbour
        # float64: the scores' einsum then skips a cast per pick (~15% of it)
        self.sorted = np.where(live, nearest_first, np.float32(0)).astype(np.float64)
        self.count_dtype = np.int8 if c < 127 else np.int32
        self.before = np.cumsum(live, axis=2, dtype=self.count_dtype) - live
        # after[p, j] = 1 where place j lies behind place p: a removal's decrements as one
        # np.take of rows (a broadcast int64 comparison per pick cost ~5x more)
        self.after = (np.arange(c)[None, :] > np.arange(c)[:, None]).astype(self.count_dtype)

    def remove(self, sets: np.ndarray, members: np.ndarray):
        """Member members[i] leaves set sets[i]: its entry in every list of that set dies."""
        c = self.sorted.shape[1]
        pos = self.rank[sets, :, members]  # (S, c): its place in each list
        self.sorted[sets[:, None], np.arange(c)[None, :], pos] = 0.0
        behind = np.take(self.after, pos, axis=0)  # the places after it lose one live entry
        if len(sets) == len(self.sorted):  # every set (in order): no gather and scatter
            np.subtract(self.before, behind, out=self.before)
        else:
            self.before[sets] -= behind

    def scores(self, alive: np.ndarray, f: int, sets=None) -> np.ndarray:
        """(B, c) Krum scores among the alive members (of `sets` only, if given); inf for
        the others. `alive` must match the removals so far.

        With r alive members, each alive a sums its k = max(1, r - f - 2) smallest
        distances to the other alive members (all of them when fewer exist: a lone member
        scores 0): the entries of its sorted list with fewer than k live entries ahead
        (dead entries hold 0).
        """
        before, dist, alive_sets = self.before, self.sorted, alive
        if sets is not None:
            before, dist, alive_sets = before[sets], dist[sets], alive[sets]
        r = alive_sets.sum(axis=1)
        k = np.minimum(np.maximum(r - f - 2, 1), r - 1).astype(self.count_dtype)
        nearest = before < k[:, None, None]
        scores = np.einsum("bij,bij->bi", dist, nearest)
        return np.where(alive_sets, scores, np.inf)


def krum_scores(sq_dist: np.ndarray, f: int, counts: np.ndarray | None = None) -> np.ndarray:
    """(B, c) float64 Krum scores within each of B sets of c members:

        score(a) = sum of the k = max(1, m - f - 2) smallest ||x_a - x_b||^2, b != a

    among the m members of the set (all m - 1 others when fewer exist; a lone member
    scores 0). counts: set b has only its first counts[b] members (the rest is padding,
    scored inf); None: all c. Each member's distances to the others are sorted
    (`sort_neighbours`) and the k nearest summed in float64: `NeighbourOrder.scores`
    before any removal, without its bookkeeping (ranks, live counts) for removals."""
    B, c, _ = sq_dist.shape
    m = np.full(B, c) if counts is None else np.asarray(counts)
    member = np.arange(c) < m[:, None]  # (B, c)
    others = member[:, None, :] & ~np.eye(c, dtype=bool)[None]
    _, nearest_first = sort_neighbours(sq_dist, others, order=False)
    k = np.minimum(np.maximum(m - f - 2, 1), m - 1)  # 0 for a lone member
    counted = (np.arange(c) < k[:, None]).astype(np.float32)  # (B, c): the k nearest
    scores = np.einsum("bij,bj->bi", nearest_first, counted, dtype=np.float64)
    return np.where(member, scores, np.inf)


def multikrum_keep(sq_dist: np.ndarray, f: int, keep, counts: np.ndarray | None = None
                   ) -> np.ndarray:
    """(B, c) bool: the `keep` (scalar or per set) members of each set with the lowest
    Krum scores (see krum_scores for counts); ties: the earlier member."""
    scores = krum_scores(sq_dist, f, counts)
    kept = np.zeros(scores.shape, bool)
    if np.all(np.asarray(keep) == 1):  # Krum: argmin (its first minimum), no sort
        kept[np.arange(len(kept)), np.argmin(scores, axis=1)] = True
        return kept
    order = np.argsort(scores, axis=1, kind="stable")
    np.put_along_axis(kept, order, np.arange(order.shape[1]) < np.asarray(keep).reshape(-1, 1),
                      axis=1)
    return kept


def weighted_mean_of(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_c w_c x_c / sum_c w_c over the rows of a (n, P) stack."""
    return (weights @ stack.astype(np.float64)) / weights.sum()


def kept_weighted_sum(ids, rows, owner, kept, weights, n_items: int) -> np.ndarray:
    """sparse_weighted_sum of the kept clients' rows alone (weights[owner] each): the same
    bits as over every row with weight 0 for the dropped ones (0 * row adds a signed zero,
    which leaves every sum as it is; validated rows are finite), without weighting and
    scattering the dropped rows: Krum keeps one client of 50, ~0.4 ms of an ML-1M round.
    Where most clients are kept (Multi-Krum) copying their rows out would cost more than
    the dropped rows' scatter: all rows then."""
    if 2 * np.count_nonzero(kept) > len(kept):
        return sparse_weighted_sum(ids, rows, weights[owner], n_items)
    used = np.flatnonzero(kept[owner])
    return sparse_weighted_sum(ids[used], rows[used], weights[owner[used]], n_items)


def dense_multikrum(updates: RoundUpdates, f: int, keep: int):
    """Multi-Krum over whole updates: (item_grad, predictor, kept (n,) bool)."""
    ids, rows, owner = updates.stacked
    n = len(updates)
    preds = flat_predictors(updates.uploads)
    dist = client_sq_distances(ids, rows, owner, n, preds)
    kept = multikrum_keep(dist[None], f, keep)[0]
    w = np.where(kept, updates.weights, 0.0)
    w = w / w.sum()
    item_grad = kept_weighted_sum(ids, rows, owner, kept, w, updates.n_items)
    predictor = [] if preds is None else unflatten(w @ preds.astype(np.float64),
                                                   updates.uploads[0].predictor)
    return item_grad, predictor, kept


def item_level_multikrum(updates: RoundUpdates, f: int, drop: int):
    """Multi-Krum per item among its rows, keeping max(1, m_i - drop) rows of each item.

    Returns (item_grad, kept_rows (R,) bool, items on the median (count)). Rows of items
    with m_i <= f + 2 count as kept: the median uses them all. Items come in size classes
    (groups.group_rows); per class one gather of the rows, then distances, scores, ranks
    and the weighted mean of the kept rows on that block (float32, one batched
    (1 x width) @ (width x dim) product per class).
    """
    ids, rows, owner = updates.stacked
    counts = np.bincount(ids, minlength=updates.n_items)
    item_grad = np.zeros((updates.n_items, rows.shape[1]), np.float32)
    kept = np.ones(len(ids), bool)
    weights = updates.weights[owner].astype(np.float32)
    for b in group_rows(ids, min_count=f + 3):
        x = b.gather(rows, 0.0, groups_first=True)  # (U, width, dim)
        keep = multikrum_keep(block_sq_distances(x), f,
                              np.maximum(1, b.counts - drop), b.counts)
        kept[b.rows.T[b.members & ~keep]] = False
        w = np.where(keep, weights[np.maximum(b.rows.T, 0)], np.float32(0))
        denom = w.sum(axis=1, dtype=np.float64)  # 0 only if every kept row weighs 0
        # (U, 1, width) @ (U, width, dim): ~5x faster than scaling the block and summing it
        item_grad[b.items] = np.matmul(w[:, None, :], x)[:, 0] / np.where(
            denom > 0, denom, 1.0).astype(np.float32)[:, None]
    coordinate_trimmed_mean(ids, rows, updates.n_items, MEDIAN, max_count=f + 3, out=item_grad)
    on_median = int(np.count_nonzero((counts > 0) & (counts < f + 3)))
    return item_grad, kept, on_median


class MultiKrumRule(RobustRule):
    """Multi-Krum: keep the m lowest Krum scores (m = server.multikrum_m; 0 = n - f)."""

    name = "multikrum"

    def __init__(self, granularity: str = "dense", f: int = 0, m: int = 0):
        if isinstance(m, bool) or int(m) != m or m < 0:
            raise ConfigError(f"server.multikrum_m: expected an integer >= 0, got {m!r}")
        self.m = int(m)
        super().__init__(granularity, f)

    def requirement(self, n: int) -> str:
        if n < self.f + 3:
            return (f"Krum needs n >= server.rule_f + 3 = {self.f + 3} clients per round "
                    f"(n - f - 2 >= 1 neighbours beyond the f outliers), got n = {n}")
        if self.m > n:
            return f"server.multikrum_m = {self.m} exceeds the n = {n} clients of a round"
        return ""

    def keep_count(self, n: int) -> int:
        return self.m if self.m > 0 else n - self.f

    def aggregate(self, updates: RoundUpdates) -> Aggregate:
        n = len(updates)
        keep = self.keep_count(n)
        if self.granularity == "dense":
            item_grad, predictor, kept = dense_multikrum(updates, self.f, keep)
            return Aggregate(item_grad, predictor, [int(i) for i in np.flatnonzero(~kept)])
        item_grad, kept_rows, on_median = item_level_multikrum(updates, self.f, n - keep)
        _, _, owner = updates.stacked
        used = np.bincount(owner, weights=kept_rows, minlength=n) > 0
        preds = flat_predictors(updates.uploads)
        predictor = []
        if preds is not None:
            pred_kept = multikrum_keep(vector_sq_distances(preds)[None], self.f, keep)[0]
            predictor = unflatten(weighted_mean_of(preds[pred_kept], updates.weights[pred_kept]),
                                  updates.uploads[0].predictor)
            used |= pred_kept
        return Aggregate(item_grad, predictor, [int(i) for i in np.flatnonzero(~used)],
                         {"rows_dropped": int(np.count_nonzero(~kept_rows)),
                          "items_median": on_median})


class KrumRule(MultiKrumRule):
    """Krum: the single update (dense) or row per item (item-level) of lowest score."""

    name = "krum"

    def __init__(self, granularity: str = "dense", f: int = 0):
        super().__init__(granularity, f, 1)
