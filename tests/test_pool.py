"""The adversary's pool (attack.pool_sample): the honest updates of malicious clients drawn from
all of them, computed on twins of the devices (fedrec/adversary.py, clients.cohort.honest_fits)."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from conftest import tiny_cfg
from fedrec.errors import ConfigError


def attacked(tmp_path, name, pool=0, **over):
    kw = {"data__attacker_pool": 0.2, "attack__name": name, "attack__malicious_fraction": 0.1,
          "attack__pool_sample": pool, **over}
    return tiny_cfg(tmp_path, **kw)


def _run(cfg, workers):
    """(final metrics, final global arrays, per-round views and crafted uploads) of a run."""
    from fedrec.engine import Engine

    eng = Engine(cfg, progress=False, workers=workers)
    seen = _record_views(eng)
    res = eng.run()
    return res["final"], [a.copy() for a in eng.strategy.global_arrays()], seen


def _record_views(eng, check=None):
    """Wraps the run's attack so every round's view (copied) and crafted uploads are kept;
    check(view, crafted, diagnostics) runs inside the round, while the view is valid."""
    seen = []
    real = eng.adversary.attack_cls.craft_round

    def recording(view, params, memory, rng):
        crafted, diag = real(view, params, memory, rng)
        if check is not None:
            check(view, crafted, diag)
        seen.append((copy.deepcopy(view), copy.deepcopy(crafted), dict(diag)))
        return crafted, diag

    eng.adversary.attack_cls = type("Recording", (eng.adversary.attack_cls,),
                                    {"craft_round": staticmethod(recording)})
    return seen


def test_pool_sample_is_validated_and_zero_is_the_default(tmp_path):
    from fedrec.config import AttackConfig

    assert AttackConfig().pool_sample == 0
    assert attacked(tmp_path, "lie", 0).digest() == attacked(tmp_path, "lie").digest()
    assert attacked(tmp_path, "lie", 3).digest() != attacked(tmp_path, "lie").digest()
    for bad in (-1, 1.5, "x", True):
        with pytest.raises(ConfigError, match="attack.pool_sample"):
            attacked(tmp_path, "lie", bad)


@pytest.mark.parametrize("name", ["lie", "clusterattack"])
def test_without_a_pool_the_view_has_none_and_runs_are_unchanged(tmp_path, name):
    cfg = attacked(tmp_path, name, attack__knowledge="colluding")
    final, arrays, seen = _run(cfg, 1)
    assert seen and all(v.pool is None for v, _, _ in seen)
    final0, arrays0, _ = _run(attacked(tmp_path, name, 0, attack__knowledge="colluding"), 1)
    assert final == final0 and all(np.array_equal(x, y) for x, y in zip(arrays, arrays0))


@pytest.mark.parametrize("workers", [1, 2])
def test_pool_updates_are_honest_fits_of_copies(tmp_path, workers):
    """Each pool update is what a client built afresh on a copy of the device's state uploads
    when fitted alone at the round's model; a user sampled in the round gives its own upload."""
    from clients.state import DictStore
    from fedrec.build import build_client, malicious_set
    from fedrec.engine import Engine

    cfg = attacked(tmp_path, "lie", 4, attack__knowledge="colluding")
    eng = Engine(cfg, progress=False, workers=workers)
    checked = {"computed": 0, "own": 0}

    def check(view, crafted, diag):
        states = eng.client_states()
        arrays = [view.item_table, *view.predictor]
        own = {u.user: u for u in view.own}
        assert len(view.pool) == 4 and len({u.user for u in view.pool}) == 4
        assert {u.user for u in view.pool} <= malicious_set(eng.env)
        for u in view.pool:
            if u.user in own:
                assert u is own[u.user]
                checked["own"] += 1
                continue
            twin = build_client(eng.env, u.user, DictStore())
            if u.user in states:
                twin.store.save(copy.deepcopy(states[u.user]))
            up, n, _ = twin.fit(arrays, {"round": view.round})
            assert n == u.num_examples
            assert np.array_equal(up[0], u.item_ids) and np.array_equal(up[1], u.item_rows)
            assert all(np.array_equal(a, b) for a, b in zip(up[2:], u.predictor))
            assert np.array_equal(u.train_items, eng.env.data.train_of(u.user))
            checked["computed"] += 1

    seen = _record_views(eng, check)
    eng.run()
    assert seen and checked["computed"] > 0 and checked["own"] > 0


@pytest.mark.parametrize("workers", [1, 2])
def test_computing_the_pool_changes_no_device(tmp_path, workers):
    """Honest fits of malicious clients not sampled in a round, some of them sampled (and, with
    workers, already prepared) for the next round, leave every private state and every later
    upload as in the same run without them (dropout 0.2: the round streams are used)."""
    from fedrec.build import malicious_set
    from fedrec.engine import Engine

    cfg = attacked(tmp_path, "lie", 0, attack__knowledge="colluding", train__rounds=8)
    runs, overlaps = [], 0
    for with_pool in (False, True):
        eng = Engine(cfg, progress=False, workers=workers)
        uploads = []
        real = eng.strategy.aggregate_uploads

        def recording(rnd, results, real=real, uploads=uploads):
            uploads.append([(u, [np.array(a) for a in up], n) for u, up, n, _ in results])
            return real(rnd, results)

        eng.strategy.aggregate_uploads = recording
        bad = sorted(malicious_set(eng.env))
        for rnd in range(1, cfg.train.rounds + 1):
            eng.run_round(rnd)
            if with_pool:
                sampled = {u for u, _, _ in uploads[-1]}
                users = [u for u in bad if u not in sampled]
                before = eng.client_states()
                outs = eng.honest_updates(users, eng.strategy.global_arrays(), rnd)
                assert len(outs) == len(users)
                after = eng.client_states()
                assert before.keys() == after.keys()
                for u in before:
                    assert before[u].keys() == after[u].keys()
                    assert all(np.array_equal(before[u][k], after[u][k]) for k in before[u])
                nxt = eng._sampled.get(rnd + 1, [])
                overlaps += len(set(users) & set(nxt))
        runs.append((uploads, eng.client_states(), [a.copy() for a in eng.strategy.global_arrays()]))
        eng.close()
    assert workers == 1 or overlaps > 0  # pool users prepared for the next round were exercised
    (u0, s0, a0), (u1, s1, a1) = runs
    for r0, r1 in zip(u0, u1):
        assert [u for u, _, _ in r0] == [u for u, _, _ in r1]
        for (_, x, n0), (_, y, n1) in zip(r0, r1):
            assert n0 == n1 and all(np.array_equal(a, b) for a, b in zip(x, y))
    assert s0.keys() == s1.keys()
    assert all(np.array_equal(s0[u][k], s1[u][k]) for u in s0 for k in s0[u])
    assert all(np.array_equal(x, y) for x, y in zip(a0, a1))


def test_pool_draw_is_seeded_and_apart_from_the_attack_generator(tmp_path):
    from fedrec.adversary import make_adversary
    from fedrec.build import build_env, malicious_set

    cfg = attacked(tmp_path, "lie", 3)
    env = build_env(cfg)
    adv = make_adversary(cfg, env)
    draws = [adv.pool_users(r) for r in range(1, 30)]
    assert draws == [make_adversary(cfg, env).pool_users(r) for r in range(1, 30)]
    assert all(len(d) == 3 == len(set(d)) and set(d) <= malicious_set(env) for d in draws)
    assert len({tuple(d) for d in draws}) > 1  # a new draw every round
    assert adv.rng(5).random() == make_adversary(attacked(tmp_path, "lie"), env).rng(5).random()
    big = make_adversary(attacked(tmp_path, "lie", 1000), env)
    assert sorted(big.pool_users(1)) == sorted(malicious_set(env))  # up to N: all of them


@pytest.mark.parametrize("name,knowledge", [("lie", "colluding"), ("clusterattack", "colluding"),
                                            ("gaussian", "omniscient"), ("fang", "colluding"),
                                            ("dynopt", "colluding")])
def test_pool_runs_are_seeded_and_identical_with_workers(tmp_path, name, knowledge):
    cfg = attacked(tmp_path, name, 4, attack__knowledge=knowledge)
    f1, a1, s1 = _run(cfg, 1)
    f2, a2, _ = _run(cfg, 2)
    f3, a3, _ = _run(cfg, 1)
    assert any(v.pool for v, _, _ in s1)
    assert f1 == f2 == f3
    assert all(np.array_equal(x, y) and np.array_equal(x, z) for x, y, z in zip(a1, a2, a3))
    f0, a0, _ = _run(attacked(tmp_path, name, 0, attack__knowledge=knowledge), 1)
    assert not np.array_equal(a0[0], a1[0])  # the pool changed what the attack uploaded


def test_lie_deviates_with_a_pool_where_one_own_update_gave_none(tmp_path):
    """With one malicious client in a round LIE's std over its own update is 0 and it uploads
    that update unchanged; with a pool it uploads mean - z std of the pool, std > 0. (z is set:
    Baruch et al.'s z is 0 for 10 clients with 1 malicious.)"""
    from clients.malicious.base import dense_stats
    from clients.malicious.lie import lie_update

    lie = {"attack__knowledge": "colluding", "attack__params": {"z": 1.0}}
    _, _, plain = _run(attacked(tmp_path, "lie", 0, **lie), 1)
    single = [(v, c) for v, c, _ in plain if len(v.own) == 1]
    assert single
    for v, c in single:
        assert np.array_equal(c[0][0], v.own[0].item_ids)
        assert np.array_equal(c[0][1], v.own[0].item_rows)  # no deviation at all
    _, _, pooled = _run(attacked(tmp_path, "lie", 4, **lie), 1)
    for v, c, d in pooled:
        ids, mean, std, _ = dense_stats([u for u in v.pool if len(u.item_ids)])
        assert d["z"] == 1.0 and std.max() > 0
        for up in c:
            assert np.array_equal(up[0], ids)
            assert np.array_equal(up[1], lie_update(mean, std, d["z"]))
            assert np.abs(up[1] - mean).max() > 0


def test_clusterattack_takes_its_norm_statistics_from_the_pool(tmp_path):
    _, _, seen = _run(attacked(tmp_path, "clusterattack", 5), 1)
    assert seen
    for v, crafted, d in seen:
        norms = np.concatenate([np.linalg.norm(u.item_rows, axis=1) for u in v.pool])
        assert d["norm_mu"] == float(norms.mean()) and d["norm_sigma"] == float(norms.std())
        assert len(crafted) == len(v.own)


def test_flwr_run_refuses_a_pool(tmp_path):
    from fedrec.server_app import FlowerRun, check_pool

    cfg = attacked(tmp_path, "clusterattack", 50)
    raw = cfg.to_dict()
    raw["name"] = "pool-flwr"
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump(raw))
    ctx = SimpleNamespace(run_config={"experiment": str(path), "output-dir": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match="attack.pool_sample > 0 needs the devices' private state"):
        FlowerRun(ctx)
    check_pool(attacked(tmp_path, "fedattack", 50))  # a local attack ignores the key
    check_pool(attacked(tmp_path, "none", 50))
    check_pool(attacked(tmp_path, "clusterattack", 0))
