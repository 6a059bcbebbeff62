"""End to end: tasks per second from submit to `succeeded`, through the real
Worker, against a local provider whose function returns at once.

    .venv/bin/python bench/e2e_bench.py [--tasks 400] [--paced-s 6]

Each task is a real one: submitted through the store as the API does (then
worker.wake(), as the API does), claimed, started with a slot, run, its
result file written (fsynced) and the task finished with its events. Phases:

  serial      Worker.run_once() in a loop in this thread: the store's and the
              worker's own work per task, no scheduler (the baseline)
  burst       the started worker (APScheduler + pool, as serve() runs it),
              every task submitted at once, each submit waking the worker
  no wakes    the started worker, a backlog it is not told about (tasks
              written by another process, or found at start): only its
              dispatch tick finds them
  paced       the started worker, tasks submitted at a steady 10% and 25% of
              the serial rate (each submit waking it), for latency

Latency is finished_at - created_at as the store records them. Also counted:
write transactions whose BEGIN IMMEDIATE waited over 1 ms for the lock
(SQLite's busy handler sleeps while another thread's transaction ends).

Bounded: each phase stops after 60 s whatever it finished; about 30-50 s in all.
"""

import argparse
import os
import sqlite3
import time

from _common import BeginTimer, fmt_ms, fmt_rate, percentile, table, temp_dir

from config import Config
from providers import build_providers
from store import FileStore, SqliteStore
from worker import Worker

PHASE_CAP_S = 60.0


class Bench:
    def __init__(self, tmp):
        self.store = SqliteStore(os.path.join(tmp, "holdfast.db"))
        self.user = self.store.create_user("bench", max_active=100_000, rate_per_s=10_000)[0]
        self.files = FileStore(os.path.join(tmp, "files"))
        self.providers = build_providers({"instant": {"type": "local", "function": "_funcs:instant"}})
        self.provider = self.providers["instant"]
        self.config = Config()
        self.reader = sqlite3.connect(os.path.join(tmp, "holdfast.db"), isolation_level=None)
        self.begins = BeginTimer(self.store)
        self.phase = 0

    def worker(self):
        return Worker(self.store, self.providers, self.files, threads=self.config.worker_threads)

    def submit(self, worker=None):
        now = time.time()
        task, _ = self.store.submit(self.user["id"], "instant", {"prompt": "a red fox"}, now=now,
                                    deadline_at=now + self.provider.max_wait_s,
                                    max_active=self.user["max_active"])
        if worker is not None:
            worker.wake()
        return task["id"]

    def wait(self, ids, started):
        """Until every task in `ids` is terminal, or the phase's time is up."""
        marks = ",".join("?" * len(ids))
        while time.perf_counter() - started < PHASE_CAP_S:
            left = self.reader.execute(f"SELECT COUNT(*) FROM tasks WHERE id IN ({marks}) "
                                       "AND status IN ('queued', 'running')", ids).fetchone()[0]
            if not left:
                return
            time.sleep(0.02)

    def result(self, ids):
        marks = ",".join("?" * len(ids))
        rows = self.reader.execute(f"SELECT status, created_at, finished_at FROM tasks WHERE id IN ({marks})",
                                   ids).fetchall()
        done = [r for r in rows if r[2] is not None]
        bad = sum(1 for r in rows if r[0] != "succeeded")
        if not done:
            return {"n": len(ids), "done": 0, "bad": bad, "rate": 0.0, "lat": [float("nan")]}
        span = max(r[2] for r in done) - min(r[1] for r in rows)
        return {"n": len(ids), "done": len(done), "bad": bad, "rate": len(done) / span,
                "lat": [r[2] - r[1] for r in done]}

    def serial(self, n):
        worker = self.worker()
        self.begins.take()
        ids = [self.submit() for _ in range(n)]
        started = time.perf_counter()
        while worker.run_once() and time.perf_counter() - started < PHASE_CAP_S:
            pass
        return self.result(ids), self.begins.take()

    def started(self, n, wake=True):
        worker = self.worker()
        worker.start()
        try:
            self.begins.take()
            started = time.perf_counter()
            ids = [self.submit(worker if wake else None) for _ in range(n)]
            self.wait(ids, started)
            return self.result(ids), self.begins.take()
        finally:
            worker.stop()

    def paced(self, rate, seconds):
        worker = self.worker()
        worker.start()
        try:
            self.begins.take()
            ids = []
            started = time.perf_counter()
            gap = 1.0 / rate
            while time.perf_counter() - started < seconds:
                ids.append(self.submit(worker))
                next_at = started + len(ids) * gap
                delay = next_at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            self.wait(ids, started)
            return self.result(ids), self.begins.take()
        finally:
            worker.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=400, help="tasks in the serial and burst phases")
    parser.add_argument("--paced-s", type=float, default=6.0)
    args = parser.parse_args()
    if not 50 <= args.tasks <= 5000 or not 1 <= args.paced_s <= 30:
        parser.error("--tasks 50..5000, --paced-s 1..30")
    t_start = time.perf_counter()
    with temp_dir("e2e") as tmp:
        bench = Bench(tmp)
        bench.serial(50)                      # warm up
        phases = {}
        phases["serial: run_once loop, one thread (baseline)"] = bench.serial(args.tasks)
        phases["burst: started worker, submits wake it"] = bench.started(args.tasks)
        phases["no wakes: started worker, tick only"] = bench.started(min(args.tasks, 100), wake=False)
        serial_rate = phases["serial: run_once loop, one thread (baseline)"][0]["rate"]
        for share in (0.1, 0.25):
            paced_rate = max(5.0, serial_rate * share)
            phases[f"paced: {paced_rate:.0f}/s submitted ({share:.0%} of serial)"] = bench.paced(
                paced_rate, args.paced_s)
        bench.reader.close()
        bench.store.close()
    base = phases["serial: run_once loop, one thread (baseline)"][0]["rate"]
    rows = []
    for name, (r, begins) in phases.items():
        slow = sum(1 for b in begins if b > 0.001)
        rows.append([name, f"{r['done']}/{r['n']}" + (f" ({r['bad']} not succeeded)" if r["bad"] else ""),
                     fmt_rate(r["rate"]), f"{r['rate'] / base:.2f}x", fmt_ms(percentile(r["lat"], 50)),
                     fmt_ms(percentile(r["lat"], 99)),
                     f"{slow}/{len(begins)}" + (f" p99 {percentile(begins, 99) * 1000:.1f} ms" if begins else "")])
    table(["phase", "tasks", "tasks/s", "vs serial", "p50 ms", "p99 ms", "BEGIN waits > 1 ms"], rows,
          f"End to end, submit to succeeded, local instant provider, worker threads={Config().worker_threads}, "
          "tick 0.5 s; latency = finished_at - created_at")
    print(f"e2e_bench: {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
