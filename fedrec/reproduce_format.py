"""How `fedrec reproduce` prints a table: ours beside the paper's in markdown, the table's
heading (state, wall time, shared and archived runs), and one line per table for --list.
The numbers come from fedrec/reproduce.py; this module only formats them."""

from __future__ import annotations

from pathlib import Path

from fedrec.errors import FedRecError
from fedrec.reproduce import (DEFAULT_ARCHIVE, PAPER_DIR, CellResult, TableReport, format_cell_value,
                              load_table, report_table, run_pace, table_names)

__all__ = ["format_report", "format_heading", "list_lines", "load_reports"]


def _fmt_published(r: CellResult) -> str:
    """The paper's number as printed (two decimals of a percentage, five digits of a metric)."""
    if r.published is None:
        return "—"
    return f"{r.published:.2f}%" if r.compare == "relative_drop" else f"{r.published:.5g}"


def _metric_name(r: CellResult) -> str:
    name = r.metric.removeprefix("test_").upper()
    return f"{name} drop" if r.compare == "relative_drop" else name


def format_report(rep: TableReport) -> str:
    """The table in markdown: ours beside the paper's, cell by cell, then the order checks."""
    # CPU seconds a run (steadier than wall time under load or pauses), where runs record them
    cpu = any(r.cpu_mean is not None for r in rep.results)
    lines = ["| cell | metric | ours (mean ± std) | seeds | paper | ours − paper | check "
             "| wall s/run |" + (" CPU s/run |" if cpu else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if cpu else "")]
    for r in rep.results:
        ours = ("not run" if r.mean is None
                else f"{format_cell_value(r, r.mean)} ± {format_cell_value(r, r.std)}")
        diff = ("" if r.mean is None or r.published is None
                else format_cell_value(r, r.mean - r.published))
        check = " ".join(f"{'✓' if ok else '✗'} {t}" for t, ok in r.checks)
        wall = "" if r.wall_mean is None else f"{r.wall_mean:.1f} ± {r.wall_std:.1f}"
        cpu_cell = "" if not cpu else (
            " |" if r.cpu_mean is None else f" {r.cpu_mean:.1f} ± {r.cpu_std:.1f} |")
        lines.append(f"| {r.label} | {_metric_name(r)} | {ours} | {r.n}/{r.expected} | "
                     f"{_fmt_published(r)} | {diff} | {check} | {wall} |{cpu_cell}")
    if rep.orders:
        lines.append("")
    for text, holds in rep.orders:
        mark = "not yet (cells missing)" if holds is None else \
            ("holds" if holds else "does NOT hold")
        chain, _, paired = text.partition("; ")  # the mark right after the chain it judges
        lines.append(f"- order {chain}: {mark}" + (f"; {paired}" if paired else ""))
    return "\n".join(lines)


def format_heading(rep: TableReport) -> str:
    spec = rep.table.spec
    out = [f"{rep.table.name}: {spec.source}", f"state: {rep.state}"]
    if spec.note:
        out.append(f"note: {spec.note}")
    if rep.readout == "late":
        out.append("readout: each run's metric is the mean of its evaluations after half its "
                   "rounds (--readout late), not the final value the paper reads; the marks "
                   "judge that reading")
    unknown = rep.wall_unknown
    out.append(f"wall time of the complete runs: {rep.wall_total / 60:.1f} min "
               f"({len(rep.done) - unknown} runs" + (
                   f"; {unknown} more resumed before wall times spanned a resume, left out"
                   if unknown else "") + ")")
    cpus = rep.cpu_runs
    if cpus:
        out.append(f"CPU time of the complete runs that record it: {sum(cpus) / 60:.1f} min "
                   f"({len(cpus)} runs; a steadier cost than wall time, which counts waits "
                   "for a core and pauses)")
    if rep.table.shared:
        tables = sorted({Path(d).parent.name for d in rep.table.shared.values()})
        out.append(f"shared: {len(rep.table.shared)} runs are another table's identical runs "
                   f"(same config but the name: {', '.join(tables)})")
    if rep.table.archived:
        out.append(f"archived: {len(rep.table.archived)} runs taken from {rep.table.archive} "
                   "(`fedrec archive`; --no-archive ignores them)")
    return "\n".join(out)


def load_reports(folder=PAPER_DIR, output=None, overrides=(), archive=DEFAULT_ARCHIVE) -> dict:
    """Every table's report (or the FedRecError that stops it), by name, each with the pace
    of every table's complete runs (TableReport.pace: a partial table's run-hours left take a
    cell not begun at the pace of runs of the same cost elsewhere)."""
    reports: dict = {}
    for name in table_names(folder):
        try:
            reports[name] = report_table(load_table(Path(folder) / f"{name}.yaml", overrides,
                                                    output, archive))
        except FedRecError as e:
            reports[name] = e
    pace = run_pace([r for r in reports.values() if not isinstance(r, FedRecError)])
    for rep in reports.values():
        if not isinstance(rep, FedRecError):
            rep.pace = pace
    return reports


def list_lines(folder=PAPER_DIR, output=None, overrides=(), archive=DEFAULT_ARCHIVE,
               reports=None) -> list[str]:
    """One line per table: name, runs, state (`reports`: load_reports's, else loaded here)."""
    if reports is None:
        reports = load_reports(folder, output, overrides, archive)
    lines = []
    for name, rep in reports.items():
        if isinstance(rep, FedRecError):
            lines.append(f"{name:<36}    ? runs  error: {rep}")
        else:
            lines.append(f"{name:<36} {len(set(rep.table.dirs)):>4} runs  {rep.state}")
    return lines
