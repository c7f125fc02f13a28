"""Coordinate-wise trimmed mean (Yin et al. 2018), item-level and dense.

Per coordinate, drop the t lowest and the t highest values and average the rest:

    dense:      over all n clients (absent rows count as 0), t = f; needs 2f < n.
    item-level: over the m_i contributors of item i, t_i = min(f, floor((m_i - 1) / 2)):
                an item with m_i <= 2f keeps its middle one or two values, i.e. its median
                (the row itself when m_i = 1).

f = server.rule_f (trimmed per side, as in REFERENCE.md section 4). Unweighted by sample
count. Predictor: the dense trimmed mean of the flattened predictor gradients. Drops no
client (every client may be trimmed in some coordinates and kept in others). The math:
strategies.robust.coordinate_trimmed_mean (n_clients given: dense).
"""

from __future__ import annotations

from strategies.robust import RobustRule, order_statistic_aggregate
from strategies.rule import Aggregate, RoundUpdates


class TrimmedMeanRule(RobustRule):
    name = "trimmed_mean"

    def requirement(self, n: int) -> str:
        if 2 * self.f >= n:
            return (f"the trimmed mean drops server.rule_f = {self.f} values from each end, "
                    f"so it needs n > 2f = {2 * self.f} clients per round, got n = {n}")
        return ""

    def aggregate(self, updates: RoundUpdates) -> Aggregate:
        return order_statistic_aggregate(updates, self.granularity, self.f)
