"""A round's clients computed together: the in-process runner's fast path.

`fit_clients(clients, arrays, config)` returns what each client's `fit` would, in order. The
clients are grouped by class; a class's cohort draws its fresh negatives in one pass, stacks
its private user rows, computes every gradient in one model call and updates the rows
row-wise. Every step is per client (per-row numpy operations, per-client sums), so a client's
upload and private state are bit-identical alone or in any cohort (tests/test_client.py).

The work splits in two halves so a runner can overlap them with the server's aggregation:
`prepare_clients` (generators, negatives, pairs, user rows caught up to the previous round:
no global model needed, private state untouched) and `compute_clients` (on the current global
arrays). With `ahead=True`, classes whose pairs read the model (`pairs_need_model`, e.g.
FedAttack) are left `Deferred` and fitted whole by `compute_clients`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from clients import user_rows
from clients.contrastive import with_contrastive
from clients.negatives import sample_negatives_cohort
from clients.state import DictStore
from clients.streams import ROUND, Streams


@dataclass
class FitJob:
    """One client's round before its gradient: private state (a working copy's owner), the
    round's generator and training pairs; skip = too little history to train on."""

    round: int
    state: dict
    rng: np.random.Generator
    pos: np.ndarray
    neg: np.ndarray
    skip: bool


@dataclass
class PreparedCohort:
    """A class's cohort after `prepare_cohort`: its jobs and, for models with a private user
    row, the stacked rows (U, M, V) caught up to the previous round (copies)."""

    clients: list
    jobs: list
    round: int
    rows: tuple | None


@dataclass
class Deferred:
    """A cohort whose pairs read the global model: prepared and computed together later."""

    clients: list
    config: dict


@dataclass
class ClassBatch:
    """The round's clients of one class: their positions in the round and their cohort."""

    positions: list
    cohort: PreparedCohort | Deferred


def prepare_cohort(clients, arrays, config) -> PreparedCohort:
    """The model-independent half of a cohort's fit (private state untouched until
    `compute_cohort`, so it may run while the server still aggregates the previous round)."""
    c0 = clients[0]
    rnd = int(config["round"])
    rngs = [c.stream(ROUND, rnd) for c in clients]
    # fresh negatives are the first draws of the round's stream (batch_negatives): draw them
    # for the whole cohort at once, the same numbers as one by one
    fresh = [i for i, c in enumerate(clients) if c.batch_negatives and c.cfg.data.negatives == "fresh"]
    if fresh:
        negs = sample_negatives_cohort([clients[i] for i in fresh], [rngs[i] for i in fresh],
                                       [clients[i].negatives_count() for i in fresh],
                                       fresh_streams=True)  # just made by c.stream above
        for i, neg in zip(fresh, negs):
            clients[i].predraw_negatives(neg)
    jobs = [c.prepare_fit(arrays, config, rng) for c, rng in zip(clients, rngs)]
    if not c0.model.has_user_row:
        return PreparedCohort(clients, jobs, rnd, None)
    states = [j.state for j in jobs]
    U, M, V = (np.stack([s[k] for s in states]) for k in ("user", "m", "v"))
    user_rows.catch_up(c0.cfg, U, M, V, [int(s["clock"][0]) for s in states], rnd - 1)
    return PreparedCohort(clients, jobs, rnd, (U, M, V))


def compute_cohort(prep: PreparedCohort, arrays) -> list:
    """The other half, on the current global arrays: [(upload, num_examples, metrics)]."""
    clients, jobs, rnd, rows = prep.clients, prep.jobs, prep.round, prep.rows
    c0 = clients[0]
    states = [j.state for j in jobs]
    if rows is not None and c0.cfg.train.user_optimizer == "adam_sync":
        for s in states:
            s["clock"][0] = rnd - 1
    batch = [i for i, j in enumerate(jobs) if not j.skip and clients[i].cfg.train.local_epochs <= 0]
    grads = [None] * len(clients)
    if batch:
        out = c0.model.gradients_cohort(
            arrays[0], list(arrays[1:]), [None if rows is None else rows[0][i] for i in batch],
            [jobs[i].pos for i in batch], [jobs[i].neg for i in batch],
            [jobs[i].rng for i in batch], **c0.weight_decay())
        out = with_contrastive([clients[i] for i in batch],
                               [clients[i].reduced(g) for i, g in zip(batch, out)], arrays[0], rnd)
        for i, g in zip(batch, out):
            grads[i] = g
        if rows is None:
            for i in batch:
                states[i]["clock"][0] = rnd
                states[i]["clock"][1] += 1
        else:
            U, M, V = rows
            b = np.array(batch)
            Ub, Mb, Vb = U[b], M[b], V[b]
            user_rows.step(c0.cfg, [states[i] for i in batch], Ub, Mb, Vb,
                           np.stack([grads[i].user_grad for i in batch]), rnd)
            U[b], M[b], V[b] = Ub, Mb, Vb
    if rows is not None:
        for i, s in enumerate(states):
            s["user"], s["m"], s["v"] = rows[0][i].copy(), rows[1][i].copy(), rows[2][i].copy()
    return [c.finish_fit(j, g, arrays) for c, j, g in zip(clients, jobs, grads)]


def fit_cohort(clients, arrays, config) -> list:
    """fit() for several clients of one class at once (a client's `fit` is a cohort of one)."""
    if not clients:
        return []
    return compute_cohort(prepare_cohort(clients, arrays, config), arrays)


def prepare_clients(clients, arrays, config, ahead: bool = False) -> list:
    """The round's clients grouped by class, each class's cohort prepared ([ClassBatch])."""
    batches = []
    for cls in dict.fromkeys(type(c) for c in clients):
        positions = [i for i, c in enumerate(clients) if type(c) is cls]
        cohort = [clients[i] for i in positions]
        if ahead and cls.pairs_need_model:
            batches.append(ClassBatch(positions, Deferred(cohort, dict(config))))
        else:
            batches.append(ClassBatch(positions, prepare_cohort(cohort, arrays, config)))
    return batches


def compute_clients(batches, arrays) -> list:
    """[(upload, num_examples, metrics)] of `prepare_clients`' clients, in their order."""
    results = [None] * sum(len(b.positions) for b in batches)
    for b in batches:
        if isinstance(b.cohort, Deferred):
            outs = fit_cohort(b.cohort.clients, arrays, b.cohort.config)
        else:
            outs = compute_cohort(b.cohort, arrays)
        for i, out in zip(b.positions, outs):
            results[i] = out
    return results


def fit_clients(clients, arrays, config) -> list:
    """fit() for a round's clients of any classes, in their order."""
    return compute_clients(prepare_clients(clients, arrays, config), arrays)


def detached(client):
    """A twin of the device that reads its private state and writes only its own copy: a
    copy of the state in a store of its own, and its own random streams (a `Streams` object
    reuses one bit generator per purpose, which a job the device has prepared may hold)."""
    twin = copy.copy(client)
    twin.store = DictStore()
    twin.store.save(copy.deepcopy(client.store.load()))
    twin.stream = Streams(client.stream.seed, client.stream.user)
    twin._predrawn = None
    return twin


def honest_fits(clients, arrays, rnd: int) -> list:
    """[(upload, num_examples, metrics)]: what each client would upload if sampled in round
    `rnd` (before any adversary crafting), computed as one cohort call on twins (`detached`):
    the clients' private state, streams and later uploads are untouched. For clients not
    sampled in `rnd` (their round stream is otherwise unused in it)."""
    return fit_clients([detached(c) for c in clients], arrays, {"round": int(rnd)})


def user_vectors(clients, at_round: int, split: str, arrays, states=None) -> np.ndarray:
    """The clients' user representations as of the end of `at_round` (copies; private state
    untouched), the same numbers as one by one.

    MF/NCF: the private rows (the same for both splits), adam_sync's skipped-round steps
    applied. Sequential models: the global encoder (`arrays` = [item_table, *encoder]) over
    each device's history before `split`'s held-out item. states: the clients' private states
    when the caller holds them (a fit in progress), else each client's saved one."""
    c0 = clients[0]
    if not c0.model.has_user_row:
        return c0.model.user_vectors_from_history(arrays[0], list(arrays[1:]),
                                                  [c.history(split) for c in clients])
    states = [c.private_state() for c in clients] if states is None else states
    U = np.stack([s["user"] for s in states]).astype(np.float32)
    if len(states):
        user_rows.catch_up(c0.cfg, U, np.stack([s["m"] for s in states]),
                           np.stack([s["v"] for s in states]),
                           [int(s["clock"][0]) for s in states], at_round)
    return U
