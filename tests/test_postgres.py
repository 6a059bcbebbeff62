"""Several holdfast processes share one PostgreSQL database: three real
servers, tasks sent to all three, one killed with SIGKILL midway."""

import collections
import json
import os
import subprocess
import sys
import threading
import time


from store import PostgresStore, SqliteStore
from support import ROOT, ServerProcess, api
from tests.fakes.kie import FakeKIE

TERMINAL = ("succeeded", "partial", "failed", "cancelled")


def write_config(path, kie_url):
    path.write_text(f"""
[providers.demo]
duration_s = 1.0
poll_interval_s = 0.2

[providers.kie]
type = "kie"
url = "{kie_url}"
api_key_env = "HOLDFAST_TEST_KIE_KEY"
poll_interval_s = 0.2
max_poll_interval_s = 0.4
timeout_s = 5
""")


def wait_terminal(session, url, ids, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        tasks = {}
        for i in ids:
            res = session.get(f"{url}/api/tasks/{i}", timeout=10)
            assert res.status_code == 200, (i, res.status_code, res.text)
            tasks[i] = res.json()["task"]
        if all(t["status"] in TERMINAL for t in tasks.values()):
            return tasks
        time.sleep(0.3)
    stuck = {i: t["status"] for i, t in tasks.items() if t["status"] not in TERMINAL}
    raise AssertionError(f"stuck: {stuck}")


def test_three_processes_share_one_database(tmp_path, pg_schema):
    kie = FakeKIE(api_key="pg-key", job_seconds=1.5, poll_delay=0.15).start()
    write_config(tmp_path / "holdfast.toml", kie.url)
    env = {"HOLDFAST_STORE": pg_schema.url, "HOLDFAST_CONFIG": str(tmp_path / "holdfast.toml"),
           "HOLDFAST_TEST_KIE_KEY": "pg-key", "HOLDFAST_LEASE_S": "5"}
    servers = []
    try:
        for n in range(3):
            servers.append(ServerProcess(tmp_path / f"node{n}", env=env).start())
        token = next(s.tokens["demo"] for s in servers if "demo" in s.tokens)
        sessions = [api(s, token) for s in servers]

        # Dedupe holds across processes: the same key to all three at once.
        barrier = threading.Barrier(3)
        answers = []

        def post_same(i):
            barrier.wait()
            res = sessions[i].post(servers[i].url + "/api/tasks", timeout=10, json={
                "provider": "demo", "params": {"prompt": "once"}, "dedupe_key": "cross-process"})
            answers.append((res.status_code, res.json()["task"]["id"]))

        threads = [threading.Thread(target=post_same, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(code for code, _ in answers) == [200, 200, 201]
        assert len({task_id for _, task_id in answers}) == 1

        # A live stream on the third process, opened before the tasks come.
        stream = sessions[2].get(servers[2].url + "/api/events", stream=True, timeout=30,
                                 headers={"Accept": "text/event-stream"})
        assert stream.status_code == 200
        lines = stream.iter_lines(decode_unicode=True)
        assert next(line for line in lines if line.startswith("event:")) == "event: ready"

        # Tasks to every process, both providers.
        ids = [answers[0][1]]
        for i in range(24):
            n = i % 3
            body = ({"provider": "kie", "params": {"model": "m", "input": {"prompt": f"p{i}"}}}
                    if i % 2 else {"provider": "demo", "params": {"prompt": f"p{i}"}})
            res = sessions[n].post(servers[n].url + "/api/tasks", json=body, timeout=10)
            assert res.status_code == 201, res.text
            ids.append(res.json()["task"]["id"])

        # Events written by one process reach another's live stream...
        elsewhere = {ids[1 + i] for i in range(24) if i % 3 != 2}
        streamed, deadline = set(), time.time() + 20
        for line in lines:
            if line.startswith("data:"):
                streamed.add(json.loads(line[5:]).get("task_id"))   # None: the ready event's
            if elsewhere <= streamed or time.time() > deadline:
                break
        stream.close()
        assert elsewhere <= streamed, f"not streamed by another process: {elsewhere - streamed}"
        # ...and its long poll.
        res = sessions[2].get(servers[2].url + "/api/events/poll", params={"since": 0, "wait": 0}, timeout=30)
        assert res.status_code == 200
        seen = {e["task_id"] for e in res.json()["events"]}
        assert set(ids[1:4]) <= seen

        time.sleep(0.8)
        servers[1].kill()
        tasks = wait_terminal(sessions[0], servers[0].url, ids, timeout=60)
    finally:
        for s in servers:
            s.stop()
        kie.stop()

    assert all(t["status"] == "succeeded" for t in tasks.values()), \
        {i: (t["status"], t["error"]) for i, t in tasks.items() if t["status"] != "succeeded"}
    assert kie.overlapping_polls == 0, "two processes polled one job at the same moment"
    store = PostgresStore(pg_schema.url)
    try:
        for task_id in ids:
            assert [t for _, t in store.task_events(task_id)].count("finished") == 1
        kie_ids = [t["external_id"] for t in tasks.values() if t["provider"] == "kie"]
        assert len(set(kie_ids)) == len(kie_ids) and set(kie_ids) <= set(kie.created)
        demo = [t for t in tasks.values() if t["provider"] == "demo"]
        assert all(t["attempts"] == 1 for t in demo), "a demo job was submitted twice"
        assert store.lease_owners() == []
    finally:
        store.close()


def test_export_from_sqlite_imports_into_postgresql(tmp_path, pg_schema):
    sqlite = SqliteStore(str(tmp_path / "holdfast.db"))
    user, token = sqlite.create_user("alice", credits=20)
    for i in range(5):
        task, _ = sqlite.submit(user["id"], "demo", {"i": i}, now=100.0 + i, deadline_at=1e10, cost=2,
                                dedupe_key=f"k{i}")
        if i % 2:
            sqlite.cancel(task["id"], user["id"], now=200.0 + i)
    sqlite.put_session(user["id"], "chat", messages=[{"role": "user", "content": "hi"}], data={"n": 1},
                       now=300.0, ttl_s=1e9)
    sqlite.mark_files_expired([task["id"]], now=300.0)
    sqlite.close()
    dump = tmp_path / "dump.json"
    env = {**os.environ, "HOLDFAST_DATA": str(tmp_path)}
    env.pop("HOLDFAST_STORE", None)
    run = [sys.executable, os.path.join(ROOT, "recover.py")]
    subprocess.run(run + ["--export", str(dump)], env=env, check=True, timeout=60, capture_output=True)
    proc = subprocess.run(run + ["--import", str(dump)], env={**env, "HOLDFAST_STORE": pg_schema.url},
                          timeout=60, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    pg = PostgresStore(pg_schema.url)
    try:
        original = json.loads(dump.read_text())["tables"]
        assert [table for table, rows in original.items() if not rows] == [], "every table is moved"
        assert pg.export_rows() == original
        assert pg.get_session(user["id"], "chat", now=400.0)["data"] == {"n": 1}
        assert pg.user_by_token(token)["name"] == "alice"
        # Sequences moved past the imported ids: new rows do not collide.
        task, _ = pg.submit(pg.user_by_name("alice")["id"], "demo", {}, now=300.0, deadline_at=1e10, cost=2)
        assert pg.last_seq() == max(e["seq"] for e in original["events"]) + 1
        assert collections.Counter(r["kind"] for r in pg.export_rows()["ledger"])["reserve"] == 6
    finally:
        pg.close()
