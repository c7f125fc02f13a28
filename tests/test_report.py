"""`fedrec report`: drops against the matching clean run, means over seeds, detection scores."""

import csv
from pathlib import Path

import pytest

from conftest import tiny_cfg
from fedrec.engine import run_experiment
from fedrec.report import report_rows, seed_summary


def cfg(tmp_path, attack="none", seed=0, **over):
    kw = {"data__attacker_pool": 0.2, "attack__name": attack, "attack__malicious_fraction": 0.1,
          "seed": seed, **over}
    return tiny_cfg(tmp_path, **kw)


def test_drop_is_against_the_clean_run_with_the_same_seed(tmp_path):
    root = tmp_path / "runs"
    finals = {}
    for seed in (0, 1):
        for attack in ("none", "clusterattack"):
            c = cfg(tmp_path, attack, seed)
            c.output.name = f"{attack}-{seed}"
            finals[(attack, seed)] = run_experiment(c, output_root=root, progress=False)["final"]
    # a clean run under another defense must not be taken as the reference
    other = cfg(tmp_path, "none", 0, server__rule="median")
    other.output.name = "median-none-0"
    run_experiment(other, output_root=root, progress=False)
    rows = {r["run"]: r for r in report_rows([root])}
    for seed in (0, 1):
        clean, hit = finals[("none", seed)], finals[("clusterattack", seed)]
        want = 100 * (clean["test_hr@5"] - hit["test_hr@5"]) / clean["test_hr@5"]
        assert rows[f"clusterattack-{seed}"]["drop_hr@5%"] == pytest.approx(want)
        assert rows[f"none-{seed}"]["drop_hr@5%"] is None
    summary = {s["setting"]: s for s in seed_summary(list(rows.values()))}
    attacked = [s for k, s in summary.items() if "clusterattack" in k]
    assert len(attacked) == 1 and attacked[0]["seeds"] == 2
    drops = [rows[f"clusterattack-{s}"]["drop_hr@5%"] for s in (0, 1)]
    mean = sum(drops) / 2
    assert attacked[0]["drop_hr@5%"].startswith(f"{mean:.1f} ± ")


def test_drops_of_a_robust_rule_are_scored_against_ground_truth(tmp_path):
    c = cfg(tmp_path, "clusterattack", server__rule="multikrum", server__rule_f=2,
            train__clients_per_round=20, train__rounds=8)
    s = run_experiment(c, output_root=tmp_path / "r", progress=False)
    with open(Path(s["run_dir"]) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    dropped = sum(int(r["rule_dropped"]) for r in rows)
    det = s["detection"]
    assert det["tp"] + det["fp"] == dropped > 0  # every drop is scored, against the truth
    assert det["tp"] + det["fn"] == sum(int(r["attack_uploads"] or 0) for r in rows)
    row = report_rows([tmp_path / "r"])[0]
    assert row["det_precision"] == det.get("precision")
