"""The HTTP API in-process: a temporary SQLite store, the demo provider, and a
worker moved by a test clock."""

import hashlib
import json
import socket

import pytest
import requests

from support import ServerProcess, api, run_until_done


def submit(client, token, params=None, **body):
    return client.post("/api/tasks", {"provider": "demo", "params": params or {"prompt": "a red fox"}, **body},
                       token=token)


def counts(store):
    return sum(store.task_counts().values()), store.last_seq()


class TestDemoTask:
    def test_a_demo_task_succeeds_and_its_png_is_served_with_its_checksum(self, client, users, worker, clock):
        res = submit(client, users["alice"])
        assert res.status == 201, res
        body = res.json()
        assert body["deduplicated"] is False and body["task"]["status"] == "queued"
        task = run_until_done(worker, clock, client, users["alice"], body["task"]["id"])
        assert task["status"] == "succeeded" and task["progress"] == 1.0 and task["attempts"] == 1
        [meta] = task["files"]
        png = client.get(meta["url"], token=users["alice"])
        assert png.status == 200 and png.headers["content-type"] == "image/png"
        assert png.body.startswith(b"\x89PNG\r\n\x1a\n")
        assert hashlib.sha256(png.body).hexdigest() == meta["sha256"] and len(png.body) == meta["size"]

    def test_progress_and_steps_are_reported_while_running(self, client, users, worker, clock):
        task_id = submit(client, users["alice"]).json()["task"]["id"]
        seen = set()
        for _ in range(6):
            worker.run_once(clock())
            task = client.get(f"/api/tasks/{task_id}", token=users["alice"]).json()["task"]
            seen.add((task["status"], task["step"]))
            clock.advance(0.5)
        assert ("running", "painting") in seen and ("running", "sketching") in seen

    def test_params_fail_makes_it_fail_with_provider_rejected(self, client, users, worker, clock):
        task_id = submit(client, users["alice"], {"prompt": "x", "fail": "no foxes today"}).json()["task"]["id"]
        task = run_until_done(worker, clock, client, users["alice"], task_id)
        assert task["status"] == "failed"
        assert task["error"] == {"code": "provider_rejected", "message": "no foxes today"}
        assert task["files"] == []

    def test_cancel_then_cancel_again_is_a_conflict(self, client, users, worker, clock):
        task_id = submit(client, users["alice"]).json()["task"]["id"]
        worker.run_once(clock())
        res = client.post(f"/api/tasks/{task_id}/cancel", token=users["alice"])
        assert res.status == 200 and res.json()["task"]["status"] == "cancelled"
        again = client.post(f"/api/tasks/{task_id}/cancel", token=users["alice"])
        assert again.status == 409 and again.json()["error"]["code"] == "task_finished"
        clock.advance(5)
        worker.run_once(clock())
        assert client.get(f"/api/tasks/{task_id}", token=users["alice"]).json()["task"]["status"] == "cancelled"

    def test_retry_makes_a_new_task_and_only_from_failed_or_cancelled(self, client, users, worker, clock):
        task_id = submit(client, users["alice"]).json()["task"]["id"]
        assert client.post(f"/api/tasks/{task_id}/retry", token=users["alice"]).status == 409
        client.post(f"/api/tasks/{task_id}/cancel", token=users["alice"])
        res = client.post(f"/api/tasks/{task_id}/retry", token=users["alice"])
        assert res.status == 201
        new = res.json()["task"]
        assert new["retry_of"] == task_id and new["id"] != task_id and new["params"] == {"prompt": "a red fox"}

    def test_a_second_retry_returns_the_live_retry_until_it_ends_badly(self, client, users):
        task_id = submit(client, users["alice"]).json()["task"]["id"]
        client.post(f"/api/tasks/{task_id}/cancel", token=users["alice"])
        first = client.post(f"/api/tasks/{task_id}/retry", token=users["alice"])
        again = client.post(f"/api/tasks/{task_id}/retry", token=users["alice"])
        assert (first.status, first.json()["deduplicated"]) == (201, False)
        assert (again.status, again.json()["deduplicated"]) == (200, True)
        assert again.json()["task"]["id"] == first.json()["task"]["id"]
        client.post(f"/api/tasks/{first.json()['task']['id']}/cancel", token=users["alice"])
        third = client.post(f"/api/tasks/{task_id}/retry", token=users["alice"])
        assert third.status == 201 and third.json()["task"]["id"] != first.json()["task"]["id"]
        assert len(client.get("/api/tasks", token=users["alice"]).json()["tasks"]) == 3


class TestDedupe:
    def test_dedupe_key_and_idempotency_key_return_the_same_task(self, client, users):
        first = submit(client, users["alice"], dedupe_key="order-123")
        again = submit(client, users["alice"], dedupe_key="order-123")
        by_header = client.post("/api/tasks", {"provider": "demo", "params": {}}, token=users["alice"],
                                headers={"Idempotency-Key": "order-123"})
        assert first.status == 201 and again.status == 200 and by_header.status == 200
        assert again.json()["deduplicated"] is True
        assert first.json()["task"]["id"] == again.json()["task"]["id"] == by_header.json()["task"]["id"]

    def test_conflicting_keys_are_refused(self, client, users, sqlite_store):
        before = counts(sqlite_store)
        res = client.post("/api/tasks", {"provider": "demo", "params": {}, "dedupe_key": "a"},
                          token=users["alice"], headers={"Idempotency-Key": "b"})
        assert res.status == 400 and counts(sqlite_store) == before


class TestIsolation:
    def test_another_users_task_file_and_cancel_are_404(self, client, users, worker, clock):
        task_id = submit(client, users["alice"]).json()["task"]["id"]
        task = run_until_done(worker, clock, client, users["alice"], task_id)
        url = task["files"][0]["url"]
        bob = users["bob"]
        missing = "t_" + "0" * 26
        for method, path in (("GET", f"/api/tasks/{task_id}"), ("GET", url),
                             ("POST", f"/api/tasks/{task_id}/cancel"), ("POST", f"/api/tasks/{task_id}/retry")):
            theirs = client.request(method, path, token=bob)
            nothing = client.request(method, path.replace(task_id, missing), token=bob)
            assert theirs.status == 404, (method, path, theirs)
            assert theirs.json() == nothing.json(), "another user's task must look like a missing one"
        assert client.get("/api/tasks", token=bob).json()["tasks"] == []
        assert client.get(f"/api/tasks/{task_id}", token=users["alice"]).json()["task"]["status"] == "succeeded"


class TestBadInput:
    BAD = [
        ("malformed json", b'{"provider": "demo", ', 400, "invalid_json"),
        ("not an object", b'["demo"]', 400, "invalid_json"),
        ("empty body", b"", 400, "invalid_json"),
        ("NaN", b'{"provider": "demo", "params": {"x": NaN}}', 400, "invalid_json"),
        ("provider missing", b'{"params": {}}', 400, "invalid_input"),
        ("provider wrong type", b'{"provider": 3}', 400, "invalid_input"),
        ("unknown provider", b'{"provider": "nope"}', 400, "unknown_provider"),
        ("params wrong type", b'{"provider": "demo", "params": "x"}', 400, "invalid_input"),
        ("prompt wrong type", b'{"provider": "demo", "params": {"prompt": 5}}', 400, "invalid_input"),
        ("duration out of range", b'{"provider": "demo", "params": {"duration_s": -1}}', 400, "invalid_input"),
        ("dedupe key wrong type", b'{"provider": "demo", "dedupe_key": 7}', 400, "invalid_input"),
        ("dedupe key too long", b'{"provider": "demo", "dedupe_key": "' + b"k" * 201 + b'"}', 400,
         "invalid_input"),
        ("unknown field", b'{"provider": "demo", "prio": 1}', 400, "invalid_input"),
        ("deep nesting", b'{"provider": "demo", "params": {"a": ' + b"[" * 100000 + b"]" * 100000 + b"}}",
         413, "too_large"),
        # Strings no store can keep: an unpaired surrogate (as an escape or as
        # raw bytes), a NUL; in values and keys, at any depth.
        ("lone surrogate", b'{"provider": "demo", "params": {"prompt": "a\\ud800b"}}', 400, "invalid_json"),
        ("lone low surrogate", b'{"provider": "demo", "params": {"prompt": "\\udc00"}}', 400, "invalid_json"),
        ("surrogate as raw bytes", b'{"provider": "demo", "params": {"prompt": "\xed\xa0\x80"}}', 400,
         "invalid_json"),
        ("surrogate in a key", b'{"provider": "demo", "params": {"\\ud800": 1}}', 400, "invalid_json"),
        ("surrogate deep in a list", b'{"provider": "demo", "params": {"a": [1, {"b": ["x", "\\udfff"]}]}}', 400,
         "invalid_json"),
        ("NUL", b'{"provider": "demo", "params": {"prompt": "a\\u0000b"}}', 400, "invalid_input"),
        ("NUL in a key", b'{"provider": "demo", "params": {"a\\u0000": 1}}', 400, "invalid_input"),
        # JSON in UTF-16 and UTF-32 (json.loads reads both): the escapes are not UTF-8 bytes.
        ("NUL in UTF-16", '{"provider": "demo", "params": {"prompt": "a\\u0000b"}}'.encode("utf-16"), 400,
         "invalid_input"),
        ("surrogate in UTF-32", '{"provider": "demo", "params": {"prompt": "\\ud800"}}'.encode("utf-32"), 400,
         "invalid_json"),
        ("NUL deep in a list", b'{"provider": "demo", "params": {"a": [[{"b": "\\u0000"}]]}}', 400,
         "invalid_input"),
    ]

    @pytest.mark.parametrize("name,body,status,code", BAD, ids=[b[0] for b in BAD])
    def test_bad_submissions_get_a_4xx_json_error_and_write_nothing(self, client, users, sqlite_store,
                                                                    name, body, status, code):
        before = counts(sqlite_store)
        res = client.request("POST", "/api/tasks", data=body, token=users["alice"])
        assert res.status == status, res
        assert res.headers["content-type"].startswith("application/json")
        err = res.json()["error"]
        assert err["code"] == code and err["message"]
        assert "Traceback" not in res.body.decode()
        assert counts(sqlite_store) == before

    def test_a_paired_surrogate_is_an_ordinary_character(self, client, users):
        res = client.request("POST", "/api/tasks", data=b'{"provider": "demo", "params": {"prompt": "\\ud83e\\udd8a"}}',
                             token=users["alice"])
        assert res.status == 201 and res.json()["task"]["params"] == {"prompt": "\U0001f98a"}

    @pytest.mark.parametrize("method,path,body,code,says", [
        ("PUT", "/api/sessions/chat", b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
         "invalid_json", "surrogate"),
        ("PUT", "/api/sessions/chat", b'{"messages": [], "data": {"\\udbff": 1}}', "invalid_json", "surrogate"),
        ("POST", "/api/sessions/chat/messages", b'{"role": "user", "content": "\\udc00"}', "invalid_json",
         "surrogate"),
        ("PUT", "/api/sessions/chat", b'{"messages": [{"role": "user", "content": "a\\u0000"}]}', "invalid_input",
         "NUL"),
        ("POST", "/api/sessions/chat/messages", b'{"messages": [{"role": "user", "content": "\\u0000"}]}',
         "invalid_input", "NUL"),
        ("PUT", "/api/sessions/chat", b'{"data": {"k": ["\\u0000"]}}', "invalid_input", "NUL"),
    ])
    def test_unstorable_strings_in_sessions_are_400_and_change_nothing(self, client, users, sqlite_store,
                                                                       method, path, body, code, says):
        client.request("PUT", "/api/sessions/chat", json_body={"messages": [{"role": "user", "content": "kept"}]},
                       token=users["alice"])
        before = sqlite_store.export_rows()["sessions"]
        res = client.request(method, path, data=body, token=users["alice"])
        assert res.status == 400, res
        err = res.json()["error"]
        assert err["code"] == code and says in err["message"]
        assert sqlite_store.export_rows()["sessions"] == before

    def test_deeply_nested_json_under_the_size_limit_is_a_400(self, client, users, sqlite_store):
        before = counts(sqlite_store)
        body = b'{"provider": "demo", "params": {"a": ' + b"[" * 20000 + b"]" * 20000 + b"}}"
        res = client.request("POST", "/api/tasks", data=body, token=users["alice"])
        assert res.status == 400 and res.json()["error"]["code"] == "invalid_json"
        assert counts(sqlite_store) == before

    def test_a_body_over_the_limit_is_413(self, client, users, sqlite_store, config):
        before = counts(sqlite_store)
        body = json.dumps({"provider": "demo", "params": {"prompt": "x" * config.max_body}}).encode()
        res = client.request("POST", "/api/tasks", data=body, token=users["alice"])
        assert res.status == 413 and res.json()["error"]["code"] == "too_large"
        lying = client.request("POST", "/api/tasks", data=b"{}", token=users["alice"],
                               headers={"Content-Length": str(config.max_body + 1)})
        assert lying.status == 413
        assert counts(sqlite_store) == before

    @pytest.mark.parametrize("token", [None, "", "hf_wrong", "Basic abc"])
    def test_missing_or_unknown_token_is_401(self, client, sqlite_store, token):
        before = counts(sqlite_store)
        for method, path in (("POST", "/api/tasks"), ("GET", "/api/tasks"), ("GET", "/api/me"),
                             ("GET", "/api/tasks/t_" + "0" * 26)):
            res = client.request(method, path, data=b'{"provider": "demo"}', token=token)
            assert res.status == 401 and res.json()["error"]["code"] == "unauthorized"
        assert counts(sqlite_store) == before

    @pytest.mark.parametrize("query,message", [
        ({"limit": "0"}, "limit"), ({"limit": "201"}, "limit"), ({"limit": "x"}, "limit"),
        ({"status": "done"}, "status"), ({"before": "'; drop"}, "before"),
    ])
    def test_bad_list_queries_are_400(self, client, users, query, message):
        res = client.get("/api/tasks", query=query, token=users["alice"])
        assert res.status == 400 and message in res.json()["error"]["message"]

    def test_unknown_routes_and_methods_are_json(self, client, users):
        assert client.get("/api/nothing", token=users["alice"]).json()["error"]["code"] == "not_found"
        res = client.request("DELETE", "/api/tasks", token=users["alice"])
        assert res.status == 405 and res.json()["error"]["code"] == "method_not_allowed"

    def test_a_bad_task_id_or_file_name_is_404(self, client, users):
        for path in ("/api/tasks/..%2F..%2Fetc", "/api/tasks/t_" + "0" * 26 + "/files/..%2Fx",
                     "/api/tasks/t_" + "0" * 26 + "/files/out_0.png"):
            res = client.get(path, token=users["alice"])
            assert res.status == 404, path


class TestListAndMe:
    def test_list_filters_and_pages(self, client, users, clock):
        ids = []
        for i in range(3):
            ids.append(submit(client, users["alice"]).json()["task"]["id"])
            clock.advance(1)
        client.post(f"/api/tasks/{ids[0]}/cancel", token=users["alice"])
        page = client.get("/api/tasks", query={"limit": "2"}, token=users["alice"]).json()
        assert [t["id"] for t in page["tasks"]] == ids[::-1][:2] and page["next"]
        rest = client.get("/api/tasks", query={"before": page["next"]}, token=users["alice"]).json()
        assert [t["id"] for t in rest["tasks"]] == [ids[0]] and rest["next"] is None
        active = client.get("/api/tasks", query={"status": "active"}, token=users["alice"]).json()
        assert sorted(t["id"] for t in active["tasks"]) == sorted(ids[1:])
        terminal = client.get("/api/tasks", query={"status": "cancelled,failed"}, token=users["alice"]).json()
        assert [t["id"] for t in terminal["tasks"]] == [ids[0]]

    def test_the_retries_of_a_task_are_listed_by_retry_of(self, client, users):
        alice = users["alice"]
        first = submit(client, alice).json()["task"]["id"]
        submit(client, alice, {"prompt": "another"})
        client.post(f"/api/tasks/{first}/cancel", token=alice)
        retry = client.post(f"/api/tasks/{first}/retry", token=alice).json()["task"]["id"]
        found = client.get("/api/tasks", query={"retry_of": first}, token=alice).json()
        assert [t["id"] for t in found["tasks"]] == [retry] and found["next"] is None
        assert client.get("/api/tasks", query={"retry_of": retry}, token=alice).json()["tasks"] == []
        assert client.get("/api/tasks", query={"retry_of": first}, token=users["bob"]).json()["tasks"] == []
        bad = client.get("/api/tasks", query={"retry_of": "../x"}, token=alice)
        assert bad.status == 400 and bad.json()["error"]["code"] == "invalid_input"
        assert "retry_of" in bad.json()["error"]["message"]

    def test_a_tasks_timeline_is_its_events_oldest_first_and_only_its_owners(self, client, users, worker, clock):
        alice = users["alice"]
        task_id = submit(client, alice, {"prompt": "x", "fail": "no foxes today"}).json()["task"]["id"]
        submit(client, alice)
        task = run_until_done(worker, clock, client, alice, task_id)
        res = client.get(f"/api/tasks/{task_id}/events", token=alice)
        assert res.status == 200
        body = res.json()
        assert body["truncated"] is False
        events = body["events"]
        assert events[0]["type"] == "created" and events[0]["status"] == "queued"
        assert events[-1]["type"] == "finished" and events[-1]["status"] == "failed"
        assert events[-1]["error"] == {"code": "provider_rejected", "message": "no foxes today"}
        assert events[-1]["version"] == task["version"] and len(events) == task["version"]
        assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
        assert {"running"} <= {e["status"] for e in events}
        assert set(events[0]) == {"seq", "type", "at", "status", "step", "progress", "attempts", "error",
                                  "credits", "version"}
        assert events[-1]["at"] == task["finished_at"]
        for path in (f"/api/tasks/{task_id}/events", "/api/tasks/t_" + "0" * 26 + "/events",
                     "/api/tasks/not-an-id/events"):
            token = users["bob"] if task_id in path else alice
            res = client.get(path, token=token)
            assert res.status == 404 and res.json()["error"]["code"] == "task_not_found", path

    def test_me_and_providers(self, client, users):
        me = client.get("/api/me", token=users["alice"]).json()
        assert me["user"]["name"] == "alice" and me["credits"] is None and me["limits"]["max_active"] > 0
        providers = client.get("/api/providers", token=users["alice"]).json()["providers"]
        assert [p["name"] for p in providers] == ["demo"]


def peak_rss(pid):
    """The process's peak resident memory in bytes (Linux)."""
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


class TestARealServer:
    MAX_BODY = 64 * 1024

    def test_every_oversized_body_gets_the_json_413_and_the_server_goes_on(self, tmp_path):
        """waitress refuses a body past its own limit before the app runs:
        that answer must be holdfast's JSON too, and the body is never held."""
        with ServerProcess(tmp_path, env={"HOLDFAST_MAX_BODY": str(self.MAX_BODY)}) as server:
            session = api(server, server.tokens["demo"])
            url = server.url + "/api/tasks"
            peak = peak_rss(server.proc.pid)
            for size in (self.MAX_BODY + 1, 4 * self.MAX_BODY, 32 << 20):
                body = json.dumps({"provider": "demo", "params": {"prompt": "x" * size}}).encode()
                for chunked in (False, True):
                    # A generator makes requests send it chunked, without a Content-Length.
                    data = (body[i:i + 65536] for i in range(0, len(body), 65536)) if chunked else body
                    res = session.post(url, data=data, headers={"Content-Type": "application/json"}, timeout=60)
                    where = (size, "chunked" if chunked else "content-length", res.text[:200])
                    assert res.status_code == 413, where
                    assert res.headers["content-type"].startswith("application/json"), where
                    assert res.json()["error"] == {"code": "too_large",
                                                   "message": f"request body is larger than {self.MAX_BODY} bytes"}
            assert peak_rss(server.proc.pid) - peak < 16 << 20, "a refused body must not be held in memory"
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(b"POST /api/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n")
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
            head, _, text = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head, reply
            assert json.loads(text)["error"]["code"] == "bad_request"
            assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
            ok = session.post(url, json={"provider": "demo", "params": {"prompt": "fox"}}, timeout=10)
            assert ok.status_code == 201, ok.text
            assert [t["id"] for t in session.get(url, timeout=10).json()["tasks"]] == [ok.json()["task"]["id"]]
