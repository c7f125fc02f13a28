"""Norm bound (Sun et al. 2019): clip every update's L2 norm, then take the mean.

    dense:      u_c <- u_c * min(1, B / ||u_c||)   over the whole update (rows + predictor)
    item-level: g_c[i] <- g_c[i] * min(1, B / ||g_c[i]||)   for each uploaded row, and the
                predictor clipped as one vector
followed by the weighted mean of the same granularity (strategies.aggregate). B is
server.norm_bound (0.1 in the UNION code; FedAttack used 2). Needs nothing of n and drops
no client. `clip_updates` is a function of its own: the `clip` pre-aggregation step
(strategies/clip.py) composes it with any rule ("clip, then Krum"; UNION: filter, then clip,
REFERENCE.md section 4).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedrec.errors import ConfigError
from strategies.aggregate import (
    item_level_weighted_mean,
    sparse_weighted_sum,
    weighted_mean_arrays,
)
from strategies.robust import RobustRule, flat_predictors, row_sq_norms
from strategies.rule import Aggregate, RoundUpdates


def check_bound(bound) -> float:
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0:
        raise ConfigError(f"server.norm_bound: expected a number > 0, got {bound!r}")
    return float(bound)


def clip_scales(updates: RoundUpdates, bound: float, granularity: str = "dense"):
    """(row_scale (R,), predictor_scale (n,)): the factors min(1, B / norm) to apply."""
    ids, rows, owner = updates.stacked
    n = len(updates)
    row_sq = row_sq_norms(rows)
    preds = flat_predictors(updates.uploads)
    pred_sq = np.zeros(n) if preds is None else row_sq_norms(preds)

    def factor(sq):
        norm = np.sqrt(sq)
        return np.where(norm > bound, bound / np.maximum(norm, 1e-300), 1.0)

    if granularity == "dense":
        client = factor(np.bincount(owner, weights=row_sq, minlength=n) + pred_sq)
        return client[owner], client
    return factor(row_sq), factor(pred_sq)


def clip_updates(updates: RoundUpdates, bound: float, granularity: str = "dense") -> RoundUpdates:
    """The same round with every update (dense) or every row (item) clipped to norm <= bound."""
    return scale_updates(updates, *clip_scales(updates, bound, granularity))


def scale_updates(updates: RoundUpdates, row_scale, predictor_scale) -> RoundUpdates:
    """The same round, row r scaled by row_scale[r], client c's predictor by predictor_scale[c]."""
    ids, rows, owner = updates.stacked
    clipped = (rows * row_scale[:, None]).astype(np.float32)
    bounds = np.cumsum([len(u.item_ids) for u in updates.uploads])[:-1]
    uploads = [dataclasses.replace(u, item_rows=r, predictor=[
        (a * s).astype(np.float32) for a in u.predictor])
        for u, r, s in zip(updates.uploads, np.split(clipped, bounds), predictor_scale)]
    return dataclasses.replace(updates, uploads=uploads, stacked_rows=(ids, clipped, owner))


class NormBoundRule(RobustRule):
    name = "norm_bound"

    def __init__(self, granularity: str = "dense", bound: float = 0.1):
        super().__init__(granularity, 0)
        self.bound = check_bound(bound)

    def aggregate(self, updates: RoundUpdates) -> Aggregate:
        """The clipped mean, computed on the stacked rows (clip_updates + MeanRule would
        split the rows into uploads and stack them again)."""
        row_scale, pred_scale = clip_scales(updates, self.bound, self.granularity)
        ids, rows, owner = updates.stacked
        w = np.asarray(updates.weights, dtype=np.float64)
        # the clipping factor folds into each row's weight: no clipped copy of the rows
        if self.granularity == "dense":
            row_w = (w / w.sum() if w.sum() > 0 else w)[owner] * row_scale
            item_grad = sparse_weighted_sum(ids, rows, row_w, updates.n_items)
        else:
            item_grad = item_level_weighted_mean(ids, rows, w[owner] * row_scale, w[owner],
                                                 updates.n_items)
        predictor = weighted_mean_arrays(
            [[a * s for a in u.predictor] for u, s in zip(updates.uploads, pred_scale)], w)
        # info["clipped"]: clients (dense) or rows (item-level) that were over the bound
        clipped_count = row_scale < 1 if self.granularity == "item" else pred_scale < 1
        return Aggregate(item_grad, predictor, [],
                         {"clipped": int(np.count_nonzero(clipped_count))})
