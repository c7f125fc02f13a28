"""MGradInv (fedrec/privacy): the simulator against uploads recorded from real runs, the
observer's view, the MF sign split and the metrics on hand cases, the countermeasures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.privacy import baselines as B
from fedrec.privacy.countermeasures import Countermeasure, gaussian_sigma, make_protect
from fedrec.privacy.inversion import AttackConfig, Inversion
from fedrec.privacy.metrics import auc, cosine, prf, score, top_n
from fedrec.privacy.observer import Observation, Observer
from fedrec.privacy.replay import replay_upload
from fedrec.privacy.simulator import (RoundModel, relative_l2, round_model, simulate_membership,
                                      simulate_pairs)
from conftest import tiny_cfg

TARGETS = [1, 5, 9, 14]
FORCED = {1: [1, 3], 5: [2, 3, 4], 9: [4], 14: [5, 6]}


def _cfg(tmp_path, model="mf", loss="bce", **over):
    kw = dict(model__name=model, model__loss=loss, model__dropout=0.0,
              model__mlp_layers=[8, 4], data__negatives="static", train__user_optimizer="sgd",
              train__user_lr=1.0, train__weight_decay=0.0, eval__every=0)
    kw.update(over)
    return tiny_cfg(tmp_path, **kw)


def _engine(cfg, rounds=6, protect=None):
    from fedrec.privacy.runner import PrivacyEngine

    e = PrivacyEngine(cfg, targets=TARGETS, forced=FORCED, protect=protect)
    for r in range(1, rounds + 1):
        e.run_round(r)
    return e


def _recorded(e):
    out = [(u, o) for u, obs in e.observer.records.items() for o in obs]
    assert len(out) >= len(TARGETS) + 4  # every forced round at least
    return out


@pytest.mark.parametrize("model,form", [("mf", "neumf"), ("ncf", "neumf"), ("ncf", "mlp")])
@pytest.mark.parametrize("loss", ["bce", "bpr"])
@pytest.mark.parametrize("wd,q", [(0.0, 1), (1e-3, 2)])
def test_simulator_reproduces_recorded_uploads(tmp_path, model, form, loss, wd, q):
    """The differentiable simulator, fed the true private data (user row before the step,
    pairs) and the recorded global model, gives the upload the real client sent."""
    cfg = _cfg(tmp_path, model, loss, model__ncf_form=form, train__weight_decay=wd,
               data__neg_ratio=q)
    e = _engine(cfg)
    for u, o in _recorded(e):
        t = e.truth[(u, o.round)]
        rm = round_model(e.env.model, cfg, e.observer.model_at(o.round), o.item_ids)
        rows, pred, ug = simulate_pairs(rm, t["user"], t["pos"], t["neg"])
        assert relative_l2(rows, pred, o.item_rows, o.predictor) < 1e-5, (u, o.round)
        # and the user row it implies is the one the device holds after the step
        after = e.client(u).user_vector(o.round) if o.round == FORCED[u][-1] else None
        if after is not None and e.client(u).private_state()["clock"][0] == o.round:
            np.testing.assert_allclose(t["user"] - cfg.train.user_lr * ug, after, rtol=1e-4,
                                       atol=1e-6)


@pytest.mark.parametrize("model", ["mf", "ncf"])
def test_relaxed_simulator_is_exact_for_bce_hard_membership(tmp_path, model):
    """BCE is pointwise: a hard membership reproduces the upload whenever no negative was
    drawn twice (the relaxation spreads multiplicities evenly)."""
    cfg = _cfg(tmp_path, model, "bce")
    e = _engine(cfg)
    checked = 0
    for u, o in _recorded(e):
        t = e.truth[(u, o.round)]
        if len(np.unique(t["neg"])) != len(t["neg"]):
            continue
        rm = round_model(e.env.model, cfg, e.observer.model_at(o.round), o.item_ids)
        x = np.isin(o.item_ids, t["pos"]).astype(np.float64)
        rows, pred, _ = simulate_membership(rm, t["user"], x, o.num_examples)
        assert relative_l2(rows, pred, o.item_rows, o.predictor) < 1e-5
        # a wrong membership does not
        rows, pred, _ = simulate_membership(rm, t["user"], 1 - x, o.num_examples)
        assert relative_l2(rows, pred, o.item_rows, o.predictor) > 1e-2
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("model", ["mf", "ncf"])
@pytest.mark.parametrize("negatives", ["static", "fresh"])
def test_replay_with_the_clients_code_is_exact_with_dropout(tmp_path, model, negatives):
    cfg = _cfg(tmp_path, model, "bpr", model__dropout=0.3, data__negatives=negatives)
    e = _engine(cfg)
    for u, o in _recorded(e):
        t = e.truth[(u, o.round)]
        ids, rows, pred = replay_upload(e.client(u), e.observer.model_at(o.round), t["user"],
                                        t["pos"], t["neg"], o.round)
        np.testing.assert_array_equal(ids, o.item_ids)
        np.testing.assert_array_equal(rows, o.item_rows)
        for a, b in zip(pred, o.predictor):
            np.testing.assert_array_equal(a, b)


def test_observer_sees_what_the_strategy_sees_and_nothing_else(tmp_path):
    cfg = _cfg(tmp_path, "ncf", "bce")
    from fedrec.privacy.runner import PrivacyEngine

    e = PrivacyEngine(cfg, targets=TARGETS, forced=FORCED)
    seen = []
    original = e.strategy.aggregate_uploads

    def spy(rnd, results):
        seen.append((rnd, [(u, [a.copy() for a in up], n) for u, up, n, _ in results]))
        return original(rnd, results)

    e.strategy.aggregate_uploads = spy
    models = {}
    for r in range(1, 7):
        models[r] = [a.copy() for a in e.strategy.global_arrays()]
        e.run_round(r)
    got = {(u, o.round): o for u, obs in e.observer.records.items() for o in obs}
    expected = {(int(u), rnd): (up, n) for rnd, res in seen for u, up, n in res if u in TARGETS}
    assert set(got) == set(expected)
    for key, (up, n) in expected.items():
        o = got[key]
        np.testing.assert_array_equal(o.item_ids, up[0])
        np.testing.assert_array_equal(o.item_rows, up[1])
        assert o.num_examples == n and len(o.predictor) == len(up) - 2
        for a, b in zip(e.observer.model_at(key[1]), models[key[1]]):
            np.testing.assert_array_equal(a, b)  # the model the round was computed on
    # forced rounds: present exactly there inside each target's window
    for u, rs in FORCED.items():
        inside = [r for (uu, r) in got if uu == u and rs[0] <= r <= rs[-1]]
        assert sorted(inside) == rs
    # the observer's record holds only upload fields: no private state, no labels
    assert set(vars(next(iter(got.values())))) == {"user", "round", "item_ids", "item_rows",
                                                   "predictor", "num_examples"}


def test_observer_module_reaches_no_ground_truth():
    from test_layers import GROUND_TRUTH, import_graph, reachable

    graph = import_graph()
    for mod in ("fedrec.privacy.observer", "fedrec.privacy.inversion",
                "fedrec.privacy.simulator", "fedrec.privacy.baselines"):
        bad = sorted(d for d in reachable(graph, mod)
                     if d.startswith(GROUND_TRUTH) or d in ("fedrec.privacy.metrics",
                                                            "fedrec.privacy.runner",
                                                            "fedrec.privacy.replay"))
        assert bad == [], f"{mod} reaches {bad}"


def test_observer_ignores_others_and_copies():
    obs = Observer([3])
    table = np.ones((5, 2), np.float32)
    up = [np.array([0, 2]), np.ones((2, 2), np.float32)]
    obs.see(4, [(3, up, 2, {}), (7, up, 2, {}), (3, ValueError("bad"), 2, {})], [table])
    table[:] = 0
    up[1][:] = 5
    assert list(obs.records) == [3] and len(obs.records[3]) == 1
    assert obs.model_at(4)[0].sum() == 10 and obs.records[3][0].item_rows.sum() == 4


def test_mf_sign_split_hand_case():
    """MF rows are c_i * u: the split recovers the positives up to one global sign, which the
    simulation resolves (|P| differs from the number of negative ids here)."""
    rng = np.random.default_rng(0)
    d, n_items = 6, 30
    table = rng.normal(0, 0.5, (n_items, d)).astype(np.float32)
    u = rng.normal(0, 0.5, d).astype(np.float32)
    pos = np.array([1, 4, 7, 10, 20])
    neg = np.array([2, 3, 5, 6, 8, 9, 11, 12, 13, 15, 16, 17, 18, 19, 21])[:10]
    pairs_pos = np.repeat(pos, 2)  # q = 2
    ids = np.union1d(pos, neg)
    rm = RoundModel("mf", [table], ids, loss="bce", q=2)
    rows, pred, _ = simulate_pairs(rm, u, pairs_pos, neg)
    o = Observation(0, 1, ids, rows.astype(np.float32), [], len(pairs_pos))
    labels = np.isin(ids, pos)
    c, s, uh = B.sign_split(o, rm, len(pos), oracle_labels=labels)
    assert prf(top_n(s, len(pos)), labels)[2] == 1.0 and cosine(uh, u) > 0.999
    c, s, uh = B.sign_split(o, rm, len(pos))
    assert prf(top_n(s, len(pos)), labels)[2] == 1.0
    assert cosine(uh, u) > 0.999
    # the flipped sign is the complement: the split alone cannot tell
    assert prf(top_n(-s, len(pos)), labels)[2] == 0.0


def test_metrics_hand_case():
    labels = np.array([1, 0, 1, 0, 0], bool)
    assert auc([0.9, 0.1, 0.8, 0.2, 0.3], labels) == 1.0
    assert auc([0.1, 0.9, 0.2, 0.8, 0.7], labels) == 0.0
    assert auc([0.5] * 5, labels) == 0.5  # ties count half
    assert auc([0.9, 0.8, 0.25, 0.2, 0.3], labels) == pytest.approx(4 / 6)
    p, r, f = prf([1, 1, 0, 0, 1], labels)
    assert (p, r, f) == pytest.approx((1 / 3, 1 / 2, 0.4))
    assert top_n([0.3, 0.9, 0.9, 0.1], 2).tolist() == [False, True, True, False]
    s = score(np.array([10, 11, 12, 13]), np.array([2.0, -1.0, 0.5, -3.0]), np.array([10, 13]),
              np.array([1.0, 0.0]), np.array([0.0, 2.0]))
    assert s["f1"] == 0.5 and s["precision@0.5"] == 0.5 and s["recall@0.5"] == 0.5
    assert s["auc"] == 0.5 and s["user_cos"] == 0.0 and s["base_rate"] == 0.5
    assert cosine([1, 1], [-2, -2]) == pytest.approx(-1.0)


def test_intersection_finds_positives_under_fresh_negatives():
    o1 = Observation(0, 1, np.array([1, 2, 3, 8, 9]), np.zeros((5, 2), np.float32), [], 3)
    o2 = Observation(0, 2, np.array([1, 2, 3, 5, 6]), np.zeros((5, 2), np.float32), [], 3)
    c, s, _ = B.intersection([o1, o2], seed=0)
    assert score(c, s, np.array([1, 2, 3]))["f1"] == 1.0


def _observed_ncf_user(tmp_path, u=5):
    """(observations, round models, table scale, ground truth) of user u's forced rounds in a
    3-round NCF run."""
    cfg = _cfg(tmp_path, "ncf", "bce", model__dim=8)
    e = _engine(cfg, rounds=3)
    obs = e.observer.observations(u, FORCED[u])
    t = e.truth[(u, obs[0].round)]
    rms = [round_model(e.env.model, cfg, e.observer.model_at(o.round), o.item_ids) for o in obs]
    scale = float(np.sqrt(np.mean(e.observer.model_at(obs[0].round)[0] ** 2)))
    return obs, rms, scale, t


def test_inversion_beats_random_on_a_real_upload(tmp_path):
    obs, rms, scale, t = _observed_ncf_user(tmp_path)
    inv = Inversion(obs, rms, obs[0].num_examples, AttackConfig(iterations=60, restarts=2), scale)
    r = inv.run(seed=0)
    s = score(r.candidates, r.scores, t["train_items"], r.user, t["user"])
    assert s["auc"] > 0.8 and s["user_cos"] > 0.5
    # the objective at the truth is near 0 (duplicate negatives aside) and below the flipped
    # labels' at the same user row
    x = np.isin(inv.cand, t["train_items"])
    user = torch.as_tensor(t["user"][None], dtype=torch.float64)
    val = float(inv.objective(torch.as_tensor(np.where(x, 30.0, -30.0)[None]), user))
    flipped = float(inv.objective(torch.as_tensor(np.where(x, -30.0, 30.0)[None]), user))
    assert val < 0.1 and val < flipped


def test_countermeasures(tmp_path):
    cfg = _cfg(tmp_path, "mf", "bce")
    e = _engine(cfg, rounds=1)
    client = e.client(1)
    arrays = e.strategy.global_arrays()
    up = [np.array([0, 3]), np.full((2, 8), 1.0, np.float32)]
    ldp = make_protect(Countermeasure("ldp", epsilon=1.0, clip=0.5), seed=0)
    a = ldp(client, 2, up, 4, arrays)
    b = ldp(client, 2, up, 4, arrays)
    np.testing.assert_array_equal(a[1], b[1])  # seeded by (seed, user, round)
    clipped = np.full((2, 8), 0.5 / 4, np.float32)
    noise = a[1] - clipped
    assert noise.std() == pytest.approx(gaussian_sigma(0.5, 1.0, 1e-8), rel=0.5)
    assert not np.array_equal(ldp(client, 3, up, 4, arrays)[1], a[1])
    pad = make_protect(Countermeasure("padding", pad_ratio=1.0), seed=0)
    ids = client.train_items
    p = pad(client, 2, [ids, np.zeros((len(ids), 8), np.float32)], len(ids), arrays)
    extra = np.setdiff1d(p[0], ids)
    assert len(extra) == len(ids) and not np.isin(extra, client.known_sorted).any()
    assert np.all(np.diff(p[0]) > 0) and np.abs(p[1][np.isin(p[0], extra)]).sum() > 0


@pytest.mark.parametrize("optimizer,distance,mode", [("adam", "l2", "coupled"),
                                                     ("adam", "cos", "shared"),
                                                     ("adam", "cos", "free"),
                                                     ("lbfgs", "cos", "coupled")])
def test_inversion_variants_run_and_beat_random(tmp_path, optimizer, distance, mode):
    obs, rms, scale, t = _observed_ncf_user(tmp_path)
    acfg = AttackConfig(optimizer=optimizer, distance=distance, user_mode=mode,
                        iterations=60 if optimizer == "adam" else 40, restarts=2,
                        lr=0.1 if optimizer == "adam" else 0.5)
    r = Inversion(obs, rms, obs[0].num_examples, acfg, scale).run(seed=1)
    assert np.isfinite(r.objective) and r.user.shape == (8,)
    assert score(r.candidates, r.scores, t["train_items"])["auc"] > 0.7
