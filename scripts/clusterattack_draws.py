"""How much of ClusterAttack's HR@5 drop does the attacker draw explain? From the runs' files.

    python scripts/clusterattack_draws.py            # table + fit, from runs/ and results/
    python scripts/clusterattack_draws.py --json     # the same as JSON

Takes every complete ClusterAttack run of Table 1's protocol that exists (the paper table's
three seeds, `experiments/paper/clusterattack-table1-mf-ml1m.yaml`, and the attacker draws of
`experiments/clusterattack-draws-ml1m.yaml`), each from its run directory or the results
archive (`fedrec archive`), with the clean run of its training seed; for each, the attackers'
mean number of training items (a malicious upload weighs in the sample-weighted mean by its
client's count) and the relative test HR@5 drop at the last round. Then a least-squares line
drop = a + b * items over the runs: its residual standard deviation is the run-to-run noise
left once the draw is accounted for (training seed, pool and evaluation noise together), and
its value at the users' mean item count is the drop of a typical draw. Also the spread of a
draw's mean item count over random draws from each seed's pool (20,000 draws).

Evaluation code (it reads which users are malicious): not part of any defense.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TABLE = ROOT / "experiments" / "paper" / "clusterattack-table1-mf-ml1m.yaml"
DRAWS = ROOT / "experiments" / "clusterattack-draws-ml1m.yaml"


def run_dirs(cfgs):
    """{index: a complete run directory} from runs/, another table's runs, or the archive."""
    from fedrec.archive import default_archive
    from fedrec.results import is_complete, run_dir_for
    from fedrec.run_index import archived_runs, shared_runs

    dirs = [run_dir_for(c) for c in cfgs]
    found = {i: d for i, d in enumerate(dirs) if is_complete(d)}
    found.update(shared_runs(cfgs, dirs))
    found.update(archived_runs(cfgs, dirs, default_archive()))
    return found


def final_hr(run_dir) -> float:
    return float(json.loads((Path(run_dir) / "summary.json").read_text())["final"]["test_hr@5"])


def fit_line(x, y):
    """(intercept, slope, residual sd with n - 2 degrees of freedom, the fit's covariance)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    design = np.c_[np.ones_like(x), x]
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    sd = float(np.sqrt((resid ** 2).sum() / max(len(x) - 2, 1)))
    cov = sd ** 2 * np.linalg.inv(design.T @ design)
    return float(coef[0]), float(coef[1]), sd, cov


def main(argv=None) -> int:
    from fedrec.build import load_data
    from fedrec.config_load import load
    from fedrec.roles import malicious_users

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--draw-samples", type=int, default=20000)
    args = p.parse_args(argv)

    table = load(TABLE)
    cfgs = [c for c in table if c.attack.name in ("none", "clusterattack")] + load(DRAWS)
    dirs = run_dirs(cfgs)
    clean = {c.seed: dirs.get(i) for i, c in enumerate(cfgs) if c.attack.name == "none"}
    data_by_seed: dict = {}
    rows = []
    for i, c in enumerate(cfgs):
        if c.attack.name != "clusterattack" or i not in dirs or clean.get(c.seed) is None:
            continue
        data = data_by_seed.get(c.seed) or data_by_seed.setdefault(c.seed, load_data(c))
        attackers = malicious_users(c, data)
        items = float(np.mean([len(data.train_of(int(u))) for u in attackers]))
        hr, hr_clean = final_hr(dirs[i]), final_hr(clean[c.seed])
        rows.append({"seed": c.seed, "draw_seed": c.attack.draw_seed if c.attack.draw_seed
                     is not None else c.seed, "attackers_mean_items": round(items, 1),
                     "test_hr@5": hr, "clean_test_hr@5": hr_clean,
                     "drop_pct": 100 * (1 - hr / hr_clean), "run": str(dirs[i])})
    out: dict = {"runs": rows}
    if len(rows) >= 3:
        a, b, sd, cov = fit_line([r["attackers_mean_items"] for r in rows],
                                 [r["drop_pct"] for r in rows])
        some = next(iter(data_by_seed.values()))
        mean_items = float(np.mean([len(some.train_of(u)) for u in range(some.n_users)]))
        at = np.array([1.0, mean_items])
        out["fit"] = {"intercept": a, "slope_per_item": b, "residual_sd_points": sd,
                      "correlation": float(np.corrcoef([r["attackers_mean_items"] for r in rows],
                                                       [r["drop_pct"] for r in rows])[0, 1]),
                      "users_mean_items": mean_items, "drop_at_users_mean": float(at @ [a, b]),
                      "drop_at_users_mean_se": float(np.sqrt(at @ cov @ at))}
    spread = {}
    rng = np.random.default_rng(0)
    for seed, data in sorted(data_by_seed.items()):
        counts = np.array([len(data.train_of(int(u))) for u in data.attacker_pool])
        k = next(len(malicious_users(c, data)) for c in cfgs
                 if c.seed == seed and c.attack.name == "clusterattack")
        means = np.array([counts[rng.choice(len(counts), k, replace=False)].mean()
                          for _ in range(args.draw_samples)])
        spread[seed] = {"pool_mean_items": float(counts.mean()), "draw_mean_sd": float(means.std()),
                        "draw_mean_p10_p90": [float(v) for v in np.percentile(means, [10, 90])]}
    out["draw_spread"] = spread
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print("| seed | draw | attackers' mean items | test HR@5 | clean | drop |")
    print("|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["attackers_mean_items"]):
        print(f"| {r['seed']} | {r['draw_seed']} | {r['attackers_mean_items']:.1f} | "
              f"{r['test_hr@5']:.4f} | {r['clean_test_hr@5']:.4f} | {r['drop_pct']:.1f}% |")
    if "fit" in out:
        f = out["fit"]
        print(f"\ndrop = {f['intercept']:.1f} + {f['slope_per_item']:.3f} x items (points; "
              f"{len(rows)} runs, correlation {f['correlation']:.3f}); residual sd "
              f"{f['residual_sd_points']:.1f} points; at the users' mean "
              f"{f['users_mean_items']:.1f} items: {f['drop_at_users_mean']:.1f} +- "
              f"{f['drop_at_users_mean_se']:.1f}%")
    for seed, s in spread.items():
        print(f"seed {seed}: pool mean {s['pool_mean_items']:.1f} items; a draw's mean: sd "
              f"{s['draw_mean_sd']:.1f}, 10-90% {s['draw_mean_p10_p90'][0]:.0f}-"
              f"{s['draw_mean_p10_p90'][1]:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
