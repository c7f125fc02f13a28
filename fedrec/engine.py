"""The in-process runner: the same clients and strategy as `flwr run`, no Ray, no messages.

Per round: the strategy samples users with its seeded RNG, each sampled user's
`BenignClient.fit` runs on the current global arrays (passed by reference, no
serialisation), and `FedRecStrategy.aggregate_uploads` validates, aggregates and steps the
server optimizer. Evaluation ranks every item for every benign user in batches; per-user
values are averaged with exact sums, so it matches Flower's federated evaluation.
"""

from __future__ import annotations

import math
import time

import numpy as np

from fedrec.build import build_client, build_env, build_strategy
from fedrec.evaluation import evaluate_users, per_user_metrics
from fedrec.results import RunRecorder, run_dir_for


class Engine:
    def __init__(self, cfg, recorder=None, progress=None, env=None):
        from fedrec.runtime import configure_threads

        configure_threads()
        self.cfg = cfg
        self.env = env or build_env(cfg)
        self.recorder = recorder
        self.strategy = build_strategy(cfg, self.env, recorder=recorder)
        self.progress = cfg.output.progress if progress is None else progress
        self.stores: dict = {}
        self.clients: dict = {}

    def client(self, user: int):
        c = self.clients.get(user)
        if c is None:
            from clients.benign import DictStore

            store = self.stores.setdefault(user, DictStore())
            c = self.clients[user] = build_client(self.env, user, store)
        return c

    def run_round(self, rnd: int) -> dict:
        users = self.strategy.sample(rnd, self._all_users)
        arrays = self.strategy.global_arrays()
        config = {"round": rnd}
        clients = [self.client(u) for u in users]
        results = [None] * len(users)
        # one cohort per client class (benign, each attack): a cohort's gradients are computed
        # together, and a client's result does not depend on its cohort (tests pin this)
        for cls in dict.fromkeys(type(c) for c in clients):
            idx = [i for i, c in enumerate(clients) if type(c) is cls]
            outs = cls.fit_cohort([clients[i] for i in idx], arrays, config)
            for i, (up, n, metrics) in zip(idx, outs):
                results[i] = (users[i], up, n, metrics)
        return self.strategy.aggregate_uploads(rnd, results)

    def evaluate(self, rnd: int, final: bool) -> dict:
        """Full-ranking metrics for every benign user with a held-out item."""
        data, cfg = self.env.data, self.cfg
        users = np.flatnonzero(((data.val_item >= 0) | (data.test_item >= 0)) & ~data.pool_mask)
        arrays = self.strategy.global_arrays()
        table, predictor = arrays[0], arrays[1:]
        clients = [self.client(u) for u in users]
        vecs = type(clients[0]).user_vectors(clients, [c._state() for c in clients], rnd) \
            if clients else np.zeros((0, self.env.model.dim), np.float32)
        out = {}
        for split in ("val", "test"):
            target = data.val_item if split == "val" else data.test_item
            has = target[users] >= 0
            res = evaluate_users(self.env.model, table, predictor, vecs[has], users[has], data,
                                 split, cfg.eval.ks, cfg.eval.batch_users)
            for key, vals in per_user_metrics(res["ranks"], cfg.eval.ks).items():
                out[f"{split}_{key}"] = math.fsum(vals.tolist()) / len(vals) if len(vals) else 0.0
            out[f"{split}_users"] = int(has.sum())
        if self.recorder is not None:
            self.recorder.log_eval(rnd, out, final)
        return out

    def run(self) -> dict:
        cfg = self.cfg
        self._all_users = list(range(self.env.data.n_users))
        rounds = cfg.train.rounds
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=rounds, desc=cfg.name, unit="round", dynamic_ncols=True,
                       mininterval=0.5)
        t0 = time.perf_counter()
        last_eval: dict = {}
        fit: dict = {}
        for rnd in range(1, rounds + 1):
            fit = self.run_round(rnd)
            if self.strategy.is_eval_round(rnd):
                last_eval = self.evaluate(rnd, rnd == rounds)
            if bar is not None:
                bar.update(1)
                if rnd % 50 == 0 or rnd == rounds or self.strategy.is_eval_round(rnd):
                    post = {"loss": f"{fit.get('train_loss', float('nan')):.4f}"}
                    for k in ("val_hr@10", "test_hr@5"):
                        if k in last_eval:
                            post[k] = f"{last_eval[k]:.4f}"
                    bar.set_postfix(post, refresh=False)
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        return {"final": last_eval, "train_seconds": elapsed,
                "rounds_per_s": rounds / elapsed if elapsed > 0 else float("inf"),
                "invalid_uploads": dict(self.strategy.drop_counts)}


def run_experiment(cfg, output_root=None, progress=None, force=False) -> dict:
    """Run one config with the in-process runner, writing its run directory."""
    from fedrec.results import is_complete, load_summary

    run_dir = run_dir_for(cfg, output_root)
    if not force and is_complete(run_dir):
        s = load_summary(run_dir)
        s["skipped"] = True
        return s
    recorder = RunRecorder(cfg, run_dir, runner="engine")
    engine = Engine(cfg, recorder=recorder, progress=progress)
    recorder.extra["data"] = engine.env.data.summary()
    try:
        result = engine.run()
    except KeyboardInterrupt:
        recorder.finish(status="interrupted")
        raise
    return recorder.finish(
        status="complete", train_seconds=round(result["train_seconds"], 3),
        rounds_per_s=round(result["rounds_per_s"], 3),
        invalid_uploads=result["invalid_uploads"],
        invalid_uploads_total=sum(result["invalid_uploads"].values()),
        run_dir=str(run_dir))
