"""What runs cost: each run's whole wall and CPU time, and the run-hours a partial table has left.

A run's cost is read from its summary.json (`wall_time_s`, `cpu_time_s`, across every segment
of a resumed run). `fedrec reproduce --list` estimates a partial table's remaining work from
the runs already complete, matching each run still to do with complete runs of the same cost
(`cost_signature`), in its own table or in another, and counting off what a stopped run has
already done (its metrics.csv's last round).
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

__all__ = ["cost_signature", "hours_left", "rounds_done", "run_pace", "whole_run_cpu",
           "whole_run_wall"]


def whole_run_wall(summary: dict):
    """A run's wall time in seconds, or None where its summary holds only the last stretch: a
    run resumed from a checkpoint before `wall_time_s` counted the earlier segments (it has
    `resumed_from_round` but no `wall_time_segment_s`), which would read as a few seconds."""
    if summary.get("resumed_from_round") is not None and "wall_time_segment_s" not in summary:
        return None
    return summary.get("wall_time_s")


def whole_run_cpu(summary: dict):
    """A run's CPU seconds (`cpu_time_s`: all its segments), or None where its summary does
    not record them (runs finished before CPU time was kept, or resumed from a checkpoint
    written before then)."""
    return summary.get("cpu_time_s")


def cost_signature(cfg) -> str:
    """What sets a run's cost: its config but for the seed, the attack and the names
    (a Figure 2 UNION run costs what Table 3's run of the same defense costs)."""
    d = cfg if isinstance(cfg, dict) else cfg.to_dict()
    return json.dumps({k: v for k, v in d.items() if k not in ("name", "seed", "attack", "output")},
                      sort_keys=True, default=str)


def run_pace(reports) -> dict:
    """cost_signature -> whole wall times of the complete runs of `reports` (TableReports;
    each run once, though tables share runs), for TableReport.pace."""
    pace: dict = {}
    seen = set()
    for rep in reports:
        for d, cfg in zip(rep.table.dirs, rep.table.cfgs):
            wall = whole_run_wall(rep.done[d]) if d in rep.done else None
            if wall is None or d in seen:
                continue
            seen.add(d)
            pace.setdefault(cost_signature(cfg), []).append(wall)
    return pace


def rounds_done(run_dir) -> int | None:
    """The last round a run not complete has recorded (its metrics.csv's last row: a stopped
    run resumes from its checkpoint at most a checkpoint interval before it), None where it
    has recorded none. Reads the file's tail only."""
    path = Path(run_dir) / "metrics.csv"
    try:
        with open(path, "rb") as f:
            header = f.readline().decode("utf-8", "replace")
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(len(header), size - 65536))
            tail = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    names = next(csv.reader([header]), [])
    if "round" not in names or not tail:
        return None
    col = names.index("round")
    for line in reversed(tail):
        row = next(csv.reader([line]), [])
        try:
            return int(float(row[col]))
        except (IndexError, ValueError):
            continue
    return None


def _rounds(cfg) -> int | None:
    d = cfg if isinstance(cfg, dict) else cfg.to_dict()
    rounds = (d.get("train") or {}).get("rounds")
    return int(rounds) if rounds else None


def hours_left(table, done: dict, pace: dict | None = None) -> float | None:
    """Estimated run-hours (one process each: divide by --jobs) of the runs of `table` not in
    `done` (run dir -> summary of the complete runs).

    Each run is taken at the median whole wall time (a run paused, or slowed beside other
    jobs, does not carry the estimate) of, in this order: its cell's complete runs; the
    complete runs of the same cost (`cost_signature`: the same config but for the seed and
    the attack) in every table (`pace`, from run_pace over every table) or, without `pace`,
    in this one; the table's complete runs (a cell of a new kind). A run stopped part way
    counts only the share of its rounds it has left (`rounds_done`). None while no run with
    a known wall time is complete."""
    known = {d: whole_run_wall(s) for d, s in done.items()}
    known = {d: w for d, w in known.items() if w is not None}
    if not known:
        return None
    overall = statistics.median(known.values())
    cfgs = dict(zip(table.dirs, getattr(table, "cfgs", None) or []))
    if pace is None:
        pace = {}
        for d, cfg in cfgs.items():
            if d in known:
                pace.setdefault(cost_signature(cfg), []).append(known[d])
    estimate = {}
    for cell in table.cells:
        walls = [known[d] for d in cell.dirs if d in known]
        for d in cell.dirs:
            if walls:
                estimate.setdefault(d, statistics.median(walls))
    total = 0.0
    for d in {d for d in table.dirs if d not in done}:
        if d not in estimate and d in cfgs:
            same = pace.get(cost_signature(cfgs[d]))
            if same:
                estimate[d] = statistics.median(same)
        left = 1.0
        rounds = _rounds(cfgs[d]) if d in cfgs else None
        if rounds:
            started = rounds_done(d)
            if started:
                left = max(0.0, 1.0 - started / rounds)
        total += estimate.get(d, overall) * left
    return total / 3600.0
