"""Result files are fenced like rows (DESIGN guarantee 3): a worker that lost
its lease cannot change a committed file; copies nobody lists are removed
when their task ends, by retention, and by recover.py --audit --fix, which
also checks every stored file's sha256 (or a sample it names)."""

import hashlib
import json
import os
import threading

import pytest

from providers import build_providers
from store import FileStore, SqliteStore, lease_dir
from support import wait_for
from test_recover import run_recover
from tests.fakes import local as local_fns
from worker import Worker

T0 = 1_800_000_000.0


def read(files, task_id, meta):
    with open(files.entry_path(task_id, meta), "rb") as fh:
        return fh.read()


def test_a_worker_that_lost_its_lease_cannot_change_the_bytes_of_a_committed_file(sqlite_store, files,
                                                                                   clock, tmp_path):
    providers = build_providers({"fn": {"type": "local", "function": f"{local_fns.__name__}:held_first",
                                        "retries": 3}})
    uid = sqlite_store.create_user("alice")[0]["id"]
    params = {name: str(tmp_path / name) for name in ("counter", "gate", "started")}
    task_id = sqlite_store.submit(uid, "fn", params, now=clock(), deadline_at=clock() + 3600)[0]["id"]
    stale = Worker(sqlite_store, providers, files, clock=clock, owner="test:1:stale", lease_s=30)
    fresh = Worker(sqlite_store, providers, files, clock=clock, owner="test:2:fresh", lease_s=30)

    # The stale worker claims the task in a thread of its own and is held
    # inside the function (a process stopped, a long GC pause)...
    thread = threading.Thread(target=stale.run_once, args=(clock(),), daemon=True)
    thread.start()
    wait_for(lambda: os.path.exists(params["started"]), what="the first run to start")
    # ...its lease runs out, and another worker takes the task over and
    # finishes it.
    clock.advance(31)
    for _ in range(5):
        fresh.run_once(clock())
        done = sqlite_store.get_task(task_id)
        if done["status"] == "succeeded":
            break
        clock.advance(1)
    assert done["status"] == "succeeded", done
    [meta] = done["files"]
    committed = read(files, task_id, meta)
    assert hashlib.sha256(committed).hexdigest() == meta["sha256"]

    # The stale worker wakes, saves its own bytes and tries to publish them last.
    with open(params["gate"], "w"):
        pass
    thread.join(15)
    assert not thread.is_alive()
    with open(params["counter"]) as fh:
        assert fh.read() == "2", "both workers ran the function"

    after = sqlite_store.get_task(task_id)
    assert after["files"] == done["files"] and after["version"] == done["version"]
    body = read(files, task_id, meta)
    assert body == committed and hashlib.sha256(body).hexdigest() == meta["sha256"]
    # The refused copy was removed by the worker that wrote it.
    assert os.listdir(os.path.join(files.root, task_id)) == [meta["dir"]]
    assert files.partial_files() == []


def test_the_store_refuses_files_from_another_leases_folder(sqlite_store, files, clock):
    uid = sqlite_store.create_user("alice")[0]["id"]
    task = sqlite_store.submit(uid, "demo", {}, now=clock(), deadline_at=clock() + 3600)[0]
    held = sqlite_store.claim_task(task["id"], "test:1:x", now=clock(), lease_s=60)
    sqlite_store.update(task["id"], token=held["lease_token"], now=clock(), status="running")
    other = files.save(task["id"], "out_0.png", [b"x"], max_bytes=10, scope=lease_dir(held["lease_token"] + 1))
    with pytest.raises(ValueError):
        sqlite_store.update(task["id"], token=held["lease_token"], now=clock(), status="succeeded",
                            files=[other])
    assert sqlite_store.get_task(task["id"])["files"] == []


def test_files_written_before_lease_folders_are_still_served(client, users, sqlite_store, files, clock):
    uid = sqlite_store.user_by_name("alice")["id"]
    task = sqlite_store.submit(uid, "demo", {}, now=clock(), deadline_at=clock() + 3600)[0]
    held = sqlite_store.claim_task(task["id"], "test:1:x", now=clock(), lease_s=60)
    legacy = files.save(task["id"], "out_0.png", [b"old bytes"], max_bytes=100)
    assert "dir" not in legacy
    sqlite_store.update(task["id"], token=held["lease_token"], now=clock(), status="running")
    sqlite_store.update(task["id"], token=held["lease_token"], now=clock(), status="succeeded", files=[legacy])
    res = client.get(f"/api/tasks/{task['id']}/files/out_0.png", token=users["alice"])
    assert res.status == 200 and res.body == b"old bytes"
    listed = client.get(f"/api/tasks/{task['id']}", token=users["alice"]).json()["task"]["files"]
    assert "dir" not in listed[0]


# -- files of tasks that end without them --------------------------------------------

def running_with_files(store, files, clock, user_id="alice"):
    """A running task whose worker saved a file in its lease's folder and
    has not published it yet."""
    uid = store.user_by_name(user_id)["id"] if isinstance(user_id, str) else user_id
    task = store.submit(uid, "demo", {}, now=clock(), deadline_at=clock() + 60)[0]
    held = store.claim_task(task["id"], "test:9:gone", now=clock(), lease_s=60)
    store.update(task["id"], token=held["lease_token"], now=clock(), status="running")
    files.save(task["id"], "out_0.png", [b"half a result"], max_bytes=100, scope=lease_dir(held["lease_token"]))
    return task["id"]


def test_cancelling_a_task_removes_its_files_at_once(client, users, sqlite_store, files, clock):
    task_id = running_with_files(sqlite_store, files, clock)
    assert os.path.isdir(os.path.join(files.root, task_id))
    res = client.post(f"/api/tasks/{task_id}/cancel", token=users["alice"])
    assert res.status == 200 and res.json()["task"]["status"] == "cancelled"
    assert not os.path.exists(os.path.join(files.root, task_id))


def test_a_task_failed_past_its_deadline_loses_its_files(users, sqlite_store, files, clock, worker):
    task_id = running_with_files(sqlite_store, files, clock)
    clock.advance(61)
    assert worker.sweep(clock()) == 1
    assert sqlite_store.get_task(task_id)["error"]["code"] == "timeout"
    assert not os.path.exists(os.path.join(files.root, task_id))


def test_a_task_the_worker_fails_loses_the_copies_an_earlier_lease_left(users, sqlite_store, files, clock, worker):
    uid = sqlite_store.user_by_name("alice")["id"]
    task = sqlite_store.submit(uid, "demo", {"fail": True, "duration_s": 1}, now=clock(),
                               deadline_at=clock() + 600)[0]
    # A worker saved a copy under its lease, then died.
    held = sqlite_store.claim_task(task["id"], "test:9:gone", now=clock(), lease_s=5)
    files.save(task["id"], "out_0.png", [b"x"], max_bytes=100, scope=lease_dir(held["lease_token"]))
    clock.advance(6)
    for _ in range(10):
        worker.run_once(clock())
        if sqlite_store.get_task(task["id"])["status"] == "failed":
            break
        clock.advance(1)
    assert sqlite_store.get_task(task["id"])["status"] == "failed"
    assert not os.path.exists(os.path.join(files.root, task["id"]))


def test_retention_removes_copies_no_finished_task_lists(users, sqlite_store, files, clock, worker):
    # A task cancelled while its worker was saving (the worker then died),
    # and a succeeded task with a stale lease's copy beside its own.
    cancelled = running_with_files(sqlite_store, files, clock)
    sqlite_store.cancel(cancelled, sqlite_store.user_by_name("alice")["id"], now=clock())
    succeeded = running_with_files(sqlite_store, files, clock)
    held = sqlite_store.claim_task(succeeded, "test:1:x", now=clock() + 61, lease_s=60)
    meta = files.save(succeeded, "out_0.png", [b"the result"], max_bytes=100, scope=lease_dir(held["lease_token"]))
    sqlite_store.update(succeeded, token=held["lease_token"], now=clock() + 61, status="succeeded", files=[meta])
    stale_copy = os.path.join(files.root, succeeded, lease_dir(held["lease_token"] - 1))
    assert os.path.isdir(stale_copy)
    active = running_with_files(sqlite_store, files, clock)

    done = worker.cleanup(clock() + 62)
    assert done["copies"] == 2
    assert not os.path.exists(os.path.join(files.root, cancelled)) and not os.path.exists(stale_copy)
    assert read(files, succeeded, meta) == b"the result"
    assert os.listdir(os.path.join(files.root, active)), "an active task's download is left alone"


# -- the audit ----------------------------------------------------------------------

@pytest.fixture
def published(tmp_path):
    """A data directory with three succeeded tasks whose files are in their
    leases' folders; returns (dir, [(task_id, meta)])."""
    store = SqliteStore(str(tmp_path / "holdfast.db"))
    files = FileStore(str(tmp_path / "files"))
    out = []
    try:
        uid = store.create_user("alice")[0]["id"]
        for i in range(3):
            task = store.submit(uid, "demo", {}, now=T0, deadline_at=T0 + 1e6)[0]
            held = store.claim_task(task["id"], "test:1:x", now=T0, lease_s=60)
            meta = files.save(task["id"], "out_0.png", [b"result %d" % i], max_bytes=100,
                              scope=lease_dir(held["lease_token"]))
            store.update(task["id"], token=held["lease_token"], now=T0, status="running")
            store.update(task["id"], token=held["lease_token"], now=T0, status="succeeded", files=[meta])
            out.append((task["id"], meta))
    finally:
        store.close()
    return tmp_path, out


def audit(data_dir, *args):
    proc = run_recover(data_dir, "--audit", "--json", *args)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_audit_reports_a_file_whose_bytes_do_not_match_its_sha256(published):
    data_dir, tasks = published
    files = FileStore(str(data_dir / "files"))
    task_id, meta = tasks[1]
    with open(files.entry_path(task_id, meta), "r+b") as fh:
        fh.write(b"RESULT")          # same size, other bytes
    code, report = audit(data_dir)
    assert code == 1
    assert report["tasks_missing_files"] == []
    assert [(m["task_id"], m["name"], m["expected"]) for m in report["sha256_mismatches"]] == [
        (task_id, "out_0.png", meta["sha256"])]
    assert report["sha256_checked"] == {"files": 3, "of": 3, "sample": None}

    proc = run_recover(data_dir, "--audit")
    assert proc.returncode == 1
    assert (f"1 file(s) whose bytes do not match their sha256 ({task_id}/out_0.png)"
            " (checked of all 3 stored file(s))") in proc.stdout


def test_audit_sample_checks_and_names_n_files(published):
    data_dir, tasks = published
    code, report = audit(data_dir, "--sample", "2")
    assert code == 0 and report["found"] == 0
    sample = report["sha256_checked"]["sample"]
    assert report["sha256_checked"]["files"] == 2 and report["sha256_checked"]["of"] == 3
    assert len(sample) == 2 and set(sample) <= {f"{t}/out_0.png" for t, _ in tasks}
    proc = run_recover(data_dir, "--audit", "--sample", "2")
    assert proc.returncode == 0
    assert "a random sample of 2 of 3 stored file(s): " in proc.stdout
    named = proc.stdout.split("stored file(s): ")[1].split(")")[0].split(", ")
    assert len(named) == 2 and set(named) <= {f"{t}/out_0.png" for t, _ in tasks}
    assert run_recover(data_dir, "--audit", "--sample", "0").returncode == 2


def test_audit_reports_an_orphan_copy_and_fix_removes_only_it(published):
    data_dir, tasks = published
    files = FileStore(str(data_dir / "files"))
    task_id, meta = tasks[0]
    # A lease that lost the task wrote a copy and died before removing it.
    orphan = files.save(task_id, "out_0.png", [b"stale bytes"], max_bytes=100, scope=lease_dir(99))
    code, report = audit(data_dir)
    assert code == 1
    assert report["unlisted_files"] == [{"task_id": task_id, "status": "succeeded", "entries": ["_lease99"]}]
    assert os.path.exists(files.entry_path(task_id, orphan)), "an audit without --fix changes nothing"

    code, report = audit(data_dir, "--fix")
    assert code == 0 and report["unlisted_deleted"] == [task_id] and report["unfixed"] == 0
    assert not os.path.exists(files.entry_path(task_id, orphan))
    assert read(files, task_id, meta) == b"result 0"
    code, report = audit(data_dir)
    assert code == 0 and report["unlisted_files"] == []


def test_audit_reports_the_files_of_a_failed_task(tmp_path):
    store = SqliteStore(str(tmp_path / "holdfast.db"))
    files = FileStore(str(tmp_path / "files"))
    try:
        uid = store.create_user("alice")[0]["id"]
        task = store.submit(uid, "demo", {}, now=T0, deadline_at=T0 + 1e6)[0]
        held = store.claim_task(task["id"], "test:1:x", now=T0, lease_s=60)
        files.save(task["id"], "out_0.png", [b"x"], max_bytes=100, scope=lease_dir(held["lease_token"]))
        # Ended by a version without this cleanup, or by hand: the files stayed.
        with store._seam(), store._write():
            store._exec("UPDATE tasks SET status = 'failed', finished_at = ?, lease_owner = NULL, "
                        "error = '{\"code\": \"internal\", \"message\": \"x\"}' WHERE id = ?", (T0, task["id"]))
    finally:
        store.close()
    code, report = audit(tmp_path)
    assert code == 1
    assert report["unlisted_files"] == [{"task_id": task["id"], "status": "failed",
                                         "entries": [lease_dir(held["lease_token"])]}]
    code, report = audit(tmp_path, "--fix")
    assert code == 0 and not os.path.exists(tmp_path / "files" / task["id"])


def test_a_save_makes_its_folders_with_one_mkdir_each_and_the_root_again_if_it_went(tmp_path, monkeypatch):
    """Each look at the disk is a system call and a handover of the GIL:
    a save makes the task's folder and its lease's with a mkdir each, and
    looks at no parent first; a folder for files that went away is made
    again."""
    files = FileStore(str(tmp_path / "files"))
    task_id = "t_" + "0" * 26
    calls = []
    for name in ("mkdir", "stat"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    first = files.save(task_id, "a.png", [b"ab"], max_bytes=10, scope=lease_dir(1))
    assert calls == ["mkdir", "mkdir"]
    calls.clear()
    second = files.save(task_id, "b.png", [b"cd"], max_bytes=10, scope=lease_dir(1))
    assert calls == ["mkdir", "mkdir"]
    assert [read(files, task_id, m) for m in (first, second)] == [b"ab", b"cd"]
    monkeypatch.undo()
    files.remove_task(task_id)
    os.rmdir(files.root)
    third = files.save(task_id, "c.png", [b"ef"], max_bytes=10, scope=lease_dir(2))
    assert read(files, task_id, third) == b"ef" and third["dir"] == lease_dir(2)
    assert sorted(os.listdir(os.path.join(files.root, task_id))) == [lease_dir(2)]
