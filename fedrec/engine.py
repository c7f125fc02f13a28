"""The in-process runner: the same clients and strategy as `flwr run`, no Ray, no messages.

Per round: the strategy samples users with its seeded RNG, the sampled users' clients fit
on the current global arrays (passed by reference, no serialisation; clients/cohort.py
computes a round's clients together), `FedRecStrategy.aggregate_uploads` validates,
filters, aggregates and steps the server optimizer, and the RunLedger writes the round. Evaluation ranks every item for every benign user in batches; per-user
values are averaged with exact sums, so it matches Flower's federated evaluation.

With workers = W > 1 (argument, or $FEDREC_WORKERS) the clients live in W forked processes
(fedrec/parallel.py), user u in worker u % W; the results are bit-identical.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np

from clients.cohort import fit_clients, honest_fits, user_vectors
from clients.state import DictStore
from fedrec.build import build_client, build_env, build_strategy
from fedrec.errors import ConfigError
from fedrec.evaluation import evaluate_users
from fedrec.results import RunRecorder, run_dir_for
from fedrec.workers import auto_workers, default_workers


class DeviceHost:
    """The simulated devices held in one process (the runner's, or one worker's): each user's
    client, built on first use, with its private state in a DictStore. What the worker pool
    needs of a process (fedrec.parallel.ClientHost)."""

    def __init__(self, env, global_arrays):
        self.env = env
        self.global_arrays = global_arrays  # () -> the current global arrays
        self.stores: dict = {}
        self.clients: dict = {}

    def client(self, user: int):
        c = self.clients.get(user)
        if c is None:
            store = self.stores.setdefault(user, DictStore())
            c = self.clients[user] = build_client(self.env, user, store)
        return c


class Engine:
    def __init__(self, cfg, recorder=None, progress=None, env=None, workers=None, extra_steps=()):
        """extra_steps: pre-aggregation steps after the config's filters (e.g. a recorder)."""
        from fedrec.runtime import configure_threads

        configure_threads()
        self.cfg = cfg
        self.env = env or build_env(cfg)
        from fedrec.runtime import configure_memory, round_upload_bytes

        configure_memory(round_upload_bytes(cfg, self.env.data))  # big rounds: a bigger heap
        self.strategy = build_strategy(cfg, self.env, extra_steps=extra_steps)
        from fedrec.adversary import make_adversary

        # simulation only: hands colluding/omniscient attacks their knowledge between the
        # clients and the strategy (the strategy never sees it)
        self.adversary = make_adversary(cfg, self.env, honest_updates=self.honest_updates,
                                        user_rows=self.adversary_user_rows)
        from fedrec.build import malicious_set
        from fedrec.evaluation import DetectionTracker
        from fedrec.ledger import RunLedger

        # the only writer of the recorder; scores the defense's drops against the ground
        # truth (evaluation, not defense)
        self.ledger = RunLedger(recorder, DetectionTracker(malicious_set(self.env)))
        self.progress = cfg.output.progress if progress is None else progress
        self.users = list(range(self.env.data.n_users))  # the candidates of every round
        # the devices: here, or (workers > 1) a forked copy in each worker process
        self.host = DeviceHost(self.env, self.strategy.global_arrays)
        # workers > 1: clients live in forked worker processes (fedrec/parallel.py)
        self.workers = default_workers(cfg) if workers is None else int(workers)
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        device = getattr(self.env.model, "device", None)
        if self.workers > 1 and device is not None and device.type == "cuda":
            raise ConfigError(f"{self.workers} worker processes with a model on CUDA: forked "
                              "workers cannot use CUDA; set FEDREC_WORKERS=1 (one process "
                              "drives the GPU) or model.device=cpu")
        self._pool = None
        self.first_round = 1  # > 1 after load_state_dict (a resumed run)
        self.timing = {"train_seconds": 0.0, "eval_seconds": 0.0}  # carried over by a resume
        self._sampled: dict = {}  # round -> users, drawn one round early with workers
        self._pool_started = False
        self._targets = None  # attack.target's items and who holds them (fedrec.targets)
        self.probe_memory: dict = {}  # an attack's evaluation probe (e.g. PipAttack's estimator)

    def client(self, user: int):
        """The user's client in this process (single-process mode only)."""
        if self.workers > 1:
            raise RuntimeError("with workers > 1 the clients live in the worker processes")
        return self.host.client(user)

    def pool(self):
        """The worker pool (workers > 1), started on first use; None in single-process mode."""
        if self.workers == 1:
            return None
        if self._pool is None:
            from fedrec.parallel import WorkerPool, arena_size, shared_empty

            if self._pool_started:  # the stopped workers held the clients' private state
                raise RuntimeError("the engine's worker pool was stopped; its client state is gone")
            # the global arrays go to shared memory before the fork: the workers read the
            # parent's in-place optimizer steps, nothing is copied per round
            self.strategy.optimizer.relocate(shared_empty)
            self._pool_started = True
            # room for the round's uploads and the adversary's pool (attack.pool_sample)
            arena = arena_size(self.env.model,
                               self.cfg.train.clients_per_round + self.cfg.attack.pool_sample)
            self._pool = WorkerPool(self.host, self.workers, arena).start()
        return self._pool

    def cpu_seconds(self) -> float:
        """CPU seconds of this process, its reaped children and the live workers, so far
        (fedrec.cputime): the run's CPU is the difference of two readings."""
        from fedrec.cputime import process_cpu_seconds

        live = 0.0 if self._pool is None else self._pool.live_cpu_seconds()
        return process_cpu_seconds() + live

    def close(self):
        """Stop the worker processes (if any)."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()

    def run_round(self, rnd: int) -> dict:
        users = self._sampled.pop(rnd, None)
        if users is None:
            users = self.strategy.sample(rnd, self.users)
        pool = self.pool()
        if pool is not None:
            # Sampling does not depend on the model, so the next round's users are drawn now
            # (the strategy's generator is used in the same order) and the workers prepare
            # them while this process aggregates.
            self._sampled = {rnd + 1: self.strategy.sample(rnd + 1, self.users)}
            outs = pool.fit(rnd, users, self._sampled[rnd + 1])
        else:
            clients = [self.client(u) for u in users]
            outs = fit_clients(clients, self.strategy.global_arrays(), {"round": rnd})
        results = [(u, up, n, metrics) for u, (up, n, metrics) in zip(users, outs)]
        attack = {}
        if self.adversary is not None:
            results, attack = self.adversary.intervene(rnd, results, self.strategy.global_arrays())
            if attack and self.cfg.attack.target != "none":
                attack["attack_upload_kl"], attack["attack_mean_upload_kl"] = \
                    self._upload_kl(results)
        result = self.strategy.aggregate_uploads(rnd, results)
        return self.ledger.fit(rnd, users, result, attack)

    def honest_updates(self, users, arrays, rnd: int) -> list:
        """[(upload, num_examples, metrics)]: what `users` (clients not sampled in `rnd`) would
        upload in `rnd` on `arrays` (the current global arrays), computed where they live on
        twins of the devices, their private state untouched (the adversary's pool; simulation
        only). The workers read the same arrays from shared memory."""
        pool = self.pool()
        if pool is not None:
            return pool.honest_fits(rnd, users)
        return honest_fits([self.client(u) for u in users], arrays, rnd)

    def adversary_user_rows(self, users, rnd: int) -> np.ndarray:
        """The private user rows of `users` (malicious clients sampled in `rnd`, after their
        fit) for an attack that crafts with them in the hook (simulation only)."""
        return self.user_vectors(np.asarray(users, np.int64), rnd, "test")

    def _upload_kl(self, results) -> tuple[float, float]:
        """Targeted attacks (evaluation, ground truth): the KL divergence between histograms
        of the round's benign and malicious upload values (fedrec.evaluation.upload_kl), and
        between the values of the two groups' averaged updates (mean_upload_kl: the form of
        PipAttack's Fig. 6)."""
        from fedrec.build import malicious_set
        from fedrec.evaluation import mean_upload_kl, upload_kl, upload_values

        bad = malicious_set(self.env)
        ok = [r for r in results if isinstance(r[1], (list, tuple)) and int(r[2]) > 0]
        benign = [r[1] for r in ok if int(r[0]) not in bad]
        malicious = [r[1] for r in ok if int(r[0]) in bad]
        b, m = upload_values(benign), upload_values(malicious)
        pooled = upload_kl(b, m) if len(b) and len(m) else float("nan")
        return pooled, mean_upload_kl(benign, malicious, self.env.data.n_items)

    def evaluate(self, rnd: int, final: bool) -> dict:
        """Full-ranking metrics for every benign user with a held-out item."""
        data, cfg = self.env.data, self.cfg
        users = np.flatnonzero(((data.val_item >= 0) | (data.test_item >= 0)) & ~data.pool_mask)
        arrays = self.strategy.global_arrays()
        table, predictor = arrays[0], arrays[1:]
        # MF/NCF: one private row per user, the same for both splits; sequential models
        # encode the history before each split's held-out item
        per_split = not self.env.model.has_user_row
        vecs = None if per_split else self.user_vectors(users, rnd, "test")
        out = {}
        targets, holds = self.targets()
        for split in [s for s in ("val", "test") if s in cfg.eval.splits]:
            target = data.val_item if split == "val" else data.test_item
            has = target[users] >= 0
            v = self.user_vectors(users[has], rnd, split) if per_split else vecs[has]
            res = evaluate_users(self.env.model, table, predictor, v, users[has], data,
                                 split, cfg.eval.ks, cfg.eval.batch_users, targets, holds,
                                 cfg.eval.mask_history)
            for key, vals in res["per_user"].items():
                out[f"{split}_{key}"] = math.fsum(vals.tolist()) / len(vals) if len(vals) else 0.0
            out[f"{split}_users"] = int(has.sum())
            if "exposure" in res:
                from fedrec.targets import exposure_metrics

                out.update(exposure_metrics(res["exposure"], targets, split, cfg.eval.ks))
        probe = getattr(getattr(self.adversary, "attack_cls", None), "eval_probe", None)
        if probe is not None and len(targets):
            out.update(probe(self.env, arrays, rnd, targets, self.probe_memory))
        return self.ledger.eval(rnd, out, final)

    def targets(self):
        """(target items, (n_users, T) history membership) of `attack.target` (cached)."""
        if self._targets is None:
            from fedrec.targets import history_holds, resolve_targets

            t = resolve_targets(self.cfg, self.env.data)
            self._targets = (t, history_holds(self.env.data, t))
        return self._targets

    def user_vectors(self, users, rnd: int, split: str) -> np.ndarray:
        """The representations of `users` at round `rnd` for `split`, computed where their
        clients live (this process or the workers)."""
        if not len(users):
            return np.zeros((0, self.env.model.dim), np.float32)
        pool = self.pool()
        if pool is not None:
            return pool.user_vectors(users, rnd, split)
        return user_vectors([self.client(u) for u in users], rnd, split,
                            self.strategy.global_arrays())

    # --- checkpoints (fedrec.checkpoint) ------------------------------------------------------
    def client_states(self) -> dict:
        """{user: private device state} of every user that has one (simulation only: what a
        checkpoint keeps of the devices), gathered from the workers when there are some."""
        pool = self.pool()
        if pool is None:
            return _stored_states(self.host, 0)
        merged = {}
        for part in pool.call(_stored_states):
            merged.update(part)
        return merged

    def load_client_states(self, states: dict):
        pool = self.pool()
        if pool is None:
            _load_states(self.host, 0, states)
        else:
            pool.call(_load_states, states, self.workers)

    def state_dict(self, round_done: int) -> dict:
        """Everything needed to continue after `round_done`: the server, the devices, the
        users already drawn for the next round, the adversary's memory, the ledger's totals."""
        return {"round": int(round_done), "strategy": self.strategy.state_dict(),
                "clients": self.client_states(), "sampled": dict(self._sampled),
                "adversary": None if self.adversary is None else self.adversary.state_dict(),
                "ledger": self.ledger.state_dict(), "timing": dict(self.timing),
                "probe": copy.deepcopy(self.probe_memory)}

    def load_state_dict(self, state: dict):
        self.strategy.load_state_dict(state["strategy"])
        self.load_client_states(state["clients"])
        self._sampled = dict(state["sampled"])
        if self.adversary is not None and state["adversary"] is not None:  # None: a clean pretraining
            self.adversary.load_state_dict(state["adversary"])
        self.ledger.load_state_dict(state["ledger"])
        self.timing = dict(state["timing"])
        self.probe_memory = copy.deepcopy(state.get("probe", {}))
        self.first_round = int(state["round"]) + 1

    def run(self, save_checkpoint=None, save_final: bool = False) -> dict:
        """Rounds `first_round`..train.rounds. save_checkpoint(state): called with
        `state_dict()` every output.checkpoint_every rounds and when SIGTERM/SIGINT asks the
        run to stop (after the round in progress, which then raises RunInterrupted)."""
        from fedrec.checkpoint import stop_on_signals

        cfg = self.cfg
        rounds, every = cfg.train.rounds, cfg.output.checkpoint_every
        bar = None
        t0 = time.perf_counter() - self.timing["train_seconds"]
        eval_start = self.timing["eval_seconds"]
        last_eval: dict = {}
        fit: dict = {}
        eval_seconds = 0.0
        probe = getattr(getattr(self.adversary, "attack_cls", None), "eval_probe", None)
        if probe is not None and self.first_round == cfg.attack.start_round > 1 \
                and len(self.targets()[0]) and not self.probe_memory:
            # an attack resumed from its clean pretraining: the probe sees the model it attacks
            probe(self.env, self.strategy.global_arrays(), self.first_round - 1,
                  self.targets()[0], self.probe_memory)
        try:
            self.pool()  # workers (if any) fork before tqdm starts its monitor thread
            if self.progress:
                from tqdm import tqdm

                bar = tqdm(total=rounds, initial=self.first_round - 1, desc=cfg.name,
                           unit="round", dynamic_ncols=True, mininterval=0.5)
            with stop_on_signals() as stop:
                for rnd in range(self.first_round, rounds + 1):
                    fit = self.run_round(rnd)
                    if self.strategy.is_eval_round(rnd):
                        t_eval = time.perf_counter()
                        last_eval = self.evaluate(rnd, rnd == rounds)
                        eval_seconds += time.perf_counter() - t_eval
                    if bar is not None:
                        bar.update(1)
                        if rnd % 50 == 0 or rnd == rounds or self.strategy.is_eval_round(rnd):
                            post = {"loss": f"{fit.get('train_loss', float('nan')):.4f}"}
                            for k in ("val_hr@10", "test_hr@5"):
                                if k in last_eval:
                                    post[k] = f"{last_eval[k]:.4f}"
                            bar.set_postfix(post, refresh=False)
                    due = bool(stop) or (every > 0 and rnd % every == 0 and rnd < rounds) \
                        or (save_final and rnd == rounds)
                    if save_checkpoint is not None and due:
                        self.timing = {"train_seconds": time.perf_counter() - t0,
                                       "eval_seconds": eval_start + eval_seconds}
                        save_checkpoint(self.state_dict(rnd))
                    if stop:
                        raise RunInterrupted(rnd, stop.signal)
        finally:
            self.close()  # no worker outlives the run (error and Ctrl-C included)
            if bar is not None:
                bar.close()
        elapsed = time.perf_counter() - t0
        eval_seconds += eval_start
        fit_seconds = elapsed - eval_seconds
        return {"final": last_eval, "train_seconds": elapsed, "eval_seconds": eval_seconds,
                "rounds_per_s": rounds / elapsed if elapsed > 0 else float("inf"),
                # training rounds alone (evaluation, every eval.every rounds, excluded)
                "fit_rounds_per_s": rounds / fit_seconds if fit_seconds > 0 else float("inf"),
                **self.ledger.totals()}


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGTERM/SIGINT after `round_done`, its checkpoint written."""

    def __init__(self, round_done: int, signum: int):
        super().__init__(f"stopped by signal {signum} after round {round_done}")
        self.round_done, self.signum = round_done, signum

    def __reduce__(self):  # a grid worker sends it to the driver: rebuilt from both fields
        return type(self), (self.round_done, self.signum)


def _stored_states(host: DeviceHost, k: int) -> dict:
    """The private states held in this process (worker k, or the single process)."""
    return {u: copy.deepcopy(store.state) for u, store in host.stores.items() if store.state}


def _load_states(host: DeviceHost, k: int, states: dict, workers: int = 1):
    """Give this process's users (u % workers == k) their saved private state."""
    for u, state in states.items():
        if u % workers == k:
            host.stores.setdefault(u, DictStore()).save(copy.deepcopy(state))


def run_experiment(cfg, output_root=None, progress=None, force=False) -> dict:
    """Run one config with the in-process runner, writing its run directory; an interrupted
    run with a checkpoint resumes from it (`force` starts again from round 1)."""
    from fedrec.checkpoint import load_checkpoint, remove_checkpoint, save_checkpoint
    from fedrec.results import check_output_dir, is_complete, load_summary

    run_dir = run_dir_for(cfg, output_root)
    check_output_dir(run_dir)
    if not force and is_complete(run_dir):
        s = load_summary(run_dir)
        s["skipped"] = True
        return s
    if force:
        remove_checkpoint(run_dir)
    saved = load_checkpoint(run_dir, cfg.digest())
    pretrained = None
    if saved is None and cfg.attack.name != "none" and 1 < cfg.attack.start_round <= cfg.train.rounds:
        pretrained = pretrain(cfg, output_root, progress)
        saved = pretrained["payload"]
    engine = Engine(cfg, progress=progress, workers=auto_workers(cfg))
    resume = None if saved is None else saved["round"]
    if pretrained is not None:  # the clean rows up to the attack's start, then the attack's
        import shutil

        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pretrained["dir"] / "metrics.csv", run_dir / "metrics.csv")
    # a resumed run counts the wall time of its earlier segments (kept in the checkpoint); an
    # attack continuing a shared clean pretraining does not (that run has its own summary)
    prior = saved.get("wall_time_s", 0.0) if saved is not None and pretrained is None else 0.0
    # the same for its CPU seconds; None where the checkpoint predates them (unknown)
    prior_cpu = (saved.get("cpu_time_s") if saved is not None and pretrained is None else 0.0)
    recorder = RunRecorder(cfg, run_dir, runner="engine", resume_round=resume, prior_wall_s=prior,
                           prior_cpu_s=prior_cpu, cpu_clock=engine.cpu_seconds)
    engine.ledger.recorder = recorder
    recorder.extra["data"] = engine.env.data.summary()
    if cfg.attack.target != "none":
        recorder.extra["targets"] = [int(t) for t in engine.targets()[0]]
    if saved is not None:
        engine.load_state_dict(saved["state"])
        recorder.extra["resumed_from_round"] = resume
        if pretrained is not None:
            recorder.extra["pretrained_from"] = str(pretrained["dir"])

    def save(state):
        recorder.flush()  # every row up to the checkpoint is on disk before it
        size = save_checkpoint(run_dir, cfg.digest(), state["round"], state,
                               wall_time_s=recorder.elapsed(), cpu_time_s=recorder.cpu_elapsed())
        recorder.extra["checkpoint_bytes"] = size

    try:
        result = engine.run(save_checkpoint=save)
    except KeyboardInterrupt:
        recorder.finish(status="interrupted")
        raise
    summary = recorder.finish(
        status="complete", train_seconds=round(result["train_seconds"], 3),
        rounds_per_s=round(result["rounds_per_s"], 3), eval_seconds=round(result["eval_seconds"], 3),
        fit_rounds_per_s=round(result["fit_rounds_per_s"], 3), workers=engine.workers,
        invalid_uploads=result["invalid_uploads"],
        invalid_uploads_total=result["invalid_uploads_total"],
        client_failures=result["client_failures"], detection=result["detection"],
        run_dir=str(run_dir))
    remove_checkpoint(run_dir)  # a complete run needs none
    return summary


def pretrain_config(cfg):
    """The clean run an attack starting at round s > 1 continues: the same experiment without
    attack (attack section at its defaults), s - 1 rounds, named by its own digest, so every
    attack, share and target of a grid with the same training setting reuses it."""
    from fedrec.config import AttackConfig

    clean = copy.deepcopy(cfg)
    clean.attack = AttackConfig(target=cfg.attack.target)  # ER@K of the target before the attack
    clean.train.rounds = cfg.attack.start_round - 1
    if cfg.eval.from_round > clean.train.rounds:  # it evaluates its last round only, whatever
        clean.eval.every = clean.eval.from_round = 0  # eval.every: one pretraining for every schedule
    clean.output.name = ""
    clean.output.name = f"pretrain/{cfg.name}-{clean.digest()}"
    return clean


def pretrain(cfg, output_root=None, progress=None) -> dict:
    """{"payload": the clean pretraining's checkpoint after round start_round - 1, "dir"}: read
    from `<output>/pretrain_<name>-<digest>/` when an earlier run made it (a lock file keeps
    two processes of a grid from computing it twice), else computed now and kept there."""
    import fcntl

    from fedrec.checkpoint import load_checkpoint, save_checkpoint

    clean = pretrain_config(cfg)
    pdir = run_dir_for(clean, output_root)
    pdir.mkdir(parents=True, exist_ok=True)
    with open(pdir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        payload = load_checkpoint(pdir, clean.digest())
        if payload is None or int(payload["round"]) != clean.train.rounds:
            engine = Engine(clean, progress=progress, workers=auto_workers(clean))
            recorder = RunRecorder(clean, pdir, runner="engine")
            engine.ledger.recorder = recorder

            def save(state):
                recorder.flush()
                save_checkpoint(pdir, clean.digest(), state["round"], state)

            engine.run(save_checkpoint=save, save_final=True)
            recorder.finish(status="complete", pretraining_for_attacks=True)
            payload = load_checkpoint(pdir, clean.digest())
    return {"payload": payload, "dir": pdir}
