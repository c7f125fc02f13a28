"""Shared machinery of the robust rules (median, trimmed mean, Krum, Multi-Krum, Bulyan).

An item-level rule works on each item's *group*: the rows g_c[i] of the clients C_i that
uploaded item i, m_i = |C_i|. The dense form of the same rule works on all n clients, the
n - m_i clients that did not upload row i counting as zero rows (as Flower's built-ins see
dense updates). Both forms run on the same grouped rows (strategies.groups: grouping by
item into padded size classes, sorting networks, the item-level median):

- `AugmentedOrder` reads order statistics of a lane's m sorted values *plus z zeros* without
  materialising the zeros; z = n - m_i gives the dense form, z = 0 the item-level form.
  The z copies may be of another per-lane value than 0 (`fill`): dense uploads
  (train.weight_decay_scope all), where every client sends every row and most rows of an
  item are the same bits for every client (`strategies.common_rows`), are the common row
  z times plus each item's few own rows.
- A dense array (the predictor) is one group in which every client has a row.

The Python loops here run over size classes (at most 2 log2(n) + 1), comparators of a network
of width <= 16, the <= n slots of a group, or Bulyan's 2f end values: never over items or
coordinates.
"""

from __future__ import annotations

import numpy as np

from fedrec.errors import ConfigError
from strategies.common_rows import common_rows
from strategies.dense_distances import every_item_sent
from strategies.groups import (
    RowBucket,
    dense_trimmed_mean,
    group_rows,
    item_median,
    sort_slots,
    sorted_lanes,
)
from strategies.rule import Aggregate, AggregationRule, RoundUpdates

MEDIAN = None  # `trim` value meaning: trim all but the middle one or two values


class AugmentedOrder:
    """Order statistics of each group's m values plus z zeros, per coordinate.

    Each group's values come sorted along axis 0 (+inf in the padding, see
    `sorted_groups`). The augmented sequence of a lane (length N = m + z) is its values and z
    zeros in sorted order. Its rank-k value is

        a[k] = min(s[k], max(s[k - z], 0)),   s[j] = +inf for j >= m, -inf for j < 0

    (below the negatives count: s[k]; among the zeros: 0; above: s[k - z]): two gathers of
    (U, dim) rows. z = 0 is the item-level form (a = s).

    Sums over a range of ranks [lo, hi) use the clipping identity, with L = a[lo] and
    H = a[hi - 1]:

        sum_{lo <= k < hi} a[k] = sum_k clip(a[k], L, H) - lo * L - (N - hi) * H

    (ranks below lo clip to L, ranks from hi on clip to H): one pass over the unsorted
    order, the z zeros adding z * clip(0, L, H), whatever the bounds of each lane. Every
    term lies in [L, H], the kept values' own range, so a crafted 1e30 that is trimmed
    costs no precision (prefix sums, total - 1e30, would lose every digit).
    """

    def __init__(self, padded: np.ndarray, counts: np.ndarray, zeros=0, fill=None):
        """padded: (width + 2, U, dim), the sorted values between a row of -inf (s[-1]) and
        a row of +inf (s[width]), as `sorted_groups` builds it. fill: (U, dim), the value
        of the z added copies in each lane (None: 0); 0 stands for it in the formulas of
        the class docstring."""
        self.padded = padded
        self.fill = np.float32(0) if fill is None else fill
        self.sorted = padded[1:-1]
        self.m = counts
        self.z = np.broadcast_to(np.asarray(zeros, dtype=np.int64), counts.shape)
        self.n = self.m + self.z
        self.augmented = bool(self.z.any())
        self._groups = np.arange(len(counts))

    def _slot(self, j: np.ndarray, per_lane: bool) -> np.ndarray:
        j = np.clip(j + 1, 0, len(self.padded) - 1)
        if per_lane:  # j (U, dim)
            return np.take_along_axis(self.padded, j[None], axis=0)[0]
        return self.padded[j, self._groups]  # j (..., U): one rank per group

    def value(self, k, per_lane: bool = False) -> np.ndarray:
        """The rank-k value of each lane: (U, dim) for k scalar or per group (U,);
        (L, U, dim) for L ranks per group (L, U) or L scalar ranks (L, 1); per_lane: k is
        (U, dim), one rank per lane."""
        k = np.asarray(k, dtype=np.int64)
        if not per_lane:
            k = np.broadcast_to(k, k.shape[:-1] + self.m.shape if k.ndim else self.m.shape)
        if not self.augmented:
            return self._slot(k, per_lane)
        z = self.z[:, None] if per_lane else self.z
        return np.minimum(self._slot(k, per_lane),
                          np.maximum(self._slot(k - z, per_lane), self.fill))

    def rank_sum(self, lo, hi) -> np.ndarray:
        """(U, dim): the sum of the values of ranks [lo, hi) (lo < hi), bounds per
        group (U,) or lane (U, dim), by the clipping identity (class docstring).

        Accumulated in float64 (float32 values summed exactly enough; no overflow from
        the +inf padding slots, which clip to H and are taken out again, nor from 50
        values near float32's limit)."""
        lo, hi = np.asarray(lo), np.asarray(hi)
        if not self.augmented and lo.ndim == 1:
            return self._slot_sum(lo, hi)
        per_lane = lo.ndim == 2
        return self.clipped_sum(lo, hi, self.value(lo, per_lane), self.value(hi - 1, per_lane))

    def clipped_sum(self, lo, hi, low, high) -> np.ndarray:
        """rank_sum(lo, hi) given low = a[lo] and high = a[hi - 1] (U, dim)."""
        lo, hi = np.asarray(lo), np.asarray(hi)
        if lo.ndim == 1:
            lo, hi = lo[:, None], hi[:, None]
        clipped = np.maximum(self.sorted, low, out=np.empty_like(self.sorted))
        np.minimum(clipped, high, out=clipped)
        total = clipped.sum(axis=0, dtype=np.float64)
        above = (len(self.sorted) - self.m + self.n)[:, None] - hi  # N - hi, + the padding
        total -= lo * low.astype(np.float64) + above * high.astype(np.float64)
        if self.augmented:
            filled = np.minimum(np.maximum(self.fill, low), high)
            total += self.z[:, None] * filled.astype(np.float64)
        return total

    def _slot_sum(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """rank_sum without zeros and with bounds per group: the sorted slots [lo, hi) of
        each group added directly (float32, a masked add per slot: cheaper than clipping)."""
        total = np.zeros(self.sorted.shape[1:], np.float32)
        for j, s_j in enumerate(self.sorted):
            np.add(total, s_j, out=total, where=((lo <= j) & (j < hi))[:, None])
        return total

    def median(self) -> np.ndarray:
        half = np.float32(0.5)  # halves first: the sum of two float32 values may overflow
        return self.value((self.n - 1) // 2) * half + self.value(self.n // 2) * half

    def trimmed_mean(self, trim) -> np.ndarray:
        """Mean of ranks [t, N - t), t = min(trim, (N - 1) // 2); trim=MEDIAN: the median."""
        if trim is MEDIAN:
            return self.median()
        t = np.minimum(trim, (self.n - 1) // 2)
        return (self.rank_sum(t, self.n - t) / (self.n - 2 * t)[:, None]).astype(np.float32)

    def nearest_mean(self, slack: int) -> np.ndarray:
        """Mean of the beta = N - slack values nearest to each lane's median.

        Dropping the `slack` values farthest from the median drops them from the two ends
        of the sorted sequence: always the farther of the two current ends (on a tie, the
        higher one). With left distances dl_k = median - a[k] and right distances
        dr_k = a[N-1-k] - median, both decreasing in k, the number dropped on the left is
        s = #{s in 1..slack : dl_{s-1} > dr_{slack-s}}; the kept ranks are [s, s + beta).
        The kept range's ends a[s] and a[s + beta - 1] are among the ranks already read
        for the comparisons (0..slack and N-1-slack..N-1), so they are picked from those.
        """
        median = self.median()
        steps = np.arange(slack + 1)[:, None]  # all s at once
        low_end = self.value(steps)  # (slack + 1, U, dim): ranks 0..slack
        high_end = self.value(self.n - 1 - slack + steps)  # ranks N-1-slack..N-1
        n_left = np.count_nonzero((median - low_end[:-1]) > (high_end[1:] - median), axis=0)
        beta = (self.n - slack)[:, None]
        low = np.take_along_axis(low_end, n_left[None], axis=0)[0]  # a[s]
        high = np.take_along_axis(high_end, n_left[None], axis=0)[0]  # a[s + beta - 1]
        total = self.clipped_sum(n_left, n_left + beta, low, high)
        return (total / beta).astype(np.float32)


def sorted_groups(bucket: RowBucket, rows: np.ndarray) -> np.ndarray:
    """(width + 2, U, dim): each group's rows sorted per coordinate, +inf past m_i, between
    a row of -inf and a row of +inf (the sentinels AugmentedOrder reads out of range)."""
    return sort_padded(bucket.gather(rows, np.inf))


def sort_padded(slots: np.ndarray) -> np.ndarray:
    """(width + 2, U, dim): slots (width, U, dim) sorted along axis 0, between a row of -inf
    and a row of +inf. `slots` is used as scratch space."""
    width, n_groups, dim = slots.shape
    padded = np.empty((width + 2, n_groups * dim), slots.dtype)
    padded[0], padded[-1] = -np.inf, np.inf
    sort_slots(slots.reshape(width, -1), out=padded[1:-1])
    return padded.reshape(width + 2, n_groups, dim)


def reduce_groups(ids, rows, n_items: int, reduce, n_clients: int | None = None,
                  min_count: int = 1, max_count: int | None = None, keep=None,
                  out: np.ndarray | None = None, fill: np.ndarray | None = None) -> np.ndarray:
    """out[i] = reduce(AugmentedOrder of item i's rows), coordinate-wise; 0 for absent items.

    n_clients=None: item-level (each item over its own contributors); otherwise dense (each
    item over n_clients values, the n_clients - m_i absent rows counting as zeros).
    Items with fewer than min_count rows are left at 0: the caller knows the zeros decide
    them (a dense median of mostly zeros is 0). max_count, keep: only items with fewer
    rows, only the rows where keep (see group_rows); out: write into this table (the other
    rows untouched) instead of a new one; fill: (>= n_items, dim), the value each item's
    absent rows count as, per coordinate (None: zeros).
    """
    if out is None:
        out = np.zeros((n_items, rows.shape[1]), np.float32)
    for b in group_rows(ids, min_count, max_count, keep):
        zeros = 0 if n_clients is None else n_clients - b.counts
        out[b.items] = reduce(AugmentedOrder(sorted_groups(b, rows), b.counts, zeros,
                                             None if fill is None else fill[b.items]))
    return out


def coordinate_trimmed_mean(ids, rows, n_items: int, trim, n_clients: int | None = None,
                            **subset):
    """Per item and coordinate, the mean after dropping `trim` values from each end.

    Dense shortcut: an item with m_i <= t real values among N = n_clients has them all
    trimmed (its negatives sit in the t lowest ranks, its positives in the t highest), and
    one with m_i <= (N - 1) // 2 has a zero median; such items are 0 without sorting.
    Dense, t < (N - 1) // 2: items with m_i <= N - t go through groups.dense_trimmed_mean
    (zero-padded blocks, the middle slots summed), the rest through AugmentedOrder.
    Item-level: an item with m_i <= 2t + 2 keeps its middle one or two values, its median:
    those go through groups.item_median (a selection network, no full sort), the others
    through item_trimmed_mean. subset: max_count, keep, out of reduce_groups.
    """
    min_count = 1
    if n_clients is not None:
        half = (n_clients - 1) // 2
        min_count = 1 + (half if trim is MEDIAN else min(trim, half))
        if trim is not MEDIAN and trim < half:  # zero-padded blocks up to m_i = N - t
            out = subset.get("out")
            if out is None:
                out = subset["out"] = np.zeros((n_items, rows.shape[1]), np.float32)
            dense_trimmed_mean(ids, rows, n_items, trim, n_clients, out, subset.get("keep"))
            min_count = n_clients - trim + 1
    else:
        max_count = subset.pop("max_count", None)
        median_below = None if trim is MEDIAN else 2 * trim + 3
        if max_count is not None:
            median_below = max_count if median_below is None else min(median_below, max_count)
        out = item_median(ids, rows, n_items, subset.pop("out", None), median_below,
                          subset.get("keep"))
        if trim is MEDIAN or (max_count is not None and max_count <= 2 * trim + 3):
            return out
        return item_trimmed_mean(ids, rows, trim, out, 2 * trim + 3, max_count,
                                 subset.get("keep"))
    return reduce_groups(ids, rows, n_items, lambda aug: aug.trimmed_mean(trim), n_clients,
                         min_count, **subset)


def item_trimmed_mean(ids, rows, trim: int, out: np.ndarray, min_count: int,
                      max_count: int | None = None, keep=None) -> np.ndarray:
    """The item-level trimmed mean of the items with min_count <= m_i (< max_count) rows,
    min_count >= 2 trim + 1, into out: the mean of each group's sorted slots [trim,
    m_i - trim) per coordinate.

    Groups padded with +inf (sorted past m_i) and sorted per lane (groups.sorted_lanes,
    no sentinel rows or stacking); the kept slots added in slot order in float32, masked
    only from the block's smallest m_i - trim on (the slots every group keeps need no
    mask), then divided as AugmentedOrder.trimmed_mean does."""
    dim = rows.shape[1]
    for b in group_rows(ids, min_count, max_count, keep):
        slots = sorted_lanes(b.gather(rows, np.inf).reshape(b.width, -1))
        hi = b.counts - trim  # the first slot past the kept ones, per group
        total = np.zeros((len(b.items), dim), np.float32)
        for j in range(trim, int(hi.max())):
            slot = slots[j].reshape(-1, dim)
            if j < hi.min():
                np.add(total, slot, out=total)
            else:
                np.add(total, slot, out=total, where=(j < hi)[:, None])
        out[b.items] = (total / (b.counts - 2 * trim)[:, None]).astype(np.float32)
    return out


def common_row_trimmed_mean(tables: np.ndarray, n_items: int, trim) -> np.ndarray:
    """The coordinate-wise trimmed mean (trim=MEDIAN: median) over n whole tables (n, k, dim)
    of dense uploads, as one common row per item plus each client's own rows
    (strategies.common_rows): each item sorts only its m_i own rows, its n - m_i common
    copies read by AugmentedOrder's fill. Items n_items > k (sent by no one) are 0.

    The same selections as sorting all n rows: the median is bit for bit the same; the
    trimmed mean's kept values are summed in float64 (the clipping identity) rather than in
    float32 slot order, so it can differ from that in the last bit. An item with m_i <= t
    own rows has them all trimmed, and one with m_i <= (n - 1) // 2 has both middle ranks
    on the common row: those items are the common row without sorting."""
    n, k, dim = tables.shape
    common, same = common_rows(tables)
    out = np.zeros((n_items, dim), np.float32)
    half = (n - 1) // 2
    if trim is MEDIAN:
        min_count = half + 1
        out[:k] = common * np.float32(0.5) + common * np.float32(0.5)  # AugmentedOrder.median
    else:
        min_count = min(trim, half) + 1
        out[:k] = common
    ids = np.tile(np.arange(k), n)
    reduce_groups(ids, tables.reshape(n * k, dim), n_items,
                  lambda aug: aug.trimmed_mean(trim), n, min_count, keep=~same.ravel(),
                  out=out, fill=common)
    return out


def row_sq_norms(rows: np.ndarray) -> np.ndarray:
    """(R,) float64 squared L2 norm of each row: float32 products, float64 where they overflow."""
    sq = np.einsum("ij,ij->i", rows, rows).astype(np.float64)
    huge = ~np.isfinite(sq)  # finite float32 values up to 3e38: only crafted rows get here
    if huge.any():
        big = rows[huge].astype(np.float64)
        sq[huge] = np.einsum("ij,ij->i", big, big)
    return sq


# ------------------------------------------------------------------------- dense arrays


def flat_predictors(uploads) -> np.ndarray | None:
    """(n, P) float32: each upload's predictor arrays flattened; None when there are none."""
    if not uploads or not uploads[0].predictor:
        return None
    return np.stack([np.concatenate([np.ravel(a) for a in u.predictor]) for u in uploads]
                    ).astype(np.float32, copy=False)


def unflatten(vector: np.ndarray, like: list) -> list:
    """Split a flat vector into arrays shaped like `like`."""
    out, start = [], 0
    for a in like:
        size = int(np.size(a))
        out.append(vector[start:start + size].reshape(np.shape(a)).astype(np.float32))
        start += size
    return out


def stack_trimmed_mean(stack: np.ndarray, trim) -> np.ndarray:
    """Coordinate-wise trimmed mean (trim=MEDIAN: median) of a (n, P) stack of vectors."""
    one_group = np.zeros(len(stack), np.int64)
    return coordinate_trimmed_mean(one_group, stack, 1, trim)[0]


def order_statistic_aggregate(updates: RoundUpdates, granularity: str, trim) -> Aggregate:
    """Coordinate-wise trimmed mean (or median) of item rows and predictor, unweighted."""
    ids, rows, _ = updates.stacked
    n = len(updates)
    if every_item_sent(ids, n):  # dense uploads: every item has all n rows, either form
        item_grad = common_row_trimmed_mean(rows.reshape(n, len(ids) // n, -1),
                                            updates.n_items, trim)
    else:
        item_grad = coordinate_trimmed_mean(ids, rows, updates.n_items, trim,
                                            n_clients=n if granularity == "dense" else None)
    pred = flat_predictors(updates.uploads)
    predictor = [] if pred is None else unflatten(stack_trimmed_mean(pred, trim),
                                                  updates.uploads[0].predictor)
    return Aggregate(item_grad, predictor)


# ------------------------------------------------------------------------- the rule base


class RobustRule(AggregationRule):
    """Common parameters and the round-size check of the robust rules.

    f (server.rule_f) is the assumed number of Byzantine clients per round. `requirement(n)`
    says what a rule needs of the round size n (fedrec/registry.py checks it against
    train.clients_per_round when it builds the rule). A round that arrives smaller (invalid
    uploads dropped, fewer users than clients_per_round, an epoch's short last round) is
    aggregated with the
    coordinate-wise median of the same granularity and info["fallback"] = 1: the median
    needs nothing of n, and a fallback to the mean would let clients who can get their own
    uploads rejected switch the defense off.
    """

    name = "robust"

    def __init__(self, granularity: str = "dense", f: int = 0):
        super().__init__(granularity)
        if isinstance(f, bool) or int(f) != f or f < 0:
            raise ConfigError(f"server.rule_f: expected an integer >= 0, got {f!r}")
        self.f = int(f)

    def aggregate(self, updates: RoundUpdates) -> Aggregate:
        raise NotImplementedError

    def __call__(self, updates: RoundUpdates) -> Aggregate:
        if self.requirement(len(updates)):
            agg = order_statistic_aggregate(updates, self.granularity, MEDIAN)
            agg.info = {"fallback": 1, "dropped": 0}
            return agg
        agg = self.aggregate(updates)
        agg.info = {"fallback": 0, "dropped": len(agg.dropped), **agg.info}
        return agg
