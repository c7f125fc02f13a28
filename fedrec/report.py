"""`fedrec report`: per-run rows, the drop against the matching clean run, means over seeds.

The matching clean run of an attacked run has the same config (defense, seed and all) except
the `attack` section, whose name is `none`. The relative drop is (clean - attacked) / clean,
in percent (positive = the attack hurt): `drop_*`. Under a defense, `drop0_*` is the drop
against the run with neither attack nor defense (same seed; ClusterAttack's Figure 2 and
Table 3 use that reference), so a defense's own cost on clean runs shows there too. Runs of one setting that differ only in `seed` are
summarised as mean and (population) standard deviation.

The drops read each run's final evaluation (readout "final", the papers' reading), or with
readout "late" the mean of its evaluations after half its rounds, both runs of a pair over the
same rounds (`fedrec.plots.late_mean`: less evaluation noise, not the papers' reading).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import yaml

from fedrec.results import find_runs, load_summary

METRICS = ("test_hr@5", "test_ndcg@5", "test_hr@10", "test_ndcg@10", "test_er@5", "test_er@10",
           "test_er_users")
# targeted attacks: the area under the test ER@5 curve (fedrec.targets; `er_auc`)
ER_CURVE = "test_er@5"


def er_reach(run_dir, level: float = 0.95, metric: str = ER_CURVE, start: int = 1):
    """The first evaluated round from `start` on where `metric` is at least `level` (None if
    none)."""
    from fedrec.plots import read_curve

    try:
        xs, ys = read_curve(run_dir, metric)
    except OSError:
        return None
    return next((x for x, y in zip(xs, ys) if x >= start and y >= level), None)


def er_auc(run_dir, metric: str = ER_CURVE, start: int = 1):
    """The mean of `metric` over the rounds from `start` to the last evaluated one (the
    trapezoid area under its curve divided by the span; None without two points)."""
    from fedrec.plots import read_curve

    try:
        xs, ys = read_curve(run_dir, metric)
    except OSError:
        return None
    pts = [(x, y) for x, y in zip(xs, ys) if x >= start]
    if len(pts) < 2:
        return None
    area = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(pts, pts[1:]))
    return area / (pts[-1][0] - pts[0][0])
DROPS = ("test_hr@5", "test_ndcg@5", "test_hr@10")
DETECTION = ("det_precision", "det_recall", "det_f1")  # plus det_<stage>_precision/recall per filter


def _hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _config(run_dir) -> dict:
    """The run's resolved config, over today's defaults (so runs written before a key existed
    group with runs that carry that key at its default)."""
    from fedrec.config import ExperimentConfig, deep_merge

    try:
        raw = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    except OSError:
        return {}
    return deep_merge(ExperimentConfig().to_dict(), raw)


def clean_key(cfg: dict) -> str:
    """Identifies the clean counterpart: the config without its attack and output sections."""
    d = {k: v for k, v in cfg.items() if k not in ("attack", "output", "name")}
    return _hash(d)


_DEFENSE_KEYS = {"server": ("rule", "rule_f", "multikrum_m", "norm_bound", "filter", "filters",
                             "union_sample_items",
                             "union_gap_b", "union_expected_attackers"),
                  "train": ("contrastive_alpha", "contrastive_negatives", "contrastive_dropout")}


def undefended_key(cfg: dict) -> str:
    """Identifies the run with neither attack nor defense (rule mean, no filter, no
    contrastive term): the reference of ClusterAttack's Figure 2 / Table 3 drops."""
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()
         if k not in ("attack", "output", "name")}
    for section, keys in _DEFENSE_KEYS.items():
        for k in keys:
            d.get(section, {}).pop(k, None)
    return _hash(d)


def filter_steps(server: dict) -> list:
    """The pre-aggregation steps of a resolved server section (server.filters, or the older
    single server.filter)."""
    if server.get("filters"):
        return list(server["filters"])
    return [] if server.get("filter", "none") == "none" else [server["filter"]]


def _undefended(cfg: dict) -> bool:
    s, t = cfg.get("server") or {}, cfg.get("train") or {}
    return s.get("rule", "mean") == "mean" and not filter_steps(s) \
        and not float(t.get("contrastive_alpha", 0) or 0)


def setting_key(cfg: dict) -> str:
    """Identifies a setting across seeds."""
    d = {k: v for k, v in cfg.items() if k not in ("seed", "output", "name")}
    return _hash(d)


def setting_label(cfg: dict) -> str:
    a = cfg.get("attack") or {}
    s = cfg.get("server") or {}
    data = (cfg.get("data") or {}).get("dataset", "?")
    model = (cfg.get("model") or {}).get("name", "?")
    attack = a.get("name", "none")
    if attack != "none":
        params = a.get("params") or {}
        extra = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
        attack = f"{attack}{'(' + extra + ')' if extra else ''}@{a.get('malicious_fraction')}"
    if a.get("target", "none") not in ("none", None):
        attack += f" target={a.get('target')}"
    defense = "+".join([*filter_steps(s), s.get("rule", "mean")])
    return f"{data}/{model} {defense}/{s.get('aggregation', 'dense')} {attack}"


def _attacked(cfg: dict) -> bool:
    a = cfg.get("attack") or {}
    return a.get("name", "none") != "none" and float(a.get("malicious_fraction", 0) or 0) > 0


def drop_value(run_dir, summary: dict, metric: str, readout: str = "final"):
    """What a drop reads of one run: its final `metric`, or (readout "late") the mean of its
    evaluations after half its rounds."""
    if readout == "late":
        from fedrec.plots import late_mean

        return late_mean(run_dir, metric, summary.get("rounds"))
    return summary.get("final", {}).get(metric)


def report_rows(paths, metrics=METRICS, readout: str = "final") -> list[dict]:
    from fedrec.plots import READOUTS

    if readout not in READOUTS:
        raise ValueError(f"readout: expected one of {', '.join(READOUTS)}, got {readout!r}")
    runs = []
    for d in find_runs(paths):
        s = load_summary(d)
        runs.append((d, s, _config(d)))
    clean, base = {}, {}
    for d, s, cfg in runs:
        if not _attacked(cfg) and s.get("status") == "complete":
            run = (d, s)  # one object in both maps: `ref0 is not ref` below compares runs
            clean[clean_key(cfg)] = run
            if _undefended(cfg):
                base[undefended_key(cfg)] = run
    rows = []
    for d, s, cfg in runs:
        final = s.get("final", {})
        row = {"run": Path(d).name, "status": s.get("status"), "seed": s.get("seed"),
               "rounds": s.get("rounds"), "runner": s.get("runner"), "setting": setting_label(cfg)}
        for m in metrics:
            row[m] = final.get(m)
        ref = clean.get(clean_key(cfg))
        attacked = _attacked(cfg)
        for m in DROPS:
            b = drop_value(*ref, m, readout) if ref and attacked else None
            v = drop_value(d, s, m, readout) if attacked else None
            row[f"drop_{m.split('_', 1)[1]}%"] = (100.0 * (b - v) / b
                                                   if attacked and b and v is not None else None)
        # against the run with neither attack nor defense, where that is another run
        ref0 = base.get(undefended_key(cfg))
        if ref0 is not None and ref0 is not ref and not _undefended(cfg):
            for m in DROPS:
                b, v = drop_value(*ref0, m, readout), drop_value(d, s, m, readout)
                row[f"drop0_{m.split('_', 1)[1]}%"] = 100.0 * (b - v) / b if b and v is not None else None
        # detection scores only mean something where the defense can drop uploads
        det = {} if _undefended(cfg) else (s.get("detection") or {})
        for k in DETECTION:
            row[k] = det.get(k.split("_", 1)[1])
        for stage, scores in det.items():  # each dropping filter's own drops
            if isinstance(scores, dict):
                for m in ("precision", "recall"):
                    row[f"det_{stage}_{m}"] = scores.get(m)
        if final.get(ER_CURVE) is not None:
            start = int((cfg.get("attack") or {}).get("start_round", 1) or 1)
            row["er_auc"] = er_auc(d, start=start)
            row["er95_round"] = er_reach(d, start=start)
            for column, key in (("attack_upload_kl", "upload_kl"),
                                ("attack_mean_upload_kl", "mean_upload_kl")):
                kl = _column_mean(d, column)
                if kl is not None:
                    row[key] = kl
        row["invalid_uploads"] = s.get("invalid_uploads_total")
        row["wall_time_s"] = s.get("wall_time_s")
        row["cpu_time_s"] = s.get("cpu_time_s", s.get("server_cpu_time_s"))
        row["_setting"] = setting_key(cfg)
        rows.append(row)
    return rows


def _column_mean(run_dir, metric: str):
    """The mean of a per-round column over the run's rounds. An archived run keeps only its
    evaluation rows, so its mean comes from archived.json's `round_means` (taken from all the
    rows when it was archived); an archive from before those were kept gives None, not the
    mean of the few rows it has."""
    from fedrec.archive import ARCHIVED
    from fedrec.plots import read_curve

    archived = Path(run_dir) / ARCHIVED
    if archived.is_file():
        try:
            info = json.loads(archived.read_text())
        except (OSError, ValueError):
            info = {}
        if "round_means" in info:
            return info["round_means"].get(metric)
        if info.get("metrics_rows_kept") != info.get("metrics_rows_total"):
            return None
    try:
        _, ys = read_curve(run_dir, metric)
    except OSError:
        return None
    return sum(ys) / len(ys) if ys else None


def mean_std(values):
    vals = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))


def seed_summary(rows) -> list[dict]:
    """One row per setting: mean and std over its seeds of the metrics and drops."""
    groups: dict = {}
    for r in rows:
        if r.get("status") == "complete":
            groups.setdefault(r["_setting"], []).append(r)
    out = []
    for rs in groups.values():
        row = {"setting": rs[0]["setting"], "seeds": len(rs)}
        for k in [*METRICS[:3], "test_er@5", "er_auc", "er95_round", "upload_kl", "mean_upload_kl", "drop_hr@5%", "drop_ndcg@5%", "drop_hr@10%", "drop0_hr@5%", "drop0_ndcg@5%",
                  *DETECTION, "wall_time_s", "cpu_time_s"]:
            m, sd = mean_std(r.get(k) for r in rs)
            if m is None:
                continue
            row[k] = f"{m:.4f} ± {sd:.4f}" if "drop" not in k and not k.endswith("time_s") \
                else f"{m:.1f} ± {sd:.1f}"
        out.append(row)
    return sorted(out, key=lambda r: r["setting"])


def public(rows) -> list[dict]:
    """Rows without internal keys, and without columns that are empty everywhere."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if not k.startswith("_")]
    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    return [{k: r.get(k) for k in keys} for r in rows]
