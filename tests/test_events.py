"""Live events: the SSE stream and the long poll, in-process through WSGI and
against a real server (reconnection without loss, 200 open streams)."""

import io
import json
import queue
import re
import select
import socket
import sys
import threading
import time

import pytest
import requests

from api import create_app
from config import Config
from store import SqliteStore
from support import ServerProcess, WSGIClient, api


def submit(client, token, prompt="a red fox", **params):
    res = client.post("/api/tasks", {"provider": "demo", "params": {"prompt": prompt, **params}}, token=token)
    assert res.status == 201, res
    return res.json()["task"]


def parse_sse(text):
    """[{"id", "event", "data"}] from an event-stream text; comments as
    {"comment": text}. Only complete events (ended by a blank line)."""
    out = []
    for block in text.split("\n\n")[:-1]:
        fields = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                out.append({"comment": line[1:].strip()})
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            fields[name] = fields[name] + "\n" + value if name in fields and name == "data" else value
        if fields:
            out.append(fields)
    return out


def task_events(items):
    return [json.loads(e["data"]) for e in items if "data" in e and e.get("event") is None]


class Stream:
    """One request to the in-process app, read in a background thread as a
    server would, with a switch that plays a client leaving."""

    def __init__(self, app, path, token=None, headers=None):
        self.gone = False
        path, _, qs = path.partition("?")
        environ = {
            "REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": qs, "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr,
            "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
            "waitress.client_disconnected": lambda: self.gone,
        }
        if token:
            environ["HTTP_AUTHORIZATION"] = f"Bearer {token}"
        for name, value in (headers or {}).items():
            environ["HTTP_" + name.upper().replace("-", "_")] = value
        self.status = None
        self.headers = None
        self.text = ""
        self.chunks = queue.Queue()
        self.done = threading.Event()
        self.started = time.monotonic()
        self.ended = None

        def start_response(status, headers, exc_info=None):
            self.status = int(status.split()[0])
            self.headers = {k.lower(): v for k, v in headers}

        def run():
            body = app(environ, start_response)
            try:
                for chunk in body:
                    self.chunks.put(chunk.decode())
            finally:
                if hasattr(body, "close"):
                    body.close()
                self.ended = time.monotonic()
                self.done.set()
                self.chunks.put(None)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def read_until(self, predicate, timeout=5.0):
        """Read until predicate(parsed items) holds; return the items."""
        deadline = time.monotonic() + timeout
        while True:
            items = parse_sse(self.text)
            if predicate(items):
                return items
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"stream never satisfied the condition; got {self.text[-2000:]!r}")
            try:
                chunk = self.chunks.get(timeout=left)
            except queue.Empty:
                continue
            if chunk is None:
                items = parse_sse(self.text)
                if predicate(items):
                    return items
                raise AssertionError(f"stream ended first; got {self.text[-2000:]!r}")
            self.text += chunk

    def finish(self, timeout=5.0):
        assert self.done.wait(timeout), "stream did not end"
        while True:
            chunk = self.chunks.get(timeout=1)
            if chunk is None:
                return parse_sse(self.text)
            self.text += chunk


def ready(items):
    return any(e.get("event") == "ready" for e in items)


@pytest.fixture
def make_app(sqlite_store, providers, worker, files, clock, tmp_path):
    def make(**config):
        cfg = Config(data=str(tmp_path), **{"sse_max_s": 5.0, "sse_keepalive_s": 10.0, **config})
        app = create_app(sqlite_store, providers, cfg, worker=worker, files=files, clock=clock)
        return app, WSGIClient(app), app.config["holdfast.events"]
    return make


def user_seqs(store, user_token):
    user = store.user_by_token(user_token)
    return [seq for seq, _ in store.events_since(user["id"], 0, limit=10_000)]


class TestStream:
    def test_a_stream_sends_the_callers_events_in_order_with_seq_ids_and_ends_after_sse_max_s(
            self, make_app, users, sqlite_store):
        app, client, _ = make_app(sse_max_s=0.5)
        a1 = submit(client, users["alice"], "one")
        submit(client, users["bob"], "bob's")
        a2 = submit(client, users["alice"], "two")
        stream = Stream(app, "/api/events?since=0", users["alice"])
        items = stream.finish()
        assert stream.status == 200 and stream.headers["content-type"].startswith("text/event-stream")
        assert 0.45 <= stream.ended - stream.started < 3
        assert stream.text.startswith("retry: ")
        data = [e for e in items if "data" in e and e.get("event") is None]
        events = task_events(items)
        assert [e["task_id"] for e in events] == [a1["id"], a2["id"]]
        assert [int(e["id"]) for e in data] == [e["seq"] for e in events] == user_seqs(sqlite_store, users["alice"])
        assert all(e["type"] == "created" and e["task"]["status"] == "queued" for e in events)
        assert set(events[0]) == {"seq", "task_id", "type", "task"}

    def test_last_event_id_wins_over_since_and_resumes_right_after_it(self, make_app, users, sqlite_store):
        app, client, _ = make_app(sse_max_s=0.3)
        for i in range(4):
            submit(client, users["alice"], f"t{i}")
        seqs = user_seqs(sqlite_store, users["alice"])
        stream = Stream(app, "/api/events?since=0", users["alice"], headers={"Last-Event-ID": str(seqs[1])})
        assert [e["seq"] for e in task_events(stream.finish())] == seqs[2:]

    def test_without_a_cursor_it_starts_from_now_and_says_where_that_is(self, make_app, users, sqlite_store,
                                                                         worker, clock):
        app, client, _ = make_app(sse_max_s=2)
        submit(client, users["alice"], "old")
        stream = Stream(app, "/api/events", users["alice"])
        items = stream.read_until(ready)
        [hello] = [e for e in items if e.get("event") == "ready"]
        assert int(hello["id"]) == user_seqs(sqlite_store, users["alice"])[-1]
        new = submit(client, users["alice"], "new")
        items = stream.read_until(lambda items: task_events(items))
        assert [e["task_id"] for e in task_events(items)] == [new["id"]]

    def test_a_waiting_stream_wakes_at_once_when_this_process_commits(self, make_app, users, worker, clock):
        app, client, hub = make_app(sse_max_s=5)
        hub.check_s = 60     # only the after-commit notice can wake it in time
        stream = Stream(app, "/api/events", users["alice"])
        stream.read_until(ready)
        time.sleep(0.2)
        task = submit(client, users["alice"])
        t0 = time.monotonic()
        stream.read_until(lambda items: task_events(items), timeout=2)
        assert time.monotonic() - t0 < 1.0     # the periodic check alone would take 60 s
        worker.run_once(clock())     # the worker's writes wake it too
        items = stream.read_until(lambda items: len(task_events(items)) >= 2, timeout=2)
        assert [e["type"] for e in task_events(items)][:2] == ["created", "updated"]
        assert task_events(items)[1]["task"]["id"] == task["id"]
        stream.gone = True
        stream.finish()

    def test_events_written_by_another_process_arrive_by_the_periodic_check(self, make_app, users,
                                                                           sqlite_store, tmp_path):
        app, client, hub = make_app(sse_max_s=5)
        hub.check_s = 0.1
        other = SqliteStore(sqlite_store.path)   # another connection, no listener: as another process
        try:
            stream = Stream(app, "/api/events", users["alice"])
            stream.read_until(ready)
            alice = other.user_by_token(users["alice"])
            task, _ = other.submit(alice["id"], "demo", {"prompt": "from afar"}, now=time.time(),
                                   deadline_at=time.time() + 60)
            items = stream.read_until(lambda items: task_events(items), timeout=2)
            assert task_events(items)[0]["task_id"] == task["id"]
            stream.gone = True
            stream.finish()
        finally:
            other.close()

    def test_keepalive_comments_flow_while_nothing_happens(self, make_app, users):
        app, _, _ = make_app(sse_max_s=1.0, sse_keepalive_s=0.2)
        items = Stream(app, "/api/events", users["alice"]).finish()
        assert sum(1 for e in items if e.get("comment") == "keepalive") >= 3

    def test_a_long_backlog_arrives_whole_and_in_order(self, make_app, users, sqlite_store, clock):
        app, client, _ = make_app(sse_max_s=0.5)
        alice = sqlite_store.user_by_token(users["alice"])
        for i in range(130):
            sqlite_store.submit(alice["id"], "demo", {"prompt": str(i)}, now=clock(), deadline_at=clock() + 60)
        seqs = user_seqs(sqlite_store, users["alice"])
        assert len(seqs) == 130
        events = task_events(Stream(app, "/api/events?since=0", users["alice"]).finish())
        assert [e["seq"] for e in events] == seqs

    def test_a_cursor_past_the_log_starts_at_its_end(self, make_app, users, sqlite_store):
        app, client, _ = make_app(sse_max_s=1.5)
        submit(client, users["alice"])
        stream = Stream(app, "/api/events?since=999999", users["alice"])
        items = stream.read_until(ready)
        assert int([e for e in items if e.get("event") == "ready"][0]["id"]) == sqlite_store.last_seq()
        task = submit(client, users["alice"], "after")
        assert task_events(stream.read_until(lambda i: task_events(i)))[0]["task_id"] == task["id"]

    def test_only_the_callers_events(self, make_app, users):
        app, client, _ = make_app(sse_max_s=0.3)
        submit(client, users["bob"], "secret")
        mine = submit(client, users["alice"], "mine")
        events = task_events(Stream(app, "/api/events?since=0", users["alice"]).finish())
        assert [e["task_id"] for e in events] == [mine["id"]]
        polled = client.get("/api/events/poll?since=0", token=users["alice"]).json()
        assert [e["task_id"] for e in polled["events"]] == [mine["id"]]


class TestEveryBackend:
    """The two store methods the hub relies on, on every backend."""

    def test_on_events_is_told_after_each_commit_that_wrote_events(self, store):
        heard = []
        store.on_events(lambda: heard.append(store.last_seq()))
        user, _ = store.create_user("ev")
        assert heard == []          # no event written
        task, _ = store.submit(user["id"], "demo", {}, now=1.0, deadline_at=100.0)
        assert heard == [store.last_seq()] and heard[0] > 0
        store.submit(user["id"], "demo", {}, now=1.0, deadline_at=100.0, dedupe_key="k")
        store.submit(user["id"], "demo", {}, now=1.0, deadline_at=100.0, dedupe_key="k")  # deduplicated
        assert len(heard) == 2
        store.cancel(task["id"], user["id"], now=2.0)
        assert len(heard) == 3

    def test_latest_events_names_each_user_with_news_and_its_last_seq(self, store):
        a, _ = store.create_user("a")
        b, _ = store.create_user("b")
        start = store.last_seq()
        assert store.latest_events(start) == {}
        store.submit(a["id"], "demo", {}, now=1.0, deadline_at=100.0)
        store.submit(b["id"], "demo", {}, now=1.0, deadline_at=100.0)
        store.submit(a["id"], "demo", {}, now=1.0, deadline_at=100.0)
        assert store.latest_events(start) == {a["id"]: store.last_seq(a["id"]), b["id"]: store.last_seq(b["id"])}
        assert store.latest_events(store.last_seq(b["id"])) == {a["id"]: store.last_seq(a["id"])}

    def test_a_waiting_stream_wakes_on_commit(self, store, providers, tmp_path):
        app = create_app(store, providers, Config(data=str(tmp_path), sse_max_s=5))
        app.config["holdfast.events"].check_s = 60
        _, token = store.create_user("waiter")
        stream = Stream(app, "/api/events", token)
        stream.read_until(ready)
        t0 = time.monotonic()
        task = submit(WSGIClient(app), token)
        assert task_events(stream.read_until(lambda i: task_events(i), timeout=3))[0]["task_id"] == task["id"]
        assert time.monotonic() - t0 < 1.0
        stream.gone = True
        stream.finish()


class TestAuthAndInput:
    def test_token_by_header_or_query_and_401_without(self, make_app, users):
        app, client, _ = make_app(sse_max_s=0.2)
        assert client.get("/api/events", token=None).status == 401
        assert client.get("/api/events?token=nope", token=None).status == 401
        assert client.get(f"/api/events?token={users['alice']}", token=None).status == 200
        assert client.get("/api/events/poll", token=None).status == 401
        # Only EventSource needs a token in the URL; a poll sends the header.
        assert client.get(f"/api/events/poll?token={users['alice']}", token=None).status == 401

    @pytest.mark.parametrize("query", ["since=-1", "since=abc", "since=1.5", "since=1e3", "since=" + "9" * 19,
                                       "wait=26", "wait=-1", "wait=abc", "wait=nan", "wait=inf", "wait=25.0001",
                                       "since=0&wait=1e1"])
    def test_bad_since_or_wait_is_a_400(self, make_app, users, query):
        _, client, hub = make_app()
        res = client.get(f"/api/events/poll?{query}", token=users["alice"])
        assert res.status == 400, res
        assert res.json()["error"]["code"] in ("invalid_cursor", "invalid_wait")
        if "wait" not in query:
            assert client.get(f"/api/events?{query}", token=users["alice"]).status == 400
        assert hub.counts() == {"sse": 0, "poll": 0, "max": 200}

    def test_a_bad_last_event_id_is_a_400(self, make_app, users):
        _, client, _ = make_app()
        res = client.get("/api/events", token=users["alice"], headers={"Last-Event-ID": "x1"})
        assert res.status == 400 and res.json()["error"]["code"] == "invalid_cursor"


class TestLongPoll:
    def test_returns_waiting_events_at_once_in_pages(self, make_app, users, sqlite_store, clock):
        _, client, _ = make_app()
        alice = sqlite_store.user_by_token(users["alice"])
        for i in range(120):
            sqlite_store.submit(alice["id"], "demo", {"prompt": str(i)}, now=clock(), deadline_at=clock() + 60)
        seqs = user_seqs(sqlite_store, users["alice"])
        t0 = time.monotonic()
        first = client.get("/api/events/poll?since=0&wait=20", token=users["alice"]).json()
        assert time.monotonic() - t0 < 1
        assert [e["seq"] for e in first["events"]] == seqs[:100] and first["next"] == seqs[99]
        rest = client.get(f"/api/events/poll?since={first['next']}&wait=20", token=users["alice"]).json()
        assert [e["seq"] for e in rest["events"]] == seqs[100:] and rest["next"] == seqs[-1]

    def test_without_since_it_answers_the_current_cursor(self, make_app, users, sqlite_store):
        _, client, _ = make_app()
        submit(client, users["alice"])
        body = client.get("/api/events/poll", token=users["alice"]).json()
        assert body == {"events": [], "next": user_seqs(sqlite_store, users["alice"])[-1]}

    def test_waits_then_answers_empty_with_the_same_cursor(self, make_app, users):
        _, client, hub = make_app()
        t0 = time.monotonic()
        body = client.get("/api/events/poll?since=0&wait=0.4", token=users["alice"]).json()
        assert 0.35 <= time.monotonic() - t0 < 2
        assert body == {"events": [], "next": 0}
        assert hub.counts()["poll"] == 0

    def test_a_new_event_ends_the_wait_early(self, make_app, users):
        app, client, hub = make_app()
        hub.check_s = 60
        out = {}

        def poll():
            t0 = time.monotonic()
            out["body"] = client.get("/api/events/poll?since=0&wait=10", token=users["alice"]).json()
            out["took"] = time.monotonic() - t0

        t = threading.Thread(target=poll)
        t.start()
        deadline = time.monotonic() + 2
        while hub.counts()["poll"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hub.counts()["poll"] == 1
        task = submit(client, users["alice"])
        t.join(5)
        assert [e["task_id"] for e in out["body"]["events"]] == [task["id"]]
        assert out["took"] < 1.5


class TestCap:
    def test_streams_past_the_cap_get_503_and_a_slot_frees_when_a_client_leaves(self, make_app, users):
        app, client, hub = make_app(sse_max_streams=2, sse_max_s=10)
        first = Stream(app, "/api/events", users["alice"])
        second = Stream(app, "/api/events", users["bob"])
        first.read_until(ready)
        second.read_until(ready)
        assert client.get("/healthz").json()["streams"] == {"sse": 2, "poll": 0, "max": 2}

        refused = client.get("/api/events", token=users["alice"], headers={"Accept": "text/event-stream"})
        assert refused.status == 503 and refused.headers["retry-after"].isdigit()
        assert refused.headers["content-type"].startswith("text/event-stream")
        assert re.match(r"retry: \d+\n\n", refused.body.decode())
        as_json = client.get("/api/events", token=users["alice"])
        assert as_json.status == 503 and as_json.json()["error"]["code"] == "too_many_streams"

        # A long poll never waits without a slot: it answers at once.
        t0 = time.monotonic()
        assert client.get("/api/events/poll?since=0&wait=5", token=users["alice"]).status == 200
        assert time.monotonic() - t0 < 1

        first.gone = True
        first.finish(timeout=3)
        assert hub.counts()["sse"] == 1
        third = Stream(app, "/api/events", users["alice"])
        third.read_until(ready)
        for s in (second, third):
            s.gone = True
            s.finish(timeout=3)
        assert hub.counts() == {"sse": 0, "poll": 0, "max": 2}

    def test_one_user_cannot_take_every_slot(self, make_app, users):
        app, client, hub = make_app(sse_max_streams=3, sse_max_per_user=1, sse_max_s=10)
        mine = Stream(app, "/api/events", users["alice"])
        mine.read_until(ready)
        assert client.get("/api/events", token=users["alice"]).status == 503
        t0 = time.monotonic()
        assert client.get("/api/events/poll?wait=5", token=users["alice"]).status == 200
        assert time.monotonic() - t0 < 1
        theirs = Stream(app, "/api/events", users["bob"])
        theirs.read_until(ready)
        assert hub.counts() == {"sse": 2, "poll": 0, "max": 3}
        for s in (mine, theirs):
            s.gone = True
            s.finish(timeout=3)

    def test_the_hub_thread_stops_when_no_one_watches(self, make_app, users):
        app, _, hub = make_app(sse_max_s=0.2)
        Stream(app, "/api/events", users["alice"]).finish()
        deadline = time.monotonic() + 3
        while hub._thread is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert hub._thread is None


# -- against a real server ------------------------------------------------------------


def read_sse(resp, until, timeout):
    """Read a streaming requests response until until(events) is true."""
    buf, events = "", []
    deadline = time.time() + timeout
    for chunk in resp.iter_content(chunk_size=None, decode_unicode=True):
        buf += chunk
        *blocks, buf = buf.split("\n\n")
        for block in blocks:
            events += parse_sse(block + "\n\n")
        if until(events) or time.time() > deadline:
            break
    return events


def test_a_client_that_reconnects_with_last_event_id_gets_every_missed_event_once_in_order(tmp_path):
    with ServerProcess(tmp_path) as server:
        token = server.tokens["demo"]
        session = api(server, token)
        ids = [session.post(server.url + "/api/tasks", timeout=10, json={
            "provider": "demo", "params": {"prompt": f"p{i}", "duration_s": 1.5 + i * 0.2}}).json()["task"]["id"]
            for i in range(4)]
        received = []
        with requests.get(server.url + "/api/events?since=0", headers={"Authorization": f"Bearer {token}"},
                          stream=True, timeout=10) as first:
            assert first.status_code == 200
            received += task_events(read_sse(first, lambda ev: len(task_events(ev)) >= 6, timeout=10))
        assert len(received) >= 6
        last_id = received[-1]["seq"]
        # While disconnected the worker moves on; wait until it has.
        store = SqliteStore(str(tmp_path / "holdfast.db"))
        user = store.user_by_token(token)
        try:
            deadline = time.time() + 10
            while store.last_seq(user["id"]) <= last_id + 2 and time.time() < deadline:
                time.sleep(0.05)
            missed = [s for s, _ in store.events_since(user["id"], last_id, limit=10_000)]
            assert len(missed) >= 3, "nothing happened while the client was away"
            with requests.get(server.url + "/api/events?since=0", timeout=10, stream=True,
                              headers={"Authorization": f"Bearer {token}", "Last-Event-ID": str(last_id)}) as again:
                finished = lambda ev: sum(e["type"] == "finished" for e in task_events(ev)) >= len(ids)
                received += task_events(read_sse(again, lambda ev: finished(received + ev), timeout=20))
            truth = [s for s, _ in store.events_since(user["id"], 0, limit=10_000)]
        finally:
            store.close()
        seqs = [e["seq"] for e in received]
        assert seqs == truth, "every event exactly once, in order"
        assert set(missed) <= set(seqs[seqs.index(last_id) + 1:])
        assert {e["task_id"] for e in received if e["type"] == "finished"} == set(ids)


def open_raw_stream(port, token):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET /api/events?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 "Accept: text/event-stream\r\n\r\n".encode())
    return sock


def read_until(sock, needle, timeout):
    data = b""
    deadline = time.time() + timeout
    sock.settimeout(timeout)
    while needle not in data and time.time() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_with_200_streams_open_the_api_still_answers_and_every_stream_gets_the_news(tmp_path):
    n = 200
    # All 200 of one user (the worst case for fan-out): lift the per-user cap.
    with ServerProcess(tmp_path, env={"HOLDFAST_SSE_MAX_S": "60", "HOLDFAST_SSE_MAX_PER_USER": "200"}) as server:
        token = server.tokens["demo"]
        session = api(server, token)
        task_id = session.post(server.url + "/api/tasks", timeout=10, json={
            "provider": "demo", "params": {"prompt": "warm-up", "duration_s": 0}}).json()["task"]["id"]
        socks = []
        try:
            for _ in range(n):
                socks.append(open_raw_stream(server.port, token))
            for s in socks:
                head = read_until(s, b"event: ready", timeout=10)
                assert head.startswith(b"HTTP/1.1 200") and b"event: ready" in head, head[:200]
            health = session.get(server.url + "/healthz", timeout=10).json()
            assert health["streams"]["sse"] == n

            extra = open_raw_stream(server.port, token)
            assert read_until(extra, b"\r\n\r\n", timeout=10).startswith(b"HTTP/1.1 503")
            extra.close()

            timings = []
            for _ in range(50):
                t0 = time.perf_counter()
                res = session.get(f"{server.url}/api/tasks/{task_id}", timeout=5)
                timings.append(time.perf_counter() - t0)
                assert res.status_code == 200
            timings.sort()
            assert timings[-1] < 1.0, f"slowest GET /api/tasks/{{id}} took {timings[-1]:.3f}s"

            # The worker is not held up, and every stream hears of a new task.
            new_id = session.post(server.url + "/api/tasks", timeout=10, json={
                "provider": "demo", "params": {"prompt": "news", "duration_s": 0.5}}).json()["task"]["id"]
            pending = {s.fileno(): (s, b"") for s in socks}
            needle = f'"task_id":"{new_id}","type":"finished"'.encode()
            deadline = time.time() + 15
            while pending and time.time() < deadline:
                readable, _, _ = select.select([p[0] for p in pending.values()], [], [], 1)
                for s in readable:
                    fd = s.fileno()
                    data = pending[fd][1] + s.recv(65536)
                    if needle in data:
                        del pending[fd]
                    else:
                        pending[fd] = (s, data[-4096:])
            assert not pending, f"{len(pending)} of {n} streams never saw the task finish"
        finally:
            for s in socks:
                s.close()
        # Clients that leave free their threads at once, not at their next write.
        deadline = time.time() + 5
        while time.time() < deadline:
            if session.get(server.url + "/healthz", timeout=5).json()["streams"]["sse"] == 0:
                break
            time.sleep(0.1)
        assert session.get(server.url + "/healthz", timeout=5).json()["streams"]["sse"] == 0


def test_a_hub_woken_after_idling_reads_from_the_logs_end(sqlite_store):
    """Events written while no one watched are no one's news: the hub's
    first look after idling starts at the log's end, not where it slept."""
    from api.events import EventHub
    alice = sqlite_store.create_user("alice")[0]

    def write(n):
        for i in range(n):
            sqlite_store.submit(alice["id"], "demo", {"prompt": str(i)}, now=1.0, deadline_at=99.0)

    looked = []
    real = sqlite_store.latest_events
    sqlite_store.latest_events = lambda since: looked.append(since) or real(since)
    hub = EventHub(sqlite_store, max_waiters=4, check_s=0.05)
    first = hub.watch(alice["id"])
    write(1)
    deadline = time.monotonic() + 3
    while first.latest < sqlite_store.last_seq() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.latest == sqlite_store.last_seq()
    first.close()
    while hub._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hub._thread is None
    write(50)                                   # while the hub sleeps
    end = sqlite_store.last_seq()
    looked.clear()
    second = hub.watch(alice["id"])
    write(1)                                    # news for the new watcher
    while second.latest <= end and time.monotonic() < deadline:
        time.sleep(0.01)
    second.close()
    assert second.latest == end + 1
    assert looked and min(looked) >= end, looked


def test_waiters_of_one_user_share_their_reads_of_the_log(sqlite_store):
    """One event wakes every waiter of its user: they take one read's rows
    instead of each querying the log, and every one still gets the event."""
    from api.events import EventHub
    alice = sqlite_store.create_user("alice")[0]
    reads = []
    real = sqlite_store.events_since
    sqlite_store.events_since = lambda *a, **kw: reads.append(a) or real(*a, **kw)
    hub = EventHub(sqlite_store, max_waiters=64, check_s=2.0)
    since = sqlite_store.last_seq()
    waiting, got = threading.Barrier(41), []

    def wait_for_news():
        watch = hub.watch(alice["id"])
        try:
            waiting.wait(10)
            got.append(hub.poll(watch, alice["id"], since, wait_s=10)[0])
        finally:
            watch.close()

    threads = [threading.Thread(target=wait_for_news) for _ in range(40)]
    for t in threads:
        t.start()
    waiting.wait(10)
    time.sleep(0.3)                      # all 40 are waiting, their first reads done
    task, _ = sqlite_store.submit(alice["id"], "demo", {}, now=1.0, deadline_at=99.0)
    for t in threads:
        t.join(15)
    assert len(got) == 40 and all([row[0] for row in rows] == [since + 1] for rows in got)
    assert len(reads) < 20, f"{len(reads)} reads of the log for 40 waiters and one event"
