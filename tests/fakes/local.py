"""Functions for the `local` provider's tests, named in provider tables as
`<this module>:<function>`. They keep what must outlive one call in a file
named by params, so a retry in a new call (or a new process) sees it."""

import os
import time
from pathlib import Path

from errors import ProviderRejected

from . import png_bytes


def _count(params):
    """How many times this job's function has been called, this call included."""
    counter = Path(params["counter"])
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    return n


def flaky(params, report):
    """Raises on the first `fail_times` calls, then returns one PNG."""
    n = _count(params)
    report(step="drawing", progress=0.5)
    if n <= params.get("fail_times", 0):
        raise RuntimeError(f"flaky failure number {n}")
    report(step="saving", progress=0.9)
    return png_bytes(8, 8, (n * 40 % 256, 80, 120))


def files(params, report):
    """A path, a named pair whose name tries to leave the task's folder, and
    raw bytes."""
    return [params["path"], ("../../escape.txt", b"hello"), b"\x89PNG\r\n\x1a\nnot really"]


def refuse(params, report):
    """Fails for good: no retry."""
    raise ProviderRejected("this input can never work")


def wrong_type(params, report):
    return 42


def watch_cancel(params, report):
    """Reports until report() stops it (the task was cancelled)."""
    for i in range(100):
        report(step=f"step {i}", progress=i / 100)
    return b"never reached"


def gate(params, report):
    """Runs until the file params["gate"] exists (at most 5 s), then returns a PNG."""
    path, end = Path(params["gate"]), time.monotonic() + 5
    while not path.exists():
        if time.monotonic() > end:
            raise TimeoutError("the gate never opened")
        time.sleep(0.01)
    return png_bytes(4, 4, (1, 2, 3))


def held_first(params, report):
    """The first call marks params["started"], then waits for the file
    params["gate"] (at most 10 s); later calls return at once. Each call's
    PNG is its own (the call number is its colour), so a test can tell
    whose bytes a stored file holds."""
    n = _count(params)
    if n == 1:
        Path(params["started"]).touch()
        path, end = Path(params["gate"]), time.monotonic() + 10
        while not path.exists() and time.monotonic() < end:
            time.sleep(0.01)
    return png_bytes(4, 4, (n * 60 % 256, 10, 20))


def with_pipe(params, report):
    """Two results: a PNG, then the file params["pipe"] (a FIFO): saving the
    second blocks until a test writes into the pipe, so the first is on disk
    meanwhile and the task not yet finished."""
    return [png_bytes(4, 4, (9, 9, 9)), ("second.bin", params["pipe"])]


def slow(params, report):
    """Reports progress (unless params["quiet"]) until params["seconds"] pass
    (params["again_seconds"] from its second call on) or the file
    params["gate"] exists, counting its calls in params["counter"]; then
    returns a PNG."""
    n = _count(params)
    seconds = params["seconds"] if n == 1 else params.get("again_seconds", params["seconds"])
    gate = Path(params["gate"]) if params.get("gate") else None
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (gate and gate.exists()):
        if not params.get("quiet"):
            report(step="working", progress=1 - (end - time.monotonic()) / seconds)
        time.sleep(0.05)
    return png_bytes(4, 4, (n, 2, 3))


def logged(params, report):
    """Appends one line per run to params["log"] (name, PID, start time),
    then works for params["seconds"] (a run after the first: for
    params["rerun_seconds"], if given), reporting as it goes: the witness of
    how many times a task ran, and where."""
    line = f"{params['name']} {os.getpid()} {time.time():.3f}\n".encode()
    fd = os.open(params["log"], os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        earlier = os.pread(fd, 1 << 20, 0).decode().split()[::3].count(params["name"])
        os.write(fd, line)
    finally:
        os.close(fd)
    seconds = params.get("rerun_seconds", params.get("seconds", 1.0)) if earlier else params.get("seconds", 1.0)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        report(step="working", progress=1 - (end - time.monotonic()) / seconds)
        time.sleep(0.1)
    return png_bytes(4, 4, (10, 20, 30))


def affinity(params, report):
    """The CPUs this call may run on, and those of a thread it starts, as
    one JSON file (cpu.py: a local function keeps every core)."""
    import json
    import threading
    seen = {"function": sorted(os.sched_getaffinity(0))}
    child = threading.Thread(target=lambda: seen.__setitem__("thread", sorted(os.sched_getaffinity(0))))
    child.start()
    child.join()
    return [("affinity.json", json.dumps(seen).encode())]
