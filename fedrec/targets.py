"""Target items of targeted (promotion) attacks, item popularity, and the exposure ratio ER@K.

- Popularity side information: an item's interaction count over every user's training data
  (public to the attacker in PipAttack's threat model), and the three popularity classes of
  PipAttack (WSDM'22): class 0 = the top 10% of items by count, 1 = the next 35% (10-45%),
  2 = the rest; ties broken by item id (the lower id ranks as more popular).
- `attack.target`: `none`, `least_popular` (PipAttack's default: the item with the fewest
  training interactions, the lowest id among ties), an item id (an id after preprocessing's
  remapping), `band:LO-HI` (one item drawn with the experiment's seed among the items whose
  popularity percentile is in [LO, HI): 0 = the most popular item, 1 = past the least
  popular), or a list of these (duplicates are dropped; one band entry draws one item
  distinct from the others).
- ER@K of a target: among the evaluated (benign, not in the attacker pool) users whose
  history (training, validation and test items) does not hold the target, the share whose
  top K holds it, training items masked (for the test form, the validation item too). Its
  denominator is logged with it.
"""

from __future__ import annotations

import numpy as np

from fedrec.errors import ConfigError

_TARGET_DRAW = 104729  # stream tag of the band draw
CLASS_EDGES = (0.10, 0.45)  # top 10% | 10-45% | rest


def check_target_spec(spec):
    """One-line ConfigError for a malformed `attack.target` (item ids are checked later,
    against the data)."""
    entries = spec if isinstance(spec, list) else [spec]
    if isinstance(spec, list) and not spec:
        raise ConfigError("attack.target: expected at least one target, got []")
    for e in entries:
        _parse(e)


def _parse(e):
    """-> ("none"|"least"|"item"|"band", value)."""
    if isinstance(e, bool):
        raise ConfigError(f"attack.target: {e!r} is not none, least_popular, an item id or band:LO-HI")
    if isinstance(e, (int, np.integer)) or (isinstance(e, float) and float(e).is_integer()):
        if int(e) < 0:
            raise ConfigError(f"attack.target: item id {e!r} is negative")
        return "item", int(e)
    if isinstance(e, str):
        s = e.strip()
        if s == "none":
            return "none", None
        if s == "least_popular":
            return "least", None
        if s.isdigit():
            return "item", int(s)
        if s.startswith("band:"):
            try:
                lo, hi = (float(x) for x in s[5:].split("-"))
            except ValueError:
                raise ConfigError(f"attack.target: {e!r}: expected band:LO-HI, e.g. band:0.45-1") from None
            if not 0.0 <= lo < hi <= 1.0:
                raise ConfigError(f"attack.target: {e!r}: expected 0 <= LO < HI <= 1")
            return "band", (lo, hi)
    raise ConfigError(f"attack.target: {e!r} is not none, least_popular, an item id or band:LO-HI")


def item_counts(data) -> np.ndarray:
    """Training interactions per item (n_items,), int64: the public popularity side info.

    `PreparedData.item_popularity` holds exactly these counts; a device built from its
    exported partition (fedrec.partition) has them only when it is malicious (the threat
    model's public side information), since its own `train_items` are one user's."""
    return np.asarray(data.item_popularity, dtype=np.int64)


def popularity_order(counts: np.ndarray) -> np.ndarray:
    """Item ids from the most to the least popular (ties: lower id first)."""
    return np.lexsort((np.arange(len(counts)), -np.asarray(counts)))


def popularity_classes(counts: np.ndarray, edges=CLASS_EDGES) -> np.ndarray:
    """(n_items,) class per item: 0 = top edges[0] share of items by count, 1 = up to
    edges[1], 2 = the rest."""
    n = len(counts)
    rank = np.empty(n, np.int64)
    rank[popularity_order(counts)] = np.arange(n)
    cut0, cut1 = int(round(edges[0] * n)), int(round(edges[1] * n))
    return np.where(rank < cut0, 0, np.where(rank < cut1, 1, 2)).astype(np.int64)


def resolve_targets(cfg, data) -> np.ndarray:
    """The experiment's target items (sorted unique int64; empty for `none`)."""
    spec = cfg.attack.target
    entries = spec if isinstance(spec, list) else [spec]
    counts = item_counts(data)
    order = popularity_order(counts)
    n = data.n_items
    chosen: list = []
    rng = np.random.default_rng([cfg.seed, _TARGET_DRAW])
    for e in entries:
        kind, v = _parse(e)
        if kind == "none":
            continue
        if kind == "least":
            t = int(order[-1])
        elif kind == "item":
            if v >= n:
                raise ConfigError(f"attack.target: item {v} is outside [0, {n})")
            t = v
        else:
            lo, hi = v
            band = order[int(np.floor(lo * n)):int(np.ceil(hi * n))]
            band = band[~np.isin(band, chosen)]
            if not len(band):
                raise ConfigError(f"attack.target: {e!r} holds no item (of {n}) left to draw")
            t = int(rng.choice(band))
        if t not in chosen:
            chosen.append(t)
    return np.array(sorted(chosen), dtype=np.int64)


def history_holds(data, targets: np.ndarray) -> np.ndarray:
    """(n_users, T) bool: whether each user's history (training, validation, test) holds each
    target."""
    n_users = data.n_users
    out = np.zeros((n_users, len(targets)), dtype=bool)
    if not len(targets):
        return out
    col = np.full(data.n_items, -1, np.int64)
    col[targets] = np.arange(len(targets))
    owner = np.repeat(np.arange(n_users), np.diff(data.train_indptr))
    hit = col[data.train_items] >= 0
    out[owner[hit], col[data.train_items[hit]]] = True
    for held in (data.val_item, data.test_item):
        users = np.flatnonzero(held >= 0)
        c = col[held[users]]
        out[users[c >= 0], c[c >= 0]] = True
    if getattr(data, "test_indptr", None) is not None:
        t_owner = np.repeat(np.arange(n_users), np.diff(data.test_indptr))
        c = col[data.test_items]
        out[t_owner[c >= 0], c[c >= 0]] = True
    return out


def at_least_as_high(scores: np.ndarray, target_scores: np.ndarray, mask_rows=(), mask_cols=(),
                     own=None) -> np.ndarray:
    """(B, N) bool: the unmasked items of each row scoring at least its target's score
    (target_scores (B, 1)): ties count, and "not <" rather than ">=": a NaN item counts as
    higher and a NaN target is reached by every item. The masked entries and `own` (the
    (rows, cols) of the targets themselves) are False. Compared in the scores' own dtype
    (float32 values compare exactly as in float64)."""
    higher = ~(scores < target_scores)
    higher[mask_rows, mask_cols] = False
    if own is not None:
        higher[own] = False
    return higher


def target_ranks(scores: np.ndarray, targets: np.ndarray, mask_rows, mask_cols) -> np.ndarray:
    """(B, T) rank of each target among each row's unmasked items: the number of other
    unmasked items scoring at least as high (`at_least_as_high`: ties count
    against the target, so collapsed or NaN scores expose nothing; masked entries never
    count, even if a target is masked: the caller excludes such rows)."""
    s = np.asarray(scores)
    ts = s[:, targets]
    out = np.zeros((len(s), len(targets)), np.int64)
    for j, t in enumerate(targets):
        out[:, j] = at_least_as_high(s, ts[:, j:j + 1], mask_rows, mask_cols,
                                     (slice(None), int(t))).sum(axis=1)
    return out


def exposure(ranks: np.ndarray, eligible: np.ndarray, ks) -> dict:
    """Summed hits and denominators: {"er@K": (T,) hits, "users": (T,) eligible counts}."""
    out = {"users": eligible.sum(axis=0).astype(np.int64)}
    for k in ks:
        out[f"er@{k}"] = ((ranks < k) & eligible).sum(axis=0).astype(np.int64)
    return out


def exposure_metrics(hits: dict, targets: np.ndarray, prefix: str, ks) -> dict:
    """The metrics row's ER@K entries from summed `exposure` counts: `{prefix}_er@K` (the mean
    over targets of each target's ratio), `{prefix}_er_users` (the smallest denominator; the
    ratio of a target with no eligible user is 0), and per target `{prefix}_er@K_t{item}` and
    `{prefix}_er_users_t{item}` when there are several."""
    users = hits["users"]
    out = {}
    for k in ks:
        ratio = np.where(users > 0, hits[f"er@{k}"] / np.maximum(users, 1), 0.0)
        out[f"{prefix}_er@{k}"] = float(ratio.mean()) if len(ratio) else 0.0
        if len(targets) > 1:
            for t, r in zip(targets, ratio):
                out[f"{prefix}_er@{k}_t{int(t)}"] = float(r)
    out[f"{prefix}_er_users"] = int(users.min()) if len(users) else 0
    if len(targets) > 1:
        for t, u in zip(targets, users):
            out[f"{prefix}_er_users_t{int(t)}"] = int(u)
    return out
