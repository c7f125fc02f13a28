"""Coordinate-wise median (Yin et al. 2018), item-level and dense.

    item-level: G[i] = median_{c in C_i} g_c[i]          (the row itself when m_i = 1)
    dense:      G[i] = median_{c = 1..n} u_c[i],  u_c[i] = g_c[i] if i in T_c else 0

coordinate-wise, for every item i (C_i: the clients that uploaded row i, m_i = |C_i|).
Even counts take the mean of the two middle values. Sample counts do not weight a median.
The dense form returns 0 (or a value near 0) for an item fewer than half the clients sent;
the item-level form always follows that item's own contributors. Predictor: the dense
median of the flattened predictor gradients. Needs nothing of n; drops no client. The math:
strategies.robust.coordinate_trimmed_mean with trim = MEDIAN (n_clients given: dense).
"""

from __future__ import annotations

from strategies.robust import MEDIAN, RobustRule, order_statistic_aggregate
from strategies.rule import Aggregate, RoundUpdates


class MedianRule(RobustRule):
    name = "median"

    def aggregate(self, updates: RoundUpdates) -> Aggregate:
        return order_statistic_aggregate(updates, self.granularity, MEDIAN)
