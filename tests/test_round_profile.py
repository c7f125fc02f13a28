"""benchmarks/round_profile.py: the stack sampler and a short profile of a synthetic run."""

import time
from pathlib import Path

import numpy as np

from conftest import load_file_module

ROOT = Path(__file__).resolve().parents[1]
round_profile = load_file_module("benchmarks/round_profile.py")


def _burn(seconds):
    end = time.process_time() + seconds
    x = 0
    while time.process_time() < end:
        x += 1
    return x


def _outer():
    _burn(0.15)
    _burn_more()


def _burn_more():
    _burn(0.05)


def test_sampler_counts_inclusive_and_self_shares():
    with round_profile.StackSampler(0.002, str(ROOT)) as s:
        _outer()
    assert s.samples >= 40
    names = {k.rsplit(":", 1)[-1]: v for k, v in s.inclusive.items()}
    # every sample is inside _outer and _burn; about a quarter also inside _burn_more
    assert names["_outer"] >= 0.9 * s.samples and names["_burn"] >= 0.9 * s.samples
    assert 0.1 * s.samples <= names["_burn_more"] <= 0.45 * s.samples
    # paths relative to the root; a tick that lands while the sampler itself stops (process CPU
    # time also runs on other threads' work) is counted in its own __exit__
    assert all(k.startswith(("tests/test_round_profile.py:", "benchmarks/round_profile.py:StackSampler."))
               for k in s.own), sorted(s.own)


def test_profile_of_a_synthetic_run(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path))
    exp = tmp_path / "tiny.yaml"
    exp.write_text("name: tiny\ndata:\n  dataset: synthetic\n  synthetic: {n_users: 200, n_items: 300, "
                   f"mean_history: 15}}\n  cache_dir: {tmp_path}\nmodel: {{dim: 16}}\n"
                   "train: {rounds: 60, clients_per_round: 10}\n")
    out = round_profile.profile(str(exp), [], rounds=60, warmup=5, interval_ms=0.5, top=200)
    # (top=200: under pytest every sample also holds ~30 pytest frames with the same count)
    assert out["samples"] > 0 and out["rounds_per_s"] > 0
    where = [e["where"] for e in out["inclusive"]]
    assert any(w.endswith("Engine.run_round") for w in where)
    assert abs(sum(e["share"] for e in out["self"]) - 1.0) < 0.01  # every sample has one line (shares rounded)


def test_benchmarks_give_a_one_line_error_on_a_bad_experiment(tmp_path):
    """A grid YAML where one run is expected, or a missing file: one line and exit code 2
    from every benchmark that loads an experiment, not a traceback."""
    import subprocess
    import sys

    grid = tmp_path / "grid.yaml"
    grid.write_text("name: g\ndata: {dataset: synthetic}\ngrid:\n  seed: [0, 1]\n")
    for script, bad in (("round_profile.py", grid), ("throughput.py", tmp_path / "none.yaml"),
                        ("aggregation.py", grid), ("union_floor.py", grid)):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script),
                               "--experiment", str(bad)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"benchmarks/{script}: error: "), lines


def test_a_grid_run_picked_by_its_labels(tmp_path, monkeypatch):
    """--run KEY=VALUE picks one run of a grid file (benchmarks/run_pick.py): the profile
    runs that run's config; labels that match none or several runs are a one-line error."""
    import subprocess
    import sys

    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path))
    exp = tmp_path / "grid.yaml"
    exp.write_text("name: g\ndata:\n  dataset: synthetic\n  synthetic: {n_users: 120, n_items: 200, "
                   f"mean_history: 12}}\n  cache_dir: {tmp_path}\nmodel: {{dim: 8}}\n"
                   "train: {rounds: 20, clients_per_round: 8}\n"
                   "grid:\n  seed: [0, 1]\n  rule:\n    - {label: mean}\n"
                   "    - {label: median, server.rule: median}\n")
    out = round_profile.profile(str(exp), [], rounds=5, warmup=1, interval_ms=0.5, top=400,
                                picks=["seed=1", "rule=median"])
    assert out["run"].startswith("g[seed=1,rule=median]") and out["rounds_per_s"] > 0
    for picks in (["rule=median"], ["rule=krum"]):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "round_profile.py"),
                               "--experiment", str(exp)] + [a for p in picks for a in ("--run", p)],
                              capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert f"matches {2 if picks == ['rule=median'] else 0} of its 4 runs" in lines[0]


def test_union_floor_counts_the_distances_a_client_adds():
    """Client 0 sent sampled items 2 and 5 (and the unsampled 7), client 1 item 5, client 2
    none of them: with U = 4 sampled items, 2 x 2 + 2 x 2 // 2 and 1 x 3 + 0 distances."""
    union_floor = load_file_module("benchmarks/union_floor.py")
    ids = np.array([2, 5, 7, 5, 7])
    owner = np.array([0, 0, 0, 1, 2])
    U, K, needed = union_floor.needed_distances(ids, owner, np.array([1, 2, 5, 9]), 3)
    assert (U, K) == (4, 3)
    assert needed == (2 * 2 + 2) + (1 * 3 + 0)


def test_ncf_score_benchmark_compares_the_two_forms():
    """benchmarks/ncf_score.py times score()'s sigmoid form against the tanh form on the same
    weights and users, and reports how far their scores are apart (float32 rounding)."""
    ncf_score = load_file_module("benchmarks/ncf_score.py")
    out = ncf_score.measure(60, 8, (6, 5), 9, 1, "neumf")
    assert out["tanh_form_s"]["median"] > 0 and out["sigmoid_form_s"]["median"] > 0
    assert out["max_abs_score_diff"] < 1e-4 * max(1.0, out["max_abs_score"])
    assert out["top10_same_order_share"] == 1.0 and out["ml1m_test_eval_s"]["sigmoid_form"] > 0
