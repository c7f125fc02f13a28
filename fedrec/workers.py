"""How many worker processes a run's clients get (`fedrec run`'s default and its reasons)."""

from __future__ import annotations

import os
import sys

from fedrec import environment


def default_workers(cfg) -> int:
    """Engine's default: $FEDREC_WORKERS, else 1."""
    n = environment.workers()
    return 1 if n is None else n


def model_on_cuda(cfg) -> bool:
    """Whether the experiment's model computes on a GPU (sequential models, model.device)."""
    from fedrec.models import MODELS

    if not getattr(MODELS.get(cfg.model.name), "sequential", False):
        return False
    from fedrec.runtime import resolve_device

    return resolve_device(cfg.model.device, "model.device").type == "cuda"


def auto_workers(cfg) -> int:
    """`fedrec run`'s default: $FEDREC_WORKERS, else 2 processes for cohorts of 16 clients or
    more where enough cores are free of other work (`free_cores_for_two_workers`), else 1.

    Two workers pay off only when they, and this process aggregating beside them, each have a
    core: MF/NCF rounds cost ~10 ms of CPU, so the per-round messages and the fight for cores
    make 2 workers slower than 1 on a 2-core machine as soon as anything else runs (load
    average ~5, `benchmarks/throughput.py --workers 1 2`: ML-1M MF 26-27 rounds/s with 2
    workers against 44-55 with 1, NCF 34-35 against 45). Those models get 2 workers only with
    3 free cores; the sequential models, whose rounds cost ~100 ms of client work, with 2."""
    import multiprocessing

    from fedrec.parallel import fork_available

    n = environment.workers()
    if n is not None:
        return n
    if model_on_cuda(cfg):  # CUDA does not survive a fork, and one GPU is one queue anyway
        return 1
    if multiprocessing.current_process().daemon:  # daemonic processes cannot have children
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    from fedrec.runtime import busy_cores

    if cfg.train.clients_per_round >= 16 and fork_available() and sys.platform.startswith("linux"):
        free = cpus - busy_cores()
        return 2 if free >= free_cores_for_two_workers(cfg) else 1
    return 1


def free_cores_for_two_workers(cfg) -> float:
    """Cores that must be free of other work before `auto_workers` picks 2 workers: 1.5 for the
    sequential models (heavy per-client work: the two workers are what needs the cores), 2.5
    for MF/NCF (small rounds: the parent's aggregation needs a third core), the half a core
    tolerating a load average that is never exactly 0."""
    from fedrec.models import MODELS

    return 1.5 if getattr(MODELS.get(cfg.model.name), "sequential", False) else 2.5
