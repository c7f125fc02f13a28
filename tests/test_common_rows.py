"""Dense uploads split into a common table and own rows (strategies.common_rows), and the
coordinate-wise rules that read them that way: the same selections as sorting all n rows."""

import numpy as np
import pytest

from fedrec.protocol import Upload
from strategies.common_rows import common_rows
from strategies.median import MedianRule
from strategies.robust import MEDIAN, common_row_trimmed_mean, coordinate_trimmed_mean
from strategies.rule import RoundUpdates
from strategies.trimmed_mean import TrimmedMeanRule


def dense_round(n: int, k: int, dim: int, seed: int, own_share: float = 0.1,
                attackers: int = 1) -> np.ndarray:
    """(n, k, dim) tables as the reference protocol sends them: per item one common row
    (the weight decay) that most clients send bit for bit, a few own rows, and `attackers`
    clients whose every row is their own (a ClusterAttack upload)."""
    rng = np.random.default_rng(seed)
    common = (rng.standard_normal((k, dim)) * 1e-5).astype(np.float32)
    tables = np.repeat(common[None], n, axis=0)
    own = rng.random((n, k)) < own_share
    own[:attackers] = True
    tables[own] += rng.standard_normal((int(own.sum()), dim)).astype(np.float32)
    return tables


def slow_trimmed_mean(tables: np.ndarray, trim) -> np.ndarray:
    """The obvious loop: per item and coordinate, sort the n values, keep ranks [t, n - t)
    (the median: the mean of the middle one or two), mean in float64."""
    n, k, dim = tables.shape
    out = np.zeros((k, dim))
    for i in range(k):
        for j in range(dim):
            v = np.sort(tables[:, i, j].astype(np.float64))
            if trim is MEDIAN:
                out[i, j] = 0.5 * (v[(n - 1) // 2] + v[n // 2])
            else:
                t = min(trim, (n - 1) // 2)
                out[i, j] = v[t:n - t].mean()
    return out


def test_common_rows_split_is_exact():
    tables = dense_round(12, 40, 3, seed=0, attackers=2)
    # item 5: the first client's row is its own and a second client shares it (a minority
    # pair); item 7: every row distinct (no common row); item 9: -0.0 against 0.0
    tables[0, 5] = tables[1, 5] = 7.0
    tables[2:, 5] = 0.25
    tables[:, 7] = np.arange(12 * 3, dtype=np.float32).reshape(12, 3)
    tables[:, 9] = 0.0
    tables[3, 9, 1] = -0.0
    common, same = common_rows(tables)
    bits = tables.view(np.uint32)
    # same[c, i] iff client c's row is the common row bit for bit
    np.testing.assert_array_equal(same, (bits == common.view(np.uint32)[None]).all(axis=2))
    # the common row of item 5 is the majority's (not the first client's pair)
    assert same[2:, 5].all() and not same[:2, 5].any()
    assert same[:, 7].sum() == 1  # no row shared: one of them stands for itself
    assert same[:, 9].sum() == 11 and not same[3, 9]  # -0.0 is an own row, kept as a value
    # the multiset per item: own rows plus the common one (n - m) times
    for i in range(tables.shape[1]):
        rebuilt = np.concatenate([tables[~same[:, i], i],
                                  np.repeat(common[i][None], same[:, i].sum(), axis=0)])
        np.testing.assert_array_equal(np.sort(rebuilt, axis=0), np.sort(tables[:, i], axis=0))


@pytest.mark.parametrize("n", [5, 8, 50])
@pytest.mark.parametrize("trim", [MEDIAN, 0, 1, 2, 30])
def test_common_row_order_statistics_match_the_full_sort(n, trim):
    tables = dense_round(n, 60, 4, seed=n, own_share=0.15, attackers=1)
    tables[0, 3] = 1e30  # a crafted extreme, trimmed (or not) like any value
    tables[1, 4] = -3e38
    fast = common_row_trimmed_mean(tables, 62, trim)
    assert fast.dtype == np.float32 and fast.shape == (62, 4)
    assert not fast[60:].any()  # items nobody sent
    slow = slow_trimmed_mean(tables, trim)
    np.testing.assert_allclose(fast[:60], slow, rtol=2e-7, atol=1e-12)
    # against the path that sorts all n rows of every item
    ids = np.tile(np.arange(60), n)
    full = coordinate_trimmed_mean(ids, tables.reshape(-1, 4), 62, trim, n_clients=n)
    if trim is MEDIAN:  # the same two values, the same arithmetic: the same bits
        np.testing.assert_array_equal(fast, full)
    else:  # float64 sums: never further from the exact mean than the float32 slot sums
        ulp = np.spacing(np.abs(slow).astype(np.float32)).astype(np.float64)
        fast_err = np.abs(fast[:60].astype(np.float64) - slow)
        full_err = np.abs(full[:60].astype(np.float64) - slow)
        assert (fast_err <= np.maximum(full_err, ulp)).all()


def _updates(tables: np.ndarray) -> RoundUpdates:
    n, k, dim = tables.shape
    ups = [Upload(np.arange(k), tables[c], [], 1, str(c)) for c in range(n)]
    return RoundUpdates(ups, np.ones(n), k, dim)


@pytest.mark.parametrize("granularity", ["dense", "item"])
def test_rules_on_dense_uploads_take_the_common_rows(granularity, monkeypatch):
    """The median and trimmed-mean rules on dense uploads give the full sort's result in
    both forms (every item has all n rows, so the forms agree), through the common-row path."""
    import strategies.robust as robust

    tables = dense_round(10, 30, 3, seed=4, attackers=2)
    calls = []
    real = robust.common_row_trimmed_mean
    monkeypatch.setattr(robust, "common_row_trimmed_mean",
                        lambda *a: calls.append(1) or real(*a))
    median = MedianRule(granularity)(_updates(tables)).item_grad
    trimmed = TrimmedMeanRule(granularity, f=2)(_updates(tables)).item_grad
    assert len(calls) == 2
    np.testing.assert_allclose(median, slow_trimmed_mean(tables, MEDIAN), rtol=2e-7, atol=1e-12)
    np.testing.assert_allclose(trimmed, slow_trimmed_mean(tables, 2), rtol=2e-7, atol=1e-12)


def test_common_row_distances_of_crafted_rows_match_the_definition():
    """Krum's distances on dense uploads from the own rows alone, with an attacker's rows
    near float32's limit and a client that copies the common rows exactly (zero distance
    to every other such copy)."""
    from strategies.item_distances import COMMON_ROW_SHARE, common_row_sq_distances
    from strategies.common_rows import candidate_clients

    tables = dense_round(20, 200, 3, seed=9, own_share=0.03, attackers=1)
    tables[0, :10] = np.float32(3e38) * np.sign(tables[0, :10])
    tables[1] = tables[2]  # an exact copy of another client
    middle, share = candidate_clients(tables)
    assert share >= COMMON_ROW_SHARE
    got = common_row_sq_distances(tables, None, middle)
    flat = tables.reshape(20, -1).astype(np.float64)
    expect = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    assert np.isfinite(got).all() and got[1, 2] == 0.0
    np.testing.assert_allclose(got, expect, rtol=1e-12, atol=1e-12 * expect[1:, 1:].max())


def test_common_rows_of_a_strided_stack():
    """Tables that are a strided view (not C-contiguous) split as their contiguous copy."""
    tables = dense_round(6, 30, 4, seed=2)
    strided = np.concatenate([tables, tables], axis=2)[:, :, :4]
    assert not strided.flags.c_contiguous
    common, same = common_rows(strided)
    expect_common, expect_same = common_rows(np.ascontiguousarray(strided))
    np.testing.assert_array_equal(same, expect_same)
    np.testing.assert_array_equal(common, expect_common)


@pytest.mark.parametrize("width", [8, 16, 32, 3, 12])
def test_rows_equal_matches_the_word_by_word_loop(width):
    """rows_equal (64-bit reads of the comparison booleans where a row has a multiple of 8
    words) against the obvious loop, on rows that differ from the reference row in a single
    bit of a single word, at every word position, or not at all."""
    from strategies.common_rows import rows_equal

    rng = np.random.default_rng(width)
    n, k = 5, 4 * width + 3
    row_words = rng.integers(0, 2**63, size=(k, width), dtype=np.uint64)
    words = np.repeat(row_words[None], n, axis=0)
    for c in range(n):
        flip = rng.random(k) < 0.5
        for i in np.flatnonzero(flip):
            words[c, i, rng.integers(width)] ^= np.uint64(1) << np.uint64(rng.integers(64))
    words[1, : width, :] = row_words[:width]  # equal
    for j in range(width):  # one flipped bit in each word position, the top bit included
        words[2, j] = row_words[j]
        words[2, j, j] ^= np.uint64(1) << np.uint64(63 if j % 2 else 0)
    expect = np.array([[all(words[c, i, j] == row_words[i, j] for j in range(width))
                        for i in range(k)] for c in range(n)])
    got = rows_equal(words, row_words)
    np.testing.assert_array_equal(got, expect)
    assert got.any() and not got.all()
    # float32 rows seen as 64-bit words: -0.0 and 0.0, and two NaN payloads, differ in bits
    a = np.zeros((3, 16), np.float32)
    b = a.copy()
    b[1, 15] = -0.0
    a[2, 0] = np.float32("nan")
    b[2, 0] = np.uint32(0x7FC00001).view(np.float32)
    np.testing.assert_array_equal(rows_equal(b.view(np.uint64)[None], a.view(np.uint64)),
                                  [[True, False, False]])
