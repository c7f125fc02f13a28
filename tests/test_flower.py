"""The Flower apps: same results as the in-process runner, and what crosses the wire.

- `test_flower_simulation_matches_engine` (MF, every user every round),
  `test_flower_partial_participation_matches_engine` (NCF, 4 of 12 users per round) and
  `test_flower_sequential_model_matches_engine` (SASRec, 4 of 12 per round): tiny
  experiments through `fedrec.engine` and through Flower's simulation runtime
  (`run_simulation`, in one subprocess with a time limit); final metrics, per-round rows and
  the server's item table (and predictor) must be bit-identical. Skipped if Ray cannot start.
  A watchdog dumps the driver's and the Ray actors' stacks if the simulation stops making
  progress; such a hang is rerun once from scratch (reported in the warnings) and fails the
  fixture if it happens again.
- `test_flwr_run_smoke` (slow; runs when FEDREC_RUN_SLOW=1): the real `flwr run . --stream`
  against a SuperLink of its own (temporary FLWR_HOME, free ports, stopped by PID).
- The ClientApp driven with hand-made Flower messages: uploads carry only
  [item_ids, item_rows, predictor...], and `context.state` carries the user row across rounds.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import load_file_module

ROOT = Path(__file__).resolve().parents[1]


def _experiment(tmp_path, model="mf", name=None, **extra) -> Path:
    name = name or f"flwr-eq-{model}"
    raw = {
        "name": name,
        "seed": 3,
        "data": {"synthetic": {"n_users": 12, "n_items": 40, "mean_history": 10, "seed": 1},
                 "attacker_pool": 0.1, "cache_dir": str(tmp_path / "cache")},
        "model": {"name": model, "dim": 8, "mlp_layers": [8, 4]},
        "train": {"rounds": 3, "clients_per_round": 12},
        "server": {"lr": 0.05},
        "eval": {"every": 1, "fraction": 1.0, "ks": [5, 10]},
        "output": {"progress": False},
    }
    for k, v in extra.items():
        section, key = k.split("__")
        raw.setdefault(section, {})[key] = v
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _engine_run(path, out_root, monkeypatch):
    """run_experiment, keeping the final global arrays of the strategy."""
    from conftest import engine_run_capturing_arrays
    from fedrec.config import load_one

    return engine_run_capturing_arrays(load_one(path), out_root, monkeypatch)


_DRIVER = r"""
import faulthandler, sys, time
out_root, n, watchdog = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
# a hang shows where it hangs: every thread's stack goes to stderr, then the driver exits
faulthandler.dump_traceback_later(watchdog, exit=True)
try:
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
except Exception as e:  # no Ray here: the tests are skipped
    print("RAY-START-FAILED:", repr(e), flush=True)
    sys.exit(77)
from flwr.client import ClientApp
from flwr.simulation import run_simulation
from fedrec.client_app import UserClient, app_run_config
from fedrec.server_app import make_server_app


DEADLINE = time.time() + watchdog - 30


def watched(client_fn):
    # inside each Ray actor: a hang there dumps the actor's stacks to a file the test reads
    def fn(context):
        if not getattr(faulthandler, "armed", False):
            import os
            faulthandler.armed = open(f"{out_root}/stacks-actor-{os.getpid()}.txt", "w")
            faulthandler.dump_traceback_later(max(DEADLINE - time.time(), 1),
                                              file=faulthandler.armed)
        return client_fn(context)
    return fn


class FailingClient(UserClient):
    # user 3's device raises in round 2 (a crashed ClientApp)

    def fit(self, ins):
        if self.partition_id == 3 and int(ins.config["round"]) == 2:
            raise RuntimeError("injected client failure")
        return super().fit(ins)


from fedrec import server_app


class ServerDies(Exception):
    pass


def dies_at_round_5(self, server_round, results, failures):
    # the ServerApp process dies in round 5 (after the checkpoint of round 4)
    if server_round == 5:
        raise ServerDies("the server died in round 5")
    return REAL(self, server_round, results, failures)


REAL = server_app.OrderedStrategy.aggregate_fit
for yaml_path in sys.argv[4:]:  # Flower shuts Ray down after each run; the next restarts it
    crash = yaml_path.startswith("CRASH:")
    yaml_path = yaml_path.removeprefix("CRASH:")
    started = time.perf_counter()
    print("START", yaml_path.rsplit("/", 1)[-1], flush=True)
    rc = {"experiment": yaml_path, "output-dir": out_root}
    client_cls = FailingClient if "client-failure" in yaml_path else UserClient
    # make_client_app's ClientApp, its client_fn watched
    client_app = ClientApp(client_fn=watched(
        lambda context, rc=rc, cls=client_cls: cls(context, app_run_config(context, rc))))
    server_app.OrderedStrategy.aggregate_fit = dies_at_round_5 if crash else REAL
    try:
        run_simulation(make_server_app(rc), client_app, num_supernodes=n,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    except Exception as e:  # the crash of a CRASH: run is expected; anything else is not
        if not crash:
            raise
        print("CRASHED:", type(e).__name__, flush=True)
        ray.shutdown()  # the dead run's actors must not outlive it
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"DONE in {time.perf_counter() - started:.1f}s", flush=True)
"""


def _flower_simulation(paths, out_root, n_users, watchdog=600):
    # the watchdog only guards against a hang: 10 experiments on Ray take ~4 min on an idle
    # 2-core machine and overran 400 s under a load average of 5-7 (CI on a shared machine).
    # On a hang the driver prints every thread's stack and exits; the failure shows them and
    # which experiment it was in (START/DONE lines).
    env = {**os.environ, "FEDREC_SAVE_MODEL": "1", "RAY_DISABLE_USAGE_STATS": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", _DRIVER, str(out_root), str(n_users),
                               str(watchdog), *map(str, paths)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=watchdog + 60)
    except subprocess.TimeoutExpired as e:  # the watchdog itself did not fire
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x
                      for x in (e.stdout or "", e.stderr or ""))
        raise _Hang(f"Flower simulation did not finish within {watchdog + 60}s:\n"
                    + _progress(out) + out[-4000:] + _actor_stacks(out_root))
    if proc.returncode != 0 and "Timeout (" in proc.stderr:  # faulthandler's watchdog fired
        raise _Hang(f"Flower simulation hung (watchdog {watchdog}s):\n" + _progress(proc.stdout)
                    + proc.stderr[-10000:] + _actor_stacks(out_root))
    if proc.returncode == 77:
        pytest.skip("Ray cannot start here: " + proc.stdout.strip()[-300:])
    assert proc.returncode == 0, (_progress(proc.stdout) + proc.stdout[-1500:]
                                  + proc.stderr[-10000:] + _actor_stacks(out_root))
    return proc


class _Hang(Exception):
    """The simulation stopped making progress; the message has every stack."""


def _progress(stdout: str) -> str:
    """The driver's START/DONE/CRASHED lines: which experiment a failure happened in."""
    return "".join(line + "\n" for line in stdout.splitlines()
                   if line.startswith(("START ", "DONE ", "CRASHED:")))


def _actor_stacks(out_root) -> str:
    """The stacks the Ray actors dumped when the watchdog's deadline passed (empty files
    where an actor ended in time)."""
    dumps = [(p.name, p.read_text()[-3000:]) for p in sorted(Path(out_root).glob("stacks-*"))]
    return "".join(f"\n--- {name}\n{text}" for name, text in dumps if text.strip())


def _flwr_dir(out_root, cfg_name):
    dirs = [d for d in Path(out_root).iterdir() if d.name.startswith(cfg_name + "-")
            and d.name.endswith("-flwr")]
    assert len(dirs) == 1, list(Path(out_root).iterdir())
    return dirs[0]


def _assert_same(engine_summary, engine_arrays, flwr_dir):
    flwr_summary = json.loads((flwr_dir / "summary.json").read_text())
    assert flwr_summary["status"] == "complete" and flwr_summary["runner"] == "flwr"
    # ER@K (attack.target) is the in-process runner's: a Flower run's federated evaluation
    # reports HR/NDCG only
    e_final = {k: v for k, v in engine_summary["final"].items()
               if k.startswith(("test_", "val_")) and "_er" not in k}
    f_final = {k: v for k, v in flwr_summary["final"].items() if k.startswith(("test_", "val_"))}
    assert e_final and e_final == f_final  # exact, not approximate
    model = np.load(flwr_dir / "model.npz")
    assert np.array_equal(model["item_table"], engine_arrays[0])
    assert len(model.files) == len(engine_arrays)
    for j, a in enumerate(engine_arrays[1:]):
        assert np.array_equal(model[f"predictor_{j}"], a)
    # the per-round rows agree too (losses and every evaluation)
    def rows(p):
        with open(p, newline="") as f:
            return {int(r["round"]): r for r in csv.DictReader(f)}

    e_rows = rows(Path(engine_summary["run_dir"]) / "metrics.csv")
    f_rows = rows(flwr_dir / "metrics.csv")
    assert e_rows.keys() == f_rows.keys()
    for rnd, r in e_rows.items():
        for k, v in r.items():
            if k.startswith(("test_", "val_", "train_loss", "accepted")) and "_er" not in k:
                assert f_rows[rnd][k] == v, (rnd, k)


# name -> experiment overrides; both go through one simulation subprocess (Ray start-up and
# shut-down dominate its time)
_CASES = {
    "full-mf": dict(model="mf"),  # every user every round
    "partial-ncf": dict(model="ncf", train__clients_per_round=4, train__rounds=4),
    # the adversary hook under Flower's simulation runtime (colluding), and a local attack
    "attack-colluding": dict(model="mf", attack__name="clusterattack", attack__malicious_fraction=0.09),
    "attack-local": dict(model="mf", train__clients_per_round=5, attack__name="fedattack",
                         attack__malicious_fraction=0.09),
    # PipAttack (local model poisoning, its popularity estimator in the device's state)
    "attack-pipattack": dict(model="ncf", model__ncf_form="mlp", model__loss="bce",
                             data__neg_ratio=2, train__clients_per_round=6, train__rounds=4,
                             attack__name="pipattack", attack__malicious_fraction=0.09,
                             attack__target="least_popular", attack__start_round=2),
    # no user row: each device encodes its own history, per split, with the global encoder
    "partial-sasrec": dict(model="sasrec", train__clients_per_round=4, train__rounds=3,
                           model__max_len=16, model__heads=2, model__device="cpu"),
    # user 3's ClientApp raises in round 2 (see _DRIVER)
    "client-failure": dict(model="mf", train__rounds=3),
    # a quarter of the SuperNodes send hostile arrays, metrics and (half the time) bytes
    # partial participation and adam_sync user rows; the server dies in round 5 (see _DRIVER),
    # a rerun resumes from the checkpoint of round 4 with the devices' own saved state
    "resume": dict(model="mf", train__clients_per_round=4, train__rounds=8,
                   output__checkpoint_every=2, flower__device_state_dir="DEVICES"),
    "hostile": dict(model="ncf", train__rounds=4, attack__name="hostile",
                    attack__malicious_fraction=0.25, data__attacker_pool=0.3,
                    attack__params={"byte_rate": 0.5}),
}


@pytest.fixture(scope="module")
def flower_vs_engine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flower_vs_engine")
    out = tmp / "runs"
    paths, engine = {}, {}
    for name, kw in _CASES.items():
        if kw.get("flower__device_state_dir") == "DEVICES":
            kw = {**kw, "flower__device_state_dir": str(tmp / "devices")}
        paths[name] = _experiment(tmp, name=name, **kw)
        with pytest.MonkeyPatch.context() as mp:
            engine[name] = _engine_run(paths[name], out, mp)
    order = [str(p) for name, p in paths.items() if name != "resume"]
    order += [f"CRASH:{paths['resume']}", str(paths["resume"])]  # dies in round 5, then reruns
    try:
        proc = _flower_simulation(order, out, n_users=12)
    except _Hang as first:
        # Once in about ten CI runs the simulation stopped making progress (CI, 2026-12-05,
        # no stacks recorded then). A second try from scratch tells a rare stall of the
        # runtime from a hang of ours (which hangs again, and fails); the first one's stacks
        # stay in the warnings summary.
        warnings.warn(f"the Flower simulation hung once and was rerun:\n{first}")
        for d in [*out.glob("*-flwr"), tmp / "devices"]:
            shutil.rmtree(d, ignore_errors=True)
        for f in out.glob("stacks-*"):
            f.unlink()
        try:
            proc = _flower_simulation(order, out, n_users=12)
        except _Hang as second:
            pytest.fail(f"the Flower simulation hung twice:\n{first}\n--- again:\n{second}")
    assert "CRASHED: ServerDies" in proc.stdout, proc.stdout[-2000:]  # the crash did happen
    return {name: (*engine[name], _flwr_dir(out, name)) for name in _CASES}


def test_flower_simulation_matches_engine(flower_vs_engine):
    """Full participation: final metrics and the server's item table are bit-identical."""
    _assert_same(*flower_vs_engine["full-mf"])


@pytest.mark.parametrize("case", ["attack-colluding", "attack-local", "attack-pipattack"])
def test_flower_attacked_runs_match_engine(flower_vs_engine, case):
    """An attacked run under Flower's simulation runtime equals the engine's, the adversary
    hook (colluding) included; the attack changed the model (compared with the clean run)."""
    _assert_same(*flower_vs_engine[case])
    summary, arrays, _ = flower_vs_engine[case]
    assert summary["final"] and "attack" in json.dumps(summary)


def test_flower_partial_participation_matches_engine(flower_vs_engine):
    """4 of 12 users per round, NCF (predictor arrays too): the server orders SuperNodes by
    partition-id, so its seeded sampling picks the engine's users, and aggregates in its order."""
    _assert_same(*flower_vs_engine["partial-ncf"])


def test_flower_sequential_model_matches_engine(flower_vs_engine):
    """SASRec under Flower: one user's upload and evaluation computed alone on its SuperNode
    equal the engine's batched ones, so the whole run is bit-identical."""
    _assert_same(*flower_vs_engine["partial-sasrec"])


def test_hostile_supernodes_cannot_break_the_server(flower_vs_engine):
    """Hostile bytes, arrays and metrics from SuperNodes under Flower's runtime: the run
    completes, the model stays finite, and each bad upload is counted by its reason (bytes
    that do not decode included)."""
    _, _, flwr_dir = flower_vs_engine["hostile"]
    summary = json.loads((flwr_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["invalid_uploads_total"] > 0
    assert any(r.startswith("tensor_") for r in summary["invalid_uploads"])
    model = np.load(flwr_dir / "model.npz")
    assert all(np.isfinite(model[k]).all() for k in model.files)
    ranking = {k: v for k, v in summary["final"].items() if "_hr@" in k or "_ndcg@" in k}
    assert ranking and all(0 <= v <= 1 for v in ranking.values())


def test_a_flower_run_resumes_after_the_server_died(flower_vs_engine):
    """The ServerApp died in round 5 of 8 (checkpoints every 2 rounds); rerunning it resumed
    after round 4, the devices reloading their state as of round 4 from their own disks, and
    the run ends bit-identical to the in-process runner's uninterrupted one."""
    engine_summary, engine_arrays, flwr_dir = flower_vs_engine["resume"]
    _assert_same(engine_summary, engine_arrays, flwr_dir)
    summary = json.loads((flwr_dir / "summary.json").read_text())
    assert summary["resumed_from_round"] == 4
    # its wall time counts the dead server's rounds 1-4 (kept in the checkpoint) as well
    assert summary["wall_time_s"] > summary["wall_time_segment_s"] > 0
    assert not (flwr_dir / "checkpoint.pkl").exists()  # a complete run keeps none


def test_a_failing_client_is_recorded_in_its_round(flower_vs_engine):
    """A ClientApp that raises in round 2: the round goes on without its upload, metrics.csv
    says so in that round's row, summary.json sums it, and the run completes."""
    _, _, flwr_dir = flower_vs_engine["client-failure"]
    with open(flwr_dir / "metrics.csv", newline="") as f:
        rows = {int(r["round"]): r for r in csv.DictReader(f)}
    assert {r: int(row["failures"]) for r, row in rows.items()} == {1: 0, 2: 1, 3: 0}
    accepted = {r: int(row["accepted"]) for r, row in rows.items()}  # every user, every round
    assert accepted[2] == accepted[1] - 1 and accepted[3] == accepted[1]
    summary = json.loads((flwr_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["client_failures"] == 1


# ---------------------------------------------------------------------------- flwr run


def _load_bench():
    return load_file_module("benchmarks/flwr_overhead.py")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FEDREC_RUN_SLOW"), reason="set FEDREC_RUN_SLOW=1")
def test_flwr_run_smoke(tmp_path, monkeypatch):
    """`flwr run . --stream` end to end; its results equal the in-process runner's."""
    bench = _load_bench()
    path = _experiment(tmp_path, "mf")
    out = tmp_path / "runs"
    engine_summary, engine_arrays = _engine_run(path, out, monkeypatch)
    t0 = time.perf_counter()
    with bench.LocalSuperLink(tmp_path / "flwr-home",
                              env={"FEDREC_SAVE_MODEL": "1",
                                   "FEDREC_CACHE": str(tmp_path / "cache")}) as link:
        res = link.flwr_run(ROOT, {"experiment": str(path), "output-dir": str(out)},
                            num_supernodes=12, timeout=240)
    assert res.returncode == 0, res.stdout[-4000:]
    assert "fedrec: final" in res.stdout
    _assert_same(engine_summary, engine_arrays, _flwr_dir(out, "flwr-eq-mf"))
    assert time.perf_counter() - t0 < 240


# ---------------------------------------------------------------------------- the ClientApp


def _message(kind: str, content, rnd: int, node_id: int = 5):
    from flwr.app import Message, Metadata

    md = Metadata(run_id=1, message_id=f"m-{kind}-{rnd}", src_node_id=1, dst_node_id=node_id,
                  reply_to_message_id="", group_id=str(rnd), created_at=time.time(),
                  ttl=3600.0, message_type=kind)
    return Message(content=content, metadata=md)


def _fit_message(arrays, rnd):
    from flwr.common import FitIns, MessageType, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    ins = FitIns(ndarrays_to_parameters(arrays), {"round": rnd})
    return _message(MessageType.TRAIN, compat.fitins_to_recorddict(ins, keep_input=True), rnd)


def _context(user, n):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=5, node_config={"partition-id": user, "num-partitions": n},
                   state=RecordDict(), run_config={})


@pytest.mark.parametrize("model", ["mf", "ncf"])
def test_client_app_uploads_only_items_and_keeps_user_state(tmp_path, model):
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from clients.state import DictStore, FlowerStore
    from fedrec.build import build_client, build_env, initial_arrays
    from fedrec.client_app import make_client_app
    from fedrec.config import load_one

    path = _experiment(tmp_path, model)
    cfg = load_one(path)
    env = build_env(cfg)
    arrays = initial_arrays(cfg, env.model)
    user = next(u for u in range(env.data.n_users) if not env.data.pool_mask[u])
    app = make_client_app({"experiment": str(path)})
    ctx = _context(user, env.data.n_users)
    twin = build_client(env, user, DictStore())  # the same user, in-process
    n_pred = len(env.model.predictor_shapes)
    seen_rows = []
    for rnd in (1, 2, 3):
        reply = app(_fit_message(arrays, rnd), ctx)
        assert not reply.has_error(), reply.error
        res = compat.recorddict_to_fitres(reply.content, keep_input=False)
        up = parameters_to_ndarrays(res.parameters)
        # only [item_ids, item_rows, predictor...]
        assert len(up) == 2 + n_pred
        ids, rows = up[0], up[1]
        assert ids.dtype == np.int64 and ids.ndim == 1 and np.all(np.diff(ids) > 0)
        assert rows.shape == (len(ids), cfg.model.dim) and rows.dtype == np.float32
        for a, shape in zip(up[2:], env.model.predictor_shapes):
            assert a.shape == tuple(shape)
        assert set(res.metrics) <= {"loss"}
        # the private state is in context.state, and none of its values were uploaded
        state = FlowerStore(ctx).load()
        assert set(state) >= {"user", "m", "v"}
        seen_rows.append(state["user"].copy())
        secret = np.concatenate([r.ravel() for r in seen_rows] + [state["m"].ravel()])
        secret = secret[secret != 0]
        for a in up:
            if a.dtype.kind == "f":
                assert not np.isin(a.ravel(), secret).any()
        # ... and it is carried across rounds exactly as the in-process client carries it
        twin_up, twin_n, _ = twin.fit(arrays, {"round": rnd})
        assert res.num_examples == twin_n
        for a, b in zip(up, twin_up):
            assert np.array_equal(a, b)
        for k, v in twin.store.state.items():
            assert np.array_equal(state[k], v), k
        arrays = [arrays[0] - 0.01 * np.float32(rnd), *arrays[1:]]  # a new global model
    assert not np.array_equal(seen_rows[0], seen_rows[-1])  # the row moved, and was kept


def test_client_app_reports_partition_and_rejects_wrong_count(tmp_path):
    from flwr.common import GetPropertiesIns, MessageTypeLegacy
    from flwr.compat.common import recorddict_compat as compat

    from fedrec.build import build_env, initial_arrays
    from fedrec.client_app import make_client_app
    from fedrec.config import load_one
    from fedrec.errors import ConfigError

    path = _experiment(tmp_path, "mf")
    app = make_client_app({"experiment": str(path)})
    ctx = _context(4, 13)  # 13 SuperNodes for 12 users
    props = app(_message(MessageTypeLegacy.GET_PROPERTIES,
                         compat.getpropertiesins_to_recorddict(GetPropertiesIns({})), 0), ctx)
    got = compat.recorddict_to_getpropertiesres(props.content).properties
    assert got == {"partition-id": 4, "num-partitions": 13}
    cfg = load_one(path)
    with pytest.raises(ConfigError, match="num-partitions is 13 but the experiment has 12 users"):
        app(_fit_message(initial_arrays(cfg, build_env(cfg).model), 1), ctx)
