"""Full-ranking evaluation (HR@K, NDCG@K) and detection metrics against ground truth.

Every item is ranked; the user's training items (and, for test, the validation item) are
masked; a held-out item's rank is the number of other unmasked items scoring at least as
high: ties count against it (a model that scores items alike earns no hit, and an attack
earns no exposure by collapsing the scores), and a NaN score counts as higher than any.
One held-out item (leave-one-out): HR@K = [rank < K], NDCG@K = [rank < K] / log2(rank + 2)
(IDCG = 1). Several held-out items (a fixed published split kept whole, `data.fixed_test:
all`): HR@K = 1 if any of them ranks < K, NDCG@K = sum over those ranked < K of
1 / log2(rank + 2), divided by IDCG = sum_{j < min(K, n)} 1 / log2(j + 2) for n held-out items;
each is ranked among all unmasked items, the user's other held-out items included. With one
item these are the leave-one-out formulas exactly.
Scores are compared exactly (no rounding), so batch and per-user evaluation agree.
"""

from __future__ import annotations

import numpy as np

from fedrec.targets import at_least_as_high


def ranks_of_targets(scores: np.ndarray, targets: np.ndarray, mask_rows, mask_cols) -> np.ndarray:
    """Rank of each row's target among the unmasked items.

    scores: (B, N); targets: (B,) item ids; mask_rows/mask_cols: parallel index arrays of
    the (row, item) entries to exclude (the target itself is never masked).
    """
    scores = np.asarray(scores)
    rows = np.arange(len(targets))
    return at_least_as_high(scores, scores[rows, targets][:, None], mask_rows, mask_cols,
                            (rows, targets)).sum(axis=1)


def csr_gather(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Flat positions of the CSR segments [starts[b], starts[b] + lens[b]), concatenated."""
    total = int(lens.sum())
    seg_start = np.repeat(np.cumsum(lens) - lens, lens)
    return np.repeat(starts, lens) + (np.arange(total) - seg_start)


def metrics_from_ranks(ranks: np.ndarray, ks) -> dict:
    """Mean HR@K / NDCG@K over users (empty -> zeros)."""
    out = {}
    ranks = np.asarray(ranks)
    gain = 1.0 / np.log2(ranks + 2.0)
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.mean()) if len(ranks) else 0.0
        out[f"ndcg@{k}"] = float((hit * gain).mean()) if len(ranks) else 0.0
    return out


def per_user_metrics(ranks: np.ndarray, ks) -> dict:
    """Per-user 0/1 hits and gains (for federated evaluation, one user per client)."""
    gain = 1.0 / np.log2(np.asarray(ranks) + 2.0)
    out = {}
    for k in ks:
        hit = np.asarray(ranks) < k
        out[f"hr@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = hit * gain
    return out


def multi_target_metrics(scores: np.ndarray, n_targets: np.ndarray, targets: np.ndarray,
                         mask_rows, mask_cols, ks, chunk_entries: int = 1 << 24) -> dict:
    """Per-row HR@K / NDCG@K with several held-out items per row (see the module docstring).

    scores: (B, N); n_targets: (B,) held-out items per row (>= 1); targets: their ids, row by
    row; mask_rows/mask_cols: the (row, item) entries to exclude.
    """
    scores = np.asarray(scores)
    masked = np.zeros(scores.shape, bool)
    masked[mask_rows, mask_cols] = True
    owner = np.repeat(np.arange(len(n_targets)), n_targets)
    ranks = np.empty(len(targets), dtype=np.int64)
    step = max(1, chunk_entries // max(1, scores.shape[1]))
    for a in range(0, len(targets), step):
        rows, cols = owner[a:a + step], targets[a:a + step]
        higher = at_least_as_high(scores[rows], scores[rows, cols][:, None],
                                  own=(np.arange(len(rows)), cols))
        ranks[a:a + step] = (higher & ~masked[rows]).sum(axis=1)
    gain = 1.0 / np.log2(ranks + 2.0)
    out = {}
    for k in ks:
        hit = ranks < k
        ideal = np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))[np.minimum(n_targets, k) - 1]
        out[f"hr@{k}"] = (np.bincount(owner, weights=hit, minlength=len(n_targets)) > 0).astype(np.float64)
        out[f"ndcg@{k}"] = np.bincount(owner, weights=hit * gain, minlength=len(n_targets)) / ideal
    return out


def user_metrics(scores, targets_list, masked_list, ks) -> dict:
    """Per-row metrics, row b holding out `targets_list[b]` with `masked_list[b]` masked:
    the leave-one-out formulas when every row has one held-out item, else
    `multi_target_metrics`."""
    lens = np.array([len(m) for m in masked_list], dtype=np.int64)
    rows = np.repeat(np.arange(len(masked_list)), lens)
    cols = np.concatenate(masked_list).astype(np.int64) if len(masked_list) else np.zeros(0, np.int64)
    n_t = np.array([len(t) for t in targets_list], dtype=np.int64)
    if (n_t == 1).all():
        ranks = ranks_of_targets(scores, np.concatenate(targets_list).astype(np.int64), rows, cols)
        return per_user_metrics(ranks, ks)
    return multi_target_metrics(scores, n_t, np.concatenate(targets_list).astype(np.int64),
                                rows, cols, ks)


def evaluate_users(model, item_table, predictor, user_vecs, users, data, split: str, ks,
                   batch_users: int = 1024, targets=None, holds=None, mask_history=True) -> dict:
    """Full-ranking metrics for `users` (their representations in `user_vecs`, same order).
    mask_history=False ranks the held-out items among all items, the user's history included
    (eval.mask_history; ER@K keeps its masks).

    Returns the mean metrics and "per_user" ({metric: per-user array}); "ranks" too where
    every user has a single held-out item. With `targets` (item ids) and `holds` ((n_users, T)
    bool, `fedrec.targets.history_holds`), also "exposure": ER@K hit counts and denominators
    per target (`fedrec.targets.exposure`) over the same ranking and masks."""
    from fedrec.targets import exposure, target_ranks

    expo = None
    if targets is not None and len(targets):
        expo = {"users": np.zeros(len(targets), np.int64),
                **{f"er@{k}": np.zeros(len(targets), np.int64) for k in ks}}
    multi = split == "test" and data.test_indptr is not None
    target_all = data.test_item if split == "test" else data.val_item
    ranks = np.empty(len(users), dtype=np.int64)
    per_user = {f"{m}@{k}": np.empty(len(users)) for k in ks for m in ("hr", "ndcg")}
    indptr, items = data.train_indptr, data.train_items
    for start in range(0, len(users), batch_users):
        batch = users[start : start + batch_users]
        scores = model.score(user_vecs[start : start + len(batch)], item_table, predictor)
        lens = indptr[batch + 1] - indptr[batch]
        rows = np.repeat(np.arange(len(batch)), lens)
        cols = items[csr_gather(indptr[batch], lens)]
        if split == "test":
            has_val = data.val_item[batch] >= 0
            rows = np.concatenate([rows, np.flatnonzero(has_val)])
            cols = np.concatenate([cols, data.val_item[batch][has_val]])
        hr_rows, hr_cols = (rows, cols) if mask_history else (rows[:0], cols[:0])
        if expo is not None:
            tr = target_ranks(scores, targets, rows, cols)
            for key, v in exposure(tr, ~holds[batch], ks).items():
                expo[key] += v
        if multi:
            t_lens = data.test_indptr[batch + 1] - data.test_indptr[batch]
            res = multi_target_metrics(scores, t_lens, data.test_items[csr_gather(
                data.test_indptr[batch], t_lens)], hr_rows, hr_cols, ks)
        else:
            r = ranks_of_targets(scores, target_all[batch], hr_rows, hr_cols)
            ranks[start : start + len(batch)] = r
            res = per_user_metrics(r, ks)
        for key, vals in res.items():
            per_user[key][start : start + len(batch)] = vals
    out = {"per_user": per_user,
           **{key: float(v.mean()) if len(v) else 0.0 for key, v in per_user.items()}}
    if not multi:
        out["ranks"] = ranks
    if expo is not None:
        out["exposure"] = expo
    return out


def upload_kl(benign: np.ndarray, malicious: np.ndarray, bins: int = 100, eps: float = 1e-6) -> float:
    """KL(P_benign || P_malicious) between histograms of uploaded values: `bins` equal bins
    over the range of both sets together, each histogram normalised and smoothed by `eps`
    (PipAttack's Fig. 6 compares such histograms of benign and malicious gradients)."""
    lo = float(min(benign.min(), malicious.min()))
    hi = float(max(benign.max(), malicious.max()))
    if not hi > lo:
        return 0.0
    p = np.histogram(benign, bins=bins, range=(lo, hi))[0].astype(np.float64)
    q = np.histogram(malicious, bins=bins, range=(lo, hi))[0].astype(np.float64)
    p = p / p.sum() + eps
    q = q / q.sum() + eps
    p /= p.sum()
    q /= q.sum()
    return float(np.sum(p * np.log(p / q)))


def upload_values(uploads) -> np.ndarray:
    """Every value of the given decoded uploads ([item_ids, item_rows, *predictor]), the ids
    excepted, as one float32 vector."""
    parts = [np.asarray(a, np.float32).ravel() for up in uploads for a in up[1:]]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def mean_update_values(uploads, rows: np.ndarray, n_items: int) -> np.ndarray:
    """The values of the group's averaged update (PipAttack's Fig. 6 plots "the averaged
    gradients" of the benign and of the malicious updates): the mean over `uploads`
    ([item_ids, item_rows, *predictor]) of each one's dense update, an item it did not send
    counting as a zero row, read on the item rows `rows` (sorted ids) and the predictor."""
    if not uploads:
        return np.zeros(0, np.float64)
    dim = np.asarray(uploads[0][1]).shape[1]
    at = np.full(n_items, -1, np.int64)
    at[rows] = np.arange(len(rows))
    total = np.zeros((len(rows), dim), np.float64)
    ids = np.concatenate([np.asarray(up[0], np.int64) for up in uploads])
    vals = np.concatenate([np.asarray(up[1], np.float64).reshape(-1, dim) for up in uploads])
    np.add.at(total, at[ids], vals)
    pred = [np.mean([np.asarray(up[k], np.float64) for up in uploads], axis=0).ravel()
            for k in range(2, len(uploads[0]))]
    return np.concatenate([total.ravel() / len(uploads), *pred])


def mean_upload_kl(benign_uploads, malicious_uploads, n_items: int) -> float:
    """upload_kl between the values of the benign and the malicious averaged updates
    (mean_update_values) over the item rows either group sent, and the predictor."""
    if not benign_uploads or not malicious_uploads:
        return float("nan")
    rows = np.unique(np.concatenate([np.asarray(up[0], np.int64)
                                     for up in [*benign_uploads, *malicious_uploads]]))
    return upload_kl(mean_update_values(benign_uploads, rows, n_items),
                     mean_update_values(malicious_uploads, rows, n_items))


def detection_metrics(flagged, malicious) -> dict:
    """Precision / recall / F1 of a set of flagged clients against the malicious ground truth."""
    flagged, malicious = set(flagged), set(malicious)
    tp = len(flagged & malicious)
    precision = tp / len(flagged) if flagged else (1.0 if not malicious else 0.0)
    recall = tp / len(malicious) if malicious else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp,
            "flagged": len(flagged), "malicious": len(malicious)}


class DetectionTracker:
    """Scores a defense's drops against the ground truth, per round and overall.

    Evaluation code, not defense code: the defense only reports which uploads it dropped
    (`RoundResult.dropped`); the runner passes the round's users and its malicious
    users here. Per round: det_tp / det_fp / det_fn and, where defined, det_precision
    (of the dropped uploads, the malicious share), det_recall (of the malicious uploads, the
    dropped share) and det_f1. Overall: the same over every round's counts.
    """

    def __init__(self, malicious, prefix: str = "det"):
        self.malicious = {int(u) for u in malicious}
        self.prefix = prefix
        self.tp = self.fp = self.fn = 0
        self.rounds = 0
        self.stages: dict = {}  # a filter's own drops, scored apart (det_filter_*)

    def update(self, users, dropped, dropped_by=None) -> dict:
        out = {}
        for stage, ids in (dropped_by or {}).items():
            tracker = self.stages.setdefault(stage, DetectionTracker(self.malicious, f"det_{stage}"))
            out.update(tracker.update(users, ids))
        out.update(self._update(users, dropped))
        return out

    def _update(self, users, dropped) -> dict:
        present = {int(u) for u in users}
        dropped = {int(u) for u in dropped} & present
        bad = present & self.malicious
        tp, fp, fn = len(dropped & bad), len(dropped - bad), len(bad - dropped)
        self.tp, self.fp, self.fn = self.tp + tp, self.fp + fp, self.fn + fn
        self.rounds += 1
        p = self.prefix
        out = {f"{p}_tp": tp, f"{p}_fp": fp, f"{p}_fn": fn}
        out.update({f"{p}_{k}": v for k, v in _prf(tp, fp, fn).items()})
        return out

    def state_dict(self) -> dict:
        return {"counts": (self.tp, self.fp, self.fn, self.rounds),
                "stages": {k: t.state_dict() for k, t in self.stages.items()}}

    def load_state_dict(self, state: dict):
        self.tp, self.fp, self.fn, self.rounds = state["counts"]
        self.stages = {}
        for stage, sub in state["stages"].items():
            tracker = self.stages[stage] = DetectionTracker(self.malicious, f"det_{stage}")
            tracker.load_state_dict(sub)

    def summary(self) -> dict:
        out = {"tp": self.tp, "fp": self.fp, "fn": self.fn, "rounds": self.rounds,
               **_prf(self.tp, self.fp, self.fn)}
        for stage, tracker in self.stages.items():
            out[stage] = tracker.summary()
        return out


def _prf(tp: int, fp: int, fn: int) -> dict:
    out = {}
    if tp + fp:
        out["precision"] = tp / (tp + fp)
    if tp + fn:
        out["recall"] = tp / (tp + fn)
    if "precision" in out and "recall" in out:
        p, r = out["precision"], out["recall"]
        out["f1"] = 2 * p * r / (p + r) if p + r else 0.0
    return out
