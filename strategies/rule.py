"""The aggregation hook of `FedRecStrategy`: pre-aggregation steps, then a rule.

A rule or a step sees exactly what a real server sees: the round's validated uploads and their
claimed sample counts. It never sees ground truth (who is malicious).

- A **rule** (`AggregationRule`) returns the aggregated item gradient, the aggregated predictor
  gradient, and which uploads it left out (positions in `updates.uploads`).
- A **pre-aggregation step** (`PreAggregationStep`: UNION, the supervised detector, norm
  clipping) returns the round it passes on (a subset and/or a transformation of the uploads)
  and the positions it dropped. `FilterChain` runs steps in order, then the rule on what is
  left, and reports every step's drops apart (`Aggregate.dropped_by`), so evaluation code can
  score each stage.
Rules and steps take only their own parameters; `fedrec/registry.py` builds them from a config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

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
    # (all_ids, all_rows, owner) over every upload, when the caller already has them (the
    # strategy concatenates them during validation); computed on first use otherwise
    stacked_rows: tuple | None = field(default=None, repr=False)

    @property
    def stacked(self):
        """(all_ids, all_rows, owner) over every upload."""
        if self.stacked_rows is None:
            self.stacked_rows = stack_uploads([u.item_ids for u in self.uploads],
                                              [u.item_rows for u in self.uploads])
        return self.stacked_rows

    def __len__(self):
        return len(self.uploads)


@dataclass
class Aggregate:
    item_grad: np.ndarray  # (n_items, dim)
    predictor: list
    dropped: list = field(default_factory=list)  # positions in RoundUpdates.uploads
    info: dict = field(default_factory=dict)  # rule diagnostics for the per-round metrics
    # each dropping pre-aggregation step's own drops, {step name: positions}, apart from the
    # rule's (FilterChain), so each stage can be scored on its own
    dropped_by: dict = field(default_factory=dict)


class AggregationRule:
    """Base class: `granularity` is "dense" or "item" (see strategies.aggregate)."""

    name = "rule"

    def __init__(self, granularity: str = "dense"):
        if granularity not in ("dense", "item"):
            raise ValueError(f"granularity must be 'dense' or 'item', got {granularity!r}")
        self.granularity = granularity

    def requirement(self, n: int) -> str:
        """Why n clients per round are too few for this rule ("" when they are enough)."""
        return ""

    def __call__(self, updates: RoundUpdates) -> Aggregate:
        raise NotImplementedError


@dataclass
class Filtered:
    """A pre-aggregation step's result: the round it passes on (its uploads are the input's
    kept ones, in order, possibly transformed), the input positions it dropped, diagnostics."""

    updates: RoundUpdates
    dropped: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


class PreAggregationStep:
    """Base class of the steps before the rule. `drops`: whether the step can drop uploads (its
    drops are then scored as a detection stage of its own name)."""

    name = "step"
    drops = True

    def __call__(self, updates: RoundUpdates) -> Filtered:
        raise NotImplementedError


def subset_updates(updates: RoundUpdates, keep: np.ndarray) -> RoundUpdates:
    """The round restricted to the uploads at positions `keep` (sorted), stacked rows sliced."""
    ids, rows, owner = updates.stacked
    new_index = np.full(len(updates), -1, np.int64)
    new_index[keep] = np.arange(len(keep))
    sel = new_index[owner] >= 0
    return dataclasses.replace(updates, uploads=[updates.uploads[i] for i in keep],
                               weights=np.asarray(updates.weights)[keep],
                               stacked_rows=(ids[sel], rows[sel], new_index[owner[sel]]))


def drop_uploads(updates: RoundUpdates, dropped, info: dict) -> Filtered:
    """A step's result when it only drops: the round without the `dropped` positions."""
    dropped = sorted(int(i) for i in dropped)
    if not dropped:
        return Filtered(updates, [], info)
    keep = np.setdiff1d(np.arange(len(updates)), dropped)
    return Filtered(subset_updates(updates, keep), dropped, info)


def empty_aggregate(updates: RoundUpdates) -> Aggregate:
    """A zero update (every upload dropped before the rule)."""
    pred = [np.zeros_like(a) for a in updates.uploads[0].predictor] if len(updates) else []
    return Aggregate(np.zeros((updates.n_items, updates.dim), np.float32), pred)


class FilterChain(AggregationRule):
    """The pre-aggregation steps in order, then `rule` on the uploads they passed on.

    Aggregate.dropped = every step's drops and the rule's, as positions in the original
    upload list; dropped_by = {step name: its drops} for the steps that drop; info = the
    rule's and every step's, plus inner_dropped (the rule's) and dropped (the total)."""

    name = "chain"

    def __init__(self, steps: list, rule: AggregationRule):
        super().__init__(rule.granularity)
        self.steps, self.rule = list(steps), rule

    def parts(self) -> list:
        return [*self.steps, self.rule]

    def requirement(self, n: int) -> str:
        return self.rule.requirement(n)

    def check_model(self, n_items: int, dim: int, predictor_shapes):
        for part in self.parts():
            check = getattr(part, "check_model", None)
            if check is not None:
                check(n_items, dim, predictor_shapes)

    def __call__(self, updates: RoundUpdates) -> Aggregate:
        position = np.arange(len(updates))  # original position of each upload still in
        dropped_by, info, current = {}, {}, updates
        for step in self.steps:
            out = step(current)
            drop = np.asarray(out.dropped, np.int64)
            if step.drops:
                dropped_by[step.name] = sorted(int(i) for i in position[drop])
            position = np.delete(position, drop)
            current = out.updates
            info.update(out.info)
        agg = self.rule(current) if len(current) else empty_aggregate(updates)
        inner = [int(position[i]) for i in agg.dropped]
        filtered = {i for ids in dropped_by.values() for i in ids}
        agg.dropped = sorted(filtered | set(inner))
        agg.dropped_by = dropped_by
        agg.info = {**agg.info, **info, "inner_dropped": len(inner), "dropped": len(agg.dropped)}
        return agg
