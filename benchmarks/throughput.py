"""Throughput of the in-process runner, printed as JSON.

    python benchmarks/throughput.py                 # ML-1M MF, 50 clients/round
    python benchmarks/throughput.py --set data.negatives=static --repeat 3
    python benchmarks/throughput.py --workers 1 2 --repeat 3   # worker processes, side by side
    python benchmarks/throughput.py --flwr          # also: seconds/round under `flwr run`
                                                    # against a bare Flower app (flwr_overhead.py)
    python benchmarks/throughput.py --sasrec        # also ML-1M SASRec rows: CPU (1 and 2
                                                    # workers) and, where torch sees one, a GPU

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(experiment: str, overrides: list, rounds: int, warmup: int, workers=None) -> dict:
    from fedrec import config
    from fedrec.build import build_env
    from fedrec.engine import Engine

    cfg = config.load_one(ROOT / experiment, overrides + ["eval.every=0", "output.progress=false"])
    t0 = time.perf_counter()
    env = build_env(cfg)
    load_s = time.perf_counter() - t0
    eng = Engine(cfg, env=env, progress=False, workers=workers)
    try:
        for r in range(1, warmup + 1):
            eng.run_round(r)
        t0 = time.perf_counter()
        for r in range(warmup + 1, warmup + rounds + 1):
            eng.run_round(r)
        dt = time.perf_counter() - t0
    finally:
        eng.close()
    return {"experiment": experiment, "overrides": overrides, "workers": eng.workers,
            "rounds": rounds, "rounds_per_s": rounds / dt, "ms_per_round": 1e3 * dt / rounds,
            "data_load_s": load_s, "users": env.data.n_users, "items": env.data.n_items,
            "clients_per_round": cfg.train.clients_per_round}


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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--experiment", default="experiments/ml1m-mf.yaml")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--rounds", type=int, default=600)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--repeat", type=int, default=1, help="measure the same setting N times")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="worker processes to compare, e.g. 1 2 (default: $FEDREC_WORKERS, else 1)")
    p.add_argument("--flwr", action="store_true", help="also run benchmarks/flwr_overhead.py")
    p.add_argument("--sasrec", action="store_true",
                   help="also time experiments/ml1m-sasrec.yaml on the CPU and, if any, the GPU")
    p.add_argument("--sasrec-rounds", type=int, default=40)
    p.add_argument("--sasrec-warmup", type=int, default=5,
                   help="SASRec keeps no per-user state to initialise: a short warm-up suffices")
    args = p.parse_args()
    out = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "platform": platform.platform()}, "in_process": []}
    for _ in range(args.repeat):  # settings interleaved, so drifting load hits all alike
        for w in args.workers or [None]:
            out["in_process"].append(measure(args.experiment, args.set, args.rounds, args.warmup, w))
    if args.sasrec:
        out["sasrec"] = sasrec_rows(args.sasrec_rounds, args.sasrec_warmup, args.repeat, args.set)
    if args.flwr:
        res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "flwr_overhead.py")],
                             capture_output=True, text=True, cwd=ROOT)
        try:
            out["flwr"] = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out["flwr"] = {"error": res.stderr[-2000:]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
