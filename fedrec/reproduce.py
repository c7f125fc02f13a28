"""`fedrec reproduce`: the grid behind a published table, and ours beside the paper's.

A table is an experiment YAML in experiments/paper/ with a `paper:` block (fedrec/paper.py).
Its runs are the grid's runs, found where `fedrec run` writes them (run_dir_for); a cell is one
setting of the grid over its seeds. Ours is the mean and (population) standard deviation over the
seeds with a complete run: of the metric itself (`compare: value`), or of the per-seed relative
drop 100 (reference - run) / reference against the reference run of the same seed and config
(`compare: relative_drop`; the reference is the cell's run with the `baseline` keys set).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from fedrec.errors import ConfigError, FedRecError
from fedrec.paper import PaperCell, PaperSpec, parse_paper
from fedrec.plots import READOUTS
from fedrec.run_cost import (cost_signature, hours_left, run_pace, whole_run_cpu,  # noqa: F401
                             whole_run_wall)
from fedrec.run_index import archived_runs, computation_digest, shared_runs

__all__ = ["cell_runs", "computation_digest", "load_table", "report_table", "table_names", "table_path"]

PAPER_DIR = Path(__file__).resolve().parent.parent / "experiments" / "paper"


@dataclass
class Cell:
    """A cell's runs (one per seed, grid order) and each one's reference run (drops only)."""

    spec: PaperCell
    dirs: list
    refs: list
    runs: list = field(default_factory=list)  # grid indices of dirs
    ref_runs: list = field(default_factory=list)  # grid indices of refs (None: no reference)


@dataclass
class Table:
    name: str
    spec: PaperSpec
    cfgs: list
    dirs: list  # run directory of every run of the grid, in grid order
    cells: list
    # grid index -> another table's complete run of the same computation (computation_digest),
    # used where this table's own run is missing
    shared: dict = field(default_factory=dict)
    # grid index -> the archived run (fedrec.archive) of the same computation, used where
    # neither this table's run nor another table's is complete under runs/
    archived: dict = field(default_factory=dict)
    archive: Path | None = None

    @property
    def taken(self) -> dict:
        """grid index -> a run found elsewhere (another table's, or the archive's): not run again."""
        return {**self.shared, **self.archived}


@dataclass
class CellResult:
    label: str
    metric: str
    compare: str
    n: int  # seeds with a value
    expected: int  # seeds the grid has for this cell
    mean: float | None
    std: float | None
    published: float | None
    checks: list  # (text, passed) per criterion: tolerance, at_least, at_most
    wall_mean: float | None
    wall_std: float | None
    by_seed: dict = field(default_factory=dict)  # seed -> the value of that seed's run
    cpu_mean: float | None = None  # CPU seconds a run, over the runs that record it
    cpu_std: float | None = None

    @property
    def passed(self) -> bool | None:
        if self.mean is None or not self.checks:
            return None
        return all(ok for _, ok in self.checks)


def table_names(folder=PAPER_DIR) -> list[str]:
    return sorted(p.stem for p in Path(folder).glob("*.yaml"))


def table_path(name: str, folder=PAPER_DIR) -> Path:
    names = table_names(folder)
    if name not in names:
        valid = ", ".join(names) or f"(none in {folder})"
        raise FedRecError(f"unknown table {name!r}; valid: {valid}")
    return Path(folder) / f"{name}.yaml"


def dotted(d: dict, key: str):
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _selects(cfg_dict: dict, select: dict) -> bool:
    return all(dotted(cfg_dict, k) == v for k, v in select.items())


def reference_digest(cfg, baseline: dict) -> str:
    """The config digest of `cfg` with the baseline keys set (a clean result normalised as
    the grid normalises its clean runs)."""
    from fedrec.config_load import _set_dotted, clean_attack, from_dict

    d = cfg.to_dict()
    for k, v in baseline.items():
        _set_dotted(d, k, v)
    return clean_attack(from_dict(d, cfg.base_dir)).digest()


def grid_label(cfg) -> str:
    """The grid values in a run's directory name, without its seed."""
    m = re.search(r"\[(.*)\]", cfg.output.name or "")
    parts = [p for p in (m.group(1).split(",") if m else []) if not p.startswith("seed=")]
    return ",".join(parts) or cfg.name


DEFAULT_ARCHIVE = "default"  # load_table's archive: fedrec.archive.default_archive()


def load_table(path, overrides=(), output=None, archive=DEFAULT_ARCHIVE) -> Table:
    """The table's spec, its grid (with --set overrides) and its cells; a one-line error when
    a cell selects no setting or several, or its reference run is not in the grid. archive:
    where archived runs are looked up (default: fedrec.archive.default_archive(); None: not)."""
    from fedrec.config import deep_merge, expand, is_config_key, parse_overrides, read_yaml
    from fedrec.report import setting_key
    from fedrec.results import run_dir_for

    path = Path(path)
    over = parse_overrides(overrides)
    raw = read_yaml(path)
    if "paper" not in raw:
        raise ConfigError(f"{path}: no `paper:` block (the published numbers to compare)")
    spec = parse_paper(deep_merge(raw, over)["paper"], is_config_key)
    cfgs = expand(raw, over, base_dir=str(path.resolve().parent))
    dirs = [run_dir_for(c, output) for c in cfgs]
    shared = shared_runs(cfgs, dirs)
    dirs = [shared.get(i, d) for i, d in enumerate(dirs)]
    if archive == DEFAULT_ARCHIVE:
        from fedrec.archive import default_archive

        archive = default_archive()
    archived = archived_runs(cfgs, dirs, archive)
    dirs = [archived.get(i, d) for i, d in enumerate(dirs)]
    dicts = [c.to_dict() for c in cfgs]
    by_setting: dict = {}
    for i, d in enumerate(dicts):
        by_setting.setdefault(setting_key(d), []).append(i)
    specs = spec.cells or [PaperCell(grid_label(cfgs[idx[0]]), {}, spec.metric, spec.compare,
                                     spec.baseline, None, spec.tolerance, None, None)
                           for idx in by_setting.values()]
    by_digest = {c.digest(): i for i, c in enumerate(cfgs)}
    cells = []
    for j, cs in enumerate(specs):
        if spec.cells:
            hits = [idx for idx in by_setting.values() if _selects(dicts[idx[0]], cs.select)]
            if len(hits) != 1:
                raise ConfigError(f"{path.name}: paper.cells[{j}] ({cs.label}) selects "
                                  f"{len(hits)} settings of the grid; expected one")
            idx = hits[0]
        else:
            idx = list(by_setting.values())[j]
        ref_runs = []
        for i in idx:
            if cs.compare != "relative_drop":
                ref_runs.append(None)
                continue
            r = by_digest.get(reference_digest(cfgs[i], cs.baseline))
            if r is None:
                raise ConfigError(f"{path.name}: paper.cells[{j}] ({cs.label}): its reference run "
                                  f"({cs.baseline}) is not in the grid")
            ref_runs.append(r)
        cells.append(Cell(cs, [dirs[i] for i in idx],
                          [None if r is None else dirs[r] for r in ref_runs], list(idx), ref_runs))
    return Table(path.stem, spec, cfgs, dirs, cells, shared, archived,
                 None if archive is None else Path(archive))


def cell_runs(table: Table, patterns) -> list[int]:
    """Grid indices of the runs behind the cells whose labels contain one of `patterns`
    (case-insensitive), each cell's reference runs first, then its own, cell by cell in the
    order the patterns name them (`fedrec reproduce NAME --cells`: the cells that matter
    first). A one-line error for a pattern that names no cell."""
    order: list[int] = []
    for pattern in patterns:
        hits = [c for c in table.cells if pattern.lower() in c.spec.label.lower()]
        if not hits:
            labels = "; ".join(c.spec.label for c in table.cells)
            raise ConfigError(f"--cells {pattern!r}: no cell of {table.name} has it in its label "
                              f"(cells: {labels})")
        for c in hits:
            for i in [r for r in c.ref_runs if r is not None] + c.runs:
                if i not in order:
                    order.append(i)
    return order


def _summaries(dirs) -> dict:
    """The summary of every complete run among `dirs`."""
    from fedrec.results import is_complete, load_summary

    return {d: load_summary(d) for d in dirs if is_complete(d)}


def detection_value(summary: dict, metric: str):
    """det_precision / det_recall / det_f1 (all dropping steps) or det_<step>_<score> (one
    filter's own drops) from summary.json's `detection`."""
    det = summary.get("detection") or {}
    name = metric.removeprefix("det_")
    if name in det and not isinstance(det[name], dict):
        return det[name]
    step, _, score = name.rpartition("_")
    return (det.get(step) or {}).get(score) if isinstance(det.get(step), dict) else None


def run_value(run_dir, summary: dict, metric: str, readout: str = "final"):
    """The run's final `metric` (summary.json; det_* from its `detection`), else the last
    value of its metrics.csv column. readout "late": the mean of the metric over the run's
    evaluations after half its rounds (metrics.csv), a reading with less evaluation noise
    than one final value (not the papers' readout); det_* metrics, and a run with no
    evaluation after half its rounds, keep their final value."""
    if readout == "late" and not metric.startswith("det_"):
        from fedrec.plots import late_mean

        late = late_mean(run_dir, metric, summary.get("rounds"))
        if late is not None:
            return late
    v = detection_value(summary, metric) if metric.startswith("det_") else None
    if v is None:
        v = (summary.get("final") or {}).get(metric)
    if v is not None:
        return float(v)
    from fedrec.plots import read_curve

    _, ys = read_curve(run_dir, metric)
    return ys[-1] if ys else None


def cell_result(cell: Cell, done: dict, readout: str = "final") -> CellResult:
    from fedrec.report import mean_std

    cs = cell.spec
    values, walls, cpus, by_seed = [], [], [], {}
    for d, ref in zip(cell.dirs, cell.refs):
        if d not in done:
            continue
        walls.append(whole_run_wall(done[d]))
        cpus.append(whole_run_cpu(done[d]))
        v = run_value(d, done[d], cs.metric, readout)
        value = None
        if cs.compare == "value":
            value = v
        elif ref in done and v is not None:
            b = run_value(ref, done[ref], cs.metric, readout)
            if b:
                value = 100.0 * (b - v) / b
        if value is not None and not math.isnan(value):
            values.append(value)
            by_seed[done[d].get("seed", f"run {len(by_seed)}")] = value
    mean, std = mean_std(values)
    wall_mean, wall_std = mean_std(walls)
    cpu_mean, cpu_std = mean_std(cpus)
    checks = []
    if mean is not None:
        if cs.published is not None and cs.tolerance is not None:
            checks.append((f"±{cs.tolerance:g}", abs(mean - cs.published) <= cs.tolerance))
        if cs.at_least is not None:
            checks.append((f"≥ {cs.at_least:g}", mean >= cs.at_least))
        if cs.at_most is not None:
            checks.append((f"≤ {cs.at_most:g}", mean <= cs.at_most))
    return CellResult(cs.label, cs.metric, cs.compare, len(values), len(cell.dirs), mean, std,
                      cs.published, checks, wall_mean, wall_std, by_seed, cpu_mean, cpu_std)


def paired_difference(a: CellResult, b: CellResult):
    """(mean, standard error, n) of a's value minus b's over the seeds both have, or None.

    Paired by seed, so what two cells share cancels: two drops of one seed are measured
    against the same clean run, whose own noise moves both. Standard error: the sample
    standard deviation of the differences over sqrt(n) (inf for one seed)."""
    diffs = [a.by_seed[s] - b.by_seed[s] for s in a.by_seed if s in b.by_seed]
    if not diffs:
        return None
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else math.inf
    return mean, se, n


def order_checks(spec: PaperSpec, results: list) -> list:
    """(text, holds) per `order` chain: ours must decrease along it (holds None while a cell
    has no value). The text also gives each neighbouring pair's difference paired by seed,
    marked "within noise" where it is under two standard errors."""
    by_label = {r.label: r for r in results}
    out = []
    for chain in spec.order:
        means = [by_label[label].mean for label in chain]
        shown = " > ".join(f"{label} ({format_cell_value(by_label[label], m, '?')})"
                           for label, m in zip(chain, means))
        holds = None if any(m is None for m in means) else \
            all(a > b for a, b in zip(means, means[1:]))
        pairs = []
        for a, b in zip(chain, chain[1:]):
            diff = paired_difference(by_label[a], by_label[b])
            if diff is None:
                continue
            mean, se, n = diff
            unit = " points" if by_label[a].compare == "relative_drop" else ""
            digits = 1 if unit else 4
            if n == 1:  # one seed: a difference, no spread to judge it by
                pairs.append(f"{a} − {b} {mean:+.{digits}f}{unit} (one seed: no error estimate)")
                continue
            noise = ", within noise" if not abs(mean) >= 2 * se else ""
            pairs.append(f"{a} − {b} {mean:+.{digits}f} ± {se:.{digits}f}{unit} "
                         f"(n = {n}{noise})")
        if pairs:
            shown += "; paired by seed: " + ", ".join(pairs)
        out.append((shown, holds))
    return out


@dataclass
class TableReport:
    table: Table
    results: list
    orders: list
    done: dict  # complete runs' summaries
    readout: str = "final"
    # cost_signature -> whole wall times of complete runs of that cost in any table
    # (`run_pace`); hours_left's estimate for a cell not begun here
    pace: dict = field(default_factory=dict)

    @property
    def state(self) -> str:
        t, k = self.table, sum(1 for d in set(self.table.dirs) if d in self.done)
        n = len(set(t.dirs))
        if t.spec.unsupported:
            return f"unsupported: {t.spec.unsupported}"
        # runs begun (a run directory) but not complete: running now, or stopped (resumable)
        started = sum(1 for d in set(t.dirs) if d not in self.done and Path(d).is_dir())
        begun = f", {started} started" if started else ""
        if k == 0:
            return f"not run ({started} started)" if started else "not run"
        if k < n:
            # the checks of the cells whose every seed is in: where the table stands so far
            full = [r.passed for r in self.results
                    if r.passed is not None and r.n == r.expected]
            so_far = (f"; complete cells: {sum(full)} of {len(full)} checks pass" if full
                      else "")
            hours = self.hours_left()
            left = "" if hours is None else (
                f"; ~{hours:.1f} run-hours left" if hours >= 1
                else f"; ~{max(1, round(60 * hours))} run-minutes left")
            return f"partial ({k} of {n} runs{begun}{left}{so_far})"
        marks = [r.passed for r in self.results if r.passed is not None]
        marks += [h for _, h in self.orders if h is not None]
        if not marks:
            return "done (nothing published to check)"
        if all(marks):
            return f"passing ({len(marks)} of {len(marks)} checks)"
        return f"done ({sum(marks)} of {len(marks)} checks pass)"

    @property
    def wall_total(self) -> float:
        """Summed wall time of the complete runs whose whole wall time is known."""
        return sum(whole_run_wall(s) or 0.0 for s in self.done.values())

    def hours_left(self) -> float | None:
        """Estimated run-hours of the runs not complete (fedrec.run_cost.hours_left)."""
        return hours_left(self.table, self.done, self.pace or None)

    @property
    def cpu_runs(self) -> list:
        """CPU seconds of the complete runs that record them."""
        return [c for c in map(whole_run_cpu, self.done.values()) if c is not None]

    @property
    def wall_unknown(self) -> int:
        """Complete runs whose summary holds only their last stretch (`whole_run_wall`)."""
        return sum(whole_run_wall(s) is None for s in self.done.values())


def report_table(table: Table, readout: str = "final") -> TableReport:
    """The table's cells from its complete runs; readout "late" reads each run's metric as
    the mean of its second half's evaluations (`run_value`)."""
    if readout not in READOUTS:
        raise FedRecError(f"--readout: expected one of {', '.join(READOUTS)}, got {readout!r}")
    done = _summaries(set(table.dirs))
    results = [cell_result(c, done, readout) for c in table.cells]
    return TableReport(table, results, order_checks(table.spec, results), done, readout)


def format_cell_value(r: CellResult, v, missing="") -> str:
    """A cell's number as printed: a drop in percent (one decimal), a metric to 4 decimals."""
    if v is None:
        return missing
    return f"{v:.1f}%" if r.compare == "relative_drop" else f"{v:.4f}"
