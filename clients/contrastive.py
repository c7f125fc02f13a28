"""UNION's client side (train.contrastive_alpha > 0) for a cohort of clients at once.

Each client adds alpha times the gradient of the contrastive loss on its own positives
(fedrec.models.losses) to its item rows, drawn from its own stream for it, so the
recommendation gradient is unchanged. The samples are drawn per client (each from its own
generator); the gradients of the whole cohort come out of one batched computation
(`contrastive_grads`), each client's numbers bit-identical to its own alone. With
train.contrastive_dropout p > 0 the client then draws, from the same generator, the keep-masks
of inverted dropout on the term's looked-up rows (anchor, positive, negatives), as the UNION
reference code's item embedding (dropout 0.2) does to them.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from clients.streams import CONTRASTIVE
from fedrec.models.base import dropout_keep
from fedrec.models.losses import contrastive_grads, contrastive_samples


def with_contrastive(clients, grads, item_table, rnd: int) -> list:
    """The clients' gradients (same order) with the contrastive term added. Dense gradients
    (weight_decay_scope all: every item, ids 0..n_items-1) are updated in place: the caller
    hands them over."""
    cfg = clients[0].cfg.train
    alpha = cfg.contrastive_alpha
    active = [i for i, c in enumerate(clients) if len(c.train_items)]
    if alpha <= 0 or not active:
        return grads
    n_items, dim = item_table.shape
    samples, keeps = [], []
    for i in active:
        rng = clients[i].stream(CONTRASTIVE, rnd)
        samples.append(contrastive_samples(clients[i].train_items, n_items,
                                           clients[i].exclusion_mask(), cfg.contrastive_negatives,
                                           rng))
        if cfg.contrastive_dropout > 0:  # after the samples: they stay those of no dropout
            keeps.append(dropout_keep(rng, (len(samples[-1][0]), 2 + cfg.contrastive_negatives,
                                            dim), cfg.contrastive_dropout))
    anchors, positives, negatives = (np.concatenate(part) for part in zip(*samples))
    terms = contrastive_grads(item_table, anchors, positives, negatives,
                              [len(s[0]) for s in samples],
                              np.concatenate(keeps) if keeps else None, cfg.contrastive_dropout)
    out = list(grads)
    for i, (cl_ids, cl_rows, cl_loss) in zip(active, terms):
        g = grads[i]
        ids, rows = added_rows(g.item_ids, g.item_rows, cl_ids, np.float32(alpha) * cl_rows,
                               n_items)
        out[i] = replace(g, item_ids=ids, item_rows=rows, loss=g.loss + alpha * cl_loss)
    return out


def added_rows(ids, rows, extra_ids, extra_rows, n_items: int):
    """(union of the sorted ids, rows + extra_rows on it): 0 + rows, then + extra_rows, per
    element. A dense upload (all n_items ids: 0..n_items-1, sorted and unique) already holds
    every id: its rows are summed in place (+ 0 first, as 0 + rows turns -0.0 into 0.0),
    no union, search or new table.

    Otherwise the union comes from flags over the n_items ids (no sort), and the extra rows
    (most of the union) are written, not added: (0 + extra) + rows is the same number as
    (0 + rows) + extra for every element (addition commutes, and 0 + x only turns -0.0 into
    0.0 on either side), one gather of the table less."""
    if len(ids) == n_items:
        np.add(rows, np.float32(0), out=rows)
        rows[extra_ids] += extra_rows
        return ids, rows
    flags = np.zeros(n_items, bool)
    flags[ids] = True
    flags[extra_ids] = True
    union = np.flatnonzero(flags).astype(np.result_type(ids, extra_ids), copy=False)
    position = np.cumsum(flags) - 1
    out = np.zeros((len(union), rows.shape[1]), np.float32)
    out[position[extra_ids]] = extra_rows + np.float32(0)
    out[position[ids]] += rows
    return union, out
