"""Process-wide runtime settings."""

from __future__ import annotations

import os


def configure_threads():
    """Use one intra-op torch thread and one BLAS thread unless FEDREC_TORCH_THREADS /
    FEDREC_BLAS_THREADS say otherwise (0: leave the library's default).

    The per-client tensors here are small (hundreds of rows); with two OpenMP threads on a
    2-core machine, torch's elementwise ops and index_add_ ran ~80x slower than with one
    (8 ms vs 0.1 ms for a 3706x64 add), because the threads spin against each other and
    against the rest of the process. numpy's OpenBLAS does the same: UNION's distance
    matrices (float64 products of a few thousand rows) took 168 ms of CPU a round on ML-1M
    with OpenBLAS's two threads on a loaded 2-core machine, 32 ms with one.

    torch is not imported for this: where it is not loaded yet (a deployment's ClientApp, a
    fresh process per message, whose MF/NCF training is numpy) the count goes to
    OMP_NUM_THREADS, which torch reads when it is first imported.

    Then configure_memory() (the process's malloc policy for large temporaries).
    """
    import sys

    from fedrec import environment

    n = environment.torch_threads()
    if n > 0:
        if "torch" in sys.modules:
            torch = sys.modules["torch"]
            if torch.get_num_threads() != n:
                torch.set_num_threads(n)
        else:
            os.environ["OMP_NUM_THREADS"] = str(n)
    n = environment.blas_threads()
    if n > 0:
        try:  # threadpoolctl comes with scikit-learn
            from threadpoolctl import threadpool_limits
        except ImportError:
            threadpool_limits = None
        if threadpool_limits is not None:
            threadpool_limits(n, user_api="blas")
    configure_memory()


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MALLOPT_MAX = 2**31 - 1  # mallopt's int argument


def round_upload_bytes(cfg, data) -> int:
    """About how many bytes of float32 item rows a round's uploads hold: clients_per_round
    clients, each sending every item (weight_decay_scope all) or its positives and their
    negatives (1 + data.neg_ratio per training item, on average), dim floats a row."""
    n_items = int(data.n_items)
    if cfg.train.weight_decay_scope == "all":
        rows = n_items
    else:
        mean_train = len(data.train_items) / max(int(data.n_users), 1)
        rows = min(n_items, (1 + int(cfg.data.neg_ratio)) * mean_train)
    clients = min(int(cfg.train.clients_per_round), int(data.n_users))
    return int(clients * rows * int(cfg.model.dim) * 4)


def configure_memory(round_bytes: int = 0) -> bool:
    """Keep a round's large temporaries in the heap (glibc only; FEDREC_MALLOC_MB, default 64,
    or 4x `round_bytes` (`round_upload_bytes`) where that is more and the variable is unset).

    glibc's malloc serves a block over its mmap threshold (at most 32 MB by its own rule)
    with a fresh mmap and gives it back with munmap when it is freed. So such a block is
    page-faulted in, zero-filled by the kernel, every time it is allocated. A paper-protocol
    round (dense uploads: 50 clients x 3,706 items x 64 floats) makes a few 47 MB arrays per
    round: the stacked uploads and their weighted copy. Their page faults were a quarter of
    the round's CPU time. With the mmap threshold at FEDREC_MALLOC_MB and the trim threshold
    at twice that, those blocks come from the heap and are reused from round to round.
    Measured with `benchmarks/round_profile.py` on Table 1's ML-1M MF config (dense uploads,
    one process, load ~3): ~119 -> ~90 ms of CPU a round. Sparse ML-1M MF (`ml1m-mf.yaml`)
    is unchanged at ~35 ms. The cost is memory that stays with the process instead of going
    back to the system: peak RSS 488 -> 668 MB there (a 256 MB threshold and a 1 GB trim
    threshold: 1,118 MB for the same speed). Returns whether the setting was applied."""
    import ctypes
    import ctypes.util
    import platform

    from fedrec import environment

    mb = environment.malloc_mb()
    if mb <= 0 or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    # mallopt takes a C int: a setting beyond 2**31 - 1 would wrap
    limit = min(mb * 1024 * 1024, MALLOPT_MAX // 2)
    trim = 2 * limit
    if not environment.malloc_mb_given() and 4 * int(round_bytes) > limit:
        # rounds whose uploads (with their float64 copies and what goes with them: 4x)
        # outgrow the default: every client of ML-1M in a round (Spattack's protocol, ~500 MB
        # of rows) faulted in ~45,000 fresh pages a round, a third of its CPU time. Such a
        # round frees more at once than a trim threshold that fits mallopt's int, so the
        # heap is never trimmed there (-1): the process keeps its peak (4.2 -> 2.8 s a round)
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        limit = min(4 * int(round_bytes), MALLOPT_MAX // 2, ram // 4)
        trim = -1
    return bool(libc.mallopt(M_MMAP_THRESHOLD, limit) and libc.mallopt(M_TRIM_THRESHOLD, trim))



def resolve_device(name: str, key: str = "model.device"):
    """`cpu`, `cuda[:k]` or `auto` (cuda when torch sees a GPU) -> torch.device; a one-line
    ConfigError naming `key` for anything else, or cuda without a GPU."""
    import torch

    from fedrec.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{key}: {name!r} is not a device (cpu, cuda, auto)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{key}: {name!r} is not one of cpu, cuda, auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {name}, but torch sees no GPU")
    return device


def busy_cores() -> float:
    """How many cores other work keeps busy now: the larger of the 1-minute load average and
    the processes runnable right now besides this one (/proc/loadavg); 0 where unknown."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0]) - 1  # this process is one
    except (OSError, ValueError, IndexError):
        running = 0
    return max(load, float(running))
