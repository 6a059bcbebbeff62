"""Bad input gets a 4xx JSON error and changes nothing; and whatever was
accepted, every answer holdfast gives afterwards is strict JSON (no NaN, no
Infinity, nothing too deep for a parser)."""

import json
import math
import socket

import pytest
import requests

from errors import InvalidInput
from store.schema import dumps
from support import ServerProcess

MAX_JSON_DEPTH = 64               # the documented limit (README, beside "Every error is")

UNDECODABLE = "\xff\xfe\x80"      # bytes as a WSGI server hands them over (latin-1): not UTF-8


def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON")


def strict(body):
    """json.loads as a strict parser would: no NaN or Infinity, no deep trap."""
    if isinstance(body, bytes):
        body = body.decode("utf-8")
    return json.loads(body, parse_constant=_refuse_constant)


def nested(depth, leaf=1):
    """A JSON text of `depth` arrays one inside the other (the outermost counts)."""
    return "[" * depth + json.dumps(leaf) + "]" * depth


@pytest.fixture
def alice(sqlite_store):
    """A user with a credit balance, so that a wrongly accepted task shows as a reservation."""
    return sqlite_store.create_user("alice", credits=10)[1]


def unchanged(store, name="alice"):
    user = store.user_by_name(name)
    return sum(store.task_counts().values()), store.last_seq(), user["credit_balance"], store.ledger()


def assert_refused(res, status=400, code=None):
    assert res.status == status, res
    error = strict(res.body)["error"]
    assert set(error) == {"code", "message"} and error["message"]
    if code:
        assert error["code"] == code, error


class TestUndecodableHeaders:
    @pytest.mark.parametrize("method, path, header", [
        ("GET", "/api/tasks", "Authorization"),
        ("POST", "/api/tasks", "Authorization"),
        ("POST", "/api/tasks", "Idempotency-Key"),
        ("GET", "/api/events", "Last-Event-ID"),
        ("GET", "/api/events", "Accept"),
        ("GET", "/healthz", "X-Anything"),
    ])
    def test_a_header_that_is_not_utf8_is_400_invalid_header(self, client, sqlite_store, alice,
                                                              method, path, header):
        before = unchanged(sqlite_store)
        headers = {header: UNDECODABLE if header != "Authorization" else "Bearer " + UNDECODABLE}
        res = client.request(method, path, token=None if header == "Authorization" else alice,
                             headers=headers, query={"since": "0"} if path == "/api/events" else None,
                             json_body={"provider": "demo", "params": {"prompt": "p"}} if method == "POST" else None)
        assert_refused(res, 400, "invalid_header")
        assert header.lower() in strict(res.body)["error"]["message"].lower()
        assert unchanged(sqlite_store) == before

    def test_over_a_real_server_raw_header_bytes_and_975_deep_bodies_are_400_and_create_nothing(self, tmp_path):
        with ServerProcess(tmp_path) as server:
            token = server.tokens["demo"].encode()
            body = b'{"provider": "demo", "params": {"prompt": "p"}}'
            raw_requests = [
                b"GET /api/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n",
                b"POST /api/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token +
                b"\r\nIdempotency-Key: k\xc3\x28\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body,
                b"GET /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token +
                b"\r\nLast-Event-ID: 1\xff\r\n\r\n",
            ]
            for raw in raw_requests:
                with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                    sock.sendall(raw)
                    reply = b""
                    while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                        chunk = sock.recv(65536)
                        if not chunk:
                            break
                        reply += chunk
                head, _, payload = reply.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 400"), reply[:300]
                assert b"application/json" in head
                assert strict(payload)["error"]["code"] == "invalid_header"
            # Deep enough to pass the parser on a server's shallow stack, and
            # then to break whatever encodes it next.
            session = requests.Session()
            session.headers["Authorization"] = "Bearer " + server.tokens["demo"]
            for depth in (975, 976, 977, 978):
                res = session.post(server.url + "/api/tasks", timeout=10, headers={"Content-Type": "application/json"},
                                   data='{"provider": "demo", "params": {"x": %s}}' % nested(depth - 2))
                assert res.status_code == 400, (depth, res.status_code, res.text[:300])
                assert strict(res.content)["error"]["code"] == "invalid_json"
            assert strict(session.get(server.url + "/api/tasks", timeout=10).content)["tasks"] == []


class TestNesting:
    def test_the_limit_is_64_levels_accepted_with_strict_answers_and_65_refused(self, client, sqlite_store, alice):
        # The body is one level: params are one level inside it.
        params = '{"prompt": "deep", "x": %s}' % nested(MAX_JSON_DEPTH - 2)
        res = client.post("/api/tasks", data='{"provider": "demo", "params": %s}' % params, token=alice)
        assert res.status == 201, res
        task = strict(res.body)["task"]
        assert strict(client.get(f"/api/tasks/{task['id']}", token=alice).body)["task"] == task
        events = strict(client.get("/api/events/poll", token=alice, query={"since": "0"}).body)["events"]
        assert [e["task"]["params"] for e in events] == [task["params"]]

        before = unchanged(sqlite_store)
        params = '{"prompt": "deeper", "x": %s}' % nested(MAX_JSON_DEPTH - 1)
        res = client.post("/api/tasks", data='{"provider": "demo", "params": %s}' % params, token=alice)
        assert_refused(res, 400, "invalid_json")
        assert unchanged(sqlite_store) == before

    @pytest.mark.parametrize("depth", [975, 978, 5000])
    def test_a_body_nested_deeper_than_the_limit_is_400_and_creates_nothing(
            self, client, sqlite_store, alice, depth):
        before = unchanged(sqlite_store)
        params = '{"prompt": "deep", "x": %s}' % nested(depth - 2)
        res = client.post("/api/tasks", data='{"provider": "demo", "params": %s}' % params, token=alice)
        assert_refused(res, 400, "invalid_json")
        assert "nested too deep" in strict(res.body)["error"]["message"]
        assert unchanged(sqlite_store) == before

    def test_session_data_obeys_the_same_limit(self, client, sqlite_store, alice):
        res = client.request("PUT", "/api/sessions/s1", token=alice,
                             data='{"messages": [], "data": {"d": %s}}' % nested(MAX_JSON_DEPTH - 1))
        assert_refused(res, 400)
        assert client.get("/api/sessions/s1", token=alice).status == 404


class TestNonFiniteNumbers:
    LITERALS = ["1e999", "-1e999", "1E400", "NaN", "Infinity", "-Infinity"]

    @pytest.mark.parametrize("where", ["params", "nested", "list"])
    def test_a_number_that_is_not_finite_is_400_anywhere_in_params(self, client, sqlite_store, alice, where):
        before = unchanged(sqlite_store)
        template = {
            "params": '{"prompt": "p", "n": %s}',
            "nested": '{"prompt": "p", "a": {"b": {"c": %s}}}',
            "list": '{"prompt": "p", "a": [1, 2, [%s]]}',
        }[where]
        for literal in self.LITERALS:
            res = client.post("/api/tasks", data='{"provider": "demo", "params": %s}' % (template % literal),
                              token=alice)
            assert_refused(res, 400)
            assert unchanged(sqlite_store) == before, literal

    def test_in_session_data_too(self, client, alice):
        for literal in self.LITERALS:
            res = client.request("PUT", "/api/sessions/s1", token=alice,
                                 data='{"messages": [{"role": "user", "content": "hi"}], "data": {"t": %s}}'
                                 % literal)
            assert_refused(res, 400)
            assert client.get("/api/sessions/s1", token=alice).status == 404, literal


class TestStoredJsonIsStrict:
    """store.dumps is the last guard: whatever reaches it is JSON a strict
    parser reads, or it is refused."""

    @pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, [1, {"a": math.inf}]])
    def test_dumps_refuses_numbers_that_are_not_finite(self, value):
        with pytest.raises(InvalidInput):
            dumps({"x": value})

    def test_dumps_refuses_values_past_the_nesting_limit(self):
        deep = json.loads(nested(MAX_JSON_DEPTH + 1))
        with pytest.raises(InvalidInput):
            dumps(deep)
        assert strict(dumps(json.loads(nested(MAX_JSON_DEPTH)))) == json.loads(nested(MAX_JSON_DEPTH))

    def test_dumps_refuses_a_value_too_deep_for_the_encoder_and_keeps_wide_ones(self):
        deep = []
        for _ in range(100_000):
            deep = [deep]
        with pytest.raises(InvalidInput, match="nested too deep"):
            dumps({"x": deep})
        # Many brackets, in lists side by side and inside strings, but shallow.
        wide = {"rows": [[i, {"v": [i]}] for i in range(500)], "text": "[{" * 500}
        assert strict(dumps(wide)) == wide

    def test_a_number_stored_before_the_checks_goes_out_as_null(self, client, sqlite_store, alice):
        """A row written by an older holdfast may hold Infinity: the task
        list must still parse."""
        task_id = client.post("/api/tasks", {"provider": "demo", "params": {"prompt": "p", "n": 1}},
                              token=alice).json()["task"]["id"]
        sqlite_store.db.execute_sql("UPDATE tasks SET params = ? WHERE id = ?",
                                    ('{"prompt":"p","n":Infinity}', task_id))
        for path in ("/api/tasks", f"/api/tasks/{task_id}"):
            res = client.get(path, token=alice)
            assert res.status == 200, res
            assert "null" in res.body.decode() and strict(res.body)

    def test_a_submit_through_the_store_with_infinity_creates_nothing(self, sqlite_store):
        user = sqlite_store.create_user("bob", credits=5)[0]
        before = unchanged(sqlite_store, "bob")
        with pytest.raises(InvalidInput):
            sqlite_store.submit(user["id"], "demo", {"prompt": "p", "n": math.inf}, now=1000.0,
                                deadline_at=2000.0, cost=1)
        assert unchanged(sqlite_store, "bob") == before


def test_after_every_input_the_server_accepts_every_answer_is_strict_json(client, sqlite_store, alice, worker,
                                                                         clock):
    """Edge cases that are valid JSON, then every hostile body of the tests
    above: whatever got in, nothing the API answers afterwards may fail a
    strict parser."""
    accepted = ['{"prompt": "edges", "big": 1e308, "tiny": 1e-400, "neg": -0.0, "int": %s}' % ("9" * 400),
                '{"prompt": "\\u00e9\\ud83e\\udd8a", "deep": %s}' % nested(MAX_JSON_DEPTH - 2)]
    hostile = ['{"prompt": "p", "n": %s}' % lit for lit in ("1e999", "-1e999", "NaN", "Infinity", "-Infinity")]
    hostile += ['{"prompt": "p", "x": %s}' % nested(d) for d in (MAX_JSON_DEPTH, 975, 978)]
    for params in accepted:
        res = client.post("/api/tasks", data='{"provider": "demo", "params": %s}' % params, token=alice)
        assert res.status == 201, res
    for params in hostile:
        client.post("/api/tasks", data='{"provider": "demo", "params": %s}' % params, token=alice)
        client.request("PUT", "/api/sessions/s1", token=alice,
                       data='{"messages": [], "data": {"p": %s}}' % params)
    client.request("PUT", "/api/sessions/s2", token=alice, data='{"messages": [], "data": {"n": 1e308}}')
    for _ in range(10):                         # the demo tasks run to their end
        worker.run_once(clock())
        clock.advance(1)
    listed = strict(client.get("/api/tasks", token=alice).body)["tasks"]
    assert len(listed) == len(accepted)
    paths = ["/api/tasks", "/api/tasks?status=terminal", "/api/me", "/api/events/poll?since=0",
             "/api/sessions/s1", "/api/sessions/s2", "/api/providers", "/healthz", "/openapi.json"]
    paths += [f"/api/tasks/{t['id']}" for t in listed]
    for path in paths:
        res = client.get(path, token=alice)
        assert res.status != 500, (path, res)     # /healthz is 503: this worker's scheduler is not started
        strict(res.body)
