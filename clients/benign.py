"""The honest client: private user state in, sparse upload out.

What stays on the device: the user representation and its optimizer state, the user's
interactions (training and held-out items), its negatives, and (for subclasses) whether it
is malicious. What leaves it: `fedrec.protocol`'s upload (touched item ids and rows, the
predictor gradient) and, in `evaluate`, its own HR/NDCG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from flwr.client import NumPyClient

from fedrec.evaluation import per_user_metrics, ranks_of_targets
from fedrec.optim import adam_catch_up, adam_step
from fedrec.protocol import encode_upload

# purposes in the per-client seed sequence [seed, user, purpose, round]
_INIT, _STATIC_NEG, _ROUND, _CONTRASTIVE = 1, 2, 3, 4


class DictStore:
    """Private state held in process memory (the in-process runner)."""

    def __init__(self):
        self.state: dict = {}

    def load(self) -> dict:
        return self.state

    def save(self, state: dict):
        self.state = state


class FlowerStore:
    """Private state in Flower's `context.state`: per node and run, never sent anywhere."""

    KEY = "fedrec_user"

    def __init__(self, context):
        self.context = context

    def load(self) -> dict:
        rec = self.context.state.array_records.get(self.KEY)
        return {} if rec is None else {k: rec[k].numpy() for k in rec.keys()}

    def save(self, state: dict):
        from flwr.app import Array, ArrayRecord

        self.context.state.array_records[self.KEY] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


@dataclass
class ClientEnv:
    """Read-only things every client of an experiment shares: config, model, data."""

    cfg: object  # ExperimentConfig
    model: object  # RecModel
    data: object  # PreparedData


def _first_draw(count: int, n_items: int, n_excluded: int) -> int:
    return max(16, int(count * n_items / (n_items - n_excluded) * 1.2) + 8)


def sample_negatives(rng, n_items: int, exclude_sorted: np.ndarray, count: int,
                     exclude_mask: np.ndarray | None = None, start=None) -> np.ndarray:
    """`count` uniform items not in `exclude_sorted` (with replacement), by vectorised rejection.

    exclude_mask (optional, bool over items) is the same set as a lookup table: faster, same
    result (the accept/reject decisions and so the random stream are identical).
    """
    free = n_items - len(exclude_sorted)
    if free <= 0:
        raise ValueError("the user has interacted with every item: no negatives exist")
    out = start
    while out is None or len(out) < count:
        need = count - (0 if out is None else len(out))
        cand = rng.integers(0, n_items, size=_first_draw(need, n_items, len(exclude_sorted)))
        if exclude_mask is not None:
            ok = ~exclude_mask[cand]
        elif len(exclude_sorted):
            pos = np.searchsorted(exclude_sorted, cand)
            pos[pos == len(exclude_sorted)] = 0
            ok = exclude_sorted[pos] != cand
        else:
            ok = np.ones(len(cand), bool)
        out = cand[ok] if out is None else np.concatenate([out, cand[ok]])
    return out[:count]


def sample_negatives_cohort(clients, rngs, counts) -> list:
    """sample_negatives for several clients at once: the same draws from each client's own
    generator, the accept/reject lookups done in one pass. Identical results."""
    n_items = clients[0].model.n_items
    excl = [len(c.known_sorted) for c in clients]
    draws = [_first_draw(n, n_items, e) for n, e in zip(counts, excl)]
    cand = np.concatenate([r.integers(0, n_items, size=d) for r, d in zip(rngs, draws)])
    owner = np.repeat(np.arange(len(clients)), draws)
    masks = np.stack([c._exclusion_mask() for c in clients])
    acc = np.flatnonzero(~masks[owner, cand])
    acc_owner = owner[acc]
    got = np.bincount(acc_owner, minlength=len(clients))
    first = np.cumsum(got) - got
    rank = np.arange(len(acc)) - first[acc_owner]
    counts = np.asarray(counts)
    taken = cand[acc[rank < counts[acc_owner]]]
    bounds = np.concatenate([[0], np.cumsum(np.minimum(got, counts))])
    out = []
    for i, c in enumerate(clients):
        neg = taken[bounds[i] : bounds[i + 1]]
        if len(neg) < counts[i]:  # rare: continue this client's own stream, as one by one
            neg = sample_negatives(rngs[i], n_items, c.known_sorted, int(counts[i]),
                                   c._exclusion_mask(), start=neg)
        out.append(neg)
    return out


class BenignClient(NumPyClient):
    """An honest user's device.

    fit(): FedSGD by default, the gradient of the mean BPR loss over the user's training
    pairs at the global model (the reference protocol); with train.local_epochs = E >= 1,
    E epochs of local SGD and the pseudo-gradient (global - local) / local_lr. The user row is
    updated on the device: `adam_sync` replays the reference's server-side Adam on that row.
    """

    is_malicious = False

    def __init__(self, user: int, env: ClientEnv, store):
        self.user = int(user)
        self.env = env
        self.cfg = env.cfg
        self.model = env.model
        self.data = env.data
        self.store = store
        self.train_items = self.data.train_of(self.user)
        # Negatives are items the user never interacted with: its held-out validation and test
        # items are interactions on the device too, so they are excluded as well.
        held = [i for i in (self.data.val_item[self.user], self.data.test_item[self.user]) if i >= 0]
        self.known_sorted = np.unique(np.concatenate([self.train_items, np.array(held, np.int64)])) \
            if self.cfg.data.negatives_exclude == "all" else np.sort(self.train_items)
        self._known_mask = None  # built on first use (a lookup table over items)
        self._rng_bases: dict = {}
        self._predrawn = None

    # --- private state --------------------------------------------------------------------
    def _rng(self, purpose: int, rnd: int = 0) -> np.random.Generator:
        """The generator for (seed, user, purpose, round), independent of execution order.

        Each (seed, user, purpose) seeds a PCG64 once; round r uses that stream advanced by
        r * 2**70 draws (PCG64's period is 2**128, and a round draws far fewer than 2**70
        numbers, so rounds never overlap). Re-seeding per round through SeedSequence gives the
        same independence but costs ~6x more, and the in-process runner does it 50x a round.
        """
        base = self._rng_bases.get(purpose)
        if base is None:
            bg = np.random.PCG64(np.random.SeedSequence([self.cfg.seed, self.user, purpose]))
            base = self._rng_bases[purpose] = (bg, bg.state)
        bg, state = base
        bg.state = state
        bg.advance(int(rnd) << 70)
        return np.random.Generator(bg)

    def _state(self) -> dict:
        state = self.store.load()
        if not state:
            rng = self._rng(_INIT)
            u = self.model.init_user(rng)
            state = {"user": u, "m": np.zeros_like(u), "v": np.zeros_like(u),
                     "clock": np.zeros(2, dtype=np.int64)}  # [last round applied, own steps]
            if self.cfg.data.negatives == "static":
                state["negatives"] = self._draw_negatives(self._rng(_STATIC_NEG))
        return state

    def _exclusion_mask(self) -> np.ndarray:
        """The items negatives must avoid, as a lookup table (built once per client object)."""
        if self._known_mask is None:
            self._known_mask = np.zeros(self.model.n_items, dtype=bool)
            self._known_mask[self.known_sorted] = True
        return self._known_mask

    def _n_negatives(self) -> int:
        return len(self.train_items) * self.cfg.data.neg_ratio

    def _draw_negatives(self, rng) -> np.ndarray:
        if self._predrawn is not None:  # drawn for the whole cohort by fit_cohort, same stream
            neg, self._predrawn = self._predrawn, None
            return neg
        return sample_negatives(rng, self.model.n_items, self.known_sorted, self._n_negatives(),
                                self._exclusion_mask())

    def _user_hparams(self):
        s = self.cfg.server
        lr = self.cfg.train.user_lr if self.cfg.train.user_lr >= 0 else s.lr
        return lr, float(s.betas[0]), float(s.betas[1]), float(s.eps)

    def user_vector(self, state: dict, at_round: int) -> np.ndarray:
        """The user representation as of the end of `at_round` (a copy; state untouched)."""
        return type(self).user_vectors([self], [state], at_round)[0]

    @classmethod
    def user_vectors(cls, clients, states, at_round: int) -> np.ndarray:
        """user_vector for many clients at once (same numbers as one by one)."""
        U = np.stack([s["user"] for s in states]).astype(np.float32)
        c0 = clients[0]
        if c0.cfg.train.user_optimizer == "adam_sync" and len(states):
            lr, b1, b2, eps = c0._user_hparams()
            adam_catch_up(U, np.stack([s["m"] for s in states]), np.stack([s["v"] for s in states]),
                          [int(s["clock"][0]) for s in states], [at_round] * len(states),
                          lr, b1, b2, eps)
        return U

    # --- training pairs (subclasses change the data, e.g. LabelFlip, FedAttack) ----------
    def training_pairs(self, state: dict, rng) -> tuple[np.ndarray, np.ndarray]:
        """(positives, negatives) of this round; attacks that poison data override this."""
        q = self.cfg.data.neg_ratio
        pos = np.repeat(self.train_items, q) if q > 1 else self.train_items
        neg = state["negatives"] if "negatives" in state else self._draw_negatives(rng)
        return pos, neg

    # --- Flower API -------------------------------------------------------------------------
    def get_parameters(self, config):
        return []  # the global model lives on the server; nothing private is ever returned

    def fit(self, parameters, config):
        return type(self).fit_cohort([self], parameters, config)[0]

    @classmethod
    def fit_cohort(cls, clients, parameters, config) -> list:
        """fit() for several clients of one class: the in-process runner's fast path.

        Single-client fit() is this with a cohort of one, and every step is per client
        (per-row numpy operations, per-client sums), so a client's upload and private state
        are bit-identical whichever way it runs.
        """
        if not clients:
            return []
        return cls.compute_cohort(cls.prepare_cohort(clients, parameters, config), parameters)

    @classmethod
    def prepare_cohort(cls, clients, parameters, config) -> dict:
        """The part of fit_cohort that does not read the global model: generators, negatives,
        pairs, and the user rows caught up to the previous round (on copies: the private state
        is untouched until compute_cohort, so it may run later, e.g. while the server is still
        aggregating the previous round)."""
        c0 = clients[0]
        rnd = int(config["round"])
        rngs = [c._rng(_ROUND, rnd) for c in clients]
        # fresh negatives are the first draws of the round's stream in the default
        # training_pairs: draw them for the whole cohort at once (subclasses that change
        # training_pairs draw their own, one by one)
        fresh = [i for i, c in enumerate(clients) if c.cfg.data.negatives == "fresh"
                 and type(c).training_pairs is BenignClient.training_pairs]
        if fresh:
            negs = sample_negatives_cohort([clients[i] for i in fresh], [rngs[i] for i in fresh],
                                           [clients[i]._n_negatives() for i in fresh])
            for i, neg in zip(fresh, negs):
                clients[i]._predrawn = neg
        jobs = [c.prepare_fit(parameters, config, rng) for c, rng in zip(clients, rngs)]
        states = [j["state"] for j in jobs]
        # the cohort's private rows, stacked once (each row is only ever touched row-wise)
        U, M, V = (np.stack([s[k] for s in states]) for k in ("user", "m", "v"))
        if c0.cfg.train.user_optimizer == "adam_sync":
            # the momentum-only steps of the rounds this user sat out
            lr, b1, b2, eps = c0._user_hparams()
            adam_catch_up(U, M, V, [int(s["clock"][0]) for s in states], [rnd - 1] * len(states),
                          lr, b1, b2, eps)
        return {"clients": clients, "jobs": jobs, "round": rnd, "rows": (U, M, V)}

    @classmethod
    def compute_cohort(cls, prep: dict, parameters) -> list:
        """The rest of fit_cohort, on the current global arrays `parameters`."""
        clients, jobs, rnd = prep["clients"], prep["jobs"], prep["round"]
        U, M, V = prep["rows"]
        c0 = clients[0]
        states = [j["state"] for j in jobs]
        for j in jobs:
            j["item_table"], j["predictor"] = parameters[0], list(parameters[1:])
        if c0.cfg.train.user_optimizer == "adam_sync":
            for s in states:
                s["clock"][0] = rnd - 1
        batch = [i for i, j in enumerate(jobs)
                 if not j["skip"] and clients[i].cfg.train.local_epochs <= 0]
        grads = [None] * len(clients)
        if batch:
            out = c0.model.gradients_cohort(
                parameters[0], list(parameters[1:]),
                [U[i] for i in batch], [jobs[i]["pos"] for i in batch],
                [jobs[i]["neg"] for i in batch], [jobs[i]["rng"] for i in batch], **c0._wd())
            for i, g in zip(batch, out):
                grads[i] = clients[i]._with_contrastive(clients[i]._reduced(g), parameters[0], rnd)
            b = np.array(batch)
            Ub, Mb, Vb = U[b], M[b], V[b]
            c0._update_users([states[i] for i in batch], Ub, Mb, Vb,
                             np.stack([grads[i].user_grad for i in batch]), rnd)
            U[b], M[b], V[b] = Ub, Mb, Vb
        for i, s in enumerate(states):
            s["user"], s["m"], s["v"] = U[i].copy(), M[i].copy(), V[i].copy()
        return [c.finish_fit(j, g) for c, j, g in zip(clients, jobs, grads)]

    def _reduced(self, grad):
        """train.loss_reduction: "mean" keeps the gradient of the mean loss over the pairs;
        "sum" scales it to the summed loss (FedRecAttack/Spattack's clients), user row included."""
        if self.cfg.train.loss_reduction != "sum":
            return grad
        n = np.float32(grad.n_samples)
        return replace(grad, item_rows=grad.item_rows * n, user_grad=grad.user_grad * n,
                       predictor=[p * n for p in grad.predictor])

    def _with_contrastive(self, grad, item_table, rnd: int):
        """UNION's client side (train.contrastive_alpha > 0): adds alpha times the gradient of
        the contrastive loss on the user's positives (fedrec.models.losses) to the item rows,
        from the client's own stream for it, so the recommendation gradient is unchanged."""
        alpha = self.cfg.train.contrastive_alpha
        if alpha <= 0 or not len(self.train_items):
            return grad
        from fedrec.models.losses import contrastive_grad, contrastive_samples

        rng = self._rng(_CONTRASTIVE, rnd)
        samples = contrastive_samples(self.train_items, self.model.n_items, self._exclusion_mask(),
                                      self.cfg.train.contrastive_negatives, rng)
        cl_ids, cl_rows, cl_loss = contrastive_grad(item_table, *samples)
        ids = np.union1d(grad.item_ids, cl_ids)
        rows = np.zeros((len(ids), grad.item_rows.shape[1]), np.float32)
        rows[np.searchsorted(ids, grad.item_ids)] += grad.item_rows
        rows[np.searchsorted(ids, cl_ids)] += np.float32(alpha) * cl_rows
        return replace(grad, item_ids=ids, item_rows=rows, loss=grad.loss + alpha * cl_loss)

    def _wd(self) -> dict:
        t = self.cfg.train
        return {"weight_decay": t.weight_decay, "weight_decay_all": t.weight_decay_scope == "all"}

    def _update_users(self, states, U, M, V, grads: np.ndarray, rnd: int):
        """The user-row optimizer step for a cohort, in place on U, M, V (row-wise)."""
        kind = self.cfg.train.user_optimizer
        lr, b1, b2, eps = self._user_hparams()
        if kind == "adam_sync":
            adam_step(U, M, V, grads, rnd, lr, b1, b2, eps)
        elif kind == "adam":
            adam_step(U, M, V, grads, [int(s["clock"][1]) + 1 for s in states], lr, b1, b2, eps)
        else:
            U -= (lr * grads).astype(U.dtype)
        for s in states:
            s["clock"][0] = rnd
            s["clock"][1] += 1

    def prepare_fit(self, parameters, config, rng=None) -> dict:
        """Per client, before the gradient: private state and this round's pairs."""
        rnd = int(config["round"])
        state = self._state()
        rng = rng if rng is not None else self._rng(_ROUND, rnd)
        pos, neg = self.training_pairs(state, rng)
        return {"round": rnd, "state": state, "rng": rng, "pos": pos, "neg": neg,
                "item_table": parameters[0], "predictor": list(parameters[1:]),
                "skip": len(pos) == 0}

    def finish_fit(self, job, grad):
        """Per client, after the gradient: the upload, and saving private state."""
        state, rnd = job["state"], job["round"]
        if job["skip"]:
            self.store.save(state)
            return encode_upload(np.zeros(0, np.int64), np.zeros((0, self.model.dim), np.float32),
                                 [np.zeros(s, np.float32) for s in self.model.predictor_shapes]), 0, {}
        if grad is None:  # local epochs
            ids, rows, pred, loss, n = self._local_epochs(
                job["item_table"], job["predictor"], state, job["pos"], job["neg"], job["rng"], rnd)
        else:
            ids, rows, pred, loss, n = (grad.item_ids, grad.item_rows, grad.predictor, grad.loss,
                                        grad.n_samples)
        upload = self.craft_upload(ids, rows, pred, state, rnd)
        self.store.save(state)
        return encode_upload(*upload), int(n), {"loss": float(loss)}

    def craft_upload(self, ids, rows, predictor, state, rnd):
        """Hook for malicious subclasses: what is actually sent. Honest: the true gradient."""
        return ids, rows, predictor

    def _local_epochs(self, item_table, predictor, state, pos, neg, rng, rnd):
        t = self.cfg.train
        lr = t.local_lr
        table = item_table.copy()
        pred = [p.copy() for p in predictor]
        u = state["user"]
        losses, touched = [], []
        for _ in range(t.local_epochs):
            order = rng.permutation(len(pos))
            for start in range(0, len(pos), t.batch_size):
                b = order[start : start + t.batch_size]
                g = self.model.gradients(table, pred, u, pos[b], neg[b], rng,
                                         weight_decay=t.weight_decay,
                                         weight_decay_all=t.weight_decay_scope == "all")
                table[g.item_ids] -= lr * g.item_rows
                for p, gp in zip(pred, g.predictor):
                    p -= lr * gp
                u -= lr * g.user_grad
                losses.append(g.loss)
                touched.append(g.item_ids)
        state["clock"][0] = rnd
        state["clock"][1] += 1
        ids = np.unique(np.concatenate(touched))
        rows = (item_table[ids] - table[ids]) / lr
        pseudo = [(p0 - p1) / lr for p0, p1 in zip(predictor, pred)]
        return ids, rows.astype(np.float32), pseudo, float(np.mean(losses)), len(pos)

    def evaluate(self, parameters, config):
        """This user's own full-ranking HR/NDCG on validation and test (0 examples if none)."""
        rnd = int(config.get("round", 0))
        data = self.data
        if data.pool_mask[self.user] or self.is_malicious:
            return 0.0, 0, {}
        item_table, predictor = parameters[0], list(parameters[1:])
        u = self.user_vector(self._state(), rnd)
        scores = self.model.score(u[None, :], item_table, predictor)
        ks = list(self.cfg.eval.ks)
        metrics = {}
        for split, target in (("val", data.val_item[self.user]), ("test", data.test_item[self.user])):
            if target < 0:
                continue
            masked = self.train_items
            if split == "test" and data.val_item[self.user] >= 0:
                masked = np.append(masked, data.val_item[self.user])
            rank = ranks_of_targets(scores, np.array([target]), np.zeros(len(masked), np.int64), masked)
            for key, vals in per_user_metrics(rank, ks).items():
                metrics[f"{split}_{key}"] = float(vals[0])
        if not metrics:
            return 0.0, 0, {}
        return 0.0, 1, metrics


def fsum_mean(values) -> float:
    """Order-independent mean, so federated and in-process results agree bit for bit."""
    values = list(values)
    return math.fsum(values) / len(values) if values else 0.0
