"""Seconds per round of a real deployment on loopback, plain against TLS (and TLS with SuperNode
authentication), printed as JSON (issue 15).

    python benchmarks/deployment.py                      # 4 users, 8 rounds, 1 repeat
    python benchmarks/deployment.py --users 8 --rounds 10 --repeat 2

Each setting starts its own SuperLink and one SuperNode per user (from exported partitions,
as tests/test_deployment.py does), runs the quickstart shrunk to `--users` users (every user
every round) and reads `seconds_per_round_after_first` from the run's summary.json (round 2
to the last fit, so start-up is excluded). The settings alternate `--repeat` times, so they
share the machine's load; the load average is reported with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import deployment_harness as dh  # noqa: E402

EXPERIMENT = "experiments/quickstart.yaml"
SETTINGS = {"plain": dict(tls=False, auth=False), "tls": dict(tls=True, auth=False),
            "tls+auth": dict(tls=True, auth=True)}


def one_run(work: Path, users: int, rounds: int, tls: bool, auth: bool) -> dict:
    overrides = ";".join([f"data.synthetic.n_users={users}", "data.attacker_pool=0",
                          f"train.rounds={rounds}", f"train.clients_per_round={users}",
                          "eval.every=0", "output.progress=false"])
    env = {**os.environ, "FEDREC_CACHE": str(work / "cache")}
    parts = work / "parts"
    sets = sum((["--set", o] for o in overrides.split(";")), [])
    subprocess.run([sys.executable, "-m", "fedrec", "partition", "export", EXPERIMENT,
                    str(parts), *sets], cwd=ROOT, env=env, check=True, capture_output=True)
    certs = None
    if tls:
        certs = work / "certs"
        subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), "--out", str(certs),
                        "--nodes", str(users)], check=True, capture_output=True)
    fed = dh.Federation(work / "fed", certs=certs, auth=auth)
    out_root = work / "runs"
    t0 = time.perf_counter()
    try:
        fed.start_superlink()
        for i in range(users):
            if auth:
                reg = fed.register(certs / f"supernode-{i}.pub")
                if reg.returncode != 0:
                    raise RuntimeError(reg.stdout + reg.stderr)
            fed.start_supernode(f"supernode-{i}", f'partition-id={i} num-partitions={users} '
                                f'data-path="{parts}/user-{i}.json"',
                                key=certs / f"supernode-{i}" if auth else None)
        run_config = " ".join([f'experiment="{EXPERIMENT}"', f'overrides="{overrides}"',
                               f'output-dir="{out_root}"',
                               f'public-info="{parts / "public.json"}"'])
        rc, out = fed.flwr_run(run_config, timeout=600)
        if rc != 0:
            raise RuntimeError(f"flwr run failed ({rc}):\n{out[-3000:]}\n{fed.procs.tail()}")
    finally:
        fed.stop()
    wall = time.perf_counter() - t0
    summary = json.loads(next(out_root.glob("*-flwr/summary.json")).read_text())
    return {"seconds_per_round": summary["seconds_per_round_after_first"],
            "wall_s": round(wall, 1), "status": summary["status"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    args = ap.parse_args(argv)
    missing = dh.missing_binaries()
    if missing:
        print(json.dumps({"error": f"Flower binaries not found: {missing}"}))
        return 2
    names = args.settings.split(",")
    runs = {n: [] for n in names}
    load_before = os.getloadavg()
    for rep in range(args.repeat):
        for name in names:
            with tempfile.TemporaryDirectory(prefix=f"fedrec-deploy-{name}-") as d:
                r = one_run(Path(d), args.users, args.rounds, **SETTINGS[name])
            runs[name].append(r)
            print(f"{name} #{rep + 1}: {r['seconds_per_round']} s/round", file=sys.stderr)
    spr = {n: statistics.median(r["seconds_per_round"] for r in rs) for n, rs in runs.items()}
    out = {"benchmark": "deployment-loopback", "users": args.users, "rounds": args.rounds,
           "repeat": args.repeat, "seconds_per_round_median": spr,
           "tls_over_plain": (round(spr["tls"] / spr["plain"], 3)
                              if {"tls", "plain"} <= spr.keys() else None),
           "runs": runs, "loadavg_before": [round(x, 2) for x in load_before],
           "loadavg_after": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    from fedrec.errors import run_script

    run_script(main, "benchmarks/deployment.py")
