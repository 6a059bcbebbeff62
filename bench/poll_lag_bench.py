"""Poll lag with 10,000 tasks in flight: how late the started Worker polls a
task, against the same worker with 100 tasks in flight.

    .venv/bin/python bench/poll_lag_bench.py [--tasks 10000] [--seconds 20]

The tasks sit at a provider that always answers "running, generating" (no
network, so the lag is holdfast's own). They have run for an hour, so each
is polled every max_poll_interval_s (30 s by default), and their next polls
are spread evenly over one interval: 10,000 tasks ask for about 333 polls a
second. The worker runs as serve() runs it (APScheduler tick, thread pool,
real time) for --seconds.

lag = when the provider was asked - next_poll_at. A poll due in the window
but not done by its end counts with the lag it had reached then, so a worker
that falls behind cannot look good by not polling. The serial row is
Worker.run_once() in a loop in one thread on the same 10,000 tasks, all due:
what this process could do if nothing held it back.

Bounded: about 15 s of setup and 2 x --seconds of running.
"""

import argparse
import os
import sqlite3
import time

from _common import fmt_rate, percentile, table, temp_dir

from config import Config
from providers import BaseProvider, Status
from store import FileStore, SqliteStore
from worker import Worker


class Endless(BaseProvider):
    """A provider whose jobs never end; it notes how late each poll is."""

    type = "endless"
    client_ids = True

    def __init__(self, name="endless"):
        super().__init__(name, {})
        self.lags = []

    def new_id(self, task, now):
        return "endless-" + task["id"]

    def submit(self, task, now):
        return task["external_id"]

    def poll(self, task, now):
        self.lags.append(time.time() - task["next_poll_at"])
        return Status.running("generating", None)


def in_flight(tmp, name, count):
    """A store holding `count` tasks running at the provider for an hour."""
    path = os.path.join(tmp, f"{name}.db")
    store = SqliteStore(path)
    user, _ = store.create_user("bench", max_active=100_000, rate_per_s=10_000)
    now = time.time()
    for _ in range(count):
        store.submit(user["id"], "endless", {"prompt": "a red fox"}, now=now, deadline_at=now + 7200)
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("UPDATE tasks SET status = 'running', step = 'generating', progress = NULL, attempts = 1, "
                "external_id = 'endless-' || id, started_at = ?", (now - 3600,))
    return store, raw


def spread(raw, start, interval):
    """Next polls evenly over one interval from `start`; nobody polled yet."""
    ids = [r[0] for r in raw.execute("SELECT id FROM tasks ORDER BY random()")]
    step = interval / len(ids)
    raw.execute("BEGIN IMMEDIATE")
    raw.executemany("UPDATE tasks SET next_poll_at = ?, polls = 0, lease_owner = NULL, "
                    "lease_expires_at = NULL WHERE id = ?", [(start + i * step, tid) for i, tid in enumerate(ids)])
    raw.execute("COMMIT")


def started_run(store, raw, provider, files, seconds):
    interval = provider.max_poll_interval_s
    spread(raw, time.time() + 0.5, interval)
    provider.lags = []
    worker = Worker(store, {provider.name: provider}, files, threads=Config().worker_threads)
    worker.start()
    t0 = time.time()
    try:
        time.sleep(seconds)
    finally:
        worker.stop()
    end = time.time()
    done = list(provider.lags)
    waiting = [end - r[0] for r in raw.execute(
        "SELECT next_poll_at FROM tasks WHERE polls = 0 AND next_poll_at <= ?", (end,))]
    return {"done": len(done), "due": len(done) + len(waiting), "seconds": end - t0,
            "lags": done + waiting, "done_lags": done}


def serial_run(store, raw, provider, files, seconds):
    spread(raw, time.time() - 60, 1.0)     # every task due now
    provider.lags = []
    worker = Worker(store, {provider.name: provider}, files)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds and worker.run_once():
        pass
    return len(provider.lags) / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    if not 1000 <= args.tasks <= 100_000 or not 5 <= args.seconds <= 120:
        parser.error("--tasks 1000..100000, --seconds 5..120")
    t_start = time.perf_counter()
    with temp_dir("poll") as tmp:
        files = FileStore(os.path.join(tmp, "files"))
        provider = Endless()
        small_store, small_raw = in_flight(tmp, "small", 100)
        big_store, big_raw = in_flight(tmp, "big", args.tasks)
        runs = {"100 in flight (baseline)": started_run(small_store, small_raw, provider, files, args.seconds),
                f"{args.tasks:,} in flight": started_run(big_store, big_raw, provider, files, args.seconds)}
        capacity = serial_run(big_store, big_raw, provider, files, min(5.0, args.seconds))
        for store, raw in ((small_store, small_raw), (big_store, big_raw)):
            raw.close()
            store.close()
    interval = provider.max_poll_interval_s
    base = runs["100 in flight (baseline)"]
    rows = []
    for name, r in runs.items():
        tasks = 100 if name.startswith("100 ") else args.tasks
        rows.append([name, fmt_rate(tasks / interval), fmt_rate(r["done"] / r["seconds"]),
                     f"{r['done']:,}/{r['due']:,}", f"{percentile(r['lags'], 50):.2f}",
                     f"{percentile(r['lags'], 99):.2f}", f"{percentile(r['lags'], 99) / percentile(base['lags'], 99):.1f}x"])
    rows.append([f"serial run_once loop, {args.tasks:,} all due", "", fmt_rate(capacity), "", "", "", ""])
    table(["tasks running", "polls/s asked", "polls/s done", "done/due", "lag p50 s", "lag p99 s", "p99 vs 100"],
          rows, f"Poll lag, started Worker (threads={Config().worker_threads}, tick 0.5 s), {args.seconds:.0f} s "
          f"of real time, polls every {interval:.0f} s")
    big = runs[f"{args.tasks:,} in flight"]
    print(f"the worker did {big['done'] / big['seconds'] / capacity:.1%} of the polls this process "
          f"can do serially ({fmt_rate(capacity)}/s), and {big['done'] / big['seconds'] / (args.tasks / interval):.1%} "
          f"of those asked for")
    print(f"poll_lag_bench: {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
