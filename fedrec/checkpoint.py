"""Checkpoints: everything a run needs to continue, written atomically.

A checkpoint is one file, `checkpoint.pkl` in the run directory: a header (magic, format
version, the config digest and the last completed round) and the state of every stateful part
of the run, each from its own `state_dict()`: the server (global model, optimizer moments,
sampling generators, the filters' and rules' memory), every user's private device state, the
adversary's memory, the ledger's running totals, the rows recorded so far. Everything random
is either in there or derived from (seed, user, purpose, round), so a resumed run continues
bit for bit as if it had never stopped.

Writes go to a temporary file in the same directory, are fsync'ed, then renamed over the
old checkpoint (`os.replace` is atomic on POSIX): a kill at any moment leaves either the old
checkpoint or the new one, never a half-written file. A checkpoint is trusted like the code
that wrote it (pickle): load only the checkpoints of your own runs.
"""

from __future__ import annotations

import os
import pickle
import signal
from contextlib import contextmanager
from pathlib import Path

from fedrec.errors import ConfigError

MAGIC = "fedrec-checkpoint"
VERSION = 1
FILENAME = "checkpoint.pkl"


def checkpoint_path(run_dir) -> Path:
    return Path(run_dir) / FILENAME


def save_checkpoint(run_dir, digest: str, round_done: int, state: dict,
                    wall_time_s: float | None = None, cpu_time_s: float | None = None) -> int:
    """Write the checkpoint atomically; returns its size in bytes. wall_time_s, cpu_time_s:
    the run's wall time and CPU seconds up to this checkpoint (all its segments), which a
    resumed run adds to its own."""
    path = checkpoint_path(run_dir)
    tmp = path.with_name(path.name + ".tmp")
    payload = {"magic": MAGIC, "version": VERSION, "digest": digest, "round": int(round_done),
               "state": state}
    if wall_time_s is not None:
        payload["wall_time_s"] = float(wall_time_s)
    if cpu_time_s is not None:
        payload["cpu_time_s"] = float(cpu_time_s)
    with open(tmp, "wb") as f:
        pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path.stat().st_size


def load_checkpoint(run_dir, digest: str) -> dict | None:
    """The checkpoint's payload ({"round", "state", ...}), None if there is none; a
    ConfigError (one line) if it belongs to another configuration or cannot be read."""
    path = checkpoint_path(run_dir)
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            payload = pickle.load(f)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one line
        raise ConfigError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it or "
                          "rerun with --force") from None
    if not isinstance(payload, dict) or payload.get("magic") != MAGIC:
        raise ConfigError(f"{path}: not a fedrec checkpoint; delete it or rerun with --force")
    if payload.get("version") != VERSION:
        raise ConfigError(f"{path}: checkpoint format {payload.get('version')} is not {VERSION}; "
                          "rerun with --force")
    if payload.get("digest") != digest:
        raise ConfigError(f"{path}: checkpoint of another configuration ({payload.get('digest')}, "
                          f"this one is {digest}); rerun with --force")
    return payload


def remove_checkpoint(run_dir):
    for p in (checkpoint_path(run_dir), checkpoint_path(run_dir).with_name(FILENAME + ".tmp")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


class StopRequest:
    """Set by SIGTERM (and SIGINT) while a run is inside `stop_on_signals`: the runner finishes
    the round it is in, checkpoints, and stops (status "interrupted")."""

    def __init__(self):
        self.signal: int | None = None

    def __bool__(self):
        return self.signal is not None


@contextmanager
def stop_on_signals(signals=(signal.SIGTERM, signal.SIGINT)):
    """Within the block, the signals set the yielded StopRequest instead of killing the process
    (a second SIGINT still raises KeyboardInterrupt). Outside the main thread: a no-op."""
    request = StopRequest()
    previous = {}

    def handler(signum, frame):
        if signum == signal.SIGINT and request.signal == signal.SIGINT:
            raise KeyboardInterrupt
        request.signal = signum

    try:
        for s in signals:
            previous[s] = signal.signal(s, handler)
    except ValueError:  # not the main thread: signals cannot be caught here
        for s, h in previous.items():
            signal.signal(s, h)
        previous = {}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
