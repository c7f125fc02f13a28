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


# what a run's metric may read: its final evaluation, or `late_mean`
READOUTS = ("final", "late")


def late_mean(run_dir, metric: str, rounds=None):
    """Mean of `metric` over the evaluations at rounds > rounds / 2 (rounds: the run's, else
    its last evaluated round); None without a metrics.csv or such an evaluation."""
    try:
        xs, ys = read_curve(run_dir, metric)
    except OSError:
        return None
    if not xs:
        return None
    half = (rounds or max(xs)) / 2
    late = [y for x, y in zip(xs, ys) if x > half]
    return sum(late) / len(late) if late else None


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


def detection_curves(run_dir, window: int = 200, stage: str = ""):
    """(rounds, precision, recall) of a run's drops over a sliding window of rounds, from the
    per-round det_tp / det_fp / det_fn counts (a round alone rarely holds an attacker)."""
    import numpy as np

    p = f"det_{stage}" if stage else "det"
    rounds, tp, fp, fn = [], [], [], []
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row.get(f"{p}_tp") in (None, ""):
                continue
            rounds.append(int(row["round"]))
            tp.append(float(row[f"{p}_tp"]))
            fp.append(float(row[f"{p}_fp"]))
            fn.append(float(row[f"{p}_fn"]))
    if not rounds:
        return [], [], []
    k = np.ones(min(window, len(rounds)))
    stp, sfp, sfn = (np.convolve(np.array(a), k, mode="valid") for a in (tp, fp, fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(stp + sfp > 0, stp / (stp + sfp), np.nan)
        recall = np.where(stp + sfn > 0, stp / (stp + sfn), np.nan)
    return rounds[len(k) - 1:], precision, recall


def plot_detection(paths, out: str, window: int = 200, stage: str = ""):
    """Detection precision and recall over rounds (sliding window) for every run given;
    stage: a filter's name (e.g. "union"): only that filter's own drops (not Multi-Krum's)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FedRecError("plotting needs matplotlib: pip install 'fedrec[plot]'") from None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    drawn = 0
    for d in find_runs(paths):
        xs, p, r = detection_curves(d, window, stage)
        if len(xs):
            axes[0].plot(xs, p, label=Path(d).name)
            axes[1].plot(xs, r, label=Path(d).name)
            drawn += 1
    if not drawn:
        plt.close(fig)
        raise FedRecError("no run has per-round detection counts (det_tp, det_fp, det_fn)")
    for ax, name in zip(axes, ("precision", "recall")):
        ax.set_xlabel("round")
        ax.set_title(f"{stage + ' ' if stage else ''}detection {name} (last {window} rounds)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def mean_curve(run_dirs, metric: str):
    """(rounds, mean over the runs) of `metric`, at the rounds where every run has a value."""
    per_round: dict = {}
    curves = 0
    for d in run_dirs:
        xs, ys = read_curve(d, metric)
        if not xs:
            continue
        curves += 1
        for x, y in zip(xs, ys):
            per_round.setdefault(x, []).append(y)
    rounds = sorted(x for x, v in per_round.items() if len(v) == curves)
    return rounds, [sum(per_round[x]) / curves for x in rounds]


def plot_mean_curves(groups: dict, out: str, metric: str = "test_hr@5", title: str = "") -> bool:
    """One line per group (label -> run directories): `metric` against rounds, mean over the
    group's runs (its seeds). False (nothing written) when no run has the metric."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FedRecError("plotting needs matplotlib: pip install 'fedrec[plot]'") from None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = 0
    for label, dirs in groups.items():
        xs, ys = mean_curve(dirs, metric)
        if xs:
            ax.plot(xs, ys, marker="o", ms=3, label=f"{label} (n={len(dirs)})")
            drawn += 1
    if drawn:
        ax.set_xlabel("round")
        ax.set_ylabel(f"{metric} (mean over seeds)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out, dpi=110)
    plt.close(fig)
    return bool(drawn)


def plot_grouped_bars(groups: list, bars: list, values: dict, out: str, ylabel: str,
                      title: str = "") -> bool:
    """A grouped bar chart, as the papers draw attacks under defenses: one group of bars per
    entry of `groups` (x axis), one bar per entry of `bars` (colour, legend); values maps
    (group, bar) -> (mean, std, n seeds, expected seeds), a missing or None mean leaving a
    gap. Error bars are the std over seeds; a bar with fewer seeds than expected is hatched
    and labelled n=<seeds>. False (nothing written) when no bar has a value."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FedRecError("plotting needs matplotlib: pip install 'fedrec[plot]'") from None
    if not any(v is not None and v[0] is not None for v in values.values()):
        return False
    width = 0.8 / max(1, len(bars))
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.22 * len(groups) * len(bars))), 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, bar in enumerate(bars):
        colour = colours[j % len(colours)]
        for i, group in enumerate(groups):
            v = values.get((group, bar))
            if v is None or v[0] is None:
                continue
            mean, std, n, expected = v
            x = i - 0.4 + (j + 0.5) * width
            partial = n < expected
            ax.bar(x, mean, width, yerr=std if n > 1 else None, color=colour, capsize=1.5,
                   hatch="//" if partial else None, edgecolor="white" if partial else None,
                   error_kw={"elinewidth": 0.7}, label=bar if i == 0 or bar not in
                   ax.get_legend_handles_labels()[1] else None)
            if partial:
                ax.annotate(f"n={n}", (x, mean), ha="center", va="bottom" if mean >= 0 else "top",
                            fontsize=5, rotation=90)
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=7, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=6, ncol=min(4, len(bars)))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_mean_curve_panels(panels: dict, out: str, metric: str = "test_hr@5",
                           title: str = "") -> bool:
    """Small multiples for a grid of two axes: one panel per key of `panels` (e.g. a
    defense), in it one line per label -> run directories (e.g. an attack), `metric` against
    rounds, mean over each label's runs (its seeds); panels share the y axis and one legend.
    False (nothing written) when no run has the metric."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FedRecError("plotting needs matplotlib: pip install 'fedrec[plot]'") from None
    ncols = min(4, max(1, len(panels)))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.5 * nrows), sharey=True,
                             squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = list(dict.fromkeys(label for lines in panels.values() for label in lines))
    drawn = 0
    for ax, (panel, lines) in zip(axes.ravel(), panels.items()):
        for label, dirs in lines.items():
            xs, ys = mean_curve(dirs, metric)
            if xs:
                ax.plot(xs, ys, marker="o", ms=2, lw=1,
                        color=colours[labels.index(label) % len(colours)],
                        label=f"{label}")
                drawn += 1
        ax.set_title(panel, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    if drawn:
        handles = [plt.Line2D([], [], color=colours[i % len(colours)], marker="o", ms=2, lw=1)
                   for i in range(len(labels))]
        fig.legend(handles, labels, loc="lower center", ncol=min(8, len(labels)), fontsize=7)
        fig.suptitle(f"{title} (mean over seeds) against rounds", fontsize=9)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        fig.savefig(out, dpi=110)
    plt.close(fig)
    return bool(drawn)
