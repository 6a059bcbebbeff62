"""GET /healthz: no token, the queue's depth and age on a test clock, and 503
when the store cannot answer or the worker's scheduler has stopped."""

import os
import shutil

import pytest

from api import create_app
from store import SqliteStore
from support import WSGIClient, query_plans
from worker import Worker


@pytest.fixture
def started(sqlite_store, providers, files, clock):
    """A started worker whose ticks never come during a test: the scheduler
    runs, the queue moves only when the test moves it."""
    worker = Worker(sqlite_store, providers, files, clock=clock, owner="test:1:w", tick_s=3600,
                    sweep_s=3600, cleanup_s=3600)
    worker.start()
    yield worker
    worker.stop()


def health(app):
    res = WSGIClient(app).get("/healthz")
    return res.status, res.json()


def test_queue_depth_and_oldest_active_follow_the_tasks(sqlite_store, providers, config, files, clock, started):
    app = create_app(sqlite_store, providers, config, worker=started, files=files, clock=clock)
    user = sqlite_store.create_user("alice")[0]
    status, body = health(app)
    assert status == 200
    assert body["ok"] is True and body["store"] == "sqlite" and body["scheduler"] == "running"
    assert body["queue_depth"] == 0 and body["oldest_active_s"] == 0

    # Through the store, not the API: a submission wakes the worker.
    def submit():
        now = clock()
        return sqlite_store.submit(user["id"], "demo", {"prompt": "p", "duration_s": 600}, now=now,
                                   deadline_at=now + 3600)[0]["id"]

    def cancel(task_id):
        sqlite_store.cancel(task_id, user["id"], now=clock())

    start = clock()
    a = submit()
    clock.advance(10)
    b = submit()
    assert started.run_once(clock()) == 2     # a and b: running, not queued
    cancel(a)
    clock.advance(10)
    c = submit()
    clock.advance(10)
    submit()
    clock.now = start + 100
    status, body = health(app)
    assert status == 200 and body["ok"] is True
    # Queued: c and d. Active the longest: b, for 90 s (a was cancelled).
    assert body["queue_depth"] == 2 and body["oldest_active_s"] == pytest.approx(90)
    cancel(b)
    cancel(c)
    status, body = health(app)
    assert body["queue_depth"] == 1 and body["oldest_active_s"] == pytest.approx(70)


def test_a_store_that_cannot_answer_is_503(tmp_path, providers, config, files, clock):
    folder = tmp_path / "db"
    store = SqliteStore(str(folder / "holdfast.db"))
    try:
        app = create_app(store, providers, config, files=files, clock=clock)
        assert health(app)[0] == 200
        # The disk went away: the next connection cannot open the file.
        store.close()
        shutil.rmtree(folder)
        status, body = health(app)
        assert status == 503
        assert body["ok"] is False and body["store"].startswith("sqlite (")
        assert body["queue_depth"] is None and body["oldest_active_s"] is None
    finally:
        store.close()


def test_a_stopped_scheduler_is_503(sqlite_store, providers, config, files, clock, started):
    app = create_app(sqlite_store, providers, config, worker=started, files=files, clock=clock)
    status, body = health(app)
    assert status == 200 and body["ok"] is True and body["scheduler"] == "running"
    started.stop()
    status, body = health(app)
    assert status == 503
    assert body["ok"] is False and body["scheduler"] == "stopped"
    assert body["store"] == "sqlite" and body["queue_depth"] == 0


def test_health_reads_only_active_tasks(sqlite_store):
    """A load balancer asks every few seconds: the queries search the
    status index, and a million finished rows cost them nothing."""
    plans = query_plans(sqlite_store, lambda: sqlite_store.stats(0))
    assert len(plans) == 2, plans
    for sql, plan in plans:
        assert plan.startswith("SEARCH tasks USING") and "SCAN" not in plan, (sql, plan)


def test_a_failed_write_makes_healthz_503_until_a_write_commits_again(tmp_path, providers, config):
    from store import JsonStore
    store = JsonStore(str(tmp_path / "json"))
    try:
        app = create_app(store, providers, config)
        client = WSGIClient(app, store.create_user("alice")[1])
        assert health(app)[0] == 200
        # The journal refuses every byte, as a full disk would.
        journal, store._journal = store._journal, open(os.devnull, "rb", buffering=0)
        res = client.post("/api/tasks", {"provider": "demo", "params": {}})
        assert res.status == 503 and res.json()["error"]["code"] == "store_unavailable", res
        assert "cannot write the JSON journal" in res.json()["error"]["message"]
        status, body = health(app)
        assert status == 503 and body["ok"] is False and "writes are failing" in body["store"], body
        assert health(app)[0] == 503, "reads still work; it stays 503 while writes fail"

        store._journal.close()
        store._journal = journal
        assert client.post("/api/tasks", {"provider": "demo", "params": {}}).status == 201
        assert health(app)[0] == 200
    finally:
        store.close()
