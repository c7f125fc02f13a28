"""Targeted attacks: targets, ER@K on a hand-computed case, popularity classes and estimator,
PipAttack's uploads, its equality with explicit boosting at alpha = gamma = 0, the baselines,
and pretrain-then-attack (the flwr-vs-in-process check is in tests/test_flower.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from conftest import tiny_cfg
from fedrec.errors import ConfigError


def _data():
    # 3 users, 6 items. user 0: train {0, 1}, val 2, test 3; user 1: train {4}, val 0,
    # test 1; user 2: train {5, 2}, val -1, test 4
    return SimpleNamespace(
        n_users=3, n_items=6, train_indptr=np.array([0, 2, 3, 5]),
        train_items=np.array([0, 1, 4, 5, 2]), val_item=np.array([2, 0, -1]),
        test_item=np.array([3, 1, 4]), test_indptr=None, pool_mask=np.zeros(3, bool),
        item_popularity=np.array([1, 1, 1, 0, 1, 1]))  # training counts, as PreparedData has


class _Dot:
    def score(self, users, table, predictor):
        return np.asarray(users, np.float64) @ np.asarray(table, np.float64).T


def test_er_at_k_on_a_hand_computed_case():
    from fedrec.evaluation import evaluate_users
    from fedrec.targets import exposure_metrics, history_holds

    data = _data()
    table = np.eye(6, dtype=np.float32)
    # user vectors = scores directly (table = identity)
    U = np.array([[0.9, 0.8, 0.7, 0.1, 0.2, 0.5],     # holds 2 in its history (val): excluded
                  [0.0, 0.3, 0.6, 0.2, 0.9, 0.1],     # 4 masked (train); 0 masked (val, test form)
                  [0.3, 0.4, 0.1, 0.2, 0.0, 0.9]],    # 5, 2 masked (train)
                 np.float32)
    targets = np.array([2, 3])
    holds = history_holds(data, targets)
    assert holds.tolist() == [[True, True], [False, False], [True, False]]
    users = np.arange(3)
    res = evaluate_users(_Dot(), table, [], U, users, data, "test", [1, 2], 1024, targets, holds)
    # target 2: only user 1 is eligible; masked {4, 0}: ranking 2 (0.6), 1 (0.3), 3 (0.2), 5
    #   -> rank 0: in top 1 and top 2
    # target 3: users 1 and 2 eligible. user 1: 2 (0.6), 1 (0.3), 3 (0.2) -> rank 2: not in top 2;
    #   user 2 (masked 5, 2): 1 (0.4), 0 (0.3), 3 (0.2) -> rank 2: not in top 2
    assert res["exposure"]["users"].tolist() == [1, 2]
    assert res["exposure"]["er@1"].tolist() == [1, 0]
    assert res["exposure"]["er@2"].tolist() == [1, 0]
    m = exposure_metrics(res["exposure"], targets, "test", [1, 2])
    assert m["test_er@1"] == pytest.approx(0.5) and m["test_er_users"] == 1
    assert m["test_er@2_t2"] == 1.0 and m["test_er@2_t3"] == 0.0 and m["test_er_users_t3"] == 2
    # val form: the validation item is not masked; user 1 ranks 4 (0.9), 2 (0.6), 1, 3 -> target 3
    # at rank 3
    res_v = evaluate_users(_Dot(), table, [], U[[1]], np.array([1]), data, "val", [4], 1024,
                           targets, holds)
    assert res_v["exposure"]["er@4"].tolist() == [1, 1]


def test_er_at_k_gives_no_exposure_for_collapsed_or_nan_scores():
    """Ties count against the target: a model whose scores collapse (saturated units, a
    crafted upload that drives everything to one value) or turn NaN exposes the target to
    nobody, where a "strictly higher" rank would put it in everyone's top K."""
    from fedrec.evaluation import evaluate_users
    from fedrec.targets import history_holds, target_ranks

    data = _data()
    targets = np.array([2, 3])
    holds = history_holds(data, targets)
    for value in (0.0, np.nan):
        U = np.full((3, 6), value, np.float32)
        res = evaluate_users(_Dot(), np.eye(6, dtype=np.float32), [], U, np.arange(3), data,
                             "test", [1, 2], 1024, targets, holds)
        assert res["exposure"]["users"].tolist() == [1, 2]
        assert res["exposure"]["er@2"].tolist() == [0, 0]
        assert res["hr@2"] == 0.0
    # against a slow loop with ties and masks
    rng = np.random.default_rng(1)
    s = rng.integers(0, 3, size=(15, 9)).astype(np.float32)
    mask = rng.random((15, 9)) < 0.3
    mr, mc = np.nonzero(mask)
    t = np.array([1, 4, 8])
    expect = [[sum(1 for j in range(9) if j != tt and not mask[b, j] and s[b, j] >= s[b, tt])
               for tt in t] for b in range(15)]
    np.testing.assert_array_equal(target_ranks(s, t, mr, mc), expect)


def test_targets_and_popularity_classes():
    from fedrec.targets import item_counts, popularity_classes, resolve_targets

    data = _data()
    counts = item_counts(data)
    assert counts.tolist() == [1, 1, 1, 0, 1, 1]
    cfg = SimpleNamespace(seed=0, attack=SimpleNamespace(target="least_popular"))
    assert resolve_targets(cfg, data).tolist() == [3]
    cfg.attack.target = [5, "least_popular", 5]
    assert resolve_targets(cfg, data).tolist() == [3, 5]
    cfg.attack.target = "band:0.5-1"
    a = resolve_targets(cfg, data)
    assert resolve_targets(cfg, data).tolist() == a.tolist() and a[0] in (2, 4, 5, 3)
    cfg.attack.target = 9
    with pytest.raises(ConfigError, match="outside"):
        resolve_targets(cfg, data)
    # 20 items, counts 20..1: top 10% = 2 items, 10-45% = 7 items, the rest 11
    c = np.arange(20, 0, -1)
    cls = popularity_classes(c)
    assert cls.tolist() == [0] * 2 + [1] * 7 + [2] * 11
    assert popularity_classes(c[::-1]).tolist() == cls[::-1].tolist()


@pytest.mark.parametrize("bad", ["most_popular", "band:0.5", "band:0.7-0.2", -1, [], True])
def test_bad_targets_are_one_line_errors(tmp_path, bad):
    with pytest.raises(ConfigError, match="attack.target"):
        tiny_cfg(tmp_path, attack__target=bad)


def test_estimator_learns_separable_classes_and_macro_f1():
    from clients.malicious.popularity import macro_f1, predict, train_estimator

    assert macro_f1(np.array([0, 1, 2, 2]), np.array([0, 1, 2, 1])) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    rng = np.random.default_rng(0)
    classes = np.repeat([0, 1, 2], [20, 70, 110])
    table = rng.normal(size=(200, 8)).astype(np.float32) * 0.1
    table[:, 0] += 2.0 * (2 - classes)  # the class is readable from one coordinate
    w, f1 = train_estimator(table, classes, np.array([199]), [0, 1])
    assert f1 >= 0.9
    w2, f1b = train_estimator(table, classes, np.array([199]), [0, 1])
    assert f1 == f1b and all(np.array_equal(a, b) for a, b in zip(w, w2))  # seeded
    assert (predict(w, table) == classes).mean() > 0.9


def _attack_env(tmp_path, name, **over):
    from fedrec.build import build_env, malicious_set

    over = {"attack__start_round": 2, **over}
    cfg = tiny_cfg(tmp_path, model__name="ncf", model__ncf_form="mlp", model__loss="bce",
                   model__mlp_layers=[8, 8], model__dropout=0.0, data__neg_ratio=2, data__attacker_pool=0.2,
                   attack__name=name, attack__malicious_fraction=0.1,
                   attack__target="least_popular", **over)
    env = build_env(cfg)
    return cfg, env, sorted(malicious_set(env))[0]


def _fit(cfg, env, user, rnd, arrays, store=None):
    from clients.state import DictStore
    from fedrec.build import build_client
    client = build_client(env, user, store or DictStore())
    up, n, _ = client.fit(arrays, {"round": rnd})
    return [np.asarray(a) for a in up]


def _arrays(cfg, env):
    from fedrec.build import initial_arrays

    return initial_arrays(cfg, env.model)


def _ids(up):
    return np.asarray(up[0])


def test_pipattack_uploads_only_its_own_ids_and_the_target(tmp_path):
    from fedrec.targets import resolve_targets

    cfg, env, user = _attack_env(tmp_path, "pipattack")
    arrays = _arrays(cfg, env)
    honest = _fit(cfg, env, user, 1, arrays)  # before start_round: honest (static negatives)
    attacked = _fit(cfg, env, user, 2, arrays)
    target = resolve_targets(cfg, env.data)
    assert np.array_equal(_ids(attacked), np.union1d(_ids(honest), target))
    assert target[0] not in env.data.train_of(user)
    row = np.asarray(attacked[1])[np.searchsorted(_ids(attacked), target[0])]
    assert np.abs(row).sum() > 0  # the target row is crafted
    assert len(attacked) == len(honest) and all(np.all(np.isfinite(a)) for a in attacked[1:])


def test_pipattack_with_alpha_and_gamma_zero_equals_explicit_boosting(tmp_path):
    cfg, env, user = _attack_env(tmp_path, "pipattack", attack__params={"alpha": 0.0, "gamma": 0.0})
    a = _fit(cfg, env, user, 2, _arrays(cfg, env))
    cfg2, env2, user2 = _attack_env(tmp_path, "explicit_boost")
    assert user2 == user
    b = _fit(cfg2, env2, user, 2, _arrays(cfg2, env2))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    # and the full attack differs (its L_pop and L_dis act)
    cfg3, env3, _ = _attack_env(tmp_path, "pipattack")
    c = _fit(cfg3, env3, user, 2, _arrays(cfg3, env3))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_each_term_is_switchable_and_explicit_term_promotes(tmp_path):
    """Without L_exp (and L_pop, L_dis at zero weight) nothing is learned: the honest gradient
    with a zero target row; with L_exp the target's score for the attacker rises at the
    lookahead model."""
    from fedrec.targets import resolve_targets

    cfg, env, user = _attack_env(tmp_path, "pipattack",
                                 attack__params={"exp": False, "pop": False, "dis": False})
    arrays = _arrays(cfg, env)
    honest = _fit(cfg, env, user, 1, arrays)
    off = _fit(cfg, env, user, 2, arrays)
    t = resolve_targets(cfg, env.data)[0]
    ids = _ids(off)
    keep = np.searchsorted(ids, _ids(honest))
    assert np.array_equal(np.asarray(off[1])[keep], np.asarray(honest[1]))
    assert not np.asarray(off[1])[np.searchsorted(ids, t)].any()


def test_pipattack_without_predictor_crafting_uploads_the_honest_predictor(tmp_path):
    """params.predictor false: the predictor arrays are the honest gradient's, bit for bit,
    while the target row is still crafted (and differs from the full attack's, whose
    lookahead also moves the predictor)."""
    from fedrec.targets import resolve_targets

    cfg, env, user = _attack_env(tmp_path, "pipattack", attack__params={"predictor": False})
    arrays = _arrays(cfg, env)
    honest = _fit(cfg, env, user, 1, arrays)
    rows_only = _fit(cfg, env, user, 2, arrays)
    assert len(rows_only) == len(honest) > 2
    assert all(np.array_equal(a, b) for a, b in zip(rows_only[2:], honest[2:]))
    t = resolve_targets(cfg, env.data)[0]
    target_row = np.asarray(rows_only[1])[np.searchsorted(_ids(rows_only), t)]
    assert np.abs(target_row).sum() > 0
    cfg2, env2, _ = _attack_env(tmp_path, "pipattack")
    full = _fit(cfg2, env2, user, 2, _arrays(cfg2, env2))
    assert not all(np.array_equal(a, b) for a, b in zip(full[2:], honest[2:]))
    assert not np.array_equal(np.asarray(full[1])[np.searchsorted(_ids(full), t)], target_row)


def test_pipattack_predictor_param_must_be_a_bool(tmp_path):
    with pytest.raises(ConfigError, match="attack.params.predictor"):
        _attack_env(tmp_path, "pipattack", attack__params={"predictor": "no"})


@pytest.mark.parametrize("name", ["random_attack", "popular_attack", "boosted", "fedrecattack"])
def test_baselines_upload_the_target(tmp_path, name):
    from fedrec.targets import item_counts, popularity_order, resolve_targets

    cfg, env, user = _attack_env(tmp_path, name)
    up = _fit(cfg, env, user, 2, _arrays(cfg, env))
    t = resolve_targets(cfg, env.data)[0]
    assert t in _ids(up)
    if name == "popular_attack":
        top = [i for i in popularity_order(item_counts(env.data)) if i != t][:29]
        assert set(top) <= set(_ids(up).tolist())


def test_attack_from_a_clean_pretraining_equals_the_whole_run(tmp_path, monkeypatch):
    """attack.start_round = 4: rounds 1-3 come from a clean pretraining (computed once, then
    reused by another attack); the result is bit-identical to running rounds 1-6 in one go."""
    from conftest import engine_run_capturing_arrays
    from fedrec.engine import Engine

    cfg, env, _ = _attack_env(tmp_path, "pipattack", attack__start_round=4,
                              output__dir=str(tmp_path / "runs"))
    summary, arrays = engine_run_capturing_arrays(cfg, tmp_path / "runs", monkeypatch)
    assert summary.get("pretrained_from") and summary["resumed_from_round"] == 3
    whole = Engine(cfg, progress=False, workers=1)
    res = whole.run()
    assert all(np.array_equal(a, b) for a, b in zip(arrays, whole.strategy.global_arrays()))
    assert res["final"]["test_hr@5"] == summary["final"]["test_hr@5"]
    assert res["final"]["test_er@5"] == summary["final"]["test_er@5"]
    # a second attack reuses the pretraining (no new pretrain directory)
    cfg2, _, _ = _attack_env(tmp_path, "explicit_boost", attack__start_round=4,
                             output__dir=str(tmp_path / "runs"))
    before = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith("pretrain_"))
    s2, _ = engine_run_capturing_arrays(cfg2, tmp_path / "runs", monkeypatch)
    after = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith("pretrain_"))
    assert before == after and len(after) == 1 and s2["pretrained_from"] == summary["pretrained_from"]


def test_upload_kl_is_zero_for_equal_histograms_and_grows_with_spread():
    from fedrec.evaluation import upload_kl

    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.01, 100_000)
    assert upload_kl(a, a) == pytest.approx(0.0, abs=1e-9)
    near = upload_kl(a, rng.normal(0, 0.01, 100_000))
    far = upload_kl(a, np.concatenate([rng.normal(0, 0.01, 90_000), rng.normal(0, 0.3, 10_000)]))
    assert near < 0.01 < far


def test_one_pretraining_serves_every_evaluation_schedule_of_the_attack():
    """With eval.from_round after the attack's start the pretraining evaluates only its last
    round, so attacks with different eval.every share one pretraining; without it they differ."""
    from fedrec.config import from_dict
    from fedrec.engine import pretrain_config

    def digest(**ev):
        cfg = from_dict({"name": "p", "attack": {"name": "pipattack", "start_round": 101},
                         "train": {"rounds": 150}, "eval": ev})
        return pretrain_config(cfg).digest()

    assert digest(every=10, from_round=101) == digest(every=40, from_round=120)
    assert digest(every=10, from_round=101) != digest(every=10)
    assert digest(every=10) != digest(every=40)  # periodic evaluations inside the pretraining
    assert digest(every=10, from_round=50) != digest(every=40, from_round=50)


def test_mean_update_values_average_dense_updates_with_unsent_rows_as_zeros():
    """Two uploads: item 1 sent by both, item 3 by one; the mean over the group counts the
    missing row as zeros; the predictor is averaged too; hand-computed."""
    from fedrec.evaluation import mean_update_values, mean_upload_kl

    a = [np.array([1, 3]), np.array([[2.0, 4.0], [6.0, 8.0]], np.float32), np.array([1.0, 3.0])]
    b = [np.array([1]), np.array([[4.0, 0.0]], np.float32), np.array([3.0, 5.0])]
    vals = mean_update_values([a, b], np.array([0, 1, 3]), n_items=5)
    np.testing.assert_allclose(vals, [0, 0, 3, 2, 3, 4, 2, 4])  # rows 0, 1, 3, then predictor
    assert mean_upload_kl([a, b], [a, b], 5) == pytest.approx(0.0, abs=1e-12)
    far = [np.array([4]), np.array([[50.0, -50.0]], np.float32), np.array([9.0, -9.0])]
    assert mean_upload_kl([a, b], [far], 5) > 0.5
    assert np.isnan(mean_upload_kl([a], [], 5))
