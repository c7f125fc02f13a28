"""The in-process runner end to end: run directory, determinism, learning, invalid uploads."""

import csv
import json

import numpy as np
import pytest
import yaml

from clients.benign import BenignClient
from fedrec.build import load_data
from fedrec.engine import run_experiment
from fedrec.report import report_rows
from fedrec.results import RunRecorder, format_table
from strategies.fedrec import sample_round


def _cfg(tmp_path, **over):
    from conftest import tiny_cfg

    return tiny_cfg(tmp_path, **over)


def _rows(run_dir):
    with open(f"{run_dir}/metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_run_writes_run_directory(tmp_path):
    cfg = _cfg(tmp_path)
    s = run_experiment(cfg, output_root=tmp_path / "runs", progress=False)
    run_dir = tmp_path / "runs" / f"tiny-{cfg.digest()}"
    assert s["run_dir"] == str(run_dir) and s["status"] == "complete"
    # config.yaml: the resolved config, every key
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == cfg.to_dict()
    # metrics.csv: one row per round; eval columns filled on eval rounds only
    rows = _rows(run_dir)
    assert [int(r["round"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert int(r["clients"]) == 10 and int(r["accepted"]) == 10 and int(r["invalid"]) == 0
        assert 0 < float(r["train_loss"]) < 1
        has_eval = r["test_hr@10"] != ""
        assert has_eval == (int(r["round"]) % 2 == 0)
    # summary.json: complete, with the final metrics (= the last eval row)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["runner"] == "engine"
    assert summary["rounds"] == 6 and summary["seed"] == 0
    assert summary["invalid_uploads_total"] == 0 and summary["invalid_uploads"] == {}
    assert summary["data"]["users"] == 60 and summary["data"]["attacker_pool"] == 3
    final = summary["final"]
    for split in ("val", "test"):
        assert final[f"{split}_users"] == 57
        for k in (5, 10, 20):
            assert 0 <= final[f"{split}_hr@{k}"] <= 1 and final[f"{split}_ndcg@{k}"] <= final[f"{split}_hr@{k}"]
            assert final[f"{split}_hr@{k}"] == pytest.approx(float(rows[-1][f"{split}_hr@{k}"]))
    assert final["test_hr@5"] <= final["test_hr@10"] <= final["test_hr@20"]
    # a complete run is skipped the second time; the report reads it
    again = run_experiment(cfg, output_root=tmp_path / "runs", progress=False)
    assert again["skipped"] is True and again["final"] == final
    table = report_rows([tmp_path / "runs"])
    assert len(table) == 1 and table[0]["test_hr@5"] == final["test_hr@5"]
    assert "tiny-" in format_table(table)


def test_same_seed_same_results_different_seed_differs(tmp_path):
    a = run_experiment(_cfg(tmp_path), output_root=tmp_path / "a", progress=False)
    b = run_experiment(_cfg(tmp_path), output_root=tmp_path / "b", progress=False)
    c = run_experiment(_cfg(tmp_path, seed=1), output_root=tmp_path / "c", progress=False)
    assert a["final"] == b["final"]
    assert [r["train_loss"] for r in _rows(a["run_dir"])] == [r["train_loss"] for r in _rows(b["run_dir"])]
    assert a["final"] != c["final"]


def test_training_beats_the_untrained_model(tmp_path):
    cfg = _cfg(tmp_path, data__synthetic__n_users=200, data__synthetic__n_items=100,
               train__rounds=60, train__clients_per_round=50, eval__every=1)
    s = run_experiment(cfg, output_root=tmp_path / "runs", progress=False)
    rows = _rows(s["run_dir"])
    hr = [(float(r["val_hr@10"]) + float(r["test_hr@10"])) / 2 for r in rows]
    loss = [float(r["train_loss"]) for r in rows]
    assert hr[-1] > hr[0] + 0.1, (hr[0], hr[-1])
    assert loss[-1] < loss[0] - 0.1 and loss[0] == pytest.approx(np.log(2), abs=0.02)


def test_invalid_uploads_are_dropped_and_counted(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, train__rounds=8)
    n_items = load_data(cfg).n_items

    honest = BenignClient.craft_upload

    def craft(self, ids, rows, predictor, state, rnd):
        ids, rows, predictor = honest(self, ids, rows, predictor, state, rnd)
        if self.user % 5 == 0:
            rows = rows.copy()
            rows[0, 0] = np.nan
        elif self.user % 5 == 1:
            ids = ids.copy()
            ids[-1] = n_items + 3
        return ids, rows, predictor

    monkeypatch.setattr(BenignClient, "craft_upload", craft)
    s = run_experiment(cfg, output_root=tmp_path / "runs", progress=False)
    # the strategy's sampling, replayed: which bad users were picked each round
    rng, expect, per_round = np.random.default_rng([cfg.seed, 104729]), {"non_finite": 0, "ids_range": 0}, []
    for _ in range(8):
        users = sample_round(rng, 60, 10, "uniform", {})
        nan, rng_bad = int((users % 5 == 0).sum()), int((users % 5 == 1).sum())
        expect["non_finite"] += nan
        expect["ids_range"] += rng_bad
        per_round.append(nan + rng_bad)
    assert sum(per_round) > 0
    assert s["status"] == "complete"
    assert s["invalid_uploads"] == {k: v for k, v in expect.items() if v}
    assert s["invalid_uploads_total"] == sum(per_round)
    rows = _rows(s["run_dir"])
    assert [int(r["invalid"]) for r in rows] == per_round
    assert [int(r["accepted"]) for r in rows] == [10 - k for k in per_round]
    assert int(rows[-1]["invalid_total"]) == sum(per_round)
    assert all(np.isfinite(v) for v in s["final"].values())
    assert s["final"]["test_users"] == 57


def test_metrics_csv_one_row_per_round_across_flushes(tmp_path):
    cfg = _cfg(tmp_path)
    rec = RunRecorder(cfg, tmp_path / "run", runner="engine")
    for rnd in range(1, 451):
        rec.log_fit(rnd, {"clients": 5, "accepted": 5, "invalid": 0, "invalid_total": 0,
                          "train_loss": 0.5, "note": "text is not logged"})
        if rnd in (200, 450):  # eval rounds that coincide with a 200-round flush
            rec.log_eval(rnd, {"test_hr@5": rnd / 1000}, final=rnd == 450)
    summary = rec.finish()
    rows = _rows(tmp_path / "run")
    assert [int(r["round"]) for r in rows] == list(range(1, 451))
    assert rows[199]["test_hr@5"] == "0.2" and rows[199]["train_loss"] == "0.5"
    assert rows[449]["test_hr@5"] == "0.45" and rows[449]["clients"] == "5"
    assert rows[0]["test_hr@5"] == "" and "note" not in rows[0]
    assert summary["final"] == {"test_hr@5": 0.45} and summary["status"] == "complete"
