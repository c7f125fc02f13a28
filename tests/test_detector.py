"""FedAttack's supervised detector: the shared features (sketch and statistics against dense
definitions, server-visible only), the filter and its composition with other rules, the
detector file's errors, and record -> train -> filter end-to-end on a tiny run."""

import json

import numpy as np
import pytest

from fedrec.cli import main
from fedrec.errors import ConfigError, FedRecError
from fedrec.protocol import Upload
from fedrec.registry import make_rule
from strategies.detector import (
    DetectorFilter,
    FeatureRecorder,
    FeatureSketch,
    load_detector,
    upload_features,
)
from strategies.krum import MultiKrumRule
from strategies.mean import MeanRule
from strategies.norm_bound import NormBoundRule, clip_updates
from strategies.rule import FilterChain, RoundUpdates
from tests.conftest import tiny_cfg

N_ITEMS, DIM = 90, 6


def _round(n=10, seed=0, predictor=True, loud=()):
    """n uploads of 5-30 small rows each; the positions in `loud` are 100x larger."""
    rng = np.random.default_rng(seed)
    ups = []
    for c in range(n):
        k = int(rng.integers(5, 30))
        ids = np.sort(rng.choice(N_ITEMS, k, replace=False))
        scale = 1.0 if c in loud else 0.01
        pred = [(rng.standard_normal((2, 3)) * scale).astype(np.float32),
                (rng.standard_normal(4) * scale).astype(np.float32)] if predictor else []
        ups.append(Upload(ids, (rng.standard_normal((k, DIM)) * scale).astype(np.float32), pred,
                          int(rng.integers(5, 60)), f"user{c}"))
    return RoundUpdates(ups, np.array([u.num_examples for u in ups], float), N_ITEMS, DIM, 3)


def _with(updates, uploads):
    return RoundUpdates(uploads, np.array([u.num_examples for u in uploads], float),
                        updates.n_items, updates.dim, updates.server_round)


class NormModel:
    """A stand-in classifier: P(malicious) = 1 for an upload norm above exp(cut)."""

    def __init__(self, cut=-1.0):
        self.cut = cut

    def predict_proba(self, X):
        p = (X[:, 0] > self.cut).astype(float)  # column 0: log ||g_c||
        return np.stack([1 - p, p], axis=1)


def _detector(sketch, model=None, predictor_size=10):
    return {"format": "fedrec-detector-v1", "model": model or NormModel(),
            "sketch": sketch.params(), "predictor_size": predictor_size}


# ----------------------------------------------------------------------------- features


def test_features_match_dense_definitions():
    u = _round(8, seed=1)
    sk = FeatureSketch(N_ITEMS, DIM, item_proj=5, dim_proj=3, seed=2)
    X = upload_features(u, sk).astype(np.float64)
    names = sk.feature_names()
    assert X.shape == (8, len(names)) and len(names) == 16 + 2 * 15
    col = {n: X[:, i] for i, n in enumerate(names)}
    dense = np.zeros((8, N_ITEMS, DIM))
    for c, up in enumerate(u.uploads):
        dense[c, up.item_ids] = up.item_rows
    w = u.weights / u.weights.sum()
    mean = np.tensordot(w, dense, axes=1)
    flat, mflat = dense.reshape(8, -1), mean.ravel()
    norms = np.linalg.norm(flat, axis=1)
    np.testing.assert_allclose(col["log_norm"], np.log(norms), rtol=1e-5)
    np.testing.assert_allclose(col["log_norm_rel"], np.log(norms / np.median(norms)), atol=1e-5)
    np.testing.assert_allclose(col["cos_mean_full"], flat @ mflat / (norms * np.linalg.norm(mflat)),
                               atol=1e-5)
    np.testing.assert_allclose(col["log_dist_mean_rel"],
                               np.log(np.linalg.norm(flat - mflat, axis=1) / np.linalg.norm(mflat)),
                               atol=1e-5)
    for c, up in enumerate(u.uploads):
        rn = np.linalg.norm(up.item_rows.astype(np.float64), axis=1)
        m_rows = mean[up.item_ids].ravel()
        own = up.item_rows.astype(np.float64).ravel()
        assert np.isclose(col["log_rows"][c], np.log1p(len(up.item_ids)), atol=1e-6)
        assert np.isclose(col["log_row_norm_mean"][c], np.log(rn.mean()), atol=1e-5)
        assert np.isclose(col["row_norm_cv"][c], rn.std() / rn.mean(), atol=1e-4)
        assert np.isclose(col["log_row_norm_max_rel"][c], np.log(rn.max() / rn.mean()), atol=1e-5)
        assert np.isclose(col["cos_mean_own_rows"][c],
                          own @ m_rows / (np.linalg.norm(own) * np.linalg.norm(m_rows)), atol=1e-5)
        assert np.isclose(col["log_num_examples"][c], np.log(up.num_examples), atol=1e-6)
        # the tensor sketch of the upload and of the round mean, direction only
        s = sk.p_item.T @ dense[c] @ sk.p_dim / norms[c]
        np.testing.assert_allclose(X[c, 16:31], s.ravel(), atol=1e-5)
    ms = sk.p_item.T @ mean @ sk.p_dim / np.linalg.norm(mflat)
    np.testing.assert_allclose(X[:, 31:], np.tile(ms.ravel(), (8, 1)), atol=1e-5)
    preds = np.stack([np.concatenate([a.ravel() for a in up.predictor]) for up in u.uploads])
    pm = w @ preds
    np.testing.assert_allclose(col["cos_pred_mean"], preds @ pm / (
        np.linalg.norm(preds, axis=1) * np.linalg.norm(pm)), atol=1e-5)


def test_features_use_only_the_uploads_not_who_sent_them():
    u = _round(9, seed=2)
    sk = FeatureSketch(N_ITEMS, DIM)
    X = upload_features(u, sk)
    # renaming the senders changes nothing; permuting the uploads permutes the rows
    renamed = _with(u, [Upload(x.item_ids, x.item_rows, x.predictor, x.num_examples, "?")
                        for x in u.uploads])
    np.testing.assert_array_equal(upload_features(renamed, sk), X)
    perm = np.random.default_rng(0).permutation(9)
    np.testing.assert_allclose(upload_features(_with(u, [u.uploads[i] for i in perm]), sk), X[perm],
                               rtol=1e-5, atol=1e-6)
    # seeded: a new sketch with the same settings gives the same features; another seed does not
    np.testing.assert_array_equal(upload_features(u, FeatureSketch(N_ITEMS, DIM)), X)
    assert not np.allclose(upload_features(u, FeatureSketch(N_ITEMS, DIM, seed=1)), X)
    # no predictor (MF): the predictor statistics are zero; hostile rows stay finite
    v = _round(5, predictor=False)
    v.uploads[0] = Upload(v.uploads[0].item_ids, np.full_like(v.uploads[0].item_rows, 3e38), [],
                          7, "x")
    v.uploads[1] = Upload(np.zeros(0, np.int64), np.zeros((0, DIM), np.float32), [], 3, "empty")
    Y = upload_features(_with(v, v.uploads), sk)
    assert np.isfinite(Y).all() and (Y[:, 11:14] == 0).all()
    assert Y[1, 5] == 0 and (Y[1, 16:31] == 0).all()  # no rows: log(1 + 0), a zero sketch
    with pytest.raises(ValueError, match="sketch"):
        upload_features(u, FeatureSketch(N_ITEMS + 1, DIM))


# ----------------------------------------------------------------------------- the filter


def test_filter_drops_flagged_uploads_and_composes(tmp_path):
    u = _round(12, seed=3, loud=(2, 7))
    sk = FeatureSketch(N_ITEMS, DIM)
    agg = FilterChain([DetectorFilter(_detector(sk))], MeanRule())(u)
    assert agg.dropped == [2, 7] and agg.info["detector_dropped"] == 2
    assert agg.dropped_by == {"detector": [2, 7]}
    rest = _with(u, [x for i, x in enumerate(u.uploads) if i not in (2, 7)])
    np.testing.assert_allclose(agg.item_grad, MeanRule()(rest).item_grad, atol=1e-7)
    for a, b in zip(agg.predictor, MeanRule()(rest).predictor):
        np.testing.assert_allclose(a, b, atol=1e-7)
    # threshold above every score: nothing dropped, the inner rule on everything
    half = {**_detector(sk), "model": type("Half", (), {
        "predict_proba": lambda s, X: np.full((len(X), 2), 0.5)})()}
    assert FilterChain([DetectorFilter(half, threshold=1.0)], MeanRule())(u).dropped == []
    # Multi-Krum on the kept uploads: the drop sets are unioned, in original positions
    mk = FilterChain([DetectorFilter(_detector(sk))], MultiKrumRule("dense", f=1))(u)
    keep = [i for i in range(12) if i not in (2, 7)]
    inner = MultiKrumRule("dense", f=1)(_with(u, [u.uploads[i] for i in keep]))
    assert mk.dropped == sorted({2, 7} | {keep[i] for i in inner.dropped})
    assert (mk.info["detector_dropped"], mk.info["inner_dropped"]) == (2, len(inner.dropped))
    # norm bound: filter, then clip the rest
    nb = FilterChain([DetectorFilter(_detector(sk))], NormBoundRule("dense", bound=0.05))(u)
    np.testing.assert_allclose(nb.item_grad, MeanRule()(clip_updates(rest, 0.05)).item_grad,
                               atol=1e-7)
    # everyone flagged: a zero update, everyone reported
    allin = FilterChain([DetectorFilter(_detector(sk, NormModel(cut=-1e9)))], MeanRule())(u)
    assert allin.dropped == list(range(12)) and not allin.item_grad.any()


def test_recorder_sees_the_round_and_passes_it_through():
    u = _round(6)
    sk = FeatureSketch(N_ITEMS, DIM)
    rec = FeatureRecorder(sk, every=3)
    chain = FilterChain([rec], MeanRule())
    agg = chain(u)
    np.testing.assert_array_equal(agg.item_grad, MeanRule()(u).item_grad)
    assert agg.dropped == [] and agg.dropped_by == {}  # a recorder is not a detection stage
    u.server_round = 4
    chain(u)
    assert len(rec.records) == 1 and rec.records[0][0] == 3
    assert rec.records[0][2] == [f"user{c}" for c in range(6)]
    np.testing.assert_array_equal(rec.records[0][1], upload_features(_round(6), sk))


# ----------------------------------------------------------------------------- config


def _cfg(tmp_path, **over):
    return tiny_cfg(tmp_path, **{"server__filter": "detector", "output__dir": str(tmp_path),
                                 **over})


def test_bad_detector_path_is_a_one_line_config_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="server.detector_path: required"):
        _cfg(tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        make_rule(_cfg(tmp_path, server__detector_path=str(tmp_path / "missing.pkl")))
    junk = tmp_path / "junk.pkl"
    junk.write_text("not a pickle\n")
    with pytest.raises(ConfigError, match="not a fedrec detector"):
        load_detector(junk)
    with pytest.raises(ConfigError, match="server.detector_threshold"):
        _cfg(tmp_path, server__detector_path="x", server__detector_threshold=1.5)
    # through the CLI: one line, exit code 2
    yaml_path = tmp_path / "exp.yaml"
    yaml_path.write_text(json.dumps({"server": {"filter": "detector",
                                                "detector_path": str(junk)},
                                     "data": {"cache_dir": str(tmp_path / "cache")},
                                     "train": {"rounds": 1}, "output": {"dir": str(tmp_path)}}))
    assert main(["run", str(yaml_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "server.detector_path" in err


# ----------------------------------------------------------------------------- end to end


def test_record_train_filter_end_to_end(tmp_path, capsys):
    from fedrec.build import build_env, malicious_set
    from fedrec.detector_tools import load_records, record_one
    from fedrec.engine import run_experiment

    attack = dict(data__attacker_pool=0.3, data__synthetic={"n_users": 80, "n_items": 60,
                                                           "mean_history": 10},
                  attack__name="gaussian", attack__malicious_fraction=0.2, attack__start_round=3,
                  train__rounds=25, train__clients_per_round=10, eval__every=0)
    rec_cfg = tiny_cfg(tmp_path, seed=1, **attack)
    rec = record_one(rec_cfg, every=1, progress=False)
    bad = malicious_set(build_env(rec_cfg))
    expect = np.array([r >= 3 and int(u) in bad for r, u in zip(rec["round"], rec["user"])])
    np.testing.assert_array_equal(rec["y"].astype(bool), expect)  # honest before start_round
    assert rec["y"].sum() > 0 and (rec["y"][rec["round"] < 3] == 0).all()
    # the CLI: record (a grid: one file per attack) and train
    yaml_path = tmp_path / "exp.yaml"
    raw = {"seed": 1, "data": {"synthetic": {"n_users": 80, "n_items": 60, "mean_history": 10},
                               "attacker_pool": 0.3, "cache_dir": str(tmp_path / "cache")},
           "model": {"dim": 8}, "train": {"rounds": 25, "clients_per_round": 10},
           "server": {"lr": 0.01}, "eval": {"every": 0},
           "attack": {"name": "gaussian", "malicious_fraction": 0.2},
           "output": {"dir": str(tmp_path / "runs")}, "grid": {"attack.name": ["gaussian"]}}
    yaml_path.write_text(json.dumps(raw))
    out = tmp_path / "rec-{attack}.npz"
    assert main(["detector", "record", str(yaml_path), "--out", str(out), "--rounds", "20",
                 "--every", "2", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["rounds"] == 10 and summary["uploads"] == 100 and summary["malicious"] > 0
    assert len(np.unique(load_records([tmp_path / "rec-gaussian.npz"])["group"][:, 2])) == 10
    det = tmp_path / "det.pkl"
    assert main(["detector", "train", str(tmp_path / "rec-gaussian.npz"), "--out", str(det),
                 "--test-fraction", "0.3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["heldout"]["positives"] > 0 and 0 <= report["heldout"]["recall"] <= 1
    assert report["heldout"]["by_threshold"]["0.5"]["recall"] == report["heldout"]["recall"]
    # the defended run (seed 0: other malicious users) drops malicious uploads
    cfg = tiny_cfg(tmp_path, server__filter="detector", output__dir=str(tmp_path / "def"),
                   server__detector_path=str(tmp_path / "det.pkl"), **attack)
    s = run_experiment(cfg, progress=False)
    assert s["status"] == "complete"
    d = s["detection"]
    assert d["tp"] > 0 and d["recall"] > 0, d
    header = (tmp_path / "def" / s["run_dir"] / "metrics.csv").read_text().splitlines()[0]
    assert {"det_recall", "rule_detector_dropped"} <= set(header.split(","))
    # a detector trained on another model's shapes is refused before round 1
    with pytest.raises(ConfigError, match=r"trained on \d+ items x 8"):
        run_experiment(tiny_cfg(tmp_path, server__filter="detector", model__dim=4,
                                server__detector_path=str(det), output__dir=str(tmp_path / "x"),
                                **attack), progress=False)


def test_train_needs_both_classes(tmp_path):
    from fedrec.detector_tools import record_one, save_records, train

    cfg = tiny_cfg(tmp_path, train__rounds=3, eval__every=0)
    save_records([record_one(cfg, progress=False)], tmp_path / "clean.npz")
    with pytest.raises(FedRecError, match="0 malicious uploads"):
        train([tmp_path / "clean.npz"], tmp_path / "d.pkl")
    (tmp_path / "bad.npz").write_text("x")
    with pytest.raises(FedRecError, match="not a `fedrec detector record` file"):
        train([tmp_path / "bad.npz"], tmp_path / "d.pkl")


def test_experiment_yamls_load_with_a_detector_per_attack():
    from pathlib import Path

    from fedrec import config
    from fedrec.registry import detector_path

    root = Path(__file__).resolve().parents[1] / "experiments"
    for name, model in (("ml1m-ncf-detector.yaml", "ncf"), ("ml1m-mf-detector.yaml", "mf")):
        cfgs = config.load(root / name)
        assert {c.model.name for c in cfgs} == {model} and len(cfgs) >= 6
        for c in cfgs:
            assert c.server.filter_steps() == ["detector"] and c.attack.malicious_fraction == 0.05
            assert detector_path(c).endswith(f"det-{c.attack.name}.pkl")
