"""Throughput of the in-process runner, printed as JSON.

    python benchmarks/throughput.py                 # ML-1M MF, 50 clients/round
    python benchmarks/throughput.py --set data.negatives=static --repeat 3
    python benchmarks/throughput.py --workers 1 2 auto --repeat 3
                                                    # worker processes side by side; auto =
                                                    # what `fedrec run` picks (auto_workers)
    python benchmarks/throughput.py --flwr          # also: seconds/round under `flwr run`
                                                    # against a bare Flower app (flwr_overhead.py)
    python benchmarks/throughput.py --sasrec        # also ML-1M SASRec rows: CPU (1 and 2
                                                    # workers) and, where torch sees one, a GPU
    python benchmarks/throughput.py --experiment experiments/paper/clusterattack-figure2.yaml \
        --run seed=0 --run defense=norm_bound --run attacker=lie --rounds 100 --warmup 30 \
        --baseline /tmp/fedrec-old --workers 1 --repeat 2
                                                    # one run of a grid (benchmarks/run_pick.py),
                                                    # old and new code interleaved
    python benchmarks/throughput.py --ncf --baseline /tmp/fedrec-old --workers 1
                                                    # also ML-1M NCF (FedAttack's setting, 16
                                                    # clients/round); every row also timed on
                                                    # another checkout of fedrec, interleaved;
                                                    # "old_vs_new" sums up the ratios

Rounds are timed after a warm-up (the first rounds initialise every sampled user's private
state), with evaluation off. Compare settings (--set) within one invocation or one session: the
machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# the checkout whose fedrec is timed: this one, or --baseline's (set for its subprocess)
ROOT = Path(os.environ.get("FEDREC_BENCH_ROOT", Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # run_pick, this checkout's


def measure(experiment: str, overrides: list, rounds: int, warmup: int, workers=None,
            picks=()) -> dict:
    from fedrec.build import build_env
    from fedrec.engine import Engine
    from run_pick import load_run

    cfg = load_run(ROOT / experiment, overrides + ["eval.every=0", "output.progress=false"],
                   list(picks))
    chosen = workers
    if workers == "auto":  # decided before this process starts any work of its own
        from fedrec.engine import auto_workers

        workers = auto_workers(cfg)
    t0 = time.perf_counter()
    env = build_env(cfg)
    load_s = time.perf_counter() - t0
    eng = Engine(cfg, env=env, progress=False, workers=workers)
    try:
        for r in range(1, warmup + 1):
            eng.run_round(r)
        pids = [p.pid for p in eng.pool().procs] if eng.workers > 1 else []
        t0, c0, k0 = time.perf_counter(), cpu_seconds(pids), kernel_counts(pids)
        for r in range(warmup + 1, warmup + rounds + 1):
            eng.run_round(r)
        dt, cpu = time.perf_counter() - t0, cpu_seconds(pids) - c0
        faults, sys_s = (b - a for a, b in zip(k0, kernel_counts(pids)))
    finally:
        eng.close()
    import fedrec

    return {"experiment": experiment, "run": cfg.output.name,
            "fedrec": str(Path(fedrec.__file__).parents[1]), "overrides": overrides, "workers": eng.workers, "workers_asked": chosen,
            "load_avg_1min": os.getloadavg()[0],
            "rounds": rounds, "rounds_per_s": rounds / dt, "ms_per_round": 1e3 * dt / rounds,
            # CPU time of this process and its workers: on a shared machine the wall time
            # mostly measures the other jobs, this the work a round costs
            "cpu_ms_per_round": 1e3 * cpu / rounds,
            # the kernel's share of it: fresh pages faulted in (a round's big temporaries
            # mapped anew each time cost a third of some paper-protocol rounds' CPU)
            "page_faults_per_round": faults / rounds, "sys_ms_per_round": 1e3 * sys_s / rounds,
            "data_load_s": load_s, "users": env.data.n_users, "items": env.data.n_items,
            "clients_per_round": cfg.train.clients_per_round}


def kernel_counts(pids) -> tuple:
    """(minor page faults, system CPU seconds) so far of this process and the processes
    `pids` (Linux /proc for those)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    faults, sys_s = ru.ru_minflt, ru.ru_stime
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        faults += int(fields[7])
        sys_s += int(fields[12]) / os.sysconf("SC_CLK_TCK")
    return faults, sys_s


def cpu_seconds(pids) -> float:
    """CPU seconds used so far by this process and by the processes `pids` (Linux /proc;
    10 ms resolution for those)."""
    total = time.process_time()
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def measure_at(root, experiment: str, overrides: list, rounds: int, warmup: int, workers=None,
               picks=()) -> dict:
    """`measure` here (root None) or, in a subprocess, with fedrec imported from checkout `root`."""
    if root is None:
        return {**measure(experiment, overrides, rounds, warmup, workers, picks), "code": "this"}
    cmd = [sys.executable, __file__, "--experiment", experiment, "--rounds", str(rounds),
           "--warmup", str(warmup)] + [a for o in overrides for a in ("--set", o)] + \
        [a for o in picks for a in ("--run", o)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=root,
                         env={**os.environ, "FEDREC_BENCH_ROOT": str(root)})
    try:
        row = json.loads(res.stdout)["in_process"][0]
    except (ValueError, KeyError, IndexError):
        row = {"experiment": experiment, "error": res.stderr[-2000:]}
    return {**row, "code": str(root), "workers_asked": workers}


def ncf_rows(rounds: int, warmup: int, repeat: int, overrides: list, workers, baseline) -> list:
    """ML-1M NCF in FedAttack's setting (experiments/ml1m-ncf.yaml: 16 clients/round, d=64),
    this checkout and --baseline's alternately, so that drifting load hits both alike."""
    roots = [None] + ([baseline] if baseline else [])
    return [measure_at(root, "experiments/ml1m-ncf.yaml", overrides, rounds, warmup, w)
            for _ in range(repeat) for w in workers or [None] for root in roots]


def sasrec_rows(rounds: int, warmup: int, repeat: int, overrides: list) -> list:
    """ML-1M SASRec (50 clients/round, 2 blocks, d=64, max_len 200): CPU with 1 and 2 worker
    processes, and CUDA (one process) where torch sees a GPU."""
    import torch

    exp = "experiments/ml1m-sasrec.yaml"
    settings = [("cpu", 1), ("cpu", 2)]
    if torch.cuda.is_available():
        settings.append(("cuda", 1))
    rows = []
    # CPU settings interleaved (drifting load hits all alike); the GPU last, so that no worker
    # is forked from a process that has initialised CUDA
    order = [s for _ in range(repeat) for s in settings if s[0] == "cpu"] + \
        [s for _ in range(repeat) for s in settings if s[0] == "cuda"]
    for device, workers in order:
        row = measure(exp, overrides + [f"model.device={device}"], rounds, warmup, workers)
        row["device"] = device
        if device == "cuda":
            row["gpu"] = torch.cuda.get_device_name(0)
        rows.append(row)
    return rows


def _workers(text: str):
    return text if text == "auto" else int(text)


def old_vs_new(rows: list, baseline: str) -> list:
    """Per experiment and worker setting: median rounds/s of this checkout and of the
    baseline (timed interleaved), and their ratio."""
    from statistics import median

    groups: dict = {}
    for r in rows:
        if "rounds_per_s" in r:
            key = (r["experiment"], str(r.get("workers_asked", r.get("workers"))))
            side = "old" if r["code"] == str(baseline) else "new"
            g = groups.setdefault(key, {"old": [], "new": [], "old_cpu": [], "new_cpu": []})
            g[side].append(r["rounds_per_s"])
            if "cpu_ms_per_round" in r:
                g[side + "_cpu"].append(r["cpu_ms_per_round"])
    out = []
    for (exp, workers), g in groups.items():
        m = {k: median(v) if v else None for k, v in g.items()}
        out.append({"experiment": exp, "workers": workers, "old_rounds_per_s": m["old"],
                    "new_rounds_per_s": m["new"],
                    "speedup": m["new"] / m["old"] if m["old"] and m["new"] else None,
                    "old_cpu_ms_per_round": m["old_cpu"], "new_cpu_ms_per_round": m["new_cpu"],
                    "cpu_speedup": m["old_cpu"] / m["new_cpu"] if m["old_cpu"] and m["new_cpu"] else None,
                    "runs": len(g["new"])})
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--experiment", default="experiments/ml1m-mf.yaml")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--run", action="append", default=[], metavar="KEY=VALUE",
                   help="a grid file's run: the one whose labels include every --run given "
                        "(benchmarks/run_pick.py)")
    p.add_argument("--rounds", type=int, default=600)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--repeat", type=int, default=1, help="measure the same setting N times")
    p.add_argument("--workers", type=_workers, nargs="+", default=None,
                   help="worker processes to compare, e.g. 1 2 auto (auto: what `fedrec run` "
                        "picks; default: $FEDREC_WORKERS, else 1)")
    p.add_argument("--flwr", action="store_true", help="also run benchmarks/flwr_overhead.py")
    p.add_argument("--sasrec", action="store_true",
                   help="also time experiments/ml1m-sasrec.yaml on the CPU and, if any, the GPU")
    p.add_argument("--ncf", action="store_true",
                   help="also time experiments/ml1m-ncf.yaml (16 clients/round)")
    p.add_argument("--ncf-rounds", type=int, default=300)
    p.add_argument("--ncf-warmup", type=int, default=20)
    p.add_argument("--baseline", default=None,
                   help="another checkout of fedrec (e.g. `git worktree add /tmp/old main`): "
                        "each in-process and --ncf row is also timed with its code")
    p.add_argument("--sasrec-rounds", type=int, default=40)
    p.add_argument("--sasrec-warmup", type=int, default=5,
                   help="SASRec keeps no per-user state to initialise: a short warm-up suffices")
    args = p.parse_args()
    out = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "platform": platform.platform(), "load_avg_before": os.getloadavg()},
           "in_process": []}
    roots = [None] + ([args.baseline] if args.baseline else [])
    for _ in range(args.repeat):  # settings interleaved, so drifting load hits all alike
        for w in args.workers or [None]:
            for root in roots:
                out["in_process"].append(measure_at(root, args.experiment, args.set, args.rounds,
                                                    args.warmup, w, args.run))
    if args.ncf:
        out["ncf"] = ncf_rows(args.ncf_rounds, args.ncf_warmup, args.repeat, args.set,
                              args.workers, args.baseline)
    if args.sasrec:
        out["sasrec"] = sasrec_rows(args.sasrec_rounds, args.sasrec_warmup, args.repeat, args.set)
    if args.baseline:
        out["old_vs_new"] = old_vs_new(out["in_process"] + out.get("ncf", []), args.baseline)
    if args.flwr:
        res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "flwr_overhead.py")],
                             capture_output=True, text=True, cwd=ROOT)
        try:
            out["flwr"] = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out["flwr"] = {"error": res.stderr[-2000:]}
    out["machine"]["load_avg_after"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    try:
        from fedrec.errors import run_script
    except ImportError:  # a --baseline checkout older than run_script: plain tracebacks there
        main()
    else:
        run_script(main, "benchmarks/throughput.py")
