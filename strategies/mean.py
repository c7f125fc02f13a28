"""The plain (weighted) mean, the protocol's default aggregation."""

from __future__ import annotations

from strategies.aggregate import dense_mean, item_level_mean, weighted_mean_arrays
from strategies.rule import Aggregate, AggregationRule, RoundUpdates


class MeanRule(AggregationRule):
    name = "mean"

    def __call__(self, updates: RoundUpdates) -> Aggregate:
        ups = updates.uploads
        fn = dense_mean if self.granularity == "dense" else item_level_mean
        item_grad = fn([u.item_ids for u in ups], [u.item_rows for u in ups], updates.weights,
                       updates.n_items)
        pred = weighted_mean_arrays([u.predictor for u in ups], updates.weights)
        return Aggregate(item_grad, pred)
