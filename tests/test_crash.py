"""A real server killed with SIGKILL while tasks run, then started again on
the same data directory: every accepted task ends, exactly once."""

import hashlib
import random
import time

from store import SqliteStore
from support import ServerProcess, api


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


def test_kill_9_mid_run_loses_and_repeats_nothing(tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    server = ServerProcess(tmp_path).start()
    token = server.tokens["demo"]
    session = api(server, token)
    accepted = []
    try:
        for round_no in range(2):
            for i in range(12):
                res = session.post(server.url + "/api/tasks", timeout=10, json={
                    "provider": "demo",
                    "params": {"prompt": f"r{round_no}-{i}", "duration_s": rng.choice([0.5, 1.0, 1.5]),
                               **({"fail": True} if i % 5 == 4 else {})}})
                assert res.status_code == 201, res.text
                accepted.append(res.json()["task"]["id"])
            time.sleep(rng.uniform(0.3, 1.2))
            server.kill()
            server = ServerProcess(tmp_path, port=server.port).start()
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
            if expect == "succeeded":
                [meta] = task["files"]
                body = (tmp_path / "files" / task_id / meta["name"]).read_bytes()
                assert hashlib.sha256(body).hexdigest() == meta["sha256"]
        assert store.lease_owners() == []
    finally:
        store.close()
