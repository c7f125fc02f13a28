"""`fedrec privacy run EXPERIMENT.yaml`: train with the observer, attack, sweep, report.

The YAML is an ordinary experiment plus a `privacy:` block (keys and defaults: `DEFAULTS`).
One training run (the observer recording, targets forced into their rounds) serves every
sweep: per progress point p, a group of targets observed at t1 = p * rounds, t1 + 1, ...;
per interval D, a group observed at t_early and t_early + D. Each countermeasure is one more
training run, attacked at the early point. Writes results.json, table.md and plots to `out`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fedrec.privacy import baselines as B
from fedrec.privacy.countermeasures import Countermeasure, make_protect
from fedrec.privacy.inversion import AttackConfig, Inversion
from fedrec.privacy.metrics import score
from fedrec.privacy.simulator import relative_l2, round_model, simulate_pairs

DEFAULTS = {
    "targets": 30,  # per group
    "target_seed": 0,
    "max_history": 200,  # targets have at most this many training items (bounds the attack's cost)
    "progress": [0.0, 0.05, 0.25, 0.5, 1.0],  # t1 as a fraction of train.rounds (0 = round 1)
    "progress_k": [1, 3],
    "early": 0.05,  # the early point: k sweep, interval sweep, countermeasures
    "k_sweep": [1, 2, 3, 5],
    "intervals": [10, 50, 100, 230, 500],  # plus 1 (the early progress group)
    "interval_k": [1, 2],
    "baselines": ["random", "sign_split", "sign_split_oracle", "intersection", "imia"],
    "attack": {},  # inversion.AttackConfig fields
    "countermeasures": [],  # countermeasures.Countermeasure fields, one run each
    "countermeasure_k": [1, 3],
    "out": "docs/privacy/run",
}


def _round_of(p: float, rounds: int, span: int) -> int:
    return int(min(max(1, round(p * rounds)), rounds - span + 1))


def plan(cfg, priv, data) -> dict:
    """{group name: {"users": [...], "rounds": [...]}} with disjoint seeded target groups."""
    R = cfg.train.rounds
    kmax = max(max(priv["progress_k"]), max(priv["k_sweep"]))
    groups = {}
    for p in priv["progress"]:
        t1 = _round_of(p, R, kmax)
        groups[f"progress={p:g}"] = {"rounds": list(range(t1, t1 + kmax)), "p": p}
    te = _round_of(priv["early"], R, kmax)
    for d in priv["intervals"]:
        groups[f"interval={d}"] = {"rounds": [te + j * d for j in range(max(priv["interval_k"]))],
                                   "interval": d}
    sizes = np.array([len(data.train_of(u)) for u in range(data.n_users)])
    ok = np.flatnonzero((sizes >= 2) & (sizes <= priv["max_history"]) & ~data.pool_mask)
    rng = np.random.default_rng([int(priv["target_seed"]), 31337])
    chosen = rng.permutation(ok)
    n = int(priv["targets"])
    if len(chosen) < n * len(groups):
        raise ValueError(f"{len(ok)} eligible users for {len(groups)} groups of {n}")
    for i, g in enumerate(groups.values()):
        g["users"] = sorted(int(u) for u in chosen[i * n : (i + 1) * n])
    return groups


def train(cfg, groups, cm=None, progress=False):
    from fedrec.privacy.runner import PrivacyEngine

    forced = {u: g["rounds"] for g in groups.values() for u in g["users"]}
    protect = None if cm is None else make_protect(cm, cfg.seed)
    engine = PrivacyEngine(cfg, targets=list(forced), forced=forced, protect=protect,
                           progress=progress)
    t0 = time.time()
    out = engine.run()
    return engine, out.get("final", {}), time.time() - t0


def _mean_std(rows: list, keys) -> dict:
    out = {}
    for k in keys:
        v = np.array([r[k] for r in rows if k in r and np.isfinite(r[k])], np.float64)
        if len(v):
            out[k] = float(v.mean())
            out[k + "_std"] = float(v.std())
    out["n"] = len(rows)
    return out


KEYS = ("f1", "precision", "recall", "f1@0.5", "auc", "user_cos", "base_rate", "f1_signfree",
        "auc_signfree", "user_cos_abs")


def attack_group(engine, cfg, group, ks, acfg: AttackConfig, baselines, k_baselines=1):
    """{method: {k: summary}} over the group's targets."""
    obs_all, model = engine.observer, engine.env.model
    res: dict = {}
    q = cfg.data.neg_ratio
    for u in group["users"]:
        obs = obs_all.observations(u, group["rounds"])
        if len(obs) < max(ks):
            continue
        truth = engine.truth[(u, obs[0].round)]
        P = truth["train_items"]
        rms = [round_model(model, cfg, obs_all.model_at(o.round), o.item_ids) for o in obs]
        scale = float(np.sqrt(np.mean(obs_all.model_at(obs[0].round)[0] ** 2)))
        n_pos = obs[0].num_examples // q
        for k in ks:
            inv = Inversion(obs[:k], rms[:k], n_pos, acfg, scale)
            r = inv.run(seed=u * 1000 + k)
            res.setdefault("mgradinv", {}).setdefault(k, []).append(
                score(r.candidates, r.scores, P, r.user, truth["user"]))
        for name in baselines:
            if name == "intersection":
                for k in ks:
                    c, s, _ = B.intersection(obs[:k], seed=u)
                    res.setdefault(name, {}).setdefault(k, []).append(score(c, s, P))
                continue
            o, rm = obs[0], rms[0]
            if name == "random":
                c, s, uh = B.random_guess([o], seed=u)
            elif name == "sign_split":
                c, s, uh = B.sign_split(o, rm, n_pos)
            elif name == "sign_split_oracle":
                c, s, uh = B.sign_split(o, rm, n_pos, oracle_labels=np.isin(rm.ids, P))
            elif name == "imia":
                c, s, uh = B.imia(o, rm, n_pos, scale, seed=u)
            else:
                raise ValueError(f"unknown baseline {name!r}")
            res.setdefault(name, {}).setdefault(k_baselines, []).append(
                score(c, s, P, uh, truth["user"] if uh is not None else None))
    return {m: {k: _mean_std(v, KEYS) for k, v in per_k.items()} for m, per_k in res.items()}


def exactness(engine, cfg) -> dict:
    """Relative L2 between every observed target upload and the simulator's upload from the
    true private data (user row before the step, pairs) at the recorded global model."""
    errs = []
    for u, obs in engine.observer.records.items():
        for o in obs:
            t = engine.truth[(u, o.round)]
            rm = round_model(engine.env.model, cfg, engine.observer.model_at(o.round), o.item_ids)
            rows, pred, _ = simulate_pairs(rm, t["user"], t["pos"], t["neg"])
            errs.append(relative_l2(rows, pred, o.item_rows, o.predictor))
    e = np.array(errs)
    return {"uploads": int(len(e)), "max": float(e.max()), "median": float(np.median(e)),
            "mean": float(e.mean())}


def run(path, overrides=None, out=None, progress=False, log=print) -> dict:
    import torch

    from fedrec.config import deep_merge, from_dict, parse_overrides, read_yaml

    torch.set_num_threads(1)
    raw = deep_merge(read_yaml(path), parse_overrides(overrides or []))
    priv = {**DEFAULTS, **(raw.pop("privacy", None) or {})}
    cfg = from_dict(raw, str(Path(path).resolve().parent))
    acfg = AttackConfig(**priv["attack"])
    out = Path(out or priv["out"])
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    from fedrec.build import build_env

    groups = plan(cfg, priv, build_env(cfg).data)
    engine, final, secs = train(cfg, groups, progress=progress)
    log(f"trained {cfg.train.rounds} rounds in {secs:.0f}s: test_hr@10={final.get('test_hr@10')}")
    result = {"config": cfg.to_dict(), "privacy": priv, "attack": asdict(acfg),
              "final": final, "groups": {k: {kk: vv for kk, vv in g.items()}
                                         for k, g in groups.items()}}
    result["exactness"] = exactness(engine, cfg)
    log(f"simulator exactness: {result['exactness']}")
    sweeps: dict = {"progress": {}, "interval": {}, "k": {}}
    early_name = f"progress={priv['early']:g}"
    for name, g in groups.items():
        t0 = time.time()
        if "p" in g:
            ks = sorted(set(priv["progress_k"]) | (set(priv["k_sweep"]) if name == early_name else set()))
            r = attack_group(engine, cfg, g, ks, acfg, priv["baselines"])
            sweeps["progress"][g["p"]] = r
            if name == early_name:
                sweeps["k"] = r
                sweeps["interval"][1] = r
        else:
            r = attack_group(engine, cfg, g, priv["interval_k"], acfg, ["random", "intersection"])
            sweeps["interval"][g["interval"]] = r
        m = r["mgradinv"]
        log(f"{name}: " + ", ".join(f"k={k}: F1 {v['f1']:.3f} AUC {v['auc']:.3f} cos "
                                     f"{v['user_cos']:.3f}" for k, v in sorted(m.items()))
            + f" [{time.time() - t0:.0f}s]")
        _save(out, result, sweeps)
    counter = [{"label": "none", "final": final,
                "attack": {k: sweeps["k"]["mgradinv"][k] for k in priv["countermeasure_k"]
                           if k in sweeps["k"]["mgradinv"]},
                "random": sweeps["k"].get("random", {})}]
    early = {early_name: groups[early_name]}
    for spec in priv["countermeasures"]:
        cm = Countermeasure(**spec)
        t0 = time.time()
        eng, fin, _ = train(cfg, early, cm)
        r = attack_group(eng, cfg, early[early_name], priv["countermeasure_k"], acfg,
                         ["random", "intersection"])
        counter.append({"label": cm.label(), "spec": spec, "final": fin, "attack": r["mgradinv"],
                        "intersection": r["intersection"], "random": r["random"]})
        log(f"{cm.label()}: test_hr@10={fin.get('test_hr@10', float('nan')):.4f} " + ", ".join(
            f"k={k}: F1 {v['f1']:.3f}" for k, v in sorted(r["mgradinv"].items()))
            + f" [{time.time() - t0:.0f}s]")
        result["countermeasures"] = counter
        _save(out, result, sweeps)
    result["countermeasures"] = counter
    result["wall_s"] = time.time() - t_start
    _save(out, result, sweeps)
    from fedrec.privacy.report import write_report

    write_report(out, result)
    return result


def _save(out: Path, result: dict, sweeps: dict):
    result["sweeps"] = sweeps
    (out / "results.json").write_text(json.dumps(result, indent=1, default=_json))


def _json(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
