"""Download the official MovieLens archives (`fedrec data fetch ml-1m`).

The archive is downloaded to a temporary file, its md5 is checked against the published digest, it is
extracted into `dest` (default `~/.cache/fedrec/data/<name>/`, one of `data_roots()`, so
`load_dataset("ml-1m")` finds `ml-1m/ratings.dat` there) without the archive's top folder, and the
ratings file is parsed to check it. Network access happens only in `download`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from fedrec.errors import FedRecError

__all__ = ["SOURCES", "default_dest", "download", "extract", "fetch", "md5sum", "verify_checksum"]

# name -> url, md5 of the archive, ratings file inside it, loader format, expected interactions
SOURCES = {
    "ml-1m": {
        "url": "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        "md5": "c4d9eecfca2ab87c1945afe126590906",
        "file": "ratings.dat",
        "format": "ml-1m",
        "rows": 1_000_209,
    },
    "ml-100k": {
        "url": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        "md5": "0e33842e24a9c977be4e0107933c0723",
        "file": "u.data",
        "format": "ml-100k",
        "rows": 100_000,
    },
}


def default_dest(name: str) -> Path:
    """~/.cache/fedrec/data/<name>."""
    return Path.home() / ".cache" / "fedrec" / "data" / name


def download(url: str, path, progress: bool = True, timeout: float = 60) -> Path:
    """Stream `url` into `path`, with a tqdm progress bar."""
    path = Path(path)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(path, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1])
            try:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
    except OSError as exc:  # URLError, HTTPError, timeouts are OSErrors
        path.unlink(missing_ok=True)
        raise FedRecError(f"download of {url} failed: {exc}; download it by hand and pass --url "
                          "file:///path/to/the.zip, or unzip it under a data root") from None
    return path


def md5sum(path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_checksum(path, md5: str) -> None:
    """Raise FedRecError (and delete the file) when the md5 of `path` is not `md5`."""
    actual = md5sum(path)
    if actual.lower() != md5.lower():
        Path(path).unlink(missing_ok=True)
        raise FedRecError(f"checksum mismatch for {path}: expected md5 {md5.lower()}, got {actual} "
                          "(the file was deleted)")


def extract(zip_path, dest) -> list[Path]:
    """Extract a zip into `dest`, dropping a single top-level folder (ml-1m/ratings.dat ->
    dest/ratings.dat). Refuses members that would land outside `dest`. Returns the files written."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise FedRecError(f"{zip_path}: not a valid zip archive ({exc})") from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")]
        tops = {m.filename.split("/", 1)[0] for m in members}
        strip = len(tops) == 1 and all("/" in m.filename for m in members)
        written = []
        for m in members:
            rel = m.filename.split("/", 1)[1] if strip else m.filename
            target = (root / rel).resolve()
            if os.path.isabs(rel) or root not in target.parents:
                raise FedRecError(f"{zip_path}: unsafe member path {m.filename!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            written.append(target)
    return written


def fetch(name: str, dest=None, url=None, force: bool = False, progress: bool = True) -> Path:
    """Download, verify and extract dataset `name` ("ml-1m" or "ml-100k"); return the directory that
    holds its ratings file. An already extracted, parseable copy is kept unless `force`."""
    from fedrec.data.formats import load_interactions

    if name not in SOURCES:
        raise FedRecError(f"cannot fetch {name!r}: known datasets are {', '.join(SOURCES)}")
    src = SOURCES[name]
    dest = Path(dest).expanduser() if dest else default_dest(name)
    target = dest / src["file"]
    if target.exists() and not force:
        _check(load_interactions(target, src["format"]), src, target)
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".zip", dir=dest)
    os.close(fd)
    try:
        download(url or src["url"], tmp, progress=progress)
        verify_checksum(tmp, src["md5"])
        extract(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    if not target.exists():
        raise FedRecError(f"the archive for {name} has no {src['file']}")
    _check(load_interactions(target, src["format"]), src, target)
    return dest


def _check(inter, src, target):
    if src.get("rows") is not None and len(inter) != src["rows"]:
        raise FedRecError(f"{target}: {len(inter)} interactions, expected {src['rows']}; "
                          "delete it and fetch again")
