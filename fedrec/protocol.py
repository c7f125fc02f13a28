"""The upload format, defined once. Clients encode with it, strategies decode with it.

A client's fit() returns Flower NDArrays laid out as

    [item_ids, item_rows, predictor_0, ..., predictor_{P-1}]

- item_ids: int64, shape (k,), the sorted unique ids of the item rows the client touched;
- item_rows: float32, shape (k, dim), the gradient (or pseudo-gradient) of those rows;
- predictor_j: float32, the gradient of global predictor array j, in the model's order.

num_examples is the number of training pairs (the aggregation weight). Nothing else is
sent: the user representation, the interactions and the malicious flag stay on the device.
A FedSGD client sends the gradient at the global model; a client doing E local epochs sends
the pseudo-gradient (global - local) / local_lr, so the server treats both alike.
"""

from __future__ import annotations

import io
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

FORMAT_NAME = "fedrec-sparse-v1"


@dataclass
class Upload:
    """A decoded, validated upload."""

    item_ids: np.ndarray
    item_rows: np.ndarray
    predictor: list
    num_examples: int
    client: str = ""  # the transport's id for the sender (Flower node id or engine index)


class UploadError(ValueError):
    """An upload that breaks the protocol. `reason` is a short key for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---------------------------------------------------------------------------- bytes


def max_tensor_bytes(n_items: int, dim: int, predictor_shapes, max_rows: int = 0) -> int:
    """The most bytes one tensor of a valid upload can need: 8-byte values (int64 ids,
    float64 rows at most) for the largest array."""
    rows = max_rows or n_items
    biggest = max([rows * dim, rows] + [int(np.prod(s)) for s in predictor_shapes])
    return 8 * biggest


def decode_tensor(data, max_bytes: int) -> np.ndarray:
    """One tensor of a Flower upload (the .npy bytes Flower's NumPyClient sends) -> array,
    without trusting anything it claims: the header is parsed by numpy's safe header reader
    (no pickle), only plain numeric dtypes are accepted, and the declared size is checked
    against `max_bytes` and against the bytes actually present BEFORE anything is
    allocated. Raises UploadError (reason tensor_*) for anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UploadError("tensor_type", type(data).__name__)
    if len(data) > max_bytes + 4096:  # the header is small; the rest must be the values
        raise UploadError("tensor_size", f"{len(data)} bytes")
    f = io.BytesIO(data)
    try:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except Exception as e:  # noqa: BLE001 - any malformed header means: not a tensor
        raise UploadError("tensor_bytes", type(e).__name__) from None
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None:
        raise UploadError("tensor_dtype", str(dtype))
    if any(int(d) < 0 for d in shape):
        raise UploadError("tensor_bytes", "negative dimension")
    count = math.prod(int(d) for d in shape)
    nbytes = count * dtype.itemsize
    if nbytes > max_bytes:
        raise UploadError("tensor_size", f"declares {nbytes} bytes")
    if len(data) - f.tell() != nbytes:
        raise UploadError("tensor_bytes", f"{len(data) - f.tell()} bytes for {nbytes}")
    a = np.frombuffer(data, dtype=dtype, count=count, offset=f.tell())
    return a.reshape(shape, order="F" if fortran else "C")


def decode_tensors(tensors, n_arrays: int, max_bytes: int) -> list:
    """A Flower upload's tensors -> arrays; UploadError if there are not n_arrays of them or
    one does not decode (see decode_tensor)."""
    if not isinstance(tensors, (list, tuple)) or len(tensors) != n_arrays:
        raise UploadError("array_count", f"expected {n_arrays} tensors")
    return [decode_tensor(t, max_bytes) for t in tensors]


# ---------------------------------------------------------------------------- metrics

MAX_LOSS = 1e6  # a reported training loss above this is not believed
_RANKING = re.compile(r"(val|test)_(hr|ndcg)@(\d+)")


def valid_loss(value) -> float | None:
    """A reported training loss as a float, or None when it is not a finite number in
    [0, MAX_LOSS] (booleans, strings, lists, NaN, 1e308, negatives are not losses)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    v = float(value)
    return v if math.isfinite(v) and 0.0 <= v <= MAX_LOSS else None


def valid_ranking_metrics(metrics, ks) -> tuple[dict, int]:
    """A client's reported evaluation metrics -> (the valid ones, how many were invalid):
    only {val,test}_{hr,ndcg}@k for the run's ks, each a finite number in [0, 1]."""
    if not isinstance(metrics, Mapping):
        return {}, 1
    ks = {int(k) for k in ks}
    good, bad = {}, 0
    for key, value in metrics.items():
        m = _RANKING.fullmatch(key) if isinstance(key, str) else None
        ok = (m is not None and int(m.group(3)) in ks and not isinstance(value, bool)
              and isinstance(value, (int, float, np.integer, np.floating))
              and math.isfinite(float(value)) and 0.0 <= float(value) <= 1.0)
        if ok:
            good[key] = float(value)
        else:
            bad += 1
    return good, bad


def encode_upload(item_ids, item_rows, predictor) -> list:
    return [np.asarray(item_ids, dtype=np.int64), np.asarray(item_rows, dtype=np.float32),
            *[np.asarray(p, dtype=np.float32) for p in predictor]]


DEFAULT_MAX_ABS = 1e4  # server.max_abs_value: see the README, "What the server guarantees"


def _value_problem(a: np.ndarray, max_abs: float) -> str | None:
    """"non_finite" or "too_large" (a finite |value| > max_abs), else None; one pass."""
    if a.size == 0:
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        top = np.abs(a).max()
    if not np.isfinite(top):
        return "non_finite"
    return "too_large" if top > max_abs else None


# arrays of at least this many values take torch's one-pass aminmax where torch is loaded:
# the dense uploads of weight_decay_scope all (50 tables of ML-1M, 11.9 M values) in 1.5 ms
# against numpy's two passes' 2.6 ms, ~5% of such a round; on a sparse round's 1 M values
# the two are alike
MINMAX_ONE_PASS = 1 << 21


def _within(a: np.ndarray, max_abs: float) -> bool:
    """Every value finite and |value| <= max_abs (NaN fails: max and min propagate it, in
    numpy and in torch.aminmax alike); two reductions over the array, or one (torch.aminmax:
    large contiguous float arrays, where torch is already imported), no temporary."""
    if a.size == 0:
        return True
    if a.size >= MINMAX_ONE_PASS and a.dtype in (np.float32, np.float64) and \
            a.flags.c_contiguous and "torch" in sys.modules:
        import torch

        lo, hi = (float(x) for x in torch.aminmax(torch.from_numpy(a)))
    else:
        hi, lo = a.max(), a.min()
    return bool(np.isfinite(hi) and np.isfinite(lo) and max(hi, -lo) <= max_abs)


def decode_upload(arrays, num_examples, *, n_items: int, dim: int, predictor_shapes,
                  max_rows: int = 0, max_examples: int = 10_000_000, client: str = "",
                  max_abs: float = DEFAULT_MAX_ABS) -> Upload:
    """Check every property a server can check, then return the Upload.

    Raises UploadError on: wrong array count, dtype or shape; ids out of range, repeated;
    non-finite values or values beyond max_abs; more rows than allowed; a non-positive or
    absurd sample count.
    """
    n_pred = len(predictor_shapes)
    if not isinstance(arrays, (list, tuple)) or len(arrays) != 2 + n_pred:
        raise UploadError("array_count", f"expected {2 + n_pred} arrays")
    ids, rows = np.asarray(arrays[0]), np.asarray(arrays[1])
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise UploadError("ids_dtype", f"item ids must be a 1-D integer array, got {ids.dtype}{ids.shape}")
    if rows.ndim != 2 or rows.shape != (len(ids), dim) or rows.dtype.kind != "f":
        raise UploadError("rows_shape", f"item rows must be float ({len(ids)}, {dim}), got {rows.dtype}{rows.shape}")
    limit = max_rows or n_items
    if len(ids) > limit:
        raise UploadError("too_many_rows", f"{len(ids)} rows > {limit}")
    if len(ids):
        increasing = len(ids) == 1 or bool((ids[1:] > ids[:-1]).all())
        lo, hi = (ids[0], ids[-1]) if increasing else (ids.min(), ids.max())
        if lo < 0 or hi >= n_items:
            raise UploadError("ids_range", f"item ids must lie in [0, {n_items})")
        if not increasing:
            if len(np.unique(ids)) != len(ids):
                raise UploadError("ids_repeated")
            order = np.argsort(ids)  # unsorted but unique: accept, in canonical order
            ids, rows = ids[order], rows[order]
    with np.errstate(over="ignore", invalid="ignore"):  # hostile values are expected here
        rows = rows.astype(np.float32, copy=False)  # check what the server will use: 1e39 -> inf
    problem = _value_problem(rows, max_abs)
    if problem:
        raise UploadError(problem, "item rows")
    pred = []
    for j, (a, shape) in enumerate(zip(arrays[2:], predictor_shapes)):
        a = np.asarray(a)
        if a.shape != tuple(shape) or a.dtype.kind != "f":
            raise UploadError("predictor_shape", f"predictor {j}: expected {tuple(shape)}, got {a.dtype}{a.shape}")
        with np.errstate(over="ignore", invalid="ignore"):
            a = a.astype(np.float32, copy=False)
        problem = _value_problem(a, max_abs)
        if problem:
            raise UploadError(problem, f"predictor {j}")
        pred.append(a)
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) \
            or not 0 < num_examples <= max_examples:
        raise UploadError("num_examples", f"{num_examples!r}")
    return Upload(ids.astype(np.int64, copy=False), rows.astype(np.float32, copy=False), pred,
                  int(num_examples), client)


def joined_rows(parts: list) -> np.ndarray:
    """np.concatenate(parts) of 2-D float32 row blocks; a view, no copy, where the non-empty
    blocks lie back to back in one C-contiguous array (a cohort's uploads computed in this
    process, fedrec.models.base.RowArena). The same values either way."""
    full = [p for p in parts if len(p)]
    base = full[0].base if full else None
    if isinstance(base, np.ndarray) and base.ndim == 2 and base.flags.c_contiguous and \
            all(p.base is base and p.flags.c_contiguous and p.dtype == base.dtype for p in full):
        origin = base.__array_interface__["data"][0]
        start = at = full[0].__array_interface__["data"][0]
        for p in full:
            if p.__array_interface__["data"][0] != at or p.shape[1:] != base.shape[1:]:
                break
            at += p.nbytes
        else:
            row = base.strides[0]
            return base[(start - origin) // row : (at - origin) // row]
    return np.concatenate(parts)


def decode_uploads(items, *, n_items: int, dim: int, predictor_shapes, max_rows: int = 0,
                   max_examples: int = 10_000_000, max_abs: float = DEFAULT_MAX_ABS):
    """decode_upload for a whole round, with the numeric checks done once over all rows.

    items: list of (arrays, num_examples, client); `arrays` may be an UploadError already
    (bytes that did not decode). Returns (uploads, stacked, errors): uploads in input order
    (rejected ones left out); stacked = (all_ids, all_rows, owner) of the accepted uploads,
    owner indexing `uploads`; errors = list of (client, UploadError). Exactly the same
    accept/reject decisions as calling decode_upload on each.
    """
    limit = max_rows or n_items
    cand, errors = [], []
    for arrays, num_examples, client in items:
        if isinstance(arrays, UploadError):
            errors.append((client, arrays))
            continue
        # the structural checks are cheap per upload; anything unusual takes the slow path
        try:
            ids, rows = np.asarray(arrays[0]), np.asarray(arrays[1])
            simple = (isinstance(arrays, (list, tuple)) and len(arrays) == 2 + len(predictor_shapes)
                      and ids.ndim == 1 and ids.dtype == np.int64 and rows.dtype == np.float32
                      and rows.shape == (len(ids), dim) and len(ids) <= limit
                      and all(np.shape(a) == tuple(s) and np.asarray(a).dtype == np.float32
                              for a, s in zip(arrays[2:], predictor_shapes)))
        except (IndexError, TypeError, ValueError):
            simple = False
        if simple:
            cand.append((ids, rows, arrays, num_examples, client))
            continue
        try:
            up = decode_upload(arrays, num_examples, n_items=n_items, dim=dim,
                               predictor_shapes=predictor_shapes, max_rows=max_rows,
                               max_examples=max_examples, client=client, max_abs=max_abs)
            cand.append((up.item_ids, up.item_rows, None, up, client))
        except UploadError as e:
            errors.append((client, e))
    if not cand:
        return [], (np.zeros(0, np.int64), np.zeros((0, dim), np.float32), np.zeros(0, np.int64)), errors
    lens = np.array([len(c[0]) for c in cand], dtype=np.int64)
    owner = np.repeat(np.arange(len(cand)), lens)
    all_ids = np.concatenate([c[0] for c in cand])
    all_rows = joined_rows([c[1] for c in cand])
    bad = np.zeros(len(cand), dtype=bool)
    reason = [None] * len(cand)

    def flag(mask_rows, why):
        hit = np.bincount(owner[mask_rows], minlength=len(cand)) > 0
        for i in np.flatnonzero(hit & ~bad):
            reason[i] = why
        bad[hit] = True

    flag((all_ids < 0) | (all_ids >= n_items), "ids_range")
    starts = np.cumsum(lens) - lens
    step_ok = np.ones(len(all_ids), dtype=bool)
    step_ok[1:] = all_ids[1:] > all_ids[:-1]
    step_ok[starts[lens > 0]] = True
    unsorted = np.bincount(owner[~step_ok], minlength=len(cand)) > 0
    if not _within(all_rows, max_abs):  # the per-row search only when some row fails
        with np.errstate(over="ignore", invalid="ignore"):  # hostile values are expected here
            row_top = np.abs(all_rows).max(axis=1, initial=0.0)
        flag(~np.isfinite(row_top), "non_finite")
        flag(row_top > max_abs, "too_large")
    # the predictors of every simple upload checked at once; one at a time only on a failure
    pred_ok = _within(np.concatenate([np.ravel(a) for c in cand if c[2] is not None
                                      for a in c[2][2:]] or [np.zeros(0, np.float32)]), max_abs)
    uploads, keep = [], np.zeros(len(cand), dtype=bool)
    for i, (ids, rows, arrays, num_examples, client) in enumerate(cand):
        if arrays is None:  # already decoded on the slow path
            up = num_examples
        elif bad[i]:
            errors.append((client, UploadError(reason[i])))
            continue
        else:
            try:
                if unsorted[i]:
                    up = decode_upload(arrays, num_examples, n_items=n_items, dim=dim,
                                       predictor_shapes=predictor_shapes, max_rows=max_rows,
                                       max_examples=max_examples, client=client, max_abs=max_abs)
                else:
                    for j, a in enumerate([] if pred_ok else arrays[2:]):
                        problem = _value_problem(a, max_abs)
                        if problem:
                            raise UploadError(problem, f"predictor {j}")
                    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) \
                            or not 0 < num_examples <= max_examples:
                        raise UploadError("num_examples", f"{num_examples!r}")
                    up = Upload(ids, rows, list(arrays[2:]), int(num_examples), client)
            except UploadError as e:
                errors.append((client, e))
                continue
        keep[i] = True
        uploads.append(up)
    if keep.all() and not unsorted.any():
        stacked = (all_ids, all_rows, owner)
    else:
        lens_k = np.array([len(u.item_ids) for u in uploads], dtype=np.int64)
        stacked = (np.concatenate([u.item_ids for u in uploads]) if uploads else np.zeros(0, np.int64),
                   np.concatenate([u.item_rows for u in uploads]) if uploads else np.zeros((0, dim), np.float32),
                   np.repeat(np.arange(len(uploads)), lens_k))
    return uploads, stacked, errors
