"""`fedrec` command line: run | reproduce | archive | data info | data fetch | report | keys | detector record | detector train | privacy run | privacy report.

User errors (bad config, missing or malformed data) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from fedrec.cli_grid import add_grid_commands
from fedrec.errors import FedRecError


def _cmd_data_info(args) -> int:
    from fedrec.data.formats import load_dataset

    if args.dataset == "synthetic":
        from fedrec.data.synthetic import generate_synthetic

        inter = generate_synthetic()
    else:
        inter = load_dataset(args.dataset)
    stats = inter.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    width = max(len(k) for k in stats)
    for k, v in stats.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b:g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items())
        elif isinstance(v, float):
            v = f"{v:.6f}"
        print(f"{k:<{width}}  {v}")
    return 0


def _cmd_data_fetch(args) -> int:
    from fedrec.data.fetch import fetch

    path = fetch(args.name, dest=args.dest, force=args.force)
    print(path)
    return 0


def _cmd_report(args) -> int:
    from fedrec.report import public, report_rows, seed_summary
    from fedrec.results import format_table

    rows = report_rows(args.runs, readout=args.readout)
    if not rows:
        raise FedRecError(f"no run directories (with summary.json) under {' '.join(args.runs)}")
    fmt = "csv" if args.format == "csv" else "markdown"
    if args.readout == "late" and fmt == "markdown":
        print("drops read each run as the mean of its evaluations after half its rounds "
              "(--readout late), not its final value\n")
    print(format_table(public(rows), fmt))
    summary = seed_summary(rows)
    if any(s["seeds"] > 1 for s in summary) or any("drop_hr@5%" in s for s in summary):
        print()
        print(format_table(public(summary), fmt))
    if args.plot:
        from fedrec.plots import plot_curves

        plot_curves(args.runs, args.plot, metric=args.metric)
        print(f"plot written to {args.plot}", file=sys.stderr)
    if args.plot_detection:
        from fedrec.plots import plot_detection

        plot_detection(args.runs, args.plot_detection, window=args.window, stage=args.stage)
        print(f"detection plot written to {args.plot_detection}", file=sys.stderr)
    return 0


def _cmd_detector_record(args) -> int:
    from fedrec import config
    from fedrec.detector_tools import record

    if args.every < 1:
        raise FedRecError(f"--every: expected a positive integer, got {args.every}")
    over = list(args.set) + ([f"train.rounds={args.rounds}"] if args.rounds else [])
    cfgs = config.load(args.experiment, over)
    for s in record(cfgs, args.out, every=args.every, progress=not args.no_progress and None):
        print(json.dumps(s), flush=True)
    return 0


def _cmd_detector_train(args) -> int:
    from fedrec.detector_tools import train

    try:
        hidden = tuple(int(h) for h in args.hidden.split(",") if h.strip())
    except ValueError:
        hidden = ()
    if not hidden or min(hidden) < 1:
        raise FedRecError(f"--hidden: expected comma-separated positive widths, got {args.hidden!r}")
    print(json.dumps(train(args.records, args.out, test_fraction=args.test_fraction,
                           seed=args.seed, hidden=hidden, max_iter=args.max_iter,
                           threshold=args.threshold), indent=2))
    return 0


def _cmd_partition_export(args) -> int:
    from fedrec.config import load_one
    from fedrec.partition import export_partitions

    cfg = load_one(args.experiment, args.set)

    def progress(done, total):
        print(f"\rpartition export: {done}/{total} users", end="", file=sys.stderr, flush=True)

    public = export_partitions(cfg, args.out_dir, progress)
    print(f"\rpartition export: {public['n_users']} user files and public.json in "
          f"{args.out_dir} ({public['n_items']} items, experiment digest {public['digest']})",
          file=sys.stderr)
    return 0


def _cmd_keys(args) -> int:
    import dataclasses

    from fedrec.config import ExperimentConfig, valid_keys

    defaults = ExperimentConfig()
    for key in valid_keys(ExperimentConfig):
        v = defaults
        for part in key.split("."):
            v = getattr(v, part)
        if dataclasses.is_dataclass(v):
            continue
        print(f"{key} = {v!r}")
    from fedrec.paper import PAPER_DEFAULTS

    for key, v in PAPER_DEFAULTS.items():  # fedrec reproduce's block (not a run's key)
        print(f"{key} = {v!r}")
    return 0


def _cmd_privacy_run(args) -> int:
    from fedrec.privacy.experiment import run

    run(args.experiment, args.set, out=args.out, progress=not args.no_progress,
        log=lambda m: print(m, flush=True))
    return 0


def _cmd_privacy_report(args) -> int:
    from fedrec.privacy.report import write_report

    print(write_report(args.dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedrec", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    add_grid_commands(sub)

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    di = dsub.add_parser("info", help="print dataset statistics")
    di.add_argument("dataset", help="a known name (ml-1m, gowalla, ...), 'synthetic', or a path")
    di.add_argument("--json", action="store_true")
    di.set_defaults(fn=_cmd_data_info)
    df = dsub.add_parser("fetch", help="download ml-1m / ml-100k from GroupLens, checksum-verified")
    df.add_argument("name", choices=["ml-1m", "ml-100k"])
    df.add_argument("--dest", default=None)
    df.add_argument("--force", action="store_true")
    df.set_defaults(fn=_cmd_data_fetch)

    rp = sub.add_parser("report", help="table (markdown or CSV) of finished runs")
    rp.add_argument("runs", nargs="+", help="run directories or folders of them")
    rp.add_argument("--format", choices=["markdown", "csv"], default="markdown")
    rp.add_argument("--plot", default=None, help="also write a PNG of metric vs round")
    rp.add_argument("--metric", default="test_hr@5")
    rp.add_argument("--readout", choices=["final", "late"], default="final",
                    help="what the drop columns read of each run: its final evaluation, or "
                         "the mean of its evaluations after half its rounds (less noise)")
    rp.add_argument("--plot-detection", default=None,
                    help="also write a PNG of the defense's detection precision/recall per round")
    rp.add_argument("--window", type=int, default=200, help="rounds per point of --plot-detection")
    rp.add_argument("--stage", default="",
                    help="--plot-detection: only this filter's own drops (union, detector)")
    rp.set_defaults(fn=_cmd_report)

    pa = sub.add_parser("partition", help="per-device data files for a real deployment")
    pas = pa.add_subparsers(dest="partition_cmd", required=True)
    pe = pas.add_parser("export", help="write user-<i>.json (what device i may know) and "
                                       "public.json (what the server may know) to OUT_DIR")
    pe.add_argument("experiment")
    pe.add_argument("out_dir")
    pe.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a YAML key, as in `fedrec run` (the run must use the same)")
    pe.set_defaults(fn=_cmd_partition_export)

    k = sub.add_parser("keys", help="list every experiment YAML key with its default")
    k.set_defaults(fn=_cmd_keys)

    det = sub.add_parser("detector", help="supervised malicious-update detector (FedAttack 4.4)")
    dets = det.add_subparsers(dest="detector_cmd", required=True)
    dr = dets.add_parser("record", help="run an experiment in-process and store labelled "
                                        "upload features")
    dr.add_argument("experiment")
    dr.add_argument("--out", required=True, help=".npz to write ({attack} = attack.name)")
    dr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    dr.add_argument("--rounds", type=int, default=0, help="override train.rounds")
    dr.add_argument("--every", type=int, default=1, help="record every K-th round")
    dr.add_argument("--no-progress", action="store_true")
    dr.set_defaults(fn=_cmd_detector_record)
    dt = dets.add_parser("train", help="train the detector; prints held-out scores as JSON")
    dt.add_argument("records", nargs="+", help="files written by `fedrec detector record`")
    dt.add_argument("--out", required=True, help="detector file (server.detector_path)")
    dt.add_argument("--test-fraction", type=float, default=0.2,
                    help="share of recorded rounds held out")
    dt.add_argument("--seed", type=int, default=0)
    dt.add_argument("--hidden", default="64,32", help="MLP hidden widths")
    dt.add_argument("--max-iter", type=int, default=500)
    dt.add_argument("--threshold", type=float, default=0.5, help="for the held-out scores")
    dt.set_defaults(fn=_cmd_detector_train)
    pv = sub.add_parser("privacy", help="MGradInv gradient inversion by the server, its sweeps "
                                         "and countermeasures")
    pvs = pv.add_subparsers(dest="privacy_cmd", required=True)
    pr = pvs.add_parser("run", help="train with the observer, attack, write results.json, "
                                    "table.md and plots")
    pr.add_argument("experiment", help="an experiment YAML with a `privacy:` block")
    pr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key, e.g. --set privacy.targets=40")
    pr.add_argument("--out", default=None, help="output folder (default: privacy.out)")
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(fn=_cmd_privacy_run)
    prr = pvs.add_parser("report", help="rewrite table.md and plots from a results.json folder")
    prr.add_argument("dir")
    prr.set_defaults(fn=_cmd_privacy_report)
    return p


def printable(text: str) -> str:
    """One line of printable characters: control bytes, escapes and line breaks echoed from
    a binary or corrupt input shown as \\xNN, never sent to the terminal."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256
                   else f"\\u{ord(c):04x}" for c in text)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except FedRecError as e:
        print(f"fedrec: error: {printable(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        from fedrec.engine import RunInterrupted
        from fedrec.grid import GridInterrupted

        if isinstance(e, GridInterrupted):
            print(f"fedrec: {e}", file=sys.stderr)
        elif isinstance(e, RunInterrupted):
            print(f"fedrec: stopped after round {e.round_done}, checkpoint saved; the same command "
                  "resumes it", file=sys.stderr)
        else:
            print("fedrec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
