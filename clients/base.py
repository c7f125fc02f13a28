"""FedRecClient: a user's device, the base of honest and malicious clients alike.

What stays on the device: the user representation (MF/NCF: a private row and its optimizer
state; SASRec/BERT4Rec: computed from the history whenever needed, never stored or sent), the
user's interactions (training and held-out items), its negatives, and (for subclasses) whether
it is malicious. What leaves it: `fedrec.protocol`'s upload (touched item ids and rows, the
predictor gradient) and, in `evaluate`, its own HR/NDCG.

The work is spread by job: private state stores (clients/state.py), random streams
(clients/streams.py), cohort batching (clients/cohort.py), the user-row optimizer
(clients/user_rows.py), local epochs (clients/local_epochs.py), negatives (clients/negatives.py).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from flwr.client import NumPyClient

from clients import cohort
from clients.local_epochs import local_epochs
from clients.negatives import sample_negatives
from clients.streams import INIT, ROUND, STATIC_NEGATIVES, Streams
from fedrec.evaluation import user_metrics
from fedrec.models.base import sorted_unique
from fedrec.protocol import encode_upload


class FedRecClient(NumPyClient):
    """A user's device. fit(): FedSGD by default, the gradient of the mean loss over the user's
    training pairs at the global model (the reference protocol); with train.local_epochs = E,
    E epochs of local SGD and the pseudo-gradient (global - local) / local_lr."""

    is_malicious = False
    # True when `training_pairs` draws the round's fresh negatives first from the round stream:
    # the cohort then draws them for all such clients in one pass (same numbers)
    batch_negatives = True
    # True when `training_pairs` reads the global model (e.g. FedAttack): a runner must not
    # prepare the round ahead, on the previous round's model
    pairs_need_model = False

    def __init__(self, user: int, env, store):
        self.user = int(user)
        self.env = env
        self.cfg = env.cfg
        self.model = env.model
        self.data = env.data
        self.store = store
        self.stream = Streams(self.cfg.seed, self.user)
        self.train_items = self.data.train_of(self.user)
        # Negatives are items the user never interacted with: its held-out validation and test
        # items are interactions on the device too, so they are excluded as well.
        held = [np.array([i for i in (self.data.val_item[self.user], self.data.test_item[self.user])
                          if i >= 0], np.int64), self.data.test_of(self.user)]
        self.known_sorted = sorted_unique(np.concatenate([self.train_items, *held])) \
            if self.cfg.data.negatives_exclude == "all" else np.sort(self.train_items)
        self._known_mask = None  # built on first use (a lookup table over items)
        self._predrawn = None

    # --- private state --------------------------------------------------------------------
    def private_state(self) -> dict:
        """The device's private state (created on first use; saved by `finish_fit`). Never
        sent: runners read it only to evaluate a simulation and to checkpoint it."""
        state = self.store.load()
        if not state:
            state = {}
            if self.model.has_user_row:  # sequential models have none: the history is the user
                u = self.initial_user_row()
                state = {"user": u, "m": np.zeros_like(u), "v": np.zeros_like(u)}
            state["clock"] = np.zeros(2, dtype=np.int64)  # [last round applied, own steps]
            if self.cfg.data.negatives == "static":
                state["negatives"] = self.draw_negatives(self.stream(STATIC_NEGATIVES))
        return state

    def initial_user_row(self) -> np.ndarray:
        """The user embedding as the device initialised it (redrawn from its own stream)."""
        return self.model.init_user(self.stream(INIT))

    def exclusion_mask(self) -> np.ndarray:
        """The items negatives must avoid, as a lookup table (built once per client object)."""
        if self._known_mask is None:
            self._known_mask = np.zeros(self.model.n_items, dtype=bool)
            self._known_mask[self.known_sorted] = True
        return self._known_mask

    def negatives_count(self) -> int:
        return self.model.negatives_needed(len(self.train_items), self.cfg.data.neg_ratio)

    def predraw_negatives(self, negatives: np.ndarray):
        """The next `draw_negatives` returns these (drawn for a cohort from the same stream)."""
        self._predrawn = negatives

    def draw_negatives(self, rng) -> np.ndarray:
        if self._predrawn is not None:
            neg, self._predrawn = self._predrawn, None
            return neg
        return sample_negatives(rng, self.model.n_items, self.known_sorted, self.negatives_count(),
                                self.exclusion_mask())

    def history(self, split: str) -> np.ndarray:
        """What the device has seen before `split`'s held-out item, oldest first: the training
        items, plus the validation item before the test item."""
        val = self.data.val_item[self.user]
        return np.append(self.train_items, val) if split == "test" and val >= 0 else self.train_items

    def user_vector(self, at_round: int, split: str = "test", arrays=None,
                    state: dict | None = None) -> np.ndarray:
        """The user representation as of the end of `at_round` (a copy; state untouched)."""
        return cohort.user_vectors([self], at_round, split, arrays,
                                   None if state is None else [state])[0]

    # --- training (subclasses change the data or the upload) -----------------------------
    def training_pairs(self, state: dict, rng) -> tuple[np.ndarray, np.ndarray]:
        """(positives, negatives) of this round; attacks that poison data override this."""
        q = self.cfg.data.neg_ratio
        if self.model.sequential:  # the history itself, in order: the model makes the targets
            pos = self.train_items
        else:
            pos = np.repeat(self.train_items, q) if q > 1 else self.train_items
        neg = state["negatives"] if "negatives" in state else self.draw_negatives(rng)
        return pos, neg

    def craft_upload(self, ids, rows, predictor, state, rnd):
        """What is actually sent. Honest: the true gradient."""
        return ids, rows, predictor

    def prepare_fit(self, arrays, config, rng=None) -> cohort.FitJob:
        """Per client, before the gradient: private state and this round's pairs."""
        rnd = int(config["round"])
        state = self.private_state()
        rng = rng if rng is not None else self.stream(ROUND, rnd)
        pos, neg = self.training_pairs(state, rng)
        return cohort.FitJob(rnd, state, rng, pos, neg, skip=len(pos) < self.model.min_history)

    def finish_fit(self, job: cohort.FitJob, grad, arrays):
        """Per client, after the gradient: the upload, and saving private state."""
        state, rnd = job.state, job.round
        if job.skip:
            self.store.save(state)
            return encode_upload(np.zeros(0, np.int64), np.zeros((0, self.model.dim), np.float32),
                                 [np.zeros(s, np.float32) for s in self.model.predictor_shapes]), 0, {}
        if grad is None:  # local epochs
            ids, rows, pred, loss, n = local_epochs(self.model, self.cfg.train, arrays[0],
                                                    list(arrays[1:]), state, job.pos, job.neg,
                                                    job.rng, rnd)
        else:
            ids, rows, pred, loss, n = (grad.item_ids, grad.item_rows, grad.predictor, grad.loss,
                                        grad.n_samples)
        upload = self.craft_upload(ids, rows, pred, state, rnd)
        self.store.save(state)
        return encode_upload(*upload), int(n), {"loss": float(loss)}

    def reduced(self, grad):
        """train.loss_reduction: "mean" keeps the gradient of the mean loss over the pairs;
        "sum" scales it to the summed loss (FedRecAttack/Spattack's clients), user row included."""
        if self.cfg.train.loss_reduction != "sum":
            return grad
        n = np.float32(grad.n_samples)
        user = None if grad.user_grad is None else grad.user_grad * n
        return replace(grad, item_rows=grad.item_rows * n, user_grad=user,
                       predictor=[p * n for p in grad.predictor])

    def weight_decay(self) -> dict:
        t = self.cfg.train
        return {"weight_decay": t.weight_decay, "weight_decay_all": t.weight_decay_scope == "all"}

    # --- Flower API -------------------------------------------------------------------------
    def get_parameters(self, config):
        return []  # the global model lives on the server; nothing private is ever returned

    def fit(self, parameters, config):
        return cohort.fit_cohort([self], parameters, config)[0]

    def evaluate(self, parameters, config):
        """This user's own full-ranking HR/NDCG on validation and test (0 examples if none)."""
        rnd = int(config.get("round", 0))
        data = self.data
        if data.pool_mask[self.user] or self.is_malicious:
            return 0.0, 0, {}
        item_table, predictor = parameters[0], list(parameters[1:])
        ks = list(self.cfg.eval.ks)
        metrics = {}
        scores = None
        for split, targets in (("val", data.val_item[self.user : self.user + 1]),
                               ("test", data.test_of(self.user))):
            if not len(targets) or targets[0] < 0:
                continue
            if scores is None or self.model.sequential:  # a sequence model's user differs per split
                u = self.user_vector(rnd, split, parameters)
                scores = self.model.score(u[None, :], item_table, predictor)
            masked = self.train_items
            if split == "test" and data.val_item[self.user] >= 0:
                masked = np.append(masked, data.val_item[self.user])
            if not self.cfg.eval.mask_history:  # FedAttack's protocol: every item ranked
                masked = masked[:0]
            for key, vals in user_metrics(scores, [targets], [masked], ks).items():
                metrics[f"{split}_{key}"] = float(vals[0])
        if not metrics:
            return 0.0, 0, {}
        return 0.0, 1, metrics
