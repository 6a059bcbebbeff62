"""A small disk that fills up, under a real server (python app.py with
HOLDFAST_DATA on a tmpfs of a few MB): a cancelled task's files go when it
ends, a full disk is a clear store_unavailable and a 503 /healthz, file
saves that hit it log one line per task, and every accepted task finishes
once there is room again."""

import errno
import hashlib
import logging
import os
import re
import shutil
import subprocess
import time

import pytest
import requests

from providers import build_providers
from store import FileStore
from support import ServerProcess, require, wait_for
from worker import Worker


@pytest.fixture
def small_disk(tmp_path):
    point = tmp_path / "disk"
    point.mkdir()
    mount = shutil.which("mount")
    proc = mount and subprocess.run([mount, "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(point)],
                                    capture_output=True, text=True)
    require(proc and proc.returncode == 0,
            "needs `mount -t tmpfs` (root, CAP_SYS_ADMIN) for a small disk to fill: "
            + (proc.stderr.strip() if proc else "no mount command"))
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill(path):
    """Write `path` until the disk has not one byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)


def start(tmp_path, disk, **env):
    server = ServerProcess(disk / "data", env={"HOLDFAST_THREADS": "8", **env})
    # The log stays off the small disk, or a full disk would eat it.
    server.log_path = str(tmp_path / "server.log")
    return server.start(timeout=30)


def test_a_cancelled_tasks_files_are_gone_once_it_ends(tmp_path, small_disk):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    config = tmp_path / "holdfast.toml"
    config.write_text('[providers.fn]\ntype = "local"\nfunction = "tests.fakes.local:with_pipe"\n')
    server = start(tmp_path, small_disk, HOLDFAST_CONFIG=str(config))
    try:
        auth = {"Authorization": f"Bearer {server.tokens['demo']}"}
        res = requests.post(server.url + "/api/tasks", json={"provider": "fn", "params": {"pipe": str(pipe)}},
                            headers=auth, timeout=10)
        assert res.status_code == 201, res.text
        task_id = res.json()["task"]["id"]
        folder = small_disk / "data" / "files" / task_id
        # The first result is saved; the second waits on the pipe.
        wait_for(lambda: list(folder.glob("*/out_0.png")), 20, "the first result on disk")

        res = requests.post(f"{server.url}/api/tasks/{task_id}/cancel", headers=auth, timeout=10)
        assert res.status_code == 200 and res.json()["task"]["status"] == "cancelled"
        assert not folder.exists(), f"left after cancel: {list(folder.rglob('*'))}"

        # The worker's download finishes after the cancel: its copy is refused
        # and removed, not left on the disk.
        with open(pipe, "wb") as fh:
            fh.write(b"the second result")
        wait_for(lambda: re.search(rf"task {task_id}: .*(cancelled|ended)", server.read_log()), 20,
                 "the worker to learn the task was cancelled")
        assert not folder.exists(), f"left after the worker's save: {list(folder.rglob('*'))}"
        assert "Traceback" not in server.read_log()
    finally:
        try:   # a worker still blocked on the pipe lets go
            os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        server.stop()


def test_a_full_disk_is_a_clear_503_and_every_accepted_task_finishes_once_space_returns(tmp_path, small_disk):
    server = start(tmp_path, small_disk, HOLDFAST_LEASE_S="3")
    filler = small_disk / "filler"
    try:
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {server.tokens['demo']}"

        def submit(n):
            return s.post(server.url + "/api/tasks", timeout=10, json={
                "provider": "demo", "params": {"prompt": f"fox {n} " + "x" * 500, "duration_s": 3}})

        accepted = []
        for n in range(4):
            res = submit(n)
            assert res.status_code == 201, res.text
            accepted.append(res.json()["task"]["id"])
        assert s.get(server.url + "/healthz", timeout=5).status_code == 200

        fill(filler)
        # SQLite may still fit a small write into space its WAL holds: submit
        # until one is refused (each accepted one must finish later too).
        refused = None
        for n in range(4, 200):
            res = submit(n)
            if res.status_code == 201:
                accepted.append(res.json()["task"]["id"])
                continue
            refused = res
            break
        assert refused is not None, "the full disk never refused a submit"
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "store_unavailable", error
        assert "database or disk is full" in error["message"] and "rollback" not in error["message"], error

        health = s.get(server.url + "/healthz", timeout=5)
        assert health.status_code == 503 and health.json()["ok"] is False, health.text
        assert "full" in health.json()["store"], health.text
        # Long enough for the running tasks to reach their downloads and fail.
        time.sleep(5)
        health = s.get(server.url + "/healthz", timeout=5)
        assert health.status_code == 503, "still full, still not ok"

        os.unlink(filler)
        wait_for(lambda: s.get(server.url + "/healthz", timeout=5).status_code == 200, 20, "/healthz ok again")

        def all_finished():
            tasks = [s.get(f"{server.url}/api/tasks/{t}", timeout=5).json()["task"] for t in accepted]
            return tasks if all(t["status"] in ("succeeded", "failed", "cancelled") for t in tasks) else None

        tasks = wait_for(all_finished, 90, "every accepted task to finish")
        assert [t["status"] for t in tasks] == ["succeeded"] * len(accepted), tasks
        for t in tasks:
            assert s.get(server.url + t["files"][0]["url"], timeout=5).status_code == 200
        assert submit(999).status_code == 201
    finally:
        if filler.exists():
            os.unlink(filler)
        server.stop()
    with open(server.log_path, errors="replace") as fh:
        log = fh.read()
    assert "Traceback" not in log, log[-3000:]
    for task_id in accepted:
        lines = [line for line in log.splitlines() if task_id in line and "No space left" in line]
        assert len(lines) <= 1, lines


def test_a_file_save_that_finds_the_disk_full_is_one_line_and_retried_with_backoff(small_disk, sqlite_store,
                                                                                   clock, caplog):
    files = FileStore(str(small_disk / "files"))
    providers = build_providers({"demo": {"duration_s": 1.0, "poll_interval_s": 0.5}})
    worker = Worker(sqlite_store, providers, files, clock=clock, owner="test:1:w")
    uid = sqlite_store.create_user("alice")[0]["id"]
    task_id = sqlite_store.submit(uid, "demo", {"prompt": "fox"}, now=clock(), deadline_at=clock() + 3600)[0]["id"]
    fill(small_disk / "filler")
    caplog.set_level(logging.INFO)
    delays = []
    for _ in range(30):
        worker.run_once(clock())
        task = sqlite_store.get_task(task_id)
        assert task["status"] == "running", task
        if "No space left" in ((task["state"] or {}).get("last_error") or ""):
            delays.append(task["next_poll_at"] - clock())
            if len(delays) == 6:
                break
        clock.now = max(clock() + 0.5, task["next_poll_at"])
    assert delays == sorted(delays) and delays[-1] >= 8 * delays[0], f"no backoff: {delays}"
    assert files.partial_files() == [] and files.task_ids() == [], "nothing half-written is left"

    os.unlink(small_disk / "filler")
    clock.now = task["next_poll_at"]
    worker.run_once(clock())
    task = sqlite_store.get_task(task_id)
    assert task["status"] == "succeeded", task
    with open(files.entry_path(task_id, task["files"][0]), "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == task["files"][0]["sha256"]

    about = [r for r in caplog.records if task_id in r.getMessage() and r.levelno >= logging.INFO]
    full = [r for r in about if "No space left" in r.getMessage()]
    assert len(full) == 1, [r.getMessage() for r in about]
    assert not any(r.exc_info for r in caplog.records), "no traceback"
