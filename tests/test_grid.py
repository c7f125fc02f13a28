"""Grids in parallel: --jobs N and --ray give the same results as one run after another."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fedrec.cli import main
from fedrec.grid import GridProgress, eta_seconds, progress_text

# columns that measure time, not results
TIMING = {"seconds", "round_seconds", "fit_seconds", "eval_seconds", "wall_time_s", "cpu_time_s"}


def grid_yaml(tmp_path: Path, grid="  seed: [0, 1]\n  server.lr: [0.01, 0.02]\n", extra="") -> Path:
    p = tmp_path / "grid.yaml"
    p.write_text(f"""
name: g
data:
  dataset: synthetic
  synthetic: {{n_users: 30, n_items: 40, mean_history: 8}}
  cache_dir: {tmp_path / 'cache'}
model: {{dim: 8}}
train: {{rounds: 4, clients_per_round: 8}}
eval: {{every: 2}}
output: {{dir: {tmp_path / 'runs'}, progress: false}}
{extra}grid:
{grid}""")
    return p


def results_of(runs: Path) -> dict:
    """Per run (directory name without the config digest, which covers the data cache path):
    final metrics and metrics.csv rows without timing columns."""
    out = {}
    for d in sorted(runs.iterdir()):
        s = json.loads((d / "summary.json").read_text())
        assert s["status"] == "complete"
        with open(d / "metrics.csv") as f:
            rows = [{k: v for k, v in r.items() if k not in TIMING and "second" not in k}
                    for r in csv.DictReader(f)]
        out[d.name.rsplit("-", 1)[0]] = (s["final"], rows)
    return out


def hosts_of(runs: Path) -> list[dict]:
    return [json.loads((d / "summary.json").read_text())["host"] for d in sorted(runs.iterdir())]


def test_jobs_2_matches_jobs_1_and_skips_finished_runs(tmp_path, capsys):
    seq, par = tmp_path / "seq", tmp_path / "par"
    seq.mkdir(), par.mkdir()
    assert main(["run", str(grid_yaml(seq)), "--no-progress"]) == 0
    assert main(["run", str(grid_yaml(par)), "--no-progress", "--jobs", "2"]) == 0
    a, b = results_of(seq / "runs"), results_of(par / "runs")
    assert len(a) == 4 and a == b
    pids = {h["pid"] for h in hosts_of(par / "runs")}
    assert len(pids) == 2  # two spawned single-process workers ran the four runs
    capsys.readouterr()
    assert main(["run", str(grid_yaml(par)), "--no-progress", "--jobs", "2"]) == 0
    assert capsys.readouterr().out.count("skipped (already complete)") == 4


def test_a_failing_run_does_not_stop_the_others(tmp_path, capsys):
    # one dataset file of the grid is corrupt (line 3): that run fails, the other one completes
    # (a file that does not exist at all stops the grid before any run: tests/test_cli.py)
    bad = tmp_path / "ratings.dat"
    bad.write_text("1::10::5::100\n1::11::4::101\n2::10\n")
    p = grid_yaml(tmp_path, grid=f"  data.dataset: [synthetic, {bad}]\n")
    assert main(["run", str(p), "--no-progress", "--jobs", "2"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAILED") == 1 and out.count("test_hr@5=") == 1
    complete = [d for d in (tmp_path / "runs").iterdir() if (d / "summary.json").exists()
                and json.loads((d / "summary.json").read_text())["status"] == "complete"]
    assert len(complete) == 1


def test_bad_jobs_is_a_one_line_error(tmp_path):
    from fedrec.cli import main as cli_main

    assert cli_main(["run", str(grid_yaml(tmp_path)), "--jobs", "0"]) == 2


def test_progress_line_counts_and_eta():
    p = GridProgress(total=4, jobs=2)
    assert math.isnan(eta_seconds(p)) and "ETA ?" in progress_text(p)
    p.done, p.running, p.walls = 1, 2, [10.0]
    assert eta_seconds(p) == 20.0  # 3 runs left on 2 jobs: two more rounds of 10 s
    assert progress_text(p) == "1/4 done, 2 running, 1 left, ETA 00:00:20"


def test_ray_grid_on_a_two_node_cluster_matches_sequential(tmp_path, capsys):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    seq, dist = tmp_path / "seq", tmp_path / "ray"
    seq.mkdir(), dist.mkdir()
    assert main(["run", str(grid_yaml(seq)), "--no-progress"]) == 0
    cluster = None
    try:
        try:
            # one CPU per node and one per run: four runs queue on two nodes and use both
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"a local 2-node Ray cluster cannot start here: {e}")
        assert main(["run", str(grid_yaml(dist)), "--no-progress", "--ray", cluster.address,
                     "--ray-cpus", "1"]) == 0
        assert results_of(seq / "runs") == results_of(dist / "runs")
        nodes = {h["node"] for h in hosts_of(dist / "runs")}
        assert nodes == {n.node_id for n in cluster.list_all_nodes()}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


def test_ray_results_are_written_on_the_driver_when_the_output_dir_is_not_shared(tmp_path):
    from fedrec.config import load
    from fedrec.grid import RunOutcome, RunTask, write_back

    cfg = load(grid_yaml(tmp_path))[0]
    task = RunTask(0, cfg, str(tmp_path / "driver"), force=False)
    files = {"summary.json": json.dumps({"status": "complete", "final": {"test_hr@5": 0.5}}),
             "metrics.csv": "round,train_loss\n1,0.5\n", "config.yaml": "name: g\n"}
    outcome = RunOutcome(0, "g", {"status": "complete"}, files=files)
    write_back(task, outcome)
    (run_dir,) = (tmp_path / "driver").iterdir()
    assert {p.name: p.read_text() for p in run_dir.iterdir()} == files
    assert outcome.summary["run_dir"] == str(run_dir)


def test_ray_resources_key_is_validated_and_left_out_of_the_digest():
    from fedrec.config import ConfigError, from_dict

    assert from_dict({"ray": {"num_gpus": 0.25}}).digest() == from_dict({}).digest()
    with pytest.raises(ConfigError, match="ray.num_cpus"):
        from_dict({"ray": {"num_cpus": -1}})


def test_local_workers_stop_their_runs_when_the_driver_dies(tmp_path):
    """The driver of `--jobs 2` killed outright (SIGKILL: no clean-up of its own): each worker
    notices, stops its run as SIGTERM does (status interrupted, a checkpoint to resume from)
    and exits, instead of computing on or waiting forever."""
    import signal
    import time

    driver, workers = _start_long_grid(tmp_path, seeds=2)
    runs = tmp_path / "runs"
    driver.send_signal(signal.SIGKILL)
    driver.wait()

    def statuses():
        out = []
        for d in sorted(runs.iterdir()):
            try:
                out.append(json.loads((d / "summary.json").read_text()).get("status"))
            except (OSError, ValueError):
                out.append(None)
        return out

    deadline = time.time() + 60
    while time.time() < deadline and statuses() != ["interrupted", "interrupted"]:
        time.sleep(0.5)
    assert statuses() == ["interrupted", "interrupted"]
    assert all((d / "checkpoint.pkl").exists() for d in runs.iterdir())
    deadline = time.time() + 10  # they exit once their runs have stopped, not after the grace
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers)


def _start_long_grid(tmp_path, seeds: int, background: bool = False):
    """`fedrec run --jobs 2` over `seeds` runs of 200,000 rounds in a child process, once
    its two workers have started their runs: (driver Popen, the two worker pids).
    background: the driver ignores SIGINT, as a shell's `&` leaves it, and its output is
    kept (communicate()); else it is discarded."""
    import os
    import signal
    import subprocess
    import sys
    import time

    text = grid_yaml(tmp_path, grid=f"  seed: {list(range(seeds))}\n").read_text()
    (tmp_path / "grid.yaml").write_text(text.replace("rounds: 4,", "rounds: 200000,"))
    root = Path(__file__).resolve().parents[1]
    out = subprocess.PIPE if background else subprocess.DEVNULL
    driver = subprocess.Popen([sys.executable, "-m", "fedrec", "run", str(tmp_path / "grid.yaml"),
                               "--jobs", "2", "--no-progress"], cwd=root,
                              env=dict(os.environ, PYTHONPATH=str(root)), stdout=out, stderr=out,
                              text=True, preexec_fn=(lambda: signal.signal(
                                  signal.SIGINT, signal.SIG_IGN)) if background else None)
    runs = tmp_path / "runs"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(runs.glob("*/metrics.csv"))) < 2:
        time.sleep(0.5)
    assert len(list(runs.glob("*/metrics.csv"))) == 2, "the two runs did not start"
    time.sleep(1.0)
    workers = [p for p in _children(driver.pid)
               if b"multiprocessing" in Path(f"/proc/{p}/cmdline").read_bytes()
               and b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(workers) == 2
    return driver, workers


def _children(pid: int) -> list[int]:
    """The pids of the live processes whose parent is pid (from /proc)."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[1]) == pid:
            out.append(int(proc.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_run_interrupted_survives_pickling():
    """A grid worker's stopped run crosses the process boundary (an unpicklable exception
    broke the whole pool: 'A child process terminated abruptly')."""
    import pickle

    from fedrec.engine import RunInterrupted

    e = pickle.loads(pickle.dumps(RunInterrupted(17, 15)))
    assert isinstance(e, RunInterrupted) and (e.round_done, e.signum) == (17, 15)


@pytest.mark.parametrize("how", ["SIGTERM to the driver", "SIGINT to one worker"])
def test_a_signal_stops_the_whole_grid_with_checkpoints(tmp_path, how):
    """`--jobs 2` over three runs, the driver running in the background (SIGINT ignored, as
    a shell's `&` leaves it): SIGTERM to the driver, or SIGINT to one of the workers, stops
    the grid: both running runs end `interrupted` with a checkpoint, the third does not start,
    the driver says so in one line and exits 130, and no process is left (before, a worker's
    stopped run broke the pool: a traceback, or a driver waiting forever)."""
    import os
    import signal
    import time

    driver, workers = _start_long_grid(tmp_path, seeds=3, background=True)
    runs = tmp_path / "runs"
    if how == "SIGTERM to the driver":
        driver.send_signal(signal.SIGTERM)
    else:
        os.kill(workers[0], signal.SIGINT)
    try:
        _, err = driver.communicate(timeout=60)
    finally:  # a driver that hangs (the old defect) must not outlive the test
        if driver.poll() is None:
            driver.kill()
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert driver.returncode == 130, err
    assert "grid stopped: 2 run(s) stopped with a checkpoint" in err
    assert "1 not started; the same command resumes them" in err and "Traceback" not in err
    dirs = sorted(runs.iterdir())
    assert len(dirs) == 2
    for d in dirs:
        assert json.loads((d / "summary.json").read_text())["status"] == "interrupted"
        assert (d / "checkpoint.pkl").exists()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers)
