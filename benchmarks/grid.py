"""Wall time of a small 4-run grid with `fedrec run --jobs 1` and `--jobs 2`, side by side, as JSON.

    python benchmarks/grid.py                 # 4 runs (2 seeds x 2 learning rates), ~2 minutes
    python benchmarks/grid.py --rounds 500    # shorter runs (setup and process start weigh more)

Each grid runs through the command line in a fresh process, into its own output dir, after a
one-round warm-up run has written the synthetic data cache both grids read. Cohorts are
small (8 clients), so each run is single-process under --jobs 1 as well: the ratio measures
running runs side by side, not a change in workers per run. "same_results" compares the two
grids' final metrics run by run. Target on the 2-core machine: ratio >= 1.7.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GRID_YAML = """
name: bench-grid
data:
  dataset: synthetic
  synthetic: {{n_users: 400, n_items: 600, mean_history: 20}}
  cache_dir: {cache}
model: {{dim: 32}}
train: {{rounds: {rounds}, clients_per_round: 8}}
eval: {{every: 0}}
output: {{progress: false}}
"""
GRID = "grid:\n  seed: [0, 1]\n  server.lr: [0.01, 0.02]\n"


def fedrec(*args: str) -> float:
    """Run `python -m fedrec ARGS`; its wall seconds."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedrec", *args], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def finals(runs: Path) -> dict:
    """Final metrics per run, keyed by the run name without its config digest."""
    return {d.name.rsplit("-", 1)[0]: json.loads((d / "summary.json").read_text())["final"]
            for d in sorted(runs.iterdir())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4000, help="rounds per run (a round takes ~5 ms here)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one_run = GRID_YAML.format(cache=tmp / "cache", rounds=args.rounds)
        (tmp / "warmup.yaml").write_text(one_run)
        yaml = tmp / "grid.yaml"
        yaml.write_text(one_run + GRID)
        fedrec("run", str(tmp / "warmup.yaml"), "--no-progress", "--output", str(tmp / "warmup"),
               "--set", "train.rounds=1")
        walls = {jobs: fedrec("run", str(yaml), "--no-progress", "--output", str(tmp / f"jobs{jobs}"),
                              "--jobs", str(jobs)) for jobs in (1, 2)}
        same = finals(tmp / "jobs1") == finals(tmp / "jobs2")
    print(json.dumps({"runs": 4, "rounds_per_run": args.rounds, "cpus": os.cpu_count(),
                      "wall_s_jobs1": round(walls[1], 2), "wall_s_jobs2": round(walls[2], 2),
                      "ratio": round(walls[1] / walls[2], 3), "same_results": same}, indent=2))


if __name__ == "__main__":
    from fedrec.errors import run_script

    run_script(main, "benchmarks/grid.py")
