"""The server's threads on one CPU (HOLDFAST_CPU).

Every thread of `python app.py` runs Python under one GIL, and hands it
over at each statement, socket call and file call. Handed between threads
on two cores, each handover is a wake-up across cores and cold caches for
the thread that takes it. On one core the same threads do the same work
for less: on this project's 2-core machine, peer_bench's workload A ran
315-329 jobs/s at 3.1-3.3 ms of CPU a job spread over both cores, and
406-433 jobs/s at 2.2-2.4 ms on one (BENCHMARKS.md, peer_bench).

`confine()` puts every thread on one CPU before the server starts the
rest, which inherit it. `everywhere()` gives a thread the CPUs the process
started with for a while: a local function (providers/local.py) runs so,
and the threads it starts (a numerical library's pool) keep every core.

Linux only: elsewhere, and on a process allowed a single CPU, nothing
changes.
"""

import logging
import os
from contextlib import contextmanager

from errors import ConfigError

log = logging.getLogger("holdfast.cpu")

_started_with = None      # the CPUs allowed before confine(); None until it confines


def check(value):
    """HOLDFAST_CPU's value, `auto`, `all` or a CPU number; ConfigError else."""
    value = str(value).strip().lower()
    if value in ("auto", "all") or (value.isdigit() and len(value) <= 6):
        return value
    raise ConfigError(f"HOLDFAST_CPU must be auto, all or a CPU number, not {value!r}")


def confine(setting):
    """Every thread of this process on one CPU: the one this thread runs on
    (`auto`) or CPU `setting`. Returns (that CPU, the CPUs allowed before),
    or None when nothing changed (`all`, one CPU allowed, not Linux).
    ConfigError when `setting` names a CPU this process may not use."""
    global _started_with
    if setting == "all" or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = os.sched_getaffinity(0)
    if setting == "auto":
        cpu = _current_cpu()
        if cpu not in allowed:
            cpu = max(allowed)
    else:
        cpu = int(setting)
        if cpu not in allowed:
            raise ConfigError(f"HOLDFAST_CPU is {cpu}, but this process may run only on CPUs {_ranges(allowed)}")
    if len(allowed) < 2:
        return None
    # A thread's CPUs are its own (Linux): each one already running is
    # moved, and those started later inherit them from their starter.
    moved = []
    try:
        for tid in map(int, os.listdir("/proc/self/task")):
            try:
                os.sched_setaffinity(tid, {cpu})
                moved.append(tid)
            except ProcessLookupError:
                pass            # ended meanwhile
    except OSError as exc:
        # A sandbox that forbids it: every thread back where it was.
        for tid in moved:
            try:
                os.sched_setaffinity(tid, allowed)
            except OSError:
                pass
        if setting != "auto":
            raise ConfigError(f"HOLDFAST_CPU is {cpu}, but the system refused it: {exc.strerror or exc}") from None
        log.warning("threads left on CPUs %s: the system refused to confine them (%s)", _ranges(allowed),
                    exc.strerror or exc)
        return None
    _started_with = allowed
    return cpu, allowed


@contextmanager
def everywhere():
    """Within the block, the calling thread may run on every CPU the
    process started with; so may the threads it starts there."""
    if _started_with is None:
        yield
        return
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, _started_with)
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)


def describe(confined):
    """The start-up line for what confine() answered when it confined."""
    cpu, allowed = confined
    return (f"threads confined to CPU {cpu} of {_ranges(allowed)}: they share one GIL, and handing it "
            "between cores cost more than it gained (HOLDFAST_CPU=all spreads them)")


def _current_cpu():
    """The CPU this thread last ran on (field 39 of /proc/thread-self/stat)."""
    try:
        with open("/proc/thread-self/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[36])
    except (OSError, IndexError, ValueError):
        return -1


def _ranges(cpus):
    """{0, 1, 2, 5} as '0-2,5'."""
    cpus, parts, start = sorted(cpus), [], None
    for i, cpu in enumerate(cpus):
        if start is None:
            start = cpu
        if i + 1 == len(cpus) or cpus[i + 1] != cpu + 1:
            parts.append(str(start) if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(parts)
