"""Which stage of item-level Bulyan removes PipAttack's effect (README, Targeted attacks).

    python scripts/pipattack_bulyan_probe.py [--rounds 280] [--set KEY=VALUE ...]

Runs experiments/pipattack-ml1m-defenses.yaml's PipAttack under item-level Bulyan (rule_f 12)
in one process from round 1, the rule wrapped: on every attacked round's uploads it also
computes the item-level trimmed mean (same f) and prints, per round, the malicious clients,
the target's senders (malicious, benign), both rules' target row (norm, cosine with the
malicious mean row), how many malicious predictors Bulyan's Krum stage picks, and how far
each rule's predictor moves from the benign mean toward the malicious mean (0 = not at all,
1 = all the way); then the dense mean's target row (what an undefended server applies: norm,
cosine) and the malicious target rows' sign agreement (the mean over coordinates of the share
of malicious rows with the majority's sign: 0.5 = split, 1 = unanimous). Evaluation, from the
ground truth; prints test ER@5 / HR@10 at the end.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import yaml

from fedrec.build import malicious_set
from fedrec.config import load_one
from fedrec.engine import Engine
from fedrec.targets import resolve_targets
from strategies.bulyan import bulyan_select
from strategies.krum import vector_sq_distances
from strategies.mean import MeanRule
from strategies.robust import flat_predictors
from strategies.trimmed_mean import TrimmedMeanRule

COLUMNS = ("rnd n_mal mal_t ben_t bul_t_norm tm_t_norm bul_t_cos tm_t_cos "
           "pred_mal_picked bul_pred_shift tm_pred_shift mean_t_norm mean_t_cos mal_sign_agree")


def cosine(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def shift(pred, benign_mean, malicious_mean) -> float:
    """Where `pred` lies along benign mean -> malicious mean (projection, 0..1)."""
    d = malicious_mean - benign_mean
    return float((pred - benign_mean) @ d / (d @ d + 1e-30))


def sign_agreement(rows) -> float:
    """Mean over coordinates of the share of rows with the majority's sign (nan: no rows)."""
    if not len(rows):
        return float("nan")
    positive = (np.asarray(rows) > 0).mean(0)
    return float(np.maximum(positive, 1 - positive).mean())


def probe_round(updates, agg, ref, plain, mal, target, f) -> tuple:
    is_mal = np.array([int(u.client) in mal for u in updates.uploads])
    sends = [target in u.item_ids for u in updates.uploads]
    mrows = [u.item_rows[np.searchsorted(u.item_ids, target)]
             for u, m, s in zip(updates.uploads, is_mal, sends) if m and s]
    mal_row = np.mean(mrows, 0) if mrows else np.zeros(updates.dim, np.float32)
    preds = flat_predictors(updates.uploads)
    n = len(updates)
    picked = bulyan_select(vector_sq_distances(preds)[None], np.ones((1, n), bool), f,
                           np.array([n - 2 * f]))[0]
    bm, mm = preds[~is_mal].mean(0), preds[is_mal].mean(0)
    flat = [np.concatenate([p.ravel() for p in a.predictor]) for a in (agg, ref)]
    return (updates.server_round, int(is_mal.sum()), len(mrows),
            int(sum(s and not m for s, m in zip(sends, is_mal))),
            float(np.linalg.norm(agg.item_grad[target])), float(np.linalg.norm(ref.item_grad[target])),
            cosine(agg.item_grad[target], mal_row), cosine(ref.item_grad[target], mal_row),
            int((picked & is_mal).sum()), shift(flat[0], bm, mm), shift(flat[1], bm, mm),
            float(np.linalg.norm(plain.item_grad[target])),
            cosine(plain.item_grad[target], mal_row),
            sign_agreement(mrows))


def engine_under_bulyan(rounds: int, overrides: list, attack_params: dict | None = None):
    """(cfg, in-process engine) of experiments/pipattack-ml1m-defenses.yaml's PipAttack under
    item-level Bulyan (rule_f 12), `rounds` rounds, attack.params replaced if given."""
    raw = yaml.safe_load(open("experiments/pipattack-ml1m-defenses.yaml"))
    raw.pop("grid")
    raw["server"].update(rule="bulyan", aggregation="item", rule_f=12)
    raw["train"]["rounds"] = rounds
    if attack_params is not None:
        raw["attack"]["params"] = attack_params
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as tmp:
        yaml.safe_dump(raw, tmp)
    cfg = load_one(tmp.name, overrides)
    return cfg, Engine(cfg, progress=False, workers=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=280)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    cfg, eng = engine_under_bulyan(args.rounds, args.set)
    mal, f = malicious_set(eng.env), cfg.server.rule_f
    target = int(resolve_targets(cfg, eng.env.data)[0])
    rule, trimmed, plain = eng.strategy.rule, TrimmedMeanRule("item", f), MeanRule("dense")
    bulyan, rows = rule.aggregate, []

    def wrapped(updates):
        agg = bulyan(updates)
        if updates.server_round >= cfg.attack.start_round:
            rows.append(probe_round(updates, agg, trimmed.aggregate(updates), plain(updates), mal,
                                    target, f))
        return agg

    rule.aggregate = wrapped
    t0 = time.time()
    for r in range(1, args.rounds + 1):
        eng.run_round(r)
    ev = eng.evaluate(args.rounds, True)
    print(COLUMNS)
    for row in rows:
        print(" ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    print(f"round {args.rounds}: test_er@5 {ev['test_er@5']:.4f} test_hr@10 {ev['test_hr@10']:.4f} "
          f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    from fedrec.errors import run_script

    run_script(main, "scripts/pipattack_bulyan_probe.py")
