"""`fedrec run | reproduce | archive`: the commands that run grids and keep their results
(fedrec.cli holds the rest and the entry point)."""

from __future__ import annotations

import json
import sys

from fedrec.errors import FedRecError


def _cmd_run(args) -> int:
    from fedrec import config
    from fedrec.grid import run_grid

    if args.jobs < 1:
        raise FedRecError(f"--jobs: expected a positive integer, got {args.jobs}")
    ray = _ray_options(args)
    cfgs = config.load(args.experiment, args.set)
    if ray is None:  # a Ray cluster's nodes may hold data this driver does not
        check_datasets(cfgs, args.output, args.force)
    outcomes = run_grid(cfgs, output_root=args.output, force=args.force, jobs=args.jobs, ray=ray,
                        progress=not args.no_progress, on_finish=_archiving(args.archive))
    for o in outcomes:
        if o.error:
            print(f"{o.name}: FAILED: {o.error}")
            continue
        s = o.summary
        tag = "skipped (already complete)" if s.get("skipped") else f"{s['wall_time_s']:.1f}s"
        final = s.get("final", {})
        shown = ", ".join(f"{k}={final[k]:.4f}" for k in ("test_hr@5", "test_ndcg@5", "test_hr@10",
                                                          "test_ndcg@10") if k in final)
        print(f"{s.get('run_dir', s.get('dir'))}: {shown} [{tag}]")
    if args.json:
        print(json.dumps([o.summary for o in outcomes if o.summary is not None], indent=2,
                         default=str))
    return 1 if any(o.error for o in outcomes) else 0


def check_datasets(cfgs, output=None, force=False) -> None:
    """Before any run starts: every dataset that a run still to do names is found here, else
    one line (DataFormatError) instead of the same failure once per run of the grid."""
    from fedrec.data.formats import resolve_dataset
    from fedrec.results import is_complete, run_dir_for

    todo = [c for c in cfgs if force or not is_complete(run_dir_for(c, output))]
    for name in dict.fromkeys(c.data.dataset for c in todo):
        if name != "synthetic":
            resolve_dataset(name)


def _archiving(archive):
    """run_grid's on_finish hook for --archive [DIR] ('' = the default archive), or None."""
    if archive is None:
        return None
    from fedrec.archive import archive_as_they_finish

    return archive_as_they_finish(archive or None)


def _ray_options(args):
    from fedrec.grid import RayOptions

    for flag, v in (("--ray-cpus", args.ray_cpus), ("--ray-gpus", args.ray_gpus)):
        if v is not None and v < 0:
            raise FedRecError(f"{flag}: expected a number >= 0, got {v}")
    if args.ray is False:
        return None
    return RayOptions(address=args.ray, num_cpus=args.ray_cpus, num_gpus=args.ray_gpus)


def _cmd_reproduce(args) -> int:
    from pathlib import Path

    from fedrec import reproduce as rp
    from fedrec import reproduce_format as fmt

    folder = Path(args.tables)
    if not folder.is_dir():
        raise FedRecError(f"--tables: {folder} is not a folder of paper YAMLs")
    if args.jobs < 1:
        raise FedRecError(f"--jobs: expected a positive integer, got {args.jobs}")
    if args.archive_done and args.no_archive:
        raise FedRecError("--archive-done archives into the archive that --no-archive ignores: "
                          "give one of them")
    if not (args.name or args.list or args.write_docs):
        raise FedRecError("reproduce: name a table (one of: "
                          f"{', '.join(rp.table_names(folder))}), or --list, or --write-docs")
    if args.readout != "final" and not args.name:
        raise FedRecError("--readout: applies to a named table's printed table "
                          "(fedrec reproduce NAME --readout late); --list and --write-docs "
                          "read the final values")
    failed = False
    if args.list:
        print("\n".join(fmt.list_lines(folder, args.output, args.set, _archive_arg(args))))
    if args.name:
        table = rp.load_table(rp.table_path(args.name, folder), args.set, args.output,
                              _archive_arg(args))
        ray = _ray_options(args)
        if not args.table_only:
            if table.spec.unsupported:
                raise FedRecError(f"{args.name}: not runnable here: {table.spec.unsupported}")
            from fedrec.grid import run_grid
            from fedrec.results import is_complete, run_dir_for

            # runs another table or the archive already holds (same computation): not run again
            wanted = (rp.cell_runs(table, args.cells) if args.cells
                      else range(len(table.cfgs)))
            todo = [table.cfgs[i] for i in wanted if i not in table.taken]
            if ray is None:
                check_datasets(todo, args.output)
            done = len(wanted) - len(todo) + sum(is_complete(run_dir_for(c, args.output))
                                                 for c in todo)
            what = (f"the {len(wanted)} runs of the cells asked for" if args.cells
                    else f"{len(wanted)} runs")
            if done < len(wanted):  # a long grid can start here: say so before it does
                print(f"{args.name}: {done} of {what} done, running the other "
                      f"{len(wanted) - done} ({'Ray' if ray else f'--jobs {args.jobs}'}; "
                      "interrupt and resume at will; --table-only prints the table without "
                      "running)", file=sys.stderr, flush=True)
            outcomes = run_grid(todo, output_root=args.output, jobs=args.jobs, ray=ray,
                                progress=not args.no_progress,
                                on_finish=_archiving((args.archive or "") if args.archive_done
                                                     else None))
            for o in outcomes:
                if o.error:
                    print(f"{o.name}: FAILED: {o.error}")
            failed = any(o.error for o in outcomes)
        rep = rp.report_table(table, args.readout)
        if len(rep.done) < len(set(table.dirs)):
            # runs left: estimate them as --list does, from runs of the same cost in any table
            # (load_reports gives every report the pace of every table's runs)
            rep.pace = next((r.pace for r in fmt.load_reports(
                folder, args.output, args.set, _archive_arg(args)).values()
                if not isinstance(r, FedRecError)), {})
        print(fmt.format_heading(rep))
        print(fmt.format_report(rep))
    if args.write_docs:
        from fedrec.reproduce_docs import write_docs

        out = write_docs(args.write_docs, folder, args.output, args.set, plots=not args.no_plots,
                         archive=_archive_arg(args))
        print(f"wrote {out}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_archive(args) -> int:
    from fedrec.archive import archive_runs, default_archive

    done = archive_runs(args.runs, args.to)
    written = sum(1 for _, w in done if w)
    print(f"archived {written} runs ({len(done) - written} already there, unchanged) in "
          f"{args.to or default_archive()}")
    return 0


def _archive_arg(args):
    from fedrec.reproduce import DEFAULT_ARCHIVE

    if args.no_archive:
        return None
    return args.archive or DEFAULT_ARCHIVE


def _paper_dir():
    from fedrec.reproduce import PAPER_DIR

    return PAPER_DIR


def add_grid_commands(sub) -> None:
    """The run, reproduce and archive subcommands, on the CLI's subparsers."""
    r = sub.add_parser("run", help="run an experiment YAML (a grid runs every combination)")
    r.add_argument("experiment")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a YAML key (dotted), e.g. --set train.rounds=100")
    r.add_argument("--output", default=None, help="results root (default: output.dir)")
    r.add_argument("--force", action="store_true", help="rerun runs that are already complete")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--json", action="store_true", help="print the summaries as JSON")
    r.add_argument("--jobs", type=int, default=1,
                   help="run N runs of a grid at once on this machine (each single-process)")
    r.add_argument("--ray", nargs="?", const=None, default=False, metavar="ADDRESS",
                   help="run the grid's runs as Ray tasks: 'auto' (existing cluster), host:port, "
                        "or no value (start a local Ray)")
    r.add_argument("--ray-cpus", type=float, default=None,
                   help="CPUs per run under --ray (default: the YAML's ray.num_cpus)")
    r.add_argument("--ray-gpus", type=float, default=None,
                   help="GPUs per run under --ray (default: the YAML's ray.num_gpus)")
    r.add_argument("--archive", nargs="?", const="", default=None, metavar="DIR",
                   help="archive each run as soon as it completes (as `fedrec archive`), into "
                        "the archive root DIR, as DIR/<output folder's name>/<run> (default: "
                        "$FEDREC_ARCHIVE, else results/): a grid's finished runs survive the "
                        "machine even if this command is killed")
    r.set_defaults(fn=_cmd_run)

    rr = sub.add_parser("reproduce", help="run (or resume) the grid behind a published table "
                                          "and print ours beside the paper's")
    rr.add_argument("name", nargs="?", help="a table: a file stem in experiments/paper/")
    rr.add_argument("--list", action="store_true",
                    help="every table with its state (not run, partial, done, passing)")
    rr.add_argument("--table-only", action="store_true",
                    help="print the table from the runs that exist; run nothing")
    rr.add_argument("--write-docs", nargs="?", const="docs/reproduction.md", default=None,
                    metavar="PATH", help="also write every table, with plots, to PATH "
                                         "(default docs/reproduction.md)")
    rr.add_argument("--no-plots", action="store_true", help="--write-docs without the plots")
    rr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a YAML key for every run (changes the run directories: "
                         "give the same --set to --table-only and --list)")
    rr.add_argument("--output", default=None, help="results root (default: each YAML's output.dir)")
    rr.add_argument("--jobs", type=int, default=1, help="runs at once on this machine")
    rr.add_argument("--ray", nargs="?", const=None, default=False, metavar="ADDRESS",
                    help="run the grid's runs as Ray tasks (as `fedrec run --ray`)")
    rr.add_argument("--ray-cpus", type=float, default=None, help="as `fedrec run --ray-cpus`")
    rr.add_argument("--ray-gpus", type=float, default=None, help="as `fedrec run --ray-gpus`")
    rr.add_argument("--no-progress", action="store_true")
    rr.add_argument("--cells", action="append", default=[], metavar="TEXT",
                    help="run only the runs behind the cells whose label contains TEXT (and "
                         "their reference runs), in the order given; repeatable. The table "
                         "still prints every cell")
    rr.add_argument("--readout", choices=("final", "late"), default="final",
                    help="what a run's metric is: final (its value at the end, as the papers "
                         "read it) or late (the mean of its evaluations after half its rounds: "
                         "less evaluation noise; printed tables say so)")
    rr.add_argument("--tables", default=str(_paper_dir()), help="folder of the paper YAMLs")
    rr.add_argument("--archive", default=None, metavar="DIR",
                    help="where archived runs are looked up for runs missing from the output "
                         "folder (default: $FEDREC_ARCHIVE, else results/; see `fedrec archive`)")
    rr.add_argument("--no-archive", action="store_true",
                    help="ignore archived runs (only runs under the output folder count)")
    rr.add_argument("--archive-done", action="store_true",
                    help="archive each run this command completes, as soon as it completes, "
                         "into the archive above (as `fedrec run --archive`)")
    rr.set_defaults(fn=_cmd_reproduce)

    ar = sub.add_parser("archive", help="keep complete runs in the results archive (config, "
                                        "summary, evaluation rows): small enough to commit")
    ar.add_argument("runs", nargs="*", default=["runs"],
                    help="run directories or folders of them (default: runs)")
    ar.add_argument("--to", default=None, metavar="DIR",
                    help="the archive (default: $FEDREC_ARCHIVE, else results/)")
    ar.set_defaults(fn=_cmd_archive)
