"""A job's store writes, as the worker makes them, against plain sqlite3
writing the same rows, measured in the same run.

    .venv/bin/python bench/job_store_bench.py [--jobs 2000] [--rounds 3] [--threads 1,4]

One job is what peer_bench's workload A asks of the store: a submit; a
claim, take_slot and the update that records the provider's job; a claim
and the update that finishes it with its file. The workers pass each
update the task as their lease last saw it (`seen`), as worker/steps.py
does. Four threads share one SqliteStore (its group commit), as four
worker threads do; and one thread alone, to show what sharing costs.

The baseline writes the same rows with the store's schema in its own file
(its triggers and indexes included): each write its own BEGIN IMMEDIATE
and COMMIT on a connection per thread, an event row with each change, no
reads. Printed: CPU per job (the process's, all threads), jobs/s,
context switches per job (voluntary and not: with more than one thread
most are a lock or the GIL changing hands), and statements per job on
the store's write connection (a trigger's statements not counted).

Bounded: about 20-40 s; everything lives in one temporary directory.
"""

import argparse
import inspect
import json
import os
import resource
import sqlite3
import statistics
import threading
import time

from _common import table, temp_dir

from store import TASK_COLUMNS, SqliteStore, lease_dir

PRAGMAS = ("PRAGMA journal_mode=wal", "PRAGMA synchronous=NORMAL", "PRAGMA busy_timeout=5000",
           "PRAGMA cache_size=-8000")
# Older stores (before `seen`) read the row at every update: measured as they are.
SEEN = "seen" in inspect.signature(SqliteStore.update).parameters
FILE = {"name": "out_0.png", "size": 741, "sha256": "0" * 64, "content_type": "image/png"}


def holdfast_jobs(path, n, counted, threads):
    store = SqliteStore(path)
    users = [store.create_user(f"u{i}")[0]["id"] for i in range(n // 100 + 1)]
    statements = []
    if counted:
        store.write_connection().set_trace_callback(statements.append)
    now = time.time()

    def jobs(k):
        for i in range(k, n, threads):
            store.submit(users[i % len(users)], "demo", {"prompt": f"job {i}"}, now=now, deadline_at=now + 3600)
            task = store.claim("bench", now=now + 1, limit=1, lease_s=60)[0]
            held = store.take_slot(task["id"], token=task["lease_token"], now=now + 1, limit=None, **_seen(task),
                                   external_id=f"job-{i}", attempts=1, step="submitting",
                                   state={"posted_at": now + 1})
            store.update(held["id"], token=held["lease_token"], now=now + 1, release=True, **_seen(held),
                         status="running", step="submitted", progress=0.0, polls=0, next_poll_at=now + 1.5,
                         state={})
            task = store.claim_task(held["id"], "bench", now=now + 2, lease_s=60)
            store.update(task["id"], token=task["lease_token"], now=now + 2, **_seen(task), status="succeeded",
                         step="done", progress=1.0, files=[dict(FILE, dir=lease_dir(task["lease_token"]))])
    try:
        return _timed(jobs, n, threads), _distinct(statements) / n if counted else None
    finally:
        store.close()


def _seen(task):
    return {"seen": task} if SEEN else {}


def raw_jobs(path, n, threads):
    SqliteStore(path).close()           # the store's schema, triggers and indexes
    conns = []
    with sqlite3.connect(path) as setup:
        setup.execute("INSERT INTO users (name, token_hash, is_admin, max_active, rate_per_s, created_at) "
                      "VALUES ('u', 'h', 0, 100000, 1000, 0)")
    now = time.time()

    def write(conn, *statements):
        conn.execute("BEGIN IMMEDIATE")
        for sql, args in statements:
            conn.execute(sql, args)
        conn.execute("COMMIT")

    def event(task_id, data):
        return ("INSERT INTO events (user_id, task_id, type, data, created_at) VALUES (1, ?, 'updated', ?, ?)",
                (task_id, json.dumps(data), now))

    def jobs(k):
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conns.append(conn)
        for pragma in PRAGMAS:
            conn.execute(pragma)
        for i in range(k, n, threads):
            task_id = f"t_{k}_{i:08d}"
            row = {c: None for c in TASK_COLUMNS}
            row.update(id=task_id, user_id=1, provider="demo", status="queued", params=json.dumps({"prompt": i}),
                       attempts=0, files="[]", cost=0, credits="none", created_at=now, updated_at=now,
                       deadline_at=now + 3600, version=1, next_poll_at=now, polls=0, lease_token=0, priority=0)
            write(conn, (f"INSERT INTO tasks ({', '.join(TASK_COLUMNS)}) VALUES ({', '.join('?' * len(row))})",
                         [row[c] for c in TASK_COLUMNS]), event(task_id, row))
            lease = "UPDATE tasks SET lease_owner = 'bench', lease_expires_at = ?, lease_token = ? WHERE id = ?"
            write(conn, (lease, (now + 60, 1, task_id)))
            write(conn, ("UPDATE tasks SET external_id = ?, attempts = 1, step = 'submitting', state = ?, "
                         "version = 2 WHERE id = ?", (f"job-{i}", '{"posted_at":1}', task_id)),
                  event(task_id, {"step": "submitting"}))
            write(conn, ("UPDATE tasks SET status = 'running', step = 'submitted', progress = 0, started_at = ?, "
                         "lease_owner = NULL, lease_expires_at = NULL, next_poll_at = ?, state = '{}', version = 3 "
                         "WHERE id = ?", (now, now + 1.5, task_id)), event(task_id, {"status": "running"}))
            write(conn, (lease, (now + 60, 2, task_id)))
            write(conn, ("UPDATE tasks SET status = 'succeeded', step = 'done', progress = 1, files = ?, "
                         "finished_at = ?, next_poll_at = NULL, lease_owner = NULL, lease_expires_at = NULL, "
                         "version = 4 WHERE id = ?", (json.dumps([FILE]), now, task_id)),
                  event(task_id, {"status": "succeeded"}))
    try:
        return _timed(jobs, n, threads)
    finally:
        for conn in conns:
            conn.close()


def _timed(jobs, n, count):
    """(CPU ms per job, jobs/s, context switches per job) of jobs(k) run
    in `count` threads."""
    errors = []

    def run(k):
        try:
            jobs(k)
        except Exception as exc:
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(count)]
    switches, cpu, wall = _switches(), time.process_time(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if errors or any(t.is_alive() for t in threads):
        raise SystemExit(f"job_store_bench: a writer failed: {errors[:1] or 'still running after 300 s'}")
    return (1000 * (time.process_time() - cpu) / n, n / (time.perf_counter() - wall),
            (_switches() - switches) / n)


def _switches():
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_nvcsw + use.ru_nivcsw


def _distinct(statements):
    """Statements run, not counting the repeats a trigger's own statements
    show as (SQLite reports each under the statement that fired it)."""
    return sum(1 for i, s in enumerate(statements) if i == 0 or s != statements[i - 1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="1,4", help="thread counts, comma-separated (default 1,4)")
    args = parser.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    if not counts or min(counts) < 1:
        parser.error("--threads takes counts of 1 or more, such as 1,4")
    started = time.monotonic()
    rows = []
    with temp_dir("job-store") as tmp:
        for threads in counts:
            mine, raw = [], []
            for r in range(args.rounds):
                raw.append(raw_jobs(os.path.join(tmp, f"raw{threads}-{r}.db"), args.jobs, threads))
                mine.append(holdfast_jobs(os.path.join(tmp, f"store{threads}-{r}.db"), args.jobs, False,
                                          threads)[0])
            # Counted apart: the trace callback costs CPU of its own.
            per_job = holdfast_jobs(os.path.join(tmp, f"counted{threads}.db"), 400, True, threads)[1]
            cpu_ratio = statistics.median(m[0] / b[0] for m, b in zip(mine, raw))
            rate_ratio = statistics.median(m[1] / b[1] for m, b in zip(mine, raw))
            rows += [["plain sqlite3, same rows (baseline)", threads, *_medians(raw), "", "1.00x"],
                     ["holdfast's store, as the worker calls it", threads, *_medians(mine), f"{per_job:.1f}",
                      f"CPU {cpu_ratio:.2f}x, rate {rate_ratio:.2f}x"]]
    print(f"A job's store writes, {args.jobs} jobs, {args.rounds} interleaved rounds "
          "(medians; ratios are the median of per-round ratios)")
    table(["writer", "threads", "CPU ms/job", "jobs/s", "switches/job", "statements/job", "vs raw"], rows)
    print(f"\njob_store_bench: {time.monotonic() - started:.0f} s")


def _medians(runs):
    return [f"{statistics.median(r[0] for r in runs):.2f}", f"{statistics.median(r[1] for r in runs):,.0f}",
            f"{statistics.median(r[2] for r in runs):.1f}"]


if __name__ == "__main__":
    main()
