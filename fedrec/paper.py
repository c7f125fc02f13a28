"""The `paper:` block of an experiment YAML: the published numbers its grid reproduces.

`fedrec reproduce` (fedrec/reproduce.py) reads it; the config loader validates it, so a bad
block stops `fedrec run` too, with one line. The block holds only what the paper published and
what to compare it with; every number of ours comes from the run directories.

    paper:
      source: "ClusterAttack (Yu et al., AAAI'23) Table 1, MF on ML-1M"
      metric: test_hr@5          # summary.json's final metric (else metrics.csv's last value)
      compare: relative_drop     # relative_drop: 100 (reference - ours) / reference | value
      baseline: {attack.name: none}   # keys that turn a cell's run into its reference run
      tolerance: 5               # |ours - published| <= tolerance passes (points for drops;
                                 # cells with another compare do not inherit it)
      order: [[ClusterAttack, Fang, LIE]]   # chains of cell labels: ours must decrease
      cells:                     # [] = one cell per setting of the grid, nothing published
        - {label: ClusterAttack, select: {attack.name: clusterattack}, published: 30.94}
        - {label: FedAttack 5%, select: {...}, published: {value: 0.0109, clean: 0.0135}}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedrec.errors import ConfigError

COMPARES = ("relative_drop", "value")
CELL_KEYS = ("label", "select", "published", "tolerance", "at_least", "at_most", "metric",
             "compare", "baseline")
BLOCK_KEYS = ("source", "metric", "compare", "baseline", "tolerance", "order", "unsupported",
              "note", "cells")
# `fedrec keys` and the README: every key of the block with its default
PAPER_DEFAULTS = {"paper.source": "(required)", "paper.metric": "test_hr@5",
                  "paper.compare": "value", "paper.baseline": {}, "paper.tolerance": None,
                  "paper.order": [], "paper.unsupported": "", "paper.note": "",
                  "paper.cells": [],
                  **{f"paper.cells[].{k}": v for k, v in (
                      ("label", "(required)"), ("select", "(required)"), ("published", None),
                      ("tolerance", None), ("at_least", None), ("at_most", None),
                      ("metric", None), ("compare", None), ("baseline", None))}}


@dataclass(frozen=True)
class PaperCell:
    """One published number and the runs (a setting, over its seeds) that reproduce it."""

    label: str
    select: dict  # dotted config key -> value: the runs of this cell
    metric: str
    compare: str
    baseline: dict  # relative_drop: keys that turn the cell's run into its reference run
    published: float | None  # in the compare's unit (percent for drops); None = not published
    tolerance: float | None
    at_least: float | None  # one-sided criteria (a claim of the paper, not a number of it)
    at_most: float | None


@dataclass(frozen=True)
class PaperSpec:
    source: str
    metric: str
    compare: str
    baseline: dict
    tolerance: float | None
    order: list = field(default_factory=list)  # chains of labels, ours decreasing
    unsupported: str = ""  # why the package cannot express the table ("" = it can)
    note: str = ""
    cells: list = field(default_factory=list)  # [] = one cell per setting of the grid


def _number(key: str, v, allow_none=True):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {v!r}")
    return float(v)


def _text(key: str, v, required=False) -> str:
    if v is None and not required:
        return ""
    if not isinstance(v, str) or (required and not v.strip()):
        raise ConfigError(f"{key}: expected {'a non-empty' if required else 'a'} string, got {v!r}")
    return v


def _config_key(key: str, k, is_key) -> str:
    if not isinstance(k, str) or not is_key(k):
        raise ConfigError(f"{key}: {k!r} is not a config key (see `fedrec keys`)")
    return k


def _keys_map(key: str, v, is_key, allow_empty=True) -> dict:
    if v is None and allow_empty:
        return {}
    if not isinstance(v, dict) or (not v and not allow_empty):
        raise ConfigError(f"{key}: expected a mapping of dotted config keys to values, got {v!r}")
    return {_config_key(key, k, is_key): x for k, x in v.items()}


def _published(key: str, v, compare: str):
    """The published number in the compare's unit; {value, clean} = the paper's two values,
    from which the relative drop is computed (so only the paper's own numbers are typed)."""
    if isinstance(v, dict):
        if compare != "relative_drop" or set(v) != {"value", "clean"}:
            raise ConfigError(f"{key}: a mapping is {{value, clean}} under compare: "
                              f"relative_drop, got {v!r}")
        value, clean = _number(f"{key}.value", v["value"], False), \
            _number(f"{key}.clean", v["clean"], False)
        if clean == 0:
            raise ConfigError(f"{key}.clean: expected a nonzero number")
        return 100.0 * (clean - value) / clean
    return _number(key, v)


def _unknown(key: str, d: dict, allowed):
    bad = sorted(set(d) - set(allowed))
    if bad:
        raise ConfigError(f"unknown key '{key}.{bad[0]}'; valid keys: "
                          + ", ".join(f"{key}.{k}" for k in allowed))


def _tolerance(key: str, v):
    t = _number(key, v)
    if t is not None and t < 0:
        raise ConfigError(f"{key}: expected a number >= 0, got {v!r}")
    return t


def parse_cell(i: int, raw, spec: PaperSpec, is_key) -> PaperCell:
    key = f"paper.cells[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping with label and select, got {raw!r}")
    _unknown(key, raw, CELL_KEYS)
    compare = raw.get("compare", spec.compare)
    if compare not in COMPARES:
        raise ConfigError(f"{key}.compare: {compare!r} is not one of {', '.join(COMPARES)}")
    baseline = _keys_map(f"{key}.baseline", raw["baseline"], is_key) if "baseline" in raw \
        else spec.baseline
    if compare == "relative_drop" and not baseline:
        raise ConfigError(f"{key}.baseline: relative_drop needs the keys of the reference run "
                          "(e.g. {attack.name: none})")
    return PaperCell(
        label=_text(f"{key}.label", raw.get("label"), required=True),
        select=_keys_map(f"{key}.select", raw.get("select"), is_key, allow_empty=False),
        metric=_text(f"{key}.metric", raw.get("metric", spec.metric), required=True),
        compare=compare, baseline=baseline,
        published=_published(f"{key}.published", raw.get("published"), compare),
        # the block's tolerance is in its compare's units (points of drop): a cell comparing
        # otherwise (a clean HR@5 value) inherits none
        tolerance=_tolerance(f"{key}.tolerance", raw.get(
            "tolerance", spec.tolerance if compare == spec.compare else None)),
        at_least=_number(f"{key}.at_least", raw.get("at_least")),
        at_most=_number(f"{key}.at_most", raw.get("at_most")))


def parse_paper(raw, is_key) -> PaperSpec:
    """The validated `paper:` block (a one-line ConfigError on the first problem); `is_key`
    tells a dotted experiment key (fedrec.config.is_config_key)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"paper: expected a mapping (source, metric, cells, ...), got {raw!r}")
    _unknown("paper", raw, BLOCK_KEYS)
    compare = raw.get("compare", "value")
    if compare not in COMPARES:
        raise ConfigError(f"paper.compare: {compare!r} is not one of {', '.join(COMPARES)}")
    spec = PaperSpec(
        source=_text("paper.source", raw.get("source"), required=True),
        metric=_text("paper.metric", raw.get("metric", "test_hr@5"), required=True),
        compare=compare, baseline=_keys_map("paper.baseline", raw.get("baseline"), is_key),
        tolerance=_tolerance("paper.tolerance", raw.get("tolerance")),
        unsupported=_text("paper.unsupported", raw.get("unsupported")),
        note=_text("paper.note", raw.get("note")))
    cells_raw = raw.get("cells") or []
    if not isinstance(cells_raw, list):
        raise ConfigError(f"paper.cells: expected a list of cells, got {cells_raw!r}")
    if not cells_raw and compare == "relative_drop" and not spec.baseline:
        raise ConfigError("paper.baseline: relative_drop needs the keys of the reference run")
    cells = [parse_cell(i, c, spec, is_key) for i, c in enumerate(cells_raw)]
    labels = [c.label for c in cells]
    dup = next((x for x in labels if labels.count(x) > 1), None)
    if dup is not None:
        raise ConfigError(f"paper.cells: label {dup!r} is used twice")
    order = _order(raw.get("order"), labels)
    return PaperSpec(**{**spec.__dict__, "cells": cells, "order": order})


def _order(raw, labels) -> list:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(c, list) and len(c) >= 2 for c in raw):
        raise ConfigError(f"paper.order: expected a list of chains (lists of 2+ cell labels), "
                          f"got {raw!r}")
    for i, chain in enumerate(raw):
        for label in chain:
            if label not in labels:
                raise ConfigError(f"paper.order[{i}]: {label!r} is not a cell label")
    return [list(c) for c in raw]
