"""Scoring a reconstruction against the ground truth (evaluation only; the attack never
reads it)."""

from __future__ import annotations

import numpy as np


def auc(scores, labels) -> float:
    """Area under the ROC curve (ties count half); nan when one class is absent."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s))
    # average ranks over ties (1-based)
    uniq, start, counts = np.unique(s, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def prf(predicted, labels) -> tuple:
    predicted, labels = np.asarray(predicted, bool), np.asarray(labels, bool)
    tp = float((predicted & labels).sum())
    p = tp / predicted.sum() if predicted.sum() else 0.0
    r = tp / labels.sum() if labels.sum() else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def top_n(scores, n: int) -> np.ndarray:
    """The n highest scores as a boolean mask (stable: ties broken by position)."""
    out = np.zeros(len(scores), bool)
    out[np.argsort(-np.asarray(scores, np.float64), kind="mergesort")[:int(n)]] = True
    return out


def cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else 0.0


def score(candidates, scores, true_positives, user_hat=None, user_true=None,
          threshold: float = 0.0) -> dict:
    """precision/recall/F1 at top-|P| (|P| = n/q is public) and at `threshold` (on logits:
    0 = probability 0.5), AUC, and the user-row cosine when both rows are given."""
    labels = np.isin(candidates, true_positives)
    n = int(labels.sum())
    p, r, f = prf(top_n(scores, n), labels)
    p5, r5, f5 = prf(np.asarray(scores) > threshold, labels)
    out = {"precision": p, "recall": r, "f1": f, "precision@0.5": p5, "recall@0.5": r5,
           "f1@0.5": f5, "auc": auc(scores, labels), "base_rate": n / max(len(labels), 1)}
    # up to one global sign (MF's symmetry: labels flipped with u -> -u fit as well)
    out["f1_signfree"] = max(f, prf(top_n(-np.asarray(scores, np.float64), n), labels)[2])
    out["auc_signfree"] = max(out["auc"], 1 - out["auc"])
    if user_hat is not None and user_true is not None:
        out["user_cos"] = cosine(user_hat, user_true)
        out["user_cos_abs"] = abs(out["user_cos"])
    return out
