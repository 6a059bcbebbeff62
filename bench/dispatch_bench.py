"""Dispatch cost as finished tasks pile up: the worker's claim with 1,000,000
finished rows in the table against 10,000, and the other queries a running
server makes on a timer, measured the same way.

    .venv/bin/python bench/dispatch_bench.py [--rows 1000000] [--rounds 5]

Two fresh SQLite files get the store's schema, N finished tasks (bulk
inserted with raw SQL, indexes built afterwards) and the same 200 due
queued tasks (submitted through the store). Then, interleaved round by round:

  claim 50 due     SqliteStore.claim(limit=50): a dispatch tick with work
                   (leases in the past keep the same rows claimable)
  claim, none due  a dispatch tick with nothing to do (twice a second)
  sweep            lease_owners() and overdue(): the sweeper, every 5 s
  stats()          what /healthz asks (queue depth, oldest active)
  task_counts()    what GET /metrics asks (tasks by provider and status),
                   where the store has it

Bounded: building the 1M-row file takes about 10-30 s here; the file (about
0.4 GB) is removed at the end.
"""

import argparse
import os
import sqlite3
import statistics
import time

from _common import fmt_rate, median_ratio, rounds, table, temp_dir

from store import TASK_COLUMNS, SqliteStore

ACTIVE = 200


def build(path, finished):
    """A store file with `finished` finished tasks and ACTIVE due ones."""
    SqliteStore(path).close()
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("PRAGMA journal_mode=DELETE")   # a bulk load: no WAL, no syncs
    raw.execute("PRAGMA synchronous=OFF")
    indexes = raw.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'tasks' "
                          "AND sql IS NOT NULL").fetchall()
    raw.execute("BEGIN")
    for name, _ in indexes:
        raw.execute(f'DROP INDEX "{name}"')
    now = time.time()
    files = '[{"name":"out_0.png","size":741,"sha256":"%s","content_type":"image/png"}]' % ("ab" * 32)
    cols = ", ".join(TASK_COLUMNS)
    marks = ", ".join("?" * len(TASK_COLUMNS))

    def rows():
        for i in range(finished):
            created = now - 86400 * 30 + i * (86400 * 29 / finished)
            failed = i % 20 == 0
            row = {c: None for c in TASK_COLUMNS}
            row["priority"] = 0
            row.update(id=f"t_00{i:024d}", user_id=1 + i % 100, provider="demo",
                       status="failed" if failed else "succeeded", step="failed" if failed else "done",
                       progress=None if failed else 1.0, params='{"prompt":"a red fox"}',
                       external_id=f"demo-{i}", attempts=1, files="[]" if failed else files,
                       error='{"code":"timeout","message":"the task passed its deadline"}' if failed else None,
                       cost=0, credits="none", created_at=created, updated_at=created + 30,
                       started_at=created + 1, finished_at=created + 30, deadline_at=created + 7200,
                       version=6, polls=5, lease_token=2)
            yield [row[c] for c in TASK_COLUMNS]
    raw.executemany(f"INSERT INTO tasks ({cols}) VALUES ({marks})", rows())
    for _, sql in indexes:
        raw.execute(sql)
    raw.execute("COMMIT")
    # No ANALYZE: holdfast never runs it, so the planner sees what it sees in production.
    raw.close()
    store = SqliteStore(path)
    user, _ = store.create_user("bench", max_active=100_000, rate_per_s=10_000)
    for i in range(ACTIVE):
        store.submit(user["id"], "demo", {"prompt": f"due {i}"}, now=now, deadline_at=now + 7200)
    return store


def traced_plan(store, call):
    """The query plans of what `call` really runs (not a copy of its SQL)."""
    statements = []
    conn = store.db.connection()
    conn.set_trace_callback(statements.append)
    try:
        call()
    finally:
        conn.set_trace_callback(None)
    return " | ".join("; ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql))
                      for sql in statements if sql.startswith("SELECT"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not 10_000 <= args.rows <= 5_000_000 or not 1 <= args.rounds <= 20:
        parser.error("--rows 10000..5000000, --rounds 1..20")
    t_start = time.perf_counter()
    with temp_dir("dispatch") as tmp:
        t0 = time.perf_counter()
        small = build(os.path.join(tmp, "small.db"), args.small)
        big = build(os.path.join(tmp, "big.db"), args.rows)
        build_s = time.perf_counter() - t0
        size_mb = os.path.getsize(os.path.join(tmp, "big.db")) / 1e6
        owners_plan = traced_plan(big, big.lease_owners)
        stats_plan = traced_plan(big, lambda: big.stats(time.time()))
        plan = big.db.execute_sql(
            "EXPLAIN QUERY PLAN SELECT id FROM tasks WHERE status IN ('queued', 'running') AND next_poll_at <= ? "
            "AND (lease_owner IS NULL OR lease_expires_at < ?) ORDER BY next_poll_at LIMIT 50",
            (time.time(), time.time())).fetchall()
        later, before = time.time() + 1, time.time() - 3600

        def claim(store):
            def run(n):
                for _ in range(n):
                    got = store.claim("bench", now=later, limit=50, lease_s=-1.0)
                assert len(got) == 50, len(got)
            return run

        def idle(store):
            def run(n):
                for _ in range(n):
                    store.claim("bench", now=before, limit=50, lease_s=60.0)
            return run

        def owners(store):
            def run(n):
                for _ in range(n):
                    store.lease_owners()
            return run

        def overdue(store):
            def run(n):
                for _ in range(n):
                    store.overdue(now=later, limit=200)
            return run

        def stats(store):
            def run(n):
                for _ in range(n):
                    store.stats(later)
            return run

        def counts(store):
            def run(n):
                for _ in range(n):
                    store.task_counts()
            return run

        cases = [("claim 50 due", claim, 200), ("claim, none due (idle tick)", idle, 2000),
                 ("sweep: lease_owners()", owners, 5), ("sweep: overdue()", overdue, 200),
                 ("stats() for /healthz", stats, 5)]
        if hasattr(big, "task_counts"):    # GET /metrics' query, where the store has it
            cases.append(("task_counts() for /metrics", counts, 5))
        results = []
        for name, make, n in cases:
            make(small)(max(1, n // 10))      # warm up both files' pages
            make(big)(max(1, n // 10))
            r = rounds({"small": make(small), "big": make(big)}, n, args.rounds)
            results.append([name, fmt_rate(statistics.median(r["small"])), fmt_rate(statistics.median(r["big"])),
                            f"{1 / median_ratio(r['big'], r['small']):.2f}x",
                            f"{1000 / statistics.median(r['big']):.2f}"])
        small.close()
        big.close()
    table(["per call", f"ops/s at {args.small:,}", f"ops/s at {args.rows:,}", "cost ratio big/small",
           f"ms at {args.rows:,}"], results,
          f"Finished rows {args.rows:,} vs {args.small:,} (+{ACTIVE} due active in both), {args.rounds} "
          f"interleaved rounds; cost ratio = median of per-round time ratios")
    print("plan of claim: " + "; ".join(row[-1] for row in plan))
    print("plan of lease_owners: " + owners_plan)
    print("plan of stats: " + stats_plan)
    print(f"built both files in {build_s:.0f} s; the big one is {size_mb:.0f} MB")
    print(f"dispatch_bench: {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
