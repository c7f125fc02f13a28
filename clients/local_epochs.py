"""train.local_epochs = E >= 1: E epochs of local SGD on the device; the upload is the
pseudo-gradient (global - local) / local_lr, so the server treats it like a FedSGD gradient."""

from __future__ import annotations

import numpy as np


def local_epochs(model, train_cfg, item_table, predictor, state, pos, neg, rng, rnd):
    """-> (item ids, pseudo-gradient rows, predictor pseudo-gradients, mean loss, samples).
    The private user row (state["user"], absent for sequential models) is trained in place."""
    t = train_cfg
    lr = t.local_lr
    table = item_table.copy()
    pred = [p.copy() for p in predictor]
    u = state.get("user")  # None for sequential models
    seq = model.sequential
    losses, touched = [], []
    n_samples = len(pos)
    for _ in range(t.local_epochs):
        if seq:  # one history, one example: an epoch is one step on all of it
            batches = [slice(None)]
        else:
            order = rng.permutation(len(pos))
            batches = [order[start : start + t.batch_size] for start in range(0, len(pos), t.batch_size)]
        for b in batches:
            g = model.gradients(table, pred, u, pos[b], neg if seq else neg[b], rng,
                                weight_decay=t.weight_decay,
                                weight_decay_all=t.weight_decay_scope == "all")
            table[g.item_ids] -= lr * g.item_rows
            for p, gp in zip(pred, g.predictor):
                p -= lr * gp
            if u is not None:
                u -= lr * g.user_grad
            losses.append(g.loss)
            touched.append(g.item_ids)
            n_samples = g.n_samples if seq else n_samples
    state["clock"][0] = rnd
    state["clock"][1] += 1
    ids = np.unique(np.concatenate(touched))
    rows = (item_table[ids] - table[ids]) / lr
    pseudo = [(p0 - p1) / lr for p0, p1 in zip(predictor, pred)]
    return ids, rows.astype(np.float32), pseudo, float(np.mean(losses)), n_samples
