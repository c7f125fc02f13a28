"""Malicious roles, the adversary hook, and the line between attack and defense."""

import ast
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


def test_build_client_gives_malicious_users_the_attack_class(tmp_path):
    from clients.benign import BenignClient, DictStore
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


@pytest.mark.parametrize("name,params", [(a, {}) for a in ATTACKS] + [
    ("spattack", {"variant": "O-S"}), ("spattack", {"variant": "L-D"}), ("spattack", {"variant": "L-S"}),
    ("dynopt", {"mode": "min-sum"}), ("lie", {}), ("clusterattack", {"contrastive_alpha": 1.0})])
def test_every_attack_passes_validation_and_changes_the_model(tmp_path, monkeypatch, name, params):
    _, clean = engine_run_capturing_arrays(attacked(tmp_path, "none"), tmp_path / "c", monkeypatch)
    summary, arrays = engine_run_capturing_arrays(attacked(tmp_path, name, attack__params=params),
                                                  tmp_path / "a", monkeypatch)
    assert summary["invalid_uploads_total"] == 0  # crafted uploads are protocol-valid
    assert not np.array_equal(arrays[0], clean[0])
    rows = (Path(summary["run_dir"]) / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    col = header.index("attack_uploads")
    assert sum(int(r.split(",")[col] or 0) for r in rows[1:]) > 0  # attacks logged per round


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


def test_the_rule_sees_only_uploads(tmp_path):
    """What reaches the defense: validated uploads (ids, rows, predictor, sample count, the
    transport id), the crafted ones in place of the honest ones, and nothing else."""
    from fedrec.engine import Engine
    from strategies.mean import MeanRule

    seen = []

    class Recording(MeanRule):
        def __call__(self, updates):
            seen.append(updates)
            return super().__call__(updates)

    cfg = attacked(tmp_path, "clusterattack")
    eng = Engine(cfg, progress=False, workers=1)
    eng.strategy.rule = Recording("dense")
    eng.run()
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


def test_defenses_never_import_ground_truth():
    """strategies/ imports neither the roles, the adversary, evaluation nor any client."""
    banned = ("fedrec.roles", "fedrec.adversary", "fedrec.evaluation", "clients")
    for path in (ROOT / "strategies").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                assert not n.startswith(banned), f"{path.name} imports {n}"
        assert "is_malicious" not in path.read_text(), path.name


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
