"""The honest client: private user state in, sparse upload out.

What stays on the device: the user representation (MF/NCF: a private row and its optimizer
state; SASRec/BERT4Rec: computed from the history whenever needed, never stored or sent), the
user's interactions (training and held-out items), its negatives, and (for subclasses) whether
it is malicious. What leaves it: `fedrec.protocol`'s upload (touched item ids and rows, the
predictor gradient) and, in `evaluate`, its own HR/NDCG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from flwr.client import NumPyClient

from clients.negatives import sample_negatives, sample_negatives_cohort  # noqa: F401 (re-exported)
from fedrec.evaluation import user_metrics
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
        held = [np.array([i for i in (self.data.val_item[self.user], self.data.test_item[self.user])
                          if i >= 0], np.int64), self.data.test_of(self.user)]
        self.known_sorted = np.unique(np.concatenate([self.train_items, *held])) \
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
            state = {}
            if self.model.has_user_row:  # sequential models have none: the history is the user
                u = self.model.init_user(self._rng(_INIT))
                state = {"user": u, "m": np.zeros_like(u), "v": np.zeros_like(u)}
            state["clock"] = np.zeros(2, dtype=np.int64)  # [last round applied, own steps]
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
        return self.model.negatives_needed(len(self.train_items), self.cfg.data.neg_ratio)

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

    def history(self, split: str) -> np.ndarray:
        """What the device has seen before `split`'s held-out item, oldest first: the training
        items, plus the validation item before the test item."""
        val = self.data.val_item[self.user]
        return np.append(self.train_items, val) if split == "test" and val >= 0 else self.train_items

    def user_vector(self, state: dict, at_round: int, split: str = "test", arrays=None) -> np.ndarray:
        """The user representation as of the end of `at_round` (a copy; state untouched)."""
        return type(self).user_vectors([self], [state], at_round, split, arrays)[0]

    @classmethod
    def user_vectors(cls, clients, states, at_round: int, split: str = "test",
                     arrays=None) -> np.ndarray:
        """user_vector for many clients at once (same numbers as one by one).

        MF/NCF: the private rows (the same for both splits; `arrays` unused). Sequential models:
        the global encoder (`arrays` = [item_table, *encoder]) over each device's history
        before `split`'s held-out item."""
        c0 = clients[0]
        if not c0.model.has_user_row:
            return c0.model.user_vectors_from_history(
                arrays[0], list(arrays[1:]), [c.history(split) for c in clients])
        U = np.stack([s["user"] for s in states]).astype(np.float32)
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
        if self.model.sequential:  # the history itself, in order: the model makes the targets
            pos = self.train_items
        else:
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
        if not c0.model.has_user_row:
            return {"clients": clients, "jobs": jobs, "round": rnd, "rows": None}
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
        rows = prep["rows"]  # None: no private user rows (sequential models)
        c0 = clients[0]
        states = [j["state"] for j in jobs]
        for j in jobs:
            j["item_table"], j["predictor"] = parameters[0], list(parameters[1:])
        if rows is not None and c0.cfg.train.user_optimizer == "adam_sync":
            for s in states:
                s["clock"][0] = rnd - 1
        batch = [i for i, j in enumerate(jobs)
                 if not j["skip"] and clients[i].cfg.train.local_epochs <= 0]
        grads = [None] * len(clients)
        if batch:
            out = c0.model.gradients_cohort(
                parameters[0], list(parameters[1:]),
                [None if rows is None else rows[0][i] for i in batch], [jobs[i]["pos"] for i in batch],
                [jobs[i]["neg"] for i in batch], [jobs[i]["rng"] for i in batch], **c0._wd())
            for i, g in zip(batch, out):
                grads[i] = clients[i]._with_contrastive(clients[i]._reduced(g), parameters[0], rnd)
            if rows is None:
                for i in batch:
                    states[i]["clock"][0] = rnd
                    states[i]["clock"][1] += 1
            else:
                U, M, V = rows
                b = np.array(batch)
                Ub, Mb, Vb = U[b], M[b], V[b]
                c0._update_users([states[i] for i in batch], Ub, Mb, Vb,
                                 np.stack([grads[i].user_grad for i in batch]), rnd)
                U[b], M[b], V[b] = Ub, Mb, Vb
        if rows is not None:
            for i, s in enumerate(states):
                s["user"], s["m"], s["v"] = rows[0][i].copy(), rows[1][i].copy(), rows[2][i].copy()
        return [c.finish_fit(j, g) for c, j, g in zip(clients, jobs, grads)]

    def _reduced(self, grad):
        """train.loss_reduction: "mean" keeps the gradient of the mean loss over the pairs;
        "sum" scales it to the summed loss (FedRecAttack/Spattack's clients), user row included."""
        if self.cfg.train.loss_reduction != "sum":
            return grad
        n = np.float32(grad.n_samples)
        user = None if grad.user_grad is None else grad.user_grad * n
        return replace(grad, item_rows=grad.item_rows * n, user_grad=user,
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
                "skip": len(pos) < self.model.min_history}

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
        u = state.get("user")  # None for sequential models
        seq = self.model.sequential
        losses, touched = [], []
        n_samples = len(pos)
        for _ in range(t.local_epochs):
            if seq:  # one history, one example: an epoch is one step on all of it
                batches = [slice(None)]
            else:
                order = rng.permutation(len(pos))
                batches = [order[start : start + t.batch_size]
                           for start in range(0, len(pos), t.batch_size)]
            for b in batches:
                g = self.model.gradients(table, pred, u, pos[b], neg if seq else neg[b], rng,
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

    def evaluate(self, parameters, config):
        """This user's own full-ranking HR/NDCG on validation and test (0 examples if none)."""
        rnd = int(config.get("round", 0))
        data = self.data
        if data.pool_mask[self.user] or self.is_malicious:
            return 0.0, 0, {}
        item_table, predictor = parameters[0], list(parameters[1:])
        state = self._state()
        ks = list(self.cfg.eval.ks)
        metrics = {}
        scores = None
        for split, targets in (("val", data.val_item[self.user : self.user + 1]),
                               ("test", data.test_of(self.user))):
            if not len(targets) or targets[0] < 0:
                continue
            if scores is None or self.model.sequential:  # a sequence model's user differs per split
                u = self.user_vector(state, rnd, split, parameters)
                scores = self.model.score(u[None, :], item_table, predictor)
            masked = self.train_items
            if split == "test" and data.val_item[self.user] >= 0:
                masked = np.append(masked, data.val_item[self.user])
            for key, vals in user_metrics(scores, [targets], [masked], ks).items():
                metrics[f"{split}_{key}"] = float(vals[0])
        if not metrics:
            return 0.0, 0, {}
        return 0.0, 1, metrics


def fsum_mean(values) -> float:
    """Order-independent mean, so federated and in-process results agree bit for bit."""
    values = list(values)
    return math.fsum(values) / len(values) if values else 0.0
