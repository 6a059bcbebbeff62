"""Several holdfast processes share one PostgreSQL database: three real
servers, tasks sent to all three, one killed with SIGKILL midway."""

import collections
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from errors import InvalidInput, StoreUnavailable
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
    sqlite.add_webhook_endpoint(user["id"], "https://hooks.example.com/a", ["finished"], now=300.0)
    sqlite.submit(user["id"], "demo", {}, now=300.0, deadline_at=1e10,
                  webhook={"url": "https://hooks.example.com/t", "events": ["created"]})
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
        endpoint, _ = pg.add_webhook_endpoint(user["id"], "https://hooks.example.com/b", None, now=400.0)
        assert endpoint["id"] == 2
    finally:
        pg.close()


# -- bounds: a stopped process, and readers of an event log written out of order

# Run as a separate process: opens the store, submits a task inside a
# transaction it keeps open (the task row, its event and the user's advisory
# lock are written and held), says so, and stops itself there, as a paused VM
# or a swap storm would stop a server mid-write.
STOPPED_WRITER = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from store import PostgresStore
store = PostgresStore(sys.argv[2])
user = store.user_by_name(sys.argv[3])
with store.db.atomic():
    store.submit(user["id"], "demo", {"prompt": "stopped"}, now=time.time(), deadline_at=time.time() + 600)
    print("stopping", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
"""


def _timed_submit(session, url, prompt):
    start = time.monotonic()
    res = session.post(url + "/api/tasks", json={"provider": "demo", "params": {"prompt": prompt}}, timeout=60)
    return time.monotonic() - start, res


def _stopped(pid):
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] == "T"


def _with_settings(url, **settings):
    """The test schema's URL with server settings added to its libpq
    `options` (the form any holdfast version passes through to the server)."""
    assert url.endswith(tuple("0123456789abcdef")) and "options=" in url
    return url + "".join(f"%20-c{name}%3D{value}" for name, value in settings.items())


def test_a_process_stopped_mid_write_delays_others_by_the_lock_timeout_at_most(tmp_path, pg_schema):
    lock_timeout_s = 1.5
    server = ServerProcess(tmp_path / "node", env={
        "HOLDFAST_STORE": _with_settings(pg_schema.url, lock_timeout=f"{int(lock_timeout_s * 1000)}ms")}).start()
    writer = None
    try:
        token = server.tokens["demo"]
        admin = api(server, server.tokens["admin"])
        res = admin.post(server.url + "/api/admin/users", json={"name": "bob"}, timeout=10)
        assert res.status_code == 201, res.text
        demo, bob = api(server, token), api(server, res.json()["token"])
        baseline, res = _timed_submit(bob, server.url, "before")
        assert res.status_code == 201

        # Its session ends 10 s after it stops: longer than any wait below.
        writer_url = _with_settings(pg_schema.url, idle_in_transaction_session_timeout="10s")
        writer = subprocess.Popen([sys.executable, "-c", STOPPED_WRITER, ROOT, writer_url, "demo"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "stopping", writer.stderr.read()
        deadline = time.time() + 10
        while not _stopped(writer.pid):
            assert time.time() < deadline, "the writer did not stop"
            time.sleep(0.01)

        # Another user's submit waits for nothing the stopped process holds.
        other, res = _timed_submit(bob, server.url, "beside a stopped writer")
        assert res.status_code == 201, res.text
        # The same user's waits for that user's lock, for lock_timeout at
        # most, and is told to come back (503 JSON), never a 500.
        same, res = _timed_submit(demo, server.url, "behind a stopped writer")
        assert res.status_code in (201, 503), res.text
        if res.status_code == 503:
            assert res.json()["error"]["code"] == "store_unavailable"
        print(f"submit: {baseline:.3f} s before; with a writer stopped mid-write {other:.3f} s "
              f"(another user), {same:.3f} s (its user; lock_timeout {lock_timeout_s} s)")
        margin = 3.0   # a loaded two-core machine; what is bounded is the wait, not the speed
        assert other < margin, other
        assert same < lock_timeout_s + margin, same

        # The stopped transaction holds back the events after its seq; the
        # server ends its session after idle_in_transaction_session_timeout,
        # and they flow again without the stopped process ever waking.
        task_id = res.json()["task"]["id"] if res.status_code == 201 else None
        prompts, since, deadline = [], 0, time.time() + 40
        while "beside a stopped writer" not in prompts:
            assert time.time() < deadline, f"events held back for good; streamed {prompts}"
            res = bob.get(server.url + "/api/events/poll", params={"since": since, "wait": 5}, timeout=60)
            assert res.status_code == 200, res.text
            prompts += [e["task"]["params"]["prompt"] for e in res.json()["events"]]
            since = res.json()["next"]
        assert prompts[0] == "before" and "beside a stopped writer" in prompts, prompts
        assert _stopped(writer.pid), "the writer must stay stopped for this test to mean anything"
        if task_id:
            assert demo.get(f"{server.url}/api/tasks/{task_id}", timeout=10).status_code == 200
    finally:
        if writer is not None:
            writer.kill()
            writer.wait(10)
        server.stop()


# Run as a separate process: submits tasks and cancels them (two events
# each), for users taken in turn, as fast as it can.
EVENT_WRITER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from store import PostgresStore
store = PostgresStore(sys.argv[2])
users = [int(u) for u in sys.argv[3].split(",")]
for i in range(int(sys.argv[4])):
    user = users[i % len(users)]
    now = time.time()
    task, _ = store.submit(user, "demo", {"i": i}, now=now, deadline_at=now + 600)
    store.cancel(task["id"], user, now=now)
store.close()
"""


def test_a_tail_of_events_written_by_six_processes_skips_none(pg_schema):
    """Six processes write events side by side, so seqs commit out of order;
    a tail that reads as the SSE hub does (latest_events, then each user's
    events_since) must still see every seq that commits, in order."""
    store = PostgresStore(pg_schema.url)
    writers = []
    try:
        users = [store.create_user(f"u{n}")[0]["id"] for n in range(3)]
        per_writer = 60
        writers = [subprocess.Popen([sys.executable, "-c", EVENT_WRITER, ROOT, pg_schema.url,
                                     ",".join(map(str, users)), str(per_writer)])
                   for _ in range(6)]
        seen = {u: [] for u in users}
        cursor, reads = 0, 0

        def tail():
            nonlocal cursor, reads
            reads += 1
            latest = store.latest_events(cursor)
            for user_id in latest:
                while True:
                    since = seen[user_id][-1] if seen[user_id] else 0
                    rows = store.events_since(user_id, since)
                    seen[user_id] += [seq for seq, _ in rows]
                    if len(rows) < 100:
                        break
            if latest:
                cursor = max(cursor, *latest.values())

        deadline = time.time() + 180
        while any(w.poll() is None for w in writers):
            assert time.time() < deadline, "the writers did not finish"
            tail()
        assert all(w.returncode == 0 for w in writers)
        for _ in range(2):   # the last marks settle once the writers are gone
            tail()
        committed = {u: [] for u in users}
        with store._seam():
            for seq, user_id in store._exec("SELECT seq, user_id FROM events ORDER BY seq").fetchall():
                committed[user_id].append(seq)
        assert sum(map(len, committed.values())) == 6 * per_writer * 2
        for user_id in users:
            missed = sorted(set(committed[user_id]) - set(seen[user_id]))
            assert not missed, f"the tail jumped over {len(missed)} events of user {user_id}: {missed[:10]}"
            assert seen[user_id] == committed[user_id]
        print(f"{reads} reads of the tail, {sum(map(len, seen.values()))} events")
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait(10)
        store.close()


def test_two_connections_changing_one_users_line_leave_its_slot_line_row_right(pg_schema):
    """slot_line's triggers on writers that run side by side: one
    connection submits a user's tasks while another takes their slots and
    finishes them, so the user's row comes and goes under both. Each change
    takes the row's lock before it reads the tasks: neither may miss the
    other's task, nor both insert the row (a unique violation)."""
    from store import slot_line
    stores = [PostgresStore(pg_schema.url) for _ in range(2)]
    try:
        user = stores[0].create_user("alice")[0]["id"]
        errors, counts, n = [], collections.Counter(), [0]

        def writer(store, stop):
            while time.monotonic() < stop:
                n[0] += 1
                store.submit(user, "demo", {"n": n[0]}, now=float(n[0]), deadline_at=1e10, priority=n[0] % 3)
                counts["submitted"] += 1
                for task in store.claim(f"w{id(store)}", now=1e9, limit=2, lease_s=60):
                    if store.take_slot(task["id"], token=task["lease_token"], now=1e9, limit=None,
                                       step="submitting") is None:
                        continue
                    counts["taken"] += 1
                    if task["priority"] == 1 and task["attempts"] == 0:
                        store.update(task["id"], token=task["lease_token"], now=1e9, step=None, attempts=1,
                                     release=True)
                    else:
                        store.cancel(task["id"], user, now=1e9)

        def run(fn, store, stop):
            try:
                fn(store, stop)
            except Exception as exc:     # noqa: BLE001 - reported below
                errors.append(repr(exc))

        # Rounds, each checked once both writers have stopped: a wrong row
        # is seen before a later change can count it right again.
        wrong = []
        for _ in range(8):
            stop = time.monotonic() + 0.4
            threads = [threading.Thread(target=run, args=(writer, s, stop)) for s in stores]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            with stores[0]._seam():
                have, want = slot_line.rows(stores[0]), slot_line.recount(stores[0])
            if have != want:
                wrong.append((have, want))
        assert not errors, errors
        assert not wrong, wrong
        assert counts["submitted"] > 50 and counts["taken"] > 20, counts
        with stores[0]._seam():
            waiting = stores[0]._one("SELECT COUNT(*) FROM tasks WHERE status = 'queued' "
                                     "AND step IS NULL")[0]
        print(counts, waiting, "waiting at the end")
    finally:
        for s in stores:
            s.close()


def test_session_bounds_come_from_the_url_or_their_defaults(pg_schema):
    store = PostgresStore(pg_schema.url + "&lock_timeout=1234ms&statement_timeout=300ms&keepalives_idle=20")
    try:
        with store._seam():
            shown = {name: store._one(f"SHOW {name}")[0] for name in
                     ("lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout",
                      "search_path")}
            client = store.db.connection().info.get_parameters()
        assert shown == {"lock_timeout": "1234ms", "statement_timeout": "300ms",
                         "idle_in_transaction_session_timeout": "15s", "search_path": pg_schema.name}
        assert client["keepalives"] == "1" and client["keepalives_idle"] == "20"
        # A statement past its bound is the store being unavailable (503), not a crash.
        with pytest.raises(StoreUnavailable), store._seam():
            store._exec("SELECT pg_sleep(5)")
        assert store.count_users() == 0   # and the pooled connection is still good
    finally:
        store.close()
    with pytest.raises(InvalidInput):
        PostgresStore(pg_schema.url + "&lock_timeout=soon")
