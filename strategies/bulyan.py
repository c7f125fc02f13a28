"""Bulyan (El Mhamdi et al. 2018) over Krum, dense and item-level.

Given a set S of n updates and f:
  1. selection: theta = n - 2f times, apply Krum to the remaining set (k = max(1, r - f - 2)
     neighbours among its r members), move the winner to the selection;
  2. per coordinate, the mean of the beta = theta - 2f selected values closest to the
     selection's coordinate-wise median (ties: the higher value is left out).
Needs n >= 4f + 3 so that beta >= 3 and the guarantee holds. Unweighted by sample count.

- dense: over whole updates (rows scattered into the table, absent rows 0, plus the
  predictor); step 2 runs over all items, an item absent from a selected update counting
  as 0 there. Dropped: every client not selected.
- item-level: per item i with m_i >= 4f + 3 contributors, both steps run among that item's
  rows (theta_i = m_i - 2f, beta_i = theta_i - 2f); items with fewer rows take the
  coordinate-wise median of their rows. Predictor: dense Bulyan on the predictor vectors
  alone. Dropped: clients none of whose rows (nor predictor) was selected.
"""

from __future__ import annotations

import numpy as np

from strategies.dense_distances import vector_sq_distances
from strategies.groups import dense_nearest_mean, group_rows
from strategies.item_distances import block_sq_distances, client_sq_distances
from strategies.krum import NeighbourOrder
from strategies.robust import (
    MEDIAN,
    AugmentedOrder,
    RobustRule,
    coordinate_trimmed_mean,
    flat_predictors,
    reduce_groups,
    sort_padded,
    unflatten,
)
from strategies.rule import Aggregate, RoundUpdates


def bulyan_select(sq_dist: np.ndarray, alive: np.ndarray, f: int, theta: np.ndarray) -> np.ndarray:
    """(B, c) bool: theta[b] members of set b picked by repeated Krum (step 1).

    A loop over the theta <= n picks (each pick changes the next scores); every step
    scores all sets still picking at once.
    """
    neighbours = NeighbourOrder(sq_dist, alive)
    alive = alive.copy()
    selected = np.zeros_like(alive)
    theta = np.asarray(theta)
    for step in range(int(theta.max(initial=0))):
        picking = np.flatnonzero(step < theta)
        every = len(picking) == len(theta)  # all sets pick: no subset copies
        best = np.argmin(neighbours.scores(alive, f, None if every else picking), axis=1)
        selected[picking, best] = True
        alive[picking, best] = False
        neighbours.remove(picking, best)
    return selected


def nearest_to_median_mean(ids, rows, n_items: int, f: int, n_clients: int | None = None,
                           keep=None, out=None):
    """Step 2 per item and coordinate: mean of the N - 2f values nearest the median, over
    the rows where `keep` (all if None), into `out` if given (see robust.reduce_groups).

    Dense shortcut: an item with m_i <= min(2f, (N - 1) // 2) real values has median 0 and
    at least N - 2f zeros, which are the nearest values: its result is 0 without sorting.
    Dense items with up to (N - 1) // 2 rows (median 0) go through
    groups.dense_nearest_mean (zero-padded blocks, fixed slots), the rest through
    robust.AugmentedOrder.
    """
    min_count = 1 if n_clients is None else 1 + min(2 * f, (n_clients - 1) // 2)
    if n_clients is not None and 2 * f < (n_clients - 1) // 2:  # median 0: zero-padded blocks
        if out is None:
            out = np.zeros((n_items, rows.shape[1]), np.float32)
        dense_nearest_mean(ids, rows, n_items, 2 * f, n_clients, out, keep)
        min_count = (n_clients - 1) // 2 + 1
    return reduce_groups(ids, rows, n_items, lambda aug: aug.nearest_mean(2 * f), n_clients,
                         min_count, keep=keep, out=out)


def dense_bulyan(updates: RoundUpdates, f: int):
    """(item_grad, predictor, selected (n,) bool) over whole updates."""
    ids, rows, owner = updates.stacked
    n = len(updates)
    preds = flat_predictors(updates.uploads)
    dist = client_sq_distances(ids, rows, owner, n, preds)
    selected = bulyan_select(dist[None], np.ones((1, n), bool), f, np.array([n - 2 * f]))[0]
    item_grad = nearest_to_median_mean(ids, rows, updates.n_items, f, n_clients=n - 2 * f,
                                       keep=selected[owner])
    predictor = [] if preds is None else unflatten(
        nearest_to_median_mean(np.zeros(n - 2 * f, np.int64), preds[selected], 1, f)[0],
        updates.uploads[0].predictor)
    return item_grad, predictor, selected


def item_level_bulyan(updates: RoundUpdates, f: int):
    """Bulyan among each item's rows: (item_grad, used_rows (R,) bool, items on the median)."""
    ids, rows, _ = updates.stacked
    counts = np.bincount(ids, minlength=updates.n_items)
    item_grad = np.zeros((updates.n_items, rows.shape[1]), np.float32)
    used = counts[ids] < 4 * f + 3  # the median fallback uses every row of its items
    # size classes (padded), not exact sizes: the picks loop runs once per class. Step 2
    # sorts the block already gathered, the rows not picked set to +inf (past theta_i).
    for b in group_rows(ids, min_count=4 * f + 3):
        x = b.gather(rows, 0.0, groups_first=True)
        theta = b.counts - 2 * f
        picked = bulyan_select(block_sq_distances(x), b.members, f, theta)
        used[b.rows.T[picked]] = True
        slots = np.where(picked.T[:, :, None], x.transpose(1, 0, 2), np.float32(np.inf))
        item_grad[b.items] = AugmentedOrder(sort_padded(slots), theta).nearest_mean(2 * f)
    coordinate_trimmed_mean(ids, rows, updates.n_items, MEDIAN, max_count=4 * f + 3,
                            out=item_grad)
    on_median = int(np.count_nonzero((counts > 0) & (counts < 4 * f + 3)))
    return item_grad, used, on_median


class BulyanRule(RobustRule):
    name = "bulyan"

    def requirement(self, n: int) -> str:
        if n < 4 * self.f + 3:
            return (f"Bulyan needs n >= 4 * server.rule_f + 3 = {4 * self.f + 3} clients per "
                    f"round, got n = {n}")
        return ""

    def aggregate(self, updates: RoundUpdates) -> Aggregate:
        n, f = len(updates), self.f
        if self.granularity == "dense":
            item_grad, predictor, selected = dense_bulyan(updates, f)
            return Aggregate(item_grad, predictor, [int(i) for i in np.flatnonzero(~selected)])
        item_grad, used_rows, on_median = item_level_bulyan(updates, f)
        _, _, owner = updates.stacked
        used = np.bincount(owner, weights=used_rows, minlength=n) > 0
        preds = flat_predictors(updates.uploads)
        predictor = []
        if preds is not None:
            picked = bulyan_select(vector_sq_distances(preds)[None], np.ones((1, n), bool), f,
                                   np.array([n - 2 * f]))[0]
            predictor = unflatten(nearest_to_median_mean(
                np.zeros(n - 2 * f, np.int64), preds[picked], 1, f)[0],
                updates.uploads[0].predictor)
            used |= picked
        return Aggregate(item_grad, predictor, [int(i) for i in np.flatnonzero(~used)],
                         {"rows_dropped": int(np.count_nonzero(~used_rows)),
                          "items_median": on_median})
