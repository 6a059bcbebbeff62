"""holdfast against Celery and huey at its own job: tracking jobs at a
provider, with one fake KIE-style provider for all three.

    .venv/bin/python bench/peer_bench.py [--quick] [--only holdfast,huey] [--workloads A,B] [--redis-db 7]

Trackers, 4 workers each:
  holdfast  a real `python app.py` (4 worker threads) on a temporary data
            directory; tasks submitted over HTTP by 4 keep-alive clients
  Celery    5.x prefork, 4 processes, Redis broker on 127.0.0.1:6379 in db
            --redis-db (flushed before and after, that db only), acks_late,
            polling by self.retry(countdown=P); enqueued from this process
  huey      SqliteHuey, 4 thread workers, polling by RetryTask(delay=P);
            enqueued from this process
  floor     (workload A only; not run unless named in --only) bench/_floor.py:
            the least a tracker that keeps holdfast's promises must do per
            job, lean, in one process, submitted like holdfast; a yardstick
            for what holdfast's own layers cost. floor+log, floor+client and
            floor+log+client add holdfast's logging and provider client
The task of all three: create the job (createTask), poll it (recordInfo)
every P seconds until it succeeds, download its one result, keep it on disk.
bench/_peers.py holds the peers' tasks; bench/_kie_counter.py is the
provider, in its own process, counting what it is sent.

Workloads (sizes of the issue; --quick shrinks them to about 3 minutes):
  A  N instant jobs, P = 0.5 s: jobs/s from the first submit to the last
     result downloaded; time to submit them all; the tracker's CPU per
     job (its processes, children included; holdfast's takes the submits
     over HTTP too, the peers' are enqueued by this process), steadier on
     a shared machine than jobs/s
  B  N jobs of J s, P s apart: in a window while all are running, polls/s
     done (N/P asked), the tracker's CPU (its processes, children included)
     per poll, and poll lag (a poll's time minus its job's previous poll
     plus P) p99
  C  N jobs of a few seconds; the tracker is killed with SIGKILL (every one
     of its processes) once a third are done, and started again: jobs never
     finished within the time limit, and jobs created twice at the provider

The trackers keep their files on disk. Run less than a minute after a
bench deleted thousands of files there, it first waits for that minute
to end (bench/_common.py, settle_disk): until then, on this machine's
disk, every new file costs more, and most of all for the tracker that
goes first.

Bounded: each run has a deadline (and the wait above at most a minute);
every process started here is stopped by its PID at the end (SIGKILL for
a tracker's whole tree), also on Ctrl-C.
"""

import argparse
import functools
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

from _common import (BENCH, PYTHON, ROOT, KieCounter, Server, free_port, percentile, settle_disk, table,
                     temp_dir)

KEY = "peer-bench-key"
TICK = os.sysconf("SC_CLK_TCK")


# -- processes ---------------------------------------------------------------------

def descendants(pid):
    """pid's child processes, their children, ... (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                parents.setdefault(int(fields[1]), []).append(int(entry))
            except OSError:
                continue
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def tree_cpu(pid):
    """CPU seconds (user + system) of pid and its living descendants."""
    total = 0
    for p in [pid] + descendants(pid):
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            continue
    return total / TICK


def kill_tree(proc):
    """SIGKILL proc and every process under it, by PID."""
    if proc is None or proc.poll() is not None:
        return
    for pid in [proc.pid] + descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10)


# -- the trackers ----------------------------------------------------------------------

class Holdfast:
    name = "holdfast"

    def __init__(self, tmp, provider, poll_s, jobs, redis_db):
        from http_bench import make_users, server_env
        self.dir = os.path.join(tmp, "holdfast")
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "holdfast.toml"), "w") as fh:
            fh.write(f"""
[server]
worker_threads = 4

[providers.kie]
type = "kie"
url = "{provider.url}"
api_key_env = "PEER_KIE_KEY"
poll_interval_s = {poll_s}
max_poll_interval_s = {poll_s}
max_wait_s = 3600
allow_private_results = true
""")
        # A user per 100 tasks, as http_bench: every submit counts its user's active tasks.
        self.tokens = make_users(self.dir, 1 + jobs // 100)
        self.port = free_port()
        self.env = {**server_env(self.dir, self.port), "PEER_KIE_KEY": KEY}
        self.server = None

    @property
    def pid(self):
        return self.server.proc.pid

    def start(self):
        self.server = Server([PYTHON, os.path.join(ROOT, "app.py")], port=self.port, cwd=self.dir,
                             env=self.env, log_path=os.path.join(self.dir, "server.log")).start(60)

    def submit(self, prompts, clients=4):
        errors = []

        def client(c):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            try:
                for i in range(c, len(prompts), clients):
                    body = json.dumps({"provider": "kie", "params": {"model": "bench",
                                                                     "input": {"prompt": prompts[i]}}})
                    token = self.tokens[i % len(self.tokens)]
                    conn.request("POST", "/api/tasks", body=body, headers={
                        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
                    res = conn.getresponse()
                    data = res.read()
                    if res.status != 201:
                        errors.append(f"{res.status} {data[:200]!r}")
                        return
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                conn.close()

        threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        if errors:
            raise SystemExit(f"holdfast submits failed: {errors[:3]}")

    def kill9(self):
        kill_tree(self.server.proc)
        self.server.proc = None

    def stop(self):
        if self.server is not None:
            self.server.stop()


class Floor(Holdfast):
    """bench/_floor.py: the least a tracker with holdfast's promises does
    per job, in one process; workload A only. Submitted like holdfast.
    `floor+log`, `floor+client`, `floor+log+client`: with those of
    holdfast's pieces (_floor.py's --with)."""
    name = "floor"

    def __init__(self, tmp, provider, poll_s, jobs, redis_db, pieces=()):
        self.dir = os.path.join(tmp, "floor")
        os.makedirs(self.dir)
        self.tokens = [f"floor_bench_user_token_{i:06d}" for i in range(1 + jobs // 100)]
        tokens = os.path.join(self.dir, "tokens")
        with open(tokens, "w") as fh:
            fh.write("\n".join(self.tokens))
        self.port = free_port()
        self.argv = [PYTHON, os.path.join(BENCH, "_floor.py"), "--port", str(self.port), "--data", self.dir,
                     "--kie", provider.url, "--key", KEY, "--poll-s", str(poll_s), "--tokens", tokens,
                     "--with", ",".join(pieces)]
        self.server = None

    def start(self):
        self.server = Server(self.argv, port=self.port, cwd=self.dir,
                             log_path=os.path.join(self.dir, "floor.log")).start(60)


class _Consumer:
    """A peer's consumer in a subprocess, configured by the environment."""

    def __init__(self, tmp, provider, poll_s, jobs, redis_db):
        self.dir = os.path.join(tmp, self.name)
        os.makedirs(self.dir)
        self.redis_db = redis_db
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": BENCH, "PEER_KIND": self.name,
                    "PEER_KIE_URL": provider.url, "PEER_KIE_KEY": KEY, "PEER_POLL_S": str(poll_s),
                    "PEER_OUT": self.dir, "PEER_HUEY_DB": os.path.join(self.dir, "huey.db"),
                    "PEER_REDIS_URL": f"redis://127.0.0.1:6379/{redis_db}"}
        # This process enqueues through the same module, configured alike.
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("PEER_")})
        import importlib

        import _peers
        self.peers = importlib.reload(_peers)
        self.proc = None
        self.log = None

    @property
    def pid(self):
        return self.proc.pid

    def start(self):
        self.log = open(os.path.join(self.dir, "consumer.log"), "ab")
        self.proc = subprocess.Popen(self.argv, cwd=BENCH, env=self.env, stdout=self.log, stderr=self.log)
        self.wait_ready()

    def kill9(self):
        kill_tree(self.proc)

    def stop(self):
        kill_tree(self.proc)
        if self.log:
            self.log.close()


class Celery(_Consumer):
    name = "celery"

    def __init__(self, *args):
        super().__init__(*args)
        self.app, self.job = self.peers._celery()
        self._flush()
        self.argv = [PYTHON, "-m", "celery", "-A", "_peers:celery_app", "worker", "-P", "prefork", "-c", "4",
                     "--without-gossip", "--without-mingle", "-n", f"peer{os.getpid()}@127.0.0.1"]

    def _flush(self):
        import redis
        redis.Redis(host="127.0.0.1", port=6379, db=self.redis_db).flushdb()

    def wait_ready(self):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"celery worker exited; see {self.dir}/consumer.log")
            if self.app.control.ping(timeout=0.5):
                return
        raise SystemExit("celery worker not ready after 60 s")

    def submit(self, prompts):
        for p in prompts:
            self.job.delay(p)

    def stop(self):
        super().stop()
        self._flush()


class Huey(_Consumer):
    name = "huey"

    def __init__(self, *args):
        super().__init__(*args)
        self.huey, self.job = self.peers._huey()
        self.argv = [PYTHON, "-m", "huey.bin.huey_consumer", "_peers.huey", "-w", "4", "-k", "thread"]

    def wait_ready(self):
        deadline = time.monotonic() + 60
        path = os.path.join(self.dir, "consumer.log")
        while time.monotonic() < deadline:
            with open(path, "rb") as fh:
                if b"started with" in fh.read():
                    return
            if self.proc.poll() is not None:
                raise SystemExit(f"huey consumer exited; see {path}")
            time.sleep(0.1)
        raise SystemExit("huey consumer not ready after 60 s")

    def submit(self, prompts):
        for p in prompts:
            self.job(p)


TRACKERS = {"holdfast": Holdfast, "celery": Celery, "huey": Huey, "floor": Floor}
for _pieces in (("log",), ("client",), ("log", "client")):
    TRACKERS["+".join(("floor", *_pieces))] = functools.partial(Floor, pieces=_pieces)


# -- the workloads -----------------------------------------------------------------------

def wait_done(provider, n, deadline):
    while time.time() < deadline:
        counts = provider.counts()
        if counts["prompts_done"] >= n:
            return counts
        time.sleep(0.25)
    return provider.counts()


def workload_a(kind, tmp, args):
    n, poll_s = args.a_jobs, args.a_poll
    provider = KieCounter(tmp, KEY, 0.0)
    with provider.server:
        tracker = TRACKERS[kind](tmp, provider, poll_s, n, args.redis_db)
        try:
            tracker.start()
            prompts = [f"a-{kind}-{i}" for i in range(n)]
            cpu0 = tree_cpu(tracker.pid)
            t0 = time.time()
            tracker.submit(prompts)
            submit_s = time.time() - t0
            counts = wait_done(provider, n, t0 + args.limit_s)
            cpu = tree_cpu(tracker.pid) - cpu0
        finally:
            tracker.stop()
    done = counts["done_times"]
    finished = len(done) >= n
    rate = len(done) / (done[-1] - t0) if done else 0.0
    return {"A jobs/s": (rate, finished), "A submit s": (submit_s, True),
            "A CPU ms/job": (1000 * cpu / len(done) if done else float("nan"), finished)}


def workload_b(kind, tmp, args):
    n, poll_s, job_s = args.b_jobs, args.b_poll, args.b_job_s
    provider = KieCounter(tmp, KEY, job_s)
    with provider.server:
        tracker = TRACKERS[kind](tmp, provider, poll_s, n, args.redis_db)
        try:
            tracker.start()
            prompts = [f"b-{kind}-{i}" for i in range(n)]
            t0 = time.time()
            tracker.submit(prompts)
            since = max(time.time() + poll_s, t0 + job_s * 0.25)
            # A tracker slow to take the submits still gets a window of two
            # polls per job (some jobs may end in it: marked unfinished).
            until = max(t0 + job_s * 0.9, since + 2 * poll_s)
            late = until > t0 + job_s * 0.9
            time.sleep(max(0.0, since - time.time()))
            cpu0 = tree_cpu(tracker.pid)
            time.sleep(max(0.0, until - time.time()))
            cpu = tree_cpu(tracker.pid) - cpu0
            counts = provider.counts(since, until, poll_s)
        finally:
            tracker.stop()
    polls = counts["polls_in_window"]
    lags = counts["lags"]
    return {"B polls/s": (polls / (until - since), not late),
            "B CPU ms/poll": (1000 * cpu / polls if polls else float("nan"), not late),
            "B lag p99 s": (percentile(lags, 99) if lags else float("nan"), not late),
            "B lag p50 s": (percentile(lags, 50) if lags else float("nan"), not late)}


def workload_c(kind, tmp, args):
    n, poll_s = args.c_jobs, args.c_poll
    provider = KieCounter(tmp, KEY, args.c_job_s)
    with provider.server:
        tracker = TRACKERS[kind](tmp, provider, poll_s, n, args.redis_db)
        try:
            tracker.start()
            prompts = [f"c-{kind}-{i}" for i in range(n)]
            t0 = time.time()
            tracker.submit(prompts)
            wait_done(provider, n // 3, t0 + args.limit_s)
            tracker.kill9()
            tracker.start()
            counts = wait_done(provider, n, time.time() + args.c_after_s)
        finally:
            tracker.stop()
    return {"C never finished": (n - counts["prompts_done"], True),
            "C made twice": (counts["made_twice"], True)}


WORKLOADS = {"A": workload_a, "B": workload_b, "C": workload_c}
ROWS = [("A jobs/s", "{:,.0f}", True), ("A submit s", "{:.1f}", False), ("A CPU ms/job", "{:.2f}", False),
        ("B polls/s", "{:,.0f}", True),
        ("B CPU ms/poll", "{:.2f}", False), ("B lag p99 s", "{:.2f}", False), ("B lag p50 s", "{:.2f}", False),
        ("C never finished", "{:d}", False), ("C made twice", "{:d}", False)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: about 3 minutes in all")
    parser.add_argument("--only", default="holdfast,celery,huey")
    parser.add_argument("--workloads", default="A,B,C")
    parser.add_argument("--redis-db", type=int, default=7, help="Celery's broker db, flushed before and after")
    parser.add_argument("--a-jobs", type=int)
    parser.add_argument("--a-poll", type=float, default=0.5)
    parser.add_argument("--b-jobs", type=int)
    parser.add_argument("--b-job-s", type=float)
    parser.add_argument("--b-poll", type=float)
    parser.add_argument("--c-jobs", type=int)
    parser.add_argument("--c-job-s", type=float, default=3.0)
    parser.add_argument("--c-poll", type=float, default=0.5)
    parser.add_argument("--c-after-s", type=float, help="after the restart, how long jobs may take to finish")
    parser.add_argument("--limit-s", type=float, default=120.0, help="a run's deadline")
    args = parser.parse_args()
    quick = args.quick
    for key, full, small in (("a_jobs", 2000, 400), ("b_jobs", 3000, 1000), ("b_job_s", 60.0, 20.0),
                             ("b_poll", 5.0, 2.0), ("c_jobs", 500, 150), ("c_after_s", 60.0, 30.0)):
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    kinds = [k for k in args.only.split(",") if k]
    loads = [w for w in args.workloads.split(",") if w]
    if set(kinds) - set(TRACKERS) or set(loads) - set(WORKLOADS):
        parser.error(f"--only takes {','.join(TRACKERS)}; --workloads takes A,B,C")
    settle_disk()
    started = time.perf_counter()
    results = {k: {} for k in kinds}
    with temp_dir("peer") as tmp:
        # Workload by workload, the trackers in turn: drift in the machine's
        # load hits all three alike.
        for w in loads:
            for kind in kinds:
                if kind.startswith("floor") and w != "A":
                    continue        # a yardstick for A alone: it has no recovery to be killed for
                run_dir = os.path.join(tmp, f"{w}-{kind}")
                os.makedirs(run_dir)
                t = time.perf_counter()
                results[kind].update(WORKLOADS[w](kind, run_dir, args))
                print(f"  {w} {kind}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    rows = []
    for label, fmt, _ in ROWS:
        if not any(label in results[k] for k in kinds):
            continue
        row = [label]
        base = results.get("holdfast", {}).get(label, (None,))[0]
        for kind in kinds:
            value, complete = results[kind].get(label, (None, True))
            if value is None:
                row.append("-")
                continue
            cell = fmt.format(value) + ("" if complete else " (unfinished)")
            if kind != "holdfast" and base and value and isinstance(value, float) and value == value:
                cell += f" ({value / base:.2f}x)"
            row.append(cell)
        rows.append(row)
    sizes = (f"A: {args.a_jobs} instant jobs, poll {args.a_poll:g} s; B: {args.b_jobs} jobs of {args.b_job_s:g} s, "
             f"poll {args.b_poll:g} s ({args.b_jobs / args.b_poll:,.0f} polls/s asked); C: {args.c_jobs} jobs of "
             f"{args.c_job_s:g} s, kill -9 at a third done")
    table(["", *kinds], rows, f"peer_bench{' --quick' if quick else ''}: {sizes}; ratios are peer / holdfast")
    print(f"peer_bench: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
