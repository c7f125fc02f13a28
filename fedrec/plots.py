"""Plots of per-round metrics across runs (matplotlib, optional dependency)."""

from __future__ import annotations

import csv
from pathlib import Path

from fedrec.errors import FedRecError
from fedrec.results import find_runs


def read_curve(run_dir, metric: str):
    xs, ys = [], []
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            v = row.get(metric)
            if v not in (None, ""):
                xs.append(int(row["round"]))
                ys.append(float(v))
    return xs, ys


def plot_curves(paths, out: str, metric: str = "test_hr@5"):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FedRecError("plotting needs matplotlib: pip install 'fedrec[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4))
    for d in find_runs(paths):
        xs, ys = read_curve(d, metric)
        if xs:
            ax.plot(xs, ys, marker="o", ms=3, label=Path(d).name)
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
