"""Hostile clients, seeded: what a Byzantine client may send, for tests and fuzzing.

The threat model lets a malicious client choose every byte of its upload and every value of
its reported metrics. This module draws such payloads from a seeded generator, at three
levels, each a catalogue of named kinds:

- `ARRAY_KINDS`: well-typed or ill-typed arrays (what the in-process runner passes by
  reference): non-finite, huge and alternating +-FLT_MAX values, denormals, zeros, ids out of
  range, negative, repeated or unsorted, wrong shapes and dtypes, missing or extra arrays,
  objects that are not arrays at all, absurd sample counts;
- `BYTE_KINDS`: the tensor bytes of a Flower upload: random, empty, truncated, a pickled
  object array, a header declaring a 745 GiB array, a header lying about its size;
- `METRIC_KINDS`: reported metrics: 1e308, NaN, inf, negative, out-of-range ranking metrics,
  strings, lists, bytes, None.

`hostile_upload(rng, ...)` picks a kind (or takes one) and returns the payload with its kind,
so a test can count what the server must drop and why. Nothing here knows the server: the
server's validation must hold against all of it (tests/test_hostile.py, scripts/fuzz_server.py).
"""

from __future__ import annotations

import io
import pickle

import numpy as np

FLT_MAX = float(np.finfo(np.float32).max)

ARRAY_KINDS = (
    "nan", "inf", "huge", "flt_max_alternating", "denormal", "zeros", "ids_out_of_range",
    "ids_negative", "ids_repeated", "ids_unsorted", "rows_wrong_shape", "rows_int", "ids_float",
    "predictor_wrong_shape", "missing_arrays", "extra_array", "not_arrays", "scalar_arrays",
    "num_examples_zero", "num_examples_negative", "num_examples_huge", "num_examples_float",
    "too_many_rows", "object_array",
)
BYTE_KINDS = ("random_bytes", "empty_bytes", "truncated", "pickled_object", "huge_header",
              "lying_header", "not_npy", "fortran_huge")
METRIC_KINDS = ("loss_1e308", "loss_nan", "loss_inf", "loss_negative", "loss_huge", "hr_1e308",
                "hr_negative", "hr_above_one", "ndcg_nan", "string", "list", "bytes", "none",
                "bool", "many_keys")


def _honest(rng, n_items, dim, predictor_shapes, rows=None):
    k = int(rng.integers(1, min(n_items, 8) + 1)) if rows is None else rows
    ids = np.sort(rng.choice(n_items, size=k, replace=False)).astype(np.int64)
    item_rows = (rng.standard_normal((k, dim)) * 1e-2).astype(np.float32)
    pred = [(rng.standard_normal(s) * 1e-2).astype(np.float32) for s in predictor_shapes]
    return [ids, item_rows, *pred]


def hostile_arrays(rng, kind: str, n_items: int, dim: int, predictor_shapes):
    """(arrays, num_examples) of one hostile upload of `kind` (see ARRAY_KINDS)."""
    up = _honest(rng, n_items, dim, predictor_shapes)
    ids, rows = up[0], up[1]
    n = int(rng.integers(1, 50))
    if kind == "nan":
        rows[rng.integers(len(rows))] = np.nan
    elif kind == "inf":
        rows[0, 0] = -np.inf if rng.random() < 0.5 else np.inf
    elif kind == "huge":
        rows[:] = np.float32(3e38) * np.sign(rng.standard_normal(rows.shape)).astype(np.float32)
    elif kind == "flt_max_alternating":
        # the same items every call: the sign flips with a coin, so Adam's moments see
        # +-FLT_MAX on rows nobody else sends
        ids = np.arange(n_items - min(n_items, 3), n_items, dtype=np.int64)
        rows = np.full((len(ids), dim), FLT_MAX if rng.random() < 0.5 else -FLT_MAX, np.float32)
        up[0], up[1] = ids, rows
    elif kind == "denormal":
        rows[:] = np.float32(1e-45)
    elif kind == "zeros":
        rows[:] = 0
        for p in up[2:]:
            p[...] = 0
    elif kind == "ids_out_of_range":
        ids[-1] = n_items + int(rng.integers(0, 10**6))
    elif kind == "ids_negative":
        ids[0] = -int(rng.integers(1, 10**6))
    elif kind == "ids_repeated":
        if len(ids) > 1:
            ids[1] = ids[0]
        else:
            up[0] = np.array([ids[0], ids[0]], np.int64)
            up[1] = np.vstack([rows, rows])
    elif kind == "ids_unsorted":
        up[0], up[1] = ids[::-1].copy(), rows[::-1].copy()
    elif kind == "rows_wrong_shape":
        up[1] = rows[:, : max(dim - 1, 0)] if rng.random() < 0.5 else rows.reshape(-1)
    elif kind == "rows_int":
        up[1] = rows.astype(np.int32)
    elif kind == "ids_float":
        up[0] = ids.astype(np.float64) + 0.5
    elif kind == "predictor_wrong_shape":
        up = up[:2] + [np.zeros(7, np.float32)] * max(len(predictor_shapes), 1)
    elif kind == "missing_arrays":
        up = up[: int(rng.integers(0, 2))]
    elif kind == "extra_array":
        up = up + [np.ones(3, np.float32)]
    elif kind == "not_arrays":
        up = [b"\x00" * 8, "rows", None, {"a": 1}][: 2 + len(predictor_shapes)]
        if rng.random() < 0.3:
            up = None if rng.random() < 0.5 else "not a list"
    elif kind == "scalar_arrays":
        up = [np.array(1), np.array(2.0), *[np.array(0.0) for _ in predictor_shapes]]
    elif kind == "num_examples_zero":
        n = 0
    elif kind == "num_examples_negative":
        n = -int(rng.integers(1, 10**9))
    elif kind == "num_examples_huge":
        n = int(10**18)
    elif kind == "num_examples_float":
        n = 3.5
    elif kind == "too_many_rows":
        k = n_items + 1
        up[0] = np.arange(k, dtype=np.int64)
        up[1] = np.zeros((k, dim), np.float32)
    elif kind == "object_array":
        up[1] = np.array([object()] * len(ids), dtype=object)
    else:
        raise ValueError(f"unknown hostile array kind {kind!r}")
    return up, n


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def hostile_tensors(rng, kind: str, honest_arrays: list) -> list:
    """The tensor bytes of a Flower upload of `kind` (see BYTE_KINDS), from honest arrays."""
    tensors = [_npy(np.asarray(a)) for a in honest_arrays]
    j = int(rng.integers(len(tensors)))
    if kind == "random_bytes":
        tensors[j] = rng.bytes(int(rng.integers(1, 256)))
    elif kind == "empty_bytes":
        tensors[j] = b""
    elif kind == "truncated":
        tensors[j] = tensors[j][: int(rng.integers(1, max(len(tensors[j]) - 1, 2)))]
    elif kind == "pickled_object":
        buf = io.BytesIO()
        np.save(buf, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
        tensors[j] = buf.getvalue()
    elif kind == "huge_header":  # declares 745 GiB of float32
        tensors[j] = _npy_header("<f4", (200_000_000_000,)) + b"\x00" * 64
    elif kind == "lying_header":  # declares 10x the bytes it carries
        a = np.asarray(honest_arrays[j])
        tensors[j] = _npy_header(a.dtype.str, (a.size * 10,)) + a.tobytes()
    elif kind == "not_npy":
        tensors[j] = pickle.dumps(honest_arrays[j])
    elif kind == "fortran_huge":
        tensors[j] = _npy_header("<f8", (1 << 20, 1 << 20), fortran=True) + b"\x00" * 64
    else:
        raise ValueError(f"unknown hostile byte kind {kind!r}")
    return tensors


def _npy_header(descr: str, shape, fortran: bool = False) -> bytes:
    header = repr({"descr": descr, "fortran_order": fortran, "shape": tuple(shape)}).encode()
    pad = 64 - (10 + len(header) + 1) % 64
    header += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def hostile_metrics(rng, kind: str) -> dict:
    """Reported metrics of `kind` (see METRIC_KINDS)."""
    table = {
        "loss_1e308": {"loss": 1e308}, "loss_nan": {"loss": float("nan")},
        "loss_inf": {"loss": float("inf")}, "loss_negative": {"loss": -50.0},
        "loss_huge": {"loss": 1e12}, "hr_1e308": {"test_hr@5": 1e308},
        "hr_negative": {"test_hr@5": -8.0}, "hr_above_one": {"test_hr@5": 1e6},
        "ndcg_nan": {"test_ndcg@5": float("nan")}, "string": {"loss": "0.5", "test_hr@5": "1"},
        "list": {"loss": [1, 2], "test_hr@5": [0.1]}, "bytes": {"loss": b"\x00"},
        "none": {"loss": None}, "bool": {"loss": True, "test_hr@5": True},
        "many_keys": {f"k{i}": float(i) for i in range(int(rng.integers(100, 1000)))},
    }
    if kind not in table:
        raise ValueError(f"unknown hostile metric kind {kind!r}")
    return table[kind]


def hostile_upload(rng, n_items: int, dim: int, predictor_shapes, kind: str | None = None):
    """(kind, arrays, num_examples, metrics): one hostile in-process upload; the metrics are
    hostile too with probability 1/2."""
    kind = kind or str(rng.choice(ARRAY_KINDS))
    arrays, n = hostile_arrays(rng, kind, n_items, dim, predictor_shapes)
    metrics = hostile_metrics(rng, str(rng.choice(METRIC_KINDS))) if rng.random() < 0.5 \
        else {"loss": 0.5}
    return kind, arrays, n, metrics
