"""Every FEDREC_* environment variable the package reads, read here and nowhere else.

Each variable has one accessor returning a typed value; a malformed value is a one-line
ConfigError naming the variable. The README's "Environment variables" table lists the same
set (tests/test_environment.py keeps the two and the code in step).
"""

from __future__ import annotations

import os
from pathlib import Path

from fedrec.errors import ConfigError

# name -> what it does (the README's table is checked against these names)
VARIABLES = {
    "FEDREC_WORKERS": "client worker processes of `fedrec run` (default: 2 on Linux for rounds "
                      "of 16+ clients when two cores are free of other work, else 1)",
    "FEDREC_TORCH_THREADS": "torch intra-op threads per process (default 1; 0 = torch's default)",
    "FEDREC_BLAS_THREADS": "BLAS threads per process (default 1; 0 = the library's default)",
    "FEDREC_CACHE": "cache directory for prepared data and UNION's null pool (default "
                    "~/.cache/fedrec; `data.cache_dir` overrides it)",
    "FEDREC_DATA": "extra data roots searched first, `:`-separated",
    "FEDREC_PROJECT_ROOT": "where `flwr run` resolves relative experiment and output paths",
    "FEDREC_SAVE_MODEL": "1: a Flower run also saves its final global arrays to model.npz",
    "FEDREC_RUNS_RELATIVE_TO_YAML": "1: a relative output.dir is taken from the YAML's folder",
    "FEDREC_MALLOC_MB": "glibc's malloc: blocks up to this many MB come from the heap, and up "
                        "to twice that of freed heap memory is kept for reuse (default 64, or "
                        "when unset 4x a round's upload bytes where that is more, the heap "
                        "then never trimmed; 0 = glibc's own policy, which maps and unmaps "
                        "every block over 32 MB)",
    "FEDREC_ARCHIVE": "the results archive of `fedrec archive` and `fedrec reproduce` (default "
                      "results/ at the project root)",
}


def _raw(name: str) -> str:
    if name not in VARIABLES:
        raise KeyError(f"{name} is not a fedrec environment variable")
    return os.environ.get(name, "").strip()


def _int(name: str, default: int | None, minimum: int) -> int | None:
    raw = _raw(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {raw!r}")
    return value


def _flag(name: str) -> bool:
    return _raw(name) not in ("", "0", "false", "no")


def workers() -> int | None:
    """$FEDREC_WORKERS (None when unset)."""
    return _int("FEDREC_WORKERS", None, 1)


def torch_threads() -> int:
    return _int("FEDREC_TORCH_THREADS", 1, 0)


def blas_threads() -> int:
    return _int("FEDREC_BLAS_THREADS", 1, 0)


def malloc_mb() -> int:
    return _int("FEDREC_MALLOC_MB", 64, 0)


def malloc_mb_given() -> bool:
    """Whether FEDREC_MALLOC_MB is set (then its value holds whatever a round needs)."""
    return bool(_raw("FEDREC_MALLOC_MB"))


def archive_dir() -> Path | None:
    """$FEDREC_ARCHIVE (None when unset)."""
    raw = _raw("FEDREC_ARCHIVE")
    return Path(raw).expanduser() if raw else None


def cache_root() -> Path:
    raw = _raw("FEDREC_CACHE")
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "fedrec"


def data_roots() -> list[Path]:
    return [Path(p).expanduser() for p in _raw("FEDREC_DATA").split(os.pathsep) if p]


def project_root() -> Path | None:
    raw = _raw("FEDREC_PROJECT_ROOT")
    return Path(raw).expanduser() if raw else None


def save_model() -> bool:
    return _flag("FEDREC_SAVE_MODEL")


def runs_relative_to_yaml() -> bool:
    return _flag("FEDREC_RUNS_RELATIVE_TO_YAML")
