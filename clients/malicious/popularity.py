"""PipAttack's popularity estimator: an MLP d -> 32 -> 16 -> 8 -> 3 (ReLU, softmax) on item
embeddings, predicting an item's popularity class (fedrec.targets.popularity_classes: top 10%,
10-45%, rest) from the public interaction counts.

Trained full-batch with Adam (lr 0.01, `EPOCHS` steps, cross-entropy) on a seeded 80% of the
items (the targets excluded), its macro-F1 measured on the other 20%; then frozen. Deterministic
for a given (item table, labels, seed): torch on the CPU, its initialisation from its own seeded
generator. The weights are plain float32 arrays (a device keeps them in its private state).
"""

from __future__ import annotations

import numpy as np
import torch

HIDDEN = (32, 16, 8)
N_CLASSES = 3
EPOCHS = 300
LR = 0.01
HELD_OUT = 0.2


def macro_f1(pred: np.ndarray, true: np.ndarray, n_classes: int = N_CLASSES) -> float:
    """The unweighted mean over classes of each class's F1 (a class absent from both: F1 0)."""
    f1s = []
    for c in range(n_classes):
        tp = float(((pred == c) & (true == c)).sum())
        fp = float(((pred == c) & (true != c)).sum())
        fn = float(((pred != c) & (true == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(f1s))


def _layers(weights: list):
    return [(torch.from_numpy(weights[2 * i]), torch.from_numpy(weights[2 * i + 1]))
            for i in range(len(weights) // 2)]


def logits(weights: list, x: torch.Tensor) -> torch.Tensor:
    """The estimator's logits for embeddings x (n, d) (differentiable in x)."""
    layers = _layers(weights)
    h = x
    for i, (w, b) in enumerate(layers):
        h = h @ w.to(h.dtype).T + b.to(h.dtype)
        if i < len(layers) - 1:
            h = torch.relu(h)
    return h


def predict(weights: list, table: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return logits(weights, torch.from_numpy(np.asarray(table, np.float32))).argmax(1).numpy()


def train_estimator(table: np.ndarray, classes: np.ndarray, exclude: np.ndarray, seed) -> tuple[list, float]:
    """(frozen weights [W1, b1, ..., W4, b4] as float32 arrays, macro-F1 on the held-out items).

    seed: a SeedSequence entropy (list of ints) for the split and the initialisation."""
    rng = np.random.default_rng(seed)
    n, d = table.shape
    items = np.setdiff1d(np.arange(n), exclude)
    perm = rng.permutation(items)
    n_test = max(1, int(round(HELD_OUT * len(items))))
    test, train = perm[:n_test], perm[n_test:]
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    widths = (d, *HIDDEN, N_CLASSES)
    params = []
    for a, b in zip(widths, widths[1:]):  # Kaiming-uniform-like, from the seeded generator
        bound = 1.0 / np.sqrt(a)
        params.append((torch.rand((b, a), generator=gen) * 2 - 1).mul_(bound).requires_grad_())
        params.append((torch.rand((b,), generator=gen) * 2 - 1).mul_(bound).requires_grad_())
    x = torch.from_numpy(np.asarray(table[train], np.float32))
    y = torch.from_numpy(classes[train].astype(np.int64))
    opt = torch.optim.Adam(params, lr=LR)
    for _ in range(EPOCHS):
        h = x
        for i in range(0, len(params), 2):
            h = h @ params[i].T + params[i + 1]
            if i < len(params) - 2:
                h = torch.relu(h)
        loss = torch.nn.functional.cross_entropy(h, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = [p.detach().numpy().astype(np.float32).copy() for p in params]
    f1 = macro_f1(predict(weights, table[test]), classes[test])
    return weights, f1
