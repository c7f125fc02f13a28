"""Full-ranking evaluation (HR@K, NDCG@K) and detection metrics against ground truth.

Every item is ranked; the user's training items (and, for test, the validation item) are
masked; a held-out item's rank is the number of unmasked items scoring strictly higher.
HR@K = [rank < K], NDCG@K = [rank < K] / log2(rank + 2) (one held-out item, so IDCG = 1).
Scores are compared in float64 so that batch and per-user evaluation agree exactly.
"""

from __future__ import annotations

import numpy as np


def ranks_of_targets(scores: np.ndarray, targets: np.ndarray, mask_rows, mask_cols) -> np.ndarray:
    """Rank of each row's target among the unmasked items.

    scores: (B, N); targets: (B,) item ids; mask_rows/mask_cols: parallel index arrays of
    the (row, item) entries to exclude (the target itself is never masked).
    """
    scores = np.array(scores, dtype=np.float64, copy=True)
    scores[mask_rows, mask_cols] = -np.inf
    rows = np.arange(len(targets))
    target_scores = scores[rows, targets]
    # "not <=" rather than ">": a NaN item counts as higher, and a NaN target ranks last
    return (~(scores <= target_scores[:, None])).sum(axis=1)


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


def evaluate_users(model, item_table, predictor, user_vecs, users, data, split: str, ks,
                   batch_users: int = 1024) -> dict:
    """Full-ranking metrics for `users` (their representations in `user_vecs`, same order)."""
    target_all = data.test_item if split == "test" else data.val_item
    ranks = np.empty(len(users), dtype=np.int64)
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
        ranks[start : start + len(batch)] = ranks_of_targets(scores, target_all[batch], rows, cols)
    return {"ranks": ranks, **metrics_from_ranks(ranks, ks)}


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
    (`FedRecStrategy.last_dropped`); the runner passes the round's users and its malicious
    users here. Per round: det_tp / det_fp / det_fn and, where defined, det_precision
    (of the dropped uploads, the malicious share), det_recall (of the malicious uploads, the
    dropped share) and det_f1. Overall: the same over every round's counts.
    """

    def __init__(self, malicious):
        self.malicious = {int(u) for u in malicious}
        self.tp = self.fp = self.fn = 0
        self.rounds = 0

    def update(self, users, dropped) -> dict:
        present = {int(u) for u in users}
        dropped = {int(u) for u in dropped} & present
        bad = present & self.malicious
        tp, fp, fn = len(dropped & bad), len(dropped - bad), len(bad - dropped)
        self.tp, self.fp, self.fn = self.tp + tp, self.fp + fp, self.fn + fn
        self.rounds += 1
        out = {"det_tp": tp, "det_fp": fp, "det_fn": fn}
        out.update({f"det_{k}": v for k, v in _prf(tp, fp, fn).items()})
        return out

    def summary(self) -> dict:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "rounds": self.rounds,
                **_prf(self.tp, self.fp, self.fn)}


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
