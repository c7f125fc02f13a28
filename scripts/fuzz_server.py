"""Fuzz the server with hostile clients and print what happened, as JSON (issue 10).

    python scripts/fuzz_server.py                 # every rule x both forms x each filter
    python scripts/fuzz_server.py --rounds 40 --flower

A quarter of the users are `attack.name: hostile` clients (clients/malicious/hostile.py):
every round each sends a fedrec.fuzz payload (non-finite, huge, alternating +-FLT_MAX values,
malformed ids, wrong shapes and dtypes, objects that are not arrays, absurd sample counts) and,
half the time, hostile metrics. Each run goes through the in-process runner; `--flower` adds one
run under Flower's simulation runtime where half the hostile uploads are also corrupted as bytes
(random, truncated, pickled, a header declaring 745 GiB). For every run: crashes (0 expected),
rounds after which the model was not finite (0 expected), hostile uploads sent, uploads dropped
by reason, benign uploads aggregated.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RULES = ("mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan", "norm_bound")
FILTERS = ([], ["union"], ["clip"], ["detector"], ["union", "clip"])


def base(tmp: Path, rounds: int, **extra) -> dict:
    raw = {"name": "fuzz", "seed": 0,
           "data": {"synthetic": {"n_users": 80, "n_items": 120, "mean_history": 12},
                    "attacker_pool": 0.3, "cache_dir": str(tmp / "cache")},
           "model": {"dim": 8}, "train": {"rounds": rounds, "clients_per_round": 20},
           "server": {"lr": 0.01, "rule_f": 2},
           "attack": {"name": "hostile", "malicious_fraction": 0.25},
           "eval": {"every": 0}, "output": {"progress": False, "dir": str(tmp / "runs")}}
    for k, v in extra.items():
        d = raw
        *path, last = k.split(".")
        for p in path:
            d = d.setdefault(p, {})
        d[last] = v
    return raw


def train_detector(tmp: Path) -> str:
    """A detector for the `detector` filter, recorded on a LabelFlip run of the same data."""
    from fedrec import config
    from fedrec.detector_tools import record, train

    cfg = config.from_dict(base(tmp, 20, **{"attack.name": "gaussian"}))
    list(record([cfg], str(tmp / "rec.npz"), every=1, progress=False))  # a generator
    train([str(tmp / "rec.npz")], str(tmp / "det.pkl"), max_iter=200)
    return str(tmp / "det.pkl")


def one_run(raw: dict) -> dict:
    from fedrec import config
    from fedrec.engine import Engine
    from strategies.fedrec import FedRecStrategy

    cfg = config.from_dict(raw)
    nonfinite = 0
    real = FedRecStrategy.aggregate_uploads

    def watch(self, rnd, results):
        nonlocal nonfinite
        out = real(self, rnd, results)
        nonfinite += not all(np.isfinite(a).all() for a in self.global_arrays())
        return out

    FedRecStrategy.aggregate_uploads = watch
    t0 = time.perf_counter()
    try:
        eng = Engine(cfg, progress=False, workers=1)
        from fedrec.build import malicious_set

        bad = malicious_set(eng.env)
        result = eng.run()
        crash = None
    except Exception as e:  # noqa: BLE001 - a crash is the finding
        result, crash, bad = {}, f"{type(e).__name__}: {e}", set()
    finally:
        FedRecStrategy.aggregate_uploads = real
    det = result.get("detection", {})
    return {"rule": cfg.server.rule, "aggregation": cfg.server.aggregation,
            "filters": cfg.server.filter_steps(), "crash": crash, "nonfinite_rounds": nonfinite,
            "invalid_by_reason": result.get("invalid_uploads", {}),
            "invalid_total": result.get("invalid_uploads_total", 0),
            "malicious_users": len(bad), "detected_tp": det.get("tp"),
            "final_test_hr@10": result.get("final", {}).get("test_hr@10"),
            "seconds": round(time.perf_counter() - t0, 2)}


def flower_run(tmp: Path, rounds: int) -> dict:
    raw = base(tmp, rounds, **{"attack.params": {"byte_rate": 0.5}, "model.name": "ncf",
                               "data.synthetic.n_users": 24, "train.clients_per_round": 24})
    path = tmp / "fuzz-flower.yaml"
    path.write_text(yaml.safe_dump(raw))
    driver = (
        "import ray, sys; ray.init(address='local', num_cpus=2, include_dashboard=False, log_to_driver=False)\n"
        "from flwr.simulation import run_simulation\n"
        "from fedrec.client_app import make_client_app\nfrom fedrec.server_app import make_server_app\n"
        f"rc = {{'experiment': {str(path)!r}, 'output-dir': {str(tmp / 'flwr')!r}}}\n"
        "run_simulation(make_server_app(rc), make_client_app(rc), num_supernodes=24,\n"
        "               backend_config={'client_resources': {'num_cpus': 1, 'num_gpus': 0.0}})\n")
    env = {"FEDREC_SAVE_MODEL": "1", "RAY_DISABLE_USAGE_STATS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, **env}, timeout=900)
    if proc.returncode != 0:
        return {"runner": "flwr", "crash": proc.stderr[-2000:]}
    run_dir = next((tmp / "flwr").iterdir())
    s = json.loads((run_dir / "summary.json").read_text())
    model = np.load(run_dir / "model.npz")
    return {"runner": "flwr", "crash": None, "status": s["status"],
            "model_finite": bool(all(np.isfinite(model[k]).all() for k in model.files)),
            "invalid_by_reason": s["invalid_uploads"], "invalid_total": s["invalid_uploads_total"],
            "client_failures": s.get("client_failures"), "rounds": rounds,
            "uploads": rounds * 24}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--flower", action="store_true", help="also one run under Flower's simulation")
    args = p.parse_args()
    from fedrec.runtime import configure_threads

    configure_threads()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        detector = train_detector(tmp)
        runs = []
        for rule in RULES:
            for aggregation in ("dense", "item"):
                for filters in FILTERS:
                    raw = base(tmp, args.rounds, **{"server.rule": rule, "server.aggregation": aggregation,
                                                    "server.filters": filters,
                                                    "server.detector_path": detector})
                    runs.append(one_run(raw))
                    print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        summary = {
            "runs": len(runs), "rounds_per_run": args.rounds, "clients_per_round": 20,
            "hostile_share": 0.25, "crashes": sum(r["crash"] is not None for r in runs),
            "nonfinite_rounds": sum(r["nonfinite_rounds"] for r in runs),
            "uploads": len(runs) * args.rounds * 20,
            "invalid_total": sum(r["invalid_total"] for r in runs),
            "invalid_by_reason": {},
        }
        for r in runs:
            for k, v in r["invalid_by_reason"].items():
                summary["invalid_by_reason"][k] = summary["invalid_by_reason"].get(k, 0) + v
        if args.flower:
            summary["flower"] = flower_run(tmp, args.rounds)
        print(json.dumps({"summary": summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    from fedrec.errors import run_script

    run_script(main, "scripts/fuzz_server.py")
