"""A real Flower deployment on loopback gives the in-process runner's results exactly.

`flower-superlink --insecure` on 127.0.0.1 (free port), three `flower-supernode --insecure`
processes (one per user: `--node-config "partition-id=i num-partitions=3"`, each its own
port and FLWR_HOME, as on three machines), a connection in a temporary $FLWR_HOME/config.toml,
and `flwr run . <connection> --stream --run-config 'experiment=... overrides=... output-dir=...'`
on experiments/quickstart.yaml shrunk to 3 users by `overrides`. The experiment file is found
in the FAB that `flwr run` ships (the processes run in a temporary directory), and every user
trains every round, so the final metrics, every per-round row and the server's item table
equal `fedrec.engine.run_experiment`'s on the same resolved config, bit for bit.

Every process started here (and whatever they start) is stopped by PID in a `finally`. Skipped
when the Flower binaries are missing. Slow, so opt-in (FEDREC_RUN_SLOW=1): about 110 s on a
busy 2-core machine, since both sides poll every few seconds, every message starts a fresh
ClientApp process (which imports torch), and `flwr run .` walks the whole project directory,
.venv included, to build the FAB.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "experiments/quickstart.yaml"
N_USERS = 3
OVERRIDES = ";".join([
    f"data.synthetic.n_users={N_USERS}", "data.attacker_pool=0", "train.rounds=2",
    f"train.clients_per_round={N_USERS}", "eval.every=1", "eval.fraction=1.0", "model.dim=8",
    "output.progress=false",
])
BINARIES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")
RUN_TIMEOUT_S = 180


def _bin(name: str) -> str | None:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else shutil.which(name)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------------- processes


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, session id, state) for every process (Linux /proc)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(d.name)] = (int(fields[1]), int(fields[3]), fields[0])
    return out


class Processes:
    """Processes started here, each in a session of its own; `stop()` ends them and everything
    they started (SuperExec, ServerApp, ClientApps), also what was re-parented meanwhile: every
    process in a session led by one of them. By PID only."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], env: dict, cwd: Path) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def _ours(self) -> set[int]:
        table = _proc_table()
        ours = {p.pid for _, p in self.procs}
        todo = list(ours)
        while todo:
            parent = todo.pop()
            for pid, (ppid, _, _) in table.items():
                if ppid == parent and pid not in ours:
                    ours.add(pid)
                    todo.append(pid)
        return ours

    @staticmethod
    def _alive(ours: set[int]) -> list[int]:
        return [pid for pid, (_, sid, state) in _proc_table().items()
                if (pid in ours or sid in ours) and state != "Z" and pid != os.getpid()]

    def stop(self):
        ours = self._ours()  # collected before anything is re-parented
        for _, p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            left = self._alive(ours)
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while left and time.monotonic() < deadline:
                time.sleep(0.1)
                left = self._alive(ours)
        for _, p in self.procs:  # reap
            try:
                p.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass

    def tail(self, n: int = 3000) -> str:
        out = []
        for name, _ in self.procs:
            text = (self.logs / f"{name}.log").read_text(errors="replace")
            out.append(f"---- {name} ----\n{text[-n:]}")
        return "\n".join(out)


def _wait_healthy(proc: subprocess.Popen, port: int, what: str, timeout: float = 60):
    url = f"http://127.0.0.1:{port}/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=0.5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer on {url} within {timeout:.0f}s")


# ---------------------------------------------------------------------------- results


def _rows(path: Path) -> dict[int, dict]:
    with open(path, newline="") as f:
        return {int(r["round"]): r for r in csv.DictReader(f)}


def _engine_run(cfg, out_root, monkeypatch):
    """run_experiment, keeping the strategy's final global arrays."""
    from conftest import engine_run_capturing_arrays

    return engine_run_capturing_arrays(cfg, out_root, monkeypatch)


# ---------------------------------------------------------------------------- the test


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FEDREC_RUN_SLOW"), reason="set FEDREC_RUN_SLOW=1")
def test_loopback_deployment_matches_engine(tmp_path, monkeypatch):
    missing = [b for b in BINARIES if _bin(b) is None]
    if missing:
        pytest.skip(f"Flower binaries not found: {', '.join(missing)}")

    from fedrec.client_app import split_overrides
    from fedrec.config import load_one

    cfg = load_one(ROOT / EXPERIMENT, split_overrides(OVERRIDES))
    monkeypatch.setenv("FEDREC_CACHE", str(tmp_path / "cache"))
    engine_summary, engine_arrays = _engine_run(cfg, tmp_path / "engine", monkeypatch)
    assert engine_summary["status"] == "complete"
    assert engine_summary["data"]["users"] == N_USERS

    t0 = time.perf_counter()
    work = tmp_path / "work"  # the processes' working directory: nothing of the project here
    logs = tmp_path / "logs"
    for d in (work, logs):
        d.mkdir()
    out_root = tmp_path / "flwr-runs"
    link_port, *node_ports = _free_ports(1 + N_USERS)
    bindir = str(Path(_bin("flwr")).parent)
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("FLWR_", "FEDREC_", "RAY_"))}
    base_env.update({"PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
                     "FEDREC_CACHE": str(tmp_path / "cache"), "FEDREC_SAVE_MODEL": "1",
                     "FLWR_DISABLE_UPDATE_CHECK": "1"})

    def env_with_home(name: str) -> dict:
        home = tmp_path / "homes" / name
        home.mkdir(parents=True)
        return {**base_env, "FLWR_HOME": str(home)}

    # the CLI's connection table
    cli_env = env_with_home("cli")
    Path(cli_env["FLWR_HOME"], "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n'
        '[superlink.local]\naddress = ":local:"\n\n'
        f'[superlink.loopback-deployment]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')

    procs = Processes(logs)
    try:
        link = procs.start("superlink", [
            _bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
            "--disable-runtime-dependency-installation",
            "--database", str(tmp_path / "superlink.db")], env_with_home("superlink"), work)
        _wait_healthy(link, link_port, "flower-superlink")
        for i, port in enumerate(node_ports):
            procs.start(f"supernode-{i}", [
                _bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                "--host", "127.0.0.1", "--port", str(port),
                "--node-config", f"partition-id={i} num-partitions={N_USERS}"],
                env_with_home(f"supernode-{i}"), work)
        run_config = " ".join([f'experiment="{EXPERIMENT}"', f'overrides="{OVERRIDES}"',
                               f'output-dir="{out_root}"'])
        try:
            res = subprocess.run([_bin("flwr"), "run", ".", "loopback-deployment", "--stream",
                                  "--run-config", run_config], cwd=str(ROOT), env=cli_env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 timeout=RUN_TIMEOUT_S)
            out = res.stdout
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            pytest.fail(f"flwr run did not finish in {RUN_TIMEOUT_S}s\n{out[-3000:]}\n"
                        f"{procs.tail()}")
        assert res.returncode == 0, f"{out[-4000:]}\n{procs.tail()}"
        assert "fedrec: final" in out, f"{out[-4000:]}\n{procs.tail()}"
    finally:
        procs.stop()
    elapsed = time.perf_counter() - t0
    left = Processes._alive(procs._ours() | {p.pid for _, p in procs.procs})
    assert not left, f"processes left running: {left}"

    # the run directory: summary.json with final test metrics, equal to the engine's
    dirs = sorted(out_root.glob(f"{cfg.name}-*-flwr"))
    assert len(dirs) == 1, list(out_root.iterdir()) if out_root.exists() else out
    flwr_dir = dirs[0]
    summary = json.loads((flwr_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["runner"] == "flwr"
    assert summary["supernodes"] == N_USERS
    assert summary["overrides"] == split_overrides(OVERRIDES)
    f_final = {k: v for k, v in summary["final"].items() if k.startswith(("test_", "val_"))}
    e_final = {k: v for k, v in engine_summary["final"].items()
               if k.startswith(("test_", "val_"))}
    assert {f"test_hr@{k}" for k in cfg.eval.ks} <= set(f_final)
    assert {f"test_ndcg@{k}" for k in cfg.eval.ks} <= set(f_final)
    assert f_final == e_final  # exact
    # every round's losses, accepted counts and evaluations too
    e_rows = _rows(Path(engine_summary["run_dir"]) / "metrics.csv")
    f_rows = _rows(flwr_dir / "metrics.csv")
    assert e_rows.keys() == f_rows.keys() == set(range(1, cfg.train.rounds + 1))
    for rnd, row in e_rows.items():
        for k, v in row.items():
            if k.startswith(("test_", "val_", "train_loss", "accepted", "clients")):
                assert f_rows[rnd][k] == v, (rnd, k, f_rows[rnd][k], v)
    # and the server's final item table (FEDREC_SAVE_MODEL=1)
    model = np.load(flwr_dir / "model.npz")
    assert np.array_equal(model["item_table"], engine_arrays[0])
    print(f"loopback deployment: {elapsed:.1f}s; final {f_final}")
