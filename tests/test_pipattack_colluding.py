"""Colluding PipAttack: L_dis against the malicious clients' mean honest gradient, crafted in
the adversary hook with each client's private user row (clients/malicious/pipattack.py)."""

from __future__ import annotations

import numpy as np
import pytest

from clients.state import DictStore
from fedrec.errors import ConfigError
from test_pipattack import _arrays, _attack_env, _fit


def _honest(cfg, env, user, rnd, arrays):
    """A colluding client's (honest) upload in `rnd` as the hook sees it, its user row filled
    in from its private state after the fit (what Engine.adversary_user_rows reads)."""
    from fedrec.adversary import honest_update

    store = DictStore()
    up = _fit(cfg, env, user, rnd, arrays, store=store)
    u = honest_update(user, up, 1, env.data.train_of(user))
    u.user_row = np.asarray(store.state["user"], np.float32)
    return u


def _view(cfg, env, own, arrays, rnd=2):
    from clients.malicious.base import AdversaryView
    from clients.malicious.pipattack import PipAttackClient

    return AdversaryView(round=rnd, item_table=np.asarray(arrays[0]),
                         predictor=[np.asarray(p) for p in arrays[1:]], own=own, benign=None,
                         n_clients=len(own), n_items=env.model.n_items,
                         context=PipAttackClient.adversary_context(cfg, env))


def _craft(cfg, env, view):
    from clients.malicious.pipattack import PipAttackClient

    params = PipAttackClient.params_from(cfg)
    return PipAttackClient.craft_round(view, params, {}, np.random.default_rng(0))[0]


def test_colluding_with_one_client_equals_the_local_attack(tmp_path):
    """With one malicious client the mean honest gradient is its own: the hook's upload is the
    client's local one (up to float rounding of the distance's sum), which checks the user
    row, the reference and the estimator the hook uses."""
    cfg, env, user = _attack_env(tmp_path, "pipattack")
    arrays = _arrays(cfg, env)
    local = _fit(cfg, env, user, 2, arrays)
    cfg_c, env_c, _ = _attack_env(tmp_path, "pipattack", attack__knowledge="colluding")
    own = [_honest(cfg_c, env_c, user, 2, arrays)]
    (ids, rows, pred), = _craft(cfg_c, env_c, _view(cfg_c, env_c, own, arrays))
    assert np.array_equal(ids, np.asarray(local[0]))
    np.testing.assert_allclose(rows, local[1], rtol=1e-4, atol=1e-6)
    for a, b in zip(pred, local[2:]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # the honest upload differs from the crafted one (the target row is added and crafted)
    assert len(own[0].item_ids) < len(ids)


def test_colluding_distance_pulls_each_upload_toward_the_mean_honest_gradient(tmp_path):
    from clients.malicious.base import dense_stats
    from clients.malicious.pipattack import reference_rows
    from fedrec.build import malicious_set
    from fedrec.targets import resolve_targets

    cfg, env, _ = _attack_env(tmp_path, "pipattack", attack__knowledge="colluding",
                              attack__params={"gamma": 0.05})
    users = sorted(malicious_set(env))[:3]
    arrays = _arrays(cfg, env)
    own = [_honest(cfg, env, u, 2, arrays) for u in users]
    crafted = _craft(cfg, env, _view(cfg, env, own, arrays))
    ref_ids, mean, _, pred = dense_stats(own)
    t = resolve_targets(cfg, env.data)
    for u, (ids, rows, p) in zip(own, crafted):
        assert np.array_equal(ids, np.union1d(u.item_ids, t))  # own ids plus the target only
        ref = reference_rows(ids, ref_ids, mean)
        mine = np.isin(ids, u.item_ids) & ~np.isin(ids, t)
        honest = np.asarray(u.item_rows)[np.searchsorted(u.item_ids, ids[mine])]
        # its own (non-target) rows moved from its honest gradient toward the mean
        assert np.linalg.norm(rows[mine] - ref[mine]) < np.linalg.norm(honest - ref[mine])
    # without the distance term the non-target rows keep the honest values
    cfg0, env0, _ = _attack_env(tmp_path, "pipattack", attack__knowledge="colluding",
                                attack__params={"dis": False})
    for u, (ids, rows, _) in zip(own, _craft(cfg0, env0, _view(cfg0, env0, own, arrays))):
        pos = np.searchsorted(ids, u.item_ids)
        keep = ~np.isin(u.item_ids, t)
        assert np.array_equal(rows[pos[keep]], np.asarray(u.item_rows)[keep])


def test_reference_rows_are_zero_where_no_reference_update_sent_the_row():
    from clients.malicious.pipattack import reference_rows

    ref = np.arange(6, dtype=np.float32).reshape(3, 2)
    out = reference_rows(np.array([0, 2, 5, 9]), np.array([2, 5, 7]), ref)
    assert out.tolist() == [[0, 0], [0, 1], [2, 3], [0, 0]]
    assert reference_rows(np.array([1]), np.zeros(0, np.int64), np.zeros((0, 2))).tolist() == [[0, 0]]


def test_colluding_pipattack_runs_in_process_and_flwr_refuses_it(tmp_path):
    from fedrec.engine import Engine
    from fedrec.server_app import check_pool

    cfg, _, _ = _attack_env(tmp_path, "pipattack", attack__knowledge="colluding",
                            train__rounds=4)
    eng = Engine(cfg, progress=False, workers=1)
    rows = [eng.run_round(r) for r in range(1, 5)]
    assert sum(r.get("attack_uploads", 0) for r in rows[1:]) > 0
    assert all(np.all(np.isfinite(a)) for a in eng.strategy.global_arrays())
    with pytest.raises(ConfigError, match="private user rows"):
        check_pool(cfg)
    check_pool(_attack_env(tmp_path, "pipattack")[0])  # local: runs anywhere
    with pytest.raises(ConfigError, match="explicit_boost runs with local"):
        _attack_env(tmp_path, "explicit_boost", attack__knowledge="colluding")



def test_colluding_without_predictor_crafting_uploads_each_honest_predictor(tmp_path):
    """params.predictor false in the hook: each client's predictor is its honest one, bit for
    bit, while its rows are still crafted toward the mean."""
    from fedrec.build import malicious_set

    cfg, env, _ = _attack_env(tmp_path, "pipattack", attack__knowledge="colluding",
                              attack__params={"gamma": 0.05, "predictor": False})
    users = sorted(malicious_set(env))[:2]
    arrays = _arrays(cfg, env)
    own = [_honest(cfg, env, u, 2, arrays) for u in users]
    crafted = _craft(cfg, env, _view(cfg, env, own, arrays))
    for u, (ids, rows, pred) in zip(own, crafted):
        assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(pred, u.predictor))
        mine = np.searchsorted(ids, u.item_ids)
        assert not np.array_equal(rows[mine], np.asarray(u.item_rows))
