"""Checkpoints: a run killed at any moment resumes from its last checkpoint, bit for bit."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import tiny_cfg
from fedrec.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from fedrec.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _rows(run_dir):
    """metrics.csv without its wall-time columns."""
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in csv.DictReader(f)]


def test_checkpoint_file_is_atomic_and_tied_to_its_config(tmp_path):
    state = {"x": np.arange(5), "nested": {"rng": np.random.default_rng(1).bit_generator.state}}
    size = save_checkpoint(tmp_path, "abc", 7, state)
    assert size == checkpoint_path(tmp_path).stat().st_size
    assert not list(tmp_path.glob("*.tmp"))
    payload = load_checkpoint(tmp_path, "abc")
    assert payload["round"] == 7 and np.array_equal(payload["state"]["x"], np.arange(5))
    with pytest.raises(ConfigError, match="another configuration"):
        load_checkpoint(tmp_path, "other")
    # a half-written temporary file (a kill during a write) is never read
    checkpoint_path(tmp_path).with_name("checkpoint.pkl.tmp").write_bytes(b"\x80\x05garbage")
    assert load_checkpoint(tmp_path, "abc")["round"] == 7
    checkpoint_path(tmp_path).write_bytes(b"\x00\x01 not a pickle")
    with pytest.raises(ConfigError, match="unreadable checkpoint"):
        load_checkpoint(tmp_path, "abc")
    assert load_checkpoint(tmp_path / "none", "abc") is None


@pytest.mark.parametrize("workers,attack", [(1, "none"), (2, "none"), (1, "clusterattack"),
                                            (2, "fedattack")])
def test_an_interrupted_run_resumes_bit_identically(tmp_path, monkeypatch, workers, attack):
    """Interrupted after round 23 (checkpoints every 7 rounds): the rerun resumes from round
    21 and ends with the same model, metrics and rows as a run that never stopped."""
    import fedrec.engine as engine_mod

    monkeypatch.setenv("FEDREC_WORKERS", str(workers))
    cfg = tiny_cfg(tmp_path, train__rounds=30, train__clients_per_round=16, eval__every=5,
                   output__checkpoint_every=7, data__attacker_pool=0.2, attack__name=attack,
                   attack__malicious_fraction=0.1 if attack != "none" else 0.0)
    arrays = {}

    class Capture(engine_mod.Engine):
        def run(self, save_checkpoint=None):
            out = super().run(save_checkpoint)
            arrays[self.tag] = [a.copy() for a in self.strategy.global_arrays()]
            return out

    def run(tag, force=False):
        Capture.tag = tag
        return engine_mod.run_experiment(cfg, output_root=tmp_path / tag, progress=False,
                                         force=force)

    monkeypatch.setattr(engine_mod, "Engine", Capture)
    full = run("full")
    real = Capture.run_round

    def dies_at_23(self, rnd):
        if rnd == 23:
            raise KeyboardInterrupt
        return real(self, rnd)

    monkeypatch.setattr(Capture, "run_round", dies_at_23)
    with pytest.raises(KeyboardInterrupt):
        run("cut")
    cut_dir = Path(full["run_dir"].replace("/full/", "/cut/"))
    assert json.loads((cut_dir / "summary.json").read_text())["status"] == "interrupted"
    assert load_checkpoint(cut_dir, cfg.digest())["round"] == 21
    before = load_checkpoint(cut_dir, cfg.digest())["wall_time_s"]  # rounds 1-21's wall time
    before_cpu = load_checkpoint(cut_dir, cfg.digest())["cpu_time_s"]  # and their CPU seconds
    assert before > 0 and before_cpu > 0
    monkeypatch.setattr(Capture, "run_round", real)
    resumed = run("cut")
    assert resumed["resumed_from_round"] == 21 and resumed["status"] == "complete"
    # the summary's wall time is both segments' (the work kept), not the last one's alone
    assert resumed["wall_time_s"] == pytest.approx(before + resumed["wall_time_segment_s"],
                                                   abs=2e-3)
    assert resumed["cpu_time_s"] == pytest.approx(before_cpu + resumed["cpu_time_segment_s"],
                                                  abs=2e-3)
    assert 0 < resumed["cpu_time_segment_s"] < resumed["cpu_time_s"]
    assert resumed["final"] == full["final"]
    assert resumed["invalid_uploads"] == full["invalid_uploads"]
    assert resumed["detection"] == full["detection"]
    for a, b in zip(arrays["full"], arrays["cut"]):
        assert np.array_equal(a, b)
    assert _rows(cut_dir) == _rows(full["run_dir"])
    assert not checkpoint_path(cut_dir).exists()  # a complete run keeps none
    # --force starts again from round 1
    again = run("cut", force=True)
    assert "resumed_from_round" not in again and again["final"] == full["final"]
    assert "wall_time_segment_s" not in again and "cpu_time_segment_s" not in again
    assert again["cpu_time_s"] > 0


def _experiment(tmp_path, rounds, every, grid=None):
    raw = {"name": "ckpt", "seed": 1,
           "data": {"synthetic": {"n_users": 80, "n_items": 120, "mean_history": 12},
                    "cache_dir": str(tmp_path / "cache")},
           "model": {"dim": 8}, "train": {"rounds": rounds, "clients_per_round": 16},
           "server": {"lr": 0.01}, "eval": {"every": 100},
           "output": {"progress": False, "checkpoint_every": every, "dir": str(tmp_path / "runs")}}
    if grid:
        raw["grid"] = grid
    path = tmp_path / "ckpt.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _fedrec(args, **kw):
    env = {**os.environ, "FEDREC_WORKERS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedrec", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_checkpoint(run_root, proc, past_round=0, timeout=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for p in Path(run_root).rglob("checkpoint.pkl"):
            try:
                if load_checkpoint(p.parent, _digest(p.parent))["round"] > past_round:
                    return p.parent
            except (ConfigError, OSError, EOFError):  # being replaced right now
                pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    pytest.fail("no checkpoint appeared")


def _json_tail(out: str):
    """The --json document after fedrec run's one line per run."""
    return json.loads(out[out.index("\n[") + 1:])


def _digest(run_dir):
    import pickle

    with open(Path(run_dir) / "checkpoint.pkl", "rb") as f:
        return pickle.load(f)["digest"]


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_fedrec_run_killed_then_rerun(tmp_path, how):
    """`fedrec run`, killed (kill -9) or stopped (SIGTERM) mid-run, then the same command:
    at most checkpoint_every rounds are redone and the results equal an uninterrupted run."""
    path = _experiment(tmp_path, rounds=600, every=50)
    ref = _fedrec(["run", path, "--output", tmp_path / "ref", "--json"])
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err
    proc = _fedrec(["run", path, "--json"])
    run_dir = _wait_for_checkpoint(tmp_path / "runs", proc, past_round=100)
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=60)
    if how == "SIGTERM":  # finishes its round, checkpoints, says so, exits 130
        assert proc.returncode == 130 and "checkpoint saved" in err, err
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    else:
        assert proc.returncode == -signal.SIGKILL
    stopped_at = load_checkpoint(run_dir, _digest(run_dir))["round"]
    again = _fedrec(["run", path, "--json"])
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    summary = _json_tail(out)[0]
    assert summary["resumed_from_round"] == stopped_at >= 100
    ref_summary = json.loads((next((tmp_path / "ref").iterdir()) / "summary.json").read_text())
    assert summary["final"] == ref_summary["final"]
    assert _rows(run_dir) == _rows(next((tmp_path / "ref").iterdir()))


def test_a_grid_resumes_where_it_stopped(tmp_path):
    """kill -9 during a grid's second run: the rerun skips the first and resumes the second."""
    path = _experiment(tmp_path, rounds=400, every=50, grid={"seed": [1, 2]})
    proc = _fedrec(["run", path])
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # the second run has checkpointed
        dirs = [d for d in (tmp_path / "runs").glob("*") if (d / "checkpoint.pkl").exists()]
        done = [d for d in (tmp_path / "runs").glob("*") if (d / "summary.json").exists()
                and json.loads((d / "summary.json").read_text())["status"] == "complete"]
        if done and dirs:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    again = _fedrec(["run", path, "--json"])
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    summaries = _json_tail(out)
    assert [bool(s.get("skipped")) for s in summaries] == [True, False]
    assert summaries[1]["resumed_from_round"] >= 50
