"""MaliciousClient: an attacker's device. Honest until `attack.start_round`, then it attacks.

Three ways an attack acts, by what its threat model grants (`knowledge`):
- local (own data + the global model it receives): the client itself changes its training
  data (`poison_pairs`, e.g. LabelFlip, FedAttack) or its upload (`poison_upload`, e.g.
  Spattack-L). Runs anywhere, a real deployment included.
- colluding (the malicious clients pool what they know: their own honest updates) and
  omniscient (also the round's benign updates; simulation only): the client uploads its
  honest update, and the simulation's adversary hook (`fedrec/adversary.py`), called between
  collecting a round's uploads and the defense, hands the attack exactly that knowledge
  (`AdversaryView`) and replaces the malicious uploads with `craft_round`'s. The defense
  never sees the flag or the view.

An attack is one file in this folder plus one line in `fedrec.registry.ATTACKS`. Its
parameters are a dataclass `Params` (YAML `attack.params`; unknown names are rejected).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from clients.base import FedRecClient
from fedrec.errors import ConfigError

KNOWLEDGE = ("local", "colluding", "omniscient")


@dataclass
class NoParams:
    pass


@dataclass
class HonestUpdate:
    """One client's upload as the adversary hook sees it (decoded, read-only)."""

    user: int
    item_ids: np.ndarray
    item_rows: np.ndarray
    predictor: list
    num_examples: int
    train_items: np.ndarray | None = None  # the malicious clients' own data (None for benign)
    # a malicious client's private user row as of the end of the round (only for an attack
    # with `needs_user_rows`; the adversary controls that device; None otherwise)
    user_row: np.ndarray | None = None


@dataclass
class AdversaryView:
    """What a colluding/omniscient attack knows in a round (simulation only).

    own: the honest updates of this round's sampled malicious clients (colluding and up);
    benign: the round's benign updates (omniscient only, else None);
    n_clients: how many clients the round sampled (public protocol knowledge);
    pool: with attack.pool_sample = N > 0, the honest updates at this round's model of up to
    N malicious clients drawn from all of them, sampled in the round or not (the reference's
    colluding attacker's statistics sample); None when N = 0.
    """

    round: int
    item_table: np.ndarray
    predictor: list
    own: list
    benign: list | None
    n_clients: int
    n_items: int
    weighting: str = "samples"  # the server's aggregation weights (public: server.weighting)
    pool: list | None = None
    context: object = None  # the attack's `adversary_context(cfg, env)` (public setting), or None


def parse_params(cls, raw: dict, attack: str):
    """The attack's Params dataclass from `attack.params`; a clear error for a bad name/value."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw or {}) - set(names))
    if unknown:
        valid = ", ".join(names) or "(none)"
        raise ConfigError(f"attack.params.{unknown[0]}: not a parameter of {attack}; valid: {valid}")
    kwargs = {}
    for k, v in (raw or {}).items():
        default = getattr(cls(), k)
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise ConfigError(f"attack.params.{k}: expected true or false, got {v!r}")
        elif isinstance(default, (int, float)):
            try:
                v = type(default)(float(v)) if isinstance(default, int) and float(v) == int(float(v)) \
                    else float(v)
            except (TypeError, ValueError):
                raise ConfigError(f"attack.params.{k}: expected a number, got {v!r}") from None
            if isinstance(default, int) and not isinstance(v, int):
                raise ConfigError(f"attack.params.{k}: expected an integer, got {v!r}")
        elif isinstance(default, str) and not isinstance(v, str):
            raise ConfigError(f"attack.params.{k}: expected a string, got {v!r}")
        kwargs[k] = v
    params = cls(**kwargs)
    check = getattr(params, "validate", None)
    if check is not None:
        check()
    return params


class MaliciousClient(FedRecClient):
    """Base class of every attack. Subclasses set `name`, `knowledge_levels` (first = default),
    `Params`, and override one of `poison_pairs`, `poison_upload` or `craft_round`; one that
    reads the global model in `poison_pairs` sets `pairs_need_model = True`."""

    is_malicious = True
    # poison_pairs may draw from the round's stream: each attacker draws its own negatives
    batch_negatives = False
    name = "malicious"
    knowledge_levels: tuple = ("local",)
    Params = NoParams
    needs_user_rows = False  # craft_round reads its clients' private user rows (HonestUpdate.user_row)

    def __init__(self, user: int, env, store):
        super().__init__(user, env, store)
        self.params = self.params_from(env.cfg)
        self.knowledge = self.knowledge_from(env.cfg)
        self._round = 0
        self._global = None

    # --- configuration ----------------------------------------------------------------------
    @classmethod
    def params_from(cls, cfg):
        return parse_params(cls.Params, cfg.attack.params, cls.name)

    @classmethod
    def knowledge_from(cls, cfg) -> str:
        k = cfg.attack.knowledge
        if k == "default":
            return cls.knowledge_levels[0]
        if k not in cls.knowledge_levels:
            raise ConfigError(f"attack.knowledge: {cls.name} runs with "
                              f"{' or '.join(cls.knowledge_levels)}, not {k!r}")
        return k

    def attacking(self, rnd: int | None = None) -> bool:
        return (self._round if rnd is None else rnd) >= self.cfg.attack.start_round

    # --- local hooks --------------------------------------------------------------------------
    def prepare_fit(self, arrays, config, rng=None):
        self._round = int(config["round"])
        self._global = arrays
        return super().prepare_fit(arrays, config, rng)

    def training_pairs(self, state, rng):
        pos, neg = super().training_pairs(state, rng)
        if self.attacking():
            return self.poison_pairs(pos, neg, state, rng)
        return pos, neg

    def poison_pairs(self, pos, neg, state, rng):
        """Data poisoning (local): the pairs actually trained on. Default: unchanged."""
        return pos, neg

    def craft_upload(self, ids, rows, predictor, state, rnd):
        if self.attacking(rnd) and self.knowledge == "local":
            return self.poison_upload(ids, rows, predictor, state, rnd)
        return ids, rows, predictor

    def poison_upload(self, ids, rows, predictor, state, rnd):
        """Model poisoning with local knowledge: what is sent instead. Default: honest."""
        return ids, rows, predictor

    # --- the adversary hook (colluding / omniscient) -------------------------------------------
    @classmethod
    def adversary_context(cls, cfg, env):
        """What craft_round needs of the experiment's public setting (AdversaryView.context),
        built once per run by the hook. Default: nothing."""
        return None

    @classmethod
    def craft_round(cls, view: AdversaryView, params, memory: dict, rng) -> tuple[list, dict]:
        """([(item_ids, item_rows, predictor)] for each of view.own, in order; diagnostics).

        `memory` persists across rounds (the colluding attacker's own state, e.g. K);
        `rng` is this round's adversary generator. Only called for colluding/omniscient runs.
        """
        raise NotImplementedError(f"{cls.name} has no colluding/omniscient form")


def dense_updates(updates: list):
    """The updates as dense arrays over the union of rows any of them touched.

    -> (ids (R,), X (k, R, dim) float32 with zeros where an update did not send a row,
    predictor list of (k, *shape)). The statistical attacks (Gaussian, LIE, Fang, DYN-OPT)
    treat each update as one vector, as in the FL papers that define them."""
    all_ids = np.concatenate([u.item_ids for u in updates])
    owner = np.repeat(np.arange(len(updates)), [len(u.item_ids) for u in updates])
    ids, pos = np.unique(all_ids, return_inverse=True)
    dim = updates[0].item_rows.shape[1]
    X = np.zeros((len(updates), len(ids), dim), np.float32)
    X[owner, pos] = np.concatenate([u.item_rows for u in updates])  # ids are unique per update
    pred = [np.stack([u.predictor[j] for u in updates]) for j in range(len(updates[0].predictor))]
    return ids, X, pred


def dense_stats(updates: list):
    """Per-coordinate mean and (population) std of the updates as dense vectors, over the rows
    any of them sent: -> (ids, mean (R, dim), std (R, dim), [(pred_mean, pred_std)]).

    Same numbers as `dense_updates` then mean/std over axis 0, from per-row sums of x and x^2
    (zeros contribute nothing), without building the (k, R, dim) array."""
    k = len(updates)
    all_ids = np.concatenate([u.item_ids for u in updates])
    dim = updates[0].item_rows.shape[1]
    first = np.asarray(updates[0].item_ids)
    if len(all_ids) == k * len(first) and bool(np.all(first[1:] > first[:-1])) \
            and bool((all_ids.reshape(k, -1) == first).all()):  # the same sorted ids each
        ids = first.copy()
        s1, s2 = _aligned_sums([u.item_rows for u in updates], (len(ids), dim))
    else:
        ids, pos = np.unique(all_ids, return_inverse=True)
        s1, s2 = _indexed_sums([u.item_rows for u in updates], pos, (len(ids), dim))
    mean = s1 / k
    std = np.sqrt(np.maximum(s2 / k - mean * mean, 0.0))
    preds = []
    for j in range(len(updates[0].predictor)):
        a = np.stack([u.predictor[j] for u in updates]).astype(np.float64)
        preds.append((a.mean(0), a.std(0)))
    return ids, mean, std, preds


STATS_BLOCK_ROWS = 1 << 15  # rows per block of dense_stats (64 floats: 16 MB in float64)


def _aligned_sums(tables: list, shape) -> tuple:
    """(sum x, sum x^2) in float64 of equally shaped row arrays (every update sends the same
    ids in order: the dense tables of weight_decay_scope all), added one array after the
    other: the same sequential sums as index_add_ over the stacked rows, ~3x faster (50
    ML-1M tables: 28 against 81 ms)."""
    s1, s2, x = np.zeros(shape), np.zeros(shape), np.empty(shape)
    for rows in tables:  # one float64 table in cache at a time
        np.copyto(x, rows)
        s1 += x
        x *= x
        s2 += x
    return s1, s2


def _indexed_sums(row_arrays: list, pos: np.ndarray, shape) -> tuple:
    """(sum x, sum x^2) in float64 per position pos of the stacked rows. The rows go in
    blocks of whole updates, each added in row order: index_add_ adds sequentially, so the
    same sums as over all rows at once, without float64 copies of every row (a pool of 50
    dense ML-1M tables: 2 x 95 MB a round, page-faulted anew)."""
    import torch

    index = torch.from_numpy(pos.astype(np.int64))
    s1 = torch.zeros(shape, dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    start = 0
    for block in _update_blocks([len(r) for r in row_arrays], STATS_BLOCK_ROWS):
        rows = torch.from_numpy(np.concatenate([row_arrays[i] for i in block])
                                .astype(np.float64))
        sl = index[start:start + len(rows)]
        start += len(rows)
        s1.index_add_(0, sl, rows)
        s2.index_add_(0, sl, rows.mul_(rows))
    return s1.numpy(), s2.numpy()


def _update_blocks(lengths, max_rows: int) -> list:
    """Consecutive updates grouped into blocks of at most max_rows rows (an update longer
    than that makes a block of its own): a list of lists of update positions."""
    blocks, current, rows = [], [], 0
    for i, n in enumerate(lengths):
        if current and rows + n > max_rows:
            blocks.append(current)
            current, rows = [], 0
        current.append(i)
        rows += n
    return blocks + [current] if current else blocks


def statistical_round(view: AdversaryView, craft, diagnostics: dict | None = None):
    """The statistical attacks' round (Fang, LIE): every own client uploads the same
    craft(mean, std) of the known updates' per-coordinate statistics over the rows they sent,
    the predictor likewise. -> (uploads, diagnostics with the row count)."""
    ids, mean, std, pred = dense_stats(knowledge_set(view))
    rows = craft(mean, std)
    p = [craft(m, s) for m, s in pred]
    return [(ids, rows, p) for _ in view.own], {**(diagnostics or {}), "rows": len(ids)}


def colluding_set(view: AdversaryView) -> list:
    """The malicious clients' honest updates the attack knows: the pool when there is one
    (attack.pool_sample), else the round's own."""
    return view.pool if view.pool is not None else view.own


def knowledge_set(view: AdversaryView) -> list:
    """The updates whose statistics the attack may use: when omniscient the round's benign
    ones (plus the pool, honest updates at the same model, when there is one), else the
    malicious clients' honest ones (`colluding_set`); the own ones if that leaves none."""
    known = colluding_set(view) if view.benign is None else view.benign + (view.pool or [])
    known = [u for u in known if len(u.item_ids)]
    return known or [u for u in view.own if len(u.item_ids)]
