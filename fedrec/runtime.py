"""Process-wide runtime settings."""

from __future__ import annotations

import os


def configure_threads():
    """Use one intra-op torch thread unless FEDREC_TORCH_THREADS says otherwise.

    The per-client tensors here are small (hundreds of rows); with two OpenMP threads on a
    2-core machine, torch's elementwise ops and index_add_ ran ~80x slower than with one
    (8 ms vs 0.1 ms for a 3706x64 add), because the threads spin against each other and
    against the rest of the process.
    """
    import torch

    n = int(os.environ.get("FEDREC_TORCH_THREADS", "1"))
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)
