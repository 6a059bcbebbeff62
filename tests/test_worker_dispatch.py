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
