"""Device partitions (fedrec.partition): a SuperNode started from its exported file knows only
its own user's data, never opens the data set, and behaves exactly as the simulated client."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _experiment(tmp_path, model="mf", attack="labelflip", **extra) -> Path:
    raw = {
        "name": f"part-{model}",
        "seed": 5,
        "data": {"synthetic": {"n_users": 20, "n_items": 50, "mean_history": 10, "seed": 2},
                 "attacker_pool": 0.2, "cache_dir": str(tmp_path / "cache"),
                 "negatives_exclude": "all"},
        "model": {"name": model, "dim": 8, "mlp_layers": [8, 4]},
        "train": {"rounds": 3, "clients_per_round": 20},
        "attack": {"name": attack, "malicious_fraction": 0.1,
                   "target": "none" if attack in ("labelflip", "clusterattack", "fedattack")
                   else "least_popular"},
        "eval": {"every": 1, "fraction": 1.0, "ks": [5, 10]},
        "output": {"progress": False},
    }
    raw.update(extra)
    path = tmp_path / f"part-{model}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _messages():
    sys.path.insert(0, str(ROOT / "tests"))
    import test_flower

    return test_flower


def _export(path, out):
    res = subprocess.run([sys.executable, "-m", "fedrec", "partition", "export", str(path),
                          str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads((out / "public.json").read_text())


def test_export_writes_each_user_only_its_own_data(tmp_path):
    from fedrec.build import build_env, malicious_set
    from fedrec.config import load_one

    path = _experiment(tmp_path)
    public = _export(path, tmp_path / "parts")
    env = build_env(load_one(path))
    data = env.data
    assert public["n_users"] == data.n_users and public["n_items"] == data.n_items
    assert public["digest"] == load_one(path).digest()
    assert set(public) == {"format", "experiment", "digest", "n_users", "n_items", "data"}
    files = sorted((tmp_path / "parts").glob("user-*.json"))
    assert len(files) == data.n_users
    bad = malicious_set(env)
    assert bad  # the fixture has attackers
    for u in range(data.n_users):
        rec = json.loads((tmp_path / "parts" / f"user-{u}.json").read_text())
        assert rec["user"] == u
        assert rec["train"] == data.train_of(u).tolist()
        assert rec["val"] == ([int(data.val_item[u])] if data.val_item[u] >= 0 else [])
        assert rec["test"] == data.test_of(u).tolist()
        assert rec["malicious"] == (u in bad)
        # an honest device gets nothing public beyond its own rows; an attacker the counts
        assert ("item_popularity" in rec) == (u in bad)
        assert set(rec) <= {"format", "experiment", "digest", "user", "train", "val", "test",
                            "attacker_pool", "malicious", "item_popularity"}


@pytest.mark.parametrize("model,attack", [("mf", "labelflip"), ("ncf", "labelflip"),
                                          ("mf", "pipattack"), ("mf", "popular_attack")])
def test_supernode_from_partition_matches_simulated_client_without_the_data_set(
        tmp_path, monkeypatch, model, attack):
    from flwr.common import EvaluateIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    import fedrec.build
    import fedrec.data.prepare
    from clients.state import DictStore
    from fedrec.build import build_client, build_env, initial_arrays, malicious_set
    from fedrec.client_app import make_client_app
    from fedrec.config import load_one
    from fedrec.partition import device_data, read_user

    tf = _messages()
    path = _experiment(tmp_path, model, attack)
    _export(path, tmp_path / "parts")
    cfg = load_one(path)
    env = build_env(cfg)
    arrays = initial_arrays(cfg, env.model)
    n, n_items = env.data.n_users, env.data.n_items
    users = [min(malicious_set(env)), next(u for u in range(n) if not env.data.pool_mask[u])]
    twins = {u: build_client(env, u, DictStore()) for u in users}

    # from here on the data set cannot be opened: any attempt fails the test
    def no_data(*a, **k):
        raise AssertionError("a device built from its partition opened the data set")

    monkeypatch.setattr(fedrec.build, "load_data", no_data)
    monkeypatch.setattr(fedrec.data.prepare, "cached_prepare", no_data)
    app = make_client_app({"experiment": str(path)})
    for u in users:
        from flwr.app import Context, RecordDict

        ctx = Context(run_id=1, node_id=7, node_config={
            "partition-id": u, "num-partitions": n,
            "data-path": str(tmp_path / "parts" / f"user-{u}.json")},
            state=RecordDict(), run_config={})
        for rnd in (1, 2):
            msg = tf._fit_message(arrays, rnd)
            msg.content["fitins.config"]["n_items"] = n_items
            reply = app(msg, ctx)
            assert not reply.has_error(), reply.error
            res = compat.recorddict_to_fitres(reply.content, keep_input=False)
            up = parameters_to_ndarrays(res.parameters)
            twin_up, twin_n, _ = twins[u].fit(arrays, {"round": rnd})
            assert res.num_examples == twin_n
            assert len(up) == len(twin_up)
            for a, b in zip(up, twin_up):
                assert np.array_equal(a, b)
        ins = EvaluateIns(ndarrays_to_parameters(arrays), {"round": 2, "n_items": n_items})
        msg = tf._message("evaluate", compat.evaluateins_to_recorddict(ins, keep_input=True), 2)
        reply = app(msg, ctx)
        assert not reply.has_error(), reply.error
        ev = compat.recorddict_to_evaluateres(reply.content)
        _, twin_n, twin_metrics = twins[u].evaluate(arrays, {"round": 2})
        assert ev.num_examples == twin_n and ev.metrics == twin_metrics

    # what such a device holds: its own rows; no other user's interactions, items or role
    u = users[1]
    view = device_data(read_user(tmp_path / "parts" / f"user-{u}.json", cfg, u), n, n_items)
    assert view.train_of(u).tolist() == env.data.train_of(u).tolist()
    for v in range(n):
        if v != u:
            assert len(view.train_of(v)) == 0 and view.val_item[v] == -1
            assert view.test_item[v] == -1 and not view.pool_mask[v]
    assert len(view.train_items) == len(env.data.train_of(u))
    assert not view.item_popularity.any()


def test_attack_needing_other_users_data_is_refused_on_a_device(tmp_path):
    from fedrec.build import build_device_env, build_env, malicious_set
    from fedrec.config import load_one
    from fedrec.errors import ConfigError
    from fedrec.partition import device_data, read_user

    path = _experiment(tmp_path, attack="fedrecattack")
    _export(path, tmp_path / "parts")
    cfg = load_one(path)
    env = build_env(cfg)
    u = min(malicious_set(env))
    rec = read_user(tmp_path / "parts" / f"user-{u}.json", cfg, u)
    with pytest.raises(ConfigError, match="public share") as e:
        build_device_env(cfg, device_data(rec, env.data.n_users, env.data.n_items), True)
    assert "\n" not in str(e.value)


def test_partition_of_another_experiment_or_user_is_refused(tmp_path):
    from fedrec.config import load_one
    from fedrec.errors import ConfigError
    from fedrec.partition import read_user

    path = _experiment(tmp_path)
    _export(path, tmp_path / "parts")
    with pytest.raises(ConfigError, match="digest"):
        read_user(tmp_path / "parts" / "user-0.json", load_one(path, ["seed=6"]), 0)
    with pytest.raises(ConfigError, match="partition-id 1"):
        read_user(tmp_path / "parts" / "user-0.json", load_one(path), 1)
    with pytest.raises(ConfigError, match="no such file"):
        read_user(tmp_path / "parts" / "user-99.json", load_one(path), 99)


def test_deployment_server_refuses_colluding_attacks_in_one_line(tmp_path):
    from fedrec.config import load_one
    from fedrec.errors import ConfigError
    from fedrec.server_app import public_adversary

    path = _experiment(tmp_path, attack="clusterattack")
    with pytest.raises(ConfigError, match="only a simulation") as e:
        public_adversary(load_one(path))
    assert "\n" not in str(e.value)
    for local in ("labelflip", "fedattack"):
        assert public_adversary(load_one(_experiment(tmp_path, attack=local))) is None
