"""The arithmetic UNION's exact uniformity statistic cannot avoid, on recorded rounds, as JSON.

    python benchmarks/union_floor.py                     # ML-1M MF, 50 clients per round
    python benchmarks/union_floor.py --contrastive 1.0   # with UNION's client-side term

For each recorded round: the U distinct items among s = server.union_sample_items ids drawn
with replacement, each client's own rows among them (K_c; K = sum), the distances the
statistic needs (sum_c K_c (U - K_c) + K_c^2 / 2: a client's rows against the common rows
it did not send and against each other; strategies/uniformity.py), and the time of one
float64 product of (K x (d + 2)) Gram factors by ((d + 2) x U) with its square roots and
nothing else, and that time scaled to the distances needed ("floor_ms"): a floor under
UNION's cost, to set against `aggregation.py`'s round
("budget_ms": 20% of the round with the mean rule, as issue 11's target).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def needed_distances(ids, owner, sampled, n_clients: int):
    """(U, K, distances) for one round: U distinct sampled items, K the (client, sampled
    item) rows uploaded, and the distances the statistic computes beyond the common ones:
    sum_c K_c (U - K_c) (client c's rows against the sampled rows it did not send) +
    K_c^2 // 2 (its rows against each other)."""
    own = np.bincount(owner[np.isin(ids, sampled)], minlength=n_clients)
    U = len(sampled)
    return U, int(own.sum()), int((own * (U - own)).sum() + (own * own).sum() // 2)


def main():
    from aggregation import TARGET, record_rounds

    from fedrec import config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="experiments/ml1m-mf.yaml")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--contrastive", type=float, default=0.0,
                   help="train.contrastive_alpha for the recorded rounds")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    sets = list(args.set) + ([f"train.contrastive_alpha={args.contrastive}"]
                             if args.contrastive else [])
    cfg = config.load_one(ROOT / args.experiment,
                          sets + ["eval.every=0", "output.progress=false"])
    eng, _, rounds, _, _ = record_rounds(cfg, args.warmup, args.rounds)
    # the round's cost as aggregation.py takes it: rounds after the recorded ones (the first
    # rounds also initialise every sampled user's private state)
    round_cpu_ms = []
    for rnd in range(args.warmup + args.rounds + 1, args.warmup + args.rounds + 1 + args.repeats):
        c0 = time.process_time()
        eng.run_round(rnd)
        round_cpu_ms.append(1e3 * (time.process_time() - c0))
    s = cfg.server.union_sample_items
    rng = np.random.default_rng(0)
    out = []
    for u in rounds:
        ids, _, owner = u.stacked
        sampled = np.unique(rng.integers(0, u.n_items, s))
        U, K, needed = needed_distances(ids, owner, sampled, len(u))
        left = rng.standard_normal((K, u.dim + 2))
        right = rng.standard_normal((u.dim + 2, U))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            np.sqrt(np.abs(left @ right))
            times.append(1e3 * (time.perf_counter() - t0))
        out.append({"round": int(u.server_round), "distinct_sampled": U, "own_rows": K,
                    "distances": needed, "product_and_roots_ms": round(min(times), 3),
                    # the K x U product computes more distances than needed (a client's
                    # rows against the columns it sent too): at the same rate per distance
                    "floor_ms": round(min(times) * needed / max(K * U, 1), 3)})
    round_cpu = statistics.median(round_cpu_ms)
    print(json.dumps({"experiment": args.experiment, "sample_items": s,
                      "contrastive_alpha": cfg.train.contrastive_alpha,
                      "round_cpu_ms": round(round_cpu, 3),
                      "budget_ms": round(TARGET * round_cpu, 3), "rounds": out}, indent=1))


if __name__ == "__main__":
    from fedrec.errors import run_script

    run_script(main, "benchmarks/union_floor.py")
