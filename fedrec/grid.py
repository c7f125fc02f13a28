"""Running the runs of a grid: one after another, N at a time on this machine, or as Ray tasks.

Every run is independent and single-process when runs share the machine (workers=1, one torch
and one BLAS thread), so a grid gives the same results however it is scheduled. Local jobs run
in `spawn`ed processes: forking a process that already holds torch's thread pools can deadlock.

A Ray task writes its run directory on the node that runs it and also returns the directory's
text files; the driver writes them where the run directory is missing (output dir not shared
between the nodes), so a grid's results always end up under the driver's output dir.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedrec.config import ExperimentConfig

# the files of a run directory a Ray task sends back to the driver
RUN_FILES = ("config.yaml", "metrics.csv", "summary.json")
# environment of a run that shares the machine with other runs: one process, one thread
SINGLE_PROCESS_ENV = {"FEDREC_WORKERS": "1", "FEDREC_TORCH_THREADS": "1",
                      "FEDREC_BLAS_THREADS": "1", "OMP_NUM_THREADS": "1",
                      "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@dataclass(frozen=True)
class RunTask:
    """One run of a grid: its position, its config and where its run directory goes."""

    index: int
    cfg: ExperimentConfig
    output_root: str | None
    force: bool


@dataclass
class RunOutcome:
    """What came back from one run: its summary, or the one-line error that stopped it."""

    index: int
    name: str
    summary: dict | None
    error: str = ""
    files: dict[str, str] = field(default_factory=dict)  # run dir text files (Ray tasks only)
    stopped_after: int | None = None  # stopped by a signal after this round, checkpoint written

    @property
    def skipped(self) -> bool:
        return bool(self.summary and self.summary.get("skipped"))


@dataclass(frozen=True)
class RayOptions:
    """`--ray [ADDRESS]`: None = start a local Ray; resources None = the run's `ray:` keys."""

    address: str | None
    num_cpus: float | None = None
    num_gpus: float | None = None


@dataclass
class GridProgress:
    """Counts behind the grid's progress line."""

    total: int
    jobs: int
    done: int = 0
    failed: int = 0
    running: int = 0
    walls: list[float] = field(default_factory=list)  # wall seconds of runs that ran here


class GridInterrupted(KeyboardInterrupt):
    """A grid stopped by a signal (to the driver or to one of its runs): the runs that were
    running stopped after a round with their checkpoints written, the rest did not start;
    the same command resumes them."""

    def __init__(self, outcomes: list[RunOutcome], not_started: int):
        self.outcomes, self.not_started = outcomes, not_started
        stopped = [o for o in outcomes if o.stopped_after is not None]
        rounds = ", ".join(f"{o.name} after round {o.stopped_after}" for o in stopped)
        super().__init__(f"grid stopped: {len(stopped)} run(s) stopped with a checkpoint"
                         f"{' (' + rounds + ')' if rounds else ''}, {not_started} not started; "
                         "the same command resumes them")


def one_line_error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def run_label(cfg) -> str:
    return cfg.output.name or cfg.name


def host_record() -> dict:
    """Where a run ran: the Ray node id inside a Ray task, else the hostname; and the pid."""
    node = socket.gethostname()
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    return {"node": node, "hostname": socket.gethostname(), "pid": os.getpid()}


def record_host(run_dir: Path, summary: dict) -> dict:
    """Add `host` to a finished run's summary and to its summary.json (written atomically)."""
    host = host_record()
    path = Path(run_dir) / "summary.json"
    on_disk = json.loads(path.read_text())
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(on_disk, host=host), indent=2))
    os.replace(tmp, path)
    return dict(summary, host=host)


def run_one(task: RunTask, progress=False, collect_files=False, catch=True) -> RunOutcome:
    """Run one config (skipped when complete); with `catch`, its error becomes the outcome's
    one-line error: one failed run does not stop a grid."""
    from fedrec.engine import RunInterrupted, run_experiment
    from fedrec.results import run_dir_for

    label = run_label(task.cfg)
    try:
        summary = run_experiment(task.cfg, output_root=task.output_root, progress=progress,
                                 force=task.force)
        run_dir = run_dir_for(task.cfg, task.output_root)
        if not summary.get("skipped"):
            summary = record_host(run_dir, summary)
    except RunInterrupted as e:  # a signal stopped it after a round: the grid stops too
        if not catch:
            raise
        return RunOutcome(task.index, label, None, stopped_after=e.round_done)
    except Exception as e:  # noqa: BLE001 - reported as the run's one-line error
        if not catch:
            raise
        return RunOutcome(task.index, label, None, error=one_line_error(e))
    files = {}
    if collect_files:
        files = {n: (run_dir / n).read_text() for n in RUN_FILES if (run_dir / n).exists()}
    return RunOutcome(task.index, label, summary, files=files)


def _pin_single_process():
    os.environ.update(SINGLE_PROCESS_ENV)


_DRIVER_PID: list = []  # a local grid worker's driver (set by _local_worker_init)


def _local_worker_init():
    """A local grid worker: one process, one thread, and it does not outlive the driver.
    Between runs SIGINT and SIGTERM do not kill it (a worker dying breaks the whole pool,
    whose other workers are then terminated in the middle of their runs): the driver decides
    when the grid stops; within a run, the run's own handlers stop it after a round."""
    import signal

    _pin_single_process()
    _DRIVER_PID[:] = [os.getppid()]

    def between_runs(signum, frame):
        if os.getppid() != _DRIVER_PID[0]:  # the driver is gone: nothing to wait for
            os._exit(1)

    signal.signal(signal.SIGINT, between_runs)
    signal.signal(signal.SIGTERM, between_runs)
    _exit_with_parent(_DRIVER_PID[0])


def _local_run(task: RunTask) -> RunOutcome:
    """run_one in a local worker; once its run has stopped, a worker whose driver died exits
    (the run's checkpoint and summary are written by then)."""
    try:
        return run_one(task)
    finally:
        if _DRIVER_PID and os.getppid() != _DRIVER_PID[0]:
            os._exit(1)


def _exit_with_parent(parent: int, poll_s: float = 1.0, grace_s: float = 120.0):
    """If the driver dies (killed, its machine's session closed), this worker stops its run as
    SIGTERM does (a checkpoint after the round in progress: the run resumes later) and exits,
    instead of waiting forever for tasks nobody will send; after `grace_s` it exits anyway."""
    import signal
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _ray_run(task: RunTask) -> RunOutcome:
    _pin_single_process()
    return run_one(task, collect_files=True)


def eta_seconds(p: GridProgress) -> float:
    """Mean wall time of the runs finished so far times the runs not finished, over the jobs."""
    if not p.walls:
        return math.nan
    mean = sum(p.walls) / len(p.walls)
    return mean * math.ceil((p.total - p.done) / max(1, p.jobs))


def progress_text(p: GridProgress) -> str:
    eta = eta_seconds(p)
    shown = "?" if math.isnan(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
    failed = f", {p.failed} failed" if p.failed else ""
    return (f"{p.done}/{p.total} done, {p.running} running, "
            f"{p.total - p.done - p.running} left{failed}, ETA {shown}")


class GridScheduler:
    """Feeds a grid's runs to `jobs` local processes or to Ray; keeps the one progress line."""

    def __init__(self, tasks: list[RunTask], jobs: int = 1, ray: RayOptions | None = None,
                 show_progress: bool = True, on_finish=None):
        self.tasks = tasks
        self.on_finish = on_finish
        self.ray = ray
        self.progress = GridProgress(total=len(tasks), jobs=max(1, jobs))
        self.show_progress = show_progress
        self._bar = None
        self._started: dict[int, float] = {}

    def run(self) -> list[RunOutcome]:
        """Every run's outcome, in grid order."""
        from tqdm import tqdm

        if self.show_progress:
            # the counts and the ETA are ours (tqdm's rate would count skipped runs as instant)
            self._bar = tqdm(total=len(self.tasks), unit="run", dynamic_ncols=True,
                             bar_format="grid {bar:20} {desc}", file=sys.stderr)
        try:
            outcomes = self._run_ray() if self.ray is not None else self._run_local()
        finally:
            if self._bar is not None:
                self._bar.close()
        return sorted(outcomes, key=lambda o: o.index)

    def _start(self, task: RunTask):
        self._started[task.index] = time.perf_counter()
        self.progress.running += 1
        self._refresh()

    def _finish(self, outcome: RunOutcome):
        p = self.progress
        p.running -= 1
        p.done += 1
        p.failed += bool(outcome.error)
        if outcome.summary is not None and not outcome.skipped:
            p.walls.append(time.perf_counter() - self._started[outcome.index])
        if outcome.error and self._bar is not None:
            self._bar.write(f"{outcome.name}: FAILED: {outcome.error}", file=sys.stderr)
        self._refresh(advance=1)
        if self.on_finish is not None:
            self.on_finish(outcome)

    def _refresh(self, advance: int = 0):
        if self._bar is not None:
            self._bar.set_description_str(progress_text(self.progress), refresh=False)
            self._bar.update(advance)
            self._bar.refresh()

    def _run_local(self) -> list[RunOutcome]:
        """Runs in `jobs` spawned workers. SIGTERM or SIGINT to the driver, or a signal that
        stops one of the runs, stops the grid: no run starts any more, the running ones are
        sent SIGTERM (each checkpoints after its round in progress), and GridInterrupted is
        raised once they have all come back."""
        from fedrec.checkpoint import stop_on_signals

        outcomes = []
        pool = ProcessPoolExecutor(max_workers=self.progress.jobs, mp_context=get_context("spawn"),
                                   initializer=_local_worker_init)
        stopping = False
        signalled: set = set()
        try:
            pending = {}
            queue = list(self.tasks)
            with stop_on_signals() as stop:
                while queue or pending:
                    while queue and len(pending) < self.progress.jobs and not stopping:
                        task = queue.pop(0)
                        self._start(task)
                        pending[pool.submit(_local_run, task)] = task
                    # a timeout, so that a signal to the driver is seen within a second
                    finished, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        task = pending.pop(fut)
                        outcome = _outcome_of(fut, task)
                        outcomes.append(outcome)
                        self._finish(outcome)
                        stopping = stopping or outcome.stopped_after is not None
                    if stop or stopping:
                        stopping = True
                        self.progress.total -= len(queue)
                        queue = []
                        _stop_workers(pool, signalled)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if stopping:
            raise GridInterrupted(sorted(outcomes, key=lambda o: o.index),
                                  len(self.tasks) - len(outcomes))
        return outcomes

    def _run_ray(self) -> list[RunOutcome]:
        import ray

        opts = self.ray
        ray.init(address=opts.address, ignore_reinit_error=True, log_to_driver=False)
        try:
            refs = {}
            cpus_per_run = 1.0
            for task in self.tasks:
                cpus = task.cfg.ray.num_cpus if opts.num_cpus is None else opts.num_cpus
                gpus = task.cfg.ray.num_gpus if opts.num_gpus is None else opts.num_gpus
                cpus_per_run = max(cpus_per_run, cpus)
                remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_ray_run)
                self._start(task)
                refs[remote.remote(task)] = task
            # runs at once on the cluster, for the ETA ("running" counts the runs sent to Ray)
            self.progress.jobs = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_run))
            outcomes = []
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                task = refs.pop(ready[0])
                try:
                    outcome = ray.get(ready[0])
                except Exception as e:  # noqa: BLE001 - the task's process died
                    outcome = RunOutcome(task.index, run_label(task.cfg), None,
                                         error=one_line_error(e))
                write_back(task, outcome)
                outcomes.append(outcome)
                self._finish(outcome)
            return outcomes
        finally:
            ray.shutdown()


def _stop_workers(pool, signalled: set):
    """SIGTERM, once, to each live worker of the pool: one running a run stops it after the
    round in progress, with a checkpoint; an idle one ignores it (_local_worker_init)."""
    import signal

    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        if proc.pid in signalled or not proc.is_alive():
            continue
        signalled.add(proc.pid)
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _outcome_of(fut, task: RunTask) -> RunOutcome:
    try:
        return fut.result()
    except Exception as e:  # noqa: BLE001 - the worker process died (killed, out of memory)
        return RunOutcome(task.index, run_label(task.cfg), None,
                          error=one_line_error(e))


def write_back(task: RunTask, outcome: RunOutcome):
    """Write a Ray task's run files on the driver when its output dir is not the node's."""
    from fedrec.results import is_complete, run_dir_for

    run_dir = run_dir_for(task.cfg, task.output_root)
    if not outcome.files or is_complete(run_dir):
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, text in outcome.files.items():
        (run_dir / name).write_text(text)
    outcome.summary = dict(outcome.summary, run_dir=str(run_dir))


def run_grid(cfgs, output_root=None, force=False, jobs=1, ray: RayOptions | None = None,
             progress=True, on_finish=None) -> list[RunOutcome]:
    """Run the configs of a grid: finished runs are skipped, failed runs reported, not raised.

    Skipping is decided here, on the driver, so a Ray cluster without the driver's output dir
    does not rerun what the driver already holds. `on_finish(outcome, run_dir)`, if given, is
    called on the driver for every run as soon as it ends (skipped runs first), before the next
    result is awaited: what a grid has done is kept (`fedrec run --archive`) even if the
    session that runs it is killed midway.
    """
    from fedrec.results import is_complete, load_summary, run_dir_for

    tasks = [RunTask(i, cfg, None if output_root is None else str(output_root), force)
             for i, cfg in enumerate(cfgs)]
    dirs = {t.index: run_dir_for(t.cfg, t.output_root) for t in tasks}
    done = []
    todo = []
    for t in tasks:
        if not force and is_complete(dirs[t.index]):
            done.append(RunOutcome(t.index, run_label(t.cfg),
                                   dict(load_summary(dirs[t.index]), skipped=True)))
        else:
            todo.append(t)

    def finish(outcome: RunOutcome):
        if on_finish is not None:
            on_finish(outcome, dirs[outcome.index])

    for outcome in done:
        finish(outcome)
    if jobs <= 1 and ray is None:
        ran = []
        for t in todo:
            ran.append(_run_sequential(t, len(tasks), progress))
            finish(ran[-1])
            if ran[-1].stopped_after is not None:  # a signal: the rest of the grid waits too
                raise GridInterrupted(sorted(done + ran, key=lambda o: o.index),
                                      len(todo) - len(ran))
    else:
        ran = GridScheduler(todo, jobs=jobs, ray=ray, show_progress=progress,
                            on_finish=finish).run() if todo else []
    return sorted(done + ran, key=lambda o: o.index)


def _run_sequential(task: RunTask, total: int, progress: bool) -> RunOutcome:
    """One run in this process, with the engine's own per-round progress bar."""
    if total > 1:
        print(f"[{task.index + 1}/{total}] {run_label(task.cfg)}", file=sys.stderr)
    # a single run raises its error as before (config and data errors exit with code 2)
    outcome = run_one(task, progress=progress and None, catch=total > 1)
    if outcome.error:
        print(f"{outcome.name}: FAILED: {outcome.error}", file=sys.stderr)
    return outcome
