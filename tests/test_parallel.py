"""Process-parallel clients (fedrec/parallel.py): bit-identical to one process, no orphans."""

import multiprocessing as mp
import os
import signal

import numpy as np
import pytest

import fedrec.parallel
from clients.benign import BenignClient
from fedrec.engine import Engine
from fedrec.errors import ConfigError
from fedrec.parallel import WorkerError

pytestmark = pytest.mark.skipif(not fedrec.parallel.fork_available(), reason="needs fork")


def _cfg(tmp_path, **over):
    from conftest import tiny_cfg

    return tiny_cfg(tmp_path, **{"train__clients_per_round": 12,
                                 "output__dir": str(tmp_path / "runs"), **over})


class Log:
    """A recorder that keeps every logged value as is."""

    def __init__(self):
        self.fit, self.eval = [], []

    def log_fit(self, rnd, metrics):
        # several calls per round (strategy, detection, adversary) merge into one row, as
        # RunRecorder does
        if self.fit and self.fit[-1][0] == rnd:
            self.fit[-1][1].update(metrics)
        else:
            self.fit.append((rnd, dict(metrics)))

    def log_eval(self, rnd, metrics, final):
        self.eval.append((rnd, dict(metrics), final))


def _states(host, k=None):
    """The private states held by a DeviceHost (the engine's, or a worker's copy)."""
    return {u: {key: v.copy() for key, v in s.state.items()} for u, s in host.stores.items()}


def _run(cfg, workers):
    log = Log()
    eng = Engine(cfg, recorder=log, progress=False, workers=workers)
    out = eng.run()
    table = [a.copy() for a in eng.strategy.global_arrays()]
    if workers == 1:
        states = _states(eng.host)
    else:
        states = {}
        assert not mp.active_children()
    return out, log, table, states, eng


def _worker_states(host, k):
    return _states(host)


@pytest.mark.parametrize("negatives,dropout,workers", [
    ("fresh", 0.2, 2), ("static", 0.2, 2), ("fresh", 0.0, 3)])
def test_workers_give_bit_identical_results(tmp_path, negatives, dropout, workers):
    cfg = _cfg(tmp_path, data__negatives=negatives, model__dropout=dropout)
    one, log1, table1, states1, _ = _run(cfg, 1)
    # the same run again, with the private state fetched from the workers before they stop
    log = Log()
    eng = Engine(cfg, recorder=log, progress=False, workers=workers)
    for rnd in range(1, cfg.train.rounds + 1):
        eng.run_round(rnd)
        if eng.strategy.is_eval_round(rnd):
            eng.evaluate(rnd, rnd == cfg.train.rounds)
    assert len(mp.active_children()) == workers
    per_worker = eng.pool().call(_worker_states)
    eng.close()
    assert not mp.active_children()
    states = {}
    for k, part in enumerate(per_worker):
        assert all(u % workers == k for u in part)  # a user's state lives in its owner only
        states.update(part)
    assert log.fit == log1.fit  # every round's metrics, train_loss included, exactly
    assert [r[1]["train_loss"] for r in log.fit] == [r[1]["train_loss"] for r in log1.fit]
    assert log.eval == log1.eval and log.eval[-1][1] == one["final"]
    assert all(np.array_equal(a, b) for a, b in zip(eng.strategy.global_arrays(), table1))
    assert states.keys() == states1.keys()
    for u, s in states1.items():
        assert all(np.array_equal(s[key], states[u][key]) for key in s)
    # and through Engine.run (pool started and stopped by the run)
    two, log2, table2, _, _ = _run(cfg, workers)
    assert two["final"] == one["final"] and log2.fit == log1.fit
    assert all(np.array_equal(a, b) for a, b in zip(table2, table1))


def test_uploads_that_do_not_fit_the_arena_go_through_the_pipe(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, train__rounds=4)
    one, log1, table1, _, _ = _run(cfg, 1)
    monkeypatch.setattr(fedrec.parallel, "_MAX_ARENA", 2000)  # a few uploads per round fit
    two, log2, table2, _, _ = _run(cfg, 2)
    assert two["final"] == one["final"] and log2.fit == log1.fit
    assert all(np.array_equal(a, b) for a, b in zip(table2, table1))


def test_invalid_uploads_are_dropped_alike(tmp_path, monkeypatch):
    honest = BenignClient.craft_upload

    def craft(self, ids, rows, predictor, state, rnd):
        ids, rows, predictor = honest(self, ids, rows, predictor, state, rnd)
        if self.user % 4 == 1:
            rows = rows.astype(np.float64)  # wrong dtype: the slow validation path
            rows[0, 0] = np.nan
        return ids, rows, predictor

    monkeypatch.setattr(BenignClient, "craft_upload", craft)
    cfg = _cfg(tmp_path, train__rounds=4)
    one, log1, _, _, _ = _run(cfg, 1)
    two, log2, _, _, _ = _run(cfg, 2)
    assert sum(m["invalid"] for _, m in log1.fit) > 0
    assert log2.fit == log1.fit and two["invalid_uploads"] == one["invalid_uploads"]


def test_worker_error_surfaces_with_its_traceback(tmp_path, monkeypatch):
    honest = BenignClient.craft_upload

    def craft(self, ids, rows, predictor, state, rnd):
        if rnd == 3 and self.user % 2 == 1:
            raise ValueError(f"boom in user {self.user}")
        return honest(self, ids, rows, predictor, state, rnd)

    monkeypatch.setattr(BenignClient, "craft_upload", craft)
    eng = Engine(_cfg(tmp_path), progress=False, workers=2)
    with pytest.raises(WorkerError) as info:
        eng.run()
    text = str(info.value)
    assert "worker 1 failed" in text and "Traceback" in text and "ValueError: boom in user" in text
    assert "craft" in text  # the worker's own frames
    assert not mp.active_children()
    with pytest.raises(RuntimeError, match="stopped"):  # the pool is gone with its clients' state
        eng.run_round(1)


def test_dead_worker_is_reported_and_the_pool_stops(tmp_path):
    eng = Engine(_cfg(tmp_path), progress=False, workers=2)
    eng.run_round(1)
    victim = eng.pool().procs[0]
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(5)
    with pytest.raises(WorkerError, match="worker 0 died"):
        eng.run_round(2)
    assert not mp.active_children()
    eng.close()
    with pytest.raises(RuntimeError, match="stopped"):  # its clients' state is gone
        eng.run_round(3)


def test_interrupt_stops_the_workers(tmp_path, monkeypatch):
    eng = Engine(_cfg(tmp_path), progress=False, workers=2)
    real = eng.strategy.aggregate_uploads

    def aggregate(rnd, results):
        if rnd == 2:
            raise KeyboardInterrupt
        return real(rnd, results)

    monkeypatch.setattr(eng.strategy, "aggregate_uploads", aggregate)
    with pytest.raises(KeyboardInterrupt):
        eng.run()
    assert not mp.active_children()


def test_workers_from_the_environment(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    monkeypatch.setenv("FEDREC_WORKERS", "2")
    assert Engine(cfg, progress=False).workers == 2
    assert Engine(cfg, progress=False, workers=1).workers == 1
    monkeypatch.setenv("FEDREC_WORKERS", "zero")
    with pytest.raises(ConfigError, match="FEDREC_WORKERS"):
        Engine(cfg, progress=False)


def test_fedrec_run_uses_two_processes_for_large_cohorts(tmp_path, monkeypatch):
    from fedrec.engine import auto_workers, run_experiment

    import fedrec.runtime

    monkeypatch.delenv("FEDREC_WORKERS", raising=False)
    cores = {"n": 2}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores["n"])))
    # a 2-core machine: MF rounds are small, so 2 workers (plus this process) lose to one even
    # with nothing else running; the sequential models' heavy rounds use both cores when free
    monkeypatch.setattr(fedrec.runtime, "busy_cores", lambda: 0.0)
    assert auto_workers(_cfg(tmp_path, train__clients_per_round=16)) == 1
    assert auto_workers(_cfg(tmp_path, train__clients_per_round=16, model__name="sasrec")) == 2
    # ... and any other job on one of the two cores gets one process for every model
    monkeypatch.setattr(fedrec.runtime, "busy_cores", lambda: 1.0)
    assert auto_workers(_cfg(tmp_path, train__clients_per_round=16)) == 1
    assert auto_workers(_cfg(tmp_path, train__clients_per_round=16, model__name="sasrec")) == 1
    # 4 cores, one busy: 3 free, enough for 2 MF workers and the aggregating parent
    cores["n"] = 4
    assert auto_workers(_cfg(tmp_path, train__clients_per_round=16)) == 2
    assert auto_workers(_cfg(tmp_path, train__clients_per_round=15)) == 1
    monkeypatch.setattr(fedrec.runtime, "busy_cores", lambda: 2.0)
    assert auto_workers(_cfg(tmp_path, train__clients_per_round=16)) == 1
    monkeypatch.setattr(fedrec.runtime, "busy_cores", lambda: 0.0)
    cfg = _cfg(tmp_path, train__clients_per_round=20, train__rounds=3)
    a = run_experiment(cfg, output_root=tmp_path / "a", progress=False)
    monkeypatch.setenv("FEDREC_WORKERS", "1")
    assert auto_workers(cfg) == 1
    b = run_experiment(cfg, output_root=tmp_path / "b", progress=False)
    assert a["workers"] == 2 and b["workers"] == 1
    assert a["final"] == b["final"] and not mp.active_children()
    rows = [(tmp_path / d / f"tiny-{cfg.digest()}" / "metrics.csv").read_text() for d in "ab"]
    assert rows[0] == rows[1]


def test_parent_has_no_clients_when_workers_hold_them(tmp_path):
    eng = Engine(_cfg(tmp_path), progress=False, workers=2)
    with pytest.raises(RuntimeError, match="worker processes"):
        eng.client(0)
