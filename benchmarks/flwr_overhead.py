"""Flower's cost floor vs fedrec under `flwr run`, side by side; prints JSON.

Runs, against one SuperLink of its own (temporary FLWR_HOME, free ports, stopped by PID at
the end, whatever happens):
  (i)  benchmarks/bare_app: broadcasts a 3706x64 float32 table to K sampled clients per round
       and receives 100-row replies, doing no work;
  (ii) fedrec (this project) with an experiment (default: experiments/quickstart.yaml),
with the same K and the same number of SuperNodes (the experiment's number of users), for N
rounds each, plus (iii) the in-process runner on the same experiment for reference.

Seconds per round exclude start-up: both ServerApps time each round from `configure_fit` to
the end of `aggregate_fit`; the figure is (end of round N's fit - start of round 2) / (N - 1).
fedrec runs with eval.every=0, so only the last round evaluates (every user), after the
timed span. Usage:

    python benchmarks/flwr_overhead.py --rounds 20
    python benchmarks/flwr_overhead.py --rounds 20 --clients 20 --match-table
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

ROOT = Path(__file__).resolve().parents[1]
BARE_APP = Path(__file__).resolve().parent / "bare_app"


# ---------------------------------------------------------------------------- SuperLink


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def _children() -> dict:
    """ppid -> [pid] for every process (Linux /proc)."""
    out: dict = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(d.name))
    return out


def _descendants(pid: int) -> list[int]:
    kids, todo, seen = _children(), [pid], []
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            if c not in seen:
                seen.append(c)
                todo.append(c)
    return seen


class LocalSuperLink:
    """A simulation SuperLink for `flwr run`, owned by this process.

    It is started like the one `flwr run` starts by itself for the `:local:` connection, but on
    free ports (FLWR_LOCAL_SUPERLINK_HTTP_API_PORT / FLWR_LOCAL_CONTROL_API_PORT) and with a
    private FLWR_HOME, so `flwr run` finds and uses it, never another one; and it is stopped
    (with the processes it started: SuperExec, flwr-simulation, Ray) by PID on exit.
    Runtime dependency installation is off.
    """

    def __init__(self, home, env: dict | None = None, startup_timeout: float = 60.0):
        self.home = Path(home)
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    def _bin(self, name: str) -> str:
        cand = Path(sys.executable).parent / name
        return str(cand) if cand.exists() else (shutil.which(name) or name)

    def start(self):
        self.home.mkdir(parents=True, exist_ok=True)
        self.http_port, self.control_port = _free_port(), _free_port()
        self.env = {**os.environ, **self.extra_env, "FLWR_HOME": str(self.home),
                    "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.http_port),
                    "FLWR_LOCAL_CONTROL_API_PORT": str(self.control_port),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DISABLE_USAGE_STATS": "1"}
        cmd = [self._bin("flower-superlink"), "--insecure", "--simulation",
               "--isolation", "subprocess", "--control-api-address",
               f"127.0.0.1:{self.control_port}", "--host", "127.0.0.1",
               "--port", str(self.http_port), "--disable-runtime-dependency-installation",
               "--log-file", str(self.home / "superlink.log")]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://127.0.0.1:{self.http_port}/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with {self.proc.returncode}; "
                                   f"see {self.home / 'superlink.log'}")
            try:
                with urllib.request.urlopen(url, timeout=0.5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"flower-superlink did not answer on {url} in "
                           f"{self.startup_timeout:.0f}s")

    def flwr_run(self, app, run_config: dict, num_supernodes: int, timeout: float = 600,
                 cpus_per_client: int = 1) -> subprocess.CompletedProcess:
        """`flwr run APP --stream` on this SuperLink; stdout and stderr together."""
        rc = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
        cmd = [self._bin("flwr"), "run", str(app), "--stream", "--federation-config",
               f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"]
        if rc:
            cmd += ["--run-config", rc]
        try:
            return subprocess.run(cmd, env=self.env, cwd=str(app), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            return subprocess.CompletedProcess(cmd, 124, out + f"\n[timed out after {timeout}s]")

    def stop(self):
        if self.proc is None:
            return
        tree = _descendants(self.proc.pid)  # collected before anything is re-parented
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        tree += [p for p in _descendants(self.proc.pid) if p not in tree]
        from deployment_harness import kill_tree  # tests/: SIGTERM, then SIGKILL, by PID

        kill_tree(set(tree), grace=10.0)
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------------------- benchmark


def _engine_seconds_per_round(cfg, rounds: int) -> float:
    """The in-process runner on the same config: rounds 2..N, no evaluation."""
    from fedrec.engine import Engine

    eng = Engine(cfg, progress=False)
    eng.run_round(1)
    t0 = time.perf_counter()
    for rnd in range(2, rounds + 1):
        eng.run_round(rnd)
    return (time.perf_counter() - t0) / max(1, rounds - 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experiment", default="experiments/quickstart.yaml")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=0,
                    help="clients per round (0 = the experiment's train.clients_per_round)")
    ap.add_argument("--match-table", action="store_true",
                    help="bare app broadcasts a table of the experiment's size, not 3706x64")
    ap.add_argument("--bare-max-workers", type=int, default=-1,
                    help="bare app's client threads (-1 = as fedrec's ServerApp; 0 = Flower's "
                         "default)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per flwr run")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)
    if args.rounds < 2:
        ap.error("--rounds must be at least 2 (round 1 is start-up and is not timed)")

    sys.path.insert(0, str(ROOT))
    from fedrec.build import build_env
    from fedrec.config import load_one
    from fedrec.server_app import max_workers

    exp = Path(args.experiment)
    exp = exp if exp.is_absolute() else (ROOT / exp)
    probe = load_one(exp)
    k = args.clients or probe.train.clients_per_round
    overrides = [f"train.rounds={args.rounds}", "eval.every=0", f"train.clients_per_round={k}",
                 "output.progress=false"]
    cfg = load_one(exp, overrides)
    env = build_env(cfg)
    n = env.data.n_users
    n_items, dim = (env.model.n_items, env.model.dim) if args.match_table else (3706, 64)

    tmp = Path(tempfile.mkdtemp(prefix="flwr_overhead_"))
    out: dict = {"rounds": args.rounds, "clients_per_round": k, "supernodes": n,
                 "experiment": str(exp), "bare_table": [n_items, dim],
                 "fedrec_table": [env.model.n_items, env.model.dim], "cpus": os.cpu_count()}
    try:
        with LocalSuperLink(tmp / "flwr-home", env={"FEDREC_CACHE": str(tmp / "cache")}) as link:
            t0 = time.perf_counter()
            res = link.flwr_run(BARE_APP, {
                "num-server-rounds": args.rounds, "clients-per-round": k, "min-nodes": n,
                "n-items": n_items, "dim": dim, "reply-rows": 100,
                "max-workers": args.bare_max_workers if args.bare_max_workers >= 0
                else max_workers(cfg),
                "output": str(tmp / "bare.json")}, num_supernodes=n, timeout=args.timeout)
            bare_wall = time.perf_counter() - t0
            if res.returncode != 0 or not (tmp / "bare.json").exists():
                raise SystemExit(f"bare app failed (rc {res.returncode}):\n{res.stdout[-3000:]}")
            bare = json.loads((tmp / "bare.json").read_text())

            t0 = time.perf_counter()
            res = link.flwr_run(ROOT, {"experiment": str(exp), "overrides": ";".join(overrides),
                                       "output-dir": str(tmp / "runs")},
                                num_supernodes=n, timeout=args.timeout)
            ours_wall = time.perf_counter() - t0
            summaries = list((tmp / "runs").glob("*-flwr/summary.json"))
            if res.returncode != 0 or not summaries:
                raise SystemExit(f"fedrec failed (rc {res.returncode}):\n{res.stdout[-3000:]}")
            ours = json.loads(summaries[0].read_text())
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    b = bare["seconds_per_round_after_first"]
    o = ours["seconds_per_round_after_first"]
    out["bare"] = {"seconds_per_round": round(b, 4), "first_round_s": round(bare["round_time_s"][0], 3),
                   "flwr_run_wall_s": round(bare_wall, 2)}
    out["fedrec"] = {"seconds_per_round": round(o, 4), "flwr_run_wall_s": round(ours_wall, 2),
                     "final_test_hr@10": ours["final"].get("test_hr@10"),
                     "final_test_ndcg@10": ours["final"].get("test_ndcg@10")}
    out["ratio_fedrec_over_bare"] = round(o / b, 3)
    out["engine_seconds_per_round"] = round(_engine_seconds_per_round(cfg, args.rounds), 5)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    from fedrec.errors import run_script

    run_script(main, "benchmarks/flwr_overhead.py")
