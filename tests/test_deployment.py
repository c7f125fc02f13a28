"""Real Flower deployments (tests/deployment_harness.py): separate SuperLink and SuperNode
processes, each SuperNode holding only its exported partition file, the ServerApp only the
public.json (`fedrec partition export`); `flwr run . deployment --stream` against them.

- loopback, plain: every user trains every round, so the final metrics, every per-round row
  and the server's item table equal `fedrec.engine.run_experiment`'s, bit for bit;
- several hosts (a network namespace each, veth links to one bridge), TLS and SuperNode
  authentication: an unregistered SuperNode and one without the CA are refused; one SuperNode
  is killed mid-run (its ClientApps too) and its failure recorded, it comes back and rejoins,
  the run completes, and the rounds before the kill equal the in-process runner's.

Neither the SuperNodes nor the ServerApp open the data set: their cache folders stay empty.
Every process started here is stopped by PID, namespaces and links removed, in `finally`.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deployment_harness as dh  # noqa: E402

ROOT = dh.ROOT
EXPERIMENT = "experiments/quickstart.yaml"


def _overrides(n_users: int, rounds: int, extra=(), pool: float = 0.0) -> str:
    return ";".join([
        f"data.synthetic.n_users={n_users}", f"data.attacker_pool={pool}", f"train.rounds={rounds}",
        f"train.clients_per_round={n_users}", "eval.every=1", "eval.fraction=1.0",
        "model.dim=8", "output.progress=false", *extra])


def _rows(path: Path) -> dict[int, dict]:
    with open(path, newline="") as f:
        return {int(r["round"]): r for r in csv.DictReader(f)}


def _prepare(tmp_path, monkeypatch, overrides: str):
    """The engine's run of the resolved config, and the exported partitions."""
    from conftest import engine_run_capturing_arrays
    from fedrec.client_app import split_overrides
    from fedrec.config import load_one

    cfg = load_one(ROOT / EXPERIMENT, split_overrides(overrides))
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "engine-cache"))
    engine_summary, engine_arrays = engine_run_capturing_arrays(cfg, tmp_path / "engine",
                                                                monkeypatch)
    assert engine_summary["status"] == "complete"
    parts = tmp_path / "parts"
    res = subprocess.run([sys.executable, "-m", "fedrec", "partition", "export", EXPERIMENT,
                          str(parts), *sum((["--set", o] for o in split_overrides(overrides)), [])],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**dh.os.environ, "FEDREC_CACHE": str(tmp_path / "export-cache")})
    assert res.returncode == 0, res.stderr
    return cfg, engine_summary, engine_arrays, parts


def _run_config(overrides: str, out_root: Path, parts: Path) -> str:
    return " ".join([f'experiment="{EXPERIMENT}"', f'overrides="{overrides}"',
                     f'output-dir="{out_root}"', f'public-info="{parts / "public.json"}"'])


def _flwr_dir(out_root: Path, cfg) -> Path:
    dirs = sorted(out_root.glob(f"{cfg.name}-*-flwr"))
    assert len(dirs) == 1, list(out_root.iterdir()) if out_root.exists() else "no runs"
    return dirs[0]


def _no_data_opened(*caches: Path):
    for c in caches:
        assert not c.exists() or not any(c.rglob("*")), f"data were prepared in {c}"


def _skip_without_binaries():
    missing = dh.missing_binaries()
    if missing:
        pytest.skip(f"Flower binaries not found: {', '.join(missing)}")


@pytest.mark.slow
def test_loopback_deployment_from_partitions_matches_engine(tmp_path, monkeypatch):
    _skip_without_binaries()
    n_users = 4  # one of them a LabelFlip attacker (a local attack: on its own SuperNode)
    overrides = _overrides(n_users, 2, ["attack.name=labelflip", "attack.malicious_fraction=0.25"],
                           pool=0.25)
    cfg, engine_summary, engine_arrays, parts = _prepare(tmp_path, monkeypatch, overrides)
    attackers = [u for u in range(n_users)
                 if json.loads((parts / f"user-{u}.json").read_text())["malicious"]]
    assert len(attackers) == 1
    out_root = tmp_path / "flwr-runs"
    caches = {"server": tmp_path / "server-cache"}
    fed = dh.Federation(tmp_path / "fed", env={"FEDREC_SAVE_MODEL": "1"})
    t0 = time.perf_counter()
    try:
        fed.base_env["FEDREC_CACHE"] = str(caches["server"])
        fed.start_superlink()
        for i in range(n_users):
            caches[f"node{i}"] = tmp_path / f"node{i}-cache"
            fed.start_supernode(
                f"supernode-{i}",
                f"partition-id={i} num-partitions={n_users} data-path=\"{parts}/user-{i}.json\"",
                env={"FEDREC_CACHE": str(caches[f"node{i}"])})
        rc, out = fed.flwr_run(_run_config(overrides, out_root, parts), timeout=240)
        assert rc == 0, f"{out[-4000:]}\n{fed.procs.tail()}"
        assert "fedrec: final" in out, f"{out[-4000:]}\n{fed.procs.tail()}"
    finally:
        fed.stop()
    elapsed = time.perf_counter() - t0
    assert not dh.alive(fed.procs.ours()), "processes left running"
    _no_data_opened(*caches.values())

    flwr_dir = _flwr_dir(out_root, cfg)
    summary = json.loads((flwr_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["runner"] == "flwr"
    assert summary["supernodes"] == n_users and summary["client_failures"] == 0
    pick = ("test_", "val_")
    f_final = {k: v for k, v in summary["final"].items() if k.startswith(pick)}
    e_final = {k: v for k, v in engine_summary["final"].items() if k.startswith(pick)}
    assert {f"test_hr@{k}" for k in cfg.eval.ks} <= set(f_final)
    assert f_final == e_final  # exact
    e_rows = _rows(Path(engine_summary["run_dir"]) / "metrics.csv")
    f_rows = _rows(flwr_dir / "metrics.csv")
    assert e_rows.keys() == f_rows.keys() == set(range(1, cfg.train.rounds + 1))
    for rnd, row in e_rows.items():
        for k, v in row.items():
            if k.startswith(("test_", "val_", "train_loss", "accepted", "clients")):
                assert f_rows[rnd][k] == v, (rnd, k, f_rows[rnd][k], v)
    model = np.load(flwr_dir / "model.npz")
    assert np.array_equal(model["item_table"], engine_arrays[0])
    print(f"loopback deployment from partitions: {elapsed:.1f}s")


@pytest.mark.slow
def test_secure_multi_host_deployment_survives_a_lost_supernode(tmp_path, monkeypatch):
    _skip_without_binaries()
    why = dh.Hosts.available()
    if why:
        pytest.skip(f"no network namespaces here: {why}")
    n_users, rounds, kill_at = 3, 7, 3
    overrides = _overrides(n_users, rounds, ["flower.round_timeout=20"])
    cfg, engine_summary, _, parts = _prepare(tmp_path, monkeypatch, overrides)
    out_root = tmp_path / "flwr-runs"
    names = ["link"] + [f"node{i}" for i in range(n_users)] + ["rogue", "nocert"]
    with dh.Hosts(names) as hosts:
        certs = tmp_path / "certs"
        res = subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), "--out",
                              str(certs), "--nodes", str(n_users + 1), "--san",
                              hosts.ip["link"]], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        caches = {"server": tmp_path / "server-cache"}
        fed = dh.Federation(tmp_path / "fed", certs=certs, auth=True, hosts=hosts,
                            link_host="link", env={"FEDREC_CACHE": str(caches["server"])})

        def node(i: int):
            caches[f"node{i}"] = tmp_path / f"node{i}-cache"
            return fed.start_supernode(
                f"supernode-{i}",
                f"partition-id={i} num-partitions={n_users} data-path=\"{parts}/user-{i}.json\"",
                host=f"node{i}", key=certs / f"supernode-{i}",
                env={"FEDREC_CACHE": str(caches[f"node{i}"])})

        events: dict[str, float] = {}
        lock = threading.Lock()

        done = threading.Event()

        def revive():
            # the SuperLink refuses the same key ("could not be activated") while it still
            # holds the lost node's session (until its heartbeat expires): start it again
            # until it is accepted, as an operator would
            while not done.is_set():
                proc = node(1)
                fed.procs.killed.add(proc.pid)  # its exit is expected, not a harness failure
                while proc.poll() is None and not done.is_set():
                    time.sleep(0.5)
                if not done.is_set():
                    events["refused_restarts"] = events.get("refused_restarts", 0) + 1
                    time.sleep(2)

        def on_line(line: str):
            # kill user 1's host when round `kill_at` starts; bring it back one round later
            with lock:
                if f"[ROUND {kill_at}]" in line and "killed" not in events:
                    fed.procs.kill("supernode-1")
                    events["killed"] = time.monotonic()
                elif f"[ROUND {kill_at + 1}]" in line and "back" not in events:
                    threading.Thread(target=revive, daemon=True).start()
                    events["back"] = time.monotonic()

        t0 = time.perf_counter()
        try:
            fed.start_superlink()
            for i in range(n_users):
                reg = fed.register(certs / f"supernode-{i}.pub")
                assert reg.returncode == 0 and "registered" in reg.stdout, reg.stdout + reg.stderr
            for i in range(n_users):
                node(i)
            # an unregistered key, and a node that does not trust the CA: both refused
            rogue = fed.start_supernode("rogue", f"partition-id=0 num-partitions={n_users}",
                                        host="rogue", key=certs / f"supernode-{n_users}",
                                        max_retries=1)
            nocert = fed.start_supernode("nocert", f"partition-id=0 num-partitions={n_users}",
                                         host="nocert", key=certs / "supernode-0",
                                         root_certificates=False, max_retries=1)
            try:
                rc, out = fed.flwr_run(_run_config(overrides, out_root, parts), timeout=480,
                                       on_line=on_line)
            finally:
                done.set()
            assert rc == 0, f"{out[-4000:]}\n{fed.procs.tail()}"
            assert "fedrec: final" in out, f"{out[-4000:]}\n{fed.procs.tail()}"
            for p, name in ((rogue, "rogue"), (nocert, "nocert")):
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"{name} SuperNode still running: it was not refused\n"
                                f"{fed.procs.log_text(name)[-2000:]}")
                assert p.returncode != 0
            assert "Failed to activate SuperNode" in fed.procs.log_text("rogue"), \
                fed.procs.log_text("rogue")[-2000:]
            assert "CERTIFICATE_VERIFY_FAILED" in fed.procs.log_text("nocert"), \
                fed.procs.log_text("nocert")[-2000:]
        finally:
            fed.stop()
        elapsed = time.perf_counter() - t0
        assert not dh.alive(fed.procs.ours()), "processes left running"
    assert {"killed", "back"} <= set(events), out[-3000:]
    _no_data_opened(*caches.values())

    flwr_dir = _flwr_dir(out_root, cfg)
    summary = json.loads((flwr_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["supernodes"] == n_users
    f_rows = _rows(flwr_dir / "metrics.csv")
    e_rows = _rows(Path(engine_summary["run_dir"]) / "metrics.csv")
    assert f_rows.keys() == set(range(1, rounds + 1))
    # before the kill: the in-process runner's rounds exactly
    for rnd in range(1, kill_at):
        for k, v in e_rows[rnd].items():
            if k.startswith(("test_", "val_", "train_loss", "accepted", "clients")):
                assert f_rows[rnd][k] == v, (rnd, k, f_rows[rnd][k], v)
    # the lost SuperNode's round is a failure, not a crash; it rejoins later
    failed = [r for r in range(kill_at, rounds + 1) if int(f_rows[r]["failures"]) > 0]
    assert failed and min(failed) == kill_at, {r: f_rows[r]["failures"] for r in f_rows}
    assert summary["client_failures"] >= 1
    last = f_rows[rounds]
    assert int(last["failures"]) == 0 and int(last["accepted"]) == n_users, last
    print(f"multi-host TLS + auth deployment: {elapsed:.1f}s, failures in rounds {failed}, "
          f"{events.get('refused_restarts', 0)} restart(s) refused before the rejoin")
