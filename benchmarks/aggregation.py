"""Aggregation cost of every rule, item-level and dense, next to a whole round, as JSON.

    python benchmarks/aggregation.py                       # ML-1M MF, 50 clients per round
    python benchmarks/aggregation.py --set server.rule_f=5 --repeats 9

Realistic uploads: the in-process engine runs the experiment's benign clients for some
warm-up rounds (the first rounds also initialise every sampled user's private state), then
records the RoundUpdates of a few more rounds while timing those rounds with the mean rule.
Every rule then aggregates the same recorded rounds, side by side in one process, so the
JSON shows each rule's time per round and its share of a whole round (target: <= 20%).
Times are medians over rounds x repeats, in milliseconds of wall clock.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RULE_NAMES = ["mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan", "norm_bound"]


def record_rounds(cfg, warmup: int, rounds: int):
    """Run warm-up rounds, then `rounds` more: their RoundUpdates and wall times (ms)."""
    from fedrec.build import build_env
    from fedrec.engine import Engine

    env = build_env(cfg)
    eng = Engine(cfg, env=env, progress=False)
    eng._all_users = list(range(env.data.n_users))
    for r in range(1, warmup + 1):
        eng.run_round(r)
    recorded, round_ms = [], []
    mean_rule = eng.strategy.rule

    def recording_rule(updates):
        recorded.append(updates)
        return mean_rule(updates)

    eng.strategy.rule = recording_rule
    for r in range(warmup + 1, warmup + rounds + 1):
        t0 = time.perf_counter()
        eng.run_round(r)
        round_ms.append(1e3 * (time.perf_counter() - t0))
    return env, recorded, round_ms


def fresh(updates):
    """The same round as the strategy hands it over: uploads stacked (during validation),
    nothing else cached."""
    from strategies.rule import RoundUpdates

    out = RoundUpdates(updates.uploads, updates.weights, updates.n_items, updates.dim,
                       updates.server_round, updates.item_table)
    out.__dict__["stacked"] = updates.stacked
    return out


def time_rule(rule, rounds: list, repeats: int) -> dict:
    times, dropped = [], []
    for updates in rounds:
        rule(fresh(updates))  # warm caches (imports, sorting networks)
        for _ in range(repeats):
            u = fresh(updates)
            t0 = time.perf_counter()
            agg = rule(u)
            times.append(1e3 * (time.perf_counter() - t0))
        dropped.append(len(agg.dropped))
    return {"ms": round(statistics.median(times), 3), "ms_min": round(min(times), 3),
            "dropped_per_round": statistics.mean(dropped),
            "info": {k: v for k, v in agg.info.items() if isinstance(v, (int, float))}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--experiment", default="experiments/ml1m-mf.yaml")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5, help="recorded (and timed) rounds")
    p.add_argument("--repeats", type=int, default=5, help="timings of each rule per round")
    args = p.parse_args()

    from fedrec import config
    from fedrec.registry import make_rule

    cfg = config.load_one(ROOT / args.experiment,
                          args.set + ["eval.every=0", "output.progress=false"])
    env, rounds, round_ms = record_rounds(cfg, args.warmup, args.rounds)
    round_median = statistics.median(round_ms)
    rows = [sum(len(u.item_ids) for u in r.uploads) for r in rounds]
    out = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "platform": platform.platform(), "load_avg": list(os.getloadavg())},
           "experiment": args.experiment, "overrides": args.set,
           "clients_per_round": cfg.train.clients_per_round, "dim": cfg.model.dim,
           "items": env.data.n_items, "rule_f": cfg.server.rule_f,
           "uploaded_rows_per_round": statistics.mean(rows),
           "round_ms_mean_rule": round(round_median, 3),
           "round_ms_all": [round(t, 3) for t in round_ms],
           "rules": {}}
    for name in RULE_NAMES:
        out["rules"][name] = {}
        for granularity in ("item", "dense"):
            over = config.parse_overrides([f"server.rule={name}",
                                           f"server.aggregation={granularity}"])
            rule = make_rule(config.from_dict(config.deep_merge(cfg.to_dict(), over)))
            res = time_rule(rule, rounds, args.repeats)
            res["share_of_round"] = round(res["ms"] / round_median, 4)
            out["rules"][name][granularity] = res
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
