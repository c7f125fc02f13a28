"""What checkpoints cost on ML-1M MF (issue 10), printed as JSON.

    python benchmarks/checkpoint.py                  # 1500 rounds, FEDREC_WORKERS as usual
    python benchmarks/checkpoint.py --rounds 600 --workers 1

Three figures, measured side by side in one process:
- the checkpoint itself: its size on disk and the wall time of `Engine.state_dict` + the atomic
  write, taken at several points of a run (every device's state grows as users are sampled);
- `fedrec run` rounds/s with the default interval (output.checkpoint_every = 500) against none
  (0), alternating the two runs `--repeat` times (the machine is noisy: compare the medians);
- the rounds lost to a kill: at most checkpoint_every.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def checkpoint_cost(cfg, rounds: int, points: int, workers) -> list:
    from fedrec.checkpoint import save_checkpoint
    from fedrec.engine import Engine

    eng = Engine(cfg, progress=False, workers=workers)
    out = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            marks = {round(rounds * (i + 1) / points) for i in range(points)}
            for r in range(1, rounds + 1):
                eng.run_round(r)
                if r in marks:
                    t0 = time.perf_counter()
                    state = eng.state_dict(r)
                    t1 = time.perf_counter()
                    size = save_checkpoint(tmp, cfg.digest(), r, state)
                    t2 = time.perf_counter()
                    out.append({"round": r, "bytes": size, "devices": len(state["clients"]),
                                "state_s": round(t1 - t0, 4), "write_s": round(t2 - t1, 4),
                                "total_s": round(t2 - t0, 4)})
    finally:
        eng.close()
    return out


def run_speed(cfg, every: int, workers) -> float:
    from fedrec.engine import run_experiment

    cfg.output.checkpoint_every = every
    env_workers = os.environ.get("FEDREC_WORKERS")
    if workers is not None:
        os.environ["FEDREC_WORKERS"] = str(workers)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            s = run_experiment(cfg, output_root=tmp, progress=False, force=True)
    finally:
        if env_workers is None:
            os.environ.pop("FEDREC_WORKERS", None)
        else:
            os.environ["FEDREC_WORKERS"] = env_workers
    return s["rounds_per_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiment", default="experiments/ml1m-mf.yaml")
    p.add_argument("--rounds", type=int, default=1500)
    p.add_argument("--points", type=int, default=3, help="checkpoints timed in the cost run")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()

    from fedrec import config

    def load():
        return config.load_one(ROOT / args.experiment, args.set + [
            f"train.rounds={args.rounds}", "eval.every=0", "output.progress=false"])

    cost = checkpoint_cost(load(), args.rounds, args.points, args.workers)
    default_every = load().output.checkpoint_every
    with_ckpt, without = [], []
    for _ in range(args.repeat):  # alternated: load changes hit both alike
        with_ckpt.append(run_speed(load(), default_every, args.workers))
        without.append(run_speed(load(), 0, args.workers))
    print(json.dumps({
        "experiment": args.experiment, "rounds": args.rounds, "workers": args.workers,
        "load_average": os.getloadavg(), "checkpoints": cost,
        "checkpoint_every": default_every,
        "rounds_per_s_with_checkpoints": with_ckpt, "rounds_per_s_without": without,
        "ratio_median": statistics.median(with_ckpt) / statistics.median(without),
        "rounds_lost_to_a_kill_at_most": default_every,
    }, indent=2))


if __name__ == "__main__":
    from fedrec.errors import run_script

    run_script(main, "benchmarks/checkpoint.py")
