"""Norm clipping as a pre-aggregation step (server.filters: [clip]): every update (dense) or
every uploaded row (item-level) scaled to L2 norm <= server.norm_bound, then handed on
(strategies.norm_bound.clip_updates). Drops nothing. `filters: [clip]` + `rule: krum` is
"clip, then Krum"; `rule: norm_bound` alone is "clip, then mean".
"""

from __future__ import annotations

from strategies.norm_bound import check_bound, clip_scales, scale_updates
from strategies.rule import Filtered, PreAggregationStep, RoundUpdates


class ClipFilter(PreAggregationStep):
    name = "clip"
    drops = False

    def __init__(self, bound: float = 0.1, granularity: str = "dense"):
        if granularity not in ("dense", "item"):
            raise ValueError(f"granularity must be 'dense' or 'item', got {granularity!r}")
        self.bound, self.granularity = check_bound(bound), granularity

    def __call__(self, updates: RoundUpdates) -> Filtered:
        row_scale, pred_scale = clip_scales(updates, self.bound, self.granularity)
        clipped = row_scale < 1 if self.granularity == "item" else pred_scale < 1
        return Filtered(scale_updates(updates, row_scale, pred_scale),
                        info={"clip_clipped": int(clipped.sum())})
