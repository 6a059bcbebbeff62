"""The started worker keeps its pool fed: a backlog is claimed batch after
batch as the pool drains, not one batch per scheduler tick."""

import time

from providers import build_providers
from worker import Worker


def test_the_pool_asks_for_the_next_batch_as_it_drains(sqlite_store, files):
    providers = build_providers({"demo": {"duration_s": 600}})
    user = sqlite_store.create_user("alice")[0]
    now = time.time()
    ids = [sqlite_store.submit(user["id"], "demo", {"prompt": str(i)}, now=now, deadline_at=now + 3600)[0]["id"]
           for i in range(60)]
    # An hour between ticks: only the pool's own refills can move the backlog.
    worker = Worker(sqlite_store, providers, files, threads=2, tick_s=3600, sweep_s=3600)
    worker.start()
    try:
        worker.wake()
        deadline = time.time() + 30
        while time.time() < deadline:
            submitted = sum(1 for i in ids if sqlite_store.get_task(i)["status"] == "running")
            if submitted == len(ids):
                break
            time.sleep(0.05)
    finally:
        worker.stop()
    assert submitted == len(ids), f"only {submitted} of {len(ids)} submitted without a tick"


class _StopsDuringClaim:
    """The store, except that the worker is stopped (as SIGTERM does in
    app.serve) right after a claim returns: stop() races a tick."""

    def __init__(self, store):
        self.store = store
        self.worker = None

    def __getattr__(self, name):
        return getattr(self.store, name)

    def claim(self, *args, **kwargs):
        tasks = self.store.claim(*args, **kwargs)
        self.worker.stop(wait=False)
        return tasks


def _queued(store, n):
    user = store.create_user("alice")[0]
    now = time.time()
    return [store.submit(user["id"], "demo", {"prompt": str(i)}, now=now, deadline_at=now + 3600)[0]["id"]
            for i in range(n)]


def test_a_stop_racing_a_tick_hands_nothing_to_the_gone_pool(sqlite_store, files):
    ids = _queued(sqlite_store, 3)
    store = _StopsDuringClaim(sqlite_store)
    worker = Worker(store, build_providers({"demo": {"duration_s": 600}}), files,
                    tick_s=3600, sweep_s=3600)
    store.worker = worker
    worker.start()
    assert worker.dispatch() == 0
    assert worker._inflight == 0 and worker._held == {}
    # The claimed tasks stay with their leases, for recovery or another worker.
    assert all(sqlite_store.get_task(i)["status"] == "queued" for i in ids)


def test_a_stopped_worker_claims_nothing(sqlite_store, files):
    ids = _queued(sqlite_store, 2)
    worker = Worker(sqlite_store, build_providers({"demo": {}}), files, tick_s=3600, sweep_s=3600)
    worker.start()
    worker.stop()
    assert worker.dispatch() == 0
    assert sqlite_store.claim("someone-else", now=time.time(), limit=10, lease_s=60)
    assert {t["id"] for t in sqlite_store.claim("x", now=time.time() + 120, limit=10, lease_s=60)} == set(ids)



def test_the_sweepers_lease_queries_read_only_active_rows(sqlite_store):
    """lease_owners() and the expired-lease queries run every few seconds:
    they search the status index instead of scanning a million finished rows."""
    statements = []
    conn = sqlite_store.db.connection()
    conn.set_trace_callback(statements.append)
    try:
        sqlite_store.lease_owners()
        sqlite_store.expired_leases(now=1.0)
        sqlite_store.release_leases(["gone:1"])
        sqlite_store.release_expired_leases(now=1.0)
    finally:
        conn.set_trace_callback(None)
    queries = [s for s in statements if "lease_owner" in s and not s.startswith("EXPLAIN")]
    assert len(queries) == 4, statements
    for sql in queries:
        plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql))
        assert "USING INDEX" in plan and "SCAN tasks" not in plan, (sql, plan)
