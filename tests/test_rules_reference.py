"""The vectorised rules against straightforward reference implementations.

Random sparse rounds (popularity-skewed, so some items come from most clients and many from
one or two), several n and f, both forms: every rule must match a plain loop over items,
coordinates and clients written from the rule's definition (float tolerance; the same
dropped clients). The building blocks (median network, item median, client Gram, Krum
scores on padded sets) are checked the same way.
"""

import numpy as np
import pytest

from fedrec.protocol import Upload
from fedrec.runtime import configure_threads
from strategies import item_distances
from strategies.bulyan import BulyanRule
from strategies.common_rows import candidate_clients
from strategies.dense_distances import every_item_sent
from strategies.groups import count_blocks, item_median, median_network, select_middle
from strategies.krum import KrumRule, MultiKrumRule, client_sq_distances, krum_scores
from strategies.median import MedianRule
from strategies.norm_bound import NormBoundRule
from strategies.rule import RoundUpdates
from strategies.trimmed_mean import TrimmedMeanRule

configure_threads()

DIM = 3
ROUNDS = [(7, 1), (12, 2), (25, 2), (25, 5)]  # (n, f); Bulyan needs n >= 4f + 3


def random_round(n, seed, n_items=40, predictor=False, integers=False):
    """n clients, each sending 2..n_items/2 items drawn with a popularity skew."""
    rng = np.random.default_rng(seed)
    p = 1 / np.arange(1, n_items + 1) ** 1.2
    ups = []
    for c in range(n):
        k = int(rng.integers(2, n_items // 2))
        ids = np.sort(rng.choice(n_items, k, replace=False, p=p / p.sum()))
        rows = rng.standard_normal((k, DIM)) * rng.uniform(0.5, 2)
        rows = np.round(rows * 2) if integers else rows
        pred = [rng.standard_normal(4).astype(np.float32)] if predictor else []
        ups.append(Upload(ids, rows.astype(np.float32), pred, int(rng.integers(1, 20)), str(c)))
    w = np.array([u.num_examples for u in ups], np.float64)
    return RoundUpdates(ups, w, n_items, DIM)


def dense_view(u):
    """(n, n_items, dim) float64 updates with zeros for untouched rows, and the sent mask."""
    n = len(u)
    x = np.zeros((n, u.n_items, DIM))
    sent = np.zeros((n, u.n_items), bool)
    for c, up in enumerate(u.uploads):
        x[c, up.item_ids] = up.item_rows
        sent[c, up.item_ids] = True
    return x, sent


def close(a, b, scale=1.0):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=1e-5, atol=1e-5 * scale)


# ------------------------------------------------------------------ reference rules


def ref_trimmed(values, t):
    """Mean of the sorted values[t:len - t] along axis 0 (t=None: the median)."""
    v = np.sort(values, axis=0)
    m = len(v)
    t = (m - 1) // 2 if t is None else min(t, (m - 1) // 2)
    return v[t:m - t].mean(axis=0)


def ref_order_rule(u, form, t):
    x, sent = dense_view(u)
    out = np.zeros((u.n_items, DIM))
    for i in range(u.n_items):
        if form == "dense":
            out[i] = ref_trimmed(x[:, i], t if t is None else min(t, (len(u) - 1) // 2))
        elif sent[:, i].any():
            out[i] = ref_trimmed(x[sent[:, i], i], t)
    return out


def ref_krum_order(vectors, f, alive=None):
    """Krum scores (inf where not alive) of the rows of a (c, P) array."""
    c = len(vectors)
    alive = np.ones(c, bool) if alive is None else alive
    r = alive.sum()
    k = min(max(r - f - 2, 1), r - 1)
    scores = np.full(c, np.inf)
    for a in np.flatnonzero(alive):
        d = [np.sum((vectors[a] - vectors[b]) ** 2) for b in np.flatnonzero(alive) if b != a]
        scores[a] = np.sum(np.sort(d)[:k])
    return scores


def ref_multikrum_keep(vectors, f, keep):
    order = np.argsort(ref_krum_order(vectors, f), kind="stable")
    kept = np.zeros(len(vectors), bool)
    kept[order[:keep]] = True
    return kept


def ref_multikrum(u, form, f, keep):
    x, sent = dense_view(u)
    n = len(u)
    w = u.weights
    out = np.zeros((u.n_items, DIM))
    if form == "dense":
        flat = x.reshape(n, -1)
        if u.uploads[0].predictor:
            flat = np.hstack([flat, [np.concatenate(up.predictor) for up in u.uploads]])
        kept = ref_multikrum_keep(flat, f, keep)
        return np.tensordot(np.where(kept, w, 0) / w[kept].sum(), x, axes=1), kept
    for i in range(u.n_items):
        who = np.flatnonzero(sent[:, i])
        if len(who) >= f + 3:
            k = ref_multikrum_keep(x[who, i], f, max(1, len(who) - (n - keep)))
            out[i] = w[who[k]] @ x[who[k], i] / w[who[k]].sum()
        elif len(who):
            out[i] = np.median(x[who, i], axis=0)
    return out, None


def ref_bulyan_select(vectors, f):
    c = len(vectors)
    alive = np.ones(c, bool)
    for _ in range(c - 2 * f):
        alive[np.argmin(ref_krum_order(vectors, f, alive))] = False
    return ~alive


def ref_nearest_mean(values, f):
    """Per column: mean of the len - 2f values nearest the median (ties: the lower kept)."""
    out = np.zeros(values.shape[1])
    beta = len(values) - 2 * f
    for j in range(values.shape[1]):
        v = values[:, j]
        med = np.median(v)
        out[j] = v[np.lexsort((v, np.abs(v - med)))[:beta]].mean()
    return out


def ref_bulyan(u, form, f):
    x, sent = dense_view(u)
    n = len(u)
    out = np.zeros((u.n_items, DIM))
    if form == "dense":
        picked = ref_bulyan_select(x.reshape(n, -1), f)
        for i in range(u.n_items):
            out[i] = ref_nearest_mean(x[picked, i], f)
        return out, picked
    for i in range(u.n_items):
        who = np.flatnonzero(sent[:, i])
        if len(who) >= 4 * f + 3:
            picked = ref_bulyan_select(x[who, i], f)
            out[i] = ref_nearest_mean(x[who[picked], i], f)
        elif len(who):
            out[i] = np.median(x[who, i], axis=0)
    return out, None


def ref_norm_bound(u, form, bound):
    x, sent = dense_view(u)
    w = u.weights
    if form == "dense":
        norms = np.sqrt((x ** 2).sum(axis=(1, 2)))
        x = x * np.minimum(1, bound / np.maximum(norms, 1e-300))[:, None, None]
        return np.tensordot(w / w.sum(), x, axes=1)
    norms = np.sqrt((x ** 2).sum(axis=2))
    x = x * np.minimum(1, bound / np.maximum(norms, 1e-300))[:, :, None]
    ws = w[:, None] * sent
    return np.einsum("ci,cid->id", ws, x) / np.maximum(ws.sum(0), 1e-300)[:, None]


# ------------------------------------------------------------------ the rules


@pytest.mark.parametrize("n, f", ROUNDS)
@pytest.mark.parametrize("form", ["item", "dense"])
def test_median_and_trimmed_mean_match_the_reference(n, f, form):
    for seed, integers in ((n, False), (n + 1, True)):  # integers: many ties
        u = random_round(n, seed, integers=integers)
        close(MedianRule(form)(u).item_grad, ref_order_rule(u, form, None))
        close(TrimmedMeanRule(form, f)(u).item_grad, ref_order_rule(u, form, f))


@pytest.mark.parametrize("n, f", ROUNDS)
@pytest.mark.parametrize("form", ["item", "dense"])
def test_krum_and_multikrum_match_the_reference(n, f, form):
    u = random_round(n, 100 + n + f, predictor=form == "dense")
    for rule, keep in ((KrumRule(form, f), 1), (MultiKrumRule(form, f), n - f),
                       (MultiKrumRule(form, f, m=n // 2), n // 2)):
        agg = rule(u)
        expect, kept = ref_multikrum(u, form, f, keep)
        close(agg.item_grad, expect)
        if form == "dense":
            assert agg.dropped == list(np.flatnonzero(~kept)), rule.name


@pytest.mark.parametrize("keep", [1, 3, 6])
def test_dense_krum_sums_the_kept_rows_to_the_bits_of_all_rows_weighted(keep):
    """Krum scatters the kept clients' rows alone (kept_weighted_sum): the same float32 bits
    as weighting every row, the dropped ones by 0, in upload order."""
    from strategies.aggregate import sparse_weighted_sum
    from strategies.krum import kept_weighted_sum

    u = random_round(8, 7 + keep)
    ids, rows, owner = u.stacked
    kept = np.zeros(8, bool)
    kept[np.random.default_rng(keep).choice(8, keep, replace=False)] = True
    w = np.where(kept, u.weights, 0.0) / u.weights[kept].sum()
    got = kept_weighted_sum(ids, rows, owner, kept, w, u.n_items)
    want = sparse_weighted_sum(ids, rows, w[owner], u.n_items)
    assert got.tobytes() == want.tobytes()
    assert (got[np.setdiff1d(np.arange(u.n_items), ids[kept[owner]])] == 0).all()


def wide_round(n, m, n_items, dim, seed):
    """n clients, each item sent by m of them: float rows of `dim` coordinates (ML-1M's 64:
    batched float32 products of such rows need not be symmetric to the last bit)."""
    rng = np.random.default_rng(seed)
    sent = np.zeros((n, n_items), bool)
    for i in range(n_items):
        sent[rng.choice(n, m[i], replace=False), i] = True
    ups = [Upload(np.flatnonzero(sent[c]), rng.standard_normal((sent[c].sum(), dim))
                  .astype(np.float32), [], 1, str(c)) for c in range(n)]
    return RoundUpdates(ups, np.ones(n), n_items, dim)


@pytest.mark.parametrize("f", [1, 2])
def test_item_level_krum_and_bulyan_break_exact_ties_like_the_reference(f):
    """With k = 1 neighbour (m_i = f + 3 rows; Bulyan's last picks) the two rows of the
    closest pair tie exactly (d(a, b) = d(b, a)): the earlier must win, so the distances
    must be symmetric to the last bit."""
    n, dim = 14, 64
    m = np.random.default_rng(f).choice([f + 3, f + 4, 4 * f + 3, 4 * f + 4], 120)
    u = wide_round(n, m, 120, dim, seed=f)
    ids, rows, owner = u.stacked
    krum_agg, bulyan_agg = KrumRule("item", f)(u), BulyanRule("item", f)(u)
    for i in range(u.n_items):
        x = rows[ids == i].astype(np.float64)
        kept = ref_multikrum_keep(x, f, 1)
        close(krum_agg.item_grad[i], x[kept][0], scale=10)
        if len(x) >= 4 * f + 3:
            close(bulyan_agg.item_grad[i], ref_nearest_mean(x[ref_bulyan_select(x, f)], f),
                  scale=10)


@pytest.mark.parametrize("n, f", [r for r in ROUNDS if r[0] >= 4 * r[1] + 3] + [(40, 3)])
@pytest.mark.parametrize("form", ["item", "dense"])
def test_bulyan_matches_the_reference(n, f, form):
    u = random_round(n, 200 + n + f)
    agg = BulyanRule(form, f)(u)
    expect, picked = ref_bulyan(u, form, f)
    close(agg.item_grad, expect)
    if form == "dense":
        assert agg.dropped == list(np.flatnonzero(~picked))


@pytest.mark.parametrize("form", ["item", "dense"])
def test_norm_bound_matches_the_reference(form):
    u = random_round(12, 7)
    for bound in (0.5, 3.0, 100.0):
        close(NormBoundRule(form, bound)(u).item_grad, ref_norm_bound(u, form, bound))


# ------------------------------------------------------------------ building blocks


def test_median_network_selects_the_middle_of_every_width():
    rng = np.random.default_rng(3)
    for width in range(1, 40):
        x = rng.standard_normal((width, 50)).astype(np.float32)
        x[:, :5] = np.round(x[:, :5])  # ties
        expect = np.sort(x, axis=0)
        lo, hi = select_middle(x.copy())
        np.testing.assert_array_equal(lo, expect[(width - 1) // 2])
        np.testing.assert_array_equal(hi, expect[width // 2])
        if width <= 16:  # pruned: never more comparators than the sorting network
            assert len(median_network(width)) <= width * width


def test_item_median_subsets_and_output_table():
    u = random_round(25, 11)
    ids, rows, _ = u.stacked
    x, sent = dense_view(u)
    counts = sent.sum(0)
    keep = np.random.default_rng(0).random(len(ids)) < 0.7
    out = np.full((u.n_items, DIM), 7.0, np.float32)
    item_median(ids, rows, u.n_items, out=out, max_count=6, keep=keep)
    kept_count = np.bincount(ids[keep], minlength=u.n_items)
    for i in range(u.n_items):
        vals = rows[keep & (ids == i)]
        if 0 < kept_count[i] < 6:
            close(out[i], np.median(vals, axis=0))
        else:  # untouched: items outside the subset keep what the table held
            assert (out[i] == 7).all(), (i, counts[i], kept_count[i])


def test_count_blocks_partition_the_rows_by_item():
    ids = np.array([3, 1, 3, 2, 3, 1, 5, 0, 0, 0, 0, 7, 7, 7, 7, 7])
    order, exact, padded = count_blocks(ids, min_count=2, exact_below=4)
    groups = [order[a:b].reshape(-1, k) for k, a, b in exact]
    groups += [[r[r >= 0] for r in idx] for idx in padded]
    seen = []
    for block in groups:
        for rows in block:
            assert len(set(ids[rows])) == 1 and np.sum(ids == ids[rows[0]]) == len(rows)
            assert list(rows) == sorted(rows)  # client order within an item
            seen += list(rows)
    assert sorted(seen) == [r for r in range(len(ids)) if np.sum(ids == ids[r]) >= 2]
    assert [k for k, _, _ in exact] == [2, 3] and [idx.shape for idx in padded] == [(1, 4), (1, 5)]


@pytest.mark.parametrize("exact_below", [item_distances.EXACT_BLOCKS, 4])  # 4: padded too
def test_client_distances_match_dense_updates(monkeypatch, exact_below):
    monkeypatch.setattr(item_distances, "EXACT_BLOCKS", exact_below)
    u = random_round(25, 5, n_items=60)
    ids, rows, owner = u.stacked
    x, _ = dense_view(u)
    flat = x.reshape(len(u), -1)
    expect = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    close(client_sq_distances(ids, rows, owner, len(u)), expect, scale=expect.max())


def test_client_distances_of_huge_rows_match_dense_updates():
    """Rows near float32's limit in items of 2-4 clients (the cross products one pair at a
    time, item_distances.pair_products) and of more: float32 products overflow, the
    distances must not."""
    u = random_round(12, 8, n_items=30)
    counts = np.bincount(u.stacked[0])
    small, large = np.flatnonzero(np.isin(counts, [2, 3, 4]))[0], np.argmax(counts)
    for up in u.uploads:  # item `small` (2-4 rows) and the most popular one: huge
        sel = np.isin(up.item_ids, [small, large])
        up.item_rows[sel] = np.float32(2e38) * np.sign(up.item_rows[sel])
    u = RoundUpdates(u.uploads, u.weights, u.n_items, DIM)
    ids, rows, owner = u.stacked
    x, _ = dense_view(u)
    flat = x.reshape(len(u), -1)
    expect = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    got = client_sq_distances(ids, rows, owner, len(u))
    assert np.isfinite(got).all()
    close(got, expect, scale=expect.max())


@pytest.mark.parametrize("predictor", [False, True])
@pytest.mark.parametrize("own_share", [0.02, 0.3])
def test_client_distances_of_dense_uploads_match_the_definition(predictor, own_share):
    """Every client sends every item in order (weight_decay_scope all), most rows of an item
    the same bits for every client (its weight decay), the others each client's own, and
    one client (an attacker) all its own: the common-row path (few own rows) and the one
    Gram of the whole tables (many), against the differences of the flattened updates."""
    rng = np.random.default_rng(7)
    n, n_items = 9, 4000
    common = (rng.standard_normal((n_items, DIM)) * 1e-5).astype(np.float32)
    tables = np.repeat(common[None], n, axis=0)
    own = rng.random((n, n_items)) < own_share
    own[0] = True
    tables[own] = (rng.standard_normal((int(own.sum()), DIM))
                   * rng.uniform(0.1, 3, (int(own.sum()), 1))).astype(np.float32)
    _, share = candidate_clients(tables)  # which path: few own rows, or many
    assert (share >= item_distances.COMMON_ROW_SHARE) == (own_share < 0.1)
    rows = tables.reshape(n * n_items, DIM)
    ids, owner = np.tile(np.arange(n_items), n), np.repeat(np.arange(n), n_items)
    assert every_item_sent(ids, n)
    preds = rng.standard_normal((n, 5)).astype(np.float32) if predictor else None
    flat = np.concatenate([rows.reshape(n, -1), preds], 1) if predictor else rows.reshape(n, -1)
    flat = flat.astype(np.float64)
    expect = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    got = client_sq_distances(ids, rows, owner, n, preds)
    np.testing.assert_allclose(got, expect, rtol=1e-12, atol=1e-12 * expect.max())
    swapped = ids.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # out of order: not dense, the per-item blocks
    assert not every_item_sent(swapped, n) and not every_item_sent(ids[:-1], n)


def test_krum_scores_on_padded_sets_match_the_reference():
    rng = np.random.default_rng(4)
    counts = np.array([1, 2, 5, 9, 9])
    vecs = rng.standard_normal((5, 9, 3))
    sq = ((vecs[:, :, None] - vecs[:, None]) ** 2).sum(-1)
    sq[0, 1:] = sq[0, :, 1:] = 1e9  # padding entries are never read
    scores = krum_scores(sq, 1, counts)
    for b, m in enumerate(counts):
        close(scores[b, :m], ref_krum_order(vecs[b, :m], 1), scale=sq[b, :m, :m].max())
        assert np.isinf(scores[b, m:]).all()


def test_item_krum_is_exact_next_to_a_huge_row():
    """One row of 1000 among rows near 1e-3 (or the issue's [-1, -208000, 0, 2]): the centred
    float32 Gram loses every small distance; the rule must still pick what a float64 loop
    picks (issue 10: it picked wrongly 46 times in 50)."""
    from strategies.krum import KrumRule, block_sq_distances

    x = np.array([[[-1.0], [-208000.0], [0.0], [2.0]]], np.float32)
    np.testing.assert_array_equal(block_sq_distances(x)[0][[0, 0, 2], [2, 3, 3]], [1, 9, 4])
    rng = np.random.default_rng(7)
    for trial in range(50):
        n, dim, f = 12, 64, 2
        rows = (rng.standard_normal((n, dim)) * 1e-3).astype(np.float32)
        rows[rng.integers(n)] = 1000.0
        u = RoundUpdates([Upload(np.array([0]), rows[c:c + 1], [], 1, str(c)) for c in range(n)],
                         np.ones(n), 1, dim)
        x64 = rows.astype(np.float64)
        d = ((x64[:, None] - x64[None]) ** 2).sum(-1)
        scores = [np.sort(np.delete(d[a], a))[:n - f - 2].sum() for a in range(n)]
        agg = KrumRule("item", f=f)(u)
        np.testing.assert_array_equal(agg.item_grad[0], rows[int(np.argmin(scores))], err_msg=trial)


def test_block_distances_recompute_exactly_the_pairs_the_gram_cannot_resolve():
    """Groups of near-zero rows next to a few large ones (contrastive uploads), where a
    float32 Gram can lose the small distances to cancellation. Every real pair must
    come out within 1e-4 of the float64 differences (those pairs recomputed one by one), the
    others too, and padding must not matter."""
    from strategies.krum import block_sq_distances

    rng = np.random.default_rng(11)
    U, width, dim = 40, 12, 64
    x = (rng.standard_normal((U, width, dim)) * 1e-4).astype(np.float32)
    x[:, :2] = rng.standard_normal((U, 2, dim)).astype(np.float32)  # two large rows
    counts = rng.integers(3, width + 1, U)
    x[np.arange(width)[None, :] >= counts[:, None]] = 0.0
    got = block_sq_distances(x)
    x64 = x.astype(np.float64)
    expect = ((x64[:, :, None] - x64[:, None]) ** 2).sum(-1)
    for g in range(U):
        m = counts[g]
        np.testing.assert_allclose(got[g, :m, :m], expect[g, :m, :m], rtol=1e-4, atol=0)
