"""Process-parallel client work for the in-process runner (`Engine(cfg, workers=W)`).

W worker processes are forked from the runner, so they inherit the loaded data, model and
config. The pool needs only a narrow host (`ClientHost`: a user's client, the global arrays);
each worker gets its forked copy of the runner's host and owns the users u with u % W == k:
their client objects and private state live only in that worker. A round is synchronous:

1. the parent samples the round's users and sends each worker a `FitRequest` (round, its
   users in sampled order, its share of the next round's users);
2. each worker runs the same per-class cohort fit as the single-process runner
   (`clients.cohort.fit_clients`) on the current global arrays, which live in shared memory
   (`shared_empty`, allocated before the fork: the parent's in-place optimizer steps are the
   workers' model, nothing is copied per round), writes its uploads into its own
   shared-memory arena and replies with a `FitReply` per client: (offset, shape, dtype) per
   array plus num_examples and metrics;
3. once every worker has replied, the parent restores the sampled order and aggregates. The
   uploads it aggregates are views into the arenas: they are consumed within
   `aggregate_uploads` (validation concatenates them, the rule reduces them, the optimizer
   steps on the aggregate), and a worker overwrites its arena only when the next request
   arrives, after `aggregate_uploads` has returned (the adversary's `HonestFitsRequest`, sent
   between the reply and the aggregation, appends its uploads after the round's). Nothing in
   the strategy or the rules keeps an upload array past the round (`RoundResult.dropped`
   holds client ids); a rule that wanted to would have to copy it. An upload that is not a
   list of numeric arrays, or does not fit the arena, travels pickled through the pipe
   instead (same values either way). Measured
   on ML-1M MF, 2 workers: ~49 rounds/s through the arenas, ~41 with every upload pickled.

Evaluation asks each worker for its users' `user_vectors` at the round (through the arena) and
reassembles them in order. The parent never steps the optimizer while a worker can be reading the global arrays: workers
read them only inside a "fit" request, and the parent steps only after every reply.

A client's upload and private state do not depend on the cohort it is computed in (pinned by
tests/test_client.py), so the aggregated input, and hence every result, is bit-identical to
the single-process runner. Worker exceptions come back as their traceback text and are raised
in the parent as `WorkerError`, after the pool has been shut down.
"""

from __future__ import annotations

import gc
import mmap
import multiprocessing as mp
import pickle
import signal
import sys
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Protocol

import numpy as np

from clients.cohort import compute_clients, fit_clients, honest_fits, prepare_clients, user_vectors

_ALIGN = 64  # every array in an arena starts on a 64-byte boundary (as the allocator would)
_MAX_ARENA = 256 << 20


class WorkerError(RuntimeError):
    """A worker process failed; the message carries the worker's traceback."""


class ClientHost(Protocol):
    """What the pool needs of the process it forks: the devices it holds and the model."""

    def client(self, user: int): ...

    def global_arrays(self) -> list: ...


@dataclass
class FitRequest:
    round: int
    users: list  # this worker's users of the round, in sampled order
    next_users: list  # its share of the next round's users (prepared while the parent aggregates)


@dataclass
class HonestFitsRequest:
    """The honest updates some of the worker's clients would send in `round` (the adversary's
    pool, fedrec/adversary.py), computed on twins: private state untouched. Sent between a
    "fit" reply and the aggregation, so its uploads go into the arena after the round's."""

    round: int
    users: list


@dataclass
class VectorsRequest:
    round: int
    users: list
    split: str


@dataclass
class CallRequest:
    """fn(host, k, *args) in the worker (tests, checkpoints); fn must be picklable by name."""

    fn: Callable
    args: tuple


@dataclass
class FitReply:
    """One client's result: its upload as arena references (in_arena) or the object itself."""

    num_examples: Any
    metrics: Any
    in_arena: bool
    upload: Any


def arena_size(model, clients_per_round: int) -> int:
    """Bytes of a worker's reply arena: a round's uploads if every client sent every row."""
    per_client = model.n_items * (8 + 4 * model.dim) + sum(
        4 * int(np.prod(s)) for s in model.predictor_shapes) + _ALIGN * (2 + len(model.predictor_shapes))
    return min(max(per_client * int(clients_per_round), 1 << 20), _MAX_ARENA)


def fork_available() -> bool:
    return "fork" in mp.get_all_start_methods()


def shared_empty(shape, dtype=np.float32) -> np.ndarray:
    """An uninitialised array in anonymous shared memory (MAP_SHARED | MAP_ANONYMOUS).

    A process forked after the allocation maps the same pages: writes from either side are
    seen by the other. The memory goes away with the last process using it (no named segment
    to leak, no /dev/shm size limit).
    """
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    buf = mmap.mmap(-1, max(count * dtype.itemsize, 1))
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


class Arena:
    """A worker's reply buffer in shared memory: arrays are copied in, the parent reads views."""

    def __init__(self, nbytes: int):
        self.size = int(nbytes)
        self.buf = mmap.mmap(-1, self.size)
        self.pos = 0

    def reset(self):
        self.pos = 0

    def put(self, a):
        """Copy `a` in; returns (offset, shape, dtype str), or None where it cannot go."""
        if type(a) is not np.ndarray or a.dtype.kind not in "biuf" or a.dtype.hasobject:
            return None
        start = -(-self.pos // _ALIGN) * _ALIGN
        end = start + a.nbytes
        if end > self.size:
            return None
        if a.nbytes:
            np.ndarray(a.shape, a.dtype, buffer=self.buf, offset=start)[...] = a
        self.pos = end
        return start, a.shape, a.dtype.str

    def view(self, ref) -> np.ndarray:
        off, shape, dtype = ref
        return np.ndarray(shape, dtype, buffer=self.buf, offset=off)


def _pack_upload(arena: Arena, upload):
    """An upload as arena references (a list of arrays), or the object itself (pickled)."""
    if type(upload) is list:
        refs = []
        for a in upload:
            r = arena.put(a)
            if r is None:
                break
            refs.append(r)
        else:
            return True, refs
    return False, upload


def _worker_main(host: ClientHost, k: int, conn, arena: Arena, inherited):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    for c in inherited:  # the parent's ends of every pipe: EOF must reach us if it dies
        c.close()
    gc.freeze()  # what the fork inherited is never collected here: no scans, no copy-on-write
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)  # W processes share the cores already
    except ImportError:
        pass
    prepared = None  # (round, users, prepared cohorts) for the next round, made while idle

    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            break
        try:
            msg = pickle.loads(raw)
            if msg is None:  # stop
                break
            if not isinstance(msg, HonestFitsRequest):  # the round's uploads are still in use
                arena.reset()
            if isinstance(msg, FitRequest):
                arrays = host.global_arrays()
                if prepared is not None and prepared[0] == msg.round and prepared[1] == msg.users:
                    outs = compute_clients(prepared[2], arrays)
                else:  # nothing (or something else) prepared: the whole fit now
                    outs = fit_clients([host.client(u) for u in msg.users], arrays,
                                       {"round": msg.round})
                prepared = None
                reply = [FitReply(n, metrics, *_pack_upload(arena, up)) for up, n, metrics in outs]
            elif isinstance(msg, HonestFitsRequest):
                outs = honest_fits([host.client(u) for u in msg.users], host.global_arrays(),
                                   msg.round)
                reply = [FitReply(n, metrics, *_pack_upload(arena, up)) for up, n, metrics in outs]
            elif isinstance(msg, VectorsRequest):
                vecs = user_vectors([host.client(u) for u in msg.users], msg.round, msg.split,
                                    host.global_arrays())
                ref = arena.put(vecs)
                reply = (True, ref) if ref is not None else (False, vecs)
            elif isinstance(msg, CallRequest):
                reply = msg.fn(host, k, *msg.args)
            else:
                raise ValueError(f"unknown request {msg!r}")
            data = pickle.dumps(("ok", reply), pickle.HIGHEST_PROTOCOL)
        except BaseException:
            data = pickle.dumps(("error", traceback.format_exc()), pickle.HIGHEST_PROTOCOL)
            msg = None
        conn.send_bytes(data)
        if isinstance(msg, FitRequest) and msg.next_users:
            # While the parent aggregates this round, prepare the next one: its users, their
            # negatives and caught-up rows need no model (private state is left untouched)
            try:
                nxt = msg.round + 1
                prepared = (nxt, msg.next_users,
                            prepare_clients([host.client(u) for u in msg.next_users],
                                            host.global_arrays(), {"round": nxt}, ahead=True))
            except BaseException:
                prepared = None  # redone, and its error reported, when the round comes
    conn.close()


class WorkerPool:
    """W forked workers holding the clients u with u % W == k; see the module docstring."""

    def __init__(self, host: ClientHost, workers: int, arena_bytes: int):
        if workers < 2:
            raise ValueError("a worker pool needs at least 2 workers")
        if not fork_available():
            raise RuntimeError("process-parallel clients need the 'fork' start method (Linux, macOS)")
        self.host = host
        self.workers = int(workers)
        self.arena_bytes = min(int(arena_bytes), _MAX_ARENA)
        self.procs: list = []
        self.conns: list = []
        self.arenas: list = []

    # --- lifecycle ------------------------------------------------------------------------
    def start(self):
        ctx = mp.get_context("fork")
        for f in (sys.stdout, sys.stderr):  # buffered output must not be duplicated by a child
            try:
                f.flush()
            except (AttributeError, ValueError, OSError):
                pass
        try:
            for k in range(self.workers):
                parent_end, child_end = ctx.Pipe(duplex=True)
                arena = Arena(self.arena_bytes)
                inherited = [*self.conns, parent_end]
                p = ctx.Process(target=_worker_main, name=f"fedrec-worker-{k}",
                                args=(self.host, k, child_end, arena, inherited), daemon=True)
                p.start()
                child_end.close()
                self.procs.append(p)
                self.conns.append(parent_end)
                self.arenas.append(arena)
        except BaseException:
            self.close()
            raise
        return self

    def close(self, timeout: float = 5.0):
        """Stop every worker (politely, then by force); safe to call twice."""
        for c in self.conns:
            try:
                c.send(None)  # stop
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(timeout)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join()
        for c in self.conns:
            c.close()
        self.procs, self.conns = [], []

    @property
    def alive(self) -> bool:
        return bool(self.procs)

    def live_cpu_seconds(self) -> float:
        """CPU seconds of the workers not yet reaped (once closed and joined, they count in
        this process's RUSAGE_CHILDREN instead: fedrec.cputime)."""
        from fedrec.cputime import pid_cpu_seconds

        return sum(pid_cpu_seconds(p.pid) for p in self.procs if p.exitcode is None)

    # --- requests -------------------------------------------------------------------------
    def _exchange(self, requests: dict) -> dict:
        """Send {worker: message}, wait for every reply; {worker: reply}. Raises WorkerError."""
        try:
            for k, msg in requests.items():
                try:
                    self.conns[k].send(msg)
                except OSError:
                    self.procs[k].join(1.0)
                    raise WorkerError(f"worker {k} died (exit code {self.procs[k].exitcode})") from None
            pending = set(requests)
            replies = {}
            while pending:
                ready = set(wait([self.conns[k] for k in pending]
                                 + [self.procs[k].sentinel for k in pending]))
                for k in sorted(pending):
                    conn, proc = self.conns[k], self.procs[k]
                    if conn in ready:
                        try:
                            status, body = conn.recv()
                        except (EOFError, OSError):
                            proc.join(1.0)
                            raise WorkerError(f"worker {k} died (exit code {proc.exitcode})") from None
                        if status == "error":
                            raise WorkerError(f"worker {k} failed:\n{body}")
                        replies[k] = body
                        pending.discard(k)
                    elif proc.sentinel in ready:
                        proc.join(1.0)
                        raise WorkerError(f"worker {k} died (exit code {proc.exitcode})")
            return replies
        except BaseException:
            self.close(timeout=1.0)
            raise

    def _split(self, users):
        """{worker: positions in `users`} for the workers that own at least one of them."""
        owner = np.asarray(users, dtype=np.int64) % self.workers
        return {k: np.flatnonzero(owner == k) for k in range(self.workers) if (owner == k).any()}

    def fit(self, rnd: int, users: list, next_users=None) -> list:
        """[(upload, num_examples, metrics)] in the order of `users` (as fit_clients).

        next_users: the next round's sample, if known; each worker prepares its share of it
        right after replying (clients.cohort.prepare_clients), while this process aggregates."""
        parts = self._split(users)
        owner = (np.asarray(next_users, dtype=np.int64) % self.workers) if next_users is not None \
            else None
        replies = self._exchange({
            k: FitRequest(int(rnd), [int(users[i]) for i in pos],
                          [int(u) for u, o in zip(next_users, owner) if o == k]
                          if owner is not None else [])
            for k, pos in parts.items()})
        return self._uploads(parts, replies, len(users))

    def honest_fits(self, rnd: int, users: list) -> list:
        """clients.cohort.honest_fits for `users` (not sampled in `rnd`), computed by their
        owners after the round's "fit" and before the next request, in the order of `users`;
        the uploads are arena views valid until then, as the round's."""
        parts = self._split(users)
        replies = self._exchange({k: HonestFitsRequest(int(rnd), [int(users[i]) for i in pos])
                                  for k, pos in parts.items()})
        return self._uploads(parts, replies, len(users))

    def _uploads(self, parts, replies, n) -> list:
        """[(upload, num_examples, metrics)] from the workers' FitReplies, in the request's order."""
        out = [None] * n
        for k, pos in parts.items():
            arena = self.arenas[k]
            for i, r in zip(pos.tolist(), replies[k]):
                upload = [arena.view(ref) for ref in r.upload] if r.in_arena else r.upload
                out[i] = (upload, r.num_examples, r.metrics)
        return out

    def user_vectors(self, users, rnd: int, split: str = "test") -> np.ndarray:
        """Each user's vector as of `rnd` for `split`, computed by its owner, in the order of
        `users`."""
        parts = self._split(users)
        replies = self._exchange({k: VectorsRequest(int(rnd), [int(users[i]) for i in pos], split)
                                  for k, pos in parts.items()})
        vecs = None
        for k, pos in parts.items():
            in_arena, body = replies[k]
            v = self.arenas[k].view(body) if in_arena else body
            if vecs is None:
                vecs = np.empty((len(users), *v.shape[1:]), dtype=v.dtype)
            vecs[pos] = v
        return vecs

    def call(self, fn, *args) -> list:
        """fn(host, k, *args) in every worker k (fn must be picklable by name)."""
        replies = self._exchange({k: CallRequest(fn, args) for k in range(self.workers)})
        return [replies[k] for k in range(self.workers)]
