"""Which part of item-level Bulyan's aggregate keeps PipAttack's target rows out of the top 5
(README, Targeted attacks, Defenses).

    python scripts/pipattack_hybrid_probe.py MODE [--rounds 440] [--set KEY=VALUE ...]

Runs experiments/pipattack-ml1m-defenses.yaml's PipAttack in its target-rows-only form
(attack.params.predictor false) in one process from round 1: rounds before attack.start_round
are aggregated by item-level Bulyan (rule_f 12), the attacked rounds by a mix of Bulyan and
the dense mean of the same uploads, by MODE:

- bulyan: Bulyan throughout;
- mean: the dense mean (item rows and predictor);
- mean_rows: every item row from the mean, the predictor from Bulyan;
- mean_target: Bulyan, but the target's row from the mean;
- bulyan_target: the mean, but the target's row from Bulyan.

Prints test ER@5 and HR@10 every 40 rounds of the attack (evaluation, from the ground truth).
--trace K: every K rounds from the attack's start, over 500 benign test users (a fixed draw),
the mean score of the target, of each user's 5th-best item and their gap (unmasked ranking:
a trend, not ER@5), and the median norm of the item rows and the target row's norm.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fedrec.targets import resolve_targets
from pipattack_bulyan_probe import engine_under_bulyan  # scripts/ is sys.path[0]
from strategies.mean import MeanRule

MODES = ("bulyan", "mean", "mean_rows", "mean_target", "bulyan_target")


def mixed(agg, mean, mode: str, target: int):
    """Bulyan's aggregate `agg` with parts replaced by the mean's, by mode (in place; not
    called for mode bulyan)."""
    if mode == "mean_target":
        agg.item_grad[target] = mean.item_grad[target]
        return agg
    target_row = agg.item_grad[target].copy()
    agg.item_grad[:] = mean.item_grad
    if mode == "bulyan_target":
        agg.item_grad[target] = target_row
    if mode in ("mean", "bulyan_target"):
        agg.predictor = mean.predictor
    return agg


def trace_line(eng, users, target: int, rnd: int) -> str:
    """The target's and the 5th-best item's mean scores over `users`, and the row norms."""
    arrays = eng.strategy.global_arrays()
    table, predictor = np.asarray(arrays[0]), arrays[1:]
    scores = eng.env.model.score(eng.user_vectors(users, rnd, "test"), table, predictor)
    fifth = np.partition(scores, -5, axis=1)[:, -5]
    norms = np.linalg.norm(table, axis=1)
    return (f"trace round {rnd}: target score {scores[:, target].mean():.3f}, 5th best "
            f"{fifth.mean():.3f}, gap {(fifth - scores[:, target]).mean():.3f}; item-row norm "
            f"median {np.median(norms):.3f}, target row {norms[target]:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=MODES)
    ap.add_argument("--rounds", type=int, default=440)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--trace", type=int, default=0)
    args = ap.parse_args()
    cfg, eng = engine_under_bulyan(args.rounds, args.set, {"predictor": False})
    target = int(resolve_targets(cfg, eng.env.data)[0])
    rule, mean = eng.strategy.rule, MeanRule("dense")
    bulyan = rule.aggregate

    def wrapped(updates):
        agg = bulyan(updates)
        if updates.server_round < cfg.attack.start_round or args.mode == "bulyan":
            return agg
        return mixed(agg, mean(updates), args.mode, target)

    rule.aggregate = wrapped
    data = eng.env.data
    benign = np.flatnonzero((data.test_item >= 0) & ~data.pool_mask)
    watched = np.sort(np.random.default_rng(0).choice(benign, min(500, len(benign)), replace=False))
    t0 = time.time()
    for r in range(1, args.rounds + 1):
        eng.run_round(r)
        since = r - (cfg.attack.start_round - 1)  # 0 at the clean pretraining's last round
        if args.trace and since >= 0 and since % args.trace == 0:
            print(trace_line(eng, watched, target, r), flush=True)
        if r >= cfg.attack.start_round and r % 40 == 0:
            ev = eng.evaluate(r, True)
            print(f"{args.mode} round {r}: test_er@5 {ev['test_er@5']:.4f} "
                  f"test_hr@10 {ev['test_hr@10']:.4f} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    from fedrec.errors import run_script

    run_script(main, "scripts/pipattack_hybrid_probe.py")
