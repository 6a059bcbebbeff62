"""Conversation sessions over HTTP: per user and key, at most 40 messages
(oldest dropped), expiring HOLDFAST_SESSION_TTL_S after the last write (a test
clock), durable across a restart of the real server."""

import json
import threading

import pytest
import requests

from store import JsonStore, SqliteStore
from support import ServerProcess, api


def msg(i, role="user"):
    return {"role": role, "content": f"message {i}"}


def sessions_table(store):
    return store.export_rows()["sessions"]


@pytest.fixture
def alice(users):
    return users["alice"]


@pytest.fixture
def bob(users):
    return users["bob"]


class TestBasics:
    def test_put_get_append_delete(self, client, alice, clock, config):
        res = client.request("PUT", "/api/sessions/chat-1", json_body={"messages": [msg(0, "system"), msg(1)],
                                                                        "data": {"model": "m1"}}, token=alice)
        assert res.status == 200, res
        put = res.json()["session"]
        assert put["key"] == "chat-1" and put["messages"] == [msg(0, "system"), msg(1)]
        assert put["data"] == {"model": "m1"} and res.json()["dropped"] == 0
        assert client.get("/api/sessions/chat-1", token=alice).json()["session"] == put
        clock.advance(10)
        res = client.post("/api/sessions/chat-1/messages", msg(2, "assistant"), token=alice)
        assert res.status == 200 and res.json()["dropped"] == 0
        got = client.get("/api/sessions/chat-1", token=alice).json()["session"]
        assert got["messages"] == [msg(0, "system"), msg(1), msg(2, "assistant")] and got["data"] == {"model": "m1"}
        assert got["updated_at"] > put["updated_at"] and got["expires_at"] > put["expires_at"]
        assert client.request("DELETE", "/api/sessions/chat-1", token=alice).status == 204
        gone = client.get("/api/sessions/chat-1", token=alice)
        assert gone.status == 404 and gone.json()["error"]["code"] == "session_not_found"
        assert client.request("DELETE", "/api/sessions/chat-1", token=alice).status == 404

    def test_posting_to_a_missing_session_creates_it(self, client, alice):
        res = client.post("/api/sessions/new/messages", {"messages": [msg(1), msg(2, "assistant")]}, token=alice)
        assert res.status == 200 and res.json()["session"]["messages"] == [msg(1), msg(2, "assistant")]
        assert res.json()["session"]["data"] is None

    def test_at_most_40_messages_are_kept_oldest_dropped(self, client, alice, sqlite_store):
        for i in range(30):
            assert client.post("/api/sessions/long/messages", msg(i), token=alice).json()["dropped"] == 0
        res = client.post("/api/sessions/long/messages", {"messages": [msg(i) for i in range(30, 45)]}, token=alice)
        assert res.json()["dropped"] == 5
        kept = client.get("/api/sessions/long", token=alice).json()["session"]["messages"]
        assert kept == [msg(i) for i in range(5, 45)]
        res = client.request("PUT", "/api/sessions/long", json_body={"messages": [msg(i) for i in range(100, 150)]},
                             token=alice)
        assert res.json()["dropped"] == 10
        assert res.json()["session"]["messages"] == [msg(i) for i in range(110, 150)]
        [row] = sessions_table(sqlite_store)
        assert len(json.loads(row["messages"])) == 40

    def test_concurrent_appends_lose_nothing(self, client, alice):
        def append(n):
            for i in range(10):
                assert client.post("/api/sessions/busy/messages", msg(f"{n}-{i}"), token=alice).status == 200

        threads = [threading.Thread(target=append, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        kept = client.get("/api/sessions/busy", token=alice).json()["session"]["messages"]
        assert sorted(m["content"] for m in kept) == sorted(f"message {n}-{i}" for n in range(4) for i in range(10))
        for n in range(4):
            mine = [m["content"] for m in kept if m["content"].startswith(f"message {n}-")]
            assert mine == [f"message {n}-{i}" for i in range(10)]


class TestExpiry:
    def test_a_session_expires_ttl_after_its_last_write_and_reads_do_not_extend_it(self, client, alice, clock,
                                                                                    config):
        config.session_ttl_s = 100.0
        client.request("PUT", "/api/sessions/s", json_body={"messages": [msg(1)]}, token=alice)
        clock.advance(60)
        client.post("/api/sessions/s/messages", msg(2), token=alice)         # written at 60: expires at 160
        clock.advance(99.9)
        assert client.get("/api/sessions/s", token=alice).status == 200      # reading does not extend it
        clock.advance(0.1)
        res = client.get("/api/sessions/s", token=alice)
        assert res.status == 404 and res.json()["error"]["code"] == "session_not_found"
        assert client.request("DELETE", "/api/sessions/s", token=alice).status == 404

    def test_writing_to_an_expired_session_starts_it_empty(self, client, alice, clock, config):
        config.session_ttl_s = 100.0
        client.request("PUT", "/api/sessions/s", json_body={"messages": [msg(1)], "data": {"a": 1}}, token=alice)
        clock.advance(100)
        res = client.post("/api/sessions/s/messages", msg(2), token=alice)
        assert res.status == 200
        assert res.json()["session"]["messages"] == [msg(2)] and res.json()["session"]["data"] is None

    def test_expiry_uses_the_configured_ttl(self, client, alice, clock, config):
        config.session_ttl_s = 7200.0
        client.request("PUT", "/api/sessions/s", json_body={}, token=alice)
        clock.advance(7199)
        assert client.get("/api/sessions/s", token=alice).status == 200
        clock.advance(1)
        assert client.get("/api/sessions/s", token=alice).status == 404


class TestLimits:
    def test_a_user_has_at_most_max_sessions_live_sessions(self, client, alice, bob, clock, config, sqlite_store):
        config.max_sessions = 3
        config.session_ttl_s = 100.0
        for key in ("a", "b", "c"):
            assert client.request("PUT", f"/api/sessions/{key}", json_body={}, token=alice).status == 200
        before = sessions_table(sqlite_store)
        for method, path, body in (("PUT", "/api/sessions/d", {}), ("POST", "/api/sessions/d/messages", msg(1))):
            res = client.request(method, path, json_body=body, token=alice)
            assert res.status == 409 and res.json()["error"]["code"] == "too_many_sessions", res
        assert sessions_table(sqlite_store) == before
        assert client.post("/api/sessions/a/messages", msg(1), token=alice).status == 200   # an existing one
        assert client.request("PUT", "/api/sessions/d", json_body={}, token=bob).status == 200   # bob's own count
        client.request("DELETE", "/api/sessions/b", token=alice)
        assert client.request("PUT", "/api/sessions/d", json_body={}, token=alice).status == 200
        clock.advance(100)                              # all of alice's expire: they count no more
        for key in ("e", "f", "g"):
            assert client.request("PUT", f"/api/sessions/{key}", json_body={}, token=alice).status == 200
        alice_id = sqlite_store.user_by_name("alice")["id"]
        assert sorted(r["key"] for r in sessions_table(sqlite_store) if r["user_id"] == alice_id) == ["e", "f", "g"]

    def test_me_shows_the_session_limits(self, client, alice, config):
        limits = client.get("/api/me", token=alice).json()["limits"]
        assert limits["session_messages"] == 40 and limits["max_sessions"] == config.max_sessions
        assert limits["message_chars"] == 16000 and limits["session_data_bytes"] == 16384


class TestIsolation:
    def test_another_users_session_with_the_same_key_is_a_different_session(self, client, alice, bob):
        client.request("PUT", "/api/sessions/chat", json_body={"messages": [msg("alice")], "data": {"k": 1}},
                       token=alice)
        theirs = client.get("/api/sessions/chat", token=bob)
        missing = client.get("/api/sessions/nothing-here", token=bob)
        assert theirs.status == 404 and theirs.json() == missing.json()
        assert client.request("DELETE", "/api/sessions/chat", token=bob).status == 404
        res = client.post("/api/sessions/chat/messages", msg("bob"), token=bob)
        assert res.json()["session"]["messages"] == [msg("bob")] and res.json()["session"]["data"] is None
        client.request("PUT", "/api/sessions/chat", json_body={"messages": []}, token=bob)
        client.request("DELETE", "/api/sessions/chat", token=bob)
        mine = client.get("/api/sessions/chat", token=alice).json()["session"]
        assert mine["messages"] == [msg("alice")] and mine["data"] == {"k": 1}

    @pytest.mark.parametrize("method,path", [("GET", "/api/sessions/x"), ("PUT", "/api/sessions/x"),
                                             ("DELETE", "/api/sessions/x"), ("POST", "/api/sessions/x/messages")])
    def test_missing_or_unknown_token_is_401(self, client, method, path, sqlite_store):
        for token in (None, "hf_unknown_token_123"):
            res = client.request(method, path, json_body={"role": "user", "content": "x"}, token=token)
            assert res.status == 401 and res.json()["error"]["code"] == "unauthorized"
        assert sessions_table(sqlite_store) == []


BIG = "x" * 16001
BAD = [
    ("PUT", "/api/sessions/-starts-with-dash", b"{}", 400, "invalid_session_key"),
    ("PUT", "/api/sessions/" + "k" * 129, b"{}", 400, "invalid_session_key"),
    ("PUT", "/api/sessions/a b", b"{}", 400, "invalid_session_key"),
    ("PUT", "/api/sessions/caf\u00c3\u00a9", b"{}", 400, "invalid_session_key"),
    ("GET", "/api/sessions/a b", b"", 400, "invalid_session_key"),
    ("DELETE", "/api/sessions/a b", b"", 400, "invalid_session_key"),
    ("POST", "/api/sessions/a b/messages", b'{"role": "user", "content": "x"}', 400, "invalid_session_key"),
    ("PUT", "/api/sessions/ok", b"", 400, "invalid_json"),
    ("PUT", "/api/sessions/ok", b"[]", 400, "invalid_json"),
    ("PUT", "/api/sessions/ok", b'{"messages": [', 400, "invalid_json"),
    ("PUT", "/api/sessions/ok", b'{"messages": "hi"}', 400, "invalid_input"),
    ("PUT", "/api/sessions/ok", b'{"messages": null}', 400, "invalid_input"),
    ("PUT", "/api/sessions/ok", b'{"messages": ["hi"]}', 400, "invalid_input"),
    ("PUT", "/api/sessions/ok", b'{"messages": [{"role": "user"}]}', 400, "invalid_input"),
    ("PUT", "/api/sessions/ok", b'{"messages": [{"role": "robot", "content": "x"}]}', 400, "invalid_input"),
    ("PUT", "/api/sessions/ok", b'{"messages": [{"role": "user", "content": 5}]}', 400, "invalid_input"),
    ("PUT", "/api/sessions/ok", b'{"messages": [{"role": ["user"], "content": "x"}]}', 400, "invalid_input"),
    ("POST", "/api/sessions/ok/messages", b'{"role": {"a": 1}, "content": "x"}', 400, "invalid_input"),
    ("PUT", "/api/sessions/ok", b'{"messages": [{"role": "user", "content": "x", "at": 1}]}', 400,
     "invalid_input"),
    ("PUT", "/api/sessions/ok", b'{"messages": [{"role": "user", "content": "' + BIG.encode() + b'"}]}', 400,
     "invalid_input"),
    ("PUT", "/api/sessions/ok", b'{"data": [1, 2]}', 400, "invalid_input"),
    ("PUT", "/api/sessions/ok", b'{"data": "text"}', 400, "invalid_input"),
    ("PUT", "/api/sessions/ok", b'{"data": {"blob": "' + b"y" * 16400 + b'"}}', 400, "invalid_input"),
    ("PUT", "/api/sessions/ok", b'{"msgs": []}', 400, "invalid_input"),
    ("PUT", "/api/sessions/ok", b'{"messages": [], "data": {"n": NaN}}', 400, "invalid_json"),
    ("PUT", "/api/sessions/ok", b'{"data": {"a": "' + b"z" * 70000 + b'"}}', 413, "too_large"),
    ("POST", "/api/sessions/ok/messages", b"{}", 400, "invalid_input"),
    ("POST", "/api/sessions/ok/messages", b'{"messages": []}', 400, "invalid_input"),
    ("POST", "/api/sessions/ok/messages", b'{"messages": [{"role": "user", "content": "x"}], "x": 1}', 400,
     "invalid_input"),
    ("POST", "/api/sessions/ok/messages", b'{"role": "user", "content": "x", "extra": 1}', 400, "invalid_input"),
    ("POST", "/api/sessions/ok/messages", b'{"role": "user", "content": ["parts"]}', 400, "invalid_input"),
    ("PATCH", "/api/sessions/ok", b"{}", 405, "method_not_allowed"),
]


@pytest.mark.parametrize("method,path,body,status,code", BAD, ids=[f"{b[0]} {b[1][14:30]} {b[2][:30]!r}" for b in BAD])
def test_bad_session_input_is_a_4xx_json_error_and_changes_nothing(client, alice, sqlite_store, method, path, body,
                                                                   status, code):
    client.request("PUT", "/api/sessions/ok", json_body={"messages": [msg(1)], "data": {"keep": True}}, token=alice)
    before = sessions_table(sqlite_store)
    res = client.request(method, path, data=body, token=alice)
    assert res.status == status, res
    assert res.headers["content-type"].startswith("application/json")
    assert res.json()["error"]["code"] == code and res.json()["error"]["message"]
    assert "Traceback" not in res.body.decode()
    assert sessions_table(sqlite_store) == before


# -- durability ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["sqlite", "json"])
def test_sessions_survive_reopening_the_store(tmp_path, backend):
    def open_store():
        return SqliteStore(str(tmp_path / "holdfast.db")) if backend == "sqlite" else JsonStore(str(tmp_path))

    store = open_store()
    user = store.create_user("alice")[0]
    store.put_session(user["id"], "chat", messages=[msg(1)], data={"m": 1}, now=100.0, ttl_s=50.0)
    store.append_messages(user["id"], "chat", [msg(2)], now=110.0, ttl_s=50.0)
    store.close()
    store = open_store()
    try:
        got = store.get_session(user["id"], "chat", now=159.0)
        assert got["messages"] == [msg(1), msg(2)] and got["data"] == {"m": 1} and got["expires_at"] == 160.0
    finally:
        store.close()


def test_a_session_survives_a_server_restart_and_kill_9(tmp_path):
    server = ServerProcess(tmp_path).start()
    try:
        token, admin_token = server.tokens["demo"], server.tokens["admin"]
        session = api(server, token)
        url = server.url + "/api/sessions/conversation-1"
        assert session.put(url, json={"messages": [msg(1)], "data": {"model": "m"}}, timeout=10).status_code == 200
        server.stop()
        server = ServerProcess(tmp_path, port=server.port).start()
        assert session.post(url + "/messages", json=msg(2, "assistant"), timeout=10).status_code == 200
        server.kill()
        server = ServerProcess(tmp_path, port=server.port).start()
        got = session.get(url, timeout=10).json()["session"]
        assert got["messages"] == [msg(1), msg(2, "assistant")] and got["data"] == {"model": "m"}
        other = requests.get(url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=10)
        assert other.status_code == 404 and other.json()["error"]["code"] == "session_not_found"
    finally:
        server.stop()
