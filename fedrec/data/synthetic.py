"""A small synthetic implicit-feedback dataset with learnable structure, for tests and quick runs.

Generative model (all randomness from `np.random.default_rng(seed)`):

- item factors q_i ~ N(0, I/dim); user tastes p_u = mainstream * m + N(0, I), where m is a unit
  "mainstream" direction shared by all users (items along m are liked by most users, which makes
  popularity heavier-tailed and learnable), so the personal part of p_u . q_i has unit variance;
- item popularity follows a Zipf law: the item of popularity rank r (a random permutation of the items)
  has weight r^(-popularity_exponent);
- history lengths are lognormal with mean about `mean_history`, clipped to [min_history, n_items // 2];
- user u picks its items without replacement with probabilities softmax(taste_weight * p_u . q_i +
  log popularity_i) (the Gumbel top-k trick), so a matrix factorisation can recover p and q and beat a
  popularity ranking;
- the picked items are put in sequence order by a slow taste drift: every user has a drift direction
  d_u, and items with a larger `q_i . d_u` tend to come later (plus noise), so order carries a little
  signal too.

Rows are grouped by user (ids 0..n_users-1), in sequence order; items are 0..n_items-1 (an item may
never be picked). `order` is the 0-based position in the user's sequence, order_kind "sequence".
"""

from __future__ import annotations

import numpy as np

from fedrec.data.types import Interactions

__all__ = ["generate_synthetic"]


def generate_synthetic(
    n_users: int = 300,
    n_items: int = 400,
    dim: int = 8,
    mean_history: float = 30,
    min_history: int = 5,
    seed: int = 0,
    popularity_exponent: float = 1.0,
    taste_weight: float = 2.5,
    drift: float = 0.5,
    mainstream: float = 1.5,
    history_sigma: float = 0.7,
    name: str = "synthetic",
) -> Interactions:
    """Generate a synthetic dataset (see the module docstring for the model).

    taste_weight: scale of the taste term against log popularity (0 = popularity only).
    drift: strength of the taste drift that orders each history (0 = random order).
    mainstream: weight of the taste direction shared by all users (0 = independent tastes).
    history_sigma: sigma of the lognormal history length (larger = longer tail).
    """
    if n_users < 1 or n_items < 2 or dim < 1:
        raise ValueError("need n_users >= 1, n_items >= 2 and dim >= 1")
    if not 1 <= min_history <= n_items:
        raise ValueError(f"min_history must be in [1, n_items={n_items}], got {min_history}")
    rng = np.random.default_rng(seed)
    item_f = rng.normal(size=(n_items, dim)) / np.sqrt(dim)
    common = rng.normal(size=dim)
    user_f = rng.normal(size=(n_users, dim)) + mainstream * common / np.linalg.norm(common)
    direction = rng.normal(size=(n_users, dim))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    ranks = rng.permutation(n_items) + 1
    log_pop = -popularity_exponent * np.log(ranks)

    hi = max(min_history, n_items // 2)
    mu = np.log(max(mean_history, 1.0)) - history_sigma**2 / 2
    lengths = np.rint(rng.lognormal(mu, history_sigma, size=n_users))
    lengths = np.clip(lengths, min_history, hi).astype(np.int64)

    users, items, order = [], [], []
    chunk = max(1, 2_000_000 // n_items)  # bound memory for large sizes
    for lo in range(0, n_users, chunk):
        rows = slice(lo, min(lo + chunk, n_users))
        logits = taste_weight * user_f[rows] @ item_f.T + log_pop
        keys = logits + rng.gumbel(size=logits.shape)
        n = lengths[rows]
        kmax = int(n.max())
        if kmax < n_items:  # only the best kmax keys of each row need sorting
            top = np.argpartition(-keys, kmax - 1, axis=1)[:, :kmax]
            ranked = np.take_along_axis(top, np.argsort(-np.take_along_axis(keys, top, 1), axis=1), 1)
        else:
            ranked = np.argsort(-keys, axis=1)
        take = np.arange(kmax) < n[:, None]
        chosen = ranked[take]  # row-major: each user's picks, in user order
        owner = np.repeat(np.arange(rows.start, rows.stop), n)
        # order inside a history: drift projection plus noise, sorted per user
        key = drift * np.einsum("ij,ij->i", item_f[chosen], direction[owner]) * np.sqrt(dim)
        key = key + rng.normal(size=len(chosen))
        perm = np.lexsort((key, owner))
        users.append(owner)
        items.append(chosen[perm])
        order.append(np.arange(len(chosen)) - np.repeat(np.cumsum(n) - n, n))
    return Interactions(
        np.concatenate(users),
        np.concatenate(items),
        order=np.concatenate(order),
        name=name,
        source=f"generate_synthetic(seed={seed})",
        order_kind="sequence",
        extra={
            "params": dict(n_users=n_users, n_items=n_items, dim=dim, mean_history=mean_history,
                           min_history=min_history, seed=seed, popularity_exponent=popularity_exponent,
                           taste_weight=taste_weight, drift=drift, mainstream=mainstream,
                           history_sigma=history_sigma)
        },
    )
