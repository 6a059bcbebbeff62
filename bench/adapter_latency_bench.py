"""From provider success to `succeeded`: what saving the result files adds,
per file, for a hosted-API adapter (Replicate's, against its fake on
127.0.0.1 over real HTTP).

    .venv/bin/python bench/adapter_latency_bench.py [--rounds 15]

Each round makes one task per case and lets its job finish at the fake.
Then one Worker.run_once() is timed: it asks the provider (one status GET),
downloads every output into the file store (sha256, fsync, rename) and ends
the task `succeeded`. The baseline, timed in the same round, is the same
run_once() for a task whose job is still running (one status GET and a
store write): the difference is what the results add. "download alone" is
requests.get of the same files with one session, the network's share.

Bounded: about rounds x 3 s.
"""

import argparse
import os
import statistics
import time

import requests
from _common import fmt_ms, table, temp_dir

from providers import build_providers
from store import FileStore, SqliteStore
from tests.fakes import png_bytes
from tests.fakes.replicate import FakeReplicate
from worker import Worker

CASES = [(1, 100), (4, 100), (16, 100), (1, 1_000_000), (4, 1_000_000)]   # (files, bytes each)


class SizedReplicate(FakeReplicate):
    """Outputs of `size` bytes each (a PNG with a padding text chunk)."""

    size = 100

    def png(self, job, n):
        base = png_bytes(16, 16, (n, 0, 0), {"file": f"{job.id}/{n}"})
        return png_bytes(16, 16, (n, 0, 0), {"file": f"{job.id}/{n}", "pad": "x" * max(0, self.size - len(base))})


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now


def one(fake, store, worker, clock, user, files_n, size, done):
    """Seconds of the run_once() that sees the job (done or not) and acts."""
    fake.outputs, fake.size = files_n, size
    fake.job_seconds = 0.05 if done else 600
    clock.now = time.time()
    task, _ = store.submit(user["id"], "r", {"version": "v", "input": {}}, now=clock.now,
                           deadline_at=clock.now + 3600)
    worker.run_once(clock.now)                       # the submit
    task = store.get_task(task["id"])
    assert task["status"] == "running", task
    time.sleep(0.1)                                  # the job ends at the fake
    clock.now = max(time.time(), task["next_poll_at"])
    t0 = time.perf_counter()
    worker.run_once(clock.now)
    elapsed = time.perf_counter() - t0
    task = store.get_task(task["id"])
    assert task["status"] == ("succeeded" if done else "running"), task
    if done:
        assert len(task["files"]) == files_n
    return elapsed, task


def download_alone(fake, task, session):
    t0 = time.perf_counter()
    for n in range(len(task["files"])):
        session.get(f"{fake.url}/files/{task['external_id']}/{n}.png", timeout=10).content
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    with temp_dir("hf-adapter-latency") as tmp, SizedReplicate() as fake:
        store = SqliteStore(os.path.join(tmp, "holdfast.db"))
        files = FileStore(os.path.join(tmp, "files"))
        providers = build_providers({"r": {"type": "replicate", "url": fake.url, "api_key_env": "K",
                                           "poll_interval_s": 0.05, "max_poll_interval_s": 0.05}},
                                    env={"K": "test-key"})
        clock = Clock()
        worker = Worker(store, providers, files, clock=clock, owner="bench:1:w")
        user, _ = store.create_user("bench", max_active=100_000, rate_per_s=10_000)
        session = requests.Session()
        poll, collect, alone = [], {c: [] for c in CASES}, {c: [] for c in CASES}
        for _ in range(args.rounds):
            poll.append(one(fake, store, worker, clock, user, 1, 100, done=False)[0])
            for files_n, size in CASES:
                elapsed, task = one(fake, store, worker, clock, user, files_n, size, done=True)
                collect[(files_n, size)].append(elapsed)
                alone[(files_n, size)].append(download_alone(fake, task, session))
        base = statistics.median(poll)
        rows = [["a poll, job still running (baseline)", "-", fmt_ms(base), "-", "-"]]
        for (files_n, size), times in collect.items():
            med = statistics.median(times)
            rows.append([f"{files_n} file(s) of {size:,} bytes", files_n, fmt_ms(med),
                         fmt_ms((med - base) / files_n), fmt_ms(statistics.median(alone[(files_n, size)]) / files_n)])
        table(["case", "files", "run_once ms (median)", "added ms per file", "download alone ms per file"], rows,
              title=f"Provider success -> succeeded, Replicate adapter against its fake ({args.rounds} rounds)")
        store.close()


if __name__ == "__main__":
    main()
