"""The byte-level table parser behind the format loaders (fedrec/data/formats.py).

A file is read whole (gzip transparently), split into lines and fields with numpy on the raw
bytes, and its integer and float columns parsed vectorised; an error names the file and the
1-based line. Irregular files (blank lines, repeated blanks) take a per-line clean-up first.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from fedrec.errors import DataFormatError

_US = b"\x1f"  # multi-byte separators ("::") are translated to this byte


def _read_bytes(path) -> bytes:
    p = Path(path)
    if not p.exists():
        raise DataFormatError(path, "file not found")
    if p.is_dir():
        raise DataFormatError(path, "is a directory, expected a file")
    data = p.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataFormatError(path, f"corrupt gzip file ({exc})") from None
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    return data


def _head(path, size=65536) -> bytes:
    """About the first `size` bytes (decompressed) of a file, for format sniffing."""
    if not Path(path).is_file():
        raise DataFormatError(path, "file not found")
    with open(path, "rb") as f:
        raw = f.read(size)
    try:
        raw = zlib.decompressobj(31).decompress(raw, size) if raw[:2] == b"\x1f\x8b" else raw
    except zlib.error as exc:
        raise DataFormatError(path, f"corrupt gzip file ({exc})") from None
    return raw.replace(b"\r\n", b"\n")


def _sep_bytes(sep) -> bytes | None:
    """None means runs of whitespace."""
    if sep is None or sep in ("whitespace", " ", b" "):
        return None
    return sep.encode() if isinstance(sep, str) else bytes(sep)


def _describe_sep(sep: bytes | None) -> str:
    return {None: "whitespace", b"\t": "tabs"}.get(sep, repr(sep.decode(errors="replace")) if sep else "")


class _Table:
    """Fields of a text file: field i spans data[bounds[i] + 1 : bounds[i + 1]]; row r holds fields
    row_first[r] .. row_first[r] + counts[r] - 1 and comes from line linenos[r] of the file."""

    def __init__(self, path, data: bytes, sep: bytes | None, expected: str | None, first_line: int = 1):
        self.path, self.expected = path, expected
        if sep is None:  # whitespace: normalise to single spaces when that is cheap
            if b"\t" in data:
                data = data.replace(b"\t", b" ")
            sep = b" "
            irregular = (b"  " in data or b" \n" in data or b"\n " in data or b"\r" in data
                         or data[:1] == b" " or data.rstrip(b"\n")[-1:] == b" ")
        else:
            if len(sep) > 1:
                if _US in data:
                    raise DataFormatError(path, "unexpected control byte 0x1f", expected=expected)
                data = data.replace(sep, _US)
                sep = _US
            irregular = False
        self.sep, self.first_line = sep, first_line
        data = data.rstrip(b"\n")
        self.cleaned = irregular or b"\n\n" in data or data[:1] == b"\n"
        self._build(*self._clean(data, sep) if self.cleaned else (data, None))
        if len(self) == 0:
            raise DataFormatError(path, "no data rows", expected=expected)

    def _build(self, data: bytes, linenos):
        first_line = self.first_line
        sep = self.sep
        self.data = data
        self.a = np.frombuffer(data, dtype=np.uint8)
        delim = np.flatnonzero((self.a == sep[0]) | (self.a == 10))
        nl = np.flatnonzero(self.a[delim] == 10)
        self.bounds = np.concatenate(([-1], delim, [len(data)]))
        nfields = len(delim) + 1
        last = np.concatenate((nl, [nfields - 1]))
        self.row_first = np.concatenate(([0], last[:-1] + 1))
        self.counts = last - self.row_first + 1
        if not data:
            self.row_first = self.counts = np.zeros(0, dtype=np.int64)
        n = len(self.counts)
        self.linenos = np.arange(first_line, first_line + n) if linenos is None else linenos + first_line - 1

    @staticmethod
    def _clean(data: bytes, sep: bytes):
        """Slow path: drop blank lines, strip lines, collapse blanks; remember the original line numbers."""
        out, nos = [], []
        for i, line in enumerate(data.split(b"\n"), 1):
            line = b" ".join(line.split()) if sep == b" " else line.strip(b" \r")
            if line:
                out.append(line)
                nos.append(i)
        return b"\n".join(out), np.asarray(nos, dtype=np.int64)

    def __len__(self):
        return len(self.counts)

    def error(self, row: int, message: str):
        raise DataFormatError(self.path, message, line=int(self.linenos[row]), expected=self.expected)

    def require_fields(self, ncols: int, sep_desc: str):
        bad = np.flatnonzero(self.counts != ncols)
        if len(bad) and not self.cleaned and not self.tokens(self.row_first[bad[:1]])[0].strip():
            self.cleaned = True  # a blank-looking line: redo with the per-line clean-up
            self._build(*self._clean(self.data, self.sep))
            bad = np.flatnonzero(self.counts != ncols)
        if len(bad):
            r = int(bad[0])
            self.error(r, f"expected {ncols} fields separated by {sep_desc}, got {int(self.counts[r])}")

    def row_of(self, field_idx):
        return np.searchsorted(self.row_first, field_idx, side="right") - 1

    def tokens(self, field_idx) -> list:
        b = self.bounds
        return [self.data[s + 1:e] for s, e in zip(b[field_idx].tolist(), b[field_idx + 1].tolist())]

    def ints(self, field_idx, what: str) -> np.ndarray:
        """Parse fields as non-negative int64 (vectorised digit-by-digit, Python fallback)."""
        field_idx = np.asarray(field_idx, dtype=np.int64)
        if len(field_idx) == 0:
            return np.zeros(0, dtype=np.int64)
        start = self.bounds[field_idx] + 1
        width = self.bounds[field_idx + 1] - start
        wmax = int(width.max())
        if width.min() > 0 and wmax <= 18:
            val = np.zeros(len(start), dtype=np.int64)
            bad = np.zeros(len(start), dtype=bool)
            top = len(self.a) - 1
            for j in range(wmax):
                m = width > j
                digit = self.a[np.minimum(start + j, top)] - np.uint8(48)
                bad |= m & (digit > 9)
                val = np.where(m, val * 10 + digit, val)
            if not bad.any():
                return val
        return self._convert(field_idx, what, int)

    def numbers(self, field_idx, what: str) -> np.ndarray:
        """int64 when every field is an integer, else float64."""
        try:
            return self.ints(field_idx, what)
        except DataFormatError:
            return self._convert(np.asarray(field_idx, dtype=np.int64), what, float)

    def _convert(self, field_idx, what, kind):
        toks = self.tokens(field_idx)
        dtype = np.int64 if kind is int else np.float64
        try:
            vals = np.array(toks, dtype=dtype)
        except (ValueError, OverflowError):
            for i, tok in enumerate(toks):
                try:
                    v = kind(tok)
                    if kind is int:
                        np.int64(v)
                except (ValueError, OverflowError) as exc:
                    noun = "a number" if kind is float else "an integer"
                    noun += " in the int64 range" if isinstance(exc, OverflowError) else ""
                    text = tok.decode(errors="replace")
                    self.error(int(self.row_of(field_idx[i])), f"{what} {text!r} is not {noun}")
            raise DataFormatError(self.path, f"cannot parse {what} values", expected=self.expected)
        if kind is int and (vals < 0).any():
            i = int(np.flatnonzero(vals < 0)[0])
            self.error(int(self.row_of(field_idx[i])), f"{what} {int(vals[i])} is negative")
        return vals


def _fixed_table(path, sep, ncols, expected):
    t = _Table(path, _read_bytes(path), _sep_bytes(sep), expected)
    t.require_fields(ncols, _describe_sep(_sep_bytes(sep)))
    return t


def _sniff_sep(line: bytes) -> bytes | None:
    for cand in (b"::", b"\t", b",", b";", b"|"):
        if cand in line:
            return cand
    return None


def _is_number(tok: bytes) -> bool:
    try:
        return float(tok) is not None
    except ValueError:
        return False
