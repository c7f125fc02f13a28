"""Preprocessing: id remapping, k-core, leave-one-out split, attacker pool, cache.

The output, `PreparedData`, is what both ways of running hand to clients: each client
takes only its own row of it (its history and held-out items), and evaluation code reads
the held-out items of benign users.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from fedrec.data.types import SPLIT_TEST, Interactions

PREP_VERSION = 2  # 2: k-core counts distinct pairs


def cache_dir(cfg) -> Path:
    """data.cache_dir (relative to the YAML's folder), else $FEDREC_CACHE, else ~/.cache/fedrec:
    prepared data, and UNION's null pool."""
    from fedrec import environment

    if cfg.data.cache_dir:
        p = Path(os.path.expanduser(cfg.data.cache_dir))
        return p if p.is_absolute() else Path(cfg.base_dir or ".") / p
    return environment.cache_root()


@dataclass
class PreparedData:
    """Remapped, split data. Users are 0..n_users-1, items 0..n_items-1.

    train_indptr/train_items: CSR of each user's training items in history order.
    val_item/test_item: the held-out item per user, -1 when the user has none.
    attacker_pool: users that may be turned malicious; never evaluated, even in clean runs.
    split_kind: "time" (order known), "random" (seeded hold-out) or "fixed" (published split).
    test_indptr/test_items: CSR of every held-out test item per user, kept only for a fixed
    split prepared with fixed_test="all" (else None: one test item per user, `test_item`).
    """

    n_users: int
    n_items: int
    train_indptr: np.ndarray
    train_items: np.ndarray
    val_item: np.ndarray
    test_item: np.ndarray
    attacker_pool: np.ndarray
    item_popularity: np.ndarray
    split_kind: str
    name: str = "dataset"
    user_raw_ids: np.ndarray | None = None
    item_raw_ids: np.ndarray | None = None
    test_indptr: np.ndarray | None = None
    test_items: np.ndarray | None = None

    def train_of(self, user: int) -> np.ndarray:
        return self.train_items[self.train_indptr[user] : self.train_indptr[user + 1]]

    def test_of(self, user: int) -> np.ndarray:
        """Every held-out test item of `user` (empty if none)."""
        if self.test_indptr is not None:
            return self.test_items[self.test_indptr[user] : self.test_indptr[user + 1]]
        t = self.test_item[user]
        return np.array([t] if t >= 0 else [], dtype=np.int64)

    @cached_property
    def pool_mask(self) -> np.ndarray:
        m = np.zeros(self.n_users, dtype=bool)
        m[self.attacker_pool] = True
        return m

    def eval_users(self, split: str = "test") -> np.ndarray:
        """Benign users (outside the attacker pool) with a held-out item for `split`."""
        target = self.test_item if split == "test" else self.val_item
        ok = (target >= 0) & ~self.pool_mask
        return np.flatnonzero(ok)

    def summary(self) -> dict:
        return {
            "name": self.name,
            "users": int(self.n_users),
            "items": int(self.n_items),
            "train_interactions": int(len(self.train_items)),
            "split": self.split_kind,
            "attacker_pool": int(len(self.attacker_pool)),
            "eval_users_test": int(len(self.eval_users("test"))),
            "test_items": int(len(self.test_items)) if self.test_items is not None
            else int((self.test_item >= 0).sum()),
        }

    # --- cache ------------------------------------------------------------------------
    _ARRAYS = ("train_indptr", "train_items", "val_item", "test_item", "attacker_pool",
               "item_popularity", "user_raw_ids", "item_raw_ids", "test_indptr", "test_items")

    def save(self, path: Path):
        arrays = {k: getattr(self, k) for k in self._ARRAYS if getattr(self, k) is not None}
        meta = json.dumps({"n_users": self.n_users, "n_items": self.n_items,
                           "split_kind": self.split_kind, "name": self.name})
        tmp = Path(str(path) + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, meta=np.frombuffer(meta.encode(), dtype=np.uint8), **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "PreparedData":
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            arrays = {k: z[k] if k in z else None for k in cls._ARRAYS}
        return cls(**meta, **arrays)


def kcore(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of rows kept by the iterative k-core filter (users and items >= k).

    Degrees count distinct (user, item) pairs: a repeated interaction adds nothing.
    """
    keep = np.ones(len(users), dtype=bool)
    if k <= 1 or not len(users):
        return keep
    # count each pair once (all copies of a pair are kept or dropped together)
    ui = np.unique(users, return_inverse=True)[1].astype(np.int64)
    ii = np.unique(items, return_inverse=True)[1].astype(np.int64)
    _, first = np.unique(ui * (int(ii.max()) + 1) + ii, return_index=True)
    distinct = np.zeros(len(users), dtype=bool)
    distinct[first] = True
    while True:
        counted = keep & distinct
        u_cnt = np.bincount(users[counted], minlength=users.max() + 1 if len(users) else 0)
        i_cnt = np.bincount(items[counted], minlength=items.max() + 1 if len(items) else 0)
        new = keep & (u_cnt[users] >= k) & (i_cnt[items] >= k)
        if new.sum() == keep.sum():
            return new
        keep = new


def prepare(inter: Interactions, *, kcore_k: int = 0, split: str = "auto",
            attacker_pool: float = 0.05, seed: int = 0, fixed_test: str = "first") -> PreparedData:
    """Remap ids, apply the k-core, split leave-one-out, draw the attacker pool.

    split: "time" keeps the history order (needs `inter.order`; ties keep file order), last
    item -> test, second-to-last -> validation. "random" holds out two random items per user
    (seeded). "auto" = time when the order is known, random otherwise. Datasets with a fixed
    published split keep their test rows out of training; validation is one random training
    item; `fixed_test` = "first" evaluates the first listed test item per user (a random
    hold-out of one), "all" evaluates every test item (multi-item HR/NDCG, see evaluation.py).
    Users with fewer than 3 interactions keep everything for training and are not evaluated.
    """
    rng = np.random.default_rng([seed, 7919])
    users, items = inter.users, inter.items
    order = inter.order
    fixed = inter.fixed_split
    # drop duplicate (user, item) pairs, keeping the first occurrence in history order
    if kcore_k > 1:
        keep = kcore(users, items, kcore_k)
        users, items = users[keep], items[keep]
        order = order[keep] if order is not None else None
        fixed = fixed[keep] if fixed is not None else None
    user_raw, u = np.unique(users, return_inverse=True)
    item_raw, i = np.unique(items, return_inverse=True)
    n_users, n_items = len(user_raw), len(item_raw)

    if split == "auto":
        split = "time" if order is not None else "random"
    if fixed is not None:
        split_kind = "fixed"
    elif split == "time":
        if order is None:
            from fedrec.errors import ConfigError

            raise ConfigError(f"data.split: 'time' needs an order, and {inter.name} has none")
        split_kind = "time"
    else:
        split_kind = "random"

    # history order: by user, then by order key (stable, so ties keep file order)
    pos = np.arange(len(u))
    if split_kind == "time":
        idx = np.lexsort((pos, order, u))
    else:
        idx = np.lexsort((pos, u))
    u, i = u[idx], i[idx]
    fixed = fixed[idx] if fixed is not None else None
    # duplicates: keep the first occurrence of each (user, item)
    key = u.astype(np.int64) * n_items + i
    _, first = np.unique(key, return_index=True)
    dup_keep = np.zeros(len(u), dtype=bool)
    dup_keep[first] = True
    u, i = u[dup_keep], i[dup_keep]
    fixed = fixed[dup_keep] if fixed is not None else None

    counts = np.bincount(u, minlength=n_users)
    test_indptr = test_items = None
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    val_item = np.full(n_users, -1, dtype=np.int64)
    test_item = np.full(n_users, -1, dtype=np.int64)
    held = np.zeros(len(u), dtype=bool)

    if split_kind == "fixed":
        is_test = fixed == SPLIT_TEST
        # one test item per user: the first listed test item (leave-one-out protocol)
        tpos = np.flatnonzero(is_test)
        tu = u[tpos]
        first_t = tpos[np.r_[True, tu[1:] != tu[:-1]]] if len(tpos) else tpos
        test_item[u[first_t]] = i[first_t]
        held |= is_test
        train_counts = np.bincount(u[~is_test], minlength=n_users)
        # validation: one random training item for users with >= 2 training items
        cand = np.flatnonzero(train_counts >= 2)
        train_pos = np.flatnonzero(~is_test)
        tstarts = np.concatenate([[0], np.cumsum(train_counts)[:-1]])
        pick = tstarts[cand] + (rng.random(len(cand)) * train_counts[cand]).astype(np.int64)
        vrows = train_pos[pick]
        val_item[cand] = i[vrows]
        held[vrows] = True
        test_item[train_counts < 1] = -1
        if fixed_test == "all":  # every test row of users that are evaluated, in file order
            keep_t = is_test & (train_counts[u] >= 1)
            test_indptr = np.concatenate([[0], np.cumsum(np.bincount(u[keep_t], minlength=n_users))])
            test_items = i[keep_t]
    else:
        ok = np.flatnonzero(counts >= 3)
        if split_kind == "time":
            t_rows = starts[ok] + counts[ok] - 1
            v_rows = t_rows - 1
        else:
            r1 = (rng.random(len(ok)) * counts[ok]).astype(np.int64)
            r2 = (rng.random(len(ok)) * (counts[ok] - 1)).astype(np.int64)
            r2 = r2 + (r2 >= r1)
            t_rows, v_rows = starts[ok] + r1, starts[ok] + r2
        test_item[ok] = i[t_rows]
        val_item[ok] = i[v_rows]
        held[t_rows] = True
        held[v_rows] = True

    tr_u, tr_i = u[~held], i[~held]
    train_indptr = np.concatenate([[0], np.cumsum(np.bincount(tr_u, minlength=n_users))])
    pool_size = int(round(attacker_pool * n_users))
    pool = np.sort(rng.choice(n_users, size=pool_size, replace=False)) if pool_size else \
        np.zeros(0, dtype=np.int64)
    popularity = np.bincount(tr_i, minlength=n_items)
    return PreparedData(
        n_users=n_users, n_items=n_items,
        train_indptr=train_indptr.astype(np.int64), train_items=tr_i.astype(np.int64),
        val_item=val_item, test_item=test_item, attacker_pool=pool.astype(np.int64),
        item_popularity=popularity.astype(np.int64), split_kind=split_kind, name=inter.name,
        user_raw_ids=user_raw, item_raw_ids=item_raw,
        test_indptr=None if test_indptr is None else test_indptr.astype(np.int64),
        test_items=None if test_items is None else test_items.astype(np.int64),
    )


def file_digest(paths) -> str:
    """sha256 over the bytes of the given files (the cache key's content part)."""
    h = hashlib.sha256()
    for p in sorted(str(p) for p in paths):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def cached_prepare(key_parts: dict, cache_dir, make_interactions, **prep_kwargs) -> PreparedData:
    """Prepare through an on-disk cache keyed by a hash of content and settings.

    key_parts must identify the raw content (e.g. a file digest, or the synthetic generator
    settings); prep_kwargs are the preprocessing settings, also part of the key.
    """
    key = json.dumps({"v": PREP_VERSION, **key_parts, **prep_kwargs}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"prepared-{digest}.npz" if cache_dir else None
    if path is not None and path.exists():
        try:
            return PreparedData.load(path)
        except Exception:  # a torn or stale cache file: rebuild it
            pass
    data = prepare(make_interactions(), **prep_kwargs)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data.save(path)
        except OSError:
            pass  # a read-only location: run without the cache
    return data
