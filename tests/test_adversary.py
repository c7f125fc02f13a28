"""Malicious roles, the adversary hook, and the line between attack and defense."""

from pathlib import Path

import numpy as np
import pytest

from conftest import engine_run_capturing_arrays, tiny_cfg
from fedrec.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = ["labelflip", "gaussian", "lie", "fang", "dynopt", "fedattack", "clusterattack", "spattack"]


def attacked(tmp_path, name, **over):
    kw = {"data__attacker_pool": 0.2, "attack__name": name, "attack__malicious_fraction": 0.1, **over}
    return tiny_cfg(tmp_path, **kw)


def test_malicious_users_come_from_the_pool_by_fraction(tmp_path):
    from fedrec.build import build_env
    from fedrec.roles import malicious_users

    cfg = attacked(tmp_path, "lie")
    env = build_env(cfg)
    mal = malicious_users(cfg, env.data)
    assert len(mal) == round(0.1 * env.data.n_users)
    assert set(mal) <= set(env.data.attacker_pool)
    assert np.array_equal(mal, malicious_users(cfg, env.data))  # seeded: the same draw again
    cfg2 = attacked(tmp_path, "lie", seed=5)
    assert not np.array_equal(mal, malicious_users(cfg2, build_env(cfg2).data))
    with pytest.raises(ConfigError, match="attacker pool"):
        build_env(attacked(tmp_path, "lie", attack__malicious_fraction=0.5))


def test_draw_seed_changes_who_is_malicious_and_nothing_else(tmp_path):
    from fedrec.build import build_env
    from fedrec.roles import malicious_users

    cfg = attacked(tmp_path, "lie")
    env = build_env(cfg)
    same = attacked(tmp_path, "lie", attack__draw_seed=cfg.seed)  # explicit = the default
    assert np.array_equal(malicious_users(cfg, env.data), malicious_users(same, env.data))
    other = attacked(tmp_path, "lie", attack__draw_seed=cfg.seed + 1)
    other_env = build_env(other)
    mal, mal_other = malicious_users(cfg, env.data), malicious_users(other, other_env.data)
    assert not np.array_equal(mal, mal_other) and len(mal) == len(mal_other)
    # the pool, the split and the evaluated users follow `seed`, not the draw
    assert np.array_equal(env.data.attacker_pool, other_env.data.attacker_pool)
    assert np.array_equal(env.data.test_item, other_env.data.test_item)
    assert set(mal_other) <= set(env.data.attacker_pool)
    # the seed's own draw, by default or spelled out, is one computation (one run directory)
    assert same.digest() == cfg.digest() and other.digest() != cfg.digest()
    with pytest.raises(ConfigError, match="attack.draw_seed"):
        attacked(tmp_path, "lie", attack__draw_seed=-1).validate()


def test_build_client_gives_malicious_users_the_attack_class(tmp_path):
    from clients.benign import BenignClient
    from clients.state import DictStore
    from clients.malicious.lie import LIEClient
    from fedrec.build import build_client, build_env, malicious_set

    env = build_env(attacked(tmp_path, "lie"))
    mal = malicious_set(env)
    kinds = {u: type(build_client(env, u, DictStore())) for u in range(env.data.n_users)}
    assert {u for u, k in kinds.items() if k is LIEClient} == set(mal)
    assert all(k is BenignClient for u, k in kinds.items() if u not in mal)


@pytest.mark.parametrize("name", ATTACKS)
def test_attackers_are_honest_before_the_start_round(tmp_path, monkeypatch, name):
    """With attack.start_round after the last round the run is bit-identical to a clean one."""
    clean, a0 = engine_run_capturing_arrays(attacked(tmp_path, "none"), tmp_path / "c", monkeypatch)
    late, a1 = engine_run_capturing_arrays(attacked(tmp_path, name, attack__start_round=99),
                                           tmp_path / "a", monkeypatch)
    assert clean["final"] == late["final"]
    for x, y in zip(a0, a1):
        assert np.array_equal(x, y)


def _uploads_per_round(cfg, out_root, monkeypatch):
    """run_experiment on cfg; also {round: {user: upload arrays}} as the strategy received them."""
    from strategies.fedrec import FedRecStrategy

    seen = {}
    real = FedRecStrategy.aggregate_uploads

    def recording(self, rnd, results):
        seen[rnd] = {int(u): [np.array(a, copy=True) for a in up] for u, up, _, _ in results}
        return real(self, rnd, results)

    monkeypatch.setattr(FedRecStrategy, "aggregate_uploads", recording)
    summary, arrays = engine_run_capturing_arrays(cfg, out_root, monkeypatch)
    monkeypatch.setattr(FedRecStrategy, "aggregate_uploads", real)
    return summary, arrays, seen


@pytest.mark.parametrize("name,params", [(a, {}) for a in ATTACKS] + [
    ("spattack", {"variant": "O-S"}), ("spattack", {"variant": "L-D"}), ("spattack", {"variant": "L-S"}),
    ("dynopt", {"mode": "min-sum"}), ("lie", {}), ("clusterattack", {"contrastive_alpha": 1.0})])
def test_every_attack_passes_validation_and_replaces_only_malicious_uploads(tmp_path, monkeypatch,
                                                                            name, params):
    """Up to the first round that samples a malicious user the attacked run is the clean run;
    in that round (same global model) every benign upload is bit-identical to the clean run's
    and every malicious upload differs from the honest one; afterwards the models differ."""
    _check_only_malicious_uploads_replaced(tmp_path, monkeypatch, name, params)


@pytest.mark.parametrize("model", ["sasrec", "bert4rec"])
def test_fedattack_on_the_sequential_models(tmp_path, monkeypatch, model):
    """FedAttack scores items with the user representation the global encoder makes from the
    device's history (it once read the encoder from nowhere and crashed)."""
    _check_only_malicious_uploads_replaced(tmp_path, monkeypatch, "fedattack", {}, model__name=model)


def _check_only_malicious_uploads_replaced(tmp_path, monkeypatch, name, params, **over):
    from fedrec.build import build_env, malicious_set

    _, clean, clean_seen = _uploads_per_round(attacked(tmp_path, "none", **over), tmp_path / "c",
                                              monkeypatch)
    cfg = attacked(tmp_path, name, attack__params=params, **over)
    summary, arrays, seen = _uploads_per_round(cfg, tmp_path / "a", monkeypatch)
    assert summary["invalid_uploads_total"] == 0  # crafted uploads are protocol-valid
    malicious = malicious_set(build_env(cfg))
    first = min(r for r, ups in seen.items() if malicious & set(ups))
    for rnd in range(1, first + 1):
        assert set(seen[rnd]) == set(clean_seen[rnd])  # sampling never depends on the attack
        for user, upload in seen[rnd].items():
            same = all(np.array_equal(a, b) for a, b in zip(upload, clean_seen[rnd][user])) \
                and len(upload) == len(clean_seen[rnd][user])
            assert same == (user not in malicious), (rnd, user)
    assert not np.array_equal(arrays[0], clean[0])
    rows = (Path(summary["run_dir"]) / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    col = header.index("attack_uploads")
    logged = {int(r.split(",")[0]): int(r.split(",")[col] or 0) for r in rows[1:]}
    assert logged == {r: len(malicious & set(ups)) for r, ups in seen.items()}  # per round


@pytest.mark.parametrize("name", ["fedattack", "clusterattack", "labelflip", "spattack"])
def test_attacked_runs_are_identical_with_workers(tmp_path, monkeypatch, name):
    """FedAttack reads the model when building its pairs: the parallel runner must not prepare
    it ahead on the previous round's model."""
    from fedrec.engine import Engine

    cfg = attacked(tmp_path, name)
    outs = []
    for w in (1, 2):
        eng = Engine(cfg, progress=False, workers=w)
        res = eng.run()
        outs.append((res["final"], [a.copy() for a in eng.strategy.global_arrays()]))
    assert outs[0][0] == outs[1][0]
    for x, y in zip(outs[0][1], outs[1][1]):
        assert np.array_equal(x, y)


def test_the_rule_sees_only_uploads(tmp_path, monkeypatch):
    """What reaches the defense: validated uploads (ids, rows, predictor, sample count, the
    transport id), the crafted ones in place of the honest ones, and nothing else."""
    from fedrec.engine import Engine
    from strategies.mean import MeanRule

    seen = []
    real = MeanRule.__call__

    def recording(self, updates):
        seen.append(updates)
        return real(self, updates)

    monkeypatch.setattr(MeanRule, "__call__", recording)
    cfg = attacked(tmp_path, "clusterattack")
    eng = Engine(cfg, progress=False, workers=1)
    eng.run()
    assert len(seen) == cfg.train.rounds
    n_items = eng.env.model.n_items
    full = [u for ups in seen for u in ups.uploads if len(u.item_ids) == n_items]
    assert full  # ClusterAttack's dense uploads arrived
    for ups in seen:
        for u in ups.uploads:
            assert set(vars(u)) == {"item_ids", "item_rows", "predictor", "num_examples", "client"}
    # nothing the strategy holds refers to the adversary or its view
    from clients.malicious.base import AdversaryView, HonestUpdate
    from fedrec.adversary import Adversary

    def walk(obj, depth=0):
        if isinstance(obj, (Adversary, AdversaryView, HonestUpdate)):
            raise AssertionError(f"the strategy reaches {type(obj).__name__}")
        if depth < 3 and hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                walk(v, depth + 1)

    walk(eng.strategy)


def test_deployment_rejects_non_local_attacks(tmp_path):
    from fedrec.adversary import make_adversary
    from fedrec.build import build_env
    from fedrec.server_app import check_deployable, is_simulation

    class Grid:  # a deployment's grid (not Flower's InMemoryGrid)
        pass

    class InMemoryGrid:
        pass

    class Proxy:
        def __init__(self, grid):
            self.grid = grid

    assert not is_simulation(Proxy(Grid())) and is_simulation(Proxy(InMemoryGrid()))
    cfg = attacked(tmp_path, "clusterattack")
    with pytest.raises(RuntimeError, match="only a simulation"):
        check_deployable(make_adversary(cfg, build_env(cfg)))
    check_deployable(make_adversary(attacked(tmp_path, "fedattack"),
                                    build_env(attacked(tmp_path, "fedattack"))))  # local: allowed
    check_deployable(None)  # a clean run


def test_knowledge_levels_are_checked(tmp_path):
    from fedrec.build import build_env

    with pytest.raises(ConfigError, match="attack.knowledge"):
        build_env(attacked(tmp_path, "clusterattack", attack__knowledge="omniscient"))
    with pytest.raises(ConfigError, match="attack.knowledge"):
        build_env(attacked(tmp_path, "spattack", attack__knowledge="local"))  # O-D is omniscient
    with pytest.raises(ConfigError, match="attack.name"):
        build_env(attacked(tmp_path, "nope"))
    build_env(attacked(tmp_path, "lie", attack__knowledge="colluding"))
