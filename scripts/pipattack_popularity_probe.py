"""Does a model reward the popular region of the item space (what PipAttack's L_pop relies on)?

    python scripts/pipattack_popularity_probe.py runs/pip10/pretrain_<name>-<digest>
    python scripts/pipattack_popularity_probe.py --train experiments/pipattack-ml1m-long.yaml \
        --seed 0 --milestones 200,1000,2000,4000,8000

With a run directory: loads its checkpoint (e.g. the clean pretraining every attack starts
from). With --train: trains the YAML's setting clean (no attack, no evaluation schedule; the
YAML's grid, if any, dropped) for max(milestones) rounds in one process, and probes at each
milestone. A probe prints the target's test ER@5 with its row as it is and replaced, in turn,
by the mean row of the top popularity class, the most popular item's row, a random top-class
item's row and the bottom class's mean row, and the model's test HR@10 (evaluation code; the
model is restored after each probe)."""

import argparse
import pickle
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrec.config import load_one, read_yaml  # noqa: E402
from fedrec.engine import Engine  # noqa: E402
from fedrec.targets import item_counts, popularity_classes  # noqa: E402


def probe(eng: Engine, rnd: int, rows: dict) -> dict:
    """{case: test ER@5} with the target's row replaced by each of `rows`, + test_hr@10."""
    t = int(eng.targets()[0][0])
    table = eng.strategy.global_arrays()[0]
    orig = table[t].copy()
    out = {}
    try:
        for name, row in {"as_is": orig, **rows}.items():
            table[t] = row
            ev = eng.evaluate(rnd, False)
            out[name] = round(ev["test_er@5"], 4)
            if name == "as_is":
                out["test_hr@10"] = round(ev["test_hr@10"], 4)
                out["er_users"] = ev["test_er_users"]
    finally:
        table[t] = orig
    return out


def replacement_rows(eng: Engine, random_top: int | None = None):
    """The rows the target's row is replaced by, read from the current model."""
    table = eng.strategy.global_arrays()[0]
    counts = item_counts(eng.env.data)
    cls = popularity_classes(counts)
    top = np.flatnonzero(cls == 0)
    if random_top is None:
        random_top = int(np.random.default_rng(0).choice(top))
    return {"top_mean": table[top].mean(0), "most_popular": table[int(np.argmax(counts))].copy(),
            "random_top": table[random_top].copy(),
            "bottom_mean": table[np.flatnonzero(cls == 2)].mean(0)}


def from_checkpoint(d: str):
    cfg = load_one(f"{d}/config.yaml")
    eng = Engine(cfg, progress=False, workers=1)
    payload = pickle.load(open(f"{d}/checkpoint.pkl", "rb"))
    eng.load_state_dict(payload["state"])
    rnd = int(payload["state"]["round"])
    print(f"round {rnd}: {probe(eng, rnd, replacement_rows(eng))}", flush=True)


def clean_yaml(path: str, out: Path) -> Path:
    """The YAML without its grid, the attack off (its target kept for ER)."""
    import yaml

    raw = read_yaml(path)
    raw.pop("grid", None)
    raw.pop("paper", None)
    raw.setdefault("attack", {}).update(name="none", start_round=1)
    out.write_text(yaml.safe_dump(raw))
    return out


def train_and_probe(path: str, seed: int, milestones: list):
    import tempfile

    last = max(milestones)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_one(clean_yaml(path, Path(tmp) / "clean.yaml"),
                       [f"seed={seed}", f"train.rounds={last}", "eval.every=100000000",
                        "eval.from_round=1"])
    eng = Engine(cfg, progress=False, workers=1)
    t0 = time.time()
    for rnd in range(1, last + 1):
        eng.run_round(rnd)
        if rnd in milestones:
            print(f"round {rnd} ({time.time() - t0:.0f} s): {probe(eng, rnd, replacement_rows(eng))}",
                  flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", nargs="?", help="a run directory with a checkpoint.pkl")
    ap.add_argument("--train", metavar="YAML", help="train this setting clean and probe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--milestones", default="200,1000,2000")
    args = ap.parse_args(argv)
    if (args.run_dir is None) == (args.train is None):
        ap.error("give a run directory or --train YAML")
    if args.train:
        train_and_probe(args.train, args.seed, sorted(int(x) for x in args.milestones.split(",")))
    else:
        from_checkpoint(args.run_dir)


if __name__ == "__main__":
    from fedrec.errors import run_script

    run_script(main, "scripts/pipattack_popularity_probe.py")
