"""CPU seconds of a run (fedrec/cputime.py): summaries, checkpoints, worker pools, tables."""

import json
import multiprocessing as mp
import os
import time

import pytest

import fedrec.parallel
from fedrec.cputime import pid_cpu_seconds, process_cpu_seconds
from fedrec.results import RunRecorder


def _spin(seconds: float):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def _spin_then_wait(seconds, ready, done):
    _spin(seconds)
    ready.set()
    done.wait(30)


def test_pid_cpu_seconds_reads_a_live_child_and_counts_no_sleep():
    ctx = mp.get_context("fork" if fedrec.parallel.fork_available() else "spawn")
    ready, done = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_spin_then_wait, args=(0.3, ready, done))
    child.start()
    try:
        assert ready.wait(30)
        live = pid_cpu_seconds(child.pid)
        if not os.path.exists(f"/proc/{child.pid}/stat"):
            pytest.skip("no /proc here: live children are counted once reaped")
        assert 0.25 <= live <= 1.0  # its spin, not the waiting after it
    finally:
        done.set()
        child.join(30)
    assert pid_cpu_seconds(child.pid) == 0.0  # gone: unreadable, not an error


def test_process_cpu_seconds_counts_work_not_sleep():
    start = process_cpu_seconds()
    time.sleep(0.3)
    slept = process_cpu_seconds() - start
    _spin(0.2)
    spun = process_cpu_seconds() - start - slept
    assert slept < 0.1 and 0.18 <= spun <= 0.5


def test_recorder_adds_earlier_segments_and_says_when_they_are_unknown(tmp_path):
    from conftest import tiny_cfg

    cfg = tiny_cfg(tmp_path)
    clock = iter([10.0, 14.5])  # CPU seconds of the run's processes at start and at the end
    fresh = RunRecorder(cfg, tmp_path / "a", "engine", cpu_clock=lambda: next(clock)).finish()
    assert fresh["cpu_time_s"] == 4.5 and "cpu_time_segment_s" not in fresh
    clock = iter([100.0, 102.0])
    resumed = RunRecorder(cfg, tmp_path / "b", "engine", prior_cpu_s=7.0,
                          cpu_clock=lambda: next(clock)).finish()
    assert resumed["cpu_time_s"] == 9.0 and resumed["cpu_time_segment_s"] == 2.0
    clock = iter([0.0, 3.0])  # a checkpoint from before CPU time was kept: the total is unknown
    unknown = RunRecorder(cfg, tmp_path / "c", "engine", prior_cpu_s=None,
                          cpu_clock=lambda: next(clock)).finish()
    assert "cpu_time_s" not in unknown and unknown["cpu_time_segment_s"] == 3.0
    clock = iter([0.0, 1.0])
    server = RunRecorder(cfg, tmp_path / "d", "flwr", cpu_clock=lambda: next(clock),
                         cpu_key="server_cpu_time_s").finish()
    assert server["server_cpu_time_s"] == 1.0 and "cpu_time_s" not in server
    on_disk = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert on_disk["cpu_time_s"] == 9.0


@pytest.mark.skipif(not fedrec.parallel.fork_available(), reason="needs fork")
def test_engine_clock_counts_its_live_workers(tmp_path):
    """With a worker pool the clients train in other processes: their CPU is the run's too."""
    from conftest import tiny_cfg
    from fedrec.engine import Engine

    cfg = tiny_cfg(tmp_path, train__rounds=40, train__clients_per_round=30, model__dim=32)
    eng = Engine(cfg, progress=False, workers=2)
    try:
        for rnd in range(1, 41):
            eng.run_round(rnd)
        own, total = process_cpu_seconds(), eng.cpu_seconds()
        workers = eng.pool().live_cpu_seconds()
        assert workers >= 0.05  # the clients' training, in the workers
        assert total - own == pytest.approx(workers, abs=0.03)
    finally:
        eng.close()
    assert not mp.active_children()
    # closed and reaped, the workers' CPU is this process's RUSAGE_CHILDREN
    assert process_cpu_seconds() >= total - 0.03


def test_reproduce_table_shows_cpu_where_runs_record_it(tmp_path):
    from fedrec.reproduce import CellResult, whole_run_cpu
    from fedrec.reproduce_format import format_report

    assert whole_run_cpu({"cpu_time_s": 12.5}) == 12.5
    assert whole_run_cpu({"wall_time_s": 30.0}) is None

    class Rep:
        orders = []
        results = [CellResult("a", "test_hr@5", "value", 1, 1, 0.05, 0.0, None, [], 30.0, 0.0,
                              {0: 0.05}, 12.5, 0.5),
                   CellResult("b", "test_hr@5", "value", 1, 1, 0.04, 0.0, None, [], 31.0, 0.0,
                              {0: 0.04})]

    lines = format_report(Rep()).splitlines()
    assert lines[0].endswith("| wall s/run | CPU s/run |")
    assert lines[2].endswith("| 30.0 ± 0.0 | 12.5 ± 0.5 |")
    assert lines[3].endswith("| 31.0 ± 0.0 | |")
    Rep.results = Rep.results[1:]  # no run records it: the column is left out
    assert format_report(Rep()).splitlines()[0].endswith("| wall s/run |")
