"""The plain (weighted) mean, the protocol's default aggregation."""

from __future__ import annotations

from strategies.aggregate import dense_mean_stacked, item_level_mean_stacked, weighted_mean_arrays
from strategies.rule import Aggregate, AggregationRule, RoundUpdates


class MeanRule(AggregationRule):
    name = "mean"

    def __call__(self, updates: RoundUpdates) -> Aggregate:
        ups = updates.uploads
        ids, rows, owner = updates.stacked
        fn = dense_mean_stacked if self.granularity == "dense" else item_level_mean_stacked
        item_grad = fn(ids, rows, owner, updates.weights, updates.n_items)
        pred = weighted_mean_arrays([u.predictor for u in ups], updates.weights)
        return Aggregate(item_grad, pred)
