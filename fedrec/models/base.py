"""The model API shared by every recommender.

Parameters fall into three groups, and the protocol treats each differently:
- the item table V (n_items x dim): global; clients upload gradients of the rows they touched;
- predictor (or encoder) weights P: global, small, dense; clients upload their gradient;
- the user representation: private; it never leaves the client (MF/NCF: one row u).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np


@dataclass
class ClientGrad:
    """One client's gradient at the global model, over its training pairs.

    item_ids: sorted unique ids of touched item rows; item_rows: their gradients;
    predictor: gradients of the predictor arrays (same order as `predictor_shapes`);
    user_grad: gradient of the private user representation (stays on the client);
    loss: mean training loss; n_samples: number of training pairs.
    """

    item_ids: np.ndarray
    item_rows: np.ndarray
    predictor: list
    user_grad: np.ndarray
    loss: float
    n_samples: int


class RecModel:
    """Base class. Subclasses define the three parameter groups and the gradient."""

    name = "base"
    sequential = False  # True: the representation is computed from the history (SASRec, BERT4Rec)
    has_user_row = True  # MF/NCF: one private row u per user, trained on the device
    min_history = 1  # training items a client needs to have anything to train on
    dense_upload = False  # True when every upload carries every item row

    def __init__(self, n_items: int, dim: int, dropout: float = 0.0, **kwargs):
        self.n_items = int(n_items)
        self.dim = int(dim)
        self.dropout = float(dropout)

    # parameter groups -----------------------------------------------------------------
    @property
    def predictor_shapes(self) -> list[tuple]:
        return []

    def init_global(self, rng: np.random.Generator) -> tuple[np.ndarray, list]:
        """(item_table float32 (n_items, dim), predictor arrays)."""
        raise NotImplementedError

    def init_user(self, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def negatives_needed(self, n_train: int, neg_ratio: int) -> int:
        """Negatives a client with n_train training items draws per round: one per positive
        per unit of data.neg_ratio."""
        return n_train * neg_ratio

    # training ---------------------------------------------------------------------------
    def gradients(self, item_table, predictor, user, pos, neg, rng, *, weight_decay=0.0,
                  weight_decay_all=False, train=True) -> ClientGrad:
        """Mean BPR gradient over the pairs (pos[k], neg[k]) at the given parameters."""
        raise NotImplementedError

    def gradients_cohort(self, item_table, predictor, users, pos_list, neg_list, rngs, *,
                         weight_decay=0.0, weight_decay_all=False, train=True) -> list:
        """`gradients` for several clients at once; must equal calling it per client.

        The default just loops; models whose clients are tiny (MF) vectorise across them.
        """
        return [self.gradients(item_table, predictor, u, p, n, r, weight_decay=weight_decay,
                               weight_decay_all=weight_decay_all, train=train)
                for u, p, n, r in zip(users, pos_list, neg_list, rngs)]

    # inference ---------------------------------------------------------------------------
    def score(self, users: np.ndarray, item_table, predictor) -> np.ndarray:
        """Scores (B, n_items) of every item for a batch of user representations (B, dim)."""
        raise NotImplementedError


class CohortModel(RecModel):
    """A model whose gradient is written for a whole cohort (MF, the sequential models): one
    client's `gradients` is a cohort of one, so the two cannot differ."""

    def gradients(self, item_table, predictor, user, pos, neg, rng, *, weight_decay=0.0,
                  weight_decay_all=False, train=True) -> ClientGrad:
        return self.gradients_cohort(item_table, predictor, [user], [pos], [neg], [rng],
                                     weight_decay=weight_decay,
                                     weight_decay_all=weight_decay_all, train=train)[0]

    def gradients_cohort(self, item_table, predictor, users, pos_list, neg_list, rngs, *,
                         weight_decay=0.0, weight_decay_all=False, train=True) -> list:
        raise NotImplementedError


# training pairs per chunk of a cohort (see client_chunks)
CHUNK_PAIRS = 1024


class ChunkedPairModel(CohortModel):
    """A model with a private user row and (positive, negative) pairs (MF, NCF) whose cohort
    runs in chunks of clients (`in_chunks`); subclasses write `_chunk_gradients`."""

    def init_user(self, rng):
        std = np.sqrt(2.0 / (self.n_items + self.dim))
        return (rng.standard_normal(self.dim) * std).astype(np.float32)

    def gradients_cohort(self, item_table, predictor, users, pos_list, neg_list, rngs, *,
                         weight_decay=0.0, weight_decay_all=False, train=True):
        """The cohort in chunks of clients (client_chunks)."""
        return in_chunks(lambda *chunk, **options: self._chunk_gradients(
            item_table, predictor, *chunk, **options), users, pos_list, neg_list, rngs,
            weight_decay=weight_decay, weight_decay_all=weight_decay_all, train=train,
            n_items=len(item_table))

    def _chunk_gradients(self, item_table, predictor, users, pos_list, neg_list, rngs, *,
                         weight_decay=0.0, weight_decay_all=False, train=True, arena=None):
        raise NotImplementedError


def client_chunks(counts, max_pairs: int) -> list:
    """Consecutive client ranges [(a, b)] holding at most `max_pairs` training pairs together
    (a client with more is a chunk alone). MF and NCF compute a cohort chunk by chunk so that
    its (pairs x dim) temporaries stay in the core's caches: on ML-1M's gradients alone (50 MF
    clients, ~7,400 pairs; 16 NCF clients, ~2,300), with the caches flushed between calls,
    chunks of ~1,000 pairs took about half the CPU of one piece; in whole rounds NCF gained
    ~1.14x, MF nothing measurable. Every operation is per client, so no number changes."""
    bounds, start, pairs = [], 0, 0
    for c, n in enumerate(counts):
        if c > start and pairs + n > max_pairs:
            bounds.append((start, c))
            start, pairs = c, 0
        pairs += n
    if len(counts):
        bounds.append((start, len(counts)))
    return bounds


def in_chunks(chunk_gradients, users, pos_list, neg_list, rngs, **options) -> list:
    """chunk_gradients(users, pos_list, neg_list, rngs, arena=, **options) over `client_chunks`,
    the clients' results in order; the chunks' item rows go to one `RowArena`."""
    counts = [len(p) for p in pos_list]
    # a pair adds at most two (client, item) keys; a dense upload (weight_decay_all) is a
    # whole table per client, written straight into the arena: one block for the cohort, so
    # the server stacks the round's uploads without copying them (fedrec.protocol.joined_rows)
    n_items = options.pop("n_items", 0)
    arena = RowArena(n_items * len(counts) if options.get("weight_decay_all") and n_items
                     else 2 * sum(counts))
    out = []
    for a, b in client_chunks(counts, CHUNK_PAIRS):
        out += chunk_gradients(users[a:b], pos_list[a:b], neg_list[a:b], rngs[a:b], arena=arena,
                               **options)
    return out


class RowArena:
    """One float32 array handed out in consecutive blocks: the item rows of a cohort's chunks
    land back to back, so the server stacks the round's uploads without copying them
    (fedrec.protocol.joined_rows: the round's 3.8 MB copy on ML-1M MF, ~0.1 ms)."""

    def __init__(self, n_rows: int):
        self.n_rows, self.array, self.used = int(n_rows), None, 0

    def take(self, m: int, dim: int) -> np.ndarray:
        """The next m rows (uninitialised); a block of its own beyond the arena's bound."""
        if self.array is None:
            self.array = np.empty((self.n_rows, dim), dtype=np.float32)
        if self.used + m > self.n_rows or self.array.shape[1] != dim:
            return np.empty((m, dim), dtype=np.float32)
        block = self.array[self.used : self.used + m]
        self.used += m
        return block


def xavier_normal(rng: np.random.Generator, shape) -> np.ndarray:
    fan_out, fan_in = shape[0], shape[1]
    std = np.sqrt(2.0 / (fan_in + fan_out))
    return (rng.standard_normal(shape) * std).astype(np.float32)


def dropout_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """n uniform 16-bit integers from the client's generator (the raw material of its masks):
    its next (n + 3) // 4 raw 64-bit outputs, viewed as 16-bit words."""
    return raw_words(rng, (n + 3) // 4).view(np.uint16)[:n]


def raw_words(rng: np.random.Generator, n: int) -> np.ndarray:
    """The generator's next n raw 64-bit outputs (`bit_generator.random_raw(n)`). (Drawing
    them through `integers` over the full uint64 range gives the same words, and was taken
    for n >= 4096 as cheaper per word; measured again with numpy 2 on this machine it is
    slower at every size: 19.9 against 16.5 us for 7,200 words.)"""
    return rng.bit_generator.random_raw(n)


def dropout_threshold(p: float) -> np.uint16:
    """Keep an entry iff its 16-bit draw >= this: drop probability round(p * 65536) / 65536."""
    return np.uint16(min(int(round(p * 65536)), 65535))


def dropout_keep(rng: np.random.Generator, shape, p: float) -> np.ndarray:
    """Boolean keep-masks from 16 random bits per entry (several times faster than floats)."""
    n = int(np.prod(shape))
    return (dropout_bits(rng, n) >= dropout_threshold(p)).reshape(shape)


def dropout_keep_cohort(rngs, bounds, d: int, p: float) -> np.ndarray:
    """(3, pairs, d) keep-masks of a cohort (mask, pair, dim): client c's pairs
    bounds[c]:bounds[c+1] from its own 3 x n_c x d draws, compared straight into place."""
    keep = np.empty((3, int(bounds[-1]), d), dtype=bool)
    threshold = dropout_threshold(p)
    for r, a, b in zip(rngs, bounds[:-1].tolist(), bounds[1:].tolist()):
        np.greater_equal(dropout_bits(r, 3 * (b - a) * d).reshape(3, b - a, d), threshold,
                         out=keep[:, a:b, :])
    return keep


def segment_sum(index: np.ndarray, rows: np.ndarray, n_segments: int, out=None) -> np.ndarray:
    """out[s] = sum of rows[j] with index[j] == s, added in j order (float32, deterministic).

    torch's CPU index_add_ adds sequentially, so a client's sums come out bit-identical
    whether it is computed alone or inside a cohort. out: an (n_segments, dim) float32 array
    to write the sums into (C-contiguous), returned.
    """
    return segment_sum_parts([(index, rows)], n_segments, rows.shape[1], out)


def segment_sum_parts(parts, n_segments: int, dim: int, out=None) -> np.ndarray:
    """segment_sum of the parts [(index, rows), ...] concatenated, in that order, without
    concatenating them (each part added by its own sequential index_add_).

    Where torch is not loaded (a deployment's ClientApp: a fresh process per message, MF's
    numpy path) the same sums come from `_segment_add_numpy` (the same sequential float32
    adds in the same order, so the same bits) rather than importing torch for them."""
    if "torch" not in sys.modules:
        total = np.zeros((n_segments, dim), np.float32) if out is None else out
        total[...] = 0.0
        for index, rows in parts:
            _segment_add_numpy(total, np.asarray(index, np.int64),
                               np.asarray(rows, np.float32))
        return total
    import torch

    if out is None:
        total = torch.zeros((n_segments, dim), dtype=torch.float32)
    else:
        total = torch.from_numpy(out).zero_()
    for index, rows in parts:
        total.index_add_(0, torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64)),
                         torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)))
    return total.numpy() if out is None else out


def _segment_add_numpy(total: np.ndarray, index: np.ndarray, rows: np.ndarray):
    """total[index[j]] += rows[j] for j in order, as torch's sequential CPU index_add_: the
    rows are taken in layers, layer r holding each segment's r-th row (in j order), so a
    layer's indices are distinct and one fancy-indexed add does it. (np.add.at gives the same
    bits but is ~15x slower on 2-D rows.) Layers = the most rows any one segment gets."""
    n = len(index)
    if n == 0:
        return
    order = np.argsort(index, kind="stable")
    ordered = index[order]
    starts = np.empty(n, bool)
    starts[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    first = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - first
    for r in range(int(rank.max()) + 1):
        layer = np.flatnonzero(rank == r)
        total[index[layer]] += rows[layer]


def pairwise_loss(loss: str) -> str:
    """model.loss for the pairwise models (MF, NCF): "auto" is BPR; bce is PipAttack's pointwise loss."""
    from fedrec.errors import ConfigError

    name = "bpr" if loss == "auto" else loss
    if name not in ("bpr", "bce"):
        raise ConfigError(f"model.loss: MF and NCF support bpr, bce (auto = bpr), not {loss!r}")
    return name


def cohort_layout(counts: np.ndarray):
    """(bounds, owner) of a cohort's concatenated pairs: client c owns [bounds[c], bounds[c+1])."""
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return bounds, np.repeat(np.arange(len(counts)), counts)


def positives_per_negative(pos_list) -> np.ndarray:
    """q per client: its pairs over its distinct positives (pairs repeat each positive q times)."""
    return np.array([len(p) / max(len(np.unique(p)), 1) for p in pos_list], dtype=np.float64)


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """np.unique(a) for a 1-D array: a sort and a neighbour comparison, ~3x faster than
    np.unique on a user's few hundred item ids (every new client builds its exclusion list)."""
    a = np.sort(np.ravel(a))
    keep = np.empty(len(a), dtype=bool)
    keep[:1] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def unique_inverse(keys: np.ndarray, n_keys: int):
    """np.unique(keys, return_inverse=True) for integer keys in [0, n_keys), the same arrays.

    Where the key range is small against the number of keys (a round's (client, item) keys
    on ML-1M: 185k possible, 15k present) a bitmap over the range finds them without the sort
    that dominates np.unique."""
    if n_keys > 64 * len(keys) + (1 << 16):
        return np.unique(keys, return_inverse=True)
    present = np.zeros(n_keys, dtype=bool)
    present[keys] = True
    uniq = np.flatnonzero(present)
    rank = np.empty(n_keys, dtype=np.int64)
    rank[uniq] = np.arange(len(uniq))
    return uniq, rank[keys]


def client_item_uploads(owner, items, rows, n_clients: int, item_table, weight_decay: float,
                        weight_decay_all: bool, arena: RowArena | None = None) -> list:
    """Per client (sorted touched ids, summed rows [+ weight decay]) from per-(pair, item) rows.

    The sums run per (client, item) key in pair order, so a client's rows are bit-identical
    alone or in a cohort; weight_decay_all makes the upload dense (wd * V plus the rows).
    The returned rows of different clients are consecutive slices of one array (of `arena`'s
    when given)."""
    n_items = item_table.shape[0]
    keys = owner * n_items + items
    uniq, inv = unique_inverse(keys, n_clients * n_items)
    item_rows = segment_sum(inv, rows, len(uniq),
                            None if arena is None or weight_decay_all
                            else arena.take(len(uniq), rows.shape[1]))
    key_owner, key_item = np.divmod(uniq, n_items)
    if weight_decay and not weight_decay_all:  # elementwise: the same numbers as per client
        decay = np.take(item_table, key_item, axis=0)
        item_rows += np.multiply(decay, np.float32(weight_decay), out=decay)
    kb = np.searchsorted(key_owner, np.arange(n_clients + 1)).tolist()
    out = [(key_item[a:b], item_rows[a:b]) for a, b in zip(kb[:-1], kb[1:])]
    if weight_decay_all:
        # wd * V once for the cohort, copied into each client's table: the same bits as each
        # client multiplying, and a copy writes a table ~2.7x faster than the multiply does
        # (50 ML-1M tables: 2.9 against 7.9 ms, ~6% of a paper-protocol round)
        decay_table = np.multiply(item_table, np.float32(weight_decay))
        out = [_dense_upload(ids, r, decay_table,
                             None if arena is None else arena.take(n_items, r.shape[1]))
               for ids, r in out]
    return out


def _dense_upload(ids, rows, decay_table, out=None):
    """weight_decay_scope all: wd * V (decay_table) over every row, plus the client's rows
    where it has some (the table written into out, an (n_items, dim) float32 block, when
    given)."""
    if out is None:
        full = decay_table.copy()
    else:
        full = out
        np.copyto(full, decay_table)
    full[ids] += rows
    return np.arange(decay_table.shape[0]), full


def scatter_rows(ids: np.ndarray, rows: np.ndarray):
    """Sum rows that share an id: -> (sorted unique ids, summed rows)."""
    uniq, inv = np.unique(ids, return_inverse=True)
    return uniq, segment_sum(inv, rows, len(uniq))
