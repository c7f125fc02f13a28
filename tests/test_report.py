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


def test_defended_runs_also_report_the_drop_against_no_attack_no_defense(tmp_path):
    root = tmp_path / "runs"
    out = {}
    for name, over in {"base": {}, "union-clean": {"server__filter": "union", "train__contrastive_alpha": 1.0},
                       "union-hit": {"server__filter": "union", "train__contrastive_alpha": 1.0,
                                     "attack__name": "clusterattack"}}.items():
        c = cfg(tmp_path, over.pop("attack__name", "none"), 0, **over)
        c.output.name = name
        out[name] = run_experiment(c, output_root=root, progress=False)["final"]["test_hr@5"]
    rows = {r["run"]: r for r in report_rows([root])}
    assert rows["union-hit"]["drop_hr@5%"] == pytest.approx(100 * (out["union-clean"] - out["union-hit"]) / out["union-clean"])
    assert rows["union-hit"]["drop0_hr@5%"] == pytest.approx(100 * (out["base"] - out["union-hit"]) / out["base"])
    # UNION's own cost on a clean run
    assert rows["union-clean"]["drop0_hr@5%"] == pytest.approx(100 * (out["base"] - out["union-clean"]) / out["base"])
    assert rows["base"].get("drop0_hr@5%") is None


def test_grid_bundles_set_several_keys_together(tmp_path):
    from fedrec.config import expand
    from fedrec.errors import ConfigError

    raw = {"grid": {"defense": [{"label": "mk", "server.rule": "multikrum"},
                                {"label": "union+nb", "server.rule": "norm_bound", "server.filter": "union",
                                 "train.contrastive_alpha": 1.0}],
                    "seed": [0, 1]}}
    cfgs = expand(raw)
    assert [(c.server.rule, c.server.filter, c.train.contrastive_alpha, c.seed) for c in cfgs] == [
        ("multikrum", "none", 0.0, 0), ("multikrum", "none", 0.0, 1),
        ("norm_bound", "union", 1.0, 0), ("norm_bound", "union", 1.0, 1)]
    assert "defense=union+nb" in cfgs[2].output.name
    with pytest.raises(ConfigError, match="grid.defense"):
        expand({"grid": {"defense": [{"server.nope": 1}]}})


def test_detection_plot_from_per_round_counts(tmp_path):
    from fedrec.cli import main
    from fedrec.plots import detection_curves

    c = cfg(tmp_path, "clusterattack", server__rule="multikrum", server__rule_f=2,
            train__clients_per_round=20, train__rounds=8)
    s = run_experiment(c, output_root=tmp_path / "r", progress=False)
    xs, p, r = detection_curves(s["run_dir"], window=8)
    det = s["detection"]
    assert xs == [8] and r[0] == pytest.approx(det["recall"]) and p[0] == pytest.approx(det["precision"])
    png = tmp_path / "det.png"
    assert main(["report", str(tmp_path / "r"), "--plot-detection", str(png), "--window", "4"]) == 0
    assert png.stat().st_size > 1000


def test_a_filters_own_drops_are_scored_apart(tmp_path):
    c = cfg(tmp_path, "clusterattack", server__rule="multikrum", server__rule_f=2, server__filter="union",
            server__union_expected_attackers=1, train__clients_per_round=20, train__rounds=8)
    s = run_experiment(c, output_root=tmp_path / "r", progress=False)
    with open(Path(s["run_dir"]) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    det = s["detection"]
    union = sum(int(r["rule_union_dropped"]) for r in rows)
    assert det["union"]["tp"] + det["union"]["fp"] == union
    assert det["tp"] + det["fp"] == sum(int(r["rule_dropped"]) for r in rows)
    assert det["union"]["tp"] <= det["tp"]
    row = report_rows([tmp_path / "r"])[0]
    assert row["det_union_recall"] == det["union"].get("recall")


def test_late_readout_drops_compare_the_means_of_the_second_half(tmp_path):
    """--readout late: each run of a pair read as the mean of its evaluations after half its
    rounds, computed here by hand from both metrics.csv files."""
    root = tmp_path / "runs"
    dirs = {}
    for attack in ("none", "clusterattack"):
        c = cfg(tmp_path, attack, train__rounds=8, eval__every=1)
        c.output.name = attack
        dirs[attack] = Path(run_experiment(c, output_root=root, progress=False)["run_dir"])

    def late(d, metric):
        with open(d / "metrics.csv", newline="") as f:
            vals = [float(r[metric]) for r in csv.DictReader(f)
                    if r[metric] and int(r["round"]) > 4]
        assert len(vals) == 4
        return sum(vals) / len(vals)

    row = {r["run"]: r for r in report_rows([root], readout="late")}["clusterattack"]
    for m, key in (("test_hr@5", "drop_hr@5%"), ("test_hr@10", "drop_hr@10%")):
        b, v = late(dirs["none"], m), late(dirs["clusterattack"], m)
        assert row[key] == pytest.approx(100 * (b - v) / b)
    final = {r["run"]: r for r in report_rows([root])}["clusterattack"]
    assert final["test_hr@5"] == row["test_hr@5"]  # only the drops change
    assert final["drop_hr@5%"] != row["drop_hr@5%"]  # and here the two readings differ
    with pytest.raises(ValueError, match="readout"):
        report_rows([root], readout="best")
