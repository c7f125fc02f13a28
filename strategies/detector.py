"""Supervised malicious-update detection (FedAttack, Wu et al. KDD'22, section 4.4).

The server holds a classifier trained on updates recorded in an earlier run, labelled
malicious or benign (`fedrec detector record` / `fedrec detector train`, fedrec/detector_tools.py).
Each round it scores every upload and drops those scored >= server.detector_threshold, then
hands the rest to the inner rule (server.rule), like UNION's filter.

Features (`upload_features`, the ONE function used to record, train and filter): the paper
feeds its feed-forward network the concatenation of a client's gradient and the round's
average gradient. Here an item gradient is sparse (k_c rows of an n_items x d table; n_items x
d = 237k for ML-1M at d = 64), so both are compressed with a fixed seeded tensor sketch

    S(G) = P_item^T G P_dim   (r x c),   P_item (n_items, r) ~ N(0, 1/r), P_dim (d, c) ~ N(0, 1/c)

which for an upload costs P_item[ids]^T rows P_dim (only its rows) and keeps inner products in
expectation (E ||S(G)||^2 = ||G||^2). The round mean M is the dense weighted mean of the item
gradients (server weights; untouched rows = 0), so S(M) = sum_c w_c S(g_c). The sketches are
normalised (S(g_c) / ||g_c||, S(M) / ||M||): direction only, so rounds early and late in
training look alike; the scale goes into scalar statistics, in logs:

    log ||g_c||, log ||g_c|| / median_c' ||g_c'||, log mean row norm, row-norm std / mean,
    log max / mean row norm, log(1 + rows), log rows / median rows, cos(g_c, M) over the
    client's rows, cos(g_c, M) over the whole table, log ||g_c - M|| / ||M||, log ||M||,
    log ||p_c|| (predictor gradient), cos(p_c, mean p), log ||p_c|| / median, log num_examples,
    log num_examples / (1 + rows)

(predictor statistics are 0 for models without a predictor, e.g. MF). Differences from the
paper: the sketch instead of the raw concatenation (its network saw full NCF/BERT4Rec
gradients), and the scalar statistics added (the paper notes that norms and variance are what
make model-poisoning updates detectable). Everything here is computed from what a server
sees: the round's validated uploads, their claimed sample counts and the server's weights.

The detector file is a pickle (a scikit-learn pipeline plus the sketch's settings): load only
files you trained yourself.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from fedrec.errors import ConfigError
from strategies.aggregate import dense_mean_stacked
from strategies.robust import flat_predictors, row_sq_norms
from strategies.rule import Filtered, PreAggregationStep, RoundUpdates, drop_uploads

FORMAT = "fedrec-detector-v1"
SKETCH_SEED = 0x44455445  # "DETE": the projections' own stream
SCALARS = ("log_norm", "log_norm_rel", "log_row_norm_mean", "row_norm_cv", "log_row_norm_max_rel",
           "log_rows", "log_rows_rel", "cos_mean_own_rows", "cos_mean_full", "log_dist_mean_rel",
           "log_mean_norm", "log_pred_norm", "cos_pred_mean", "log_pred_norm_rel",
           "log_num_examples", "log_examples_per_row")
_TINY = 1e-30


class FeatureSketch:
    """The fixed random projections P_item (n_items, r), P_dim (dim, c) of `upload_features`."""

    def __init__(self, n_items: int, dim: int, item_proj: int = 16, dim_proj: int = 4,
                 seed: int = 0):
        self.n_items, self.dim = int(n_items), int(dim)
        self.item_proj, self.dim_proj, self.seed = int(item_proj), int(dim_proj), int(seed)
        if self.item_proj < 1 or self.dim_proj < 1:
            raise ValueError("the sketch needs item_proj >= 1 and dim_proj >= 1")
        rng = np.random.default_rng([SKETCH_SEED, self.seed])
        self.p_item = (rng.standard_normal((self.n_items, self.item_proj))
                       / np.sqrt(self.item_proj))
        self.p_dim = rng.standard_normal((self.dim, self.dim_proj)) / np.sqrt(self.dim_proj)
        self.p_item32 = self.p_item.astype(np.float32)
        self.p_dim_t = torch.from_numpy(self.p_dim.astype(np.float32))

    def params(self) -> dict:
        return {"n_items": self.n_items, "dim": self.dim, "item_proj": self.item_proj,
                "dim_proj": self.dim_proj, "seed": self.seed}

    @property
    def size(self) -> int:
        return self.item_proj * self.dim_proj

    def feature_names(self) -> list:
        return [*SCALARS, *(f"sketch_{i}" for i in range(self.size)),
                *(f"mean_sketch_{i}" for i in range(self.size))]


def _log(x):
    return np.log(np.maximum(x, _TINY))


def _ratio(a, b):
    return np.where(b > _TINY, a / np.maximum(b, _TINY), 0.0)


def upload_sketches(rows, owner, ids, n: int, sketch: FeatureSketch) -> np.ndarray:
    """(n, r * c) float64: S(g_c) = P_item[ids_c]^T rows_c P_dim, flattened, per upload.

    One (N, d) x (d, c) product for all rows, then one small (r, k_c) x (k_c, c) product per
    upload (the rows are stacked upload by upload); float32 products, as the uploads."""
    # torch: one intra-op thread (fedrec.runtime); numpy's BLAS threads spin on a busy machine
    b = (torch.from_numpy(np.ascontiguousarray(rows)) @ sketch.p_dim_t).numpy()  # (N, c)
    a = sketch.p_item32[ids]  # (N, r)
    bounds = np.searchsorted(owner, np.arange(n + 1))
    out = np.zeros((n, sketch.item_proj, sketch.dim_proj))
    for c in np.flatnonzero(bounds[1:] > bounds[:-1]):
        lo, hi = bounds[c], bounds[c + 1]
        out[c] = a[lo:hi].T @ b[lo:hi]
    return out.reshape(n, -1)


def upload_features(updates: RoundUpdates, sketch: FeatureSketch) -> np.ndarray:
    """(n, F) float32 features of every upload of the round (see the module docstring)."""
    n = len(updates)
    if (updates.n_items, updates.dim) != (sketch.n_items, sketch.dim):
        raise ValueError(f"the sketch is for {sketch.n_items} items x {sketch.dim}, the round has "
                         f"{updates.n_items} x {updates.dim}")
    ids, rows, owner = updates.stacked
    if len(owner) > 1 and (owner[1:] < owner[:-1]).any():  # stacked upload by upload
        order = np.argsort(owner, kind="stable")
        ids, rows, owner = ids[order], rows[order], owner[order]
    w = np.asarray(updates.weights, np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(n, 1.0 / max(n, 1))
    row_sq = row_sq_norms(rows)
    sq = np.bincount(owner, weights=row_sq, minlength=n)
    norm = np.sqrt(sq)
    count = np.bincount(owner, minlength=n).astype(np.float64)
    row_norm = np.sqrt(row_sq)
    rn_mean = _ratio(np.bincount(owner, weights=row_norm, minlength=n), count)
    rn_var = np.maximum(_ratio(sq, count) - rn_mean ** 2, 0.0)
    rn_max = np.zeros(n)
    bounds = np.searchsorted(owner, np.arange(n + 1))
    full = np.flatnonzero(bounds[1:] > bounds[:-1])
    if len(full):  # rows are stacked upload by upload: segment maxima
        rn_max[full] = np.maximum.reduceat(row_norm, bounds[full])
    # the round's dense weighted mean M, and <g_c, M> over each client's rows
    mean = dense_mean_stacked(ids, rows, owner, w, updates.n_items)  # float32, as the rule's
    mean_sq = float(row_sq_norms(mean).sum())
    m_rows = mean[ids]
    with np.errstate(over="ignore", invalid="ignore"):  # crafted huge rows: cleaned below
        dot = np.bincount(owner, weights=np.einsum("ij,ij->i", rows, m_rows), minlength=n)
    m_own = np.bincount(owner, weights=row_sq_norms(m_rows), minlength=n)
    dist = np.sqrt(np.maximum(sq - 2 * dot + mean_sq, 0.0))
    preds = flat_predictors(updates.uploads)
    if preds is None:
        pnorm = pcos = prel = np.zeros(n)
    else:
        preds = preds.astype(np.float64)
        pmean = w @ preds
        pnorm = np.sqrt(np.einsum("ij,ij->i", preds, preds))
        pcos = _ratio(preds @ pmean, pnorm * np.linalg.norm(pmean))
        prel = _log(_ratio(pnorm, np.median(pnorm)))
        pnorm = _log(pnorm)
    examples = np.maximum([u.num_examples for u in updates.uploads], 1.0)
    mean_norm = np.sqrt(mean_sq)
    scalars = np.stack([  # in the order of SCALARS
        _log(norm), _log(_ratio(norm, np.median(norm))), _log(rn_mean),
        _ratio(np.sqrt(rn_var), rn_mean), _log(_ratio(rn_max, rn_mean)), np.log1p(count),
        _log(_ratio(count, np.median(count))), _ratio(dot, np.sqrt(sq * m_own)),
        _ratio(dot, norm * mean_norm), _log(_ratio(dist, mean_norm)), np.full(n, _log(mean_norm)),
        pnorm, pcos, prel, np.log(examples), np.log(examples / (1 + count)),
    ], axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        sk = upload_sketches(rows, owner, ids, n, sketch)
    mean_sk = w @ sk  # = S(M): the sketch is linear
    sk_rel = sk / np.maximum(norm, _TINY)[:, None]
    mean_rel = np.broadcast_to(mean_sk / max(mean_norm, _TINY), sk.shape)
    out = np.concatenate([scalars, sk_rel, mean_rel], axis=1)
    return np.nan_to_num(out, nan=0.0, posinf=1e6, neginf=-1e6).astype(np.float32)


# ---------------------------------------------------------------------- the detector file


def load_detector(path) -> dict:
    """The dict `fedrec detector train` pickled; ConfigError (one line) if it is not one."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"server.detector_path: {path}: no such file (train one with "
                          f"`fedrec detector train`)")
    try:
        with open(p, "rb") as f:
            det = pickle.load(f)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means: not a detector file
        raise ConfigError(f"server.detector_path: {path}: not a fedrec detector "
                          f"({e.__class__.__name__})") from None
    if not isinstance(det, dict) or det.get("format") != FORMAT or "model" not in det:
        raise ConfigError(f"server.detector_path: {path}: not a fedrec detector "
                          f"(expected format {FORMAT})")
    return det


class FeatureRecorder(PreAggregationStep):
    """A step that passes every upload on and keeps `upload_features` of every `every`-th
    round (`fedrec detector record`).

    records: list of (round, features (n, F), client ids (n,)); it sees only the round's uploads.
    """

    name = "feature_recorder"
    drops = False

    def __init__(self, sketch: FeatureSketch, every: int = 1):
        self.sketch, self.every = sketch, max(1, int(every))
        self.records: list = []

    def state_dict(self) -> dict:
        return {"records": list(self.records)}

    def load_state_dict(self, state: dict):
        self.records = list(state["records"])

    def __call__(self, updates: RoundUpdates) -> Filtered:
        if updates.server_round % self.every == 0 and len(updates):
            self.records.append((updates.server_round, upload_features(updates, self.sketch),
                                 [u.client for u in updates.uploads]))
        return Filtered(updates)


class DetectorFilter(PreAggregationStep):
    """Drops the uploads the classifier scores >= threshold (server.filters: [detector]).
    info: detector_dropped, detector_score_mean."""

    name = "detector"

    def __init__(self, detector: dict, threshold: float = 0.5):
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"server.detector_threshold: expected a number in [0, 1], "
                              f"got {threshold!r}")
        self.detector, self.threshold = detector, float(threshold)
        self.model = detector["model"]
        self.sketch = FeatureSketch(**detector["sketch"])
        self.predictor_size = detector.get("predictor_size")

    def check_model(self, n_items: int, dim: int, predictor_shapes) -> None:
        """ConfigError unless the detector was trained on this model's shapes."""
        size = int(sum(np.prod(s) for s in predictor_shapes))
        want = (self.sketch.n_items, self.sketch.dim, self.predictor_size)
        if (n_items, dim) != want[:2] or (want[2] is not None and size != want[2]):
            raise ConfigError(
                f"server.detector_path: the detector was trained on {want[0]} items x {want[1]} "
                f"(predictor {want[2]}), this experiment has {n_items} x {dim} (predictor {size})")

    def scores(self, updates: RoundUpdates) -> np.ndarray:
        """P(malicious) of every upload."""
        return self.model.predict_proba(upload_features(updates, self.sketch))[:, 1]

    def __call__(self, updates: RoundUpdates) -> Filtered:
        score = self.scores(updates) if len(updates) else np.zeros(0)
        dropped = np.flatnonzero(score >= self.threshold)
        info = {"detector_dropped": len(dropped),
                "detector_score_mean": float(score.mean()) if len(score) else 0.0}
        return drop_uploads(updates, dropped, info)
