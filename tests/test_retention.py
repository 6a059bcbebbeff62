"""Retention: result files after HOLDFAST_KEEP_FILES_H, finished tasks after
HOLDFAST_KEEP_TASKS_D, events after a day, expired sessions; a compact
history that outlives the tasks. Time moves by a test clock."""

import os
import sqlite3

import pytest

import metrics
from store import SqliteStore, history_day
from support import run_until_done
from worker import Worker

HOUR = 3600.0
DAY = 86400.0


def submit(client, token, **params):
    res = client.post("/api/tasks", {"provider": "demo", "params": {"prompt": "fox", **params}}, token=token)
    assert res.status == 201, res
    return res.json()["task"]["id"]


class TestCleanupJob:
    def test_files_go_after_keep_files_h_and_the_task_keeps_its_metadata(self, client, users, worker,
                                                                        clock, files, sqlite_store):
        alice = users["alice"]
        old = run_until_done(worker, clock, client, alice, submit(client, alice))
        clock.advance(71 * HOUR)
        young = run_until_done(worker, clock, client, alice, submit(client, alice))
        old_path = files.entry_path(old["id"], sqlite_store.get_task(old["id"])["files"][0])
        assert os.path.exists(old_path)

        assert worker.cleanup(clock())["files"] == 0, "nothing is 72 hours old yet"
        clock.advance(2 * HOUR)
        before = metrics.RETENTION.value("files")
        done = worker.cleanup(clock())
        assert done["files"] == 1 and metrics.RETENTION.value("files") == before + 1
        assert not os.path.exists(old_path) and not os.path.exists(os.path.join(files.root, old["id"]))
        assert os.path.exists(files.entry_path(young["id"], sqlite_store.get_task(young["id"])["files"][0]))

        task = client.get(f"/api/tasks/{old['id']}", token=alice).json()["task"]
        assert task["files"] == old["files"] and task["version"] == old["version"]
        res = client.get(old["files"][0]["url"], token=alice)
        assert res.status == 404
        err = res.json()["error"]
        assert err["code"] == "file_expired" and "HOLDFAST_KEEP_FILES_H" in err["message"]
        assert client.get(young["files"][0]["url"], token=alice).status == 200
        # Another user still cannot tell the task exists.
        theirs = client.get(old["files"][0]["url"], token=users["bob"])
        assert theirs.status == 404 and theirs.json()["error"]["code"] == "task_not_found"
        assert worker.cleanup(clock())["files"] == 0, "each task's files are expired once"

    def test_finished_tasks_go_after_keep_tasks_d_with_their_events_and_the_ledger_stays(
            self, client, users, worker, clock, files, sqlite_store, providers):
        user, token = sqlite_store.create_user("carol", credits=10)
        providers["demo"].config["cost"] = 2
        done = run_until_done(worker, clock, client, token, submit(client, token))
        cancelled = submit(client, token)
        assert client.post(f"/api/tasks/{cancelled}/cancel", token=token).status == 200
        active = submit(client, token, duration_s=600)   # still running a month on: it stays
        worker.run_once(clock())
        ledger_before = sqlite_store.ledger(user_id=user["id"])
        history_before = sqlite_store.history()
        assert {(h["outcome"], h["tasks"]) for h in history_before} == {("succeeded", 1), ("cancelled", 1)}

        clock.advance(29 * DAY)
        assert worker.cleanup(clock())["tasks"] == 0
        clock.advance(1 * DAY + 60)
        result = worker.cleanup(clock())
        assert result["tasks"] == 2
        for task_id in (done["id"], cancelled):
            res = client.get(f"/api/tasks/{task_id}", token=token)
            assert res.status == 404 and res.json()["error"]["code"] == "task_not_found"
            assert sqlite_store.task_events(task_id) == []
            assert not os.path.exists(os.path.join(files.root, task_id))
        assert client.get(f"/api/tasks/{active}", token=token).json()["task"]["status"] == "running"
        assert sqlite_store.ledger(user_id=user["id"]) == ledger_before
        assert sqlite_store.history() == history_before

    def test_events_go_after_a_day_but_seqs_are_never_reused(self, client, users, worker, clock, sqlite_store):
        alice = users["alice"]
        submit(client, alice)
        submit(client, alice)
        newest = sqlite_store.last_seq()
        clock.advance(DAY + 1)
        assert worker.cleanup(clock())["events"] == newest - 1
        assert sqlite_store.last_seq() == newest, "the newest event stays, so seqs keep growing"
        submit(client, alice)
        assert sqlite_store.last_seq() == newest + 1
        assert [seq for seq, _ in sqlite_store.events_since(1, 0)] == [newest, newest + 1]

    def test_expired_sessions_are_purged(self, client, users, worker, clock, sqlite_store):
        alice = users["alice"]
        assert client.request("PUT", "/api/sessions/chat-1", json_body={"messages": []}, token=alice).status == 200
        clock.advance(7200 + 1)
        bob = users["bob"]   # (alice's next new session would clear her expired ones itself)
        assert client.request("PUT", "/api/sessions/chat-2", json_body={"messages": []}, token=bob).status == 200
        assert worker.cleanup(clock())["sessions"] == 1
        assert client.get("/api/sessions/chat-2", token=bob).status == 200

    def test_the_settings_come_from_the_config_and_the_job_is_scheduled(self, sqlite_store, providers, files,
                                                                        clock):
        from config import Config
        config = Config.load(env={"HOLDFAST_KEEP_FILES_H": "1", "HOLDFAST_KEEP_TASKS_D": "2",
                                  "HOLDFAST_CONFIG": os.devnull})
        assert (config.keep_files_h, config.keep_tasks_d) == (1.0, 2.0)
        w = Worker(sqlite_store, providers, files, clock=clock, keep_files_h=config.keep_files_h,
                   keep_tasks_d=config.keep_tasks_d, cleanup_s=60)
        assert (w.keep_files_s, w.keep_tasks_s) == (HOUR, 2 * DAY)
        w.start()
        try:
            job = w.scheduler.get_job("cleanup")
            assert job is not None and job.trigger.interval.total_seconds() == 60
        finally:
            w.stop()


class TestRetentionStore:
    """The store methods on every backend."""

    def _finished(self, store, user_id, now, status="succeeded", took=10.0, files=True):
        task, _ = store.submit(user_id, "demo", {}, now=now - took, deadline_at=now + 1e6)
        [held] = store.claim("t:1:x", now=now - took, limit=1, lease_s=60)
        store.update(task["id"], token=held["lease_token"], now=now - took, status="running")
        changes = {"files": [{"name": "a.png", "size": 1, "sha256": "x", "content_type": "image/png"}]} \
            if files and status == "succeeded" else {}
        if status == "failed":
            changes["error"] = {"code": "timeout", "message": "late"}
        store.update(task["id"], token=held["lease_token"], now=now, status=status, **changes)
        return task["id"]

    def test_history_counts_and_durations_per_provider_day_and_outcome(self, store):
        uid = store.create_user("alice")[0]["id"]
        day1 = 1_800_000_000.0
        self._finished(store, uid, day1, took=10)
        self._finished(store, uid, day1 + 60, took=30)
        self._finished(store, uid, day1 + 120, status="failed", took=5)
        self._finished(store, uid, day1 + DAY, took=1)
        rows = {(r["day"], r["outcome"]): r for r in store.history()}
        d1, d2 = history_day(day1), history_day(day1 + DAY)
        assert set(rows) == {(d1, "succeeded"), (d1, "failed"), (d2, "succeeded")}
        assert rows[(d1, "succeeded")]["tasks"] == 2
        assert rows[(d1, "succeeded")]["total_s"] == pytest.approx(40)
        assert rows[(d1, "succeeded")]["max_s"] == pytest.approx(30)
        assert rows[(d1, "failed")]["tasks"] == 1
        assert [r["day"] for r in store.history(since_day=d2)] == [d2]
        assert store.history(provider="other") == []

    def test_old_files_listed_once_marked_and_tasks_deleted_without_their_ledger(self, store):
        uid = store.create_user("alice", credits=5)[0]["id"]
        t0 = 1_800_000_000.0
        old = self._finished(store, uid, t0)
        no_files = self._finished(store, uid, t0, status="failed")
        new = self._finished(store, uid, t0 + 100)
        assert store.tasks_with_old_files(before=t0 + 50, limit=10) == [old]
        assert store.mark_files_expired([old], now=t0 + 50) == 1
        assert store.mark_files_expired([old], now=t0 + 60) == 0
        assert store.files_expired_at(old) == t0 + 50 and store.files_expired_at(new) is None
        assert store.tasks_with_old_files(before=t0 + 200, limit=10) == [new]

        assert sorted(store.finished_before(before=t0 + 50, limit=10)) == sorted([old, no_files])
        ledger = store.ledger(user_id=uid)
        events_of_new = store.task_events(new)
        deleted, events = store.delete_finished([old, no_files, new], before=t0 + 50)
        assert deleted == 2 and events >= 6
        assert store.files_expired_at(old) is None
        for gone in (old, no_files):
            assert store.task_events(gone) == []
        assert store.get_task(new)["id"] == new and store.task_events(new) == events_of_new
        assert store.ledger(user_id=uid) == ledger
        assert store.delete_finished([], before=t0) == (0, 0)

    def test_purge_events_keeps_the_newest(self, store):
        uid = store.create_user("alice")[0]["id"]
        for i in range(3):
            store.submit(uid, "demo", {}, now=100.0 + i, deadline_at=1e9)
        last = store.last_seq()
        assert store.purge_events(before=1000.0) == 2
        assert store.last_seq() == last
        store.submit(uid, "demo", {}, now=200.0, deadline_at=1e9)
        assert store.last_seq() == last + 1

    def test_active_tasks_are_never_listed_for_deletion(self, store):
        uid = store.create_user("alice")[0]["id"]
        task, _ = store.submit(uid, "demo", {}, now=1.0, deadline_at=1e10)
        assert store.finished_before(before=1e10, limit=10) == []
        assert store.delete_finished([task["id"]], before=1e10) == (0, 0)
        assert store.get_task(task["id"])["status"] == "queued"


def test_migrating_an_old_database_fills_the_history_from_its_finished_tasks(tmp_path):
    """A version-1 database (as it was before retention) migrates to one
    whose history already counts the tasks that had finished."""
    path = str(tmp_path / "holdfast.db")
    s = SqliteStore(path)
    uid = s.create_user("alice")[0]["id"]
    helper = TestRetentionStore()
    for i, status in enumerate(("succeeded", "succeeded", "failed", "cancelled")):
        if status == "cancelled":
            task, _ = s.submit(uid, "demo", {}, now=1_800_000_000.0, deadline_at=1e10)
            s.cancel(task["id"], uid, now=1_800_000_000.0 + 7)
        else:
            helper._finished(s, uid, 1_800_000_000.0 + i, status=status, took=3.0 + i)
    expected = s.history()
    s.close()
    con = sqlite3.connect(path)
    con.executescript("DROP TABLE task_history; DROP TABLE file_expiry; DROP INDEX tasks_finished; "
                      "DROP INDEX tasks_status_provider; DROP TABLE heartbeats; DROP INDEX tasks_retry_once; "
                      "DELETE FROM schema_version WHERE version > 1;")
    con.close()
    s = SqliteStore(path)
    try:
        assert s.schema_version() >= 2 and s.last_backup
        assert s.history() == expected and sum(r["tasks"] for r in expected) == 4
    finally:
        s.close()


def test_files_another_process_removed_meanwhile_are_not_an_error(files, monkeypatch):
    from store import new_task_id
    task_id = new_task_id()
    files.save(task_id, "a.png", [b"x"], max_bytes=10)
    listdir = os.listdir
    # As if another cleanup deleted gone.png between our listing and our unlink.
    monkeypatch.setattr(os, "listdir", lambda path: listdir(path) + ["gone.png"])
    files.remove_task(task_id)
    files.remove_task(task_id)
    assert not os.path.exists(os.path.join(files.root, task_id))
