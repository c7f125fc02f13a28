"""A results archive: finished runs kept small enough to commit, and read back by `fedrec reproduce`.

A paper table needs tens to hundreds of runs of minutes to hours each; `runs/` is a scratch
folder (ignored by git, gone with the machine). `fedrec archive RUN_OR_FOLDER ...` copies each
complete run into the archive (default `results/` at the project root, or $FEDREC_ARCHIVE) as

    <archive>/<the run's folder's name>/<run name>/
        config.yaml     the run's config, as run
        summary.json    its final metrics, wall time, detection counts (as written by the run)
        metrics.csv     its evaluation rows only (rounds with a test_ / val_ value): the curves
                        of the tables' plots, ~1 KB instead of one row per round
        archived.json   where it came from, when, the fedrec commit of the archiving checkout,
                        how many metrics rows were kept of how many, and `round_means`: the
                        mean over all rows of each per-round column (e.g. a targeted attack's
                        `attack_upload_kl`), which the kept rows alone would misstate

so a table grows across machines and sessions: `fedrec reproduce` takes, for a run missing from
`runs/`, the archived run of the same computation (`run_index.computation_digest`: the config
without its name), says how many runs it took from the archive, and does not run them again
(`--no-archive` ignores the archive). Nothing is typed in: every number in a table still comes
from a run's own summary.json or metrics.csv.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

from fedrec.errors import FedRecError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ARCHIVED = "archived.json"


def default_archive() -> Path:
    """$FEDREC_ARCHIVE, else `results/` at the project root."""
    from fedrec import environment

    return environment.archive_dir() or PROJECT_ROOT / "results"


def evaluation_rows(metrics_csv: str) -> tuple[str, int, int]:
    """(csv text, rows kept, rows in all): the header and the rows that carry an evaluation
    (a non-empty test_* or val_* column); every column kept."""
    reader = csv.reader(io.StringIO(metrics_csv))
    try:
        header = next(reader)
    except StopIteration:
        return "", 0, 0
    eval_cols = [i for i, name in enumerate(header) if name.startswith(("test_", "val_"))]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    kept = total = 0
    for row in reader:
        total += 1
        if any(i < len(row) and row[i] != "" for i in eval_cols):
            writer.writerow(row)
            kept += 1
    return out.getvalue(), kept, total


def round_means(metrics_csv: str) -> dict:
    """{column: mean over the rows where it has a number} for every per-round column (not
    round, not test_* / val_*): what `fedrec report` averages over a run's rounds, taken
    before the archive keeps only the evaluation rows."""
    reader = csv.DictReader(io.StringIO(metrics_csv))
    sums: dict = {}
    for row in reader:
        for name, value in row.items():
            if not name or name == "round" or name.startswith(("test_", "val_")) or value in ("", None):
                continue
            try:
                v = float(value)
            except ValueError:
                continue
            total, count = sums.get(name, (0.0, 0))
            sums[name] = (total + v, count + 1)
    return {name: total / count for name, (total, count) in sums.items() if count}


def _git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    return res.stdout.strip() or None


def archive_run(run_dir, archive=None) -> tuple[Path, bool]:
    """(archived directory, whether anything was written) for one complete run; a run whose
    summary.json is already archived unchanged is left as it is."""
    from fedrec.results import is_complete

    run_dir = Path(run_dir)
    if not is_complete(run_dir):
        raise FedRecError(f"{run_dir}: not a complete run (no summary.json with status complete)")
    if not (run_dir / "config.yaml").is_file():
        raise FedRecError(f"{run_dir}: no config.yaml")
    dest = Path(archive or default_archive()) / run_dir.resolve().parent.name / run_dir.name
    summary = (run_dir / "summary.json").read_bytes()
    if (dest / "summary.json").is_file() and (dest / "summary.json").read_bytes() == summary:
        return dest, False
    metrics = run_dir / "metrics.csv"
    full = metrics.read_text() if metrics.is_file() else ""
    text, kept, total = evaluation_rows(full)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(run_dir / "config.yaml", tmp / "config.yaml")
    (tmp / "summary.json").write_bytes(summary)
    (tmp / "metrics.csv").write_text(text)
    (tmp / ARCHIVED).write_text(json.dumps({
        "source": str(run_dir.resolve()),
        "archived_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fedrec_commit": _git_commit(),
        "metrics_rows_kept": kept, "metrics_rows_total": total,
        "round_means": round_means(full),
    }, indent=2) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest, True


def archive_runs(paths, archive=None) -> list[tuple[Path, bool]]:
    """archive_run for every complete run under paths (a run or a folder of runs); runs still
    running or interrupted are skipped."""
    from fedrec.results import find_runs, is_complete

    runs = [r for r in find_runs(paths) if is_complete(r)]
    if not runs:
        raise FedRecError(f"no complete run under {' '.join(map(str, paths))}")
    return [archive_run(r, archive) for r in runs]


def archive_as_they_finish(archive=None):
    """A `run_grid` on_finish hook: each run that ends complete (or was already complete) is
    archived at once, so a grid's finished runs outlive the machine even if the session
    running it is killed (`fedrec run --archive`, `fedrec reproduce --archive-done`). A run
    that failed or stopped is not; an archiving error is one line on stderr, and the grid
    goes on."""
    import sys

    from fedrec.results import is_complete

    def on_finish(outcome, run_dir):
        if outcome.error or not is_complete(run_dir):
            return
        try:
            dest, written = archive_run(run_dir, archive)
        except (FedRecError, OSError) as e:
            print(f"{run_dir}: not archived: {e}", file=sys.stderr)
            return
        if written:
            print(f"archived {Path(run_dir).name} in {dest.parent}", file=sys.stderr)

    return on_finish


def is_archived(run_dir) -> bool:
    return (Path(run_dir) / ARCHIVED).is_file()
