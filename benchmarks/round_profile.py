"""Where a round's time goes: a sampling profile of the in-process runner, as JSON.

    python benchmarks/round_profile.py                               # ML-1M MF, 50 clients/round
    python benchmarks/round_profile.py --experiment experiments/ml1m-ncf.yaml --rounds 400
    python benchmarks/round_profile.py --set server.rule=krum --top 30
    python benchmarks/round_profile.py --experiment experiments/paper/clusterattack-figure2.yaml \
        --run seed=0 --run defense=union+multikrum --run attacker=lie --rounds 40 --warmup 20
                                        # one run of a grid (benchmarks/run_pick.py)

After a warm-up (the first rounds build every sampled device), a CPU-time timer (SIGPROF,
`--interval` ms of this process's CPU) samples the Python stack while `--rounds` rounds run in
one process, evaluation off. Each sample counts once for every distinct function on its stack
("inclusive": the share of the round spent in it or below it) and once for its innermost
function and line ("self"). numpy and torch calls run inside the Python function that made
them, so "self" time of a line is mostly the array work it started. Shares, not seconds: the
machine's load changes seconds, much less the shares. Unlike cProfile, the sampler adds no
cost per call, so small, frequently called functions are not inflated.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # run_pick, this checkout's


class StackSampler:
    """Counts the main thread's Python stack every `interval` seconds of process CPU time."""

    def __init__(self, interval: float, root: str):
        self.interval, self.root = interval, root
        self.inclusive: collections.Counter = collections.Counter()
        self.own: collections.Counter = collections.Counter()
        self.samples = 0

    def _name(self, frame) -> str:
        code = frame.f_code
        path = code.co_filename
        short = path[len(self.root) + 1:] if path.startswith(self.root) else Path(path).name
        return f"{short}:{code.co_qualname if hasattr(code, 'co_qualname') else code.co_name}"

    def _sample(self, signum, frame):
        self.samples += 1
        if frame is None:
            return
        self.own[f"{self._name(frame)}:{frame.f_lineno}"] += 1
        seen = set()
        while frame is not None:
            name = self._name(frame)
            if name not in seen:
                seen.add(name)
                self.inclusive[name] += 1
            frame = frame.f_back

    def __enter__(self):
        signal.signal(signal.SIGPROF, self._sample)
        signal.setitimer(signal.ITIMER_PROF, self.interval, self.interval)
        return self

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, signal.SIG_DFL)


def profile(experiment: str, overrides: list, rounds: int, warmup: int, interval_ms: float,
            top: int, picks=()) -> dict:
    from fedrec.build import build_env
    from fedrec.engine import Engine
    from run_pick import load_run

    cfg = load_run(ROOT / experiment, overrides + ["eval.every=0", "output.progress=false"],
                   list(picks))
    eng = Engine(cfg, env=build_env(cfg), progress=False, workers=1)
    try:
        for r in range(1, warmup + 1):
            eng.run_round(r)
        t0, c0 = time.perf_counter(), time.process_time()
        with StackSampler(interval_ms / 1e3, str(ROOT)) as sampler:
            for r in range(warmup + 1, warmup + rounds + 1):
                eng.run_round(r)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        eng.close()
    n = max(sampler.samples, 1)

    def shares(counter):
        return [{"where": k, "share": round(v / n, 4)} for k, v in counter.most_common(top)]

    return {"experiment": experiment, "run": cfg.output.name, "overrides": overrides,
            "rounds": rounds, "warmup": warmup,
            "load_avg_1min": os.getloadavg()[0], "samples": sampler.samples,
            "interval_ms": interval_ms, "rounds_per_s": rounds / wall,
            "cpu_ms_per_round": 1e3 * cpu / rounds,
            "inclusive": shares(sampler.inclusive), "self": shares(sampler.own)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="experiments/ml1m-mf.yaml")
    p.add_argument("--set", action="append", default=[], help="a YAML override, KEY=VALUE")
    p.add_argument("--run", action="append", default=[], metavar="KEY=VALUE",
                   help="a grid file's run: the one whose labels include every --run given")
    p.add_argument("--rounds", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--interval", type=float, default=0.5, help="ms of CPU time between samples")
    p.add_argument("--top", type=int, default=40, help="entries listed per table")
    args = p.parse_args()
    print(json.dumps(profile(args.experiment, args.set, args.rounds, args.warmup, args.interval,
                             args.top, args.run), indent=1))


if __name__ == "__main__":
    from fedrec.errors import run_script

    run_script(main, "benchmarks/round_profile.py")
