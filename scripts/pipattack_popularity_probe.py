"""Does a model reward the popular region of the item space (what PipAttack's L_pop relies on)?

    python scripts/pipattack_popularity_probe.py runs/pip10/pretrain_<name>-<digest>

Loads a run directory's checkpoint (e.g. the clean pretraining every attack starts from) and
prints the target's test ER@5 / ER@10 with its row as it is and replaced, in turn, by the mean
row of the top popularity class, the most popular item's row, a random top-class item's row
and the bottom class's mean row (evaluation code; the checkpoint is not changed)."""

import pickle
import sys

import numpy as np

from fedrec.config import load_one
from fedrec.engine import Engine
from fedrec.targets import item_counts, popularity_classes

def main(d: str):
    cfg = load_one(f"{d}/config.yaml")
    eng = Engine(cfg, progress=False, workers=1)
    payload = pickle.load(open(f"{d}/checkpoint.pkl", "rb"))
    eng.load_state_dict(payload["state"])
    rnd = int(payload["state"]["round"])
    targets, _ = eng.targets()
    t = int(targets[0])
    table = eng.strategy.global_arrays()[0]
    orig = table[t].copy()
    counts = item_counts(eng.env.data)
    cls = popularity_classes(counts)
    top = np.flatnonzero(cls == 0)
    rng = np.random.default_rng(0)
    cases = {"as is": orig, "mean of top-class rows": table[top].mean(0),
             "most popular item's row": table[int(np.argmax(counts))].copy(),
             "a random top-class item's row": table[int(rng.choice(top))].copy(),
             "mean of bottom-class rows": table[np.flatnonzero(cls == 2)].mean(0)}
    for name, row in cases.items():
        table[t] = row
        ev = eng.evaluate(rnd, False)
        print(f"{name}: test_er@5 {ev['test_er@5']:.4f} er@10 {ev['test_er@10']:.4f} (users {ev['test_er_users']})", flush=True)
    table[t] = orig
    print("row norms: target", np.linalg.norm(orig), "top mean", np.linalg.norm(table[top], axis=1).mean(),
          "all mean", np.linalg.norm(table, axis=1).mean())


if __name__ == "__main__":
    main(sys.argv[1])
