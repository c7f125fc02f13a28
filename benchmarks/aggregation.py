"""Aggregation cost of every rule, item-level and dense, next to a whole round, as JSON.

    python benchmarks/aggregation.py                       # ML-1M MF, 50 clients per round
    python benchmarks/aggregation.py --set server.rule_f=5 --repeats 9
    python benchmarks/aggregation.py --only krum,union     # some rules (and the mean)
    python benchmarks/aggregation.py --baseline HEAD~3     # also the rules of a git revision

Realistic uploads: the in-process engine runs the experiment's benign clients for some
warm-up rounds (the first rounds also initialise every sampled user's private state), then
records the RoundUpdates of a few more rounds while timing those rounds with the mean rule.
Every rule then aggregates the same recorded rounds, side by side in one process and
interleaved (each pass times one more engine round, then every rule on every recorded
round, in a fresh seeded random order each time), so that a change in the machine's load hits rules
and rounds alike. The JSON shows each rule's time per round, its share of a whole round
(target: <= 20%, the ones over it listed in "over_target") and its ratio to the mean rule
of the same form ("x_mean"). The UNION filter (server.filter: union) is timed alone
(around the mean) and around Multi-Krum and norm bound, on these rounds and, under
"contrastive", on rounds recorded with UNION's client-side contrastive term
(train.contrastive_alpha = CONTRASTIVE_ALPHA unless the experiment sets one: every upload
then touches about half the sampled items), against the time of such a round; UNION's
target is judged there. --baseline REF loads the strategies/ package of git revision REF
under another name and times its rules interleaved with the current ones ("baseline" in
each entry). Times are medians over rounds x repeats (rounds: over all timed rounds), in
milliseconds of wall clock ("ms", "share_of_round") and of the process's CPU time
("cpu_ms", "cpu_share_of_round": steadier where other processes load the machine, since
time spent waiting for a core is left out).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RULE_NAMES = ["mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan", "norm_bound"]
# server.filter: union wraps a rule (it drops uploads, the rule aggregates the rest)
FILTERED = {"union": "mean", "union+multikrum": "multikrum", "union+norm_bound": "norm_bound"}


TARGET = 0.2  # the share of a round a rule may take (issues 5 and 11)
CONTRASTIVE_ALPHA = 1.0  # UNION's client-side term in the contrastive rounds (the reference's)
BASELINE = "baseline_strategies"  # the module name of the --baseline revision's strategies/


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
    within each round, in a seeded random order drawn anew each time: a rotated order kept
    every rule behind the same predecessor, whose cache footprint then biased it by up to
    ~20% against its baseline twin) so that a change of machine load hits
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
    shuffle = np.random.default_rng(0)
    eng_round = max(u.server_round for u in rounds) + 1
    for rep in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        eng.run_round(eng_round)
        round_ms.append(1e3 * (time.perf_counter() - t0))
        round_cpu_ms.append(1e3 * (time.process_time() - c0))
        eng_round += 1
        for i, updates in enumerate(rounds):
            order = [keys[j] for j in shuffle.permutation(len(keys))]
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


def load_baseline(ref: str) -> str:
    """Extract strategies/ of git revision `ref` into a temporary directory as the package
    BASELINE (its imports of strategies.* renamed), importable from then on."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "strategies"],
                         capture_output=True, check=True).stdout
    tmp = Path(tempfile.mkdtemp(prefix="fedrec-baseline-"))
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(tmp, filter="data")
    (tmp / "strategies").rename(tmp / BASELINE)
    for py in (tmp / BASELINE).glob("*.py"):
        text = py.read_text()
        py.write_text(text.replace("from strategies.", f"from {BASELINE}.")
                      .replace("import strategies.", f"import {BASELINE}."))
    sys.path.insert(0, str(tmp))
    return ref


def build_rule(cfg, overrides: list, package: str = "strategies"):
    """The experiment's aggregation with `overrides`, from `package` (strategies or
    BASELINE: the registry's class paths redirected there)."""
    from fedrec import config, registry

    merged = config.from_dict(config.deep_merge(cfg.to_dict(), config.parse_overrides(overrides)))
    if package == "strategies":
        return registry.make_rule(merged)
    load_class = registry.load_class
    registry.load_class = lambda spec: load_class(spec.replace("strategies.", f"{package}.", 1))
    try:
        rule = registry.make_rule(merged)
    finally:
        registry.load_class = load_class
    if hasattr(rule, "steps"):  # the chain itself from the same package
        rule = registry.load_class(f"{package}.rule:FilterChain")(rule.steps, rule.rule)
    return rule


def rule_overrides(name: str, filt: str, granularity: str) -> list:
    return [f"server.rule={name}",
            f"server.filters=[{filt}]" if filt != "none" else "server.filters=[]",
            f"server.aggregation={granularity}"]


def timed_section(cfg, runs, args, packages) -> dict:
    """Record rounds of `cfg`, time `runs` (label, rule, filter) in both forms and every
    package on them, interleaved with rounds: the section of the JSON."""
    eng, env, rounds, round_ms, round_cpu_ms = record_rounds(cfg, args.warmup, args.rounds)
    rules = {(label, granularity, package): build_rule(cfg, rule_overrides(name, filt,
                                                                         granularity), package)
             for label, name, filt in runs for granularity in ("item", "dense")
             for package in packages}
    timed = time_rules(rules, rounds, args.repeats, eng, round_ms, round_cpu_ms)
    round_median = statistics.median(round_ms)
    round_cpu = statistics.median(round_cpu_ms)
    rows = [sum(len(u.item_ids) for u in r.uploads) for r in rounds]
    out = {"workers": eng.workers,  # client processes of the timed rounds ($FEDREC_WORKERS)
           "contrastive_alpha": cfg.train.contrastive_alpha, "items": env.data.n_items,
           "uploaded_rows_per_round": statistics.mean(rows),
           "round_ms_mean_rule": round(round_median, 3),
           "round_ms_all": [round(t, 3) for t in round_ms],
           "round_cpu_ms": round(round_cpu, 3),
           "rules": {}}
    for (label, granularity, package), res in timed.items():
        res["share_of_round"] = round(res["ms"] / round_median, 4)
        res["cpu_share_of_round"] = round(res["cpu_ms"] / round_cpu, 4)
        entry = out["rules"].setdefault(label, {})
        if package == "strategies":
            entry[granularity] = {**res, **entry.get(granularity, {})}
        else:
            entry.setdefault(granularity, {})["baseline"] = res
    mean = out["rules"].get("mean")
    for res in out["rules"].values():
        for granularity, r in res.items():
            if mean:
                r["x_mean"] = round(r["ms"] / mean[granularity]["ms"], 2)
            if "baseline" in r:
                r["x_baseline"] = round(r["cpu_ms"] / r["baseline"]["cpu_ms"], 3)
    return out


def over_target(section: dict, labels) -> list:
    return sorted(f"{label} {g}" for label, res in section["rules"].items() if label in labels
                  for g, r in res.items() if r["share_of_round"] > TARGET)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--experiment", default="experiments/ml1m-mf.yaml")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5, help="recorded (and timed) rounds")
    p.add_argument("--repeats", type=int, default=5,
                   help="timings of each rule per round (and more timed rounds)")
    p.add_argument("--only", default="", help="comma-separated rule labels (default: all)")
    p.add_argument("--baseline", default="",
                   help="a git revision whose strategies/ are timed next to the current ones")
    args = p.parse_args()

    from fedrec import config

    cfg = config.load_one(ROOT / args.experiment,
                          args.set + ["eval.every=0", "output.progress=false"])
    packages = ["strategies"] + ([BASELINE] if args.baseline else [])
    if args.baseline:
        load_baseline(args.baseline)
    runs = [(name, name, "none") for name in RULE_NAMES]
    union_runs = [(label, inner, "union") for label, inner in FILTERED.items()]
    if args.only:
        wanted = {"mean", *args.only.split(",")}
        runs = [r for r in runs if r[0] in wanted]
        union_runs = [r for r in union_runs if r[0] in wanted]
    out = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "platform": platform.platform(), "load_avg": list(os.getloadavg())},
           "experiment": args.experiment, "overrides": args.set, "baseline": args.baseline,
           "clients_per_round": cfg.train.clients_per_round, "dim": cfg.model.dim,
           "rule_f": cfg.server.rule_f}
    out.update(timed_section(cfg, runs + union_runs, args, packages))
    over = over_target(out, {label for label, _, _ in runs})
    if union_runs:
        alpha = cfg.train.contrastive_alpha or CONTRASTIVE_ALPHA
        contrastive = config.from_dict(config.deep_merge(
            cfg.to_dict(), config.parse_overrides([f"train.contrastive_alpha={alpha}"])))
        out["contrastive"] = timed_section(contrastive, [("mean", "mean", "none")] + union_runs,
                                           args, packages)
        over += over_target(out["contrastive"], {label for label, _, _ in union_runs})
    out["over_target"] = over
    out["machine"]["load_avg_after"] = list(os.getloadavg())
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    from fedrec.errors import run_script

    run_script(main, "benchmarks/aggregation.py")
