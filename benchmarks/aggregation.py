"""Aggregation cost of every rule, item-level and dense, next to a whole round, as JSON.

    python benchmarks/aggregation.py                       # ML-1M MF, 50 clients per round
    python benchmarks/aggregation.py --set server.rule_f=5 --repeats 9
    python benchmarks/aggregation.py --only krum,union     # some rules (and the mean)

Realistic uploads: the in-process engine runs the experiment's benign clients for some
warm-up rounds (the first rounds also initialise every sampled user's private state), then
records the RoundUpdates of a few more rounds while timing those rounds with the mean rule.
Every rule then aggregates the same recorded rounds, side by side in one process and
interleaved (each pass times one more engine round, then every rule on every recorded
round, the rule order rotated per pass), so that a change in the machine's load hits rules
and rounds alike. The JSON shows each rule's time per round, its share of a whole round
(target: <= 20%, the ones over it listed in "over_target") and its ratio to the mean rule
of the same form ("x_mean"). The UNION filter (server.filter: union) is timed alone
(around the mean) and around Multi-Krum and norm bound. Times are medians over rounds x
repeats (rounds: over all timed rounds), in milliseconds of wall clock ("ms",
"share_of_round") and of the process's CPU time ("cpu_ms", "cpu_share_of_round": steadier
where other processes load the machine, since time spent waiting for a core is left out).
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RULE_NAMES = ["mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan", "norm_bound"]
# server.filter: union wraps a rule (it drops uploads, the rule aggregates the rest)
FILTERED = {"union": "mean", "union+multikrum": "multikrum", "union+norm_bound": "norm_bound"}


TARGET = 0.2  # the share of a round a rule may take (issue 5)


def record_rounds(cfg, warmup: int, rounds: int):
    """Run warm-up rounds, then `rounds` more: (engine, env, their RoundUpdates, their wall
    and CPU times in ms). The item table and optimizer state of a recorded round are copies (the
    engine runs on)."""
    import copy

    from fedrec.build import build_env
    from fedrec.engine import Engine

    env = build_env(cfg)
    eng = Engine(cfg, env=env, progress=False)
    for r in range(1, warmup + 1):
        eng.run_round(r)
    recorded, round_ms, round_cpu_ms = [], [], []
    mean_rule = eng.strategy.rule

    def recording_rule(updates):
        recorded.append(copy.copy(updates))
        recorded[-1].item_table = np.array(updates.item_table)
        recorded[-1].server_state = copy.deepcopy(updates.server_state)
        return mean_rule(updates)

    eng.strategy.rule = recording_rule
    for r in range(warmup + 1, warmup + rounds + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        eng.run_round(r)
        round_ms.append(1e3 * (time.perf_counter() - t0))
        round_cpu_ms.append(1e3 * (time.process_time() - c0))
    eng.strategy.rule = mean_rule
    return eng, env, recorded, round_ms, round_cpu_ms


def fresh(updates):
    """The same round as the strategy hands it over: uploads stacked (during validation),
    nothing else cached."""
    from strategies.rule import RoundUpdates

    return RoundUpdates(updates.uploads, updates.weights, updates.n_items, updates.dim,
                        updates.server_round, updates.item_table, updates.server_state,
                        stacked_rows=updates.stacked)


def time_rules(rules: dict, rounds: list, repeats: int, eng, round_ms: list,
               round_cpu_ms: list) -> dict:
    """Time every rule on every recorded round, `repeats` times, interleaved (rule by rule
    within each round, the order rotated each pass) so that a change of machine load hits
    all rules alike; before each pass one more engine round is timed into round_ms (wall)
    and round_cpu_ms (CPU time of the process: what a loaded machine's scheduling leaves
    out of the wall clock)."""
    for rule in rules.values():  # warm caches (imports, sorting networks)
        for updates in rounds:
            rule(fresh(updates))
    times = {key: [] for key in rules}
    cpu = {key: [] for key in rules}
    last = {}
    keys = list(rules)
    eng_round = max(u.server_round for u in rounds) + 1
    for rep in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        eng.run_round(eng_round)
        round_ms.append(1e3 * (time.perf_counter() - t0))
        round_cpu_ms.append(1e3 * (time.process_time() - c0))
        eng_round += 1
        for i, updates in enumerate(rounds):
            order = keys[rep % len(keys):] + keys[:rep % len(keys)]
            for key in order:
                u = fresh(updates)
                t0, c0 = time.perf_counter(), time.process_time()
                agg = rules[key](u)
                times[key].append(1e3 * (time.perf_counter() - t0))
                cpu[key].append(1e3 * (time.process_time() - c0))
                last.setdefault(key, {})[i] = agg
    out = {}
    for key, ts in times.items():
        aggs = list(last[key].values())
        out[key] = {"ms": round(statistics.median(ts), 3), "ms_min": round(min(ts), 3),
                    "cpu_ms": round(statistics.median(cpu[key]), 3),
                    "dropped_per_round": statistics.mean(len(a.dropped) for a in aggs),
                    "info": {k: v for k, v in aggs[-1].info.items()
                             if isinstance(v, (int, float))}}
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--experiment", default="experiments/ml1m-mf.yaml")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5, help="recorded (and timed) rounds")
    p.add_argument("--repeats", type=int, default=5,
                   help="timings of each rule per round (and more timed rounds)")
    p.add_argument("--only", default="", help="comma-separated rule labels (default: all)")
    args = p.parse_args()

    from fedrec import config
    from fedrec.registry import make_rule

    cfg = config.load_one(ROOT / args.experiment,
                          args.set + ["eval.every=0", "output.progress=false"])
    eng, env, rounds, round_ms, round_cpu_ms = record_rounds(cfg, args.warmup, args.rounds)
    runs = [(name, name, "none") for name in RULE_NAMES]
    runs += [(label, inner, "union") for label, inner in FILTERED.items()]
    if args.only:
        runs = [r for r in runs if r[0] in {"mean", *args.only.split(",")}]
    rules = {}
    for label, name, filt in runs:
        for granularity in ("item", "dense"):
            over = config.parse_overrides([f"server.rule={name}", f"server.filters=[{filt}]"
                                           if filt != "none" else "server.filters=[]",
                                           f"server.aggregation={granularity}"])
            rules[label, granularity] = make_rule(
                config.from_dict(config.deep_merge(cfg.to_dict(), over)))
    timed = time_rules(rules, rounds, args.repeats, eng, round_ms, round_cpu_ms)
    round_median = statistics.median(round_ms)
    round_cpu = statistics.median(round_cpu_ms)
    rows = [sum(len(u.item_ids) for u in r.uploads) for r in rounds]
    out = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "platform": platform.platform(), "load_avg": list(os.getloadavg())},
           "experiment": args.experiment, "overrides": args.set,
           "workers": eng.workers,  # client processes of the timed rounds ($FEDREC_WORKERS)
           "clients_per_round": cfg.train.clients_per_round, "dim": cfg.model.dim,
           "items": env.data.n_items, "rule_f": cfg.server.rule_f,
           "uploaded_rows_per_round": statistics.mean(rows),
           "round_ms_mean_rule": round(round_median, 3),
           "round_ms_all": [round(t, 3) for t in round_ms],
           "round_cpu_ms": round(round_cpu, 3),
           "rules": {}}
    for (label, granularity), res in timed.items():
        res["share_of_round"] = round(res["ms"] / round_median, 4)
        res["cpu_share_of_round"] = round(res["cpu_ms"] / round_cpu, 4)
        out["rules"].setdefault(label, {})[granularity] = res
    mean = out["rules"]["mean"]
    for res in out["rules"].values():
        for granularity, r in res.items():
            r["x_mean"] = round(r["ms"] / mean[granularity]["ms"], 2)
    out["over_target"] = sorted(f"{label} {g}" for label, res in out["rules"].items()
                                for g, r in res.items() if r["share_of_round"] > TARGET)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
