"""Flower ClientApp: partition-id -> user -> the client `fedrec.build` makes for that user.

One SuperNode per user. In simulation `context.node_config` is
`{"partition-id": i, "num-partitions": N}`; in deployment the same keys come from
`flower-supernode --node-config "partition-id=i num-partitions=N"`. N must equal the number
of users of the experiment.

`client_fn` runs once per message, so the experiment (config, prepared data, model) is built
once per process and cached, keyed by the experiment file (path, size, mtime) and overrides.
The user's private state (user row, optimizer moments, negatives) lives in `context.state`
through `FlowerStore` and never leaves the node.

With `--node-config "... data-path=DIR/user-<i>.json"` (written by `fedrec partition export`)
the SuperNode knows only its own user's data: the client is built from that file, the number
of items from the server's messages, and the data set is never opened (fedrec.partition).

The client answers Flower's `get_properties` with its partition-id and num-partitions (no data
is loaded for that). The ServerApp uses them to order the SuperNodes by user, so its seeded
sampling picks the same users as the in-process runner and aggregates in the same order.

The helpers that resolve the run config (`experiment`, `overrides`) live here and are shared
with `fedrec.server_app`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from flwr.client import Client, ClientApp
from flwr.common import Code, Context, GetPropertiesIns, GetPropertiesRes, Status

from fedrec import environment
from fedrec.errors import ConfigError

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"  # node config: this device's exported partition (fedrec.partition)

# ---------------------------------------------------------------------------- run config


def app_dir() -> Path:
    """The directory holding this app's pyproject.toml.

    Under `flwr run` that is where the FAB was unpacked ($FLWR_HOME/apps/...), not the cwd;
    Flower puts it first on sys.path, so this package is imported from there. In a checkout
    (tests, `run_simulation`) it is the project root.
    """
    return Path(__file__).resolve().parent.parent


def search_roots() -> list[Path]:
    """Where a relative experiment path is looked up, in order: the app directory (the FAB
    ships `experiments/*.yaml`), $FEDREC_PROJECT_ROOT, the working directory."""
    roots = [app_dir()]
    project = environment.project_root()
    if project is not None:
        roots.append(project)
    roots.append(Path.cwd())
    return roots


def resolve_experiment_path(spec: str) -> Path:
    if not spec:
        raise ConfigError("run config 'experiment' is empty: name an experiment YAML, e.g. "
                          "--run-config 'experiment=\"experiments/quickstart.yaml\"'")
    p = Path(os.path.expandvars(os.path.expanduser(spec)))
    if p.is_absolute():
        if not p.is_file():
            raise ConfigError(f"experiment {spec!r}: no such file")
        return p
    tried = []
    for root in search_roots():
        cand = root / p
        if cand.is_file():
            return cand.resolve()
        tried.append(str(cand))
    raise ConfigError(f"experiment {spec!r} not found; looked in: {', '.join(tried)} "
                      "(set FEDREC_PROJECT_ROOT, or pass an absolute path)")


def split_overrides(text) -> list[str]:
    """`"train.rounds=10; seed=3"` -> `["train.rounds=10", "seed=3"]`."""
    return [p.strip() for p in str(text or "").split(";") if p.strip()]


BUILTIN_DEFAULTS = {"experiment": "experiments/quickstart.yaml", "overrides": "", "output-dir": ""}
_PYPROJECT_DEFAULTS: dict | None = None


def pyproject_defaults() -> dict:
    """`[tool.flwr.app.config]` of the app's pyproject.toml (built-in defaults without one)."""
    global _PYPROJECT_DEFAULTS
    if _PYPROJECT_DEFAULTS is None:
        out = dict(BUILTIN_DEFAULTS)
        path = app_dir() / "pyproject.toml"
        if path.is_file():
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            conf = tomllib.loads(path.read_text()).get("tool", {}).get("flwr", {})
            out.update(conf.get("app", {}).get("config", {}))
        _PYPROJECT_DEFAULTS = out
    return _PYPROJECT_DEFAULTS


def app_run_config(context: Context, defaults: dict | None = None) -> dict:
    """The run config: pyproject defaults < `defaults` < `context.run_config`.

    Under `flwr run` the context carries every declared key. `run_simulation` passes an empty
    run config, so `make_client_app` / `make_server_app` take the values as `defaults`.
    """
    return {**pyproject_defaults(), **(defaults or {}), **dict(context.run_config or {})}


def experiment_spec(run_config) -> tuple[Path, list[str]]:
    return (resolve_experiment_path(str(run_config.get("experiment", ""))),
            split_overrides(run_config.get("overrides", "")))


def load_experiment(run_config):
    """(ExperimentConfig, experiment path, override list) from a run config."""
    from fedrec.config import load_one

    path, overrides = experiment_spec(run_config)
    return load_one(path, overrides), path, overrides


# ---------------------------------------------------------------------------- env cache

_ENV_CACHE: dict = {}
_ENV_LOCK = threading.Lock()


def _cache_key(path: Path, overrides: list[str]):
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns, tuple(overrides))


def client_env(run_config, device=None):
    """The experiment's ClientEnv, built once per process (per experiment and overrides).

    `device` = (data-path, user, num-partitions, n_items) for a SuperNode started from an
    exported partition (fedrec.partition): the env then holds that user's file only, and the
    data set is never opened."""
    path, overrides = experiment_spec(run_config)
    key = (_cache_key(path, overrides), device)
    with _ENV_LOCK:
        env = _ENV_CACHE.get(key)
        if env is None:
            from fedrec.config import load_one
            from fedrec.runtime import configure_threads

            configure_threads()
            cfg = load_one(path, overrides)
            if device is None:
                from fedrec.build import build_env

                env = build_env(cfg)
            else:
                from fedrec.build import build_device_env
                from fedrec.partition import device_data, read_user

                data_path, user, n_users, n_items = device
                rec = read_user(data_path, cfg, user)
                env = build_device_env(cfg, device_data(rec, n_users, n_items, data_path),
                                       bool(rec.get("malicious")))
            _ENV_CACHE.clear()  # one experiment per process at a time
            _ENV_CACHE[key] = env
    return env


def partition_of(context: Context) -> tuple[int, int]:
    nc = context.node_config
    if PARTITION_ID not in nc or NUM_PARTITIONS not in nc:
        raise ConfigError(
            f"this SuperNode has no {PARTITION_ID!r}/{NUM_PARTITIONS!r} in its node config "
            f"(got {dict(nc)}); start it with "
            f"--node-config \"{PARTITION_ID}=<user> {NUM_PARTITIONS}=<number of users>\"")
    return int(nc[PARTITION_ID]), int(nc[NUM_PARTITIONS])


def check_partitions(num_partitions: int, n_users: int):
    if num_partitions != n_users:
        raise ConfigError(
            f"num-partitions is {num_partitions} but the experiment has {n_users} users: "
            f"fedrec runs one SuperNode per user, so use num-supernodes={n_users} "
            f"(e.g. --federation-config \"num-supernodes={n_users}\")")


# ---------------------------------------------------------------------------- client


def device_store(context: Context, cfg, user: int):
    """Where this device keeps its private state: Flower's `context.state`, plus its own disk
    (node config `state-dir`, else YAML flower.device_state_dir) when that is set, so a
    resumed run finds it (clients.state.DeviceDiskStore)."""
    from clients.state import DeviceDiskStore, FlowerStore

    folder = str(context.node_config.get("state-dir", "") or cfg.flower.device_state_dir)
    if not folder:
        return FlowerStore(context)
    root = Path(os.path.expandvars(os.path.expanduser(folder)))
    if not root.is_absolute():
        root = Path(cfg.base_dir or ".") / root
    return DeviceDiskStore(context, root / f"{cfg.name}-{cfg.digest()}" / f"user-{user}.npz")


class UserClient(Client):
    """The user's client, built on first use; `get_properties` answers without building it."""

    def __init__(self, context: Context, run_config: dict):
        self.context = context
        self.run_config = run_config
        self.partition_id, self.num_partitions = partition_of(context)
        self._inner = None
        self.store = None

    def device(self, config) -> tuple | None:
        """(data-path, user, users, items) when this SuperNode runs from an exported partition:
        the number of items is the server's (every message carries it)."""
        data_path = str(self.context.node_config.get(DATA_PATH, "") or "")
        if not data_path:
            return None
        if "n_items" not in config:
            raise ConfigError("this SuperNode runs from a partition (data-path) but the server "
                              "sent no n_items: the ServerApp is not fedrec's")
        return (data_path, self.partition_id, self.num_partitions, int(config["n_items"]))

    def inner(self, config=None) -> Client:
        if self._inner is None:
            from fedrec.build import build_client

            env = client_env(self.run_config, self.device(config or {}))
            check_partitions(self.num_partitions, env.data.n_users)
            self.store = device_store(self.context, env.cfg, self.partition_id)
            self._inner = build_client(env, self.partition_id, self.store).to_client()
        return self._inner

    def _rounds_from(self, config):
        """The server's checkpoint and resume rounds (public numbers) for a disk store."""
        inner = self.inner(config)
        if hasattr(self.store, "checkpoint_round"):
            self.store.checkpoint_round = int(config.get("checkpoint_round", 0))
            self.store.resume_round = int(config.get("resume_round", -1))
        return inner

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        return GetPropertiesRes(status=Status(code=Code.OK, message="Success"),
                                properties={PARTITION_ID: self.partition_id,
                                            NUM_PARTITIONS: self.num_partitions})

    def get_parameters(self, ins):
        return self.inner(ins.config).get_parameters(ins)

    def fit(self, ins):
        return self._rounds_from(ins.config).fit(ins)

    def evaluate(self, ins):
        return self._rounds_from(ins.config).evaluate(ins)


def make_client_app(run_config: dict | None = None) -> ClientApp:
    """A ClientApp; `run_config` ("experiment", "overrides") fills in what the context lacks
    (e.g. under `flwr.simulation.run_simulation`, which passes no run config)."""
    defaults = dict(run_config or {})

    def client_fn(context: Context) -> Client:
        return UserClient(context, app_run_config(context, defaults))

    return ClientApp(client_fn=client_fn)


def client_fn(context: Context) -> Client:
    return UserClient(context, app_run_config(context))


app = ClientApp(client_fn=client_fn)
