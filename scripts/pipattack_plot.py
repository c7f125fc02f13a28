"""ER@K against rounds for every attack of a targeted-attack grid, mean and std over seeds.

    python scripts/pipattack_plot.py runs/pipattack-ml1m-10pct --out docs/pipattack-ml1m-er5.png
        [--metric test_er@5] [--label attack.name]

Runs are grouped by their config without `seed` and `output`; each group is one line (the
mean over its seeds at each evaluated round, shaded +- one standard deviation), labelled by
the attack name and its parameters. The clean pretraining directories are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrec.plots import read_curve  # noqa: E402
from fedrec.results import find_runs  # noqa: E402


def label_of(cfg: dict) -> str:
    a = cfg.get("attack") or {}
    name = a.get("name", "none")
    params = a.get("params") or {}
    extra = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
    s = cfg.get("server") or {}
    rule = s.get("rule", "mean")
    return f"{'clean' if name == 'none' else name}{'(' + extra + ')' if extra else ''}" + \
        ("" if rule == "mean" else f" [{rule}]")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--metric", default="test_er@5")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict = {}
    for d in find_runs(args.runs):
        if Path(d).name.startswith("pretrain_"):
            continue
        cfg = yaml.safe_load((Path(d) / "config.yaml").read_text())
        key = json.dumps({k: v for k, v in cfg.items() if k not in ("seed", "output", "name")},
                         sort_keys=True, default=str)
        xs, ys = read_curve(d, args.metric)
        if xs:
            groups.setdefault(key, (label_of(cfg), []))[1].append(dict(zip(xs, ys)))
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, curves in sorted(groups.values()):
        rounds = sorted(set.intersection(*(set(c) for c in curves)))
        y = np.array([[c[r] for r in rounds] for c in curves])
        m, sd = y.mean(0), y.std(0)
        line, = ax.plot(rounds, m, marker="o", ms=3, label=f"{label} (n={len(curves)})")
        ax.fill_between(rounds, m - sd, m + sd, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel(args.metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"plot written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    from fedrec.errors import run_script

    run_script(main, "scripts/pipattack_plot.py")
