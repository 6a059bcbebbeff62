"""What the fair share of scarce slots costs: take_slot's line (who is
first in line for a provider's free slot) against a claim of 50 due tasks.

    .venv/bin/python bench/fair_bench.py [--waiting 200,1000,10000] [--users 4,1000] [--rounds 5]

One SQLite file per size and number of users: that many users' tasks (taking
turns) waiting at a provider with `concurrency = 2`, one slot held and one free, so every take_slot reads the
line. Interleaved round by round:

  claim 50 due        SqliteStore.claim(limit=50), as dispatch_bench measures it
  take_slot (line)    a take of the free slot by a task that is not first in
                      line: lock, count, the line query, the wake of those
                      first, refused (nothing else changes, so it repeats)
  the line alone      what fairness adds to a take of a free slot: the
                      line's queries for the task first in line (all in
                      one transaction, rolled back)
  wake_line, full     the worker's look at the line every tick while every
                      slot is taken (limit 1): the slots held, read
  wake_line, 1 free   the look with a slot free and those first in line
                      already due (never tried): the line read, no write

Then what keeping the line's summary (slot_line, kept by triggers on tasks)
costs the writes: submits, and a slot taken and given back by a user's
oldest waiting task (each write counts the user's row again), against a
store of the same tasks with the triggers dropped.

Bounded: a few seconds per size.
"""

import argparse
import os
import statistics
import time

from _common import fmt_rate, median_ratio, rounds, table, temp_dir

from store import SqliteStore


class _Undo(Exception):
    pass


def build(path, waiting, n_users):
    store = SqliteStore(path)
    users = [store.create_user(f"u{i}", max_active=100_000, rate_per_s=10_000)[0] for i in range(n_users)]
    now = time.time()
    for i in range(waiting):
        store.submit(users[i % n_users]["id"], "demo", {"prompt": f"w{i}"}, now=now - waiting + i,
                     deadline_at=now + 7200)
    held = store.claim("bench", now=now, limit=1, lease_s=3600)[0]
    assert store.take_slot(held["id"], token=held["lease_token"], now=now, limit=2, step="submitting")
    return store, held["user_id"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waiting", default="200,1000,10000")
    parser.add_argument("--users", default="4")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(n) for n in args.waiting.split(",")]
    user_counts = [int(n) for n in args.users.split(",")]
    if not all(10 <= n <= 100_000 for n in sizes) or not 1 <= args.rounds <= 20:
        parser.error("--waiting sizes 10..100000, --rounds 1..20")
    if not all(2 <= n <= 10_000 for n in user_counts):
        parser.error("--users 2..10000")
    rows = []
    with temp_dir("fair") as tmp:
        for size, n_users in ((s, u) for s in sizes for u in user_counts if u <= s):
            store, held_by = build(os.path.join(tmp, f"w{size}u{n_users}.db"), size, n_users)
            later = time.time() + 1
            tasks = {t["id"]: t for t in store.claim("bench", now=later, limit=size, lease_s=3600)}
            order = sorted(tasks.values(), key=lambda t: t["created_at"])
            # u0 holds the slot (with its oldest task): u1's oldest is first
            # in line, and the newest waiting task is not.
            first, last = order[0], order[-1]

            def claim(n):
                for _ in range(n):
                    got = store.claim("bench2", now=later + 10_000, limit=50, lease_s=-1.0)
                assert len(got) == 50, len(got)

            def refused(n):
                for _ in range(n):
                    got = store.take_slot(last["id"], token=last["lease_token"], now=later, limit=2,
                                          step="submitting")
                assert got is None

            def granted(n):
                try:
                    with store._seam(), store._write():
                        task = store._task_for_update(first["id"])
                        for _ in range(n):
                            assert store._next_in_line(task, {held_by: 1}, 1, later)
                        raise _Undo
                except _Undo:
                    pass

            def look(limit):
                def run(n):
                    for _ in range(n):
                        woken = store.wake_line("demo", limit=limit, now=later)
                    assert woken == 0
                return run

            cases = {"claim 50 due": claim, "take_slot, refused by the line": refused,
                     "the line alone (granted)": granted, "wake_line, every slot taken": look(1),
                     "wake_line, 1 free, first in line due": look(2)}
            for fn in cases.values():
                fn(5)
            r = rounds(cases, 50, args.rounds)
            base = statistics.median(r["claim 50 due"])
            for name in cases:
                rate = statistics.median(r[name])
                rows.append([f"{size:,} waiting, {n_users:,} users: {name}", fmt_rate(rate), f"{1000 / rate:.3f}",
                             f"{100 * base / rate:.1f}%"])
            store.close()
        table(["per call", "ops/s", "ms", "% of a claim of 50"], rows,
              f"Fair slot line vs claim of 50 (SQLite), {args.rounds} interleaved rounds, medians")
        write_costs(tmp, args.rounds)


def write_costs(tmp, count, waiting=2000, n_users=100):
    cases, stores = {}, []
    for label in ("with slot_line", "without its triggers"):
        store, _ = build(os.path.join(tmp, f"writes {label}.db"), waiting, n_users)
        stores.append(store)
        if label != "with slot_line":
            with store._seam(), store._write():
                for name in ("slot_line_insert", "slot_line_leave", "slot_line_join", "slot_line_delete"):
                    store._exec(f"DROP TRIGGER {name}")
        later = time.time() + 1
        users = [u for u, in store._exec("SELECT id FROM users ORDER BY id").fetchall()]
        claimed = sorted(store.claim("bench", now=later, limit=waiting, lease_s=3600), key=lambda t: t["created_at"])
        oldest = claimed[:n_users]      # each user's oldest waiting task: its row's `since`

        def submit(n, store=store, users=users):
            for i in range(n):
                store.submit(users[i % len(users)], "demo", {"prompt": "more"}, now=time.time(),
                             deadline_at=time.time() + 7200)

        def take_and_give_back(n, store=store, oldest=oldest, later=later):
            for i in range(n):
                task = oldest[i % len(oldest)]
                assert store.take_slot(task["id"], token=task["lease_token"], now=later, limit=None,
                                       step="submitting")
                store.update(task["id"], token=task["lease_token"], now=later, step=None)
            return 2 * n

        cases[f"submit, {label}"] = submit
        cases[f"take_slot + give back (per write), {label}"] = take_and_give_back
    # SQLite VM steps: the same on a busy machine as on an idle one.
    steps = {}
    for name, fn in cases.items():
        # On the connection the store writes on (its group commit's), not
        # peewee's: counted on that one, every write showed 0 steps.
        con, counted = stores[0 if "with slot_line" in name else 1]._write_conn(), [0]
        con.set_progress_handler(lambda: counted.__setitem__(0, counted[0] + 1), 1)
        try:
            done = fn(20)
        finally:
            con.set_progress_handler(None, 1)
        steps[name] = counted[0] / (done if isinstance(done, int) else 20)
    r = rounds(cases, 100, 4 * count)
    rows = []
    for kind in ("submit", "take_slot + give back (per write)"):
        names = [f"{kind}, {label}" for label in ("with slot_line", "without its triggers")]
        rows.append([kind, *(fmt_rate(statistics.median(r[n])) for n in names),
                     f"{100 * (median_ratio(r[names[1]], r[names[0]]) - 1):+.1f}%",
                     *(f"{steps[n]:,.0f}" for n in names)])
    table(["write", "ops/s with slot_line", "ops/s without", "time added", "VM steps with", "VM steps without"],
          rows, f"What keeping slot_line costs the writes ({waiting:,} waiting, {n_users} users, SQLite), "
          f"{4 * count} interleaved rounds of 100; time added = median of per-round ratios")
    for store in stores:
        store.close()


if __name__ == "__main__":
    main()
