"""Run directories: resolved config, per-round metrics CSV, summary.json; report tables.

A run directory holds
- config.yaml: the resolved experiment (every key, defaults filled in);
- metrics.csv: one row per round (fit metrics; eval metrics on evaluation rounds);
- summary.json: final metrics, seed, wall time, data summary, status ("complete" at the end).
A grid skips runs whose summary says complete, so an interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import re
import time
from pathlib import Path

import yaml

from fedrec import environment

METRIC_ORDER = ("round", "clients", "accepted", "invalid", "invalid_total", "train_loss")


def run_dir_for(cfg, root=None) -> Path:
    root = Path(root or cfg.output.dir)
    if not root.is_absolute() and cfg.base_dir and environment.runs_relative_to_yaml():
        root = Path(cfg.base_dir) / root
    name = cfg.output.name or f"{cfg.name}-{cfg.digest()}"
    safe = "".join(c if c.isalnum() or c in "-_.=,[]" else "_" for c in name)
    path = root / safe
    return path if path.exists() else _same_config_sibling(path, cfg.digest()) or path


def _same_config_sibling(path: Path, digest: str) -> Path | None:
    """A grid run's directory under another grid label: the same config (full digest in its
    summary.json) written by a grid that listed other values. A clean run is one config
    whatever attack settings the grid crossed it with, so a subset grid names it after its own
    first value (`[...,malicious_fraction=0.05,name=none]-624b29`) where the full grid says
    0.01: without this, the full grid would rerun it and `fedrec reproduce` miss it."""
    m = re.fullmatch(r"(.+)\[.*\](-[0-9a-f]{6})", path.name)
    if not m or not path.parent.is_dir():
        return None
    hits = [p for p in path.parent.glob(f"{glob.escape(m.group(1))}[[]*[]]{m.group(2)}")
            if _summary_digest(p) == digest]
    return hits[0] if len(hits) == 1 else None


def _summary_digest(run_dir: Path):
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("config_digest")
    except (OSError, ValueError):
        return None


def check_output_dir(run_dir: Path):
    """A one-line error if the run directory cannot be a directory (a file stands on its path)."""
    for p in (Path(run_dir), *Path(run_dir).parents):
        if p.exists():
            if not p.is_dir():
                from fedrec.errors import FedRecError

                raise FedRecError(f"output.dir: {p} is a file, not a directory")
            return


def is_complete(run_dir: Path) -> bool:
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text()).get("status") == "complete"
    except (OSError, ValueError):
        return False


class RunRecorder:
    """Receives per-round metrics from the strategy and writes the run directory."""

    def __init__(self, cfg, run_dir: Path, runner: str, resume_round: int | None = None,
                 prior_wall_s: float = 0.0, prior_cpu_s: float | None = 0.0, cpu_clock=None,
                 cpu_key: str = "cpu_time_s"):
        """resume_round: continue a run checkpointed after that round: metrics.csv keeps its
        rows up to it (later ones, written before the run stopped, are dropped) and new rows
        are appended. prior_wall_s: the wall time of the earlier segments up to that
        checkpoint (its `wall_time_s`), counted into this run's: a resumed run's summary
        gives the time of all the work it kept, not of its last segment alone.
        cpu_clock: a callable giving the CPU seconds of the run's processes so far
        (fedrec.cputime; default: this process and its reaped children); the summary's
        `cpu_time_s` is its difference over the run plus prior_cpu_s, the earlier segments'
        (None: unknown, e.g. a checkpoint written before CPU time was kept, and then only
        `cpu_time_segment_s` is given). cpu_key: the summary's name for it
        (`server_cpu_time_s` under Flower, whose clients run in other processes or machines)."""
        from fedrec.cputime import process_cpu_seconds

        self.cfg = cfg
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.runner = runner
        self.start = time.time()
        self.prior_wall_s = float(prior_wall_s or 0.0)
        self.cpu_clock = cpu_clock or process_cpu_seconds
        self.cpu_start = self.cpu_clock()
        self.prior_cpu_s = None if prior_cpu_s is None else float(prior_cpu_s)
        self.cpu_key = cpu_key
        self.rows: dict[int, dict] = {}
        self.final: dict = {}
        self.latest: dict = {}
        self.extra: dict = {}
        (self.dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        kept, header = [], None
        if resume_round is not None and (self.dir / "metrics.csv").exists():
            with open(self.dir / "metrics.csv", newline="") as f:
                reader = csv.DictReader(f)
                header = reader.fieldnames
                kept = [r for r in reader if r.get("round", "").isdigit()
                        and int(r["round"]) <= resume_round]
        self._csv = open(self.dir / "metrics.csv", "w", newline="")
        self._header: list | None = None
        if header:
            self._header = list(header)
            w = csv.DictWriter(self._csv, fieldnames=self._header)
            w.writeheader()
            w.writerows(kept)
            self._csv.flush()
        self._pending: list = []

    def log_fit(self, rnd: int, metrics: dict):
        # flush earlier rounds only: this round's eval metrics may still come (one row per round)
        if len(self._pending) >= 200:
            self.flush()
        row = self.rows.setdefault(rnd, {"round": rnd})
        row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        self.latest.update({"train_loss": metrics.get("train_loss")})
        self._pending.append(rnd)

    def log_eval(self, rnd: int, metrics: dict, final: bool):
        row = self.rows.setdefault(rnd, {"round": rnd})
        row.update(metrics)
        if rnd not in self._pending:
            self._pending.append(rnd)
        self.latest.update(metrics)
        if final:
            self.final = dict(metrics)
        self.flush()

    def flush(self):
        if not self._pending:
            return
        rows = [self.rows.pop(r) for r in sorted(set(self._pending)) if r in self.rows]
        self._pending = []
        keys = list(METRIC_ORDER) + sorted({k for r in rows for k in r} - set(METRIC_ORDER))
        if self._header is None or not set(keys) <= set(self._header):
            self._rewrite_header(keys)
        w = csv.DictWriter(self._csv, fieldnames=self._header, extrasaction="ignore")
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in self._header})
        self._csv.flush()

    def _rewrite_header(self, keys):
        """Widen the CSV when new metric columns appear (e.g. the first eval round)."""
        old = []
        if self._header is not None:
            self._csv.close()
            with open(self.dir / "metrics.csv", newline="") as f:
                old = list(csv.DictReader(f))
            keys = list(dict.fromkeys(self._header + keys))
        self._header = keys
        self._csv = open(self.dir / "metrics.csv", "w", newline="")
        w = csv.DictWriter(self._csv, fieldnames=keys)
        w.writeheader()
        for r in old:
            w.writerow(r)

    def elapsed(self) -> float:
        """Wall seconds of the run so far: the earlier segments' (prior_wall_s) and this one's."""
        return self.prior_wall_s + (time.time() - self.start)

    def cpu_segment(self) -> float:
        """CPU seconds of this segment of the run so far."""
        return max(0.0, self.cpu_clock() - self.cpu_start)

    def cpu_elapsed(self) -> float | None:
        """CPU seconds of the run so far, earlier segments included; None where unknown."""
        return None if self.prior_cpu_s is None else self.prior_cpu_s + self.cpu_segment()

    def finish(self, status="complete", **extra) -> dict:
        self.flush()
        self._csv.close()
        segment = time.time() - self.start
        timing = {"wall_time_s": round(self.prior_wall_s + segment, 3)}
        if self.prior_wall_s:
            timing["wall_time_segment_s"] = round(segment, 3)
        cpu_segment = self.cpu_segment()
        if self.prior_cpu_s is not None:
            timing[self.cpu_key] = round(self.prior_cpu_s + cpu_segment, 3)
        if self.prior_cpu_s != 0.0:
            timing[self.cpu_key.removesuffix("_s") + "_segment_s"] = round(cpu_segment, 3)
        summary = {
            "name": self.cfg.name, "status": status, "runner": self.runner, "seed": self.cfg.seed,
            "rounds": self.cfg.train.rounds, **timing,
            "final": self.final, "config_digest": self.cfg.digest(), **self.extra, **extra,
        }
        tmp = self.dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=_json_default))
        os.replace(tmp, self.dir / "summary.json")
        return summary


def _fmt(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return "" if v is None else v


def _json_default(o):
    try:
        return o.item()
    except AttributeError:
        return str(o)


# ---------------------------------------------------------------------------- report


def load_summary(run_dir) -> dict:
    run_dir = Path(run_dir)
    s = json.loads((run_dir / "summary.json").read_text())
    s["dir"] = str(run_dir)
    return s


def find_runs(paths) -> list[Path]:
    """Run directories under the given paths (a run dir itself, or a folder of them)."""
    out = []
    for p in map(Path, paths):
        if (p / "summary.json").exists():
            out.append(p)
        elif p.is_dir():
            out += sorted(q.parent for q in p.rglob("summary.json"))
    return out


def format_table(rows, fmt="markdown") -> str:
    if not rows:
        return "no runs found"
    keys = list(rows[0])
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
