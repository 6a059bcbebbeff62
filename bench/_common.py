"""What the bench scripts share: timing in interleaved rounds, percentiles, a
small table printer, temporary directories, and servers in subprocesses that
are stopped by their PID whatever happens.

This machine is noisy (2 cores, other work running), so a figure is a median
over rounds, and a ratio compares two things timed in the same round, one
right after the other: drift hits both sides alike.
"""

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
for _path in (ROOT, BENCH):
    if _path not in sys.path:
        sys.path.insert(0, _path)
PYTHON = sys.executable

# A long benchmark must not drown its table in per-task log lines.
logging.basicConfig(level=logging.ERROR)


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# SIGTERM (run_all's time limit, or anyone's kill) and SIGINT become an
# exception, so `finally` blocks stop the servers and remove the temporary
# files. SIGINT is set explicitly: a shell starts background jobs with it
# ignored, and Python then never installs its own handler.
if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)


def percentile(values, p):
    """The p-th percentile (nearest rank) of `values`."""
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, int(round(p / 100 * (len(values) - 1)))))]


def rounds(cases, n, count, after=None):
    """Run each case `count` times, interleaved (A B C A B C ...), `n`
    operations a time. `cases` is {name: fn(n)}; a case may return the number
    of operations it really did. `after(name)`, untimed, runs after each.
    Returns {name: [ops/s per round]}."""
    out = {name: [] for name in cases}
    for _ in range(count):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            done = fn(n)
            elapsed = time.perf_counter() - t0
            out[name].append((done if isinstance(done, int) else n) / elapsed)
            if after is not None:
                after(name)
    return out


def median_ratio(a, b):
    """Median of per-round ratios a[i] / b[i]: each pair ran back to back."""
    return statistics.median(x / y for x, y in zip(a, b))


class BeginTimer:
    """Times the store's BEGINs (an instance patch of its _exec, through
    which a write's BEGIN goes; this process only)."""

    def __init__(self, store):
        self.waits = []
        self._lock = threading.Lock()
        original = store._exec

        def execute(sql, params=()):
            if not sql.startswith("BEGIN"):
                return original(sql, params)
            t0 = time.perf_counter()
            try:
                return original(sql, params)
            finally:
                with self._lock:
                    self.waits.append(time.perf_counter() - t0)
        store._exec = execute

    def take(self):
        with self._lock:
            waits, self.waits = self.waits, []
        return waits


def fmt_rate(value):
    return f"{value:,.0f}"


def fmt_ms(seconds):
    return f"{seconds * 1000:.2f}"


def table(headers, rows, title=None):
    """Print a plain, aligned table: first column left, the others right."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    if title:
        print(title)
    line = "  ".join(str(h).ljust(w) if i == 0 else str(h).rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print()


# This machine's disk is ext4 without a journal. There, a new file or
# folder skips every free inode deleted in the last minute (in the last
# six while the inode table's block is not yet written back): for a
# while after a bench deletes thousands, each one made costs up to a
# millisecond of kernel time, and the next run's figures say more about
# the last run than about the code. A bench that deletes that many on
# disk writes them back at once and leaves the time here; settle_disk()
# waits out the minute.
SETTLE_S = 61
MANY_DELETED = 1000
_DELETED_AT = os.path.join(tempfile.gettempdir(), "holdfast-bench-deleted")


@contextlib.contextmanager
def temp_dir(prefix, base=None):
    """A temporary directory (in `base`, if given), removed afterwards even
    when a run fails."""
    path = tempfile.mkdtemp(prefix=f"holdfast-bench-{prefix}-", dir=base)
    try:
        yield path
    finally:
        many = base is None and sum(len(d) + len(f) for _, d, f in os.walk(path)) >= MANY_DELETED
        shutil.rmtree(path, ignore_errors=True)
        if many:
            os.sync()       # the deleted inodes are then skipped for a minute, not six
            with open(_DELETED_AT, "w"):
                pass


def settle_disk():
    """Wait until SETTLE_S have passed since a bench last deleted many
    files on disk (see above). Returns the seconds waited."""
    try:
        wait = SETTLE_S - (time.time() - os.path.getmtime(_DELETED_AT))
    except FileNotFoundError:
        return 0.0
    if wait <= 0:
        return 0.0
    print(f"waiting {wait:.0f} s for the disk: a bench deleted many files less than a minute ago, and new "
          "files cost more until that minute ends (see bench/_common.py)", file=sys.stderr, flush=True)
    time.sleep(wait)
    return wait


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A command in a subprocess that serves HTTP on 127.0.0.1:`port`, ready
    once it prints a line matching `ready`. Stopped by its PID only: SIGTERM,
    then SIGKILL after a few seconds."""

    def __init__(self, argv, *, port, env=None, cwd=None, ready=r"serving on", log_path=None):
        self.argv = argv
        self.port = port
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd or ROOT
        self.ready = re.compile(ready)
        self.log_path = log_path or os.devnull
        self.proc = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout=30):
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                     stderr=self._log)
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode(errors="replace")
            if not line:
                self.stop()
                raise RuntimeError(f"server exited before it was ready: {seen}; log: {self.log_path}")
            seen.append(line.rstrip())
            if self.ready.search(line):
                break
        else:
            self.stop()
            raise RuntimeError(f"server not ready after {timeout}s: {seen}")
        # Its later prints go nowhere, so a full pipe can never block it.
        self.proc.stdout.close()
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"port {self.port} never opened")

    def rss_mb(self):
        try:
            with open(f"/proc/{self.proc.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None

    def stop(self):
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if proc is not None and proc.stdout and not proc.stdout.closed:
            proc.stdout.close()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class KieCounter:
    """bench/_kie_counter.py in a subprocess: a fake KIE provider whose jobs
    are done `job_s` after their create, counting what it was sent.
    `.server` starts and stops it."""

    def __init__(self, tmp, key, job_s, name="kie"):
        self.port = free_port()
        self.server = Server([PYTHON, os.path.join(BENCH, "_kie_counter.py"), "--port", str(self.port),
                              "--key", key, "--job-s", str(job_s)], port=self.port,
                             log_path=os.path.join(tmp, f"{name}.log"))

    @property
    def url(self):
        return self.server.url

    def counts(self, since=0.0, until=1e12, poll_s=1.0):
        """What it was sent: creates, prompts created more than once, polls,
        downloads, and the lag of polls `poll_s` apart between `since` and
        `until` (see _kie_counter.py)."""
        with urllib.request.urlopen(f"{self.url}/_counts?since={since}&until={until}&poll_s={poll_s}",
                                    timeout=30) as resp:
            return json.loads(resp.read())
