"""The store's hot paths against plain sqlite3 doing the same work, and against
huey's SqliteHuey enqueue, measured in the same run.

    .venv/bin/python bench/store_bench.py [--rounds 5] [--n 2000] [--profile]

Baselines use the store's own schema (same table, same indexes) in their own
file, opened with the store's pragmas (WAL, synchronous=NORMAL,
busy_timeout=5000), so a ratio is holdfast's own code and nothing else.
Tables, in order:

  submit            store.submit vs raw dedupe-insert vs huey enqueue
  read and claim    get_task and claim(50) vs the same SQL in raw sqlite3
  max_active        submit as the API calls it, for a user with 100 and
                    with 10,000 active tasks
  contention        submit latency while another thread of the process writes
  JSON store        a write at 10,000 tasks vs at 100, compaction included

All but the contention table are single-threaded. --profile adds a cProfile
of submit and get_task (top functions by own time).

Bounded: about 30-60 s; everything lives in one temporary directory.
"""

import argparse
import cProfile
import io
import json
import os
import pstats
import sqlite3
import statistics
import threading
import time

from _common import BeginTimer, fmt_ms, fmt_rate, median_ratio, percentile, rounds, table, temp_dir

from store import TASK_COLUMNS, JsonStore, SqliteStore

PRAGMAS = ("PRAGMA journal_mode=wal", "PRAGMA synchronous=NORMAL", "PRAGMA busy_timeout=5000",
           "PRAGMA cache_size=-8000")
_SELECT = "SELECT " + ", ".join(TASK_COLUMNS) + " FROM tasks"
_INSERT = (f"INSERT INTO tasks ({', '.join(TASK_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(TASK_COLUMNS))})")


def raw_connection(path):
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in PRAGMAS:
        conn.execute(pragma)
    return conn


def fresh_schema(path):
    """An empty database with holdfast's schema, made by the store itself."""
    SqliteStore(path).close()


class Raw:
    """The baseline: what a submit needs, in plain sqlite3 on the same schema."""

    def __init__(self, path):
        self.conn = raw_connection(path)
        self.count = 0
        self.now = time.time()

    def _row(self, key):
        self.count += 1
        task_id = f"t_{self.count:026d}"
        params = json.dumps({"prompt": f"a red fox {self.count}"})
        row = {c: None for c in TASK_COLUMNS}
        row["priority"] = 0
        row.update(id=task_id, user_id=1, provider="demo", status="queued", dedupe_key=key, params=params,
                   attempts=0, files="[]", cost=0, credits="none", created_at=self.now,
                   updated_at=self.now, deadline_at=self.now + 7200, version=1, next_poll_at=self.now,
                   polls=0, lease_token=0)
        return row

    def dedupe_insert(self, n, with_event=False):
        c = self.conn
        for _ in range(n):
            key = f"raw-{self.count}"
            row = self._row(key)
            c.execute("BEGIN IMMEDIATE")
            found = c.execute("SELECT id FROM tasks WHERE user_id = ? AND dedupe_key = ? "
                              "AND status NOT IN ('failed', 'cancelled')", (1, key)).fetchone()
            if found is None:
                c.execute(_INSERT, [row[k] for k in TASK_COLUMNS])
                if with_event:
                    c.execute("INSERT INTO events (user_id, task_id, type, data, created_at) "
                              "VALUES (?, ?, ?, ?, ?)", (1, row["id"], "created", json.dumps(row), self.now))
            c.execute("COMMIT")

    def claim(self, limit, now, owner="raw"):
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        rows = c.execute(_SELECT + " WHERE status IN ('queued', 'running') AND next_poll_at <= ? "
                         "AND (lease_owner IS NULL OR lease_expires_at < ?) ORDER BY next_poll_at LIMIT ?",
                         (now, now, limit)).fetchall()
        token = TASK_COLUMNS.index("lease_token")
        c.executemany("UPDATE tasks SET lease_owner = ?, lease_expires_at = ?, lease_token = ? WHERE id = ?",
                      [(owner, now - 1.0, r[token] + 1, r[0]) for r in rows])
        c.execute("COMMIT")
        return rows


def huey_enqueuer(path):
    """huey's SqliteHuey enqueue, with holdfast's synchronous=NORMAL (huey's
    default is FULL: an fsync per commit). None when huey is missing."""
    try:
        from huey import SqliteHuey
    except ImportError:
        return None
    huey = SqliteHuey("bench", filename=path, timeout=5)
    huey.storage.conn.execute("PRAGMA synchronous=NORMAL")

    @huey.task()
    def generate(prompt):
        return prompt

    def enqueue(n):
        for i in range(n):
            generate(f"a red fox {i}")
    return enqueue


def submit_cases(tmp, args):
    store = SqliteStore(os.path.join(tmp, "submit.db"))
    user, _ = store.create_user("bench")
    uid, now = user["id"], time.time()
    raw_path, raw_ev_path = os.path.join(tmp, "raw.db"), os.path.join(tmp, "raw_event.db")
    fresh_schema(raw_path)
    fresh_schema(raw_ev_path)
    raw, raw_ev = Raw(raw_path), Raw(raw_ev_path)
    counter = iter(range(10 ** 9))

    def submit(n, key=False):
        for _ in range(n):
            i = next(counter)
            store.submit(uid, "demo", {"prompt": f"a red fox {i}"}, now=now, deadline_at=now + 7200,
                         dedupe_key=f"k-{i}" if key else None)

    cases = {
        "raw sqlite3 dedupe-insert (baseline)": raw.dedupe_insert,
        "raw sqlite3 dedupe-insert + event row": lambda n: raw_ev.dedupe_insert(n, with_event=True),
        "SqliteStore.submit, no dedupe_key": submit,
        "SqliteStore.submit, dedupe_key": lambda n: submit(n, key=True),
    }
    enqueue = huey_enqueuer(os.path.join(tmp, "huey.db"))
    if enqueue is not None:
        cases["huey SqliteHuey enqueue"] = enqueue
    for fn in cases.values():      # warm up: connections, page cache, code paths
        fn(50)
    rates = rounds(cases, args.n, args.rounds)
    base = rates["raw sqlite3 dedupe-insert (baseline)"]
    rows = [[name, fmt_rate(statistics.median(r)), f"{median_ratio(r, base):.2f}x"] for name, r in rates.items()]
    if enqueue is None:
        rows.append(["huey SqliteHuey enqueue", "skipped", ""])
    table(["submit (one thread)", "ops/s", "vs raw"], rows,
          f"Submit: {args.rounds} interleaved rounds of {args.n}; median ops/s; ratio = median of per-round ratios")
    if enqueue is None:
        print("huey SqliteHuey enqueue skipped: pip install -r bench/requirements.txt\n")
    raw.conn.close()
    raw_ev.conn.close()
    return store, uid


def read_and_claim_cases(tmp, store, uid, args):
    raw = Raw(os.path.join(tmp, "submit.db"))   # reads the store's own file
    ids = [r[0] for r in raw.conn.execute("SELECT id FROM tasks ORDER BY random() LIMIT 2000")]
    n_tasks = raw.conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]

    def get_task(n):
        for i in range(n):
            store.get_task(ids[i % len(ids)], uid)

    def raw_read(n):
        c = raw.conn
        for i in range(n):
            c.execute(_SELECT + " WHERE id = ? AND user_id = ?", (ids[i % len(ids)], uid)).fetchone()

    reads = rounds({"raw": raw_read, "store": get_task}, args.n * 5, args.rounds)

    # Claims: 500 due tasks in a store of their own. A lease in the past
    # leaves the same rows claimable again, so every claim takes 50.
    claim_store = SqliteStore(os.path.join(tmp, "claim.db"))
    cuser, _ = claim_store.create_user("bench")
    now = time.time()
    for i in range(500):
        claim_store.submit(cuser["id"], "demo", {"prompt": f"p{i}"}, now=now, deadline_at=now + 7200)
    claim_raw = Raw(os.path.join(tmp, "claim.db"))
    later = now + 1
    got = {}

    def store_claim(n):
        for _ in range(n):
            got["store"] = len(claim_store.claim("bench", now=later, limit=50, lease_s=-1.0))

    def raw_claim(n):
        for _ in range(n):
            got["raw"] = len(claim_raw.claim(50, later))

    def store_idle(n):
        for _ in range(n):
            claim_store.claim("bench", now=now - 1, limit=50, lease_s=60.0)

    def raw_idle(n):
        for _ in range(n):
            claim_raw.claim(50, now - 1)

    claims = rounds({"raw": raw_claim, "store": store_claim}, max(20, args.n // 10), args.rounds)
    idle = rounds({"raw": raw_idle, "store": store_idle}, args.n, args.rounds)
    assert got == {"store": 50, "raw": 50}, got
    rows = []
    for name, r in (("get_task(id, user) vs raw primary-key read", reads),
                    ("claim of 50 due rows vs raw (select + 50 updates)", claims),
                    ("claim with nothing due (an idle tick) vs raw", idle)):
        rows.append([name, fmt_rate(statistics.median(r["store"])), fmt_rate(statistics.median(r["raw"])),
                     f"{median_ratio(r['store'], r['raw']):.2f}x"])
    table(["read and claim (one thread)", "store ops/s", "raw ops/s", "store/raw"], rows,
          f"Reads ({n_tasks:,} tasks) and claims (500 due): {args.rounds} interleaved rounds, median ops/s")
    raw.conn.close()
    claim_raw.conn.close()
    claim_store.close()
    return ids


def active_cases(tmp, args):
    """The API passes max_active on every submit, and the store counts the
    user's active tasks to check it: that count grows with them."""
    store = SqliteStore(os.path.join(tmp, "active.db"))
    now = time.time()
    users = {}
    for name, active in (("100 active", 100), ("10,000 active", 10_000)):
        user, _ = store.create_user(name.replace(",", "").replace(" ", "-"))
        users[name] = user["id"]
        for i in range(active):
            store.submit(user["id"], "demo", {"prompt": f"seed {i}"}, now=now, deadline_at=now + 7200)

    # Timed submits carry their own created_at; after each case they are
    # marked finished (untimed), so the users keep 100 and 10,000 active.
    timed_at = now + 1
    raw = raw_connection(os.path.join(tmp, "active.db"))

    def case(uid, max_active):
        def run(n):
            for i in range(n):
                store.submit(uid, "demo", {"prompt": f"p{i}"}, now=timed_at, deadline_at=now + 7200,
                             dedupe_key=None, max_active=max_active)
        return run

    def finish(_):
        raw.execute("UPDATE tasks SET status = 'succeeded' WHERE created_at = ?", (timed_at,))

    n = max(100, args.n // 4)
    cases = {}
    for name, uid in users.items():
        cases[f"user with {name}, no max_active"] = case(uid, None)
        cases[f"user with {name}, max_active=100000 (as the API)"] = case(uid, 100_000)
    for name, fn in cases.items():
        fn(20)
        finish(name)
    rates = rounds(cases, n, args.rounds, after=finish)
    raw.close()
    base = rates["user with 100 active, no max_active"]
    rows = [[name, fmt_rate(statistics.median(r)), f"{median_ratio(r, base):.2f}x"] for name, r in rates.items()]
    table(["SqliteStore.submit", "ops/s", "vs first row"], rows,
          f"Submit with the per-user active-task check (the API always passes max_active): "
          f"{args.rounds} rounds of {n}")
    store.close()


def contention_cases(tmp, args):
    """Submit latency alone, and while a second thread writes as the worker
    does (claims of 8 due tasks). SQLite serializes writers:
    a BEGIN IMMEDIATE that finds the lock taken waits in SQLite's busy
    handler, which sleeps 1, 2, 5, 10 ms ... between tries."""
    store = SqliteStore(os.path.join(tmp, "contention.db"))
    user, _ = store.create_user("bench")
    worker_user, _ = store.create_user("worker")
    now = time.time()
    for i in range(200):
        store.submit(worker_user["id"], "demo", {"prompt": f"due {i}"}, now=now - 10, deadline_at=now + 7200)
    timer = BeginTimer(store)
    n = max(200, args.n // 2)

    def submits():
        lat = []
        for i in range(n):
            t0 = time.perf_counter()
            store.submit(user["id"], "demo", {"prompt": f"p{i}"}, now=now, deadline_at=now + 7200)
            lat.append(time.perf_counter() - t0)
        return lat

    stop = threading.Event()

    def writer(pause):
        while not stop.is_set():
            store.claim("worker", now=now, limit=8, lease_s=-1.0)
            if pause:
                time.sleep(pause)     # the worker's own work between writes

    rows = []
    submits()                               # warm up
    for name, pause in (("alone", None), ("a writer thread, pausing 0.5 ms between claims", 0.0005),
                        ("a writer thread, claims back to back", 0.0)):
        thread = threading.Thread(target=writer, args=(pause,), daemon=True) if pause is not None else None
        if thread:
            stop.clear()
            thread.start()
            time.sleep(0.05)
        timer.take()
        t0 = time.perf_counter()
        lat = submits()
        elapsed = time.perf_counter() - t0
        waits = timer.take()
        if thread:
            stop.set()
            thread.join(10)
        slow = sum(1 for w in waits if w > 0.001)
        rows.append([name, fmt_rate(n / elapsed), fmt_ms(percentile(lat, 50)), fmt_ms(percentile(lat, 99)),
                     f"{max(lat) * 1000:.1f}", f"{slow}/{len(waits)}", f"{max(waits) * 1000:.1f}"])
    table(["SqliteStore.submit", "submits/s", "p50 ms", "p99 ms", "max ms", "BEGINs > 1 ms",
           "longest BEGIN ms"], rows,
          f"Submit latency with another writer in the process ({n} submits; the BEGIN count includes the "
          "second thread's)")
    store.close()


# -- the JSON store: a write at 10k tasks against a write at 100 -------------

def json_cycle(store, uid, now, cap_s=60.0):
    """Submit from just after a compaction until the next compaction is done:
    the amortized cost of a write over one whole cycle, and its latencies."""
    store.compact()
    lat = []
    start = time.perf_counter()
    size = 0
    while time.perf_counter() - start < cap_s:
        t0 = time.perf_counter()
        store.submit(uid, "demo", {"prompt": f"a red fox {len(lat)}"}, now=now, deadline_at=now + 7200)
        lat.append(time.perf_counter() - t0)
        new_size = os.path.getsize(store.journal_path)
        if new_size < size:
            break
        size = new_size
    total = time.perf_counter() - start
    return {"writes": len(lat), "per_write": total / len(lat), "p50": percentile(lat, 50),
            "p99": percentile(lat, 99), "max": max(lat), "complete": time.perf_counter() - start < cap_s}


def json_cases(tmp, args):
    now = time.time()
    small = JsonStore(os.path.join(tmp, "json-100"))
    suser, _ = small.create_user("bench")
    for i in range(100):
        small.submit(suser["id"], "demo", {"prompt": f"seed {i}"}, now=now, deadline_at=now + 7200)
    # 10k tasks are made in SQLite (fast) and imported: the same rows, events included.
    seed = SqliteStore(os.path.join(tmp, "seed.db"))
    seed_user, _ = seed.create_user("bench")
    for i in range(10_000):
        seed.submit(seed_user["id"], "demo", {"prompt": f"seed {i}"}, now=now, deadline_at=now + 7200)
    big = JsonStore(os.path.join(tmp, "json-10k"))
    big.import_rows(seed.export_rows())
    seed.close()
    buser = big.user_by_name("bench")
    snapshot_mb = os.path.getsize(big.snapshot_path) / 1e6

    # The small cycle is short: run it three times, keep the median.
    small_runs = []
    for _ in range(3):
        small.close()
        small = JsonStore(os.path.join(tmp, "json-100-" + str(len(small_runs))))
        suser, _ = small.create_user("bench")
        for i in range(100):
            small.submit(suser["id"], "demo", {"prompt": f"seed {i}"}, now=now, deadline_at=now + 7200)
        small_runs.append(json_cycle(small, suser["id"], now))
    at_100 = sorted(small_runs, key=lambda r: r["per_write"])[1]
    at_10k = json_cycle(big, buser["id"], now)
    small.close()
    big.close()
    rows = []
    for name, r in (("100 tasks", at_100), ("10,000 tasks", at_10k)):
        rows.append([name, r["writes"], f"{r['per_write'] * 1e6:,.0f}", f"{r['p50'] * 1e6:,.0f}",
                     f"{r['p99'] * 1e6:,.0f}", f"{r['max'] * 1000:,.1f}" + ("" if r["complete"] else " (cut)")])
    table(["JsonStore.submit, starting at", "writes", "us/write", "p50 us", "p99 us", "max ms"], rows,
          "JSON store: submits over one whole compaction cycle (compaction included), "
          f"fsynced journal; snapshot at 10k: {snapshot_mb:.1f} MB")
    ratio = at_10k["per_write"] / at_100["per_write"]
    verdict = "within" if ratio <= 2 else "OVER"
    print(f"JSON store write cost at 10k / at 100 tasks: {ratio:.2f}x ({verdict} issue 8's 2x bound)")
    print(f"JSON store compaction pause at 10k tasks (the slowest write): {at_10k['max'] * 1000:.0f} ms")
    print()


def profile(store, uid, ids):
    now = time.time()
    for name, fn in (("submit with dedupe_key", lambda i: store.submit(
                        uid, "demo", {"prompt": f"p{i}"}, now=now, deadline_at=now + 7200, dedupe_key=f"prof-{i}")),
                     ("get_task", lambda i: store.get_task(ids[i % len(ids)], uid))):
        prof = cProfile.Profile()
        prof.enable()
        for i in range(3000):
            fn(i)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
        print(f"cProfile, 3000 x {name}, by own time:")
        print("\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip()))
        print()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=2000, help="operations per case per round")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--skip-json", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 20 or not 100 <= args.n <= 50_000:
        parser.error("--rounds 1..20, --n 100..50000")
    started = time.perf_counter()
    with temp_dir("store") as tmp:
        store, uid = submit_cases(tmp, args)
        ids = read_and_claim_cases(tmp, store, uid, args)
        active_cases(tmp, args)
        contention_cases(tmp, args)
        if not args.skip_json:
            json_cases(tmp, args)
        if args.profile:
            profile(store, uid, ids)
        store.close()
    print(f"store_bench: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
