"""The worker's claim against the backlog it is meant to shrink: a claim of
one task (what a pool thread asks for as it frees up) with 100 due tasks
of each status, and with 10,000.

    .venv/bin/python bench/claim_bench.py [--backlog 10000] [--rounds 5]

Two SQLite files get the store's schema and the same shape of work: N
queued tasks due and N running tasks due, their polls and starts spread
over the last hour. Interleaved round by round, on each file:

  claim 1             SqliteStore.claim(limit=1), the longest due first
  claim 1, fresh      the same with fresh_first (the worker's slow-down:
                      submissions and young tasks first)
  before: ...         the statements claims ran before, in both orders:
                      status IN (...) ORDER BY, which reads and sorts
                      every due row (raw sqlite3, the same file)

Leases are taken in the past (lease_s=-1), so every round finds the same
tasks due. The ratio is the small backlog's time over the large one's: 1.00x
is a claim that does not grow with the backlog.

Bounded: about 40 s here; the files are removed at the end.
"""

import argparse
import os
import sqlite3
import statistics
import time

from _common import fmt_ms, rounds, table, temp_dir

from store import TASK_COLUMNS, SqliteStore

# The statements claims ran before, in both orders.
OLD_CLAIM = (f"SELECT {', '.join(TASK_COLUMNS)} FROM tasks WHERE status IN (?, ?) "
             "AND next_poll_at <= ? AND (lease_owner IS NULL OR lease_expires_at < ?) ORDER BY {} LIMIT 1")
OLD_ORDERS = {"before: one statement": ("next_poll_at", 2),
              "before: one statement, fresh": ("next_poll_at + CASE WHEN status = 'running' "
                                               "THEN ? - COALESCE(started_at, created_at) ELSE 0 END", 3)}


def build(path, backlog, now):
    """A store with `backlog` queued and `backlog` running tasks, all due."""
    store = SqliteStore(path)
    users = [store.create_user(f"bench{i}", max_active=100_000, rate_per_s=10_000)[0]["id"]
             for i in range(1 + backlog // 100)]
    for i in range(2 * backlog):
        at = now - 3600 + 3600 * i / (2 * backlog)
        task, _ = store.submit(users[i % len(users)], "demo", {"prompt": f"due {i}"}, now=at,
                               deadline_at=now + 7200)
        if i % 2:
            store.update(task["id"], token=None, now=at, status="running", external_id=f"demo-{i}",
                         next_poll_at=at + 1)
    return store


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not 1_000 <= args.backlog <= 100_000 or not 1 <= args.rounds <= 20:
        parser.error("--backlog 1000..100000, --rounds 1..20")
    started = time.perf_counter()
    now = time.time()
    sizes = (100, args.backlog)
    with temp_dir("claim") as tmp:
        stores = {n: build(os.path.join(tmp, f"{n}.db"), n, now) for n in sizes}
        raws = {n: sqlite3.connect(os.path.join(tmp, f"{n}.db")) for n in sizes}
        try:
            cases = {}
            for n in sizes:
                store, raw = stores[n], raws[n]

                def claim(k, store=store, fresh=False):
                    for _ in range(k):
                        assert len(store.claim("bench", now=now, limit=1, lease_s=-1.0, fresh_first=fresh)) == 1
                    return k

                def old(k, raw=raw, sql=None, marks=2):
                    for _ in range(k):
                        assert len(raw.execute(sql, ("queued", "running", *(now,) * marks)).fetchall()) == 1
                    return k
                cases[("claim 1", n)] = claim
                cases[("claim 1, fresh", n)] = lambda k, claim=claim: claim(k, fresh=True)
                for name, (order, marks) in OLD_ORDERS.items():
                    cases[(name, n)] = lambda k, old=old, sql=OLD_CLAIM.format(order), marks=marks: old(
                        k, sql=sql, marks=marks)
            rates = rounds(cases, 300, args.rounds)
        finally:
            for raw in raws.values():
                raw.close()
            for store in stores.values():
                store.close()

    rows = []
    for name in ("claim 1", "claim 1, fresh", *OLD_ORDERS):
        small, large = (statistics.median(rates[(name, n)]) for n in sizes)
        rows.append([name, fmt_ms(1 / small), fmt_ms(1 / large), f"{small / large:.2f}x"])
    table(["operation", f"ms, {sizes[0]:,} due", f"ms, {sizes[1]:,} due", "large vs small"], rows,
          f"Claim of one, {sizes[0]:,} vs {sizes[1]:,} queued and as many running tasks due; "
          f"median of {args.rounds} rounds of 300")
    print(f"claim_bench: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
