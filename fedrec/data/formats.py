"""Loaders for published recommendation data formats; each returns `Interactions`.

Formats (any file may be gzip-compressed, `.gz` or gzip magic bytes; CRLF is accepted):

- "ml-1m":     MovieLens-1M `ratings.dat`, `UserID::MovieID::Rating::Timestamp`; order = timestamp.
- "ml-100k":   MovieLens-100K `u.data`, `user item rating timestamp` (tabs); order = timestamp.
- "gowalla":   LightGCN/NGCF `train.txt` + `test.txt`, one line per user `user item item ...` (a line may
               hold only the user); `fixed_split` marks train/test rows; no order.
- "amazon":    5-core user-sequence lines `user item item ...` (S3-Rec `Beauty.txt`); with `ordered=True`
               order = position in the line, else none (e.g. Cell Phones, which is sorted by item id).
- "filmtrust": `ratings.txt`, `user item rating` (float ratings); duplicate (user, item) pairs keep the
               first occurrence, the number dropped is `extra["duplicates_dropped"]`.
- "csv":       generic delimited file, see `load_delimited`.

Ratings, where a format has them, are in `extra["ratings"]` (aligned with the rows). Ids must be
non-negative integers. Errors (missing file, malformed line, bad id) raise `DataFormatError` naming the
file and the 1-based line. Parsing is vectorised: field boundaries and integers are computed with numpy
on the raw bytes; irregular files (blank lines, repeated blanks) take a slower per-line clean-up first.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fedrec.data.table import (_Table, _describe_sep, _fixed_table, _head, _is_number, _read_bytes,
                               _sep_bytes, _sniff_sep)
from fedrec.data.types import SPLIT_TEST, SPLIT_TRAIN, Interactions
from fedrec.errors import DataFormatError

__all__ = ["DATASETS", "FORMATS", "data_roots", "guess_format", "load_amazon", "load_dataset",
           "load_delimited", "load_filmtrust", "load_gowalla", "load_interactions", "load_ml100k",
           "load_ml1m", "resolve_dataset"]

def _timestamped(path, sep, expected, name, min_rating):
    t = _fixed_table(path, sep, 4, expected)
    c = t.row_first
    cols = [t.ints(c, "user id"), t.ints(c + 1, "item id"), t.ints(c + 3, "timestamp"),
            t.numbers(c + 2, "rating")]
    if min_rating is not None:
        cols = [x[cols[3] >= min_rating] for x in cols]
    return Interactions(*cols[:2], order=cols[2], name=name, source=str(path), order_kind="timestamp",
                        extra={"ratings": cols[3], "format": name})


def load_ml1m(path, min_rating=None, name=None) -> Interactions:
    """MovieLens-1M `ratings.dat`: `UserID::MovieID::Rating::Timestamp` per line; order = timestamp."""
    return _timestamped(path, "::", "UserID::MovieID::Rating::Timestamp", name or "ml-1m", min_rating)


def load_ml100k(path, min_rating=None, name=None) -> Interactions:
    """MovieLens-100K `u.data`: `user item rating timestamp` separated by tabs (any blanks accepted)."""
    return _timestamped(path, None, "user<TAB>item<TAB>rating<TAB>timestamp", name or "ml-100k", min_rating)


def _sequences(path, expected):
    """Lines `user item item ...` -> (users, items, position in line)."""
    t = _Table(path, _read_bytes(path), None, expected)
    vals = t.ints(np.arange(int(t.counts.sum())), "id")
    n_items = t.counts - 1
    item_mask = np.ones(len(vals), dtype=bool)
    item_mask[t.row_first] = False
    users = np.repeat(vals[t.row_first], n_items)
    starts = np.cumsum(n_items) - n_items
    pos = np.arange(int(n_items.sum())) - np.repeat(starts, n_items)
    return users, vals[item_mask], pos


def load_amazon(path, ordered: bool = True, name=None) -> Interactions:
    """Amazon 5-core user sequences `user item item ...` (CRLF ok). `ordered`: the line is in time
    order (S3-Rec Beauty.txt) -> order = position in line; False (Cell Phones) -> no order."""
    users, items, pos = _sequences(path, "user item item ... (space separated)")
    nm = name or Path(path).name.split(".")[0].lower()
    return Interactions(users, items, order=pos if ordered else None, name=nm, source=str(path),
                        order_kind="sequence" if ordered else "none", extra={"format": "amazon"})


def _gowalla_pair(path) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir():
        for suffix in ("", ".gz"):
            if (p / f"train.txt{suffix}").exists():
                return p / f"train.txt{suffix}", p / f"test.txt{suffix}"
        raise DataFormatError(p / "train.txt", "file not found")
    first, _, rest = p.name.partition(".")
    if first in ("train", "test"):
        return p.with_name("train." + rest), p.with_name("test." + rest)
    return p, p.with_name("test." + rest if rest else "test")


def load_gowalla(path, name=None) -> Interactions:
    """LightGCN Gowalla: directory (or train.txt path) with train.txt and test.txt, lines
    `user item item ...`. Rows of train get SPLIT_TRAIN, rows of test SPLIT_TEST; no order."""
    train, test = _gowalla_pair(path)
    expected = "user item item ... (space separated)"
    u1, i1, _ = _sequences(train, expected)
    u2, i2, _ = _sequences(test, expected)
    split = np.repeat(np.array([SPLIT_TRAIN, SPLIT_TEST], np.int8), [len(u1), len(u2)])
    return Interactions(np.concatenate((u1, u2)), np.concatenate((i1, i2)), fixed_split=split,
                        name=name or "gowalla", source=f"{train}, {test}", order_kind="none",
                        extra={"format": "gowalla", "train_rows": len(u1), "test_rows": len(u2)})


def _first_occurrence(users, items) -> np.ndarray:
    """Boolean mask keeping the first row of every (user, item) pair."""
    idx = np.lexsort((items, users))  # stable: equal pairs stay in file order
    su, si = users[idx], items[idx]
    first = np.ones(len(idx), dtype=bool)
    first[1:] = (su[1:] != su[:-1]) | (si[1:] != si[:-1])
    keep = np.zeros(len(idx), dtype=bool)
    keep[idx[first]] = True
    return keep


def load_filmtrust(path, min_rating=None, name=None) -> Interactions:
    """FilmTrust `ratings.txt`: `user item rating` (blank separated, float ratings 0.5-4). Duplicate
    (user, item) pairs keep the first row; `extra["duplicates_dropped"]` counts the others."""
    t = _fixed_table(path, None, 3, "user item rating")
    cols = t.row_first
    users, items = t.ints(cols, "user id"), t.ints(cols + 1, "item id")
    ratings = t.numbers(cols + 2, "rating").astype(np.float64)
    keep = _first_occurrence(users, items)
    dropped = int(len(keep) - keep.sum())
    if min_rating is not None:
        keep &= ratings >= min_rating
    extra = {"ratings": ratings[keep], "duplicates_dropped": dropped, "format": "filmtrust"}
    return Interactions(users[keep], items[keep], name=name or "filmtrust", source=str(path), extra=extra)


def load_delimited(path, sep="auto", header="auto", user_col=0, item_col=1, order_col=None,
                   rating_col=None, min_rating=None, order_kind=None, name=None) -> Interactions:
    """Generic delimited file. `sep`: "auto" (first line: '::', tab, ',', ';', '|', else whitespace),
    None/"whitespace", or any string. `header`: True, False or "auto" (a first line with a non-numeric
    field). Columns are names (with a header) or 0-based indices. `order_col="line"` orders by file
    position. `rating_col` puts ratings in `extra["ratings"]`; `min_rating` keeps rows with rating >= it.
    `order_kind` defaults to "timestamp" when the column name mentions time or values exceed 1e8, else
    "sequence". Every row must have the same number of fields; empty fields are allowed in unused columns."""
    data = _read_bytes(path)
    head, _, _ = data.lstrip(b"\n").partition(b"\n")
    sepb = _sniff_sep(head) if sep == "auto" else _sep_bytes(sep)
    first_fields = head.split() if sepb is None else [f.strip() for f in head.split(sepb)]
    if header == "auto":
        header = not all(_is_number(f) for f in first_fields if f)
    names = []
    first_line = 1
    if header:
        skipped = len(data) - len(data.lstrip(b"\n"))
        first_line = data[:skipped].count(b"\n") + 2
        data = data[skipped:].partition(b"\n")[2]
        names = [f.strip(b"\"'").decode(errors="replace") for f in first_fields]
    sep_desc = _describe_sep(sepb)
    expected = f"{sep_desc}-separated columns " + ", ".join(names) if names else None
    t = _Table(path, data, sepb, expected, first_line=first_line)
    ncols = len(names) if names else int(t.counts[0])
    t.require_fields(ncols, sep_desc)

    def col(c, what):
        if c is None:
            return None
        if isinstance(c, str) and not c.lstrip("-").isdigit():
            if c not in names:
                known = f"columns: {', '.join(names)}" if names else "the file has no header"
                raise DataFormatError(path, f"no column {c!r} ({known})", expected=expected)
            return names.index(c)
        k = int(c)
        if not 0 <= k < ncols:
            raise DataFormatError(path, f"{what} column {k} out of range (the file has {ncols} columns)")
        return k

    cols = t.row_first
    users = t.ints(cols + col(user_col, "user"), "user id")
    items = t.ints(cols + col(item_col, "item"), "item id")
    order = None
    kind = "none"
    if order_col == "line":
        order, kind = np.arange(len(users), dtype=np.int64), "sequence"
    elif order_col is not None:
        k = col(order_col, "order")
        order = t.numbers(cols + k, "order value")
        looks_time = "time" in (names[k].lower() if names else "") or (len(order) and order.max() > 1e8)
        kind = "timestamp" if looks_time else "sequence"
    extra = {"format": "csv", "columns": names}
    if rating_col is not None or min_rating is not None:
        if rating_col is None:
            raise DataFormatError(path, "min_rating needs rating_col")
        ratings = t.numbers(cols + col(rating_col, "rating"), "rating")
        if min_rating is not None:
            keep = ratings >= min_rating
            users, items, ratings = users[keep], items[keep], ratings[keep]
            order = None if order is None else order[keep]
        extra["ratings"] = ratings
    return Interactions(users, items, order=order, name=name or Path(path).name.split(".")[0],
                        source=str(path), order_kind=order_kind or kind, extra=extra)


FORMATS = {
    "ml-1m": load_ml1m, "ml-100k": load_ml100k, "gowalla": load_gowalla,
    "amazon": load_amazon, "filmtrust": load_filmtrust, "csv": load_delimited,
}

# a dataset folder given as path -> its main file, per format
_DIR_FILES = {"gowalla": "train.txt", "ml-1m": "ratings.dat", "ml-100k": "u.data", "filmtrust": "ratings.txt"}
_CHRONO = dict(sep="\t", header=True, user_col="user_id", item_col="movie_id", order_col="seq_idx",
               rating_col="rating", order_kind="sequence")
# name -> (path relative to a data root, format, options)
DATASETS = {
    "ml-1m": ("ml-1m/ratings_chrono.tsv.gz", "csv", _CHRONO),
    "ml-1m-sas": ("ml-1m/ml-1m_sas.txt.gz", "csv",
                  dict(sep="whitespace", header=False, user_col=0, item_col=1, order_col="line")),
    "ml-100k": ("ml-100k/u.data", "ml-100k", {}),
    "gowalla": ("gowalla", "gowalla", {}),
    "beauty": ("amazon-beauty/Beauty.txt", "amazon", {"ordered": True}),
    "cellphones": ("amazon-cellphones/Cell_Phones_and_Accessories.txt", "amazon", {"ordered": False}),
    "filmtrust": ("filmtrust/ratings.txt", "filmtrust", {}),
}
# Other layouts of a dataset (e.g. the official one from `fedrec data fetch`), tried in each root after
# the DATASETS path; roots are searched in data_roots() order.
ALTERNATIVES = {
    "ml-1m": [("ml-1m/ratings.dat", "ml-1m", {}), ("ml-1m/ratings.dat.gz", "ml-1m", {})],
    "ml-100k": [("ml-100k/u.data.gz", "ml-100k", {})],
}


def data_roots() -> list[Path]:
    """Where named datasets are looked for: $FEDREC_DATA (os.pathsep-separated), ../shared/data from
    the repository root, ../shared/data from the current directory, ~/.cache/fedrec/data."""
    from fedrec import environment

    roots = environment.data_roots()
    repo = Path(__file__).resolve().parents[2]
    roots += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data",
              Path.home() / ".cache" / "fedrec" / "data"]
    return [Path(r) for r in dict.fromkeys(os.path.normpath(os.path.abspath(r)) for r in roots)]


def guess_format(path) -> tuple[str, dict]:
    """Format name and options for a file, from its name (known dataset files first) or first lines."""
    p = Path(path)
    for rel, fmt, opts in list(DATASETS.values()) + [c for v in ALTERNATIVES.values() for c in v]:
        if p.name == Path(rel).name and p.is_dir() == (fmt == "gowalla"):
            return fmt, dict(opts)
    if p.is_dir():
        for fmt, f in _DIR_FILES.items():
            if (p / f).exists() or (p / (f + ".gz")).exists():
                return fmt, {}
        raise DataFormatError(path, "cannot tell the format of this directory")
    base = p.name[:-3] if p.name.endswith(".gz") else p.name
    if base in ("train.txt", "test.txt"):
        return "gowalla", {}
    lines = [ln for ln in _head(p).split(b"\n")[:50] if ln.strip()]
    if not lines:
        raise DataFormatError(path, "file is empty")
    if b"::" in lines[0]:
        return "ml-1m", {}
    if _sniff_sep(lines[0]) is not None:
        return "csv", {}
    counts = {len(ln.split()) for ln in lines[:-1] or lines}
    if len(counts) > 1 or max(counts) > 4:
        return "amazon", {"ordered": True}
    return "csv", {"sep": "whitespace"}


def load_interactions(path, format: str = "auto", **options) -> Interactions:
    """Load `path` in the given format ("ml-1m", "ml-100k", "gowalla", "amazon", "filmtrust", "csv",
    or "auto" to guess from the file name and first line). Options go to the format's loader."""
    if format == "auto":
        format, guessed = guess_format(path)
        options = {**guessed, **options}
    if format not in FORMATS:
        raise DataFormatError(path, f"unknown format {format!r}", expected=", ".join(FORMATS))
    p = Path(path)
    if p.is_dir() and format in _DIR_FILES and format != "gowalla":  # a dataset folder: its main file
        f = _DIR_FILES[format]
        path = p / f if (p / f).exists() or not (p / (f + ".gz")).exists() else p / (f + ".gz")
    return FORMATS[format](path, **options)


def resolve_dataset(name_or_path) -> tuple[Path, str, dict]:
    """A dataset name (DATASETS), searched under data_roots(), or a path -> (path, format, options).
    For a name, options include `name` so the loaded Interactions carry it."""
    key = str(name_or_path)
    if key in DATASETS:
        roots = data_roots()
        for root in roots:
            for rel, fmt, opts in [DATASETS[key]] + ALTERNATIVES.get(key, []):
                if (root / rel).exists():
                    return root / rel, fmt, {**opts, "name": key}
        hint = f"; run `fedrec data fetch {key}`" if key in ("ml-1m", "ml-100k") else ""
        raise DataFormatError(key, f"dataset {DATASETS[key][0]} not found under "
                              + ", ".join(str(r) for r in roots) + f" (set FEDREC_DATA{hint})")
    p = Path(name_or_path).expanduser()
    if not p.exists():
        raise DataFormatError(p, f"no such file, and not a known dataset ({', '.join(DATASETS)})")
    fmt, opts = guess_format(p)
    return p, fmt, opts


def load_dataset(name_or_path, **overrides) -> Interactions:
    """Load a named dataset (DATASETS) or a file; `overrides` update the loader options
    (`format=` replaces the format)."""
    path, fmt, opts = resolve_dataset(name_or_path)
    fmt = overrides.pop("format", fmt)
    return load_interactions(path, fmt, **{**opts, **overrides})
