"""The reads behind the page's detail view on SQLite: one task's timeline
(GET /api/tasks/<id>/events) among a user's many events, and the retries of
a task (GET /api/tasks?retry_of=) among a user's many tasks, with the
indexes of migration 14 and with them dropped.

    .venv/bin/python bench/task_detail_bench.py [--tasks 20000]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from store import SqliteStore  # noqa: E402


def median_ms(fn, rounds=20):
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=20000, help="tasks of the one user, 10 events each")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        store = SqliteStore(os.path.join(d, "holdfast.db"))
        user = store.create_user("bench")[0]
        now = 1000.0
        first, _ = store.submit(user["id"], "demo", {"prompt": "x"}, now=now, deadline_at=now + 1e6)
        store.cancel(first["id"], user["id"], now=now)
        store.submit(user["id"], "demo", {"prompt": "x"}, now=now, deadline_at=now + 1e6, retry_of=first["id"])
        for i in range(args.tasks):
            task, _ = store.submit(user["id"], "demo", {"prompt": "x"}, now=now + i, deadline_at=now + 1e6)
            store.update(task["id"], token=None, now=now + i, status="running")
            for k in range(7):
                store.update(task["id"], token=None, now=now + i, progress=k / 10)
            store.update(task["id"], token=None, now=now + i, status="succeeded")
        print(f"{args.tasks + 2} tasks, {store.last_seq()} events of one user; medians of 20 reads")

        def reads():
            return (median_ms(lambda: store.task_timeline(user["id"], first["id"])),
                    median_ms(lambda: store.list_tasks(user["id"], retry_of=first["id"])))

        with_index = reads()
        with store._seam():
            store._exec("DROP INDEX events_task")
            store._exec("DROP INDEX tasks_retry_of")
        without = reads()
        print(f"{'read':<28}{'indexed ms':>12}{'without ms':>12}")
        for name, a, b in zip(("timeline of the oldest task", "retries of a task"), with_index, without):
            print(f"{name:<28}{a:>12.2f}{b:>12.2f}")
        store.close()


if __name__ == "__main__":
    main()
