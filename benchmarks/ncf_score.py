"""NCF full-ranking scores: the sigmoid form `NCF.score` uses against the plain tanh form, as JSON.

    python benchmarks/ncf_score.py                  # ML-1M sizes: 3,706 items, d 64, MLP 64-32
    python benchmarks/ncf_score.py --users 1024 --repeat 5 --threads 1

Both forms score the same users against every item with the same weights (xavier-initialised,
then perturbed so no unit sits at zero), interleaved run by run on one thread (a grid gives each
run one core): `tanh_form` is the network as written (tanh, then tanh; score()'s former code),
`sigmoid_form` is `NCF.score` (each tanh as 2 sigmoid(2x) - 1, the constants folded into the
weights). Reports min / median seconds per call, the ratio of the medians, the estimated seconds
of one ML-1M test evaluation (5,738 users), and the largest score difference between the two.
Per element, it also times torch's float32 tanh and sigmoid: the cause.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ML1M_TEST_USERS = 5738


def tanh_form(model, users, item_table, predictor):
    """The network as written, in the same chunks: score()'s code before the sigmoid form."""
    import torch

    from fedrec.models.ncf import NCFWeights

    W = NCFWeights.from_list(predictor, model.form)
    w1, b1, w2, b2, wo, bo = (torch.from_numpy(a) for a in W.to_list()[-6:])
    d = model.dim
    u_all = torch.from_numpy(np.asarray(users, dtype=np.float32))
    v = torch.from_numpy(np.asarray(item_table, dtype=np.float32))
    item_part = v @ w1[:, d:].T + b1
    chunk = max(1, int(16_000_000 // max(1, v.shape[0] * model.h1)))
    out = []
    for start in range(0, u_all.shape[0], chunk):
        u = u_all[start : start + chunk]
        pre = (u @ w1[:, :d].T)[:, None, :] + item_part[None, :, :]
        s = torch.tanh(torch.tanh(pre) @ w2.T + b2) @ wo + bo
        if W.gmf_h is not None:
            s += (u * torch.from_numpy(W.gmf_h)) @ v.T
        out.append(s)
    return torch.cat(out).numpy().astype(np.float64)


def per_element_ns(fn, n: int = 1 << 18, repeat: int = 100) -> float:
    import torch

    x = torch.randn(n)
    y = torch.empty_like(x)
    fn(x, out=y)
    t = time.perf_counter()
    for _ in range(repeat):
        fn(x, out=y)
    return (time.perf_counter() - t) / repeat / n * 1e9


def measure(n_items: int, dim: int, layers, n_users: int, repeat: int, form: str, seed: int = 0):
    import torch

    from fedrec.models.ncf import NCF

    rng = np.random.default_rng(seed)
    model = NCF(n_items, dim, mlp_layers=tuple(layers), ncf_form=form)
    table, predictor = model.init_global(rng)
    predictor = [(a + 0.1 * rng.standard_normal(a.shape)).astype(np.float32) for a in predictor]
    users = (0.3 * rng.standard_normal((n_users, dim))).astype(np.float32)
    fns = {"tanh_form": lambda: tanh_form(model, users, table, predictor),
           "sigmoid_form": lambda: model.score(users, table, predictor)}
    times: dict = {k: [] for k in fns}
    scores = {k: f() for k, f in fns.items()}  # warm-up, and the two results to compare
    for _ in range(repeat):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    top = np.argsort(-scores["tanh_form"], axis=1)[:, :10]
    return {
        "form": form, "items": n_items, "dim": dim, "mlp_layers": list(layers), "users": n_users,
        "repeat": repeat, "torch_threads": torch.get_num_threads(),
        **{f"{k}_s": {"min": round(min(v), 4), "median": round(med[k], 4),
                      "max": round(max(v), 4)} for k, v in times.items()},
        "speedup_median": round(med["tanh_form"] / med["sigmoid_form"], 2),
        "ml1m_test_eval_s": {k: round(med[k] * ML1M_TEST_USERS / n_users, 2) for k in med},
        "max_abs_score_diff": float(np.abs(scores["tanh_form"] - scores["sigmoid_form"]).max()),
        "max_abs_score": float(np.abs(scores["tanh_form"]).max()),
        "top10_same_order_share": float(
            (np.argsort(-scores["sigmoid_form"], axis=1)[:, :10] == top).mean()),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=3706)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, nargs=2, default=[64, 32])
    p.add_argument("--users", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a grid run has one)")
    p.add_argument("--form", choices=["neumf", "mlp"], default="neumf")
    args = p.parse_args()
    if min(args.items, args.dim, args.users, args.repeat, args.threads, *args.layers) < 1:
        p.error("--items, --dim, --layers, --users, --repeat and --threads must be positive")
    import torch

    torch.set_num_threads(args.threads)
    out = measure(args.items, args.dim, args.layers, args.users, args.repeat, args.form)
    out["torch_ns_per_element"] = {"tanh": round(per_element_ns(torch.tanh), 2),
                                   "sigmoid": round(per_element_ns(torch.sigmoid), 2)}
    out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
