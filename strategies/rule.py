"""The aggregation-rule hook of `FedRecStrategy`.

A rule sees exactly what a real server sees: the round's validated uploads and their claimed
sample counts. It never sees ground truth (who is malicious). It returns the aggregated item
gradient, the aggregated predictor gradient, and which uploads it dropped (positions in
`updates.uploads`), so evaluation code can score detections.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from strategies.aggregate import stack_uploads


@dataclass
class RoundUpdates:
    uploads: list  # list[fedrec.protocol.Upload]
    weights: np.ndarray  # aggregation weight per upload (sample counts or ones)
    n_items: int
    dim: int
    server_round: int = 0
    item_table: np.ndarray | None = None  # the current global table (read-only)
    # the item table's server-optimizer state, read-only (fedrec.optim.ServerOptimizer.item_state)
    server_state: dict | None = None

    @cached_property
    def stacked(self):
        """(all_ids, all_rows, owner) over every upload."""
        return stack_uploads([u.item_ids for u in self.uploads], [u.item_rows for u in self.uploads])

    def __len__(self):
        return len(self.uploads)


@dataclass
class Aggregate:
    item_grad: np.ndarray  # (n_items, dim)
    predictor: list
    dropped: list = field(default_factory=list)  # positions in RoundUpdates.uploads
    info: dict = field(default_factory=dict)  # rule diagnostics for the per-round metrics
    # a filter's own drops, apart from the inner rule's: {"filter": positions} (see
    # filter_then_aggregate), so each stage can be scored on its own
    dropped_by: dict = field(default_factory=dict)


class AggregationRule:
    """Base class: `granularity` is "dense" or "item" (see strategies.aggregate)."""

    name = "rule"

    def __init__(self, granularity: str = "dense"):
        if granularity not in ("dense", "item"):
            raise ValueError(f"granularity must be 'dense' or 'item', got {granularity!r}")
        self.granularity = granularity

    def __call__(self, updates: RoundUpdates) -> Aggregate:
        raise NotImplementedError


def subset_updates(updates: RoundUpdates, keep: np.ndarray) -> RoundUpdates:
    """The round restricted to the uploads at positions `keep` (sorted), stacked rows sliced."""
    ids, rows, owner = updates.stacked
    new_index = np.full(len(updates), -1, np.int64)
    new_index[keep] = np.arange(len(keep))
    sel = new_index[owner] >= 0
    out = dataclasses.replace(updates, uploads=[updates.uploads[i] for i in keep],
                              weights=np.asarray(updates.weights)[keep])
    out.__dict__["stacked"] = (ids[sel], rows[sel], new_index[owner[sel]])
    return out


def filter_then_aggregate(inner: AggregationRule, updates: RoundUpdates, dropped: list,
                          info: dict) -> Aggregate:
    """A filter's drops, then `inner` on the uploads kept. Aggregate.dropped = the union of
    both drop sets as positions in the original upload list; info gains inner_dropped and
    dropped (the total)."""
    keep = np.setdiff1d(np.arange(len(updates)), dropped)
    agg = inner(subset_updates(updates, keep) if dropped else updates)
    inner_dropped = [int(keep[i]) for i in agg.dropped]
    agg.dropped = sorted(set(dropped) | set(inner_dropped))
    agg.dropped_by = {"filter": sorted(int(i) for i in dropped)}
    agg.info = {**agg.info, **info, "inner_dropped": len(inner_dropped), "dropped": len(agg.dropped)}
    return agg
