"""The one place that turns a config into data, model, clients and strategy.

`fedrec run` (engine.py), the Flower ServerApp and the Flower ClientApp all build through
here, so the ways of running cannot drift apart.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedrec.config import ExperimentConfig
from fedrec.data.prepare import PreparedData, cache_dir, cached_prepare, file_digest
from fedrec.errors import ConfigError
from fedrec.models import make_model


def _resolve_data_path(cfg: ExperimentConfig):
    """(path or name, format, options) for a non-synthetic dataset."""
    from fedrec.data.formats import resolve_dataset

    spec = os.path.expandvars(os.path.expanduser(cfg.data.dataset))
    if cfg.base_dir and not os.path.isabs(spec):
        local = Path(cfg.base_dir) / spec
        if local.exists():
            spec = str(local)
    path, fmt, options = resolve_dataset(spec)
    if cfg.data.format != "auto":
        fmt = cfg.data.format
    return path, fmt, {**options, **cfg.data.options}


def load_data(cfg: ExperimentConfig) -> PreparedData:
    """Load (through the content-hash cache) and preprocess the experiment's data."""
    d = cfg.data
    prep = dict(kcore_k=d.kcore, split=d.split, attacker_pool=d.attacker_pool, seed=cfg.seed)
    if d.fixed_test != "first":  # only then: the cache keys of every other setting stay as they were
        prep["fixed_test"] = d.fixed_test
    if d.dataset == "synthetic":
        from fedrec.data.synthetic import generate_synthetic

        syn = vars(d.synthetic).copy()
        return cached_prepare({"synthetic": syn}, cache_dir(cfg),
                              lambda: generate_synthetic(**syn), **prep)
    from fedrec.data.formats import load_interactions

    path, fmt, options = _resolve_data_path(cfg)
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    key = {"content": file_digest(files), "format": fmt, "options": options}
    return cached_prepare(key, cache_dir(cfg),
                          lambda: load_interactions(path, format=fmt, **options), **prep)


def check_data(cfg: ExperimentConfig, data: PreparedData):
    """What the experiment needs of its data, checked before anything runs (one line)."""
    import numpy as np

    known = np.diff(data.train_indptr).astype(np.int64)
    if cfg.data.negatives_exclude == "all":  # held-out items are the user's too
        known += (data.val_item >= 0).astype(np.int64) + (data.test_item >= 0)
    full = np.flatnonzero(known >= data.n_items)
    if len(full):
        raise ConfigError(f"user {int(full[0])} (of {len(full)}) has interacted with all "
                          f"{data.n_items} items: no negatives exist; remove such users from the "
                          "data (or use data.negatives_exclude: train)")


def build_model(cfg: ExperimentConfig, data: PreparedData):
    return make_model(cfg.model, data.n_items)


def initial_arrays(cfg: ExperimentConfig, model) -> list:
    import numpy as np

    table, predictor = model.init_global(np.random.default_rng([cfg.seed, 15485863]))
    return [table, *predictor]


def build_env(cfg: ExperimentConfig, data=None, model=None):
    from clients.env import ClientEnv

    data = data if data is not None else load_data(cfg)
    check_data(cfg, data)
    model = model if model is not None else build_model(cfg, data)
    env = ClientEnv(cfg=cfg, model=model, data=data)
    if cfg.attack.name != "none":  # a bad attack name, parameter or pool size fails here
        from fedrec.adversary import attack_class

        cls = attack_class(cfg)
        cls.params_from(cfg)
        cls.knowledge_from(cfg)
        malicious_set(env)
    return env


def build_device_env(cfg: ExperimentConfig, data, malicious: bool):
    """A device's env from its exported partition (fedrec.partition.device_data): the model
    from the experiment and the server's number of items, the device's own role, no data set."""
    from clients.env import ClientEnv

    check_data(cfg, data)
    env = ClientEnv(cfg=cfg, model=build_model(cfg, data), data=data)
    users = [int(u) for u in data.attacker_pool] if malicious else []
    object.__setattr__(env, "_malicious", frozenset(users))
    if malicious:
        from fedrec.adversary import attack_class

        if cfg.attack.name == "none":
            raise ConfigError("data-path: this partition is malicious, but the run's attack.name "
                              "is none (exported with another experiment?)")
        cls = attack_class(cfg)
        cls.params_from(cfg)
        cls.knowledge_from(cfg)
        if getattr(cls, "needs_public_interactions", False):
            raise ConfigError(f"attack {cfg.attack.name!r} needs the public share of every user's "
                              "interactions, which a partition file does not carry: run it in a "
                              "simulation")
    return env


def malicious_set(env) -> frozenset:
    """The malicious users of the experiment (cached on the env: drawn once per process)."""
    cached = getattr(env, "_malicious", None)
    if cached is None:
        from fedrec.roles import malicious_users

        cached = frozenset(int(u) for u in malicious_users(env.cfg, env.data))
        object.__setattr__(env, "_malicious", cached)
    return cached


def build_client(env, user: int, store):
    """The client for `user`: the attack's MaliciousClient if the role draw (fedrec.roles)
    made this user malicious, else a BenignClient."""
    from clients.benign import BenignClient

    if not 0 <= user < env.data.n_users:
        raise ConfigError(f"partition-id {user} is outside [0, {env.data.n_users})")
    if int(user) in malicious_set(env):
        from fedrec.adversary import attack_class

        return attack_class(env.cfg)(user, env, store)
    return BenignClient(user, env, store)


def build_strategy(cfg: ExperimentConfig, env, *, min_available_clients=None,
                   fraction_evaluate=None, extra_steps=()):
    from fedrec.registry import make_rule
    from strategies.fedrec import FedRecStrategy

    if cfg.train.clients_per_round > env.data.n_users:  # an error, not a silent clamp
        raise ConfigError(f"train.clients_per_round: {cfg.train.clients_per_round} is more than "
                          f"the {env.data.n_users} users of the data set")
    model = env.model
    return FedRecStrategy(
        initial_arrays(cfg, model), n_items=model.n_items, dim=model.dim,
        predictor_shapes=model.predictor_shapes, server_cfg=cfg.server, seed=cfg.seed,
        clients_per_round=cfg.train.clients_per_round, sampling=cfg.train.sampling,
        num_rounds=cfg.train.rounds, eval_every=cfg.eval.every, eval_from=cfg.eval.from_round,
        fraction_evaluate=cfg.eval.fraction if fraction_evaluate is None else fraction_evaluate,
        min_available_clients=min_available_clients or env.data.n_users,
        rule=make_rule(cfg, extra_steps), ks=cfg.eval.ks,
    )
