"""A real server killed with SIGKILL while tasks run, then started again on
the same data directory: every accepted task ends, exactly once, and after
every kill the result files are whole and none is left that no task lists.

Where the servers keep their files is the `result_files` fixture: on disk
here; tests/test_suites_on_s3.py runs these tests again with a bucket.
"""

import collections
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

from store import TERMINAL, FileStore, SqliteStore, open_store
from support import ROOT, ServerProcess, api, submit_until
from tests.fakes.comfyui import FakeComfyUI


LEASE_DIR = re.compile(r"^_lease([0-9]+)$")


class LocalFiles:
    """Result files on the server's disk, under HOLDFAST_DATA/files: how
    the servers are told (`env`), how the tests read them back, and how
    many kill rounds each test runs."""

    kill_rounds = 2         # test_kill_9_mid_run_loses_and_repeats_nothing
    random_rounds = 10      # test_crash_suite_random_kills

    def env(self):
        return {}

    def store(self, data_dir):
        return FileStore(str(data_dir / "files"), create=False)

    def stored(self, data_dir):
        """{(task id, path inside the task's folder)} of every whole file."""
        root, found = str(data_dir / "files"), set()
        for folder, _, names in os.walk(root):
            for name in names:
                if not name.endswith(".part"):
                    task_id, *rest = os.path.relpath(os.path.join(folder, name), root).split(os.sep)
                    found.add((task_id, "/".join(rest)))
        return found

    def partial(self, data_dir):
        """What a write cut short left (temporary files, open uploads)."""
        return self.store(data_dir).partial_files()


@pytest.fixture
def result_files():
    return LocalFiles()


def check_files(result_files, data_dir, store, why, *, settled):
    """What must hold of the result files after any kill, as the store
    (a copy of it as the kill left it) says: a finished task's listed files
    are all there with the sha256 it recorded; every stored file is one a
    finished task lists, or lies in a lease folder (one of the task's own
    leases) of a task not finished yet, a copy in flight that the end of
    its task removes. `settled`: every task has ended since the last
    restart, so nothing may be in flight and no write left half done."""
    files = result_files.store(data_dir)
    tasks = {t["id"]: store.get_task(t["id"]) for t in store.export_rows()["tasks"]}
    listed = set()
    for task_id, task in tasks.items():
        for meta in task["files"] or ():
            assert task["status"] in TERMINAL, f"{why} {task_id} lists files while {task['status']}"
            assert files.sha256_of(task_id, meta) == meta["sha256"], f"{why} {task_id}: {meta} is not whole"
            listed.add((task_id, f"{meta['dir']}/{meta['name']}" if meta.get("dir") else meta["name"]))
    for task_id, path in result_files.stored(data_dir) - listed:
        task = tasks.get(task_id)
        assert task is not None, f"{why} {task_id}/{path}: a file of a task the store does not know"
        lease = LEASE_DIR.match(path.partition("/")[0])
        in_flight = task["status"] not in TERMINAL and lease and int(lease.group(1)) <= task["lease_token"]
        assert in_flight and not settled, f"{why} {task_id}/{path} ({task['status']}): listed by no task"
    if settled:
        assert result_files.partial(data_dir) == [], f"{why} writes left half done"


def wait_all_terminal(session, url, ids, timeout=40):
    deadline = time.time() + timeout
    tasks = {}
    while time.time() < deadline:
        tasks = {i: session.get(f"{url}/api/tasks/{i}", timeout=10).json()["task"] for i in ids}
        if all(t["status"] in ("succeeded", "partial", "failed", "cancelled") for t in tasks.values()):
            return tasks
        time.sleep(0.25)
    stuck = {i: (t["status"], t["step"]) for i, t in tasks.items() if t["status"] in ("queued", "running")}
    raise AssertionError(f"tasks stuck after restart: {stuck}")


def test_kill_9_mid_run_loses_and_repeats_nothing(tmp_path, result_files):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    env = result_files.env()
    server = ServerProcess(tmp_path, env=env).start()
    token = server.tokens["demo"]
    session = api(server, token)
    accepted = []
    try:
        for round_no in range(result_files.kill_rounds):
            for i in range(12):
                res = session.post(server.url + "/api/tasks", timeout=10, json={
                    "provider": "demo",
                    "params": {"prompt": f"r{round_no}-{i}", "duration_s": rng.choice([0.5, 1.0, 1.5]),
                               **({"fail": True} if i % 5 == 4 else {})}})
                assert res.status_code == 201, res.text
                accepted.append(res.json()["task"]["id"])
            time.sleep(rng.uniform(0.3, 1.2))
            server.kill()
            copied = SqliteStore(str(copy_store(tmp_path, tmp_path / f"after-kill-{round_no}") / "holdfast.db"))
            try:
                check_files(result_files, tmp_path, copied, f"seed {seed}, after kill {round_no}:", settled=False)
            finally:
                copied.close()
            server = ServerProcess(tmp_path, env=env, port=server.port).start()
        tasks = wait_all_terminal(session, server.url, accepted)
    finally:
        server.stop()

    store = SqliteStore(str(tmp_path / "holdfast.db"))
    try:
        for task_id, task in tasks.items():
            finished = [t for _, t in store.task_events(task_id) if t == "finished"]
            assert finished == ["finished"], f"seed {seed}: {task_id} finished {len(finished)} times"
            expect = "failed" if task["params"].get("fail") else "succeeded"
            assert task["status"] == expect, f"seed {seed}: {task}"
            # The demo job was found again under its stored id, not submitted twice.
            assert task["attempts"] == 1, f"seed {seed}: {task}"
            assert len(store.get_task(task_id)["files"]) == (expect == "succeeded"), f"seed {seed}: {task}"
        check_files(result_files, tmp_path, store, f"seed {seed}:", settled=True)
        assert store.lease_owners() == []
    finally:
        store.close()


def copy_store(data_dir, into):
    """The store's files as a kill left them, copied: opening a store may
    replay, truncate or compact, and that is the restarted server's to do."""
    into.mkdir()
    for name in os.listdir(data_dir):
        if name.startswith("holdfast.db") or name in ("holdfast.json", "holdfast.journal"):
            shutil.copy2(data_dir / name, into / name)
    return into


def check_books(store, payer_name, start_credits, why):
    """What must hold at every moment, tasks finished or not: no dedupe key
    made two tasks; one reserve per task and at most one charge or refund,
    as its `credits` says; balance + reserved == start - charged."""
    rows = store.export_rows()
    keys = collections.Counter(t["dedupe_key"] for t in rows["tasks"])
    assert set(keys.values()) <= {1}, f"{why} a key made two tasks: {keys.most_common(3)}"
    payer = store.user_by_name(payer_name)
    tasks = {t["id"]: t for t in rows["tasks"]}
    kinds = collections.Counter((r["task_id"], r["kind"]) for r in rows["ledger"] if r["task_id"])
    assert {task_id for task_id, _ in kinds} == set(tasks), f"{why} ledger rows and tasks do not match"
    for task_id, task in tasks.items():
        mine = {k: n for (t, k), n in kinds.items() if t == task_id}
        expect = {"reserved": {}, "charged": {"charge": 1}, "refunded": {"refund": 1}}[task["credits"]]
        assert mine == {"reserve": 1, **expect}, f"{why} {task_id} ({task['status']}, {task['credits']}): {mine}"
    charged = sum(r["amount"] for r in rows["ledger"] if r["kind"] == "charge" and r["user_id"] == payer["id"])
    assert payer["credit_balance"] + store.reserved_credits(payer["id"]) == start_credits - charged, why


def _users_add(data_dir, env, name, credits):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "app.py"), "users", "add", name,
                          "--credits", str(credits)], env=env, cwd=str(data_dir),
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip().splitlines()[-1].removeprefix("token: ")


@pytest.mark.parametrize("backend", ["sqlite", "json"])
def test_crash_suite_random_kills(tmp_path, backend, result_files):
    """Ten rounds (`result_files.random_rounds`): submissions stream in
    while the server is killed at a random moment; after every kill the
    books balance (credits, dedupe, on a copy of the store as the kill left
    it) and the result files are whole and accounted for, and after every
    restart every acknowledged task exists."""
    seed = int(os.environ.get("HOLDFAST_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    why = f"(seed {seed}; rerun with HOLDFAST_CRASH_SEED={seed})"
    comfy = FakeComfyUI(job_seconds=0.05).start()
    (tmp_path / "holdfast.toml").write_text(
        '[providers.demo]\ncost = 1\nduration_s = 0.6\npoll_interval_s = 0.2\n'
        f'[providers.comfy]\ntype = "comfyui"\nurl = "{comfy.url}"\ncost = 1\npoll_interval_s = 0.2\n'
        'max_poll_interval_s = 0.5\ntimeout_s = 5\n')
    env = {"HOLDFAST_STORE": backend, "HOLDFAST_CONFIG": str(tmp_path / "holdfast.toml"), **result_files.env()}
    start_credits = 100_000
    token = _users_add(tmp_path, {**os.environ, "HOLDFAST_DATA": str(tmp_path), **env}, "payer", start_credits)
    server = ServerProcess(tmp_path, env=env).start()
    session = api(server, token)
    acked = {}                # dedupe key -> task id, for every 2xx answer
    unanswered = []
    counter = iter(range(10**6))

    def post(key):
        n = int(key[1:])
        if n % 3 == 2:
            body = {"provider": "comfy", "params": {"workflow": {
                "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                            "color": n}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": key}}}}}
        else:
            body = {"provider": "demo", "params": {"prompt": key, **({"fail": True} if n % 5 == 4 else {})}}
        return session.post(server.url + "/api/tasks", timeout=5, json={**body, "dedupe_key": key})

    try:
        for round_no in range(result_files.random_rounds):
            stop, errors = threading.Event(), []
            thread = threading.Thread(target=submit_until, args=(
                stop, post, lambda: f"k{next(counter)}", acked, unanswered, errors,
                lambda: rng.uniform(0, 0.05)))
            thread.start()
            # Each round kills in its own slice of 0.2 to 1.2 s: fewer rounds
            # (on a bucket) still reach from the first submissions to runs
            # and downloads well under way.
            time.sleep(0.2 + (round_no + rng.random()) / result_files.random_rounds)
            server.kill()
            stop.set()
            thread.join(30)
            assert errors == [], f"{why} {errors}"
            copied = open_store(backend, str(copy_store(tmp_path, tmp_path / f"after-kill-{round_no}")))
            try:
                check_books(copied, "payer", start_credits, f"{why} after kill {round_no}:")
                check_files(result_files, tmp_path, copied, f"{why} after kill {round_no}:", settled=False)
            finally:
                copied.close()
            server = ServerProcess(tmp_path, env=env, port=server.port).start()
            # A client that got no answer tries again with the same key.
            while unanswered:
                key = unanswered[-1]
                res = post(key)
                if res.status_code == 429:
                    time.sleep(min(float(res.headers.get("Retry-After", 1)), 1.0))
                    continue
                assert res.status_code in (200, 201), f"{why} {res.text}"
                acked[unanswered.pop()] = res.json()["task"]["id"]
            for key, task_id in acked.items():
                res = session.get(f"{server.url}/api/tasks/{task_id}", timeout=10)
                assert res.status_code == 200, f"{why} round {round_no}: acknowledged {task_id} is gone"
        tasks = wait_all_terminal(session, server.url, list(acked.values()), timeout=90)
    finally:
        server.stop()
        comfy.stop()

    assert len(acked) >= 3 * result_files.random_rounds, f"{why} too few submissions to mean anything: {len(acked)}"
    opened = open_store(backend, str(tmp_path))
    try:
        check_books(opened, "payer", start_credits, why)
        check_files(result_files, tmp_path, opened, why, settled=True)
        rows = opened.export_rows()
        keys = collections.Counter(t["dedupe_key"] for t in rows["tasks"])
        assert set(keys.values()) == {1}, f"{why} a key made two tasks: {keys.most_common(3)}"
        assert {t["id"] for t in rows["tasks"]} == set(acked.values())
        for task in tasks.values():
            expect = "failed" if task["params"].get("fail") else "succeeded"
            assert task["status"] == expect, f"{why} {task}"
            if task["provider"] == "demo":
                assert task["attempts"] == 1, f"{why} submitted twice: {task}"
            assert [t for _, t in opened.task_events(task["id"])].count("finished") == 1, why
        # ComfyUI can tell us what it was sent: each task's job reached it
        # exactly once, whatever the kills interrupted.
        comfy_tasks = [t for t in tasks.values() if t["provider"] == "comfy"]
        assert comfy_tasks, why
        assert len(comfy.submissions) == len(set(comfy.submissions)) == len(comfy_tasks), \
            f"{why} {len(comfy.submissions)} ComfyUI submissions for {len(comfy_tasks)} tasks"
        assert {t["external_id"] for t in comfy_tasks} == set(comfy.submissions), why
        succeeded = sum(1 for t in tasks.values() if t["status"] == "succeeded")
        payer = opened.user_by_name("payer")
        assert payer["credit_balance"] == start_credits - succeeded, why
        assert opened.reserved_credits(payer["id"]) == 0, why
        kinds = collections.Counter((r["task_id"], r["kind"]) for r in rows["ledger"] if r["task_id"])
        for task in tasks.values():
            settle = "charge" if task["status"] == "succeeded" else "refund"
            assert kinds[(task["id"], "reserve")] == 1 and kinds[(task["id"], settle)] == 1, why
        assert len(kinds) == 2 * len(tasks), f"{why} stray ledger rows"
    finally:
        opened.close()
