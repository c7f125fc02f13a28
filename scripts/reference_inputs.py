"""Run the ClusterAttack/UNION reference code with *our* attackers, and read its logs back.

    python scripts/reference_inputs.py prepare REF_ROOT [--yaml Y] [--seed S] [--draw-seed D]
    python scripts/reference_inputs.py read TRAIN_LOG TEST_LOG [--clean TEST_LOG]

The reference code (yflyl613/FedRec, REFERENCE.md "Running the reference code beside ours")
draws its 5% attacker pool and its 1% attackers with an unseeded `random.sample` the first
time it runs and caches them as pickles; its published and measured drops are therefore one
draw of attackers each. `prepare` writes its inputs so that it runs on the same users as one
of our runs: `REF_ROOT/Data/ml-1m/ratings.dat` (ML-1M as `u::m::r::ts` lines in our file's
order; users without timestamps get their sequence index, which keeps that order) and, in
`REF_ROOT/CacheData/`, the pool (`ml-full-attacker-list.pkl`: never evaluated, as our
`data.attacker_pool`) and the attackers (`ml-attacker-list-<ratio>.pkl`) of our run of the
YAML's ClusterAttack config at --seed, mapped to the reference's user ids (order of first
appearance in the file). --draw-seed D takes the attackers of that config with
`attack.draw_seed: D` instead (another draw from the same pool, same evaluated users). The static negatives are still the
reference's own (drawn when it first caches `ml-seed0.pkl`).

`read` parses the reference's `train.py` output (the `Round:` lines, with K if its log line
was extended to print it) and `test.py` output (`[Test] Round: r, HR@5: ...`) into JSON: test
HR@5 / NDCG@5 by round, and with --clean the relative drop at every round.
No code of the reference is copied or run from here (it has no license).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_ratings(src: Path, dst: Path) -> dict:
    """ratings_chrono.tsv.gz -> the reference's ratings.dat; returns raw user id -> its id."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    remap: dict = {}
    with gzip.open(src, "rt") as f, open(dst, "w") as out:
        header = next(f).rstrip("\n").split("\t")
        col = {name: i for i, name in enumerate(header)}
        for line in f:
            v = line.rstrip("\n").split("\t")
            ts = v[col["timestamp"]] or v[col["seq_idx"]]
            out.write(f"{v[col['user_id']]}::{v[col['movie_id']]}::{v[col['rating']]}::{ts}\n")
            remap.setdefault(v[col["user_id"]], len(remap))
    return remap


def prepare(args):
    from fedrec.build import load_data
    from fedrec.config_load import load
    from fedrec.roles import malicious_users

    cfgs = [c for c in load(args.yaml) if c.attack.name == "clusterattack" and c.seed == args.seed]
    if not cfgs:
        sys.exit(f"{args.yaml}: no clusterattack run with seed {args.seed}")
    cfg = cfgs[0]
    if cfg.data.dataset != "ml-1m":
        sys.exit(f"{args.yaml}: the reference's inputs are written for ml-1m, not {cfg.data.dataset}")
    data = load_data(cfg)
    root = Path(args.ref_root)
    src = Path(os.environ.get("FEDREC_DATA", ROOT.parent / "shared" / "data")) / "ml-1m" / "ratings_chrono.tsv.gz"
    remap = write_ratings(src, root / "Data" / "ml-1m" / "ratings.dat")
    to_ref = lambda ours: [remap[str(int(data.user_raw_ids[u]))] for u in ours]  # noqa: E731
    if args.draw_seed is not None:
        cfg.attack.draw_seed = args.draw_seed
    attackers = malicious_users(cfg, data)
    cache = root / "CacheData"
    cache.mkdir(parents=True, exist_ok=True)
    ratio = cfg.attack.malicious_fraction
    with open(cache / "ml-full-attacker-list.pkl", "wb") as f:
        pickle.dump(to_ref(data.attacker_pool), f)
    with open(cache / f"ml-attacker-list-{ratio}.pkl", "wb") as f:
        pickle.dump(to_ref(attackers), f)
    counts = np.diff(data.train_indptr)
    print(json.dumps({"pool": len(data.attacker_pool), "attackers": len(attackers),
                      "attackers_mean_train_items": float(counts[attackers].mean()),
                      "pool_mean_train_items": float(counts[data.attacker_pool].mean()),
                      "ratio": ratio, "ref_root": str(root)}))


TEST = re.compile(r"\[Test\] Round: (\d+), HR@5: ([\d.]+), nDCG@5: ([\d.]+)")


def read_test(path) -> dict:
    out = {}
    for m in TEST.finditer(Path(path).read_text(errors="replace")):
        out[int(m.group(1))] = {"hr@5": float(m.group(2)), "ndcg@5": float(m.group(3))}
    return dict(sorted(out.items()))


def read(args):
    result = {"test": read_test(args.test_log)}
    k_trace = {}
    for line in Path(args.train_log).read_text(errors="replace").splitlines():
        m = re.search(r"Round: (\d+), train_loss: [\d.]+, acc: [\d.]+ K: (\d+)", line)
        if m:
            k_trace[int(m.group(1))] = int(m.group(2))
    if k_trace:
        changes, last = [], None
        for r, k in sorted(k_trace.items()):
            if k != last:
                changes.append((r, k))  # the first logged round with a new K
            last = k
        result["K_changes"] = changes
    if args.clean:
        clean = read_test(args.clean)
        result["clean"] = clean
        result["drop_pct"] = {r: {m: 100 * (1 - v[m] / clean[r][m]) for m in v}
                              for r, v in result["test"].items() if r in clean}
    print(json.dumps(result, indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("prepare")
    q.add_argument("ref_root")
    q.add_argument("--yaml", default=str(ROOT / "experiments/paper/clusterattack-table1-mf-ml1m.yaml"))
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--draw-seed", type=int, default=None)
    r = sub.add_parser("read")
    r.add_argument("train_log")
    r.add_argument("test_log")
    r.add_argument("--clean", default=None)
    args = p.parse_args(argv)
    prepare(args) if args.cmd == "prepare" else read(args)


if __name__ == "__main__":
    from fedrec.errors import run_script

    run_script(main, "scripts/reference_inputs.py")
