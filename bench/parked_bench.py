"""What tasks waiting for a provider's slot cost the server while they wait,
against the same server with none waiting.

    .venv/bin/python bench/parked_bench.py [--waiting 8000] [--window 65]

One `python app.py` on a temporary data directory, its demo provider with
`concurrency = 1`, hour-long jobs and 2 s polls (the default): the first
task posted takes the slot for the run, every later one is refused it
(step "waiting for a slot") and parks until the worker's look at the line
wakes it (a slot given back) or PARKED_S (300 s) passes. The server's CPU (all threads, kernel included, from /proc) is read over
`--window` seconds twice: first with one task running and none waiting
(the baseline), then with `--waiting` tasks waiting. The default window
holds more than a minute, so that a change whose waiting tasks look again
every minute shows that look in its figure; `--window 310` holds one
fallback look of each waiting task. Printed: CPU as a share of one
core, context switches a second, and the waiting server's against the
baseline; checked: one task running, the rest waiting, none overdue.

Bounded: about 2 x window + the posts (10-20 s); the server is stopped by
PID and its directory removed.
"""

import argparse
import os
import sqlite3
import time

from _common import PYTHON, ROOT, Server, free_port, table, temp_dir
from http_bench import load, make_users, poster, server_cpu, server_env

TOML = """
[providers.bench]
type = "demo"
duration_s = 3600
poll_interval_s = 2
max_poll_interval_s = 30
max_wait_s = 7200
concurrency = 1
"""


def steps(db_path):
    """{(status, step): count} of the active tasks, and how many are more
    than a second overdue, read by a connection of this process."""
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        counts = dict(((s, st), n) for s, st, n in conn.execute(
            "SELECT status, step, COUNT(*) FROM tasks WHERE status IN ('queued', 'running') GROUP BY status, step"))
        late = conn.execute("SELECT COUNT(*) FROM tasks WHERE status IN ('queued', 'running') "
                            "AND next_poll_at < ?", (time.time() - 1,)).fetchone()[0]
        return counts, late
    finally:
        conn.close()


def watch(pid, window):
    """(share of a core, context switches a second) of `pid` over `window` s."""
    before, t0 = server_cpu(pid), time.monotonic()
    time.sleep(window)
    after, spent = server_cpu(pid), time.monotonic() - t0
    return (after[0] - before[0]) / spent, (after[1] - before[1]) / spent


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waiting", type=int, default=8000)
    parser.add_argument("--window", type=float, default=65.0, help="seconds each measure lasts")
    args = parser.parse_args()
    if not 10 <= args.waiting <= 50_000 or not 5 <= args.window <= 900:
        parser.error("--waiting takes 10-50000, --window 5-900")
    started = time.monotonic()
    with temp_dir("parked") as tmp:
        data = os.path.join(tmp, "holdfast")
        os.makedirs(data)
        with open(os.path.join(data, "holdfast.toml"), "w") as fh:
            fh.write(TOML)
        tokens = make_users(data, 1 + -(-(args.waiting + 1) // 100))    # none past 100 active
        port = free_port()
        server = Server([PYTHON, os.path.join(ROOT, "app.py")], port=port, cwd=data, env=server_env(data, port),
                        log_path=os.path.join(tmp, "holdfast.log"))
        db = os.path.join(data, "holdfast.db")
        server.start()
        try:
            post = poster(tokens)
            load(port, 1, 1, post)          # the one that takes the slot
            time.sleep(3)
            idle = watch(server.proc.pid, args.window)
            load(port, args.waiting, 4, post)
            deadline = time.monotonic() + 60
            while steps(db)[0].get(("queued", "waiting for a slot"), 0) < args.waiting:
                if time.monotonic() > deadline:
                    raise SystemExit(f"not every task parked within 60 s: {steps(db)[0]}")
                time.sleep(0.2)
            waiting = watch(server.proc.pid, args.window)
            counts, late = steps(db)
        finally:
            server.stop()
    expected = f"1 running, {args.waiting} waiting for a slot"
    running = sum(n for (status, _), n in counts.items() if status == "running")
    if running != 1 or counts.get(("queued", "waiting for a slot")) != args.waiting or late:
        raise SystemExit(f"expected {expected} and none overdue; found {counts}, {late} overdue")
    rows = [["one running, none waiting (baseline)", f"{100 * idle[0]:.1f}%", f"{idle[1]:.0f}", "1.00x"],
            [f"one running, {args.waiting:,} waiting", f"{100 * waiting[0]:.1f}%", f"{waiting[1]:.0f}",
             f"{waiting[0] / idle[0]:.2f}x" if idle[0] else "-"]]
    table(["server", "CPU, share of a core", "switches/s", "CPU vs baseline"], rows,
          f"A provider's one slot taken, tasks waiting for it: the server over {args.window:g} s each")
    print(f"after: {counts}, {late} overdue")
    print(f"parked_bench: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
