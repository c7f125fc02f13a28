"""`fedrec detector record | train`: the data and the training of the supervised detector.

FedAttack's section 4.4: "we first run an experiment to collect malicious gradients ... we
down-sample the normal gradient samples to form a balanced binary classification. After
obtaining the detection model, we re-run the federated recommendation learning and use it to
detect potential malicious gradients." The defense itself (server.filter: detector) is
strategies/detector.py; it sees only what a server sees.

`record` is evaluation/attack-side tooling: it runs an experiment in the in-process engine,
computes `strategies.detector.upload_features` of the uploads of every `every`-th round (from
the uploads alone, as the filter will) and labels each one with the ground truth
(`fedrec.roles` through `fedrec.build.malicious_set`): 1 = a malicious user's upload in a
round >= attack.start_round (before it malicious clients train honestly).

`train` fits a scikit-learn MLP (standardised features) on a class-balanced sample of the
recorded uploads (the majority class, normally the benign one, is down-sampled) and reports
precision / recall / F1 on held-out rounds: a seeded share of the recorded rounds (whole
rounds, so no round's mean features appear on both sides) that the training never sees.
"""

from __future__ import annotations

import importlib
import json
import math
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np

from fedrec.errors import FedRecError

SKETCH_DEFAULTS = {"item_proj": 16, "dim_proj": 4, "seed": 0}
THRESHOLDS = (0.5, 0.7, 0.9, 0.95, 0.99)


def _detector_module():
    """strategies/detector.py, imported on use (fedrec/ reaches strategies/ lazily)."""
    return importlib.import_module("strategies.detector")


def record_one(cfg, every: int = 1, progress=None, sketch: dict | None = None) -> dict:
    """Run `cfg` in-process and return its recorded features and labels (numpy arrays)."""
    from fedrec.build import build_env, malicious_set
    from fedrec.engine import Engine, auto_workers

    det = _detector_module()
    if "detector" in cfg.server.filter_steps():  # the detector does not exist yet: without it
        print(f"{cfg.name}: recording without the detector filter", file=sys.stderr)
        cfg.server.filters = [s for s in cfg.server.filter_steps() if s != "detector"]
        cfg.server.filter = "none"
    env = build_env(cfg)
    sk = det.FeatureSketch(env.model.n_items, env.model.dim, **{**SKETCH_DEFAULTS, **(sketch or {})})
    recorder = det.FeatureRecorder(sk, every)  # the last step before the rule
    engine = Engine(cfg, progress=progress, env=env, workers=auto_workers(cfg),
                    extra_steps=[recorder])
    model = engine.env.model
    result = engine.run()
    bad = malicious_set(engine.env)
    feats = [np.zeros((0, len(sk.feature_names())), np.float32)]
    labels, rounds, users = [np.zeros(0, np.int8)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for rnd, X, clients in recorder.records:
        u = np.array([int(c) for c in clients], np.int64)
        attacking = rnd >= cfg.attack.start_round and cfg.attack.name != "none"
        feats.append(X)
        labels.append(np.array([attacking and int(x) in bad for x in u], np.int8))
        rounds.append(np.full(len(u), rnd, np.int64))
        users.append(u)
    size = int(sum(np.prod(s) for s in model.predictor_shapes))
    return {"X": np.concatenate(feats), "y": np.concatenate(labels),
            "round": np.concatenate(rounds), "user": np.concatenate(users),
            "sketch": sk.params(), "feature_names": sk.feature_names(), "predictor_size": size,
            "attack": cfg.attack.name, "name": cfg.output.name or cfg.name, "seed": cfg.seed,
            "final": result.get("final", {})}


def save_records(records: list, out) -> dict:
    """Concatenate the runs' records into one .npz; returns its summary."""
    first = records[0]
    for r in records[1:]:
        if r["sketch"] != first["sketch"] or r["predictor_size"] != first["predictor_size"]:
            raise FedRecError(f"{out}: runs of different models cannot share a file "
                              f"(use {{attack}} in --out)")
    run = np.concatenate([np.full(len(r["y"]), i, np.int64) for i, r in enumerate(records)])
    meta = {"sketch": first["sketch"], "predictor_size": first["predictor_size"],
            "feature_names": first["feature_names"],
            "runs": [{k: r[k] for k in ("name", "attack", "seed")} for r in records]}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, X=np.concatenate([r["X"] for r in records]),
                        y=np.concatenate([r["y"] for r in records]),
                        round=np.concatenate([r["round"] for r in records]),
                        user=np.concatenate([r["user"] for r in records]), run=run,
                        meta=np.array(json.dumps(meta)))
    y = np.concatenate([r["y"] for r in records])
    return {"out": str(out), "uploads": int(len(y)), "malicious": int(y.sum()),
            "rounds": int(sum(len(np.unique(r["round"])) for r in records)),
            "features": len(first["feature_names"]), "runs": meta["runs"]}


def record(cfgs, out: str, every: int = 1, progress=None):
    """Record every config (a grid: every run); `{attack}` in `out` gives one file per attack.
    Yields each file's summary once it is written."""
    groups: dict = {}
    for cfg in cfgs:
        groups.setdefault(out.replace("{attack}", cfg.attack.name), []).append(cfg)
    for path, group in groups.items():
        yield save_records([record_one(c, every, progress) for c in group], path)


def load_records(paths) -> dict:
    """The .npz files of `record`, concatenated (they must share the sketch); group = round id."""
    Xs, ys, groups, meta = [], [], [], None
    for i, p in enumerate(paths):
        try:
            with np.load(p) as f:
                X, y, rnd, run = f["X"], f["y"], f["round"], f["run"]
                m = json.loads(str(f["meta"]))
        except (OSError, KeyError, ValueError) as e:
            raise FedRecError(f"{p}: not a `fedrec detector record` file "
                              f"({e.__class__.__name__})") from None
        if meta is not None and (m["sketch"], m["predictor_size"]) != \
                (meta["sketch"], meta["predictor_size"]):
            raise FedRecError(f"{p}: recorded with another model or sketch than {paths[0]}")
        meta = meta or m
        Xs.append(X)
        ys.append(y.astype(np.int64))
        groups.append(np.stack([np.full(len(y), i), run, rnd], axis=1))
    return {"X": np.concatenate(Xs), "y": np.concatenate(ys), "group": np.concatenate(groups),
            "meta": meta}


def balanced_sample(y, rng) -> np.ndarray:
    """Positions of a class-balanced sample: the majority class down-sampled (seeded)."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    k = min(len(pos), len(neg))
    return np.sort(np.concatenate([rng.choice(pos, k, replace=False),
                                   rng.choice(neg, k, replace=False)]))


def scores(y, pred) -> dict:
    """precision / recall / F1 / accuracy of 0/1 predictions, with the counts."""
    tp = int(((pred == 1) & (y == 1)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "accuracy": float((pred == y).mean()) if len(y) else 0.0,
            "positives": int((y == 1).sum()), "negatives": int((y == 0).sum()),
            "tp": tp, "fp": fp, "fn": fn}


def train(paths, out, *, test_fraction: float = 0.2, seed: int = 0, hidden=(64, 32),
          max_iter: int = 500, threshold: float = 0.5) -> dict:
    """Fit the detector on the recordings, pickle it to `out`, return held-out scores."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import roc_auc_score
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if not 0 < test_fraction < 1:
        raise FedRecError(f"--test-fraction: expected a number in (0, 1), got {test_fraction}")
    data = load_records(paths)
    X, y, group = data["X"], data["y"], data["group"]
    if y.sum() == 0 or y.sum() == len(y):
        raise FedRecError(f"{', '.join(map(str, paths))}: the recordings hold "
                          f"{int(y.sum())} malicious uploads of {len(y)}; record an attacked run "
                          f"(attack.name, attack.malicious_fraction > 0)")
    rng = np.random.default_rng([seed, 0x5452])
    uniq, gid = np.unique(group, axis=0, return_inverse=True)
    gid = gid.ravel()
    n_test = max(1, math.ceil(test_fraction * len(uniq))) if len(uniq) > 1 else 0
    test_group = np.zeros(len(uniq), bool)
    test_group[rng.permutation(len(uniq))[:n_test]] = True
    is_test = test_group[gid]
    tr, te = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    if y[tr].sum() == 0 or y[tr].sum() == len(tr):
        raise FedRecError("the training rounds hold a single class; record more rounds "
                          "(--rounds, --every) or lower --test-fraction")
    fit_idx = tr[balanced_sample(y[tr], rng)]
    model = make_pipeline(StandardScaler(), MLPClassifier(
        hidden_layer_sizes=tuple(hidden), alpha=1e-3, max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X[fit_idx], y[fit_idx])
    report = {"train": {"uploads": int(len(tr)), "malicious": int(y[tr].sum()),
                        "balanced_sample": int(len(fit_idx))},
              "threshold": threshold}
    if len(te):
        prob = model.predict_proba(X[te])[:, 1]
        pred = (prob >= threshold).astype(np.int64)
        held = {"rounds": int(n_test), **scores(y[te], pred)}
        # for choosing server.detector_threshold: the balanced training sample makes 0.5 flag
        # too many benign updates when attackers are rare
        held["by_threshold"] = {f"{t:g}": {k: v for k, v in scores(
            y[te], (prob >= t).astype(np.int64)).items() if k in ("precision", "recall", "f1")}
            for t in THRESHOLDS}
        if 0 < y[te].sum() < len(te):
            held["auc"] = float(roc_auc_score(y[te], prob))
            bal = balanced_sample(y[te], rng)  # the paper's balanced view
            held["balanced"] = scores(y[te][bal], pred[bal])
        report["heldout"] = held
    det = {"format": _detector_module().FORMAT, "model": model, "sketch": data["meta"]["sketch"],
           "predictor_size": data["meta"]["predictor_size"],
           "feature_names": data["meta"]["feature_names"], "runs": data["meta"]["runs"],
           "sources": [str(p) for p in paths], "report": report}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(det, f)
    tmp.replace(out)
    return {"out": str(out), **report}
