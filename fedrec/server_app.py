"""Flower ServerApp: experiment -> strategy (through `fedrec.build`), evaluation, results.

`flwr run .` reads `[tool.flwr.app.config]`:
- `experiment`: the experiment YAML, relative to the app directory (the FAB ships
  `experiments/*.yaml`), else to $FEDREC_PROJECT_ROOT or the working directory;
- `overrides`: "key=value;key=value" applied on top of the YAML (as `fedrec run --set`);
- `output-dir`: where run directories go ("" = the YAML's `output.dir`). A relative path is
  taken from $FEDREC_PROJECT_ROOT, else from the working directory of the SuperLink (the
  directory `flwr run` was first called from), never from the unpacked FAB.
- `public-info`: a deployment's server without the data set: the public.json of `fedrec
  partition export` (fedrec.partition); "" = the ServerApp prepares the data set itself.

Run config precedence: the app's pyproject defaults < `make_server_app(run_config)` (for
`flwr.simulation.run_simulation`, which passes an empty run config) < `context.run_config`
(what `flwr run` sends: every declared key, `--run-config` applied).

The run directory is the in-process runner's (`fedrec.results.RunRecorder`, runner "flwr"),
named `<name>-<digest>-flwr` so the two runners never overwrite each other: config.yaml,
metrics.csv (plus `round_time_s`, the fit phase's wall time, and `eval_time_s`) and
summary.json, written by `FlowerRun.execute` once Flower's server loop has returned
(`complete` when the last round was evaluated, `failed` with the error if the loop raised). With FEDREC_SAVE_MODEL=1 the
final global arrays are also saved to model.npz (`item_table`, `predictor_<j>`).

The ServerApp's own flow (`FlowerRun`) builds everything, runs the legacy server loop
(`start_grid`) and then finishes the run; `OrderedStrategy` writes each round's row through
`fedrec.ledger.RunLedger`, the recorder's only writer, as the in-process runner does.

Two things make a Flower run reproduce the in-process runner exactly:
- `PartitionClientManager` waits for every SuperNode (round 1 can otherwise start early), asks
  each once for its partition-id (one batched `get_properties` message per node), and lists
  the nodes in user order, so the strategy's seeded sampling picks the same users;
- `OrderedStrategy` hands the fit results to the strategy in that same order (Flower returns
  them in completion order, and float sums depend on the order).
The legacy `Server` gets enough threads to send a round's cohort at once (`max_workers`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.common import Context, ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server import Server, ServerApp, ServerConfig
from flwr.server.strategy import Strategy

from fedrec import environment
from fedrec.checkpoint import checkpoint_path, load_checkpoint, remove_checkpoint, save_checkpoint
from fedrec.client_app import app_run_config, load_experiment
from fedrec.errors import ConfigError
from fedrec.flower_nodes import PartitionClientManager, Roster, RoundTimer


def is_simulation(proxy) -> bool:
    """Flower's simulation runtime hands the ServerApp an InMemoryGrid; a deployment does not,
    and there the server can know nothing about who is malicious."""
    return type(getattr(proxy, "grid", None)).__name__ == "InMemoryGrid"


def check_deployable(adversary):
    """A real deployment runs local attacks only (on the devices); one line otherwise."""
    if adversary is not None and adversary.knowledge != "local":
        raise RuntimeError(
            f"attack {adversary.attack_cls.name!r} has {adversary.knowledge} knowledge, which "
            "only a simulation can give (fedrec/adversary.py); a real deployment runs local "
            "attacks only (attack.knowledge: local, or another attack)")


class OrderedStrategy(Strategy):
    """The ServerApp's runner around the FedRecStrategy: fit results go to it in user order,
    the simulation-only adversary hook runs before it, rounds are timed, and every round's
    result is written through the ledger (the only writer of the recorder)."""

    def __init__(self, inner, manager: PartitionClientManager, timer: RoundTimer, ledger,
                 adversary=None):
        super().__init__()
        self.inner = inner
        self.manager = manager
        self.timer = timer
        self.ledger = ledger
        # simulation only (fedrec/adversary.py): called on the fit results before the strategy
        self.adversary = adversary
        self._runtime_checked = False
        self.roster = Roster(manager)
        self.absent: dict[int, list] = {}  # round -> users sampled for fit whose node is gone
        # checkpoints (FlowerRun): save(round_done) every `checkpoint_every` rounds; a resumed
        # run skips the rounds before `first_round` and tells the devices where it resumed
        self.save = None
        self.checkpoint_every = 0
        self.last_checkpoint = 0
        self.first_round = 1
        self.resume_round = -1

    def initialize_parameters(self, client_manager):
        return self.inner.initialize_parameters(client_manager)

    def _rounds_config(self, ins):
        """The public numbers a device needs: the round numbers of a disk store
        (clients/state.py), and the number of items (a device built from its partition file
        alone takes it from here, fedrec.partition)."""
        for _, one in ins:
            one.config["checkpoint_round"] = self.last_checkpoint
            one.config["resume_round"] = self.resume_round
            one.config["n_items"] = int(self.inner.n_items)
        return ins

    def configure_fit(self, server_round, parameters, client_manager):
        if server_round < self.first_round:  # done before the checkpoint this run resumed
            return []
        done = server_round - 1  # round `done` is complete, its evaluation included
        if (self.save is not None and self.checkpoint_every > 0 and done >= self.first_round
                and done % self.checkpoint_every == 0):
            self.save(done)
            self.last_checkpoint = done
        self.timer.fit_start[server_round] = time.perf_counter()
        ins, gone = self._live(self._rounds_config(
            self.inner.configure_fit(server_round, parameters, self.roster)))
        if gone:  # recorded as failures of this round (aggregate_fit)
            self.absent[server_round] = gone
            log(WARNING, "fedrec: round %d: user(s) %s sampled but their SuperNode is gone",
                server_round, gone)
        if not self._runtime_checked and ins:
            self._runtime_checked = True
            if not is_simulation(ins[0][0]):
                check_deployable(self.adversary)
                # local attacks run on the devices; a deployment's server keeps no ground truth
                self.adversary = None
                self.ledger.detection = None
        return ins

    def aggregate_fit(self, server_round, results, failures):
        failures = list(failures) + [("absent", user) for user in self.absent.get(server_round, [])]
        results = sorted(results, key=lambda r: self.manager.partition_of(r[0].cid))
        attack = {}
        if self.adversary is not None:
            results, attack = apply_adversary(self.adversary, server_round, results, self.manager,
                                              self.inner)
        result = self.inner.aggregate_fit_result(server_round, results, failures)
        now = time.perf_counter()
        self.timer.fit_end[server_round] = now
        user = self.manager.partition_of
        users = [user(proxy.cid) for proxy, _ in results]
        by_user = dataclasses.replace(
            result, dropped=[user(cid) for cid in result.dropped],
            dropped_by={k: [user(cid) for cid in v] for k, v in result.dropped_by.items()})
        start = self.timer.fit_start.get(server_round, now)
        row = self.ledger.fit(server_round, users, by_user, attack,
                              extra={"round_time_s": round(now - start, 6)})
        return ndarrays_to_parameters(self.inner.global_arrays()), row

    def configure_evaluate(self, server_round, parameters, client_manager):
        if server_round < self.first_round:
            return []
        self.timer.eval_start[server_round] = time.perf_counter()
        return self._live(self._rounds_config(
            self.inner.configure_evaluate(server_round, parameters, self.roster)))[0]

    def _live(self, ins):
        """(messages for connected nodes only, the users sampled whose node is gone)."""
        live, gone = [], []
        for proxy, one in ins:
            if self.manager.is_live(proxy):
                live.append((proxy, one))
            else:
                gone.append(self.manager.partition_of(proxy.cid))
        return live, gone

    def aggregate_evaluate(self, server_round, results, failures):
        loss, metrics = self.inner.aggregate_evaluate(server_round, results, failures)
        start = self.timer.eval_start.get(server_round)
        extra = {} if start is None else {"eval_time_s": round(time.perf_counter() - start, 6)}
        self.ledger.eval(server_round, metrics, server_round == self.inner.num_rounds, extra)
        return loss, metrics

    def evaluate(self, server_round, parameters):
        return self.inner.evaluate(server_round, parameters)


def apply_adversary(adversary, server_round, results, manager, strategy):
    """The adversary hook on Flower fit results (sorted by user): crafted uploads replace the
    malicious clients' honest ones; the strategy gets ordinary (proxy, FitRes) pairs. The
    bytes are decoded as the strategy decodes them (an upload that does not decode stays as
    it came, for the strategy to drop and count)."""
    from flwr.common import FitRes, ndarrays_to_parameters

    raw = [(manager.partition_of(proxy.cid), strategy.decode_fit_res(res),
            res.num_examples, res.metrics) for proxy, res in results]
    global_arrays = strategy.global_arrays()
    crafted, diagnostics = adversary.intervene(server_round, raw, global_arrays)
    out = []
    for (proxy, res), before, after in zip(results, raw, crafted):
        if after[1] is not before[1]:
            res = FitRes(status=res.status, parameters=ndarrays_to_parameters(after[1]),
                         num_examples=res.num_examples, metrics=res.metrics)
        out.append((proxy, res))
    return out, diagnostics


# ---------------------------------------------------------------------------- server_fn


def public_env(cfg, public_path):
    """The server's env from an exported public.json (`public-info` run config): the model
    and the counts, never the data set (fedrec.partition)."""
    from clients.env import ClientEnv
    from fedrec.build import build_model
    from fedrec.partition import PublicData, read_public

    data = PublicData(read_public(public_path, cfg))
    return ClientEnv(cfg=cfg, model=build_model(cfg, data), data=data)


def check_pool(cfg):
    """A colluding/omniscient attack that needs devices' private state, which a ServerApp never
    reads, is refused: attack.pool_sample > 0 (the pool's honest updates) and an attack that
    crafts with its clients' private user rows (colluding PipAttack). A clean or local-attack
    run ignores both."""
    from fedrec.adversary import attack_class

    cls = attack_class(cfg)
    if cls is None or cls.knowledge_from(cfg) == "local":
        return
    if cfg.attack.pool_sample > 0:
        raise ConfigError("attack.pool_sample > 0 needs the devices' private state, which a "
                          "ServerApp cannot read: run it with `fedrec run`, or set it to 0")
    if cls.needs_user_rows:
        raise ConfigError(f"attack.knowledge: {cls.name} with {cls.knowledge_from(cfg)} knowledge "
                          "crafts with its clients' private user rows, which a ServerApp cannot "
                          "read: run it with `fedrec run`, or use attack.knowledge: local")


def public_adversary(cfg):
    """A server without the data set runs local attacks only (they run on the devices);
    a colluding or omniscient one is refused here, before any round, in one line."""
    from fedrec.adversary import attack_class

    cls = attack_class(cfg)
    if cls is not None:
        knowledge = cls.knowledge_from(cfg)
        if knowledge != "local":
            raise ConfigError(
                f"attack {cfg.attack.name!r} has {knowledge} knowledge, which only a simulation "
                "can give (fedrec/adversary.py); a deployment runs local attacks only "
                "(attack.knowledge: local, or another attack)")
    return None


def output_root(run_config, cfg) -> Path:
    spec = str(run_config.get("output-dir", "") or cfg.output.dir)
    p = Path(os.path.expandvars(os.path.expanduser(spec)))
    if not p.is_absolute():
        p = (environment.project_root() or Path.cwd()) / p
    return p


def flwr_run_dir(cfg, root) -> Path:
    from fedrec.results import run_dir_for

    d = run_dir_for(cfg, root)
    return d.with_name(d.name + "-flwr")


def max_workers(cfg) -> int:
    """Threads the legacy Server uses to talk to clients, one message in flight per thread.

    Flower's default, min(32, CPUs + 4), is 6 on a 2-core machine: 20 sampled clients then go
    out in 4 waves, each waiting at least one 0.1 s poll (measured: 0.56 -> 0.42 s per round
    for the quickstart). A round's whole cohort (up to 256) goes out in one wave; evaluating
    every user goes in waves of this size.
    """
    return max(32, min(int(cfg.train.clients_per_round), 256))


def save_model(path: Path, arrays):
    np.savez(path, item_table=arrays[0], **{f"predictor_{j}": a for j, a in enumerate(arrays[1:])})


class FlowerRun:
    """One `flwr run`: the experiment from the run config, built through `fedrec.build`, the
    legacy Server driving the OrderedStrategy, and the run directory, finished by `execute`
    once the last round is done (not from inside a callback)."""

    def __init__(self, context: Context, defaults: dict | None = None):
        from fedrec.build import build_env, build_strategy, malicious_set
        from fedrec.evaluation import DetectionTracker
        from fedrec.adversary import make_adversary
        from fedrec.ledger import RunLedger
        from fedrec.results import RunRecorder
        from fedrec.runtime import configure_threads

        configure_threads()
        run_config = app_run_config(context, defaults)
        cfg, path, overrides = load_experiment(run_config)
        check_pool(cfg)
        public = str(run_config.get("public-info", "") or "")
        env = build_env(cfg) if not public else public_env(cfg, public)
        n_users = env.data.n_users
        run_dir = flwr_run_dir(cfg, output_root(run_config, cfg))
        log(INFO, "fedrec: experiment %s%s, %d users; run directory %s", path,
            f" with {overrides}" if overrides else "", n_users, run_dir)
        self.cfg = cfg
        # resuming needs the devices' own copies of their state (flower.device_state_dir)
        self.resumable = bool(cfg.flower.device_state_dir) and cfg.output.checkpoint_every > 0
        saved = load_checkpoint(run_dir, cfg.digest()) if self.resumable else None
        self.recorder = RunRecorder(cfg, run_dir, runner="flwr",
                                    resume_round=None if saved is None else saved["round"],
                                    prior_wall_s=0.0 if saved is None
                                    else saved.get("wall_time_s", 0.0),
                                    # this process's CPU: the clients run in other ones
                                    prior_cpu_s=0.0 if saved is None
                                    else saved.get("cpu_time_s"),
                                    cpu_key="server_cpu_time_s")
        self.recorder.extra.update(data=env.data.summary(), experiment=str(path),
                                   overrides=overrides)
        self.timer = RoundTimer()
        self.manager = PartitionClientManager(n_users)
        fe = cfg.flower.fraction_evaluate
        self.strategy = build_strategy(cfg, env,
                                       min_available_clients=cfg.flower.min_available_clients or n_users,
                                       fraction_evaluate=fe if fe >= 0 else None)
        if public:  # a deployment's server: no data set, so no ground truth and no adversary
            adversary = public_adversary(cfg)
            self.ledger = RunLedger(self.recorder, None)
        else:
            adversary = make_adversary(cfg, env)
            self.ledger = RunLedger(self.recorder, DetectionTracker(malicious_set(env)))
        self.ordered = OrderedStrategy(self.strategy, self.manager, self.timer, self.ledger,
                                       adversary=adversary)
        if self.resumable:
            self.ordered.save = self.save_checkpoint
            self.ordered.checkpoint_every = cfg.output.checkpoint_every
        if saved is not None:
            self.load_state_dict(saved["state"])
            self.recorder.extra["resumed_from_round"] = saved["round"]
            log(INFO, "fedrec: resuming after round %d from %s", saved["round"],
                checkpoint_path(run_dir))
        self.config = ServerConfig(num_rounds=cfg.train.rounds,
                                   round_timeout=cfg.flower.round_timeout or None)
        self.server = Server(client_manager=self.manager, strategy=self.ordered)
        self.server.set_max_workers(max_workers(cfg))

    def state_dict(self, round_done: int) -> dict:
        """The server's part of a run after `round_done` (the devices keep theirs)."""
        adversary = self.ordered.adversary
        return {"round": int(round_done), "strategy": self.strategy.state_dict(),
                "ledger": self.ledger.state_dict(),
                "adversary": None if adversary is None else adversary.state_dict()}

    def load_state_dict(self, state: dict):
        self.strategy.load_state_dict(state["strategy"])
        self.ledger.load_state_dict(state["ledger"])
        if self.ordered.adversary is not None and state["adversary"] is not None:
            self.ordered.adversary.load_state_dict(state["adversary"])
        self.ordered.first_round = self.ordered.last_checkpoint = int(state["round"])
        self.ordered.first_round += 1
        self.ordered.resume_round = int(state["round"])

    def save_checkpoint(self, round_done: int):
        self.recorder.flush()  # every row up to the checkpoint is on disk before it
        save_checkpoint(self.recorder.dir, self.cfg.digest(), round_done,
                        self.state_dict(round_done), wall_time_s=self.recorder.elapsed(),
                        cpu_time_s=self.recorder.cpu_elapsed())

    def execute(self, grid) -> dict:
        from flwr.server.compat import start_grid

        try:
            start_grid(grid=grid, server=self.server, config=self.config)
        except BaseException as e:
            self.recorder.finish(status="failed", error=f"{type(e).__name__}: {e}")
            raise
        return self.finish()

    def finish(self) -> dict:
        """summary.json: complete once the last round's evaluation was recorded."""
        timer, cfg = self.timer, self.cfg
        first = timer.fit_start[min(timer.fit_start)] if timer.fit_start else time.perf_counter()
        elapsed = time.perf_counter() - first
        if environment.save_model():
            save_model(self.recorder.dir / "model.npz", self.strategy.global_arrays())
        spr = timer.seconds_per_round(2)
        complete = bool(self.recorder.final)
        summary = self.recorder.finish(
            status="complete" if complete else "incomplete",
            train_seconds=round(elapsed, 3),
            rounds_per_s=round(cfg.train.rounds / elapsed, 3) if elapsed > 0 else None,
            seconds_per_round_after_first=None if spr is None else round(spr, 6),
            **self.ledger.totals(), supernodes=len(self.manager.partition),
            run_dir=str(self.recorder.dir))
        if complete:
            remove_checkpoint(self.recorder.dir)
        shown = {k: round(v, 4) for k, v in self.recorder.final.items()
                 if k.startswith(("test_hr", "test_ndcg"))}
        log(INFO, "fedrec: final %s", shown)
        log(INFO, "fedrec: results in %s", self.recorder.dir)
        return summary


def make_server_app(run_config: dict | None = None) -> ServerApp:
    """A ServerApp; `run_config` ("experiment", "overrides", "output-dir") fills in what the
    context lacks (e.g. under `flwr.simulation.run_simulation`, which passes no run config)."""
    defaults = dict(run_config or {})
    app = ServerApp()

    @app.main()
    def main(grid, context: Context) -> None:
        FlowerRun(context, defaults).execute(grid)

    return app


app = make_server_app()
