"""The upload format: round trip and every rejection, with its reason."""

import mmap

import numpy as np
import pytest

from fedrec.protocol import UploadError, decode_upload, encode_upload

N_ITEMS, DIM = 10, 3
SHAPES = [(DIM,), (2, 4)]


def _good():
    ids = np.array([1, 4, 9])
    rows = np.arange(9, dtype=np.float32).reshape(3, DIM)
    pred = [np.ones(DIM, np.float32), np.full((2, 4), 0.5, np.float32)]
    return ids, rows, pred


def _decode(arrays, n=5, **kw):
    kw = {"n_items": N_ITEMS, "dim": DIM, "predictor_shapes": SHAPES, **kw}
    return decode_upload(arrays, n, **kw)


def _reason(arrays, n=5, **kw) -> str:
    with pytest.raises(UploadError) as e:
        _decode(arrays, n, **kw)
    return e.value.reason


def test_round_trip():
    ids, rows, pred = _good()
    arrays = encode_upload(ids, rows.astype(np.float64), pred)
    assert [a.dtype for a in arrays] == [np.int64, np.float32, np.float32, np.float32]
    up = _decode(arrays, 7, client="c3")
    np.testing.assert_array_equal(up.item_ids, ids)
    np.testing.assert_array_equal(up.item_rows, rows)
    assert up.item_ids.dtype == np.int64 and up.item_rows.dtype == np.float32
    assert len(up.predictor) == 2
    for a, b in zip(up.predictor, pred):
        np.testing.assert_array_equal(a, b)
    assert up.num_examples == 7 and up.client == "c3"
    # an empty upload is valid; numpy integer sample counts are accepted
    empty = encode_upload(np.zeros(0, np.int64), np.zeros((0, DIM)), pred)
    assert len(_decode(empty, np.int64(1)).item_ids) == 0


def test_unsorted_unique_ids_are_put_in_order_with_their_rows():
    ids, rows, pred = _good()
    up = _decode([ids[::-1].copy(), rows[::-1].copy(), *pred])
    np.testing.assert_array_equal(up.item_ids, ids)
    np.testing.assert_array_equal(up.item_rows, rows)


@pytest.mark.parametrize("bad_ids", [[1, 4, 10], [-1, 4, 9], [1, 4, 1000], [9, 4, -2]])
def test_ids_out_of_range(bad_ids):
    _, rows, pred = _good()
    assert _reason([np.array(bad_ids), rows, *pred]) == "ids_range"


def test_ids_repeated():
    _, rows, pred = _good()
    assert _reason([np.array([1, 4, 4]), rows, *pred]) == "ids_repeated"
    assert _reason([np.array([4, 1, 4]), rows, *pred]) == "ids_repeated"


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_and_predictor(value):
    ids, rows, pred = _good()
    bad = rows.copy()
    bad[1, 2] = value
    assert _reason([ids, bad, *pred]) == "non_finite"
    p = [pred[0], pred[1].copy()]
    p[1][1, 3] = value
    assert _reason([ids, rows, *p]) == "non_finite"


def test_float64_values_that_overflow_float32_are_non_finite():
    ids, rows, pred = _good()
    big = rows.astype(np.float64)
    big[0, 0] = 1e39  # finite in float64, inf once the server casts it to float32
    with np.errstate(over="ignore"):
        assert _reason([ids, big, *pred]) == "non_finite"
        p = [pred[0].astype(np.float64) * 1e300, pred[1]]
        assert _reason([ids, rows, *p]) == "non_finite"


def test_values_beyond_max_abs_are_dropped_not_overflowed():
    """server.max_abs_value (default 1e4): finite values up to it pass; beyond it the upload is
    dropped as too_large (3e38 rows would overflow every float32 sum downstream)."""
    from fedrec.protocol import DEFAULT_MAX_ABS, decode_uploads

    ids, rows, pred = _good()
    edge = np.full_like(rows, DEFAULT_MAX_ABS)
    assert np.array_equal(_decode([ids, edge, *pred]).item_rows, edge)
    for big in (3e38, DEFAULT_MAX_ABS * 1.001):
        with pytest.raises(UploadError) as e:
            _decode([ids, np.full_like(rows, big), *pred])
        assert e.value.reason == "too_large"
        # the round-level fast path decides the same
        ups, _, errors = decode_uploads([([ids, np.full_like(rows, big), *pred], 3, "x")],
                                        n_items=N_ITEMS, dim=DIM, predictor_shapes=SHAPES)
        assert not ups and errors[0][1].reason == "too_large"
    with pytest.raises(UploadError) as e:  # the predictor too
        _decode([ids, rows, *[np.full_like(p, -2e4) for p in pred]])
    assert e.value.reason == "too_large"


@pytest.mark.parametrize("rows", [
    np.zeros((3, DIM + 1), np.float32),  # wrong dim
    np.zeros((2, DIM), np.float32),  # fewer rows than ids
    np.zeros(3 * DIM, np.float32),  # 1-D
    np.zeros((3, DIM), np.int64),  # integer rows
    np.zeros((3, DIM, 1), np.float32),
])
def test_wrong_row_shape_or_dtype(rows):
    ids, _, pred = _good()
    assert _reason([ids, rows, *pred]) == "rows_shape"


@pytest.mark.parametrize("ids", [np.array([1.0, 4.0, 9.0]), np.array([[1, 4, 9]]),
                                 np.array([True, False, True]), np.array(["1", "4", "9"])])
def test_wrong_id_dtype(ids):
    _, rows, pred = _good()
    assert _reason([ids, rows, *pred]) == "ids_dtype"


@pytest.mark.parametrize("j, a", [(0, np.zeros(DIM + 1, np.float32)), (1, np.zeros((4, 2), np.float32)),
                                  (1, np.zeros((2, 4), np.int32)), (0, np.zeros((1, DIM), np.float32))])
def test_wrong_predictor_shape(j, a):
    ids, rows, pred = _good()
    pred[j] = a
    assert _reason([ids, rows, *pred]) == "predictor_shape"


def test_too_many_rows():
    ids, rows, pred = _good()
    assert _reason([ids, rows, *pred], max_rows=2) == "too_many_rows"
    assert len(_decode([ids, rows, *pred], max_rows=3).item_ids) == 3


@pytest.mark.parametrize("n", [0, -1, True, 1.5, "3", None, 10_000_001])
def test_bad_num_examples(n):
    ids, rows, pred = _good()
    assert _reason([ids, rows, *pred], n) == "num_examples"


def test_max_examples_setting():
    ids, rows, pred = _good()
    assert _reason([ids, rows, *pred], 101, max_examples=100) == "num_examples"
    assert _decode([ids, rows, *pred], 100, max_examples=100).num_examples == 100


@pytest.mark.parametrize("arrays", [
    "drop_last", "extra", "not_a_list", "empty",
])
def test_wrong_array_count(arrays):
    ids, rows, pred = _good()
    full = [ids, rows, *pred]
    arrays = {"drop_last": full[:-1], "extra": full + [np.zeros(1, np.float32)],
              "not_a_list": {"ids": ids}, "empty": []}[arrays]
    assert _reason(arrays) == "array_count"


def test_model_without_predictor():
    ids, rows, _ = _good()
    up = decode_upload([ids, rows], 3, n_items=N_ITEMS, dim=DIM, predictor_shapes=[])
    assert up.predictor == []
    with pytest.raises(UploadError) as e:
        decode_upload([ids, rows, np.zeros(1, np.float32)], 3, n_items=N_ITEMS, dim=DIM,
                      predictor_shapes=[])
    assert e.value.reason == "array_count" and str(e.value).startswith("array_count")


def test_batch_decode_makes_the_same_decisions_as_one_by_one():
    """decode_uploads (the server's fast path) accepts/rejects exactly like decode_upload."""
    from fedrec.protocol import decode_uploads

    rng = np.random.default_rng(3)
    n_items, dim, shapes = 20, 3, [(2,)]

    def good(k=4):
        ids = np.sort(rng.choice(n_items, k, replace=False)).astype(np.int64)
        return [ids, rng.standard_normal((k, dim)).astype(np.float32), np.ones(2, np.float32)]

    cases = []
    cases.append((good(), 5))
    a = good(); a[0] = a[0][::-1].copy(); a[1] = a[1][::-1].copy(); cases.append((a, 5))  # unsorted
    a = good(); a[1][1, 2] = np.nan; cases.append((a, 5))
    a = good(); a[1][0, :] = 3e38; cases.append((a, 5))                                      # sum overflows, finite
    a = good(); a[0][-1] = n_items; cases.append((a, 5))
    a = good(); a[0][1] = a[0][0]; cases.append((a, 5))                                      # repeated
    a = good(); a[2] = np.array([np.inf, 0], np.float32); cases.append((a, 5))
    a = good(); a[1][2, 0] = -2e4; cases.append((a, 5))                                      # too large, negative
    a = good(); a[2] = np.array([0, -3e4], np.float32); cases.append((a, 5))                 # predictor, negative
    cases.append((good(), 0))
    a = good(); a[1] = a[1].astype(np.float64); cases.append((a, 5))                          # slow path
    a = good(); a[1] = a[1].astype(np.float64) * 1e39; cases.append((a, 5))                  # inf after cast
    cases.append((good(0), 5))
    cases.append((good()[:2], 5))                                                              # array count
    items = [(arr, n, f"c{i}") for i, (arr, n) in enumerate(cases)]
    uploads, (ids, rows, owner), errors = decode_uploads(items, n_items=n_items, dim=dim,
                                                         predictor_shapes=shapes)
    expected_ok, expected_err = [], {}
    for arr, n, c in items:
        try:
            expected_ok.append(decode_upload(arr, n, n_items=n_items, dim=dim, predictor_shapes=shapes,
                                             client=c))
        except UploadError as e:
            expected_err[c] = e.reason
    assert [u.client for u in uploads] == [u.client for u in expected_ok]
    assert {c: e.reason for c, e in errors} == expected_err
    for u, v in zip(uploads, expected_ok):
        assert np.array_equal(u.item_ids, v.item_ids) and np.array_equal(u.item_rows, v.item_rows)
    assert np.array_equal(ids, np.concatenate([u.item_ids for u in uploads]))
    assert np.array_equal(rows, np.concatenate([u.item_rows for u in uploads]))
    assert np.array_equal(owner, np.repeat(np.arange(len(uploads)), [len(u.item_ids) for u in uploads]))
    assert set(expected_err.values()) >= {"non_finite", "too_large", "ids_range", "ids_repeated",
                                           "num_examples", "array_count"}


def test_joined_rows_is_a_view_only_for_back_to_back_blocks():
    from fedrec.models.base import RowArena
    from fedrec.protocol import joined_rows

    arena = RowArena(10)
    a, b, c = arena.take(3, 4), arena.take(0, 4), arena.take(5, 4)
    arena.array[:] = np.arange(40, dtype=np.float32).reshape(10, 4)
    blocks = [a[:1], a[1:], b, c]  # client slices of two chunks, an empty upload between
    joined = joined_rows(blocks)
    assert np.shares_memory(joined, arena.array)
    assert np.array_equal(joined, np.concatenate(blocks))
    # a gap, the wrong order, or a foreign block: a copy, the same values as np.concatenate
    for parts in ([a, c[1:]], [c, a], [a, c.copy()], [a[:, :2], a[:, 2:]]):
        got = joined_rows(parts)
        assert not np.shares_memory(got, arena.array)
        assert np.array_equal(got, np.concatenate(parts))
    assert joined_rows([np.zeros((0, 4), np.float32)]).shape == (0, 4)
    # rows over memory that is no array (a worker pool's shared mmap): copied
    shared = mmap.mmap(-1, 64)
    parts = [np.ndarray((n, 4), np.float32, buffer=shared, offset=16 * r) for r, n in ((0, 1), (1, 3))]
    assert isinstance(parts[0].base, mmap.mmap)
    assert np.array_equal(joined_rows(parts), np.concatenate(parts))
    assert arena.take(3, 4).base is None  # beyond the bound: a block of its own


@pytest.mark.parametrize("poison, ok", [(None, True), (np.nan, False), (np.inf, False),
                                        (-np.inf, False), (2e4, False), (-2e4, False),
                                        (-1e4, True)])
def test_value_check_of_a_large_round_takes_one_pass_with_the_same_verdict(monkeypatch, poison, ok):
    """_within on a dense round's worth of values (torch.aminmax, one pass) and on the same
    values through numpy's two reductions: the same verdict, a NaN anywhere included."""
    import torch  # noqa: F401  (the one-pass path needs torch loaded)

    from fedrec import protocol

    rows = np.random.default_rng(0).standard_normal((protocol.MINMAX_ONE_PASS // 64 + 7, 64))
    rows = rows.astype(np.float32)
    if poison is not None:
        rows[len(rows) // 2 + 3, 17] = poison
    assert protocol._within(rows, 1e4) is ok
    monkeypatch.setattr(protocol, "MINMAX_ONE_PASS", rows.size + 1)  # numpy's two passes
    assert protocol._within(rows, 1e4) is ok
