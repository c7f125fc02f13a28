"""CPU seconds spent by a run: a steadier cost figure than wall time, which counts the time
a run waited for a core (other jobs on the machine) or stood stopped (SIGSTOP, a suspended
laptop).

A run's CPU is this process's (user + system), its reaped child processes' (the engine's
worker pool once closed), and its live workers' (read from /proc/PID/stat; where there is
no /proc, e.g. macOS, a live worker is counted once it is reaped). Callers take differences
of `process_cpu_seconds()`, so a process that runs several runs (a grid's job) gives each
its own.
"""

from __future__ import annotations

import os
import resource


def process_cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its reaped children, so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime


def _clock_ticks() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100


_TICKS = _clock_ticks()


def pid_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc); 0.0 where unreadable."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            text = f.read()
    except OSError:
        return 0.0
    # after the command name, in parentheses (which may itself hold spaces and parentheses),
    # fields 3.. of proc(5): utime and stime are fields 14 and 15
    fields = text[text.rindex(")") + 2:].split()
    try:
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (IndexError, ValueError):
        return 0.0
