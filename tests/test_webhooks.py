"""Webhooks out: a real receiver on 127.0.0.1 counts what it is sent and
checks every signature with `standardwebhooks` (the specification's
reference library), never with holdfast's own code."""

import json
import shutil
import ssl
import subprocess
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from config import Config
from support import ServerProcess, require, wait_for
from worker.deliver import Deliverer

HANG = "hang"


class Receiver:
    """An HTTP server on 127.0.0.1 that records every request. `answer(req,
    n)` (n: how many requests with this webhook-id came before) returns
    (status, headers) or HANG: no answer until the receiver stops."""

    def __init__(self, answer=None, tls=None):
        self.requests = []
        self.scheme = "https" if tls else "http"
        self.answer = answer or (lambda req, n: (200, {}))
        self.lock = threading.Lock()
        self.released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                req = {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                       "body": body, "at": time.time(), "status": None}
                with receiver.lock:
                    n = sum(1 for r in receiver.requests if r["headers"].get("webhook-id") == req["headers"].get("webhook-id"))
                    receiver.requests.append(req)
                decision = receiver.answer(req, n)
                if decision == HANG:
                    receiver.released.wait(120)
                    return
                status, headers = decision
                req["status"] = status
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path="/hook"):
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}{path}"

    def stop(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def snapshot(self):
        with self.lock:
            return list(self.requests)

    def accepted(self, secret):
        """{task id: [webhook-id of each 2xx-answered finished message]},
        each verified by standardwebhooks with `secret`."""
        out = {}
        for req in self.snapshot():
            if req["status"] is None or not 200 <= req["status"] < 300:
                continue
            msg = Webhook(secret).verify(req["body"], req["headers"])
            if msg["type"] == "task.finished":
                out.setdefault(msg["data"]["task"]["id"], []).append(req["headers"]["webhook-id"])
        return out


@pytest.fixture
def receiver():
    made = []

    def make(answer=None, tls=None):
        r = Receiver(answer, tls)
        made.append(r)
        return r
    yield make
    for r in made:
        r.stop()


FAST_RETRIES = {"HOLDFAST_WEBHOOK_ALLOW_PRIVATE": "1", "HOLDFAST_WEBHOOK_RETRY_SCALE": "0.001",
                "HOLDFAST_WEBHOOK_TIMEOUT_S": "1.5"}


class Api:
    def __init__(self, server, token):
        self.base, self.headers = server.url, {"Authorization": f"Bearer {token}"}

    def post(self, path, body=None):
        return requests.post(self.base + path, json=body or {}, headers=self.headers, timeout=10)

    def get(self, path):
        return requests.get(self.base + path, headers=self.headers, timeout=10)

    def submit(self, url, **extra):
        r = self.post("/api/tasks", {"provider": "demo", "params": {"prompt": "x", "duration_s": 0.1},
                                     "webhook": url, **extra})
        assert r.status_code == 201, r.text
        return r.json()["task"]["id"]

    def secret(self):
        return self.get("/api/webhooks/secret").json()["secrets"][-1]["secret"]

    def deliveries(self, task_id):
        return self.get(f"/api/webhooks/deliveries?task_id={task_id}").json()["deliveries"]


# -- submit-time checks --------------------------------------------------------------

@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://169.254.169.254/latest/meta-data/",
                                 "http://localhost/x", "http://[::1]/x", "http://10.0.0.7/x",
                                 "ftp://example.com/x", "https://user:pw@example.com/x", "not a url", 42])
def test_a_webhook_to_a_private_or_odd_target_is_refused_and_changes_nothing(client, users, url):
    c = client.as_user(users["alice"])
    r = c.post("/api/tasks", {"provider": "demo", "params": {}, "webhook": url})
    assert r.status == 400, r.body
    assert r.json()["error"]["code"] == "invalid_webhook"
    assert c.get("/api/tasks").json()["tasks"] == []


@pytest.mark.parametrize("events", [[], ["finished", "exploded"], "finished", [1]])
def test_bad_webhook_events_are_refused(client, users, events):
    c = client.as_user(users["alice"])
    r = c.post("/api/tasks", {"provider": "demo", "params": {}, "webhook": "http://93.184.215.14/x",
                              "webhook_events": events})
    assert r.status == 400 and r.json()["error"]["code"] == "invalid_webhook_events"
    r = c.post("/api/tasks", {"provider": "demo", "params": {}, "webhook_events": ["finished"]})
    assert r.status == 400 and r.json()["error"]["code"] == "invalid_webhook_events"
    assert c.get("/api/tasks").json()["tasks"] == []


def test_private_targets_pass_with_the_allow_setting(sqlite_store, providers, worker, files, clock, users):
    from api import create_app
    from support import WSGIClient
    app = create_app(sqlite_store, providers, Config(webhook_allow_private="1"), worker=worker, files=files,
                     clock=clock)
    c = WSGIClient(app, users["alice"])
    r = c.post("/api/tasks", {"provider": "demo", "params": {}, "webhook": "http://127.0.0.1:9/hook"})
    assert r.status == 201, r.body


def test_the_sender_checks_the_address_again_at_connect(sqlite_store, receiver):
    """A URL that passed the check at submit but now resolves to loopback
    (DNS rebinding) is not connected to without the allow setting."""
    rec = receiver()
    user, _ = sqlite_store.create_user("carol")
    now = time.time()
    sqlite_store.submit(user["id"], "demo", {}, now=now, deadline_at=now + 60,
                        webhook={"url": rec.url(), "events": ["created"]})
    sender = Deliverer(sqlite_store, owner="t:1", timeout_s=2)
    [d] = sqlite_store.claim_deliveries("t:1", now=now, limit=5, lease_s=10, per_target=2)
    assert sender.send(d) == "retry"
    assert rec.snapshot() == []
    [shown] = sqlite_store.deliveries(user["id"])
    assert "loopback" in shown["last_error"]


def test_https_receivers_are_verified_against_their_certificate(sqlite_store, receiver, tmp_path,
                                                                  monkeypatch):
    require(shutil.which("openssl") is not None, "needs the openssl command (to make a certificate)")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    rec = receiver(tls=(cert, key))
    user, _ = sqlite_store.create_user("carol")
    now = time.time()
    sqlite_store.submit(user["id"], "demo", {}, now=now, deadline_at=now + 60,
                        webhook={"url": rec.url(), "events": ["created"]})
    # Not trusted: the handshake fails and nothing is sent.
    untrusting = Deliverer(sqlite_store, owner="t:1", allow_private=True, timeout_s=5)
    [d] = sqlite_store.claim_deliveries("t:1", now=now, limit=5, lease_s=10, per_target=2)
    assert untrusting.send(d) == "retry"
    assert "CERTIFICATE_VERIFY_FAILED" in sqlite_store.deliveries(user["id"])[0]["last_error"]
    assert all(r["status"] is None for r in rec.snapshot())
    monkeypatch.setenv("SSL_CERT_FILE", cert)
    trusting = Deliverer(sqlite_store, owner="t:1", allow_private=True, timeout_s=5)
    [d] = sqlite_store.claim_deliveries("t:1", now=now + 3600, limit=5, lease_s=10, per_target=2)
    assert trusting.send(d) == "succeeded"
    secret = sqlite_store.task_webhook_secrets(user["id"], now=now)[0]["secret"]
    [req] = [r for r in rec.snapshot() if r["status"] == 200]
    assert Webhook(secret).verify(req["body"], req["headers"])["type"] == "task.created"


# -- signatures and rotation -----------------------------------------------------------

def test_both_secrets_verify_during_a_rotation_overlap(sqlite_store, receiver):
    rec = receiver()
    user, _ = sqlite_store.create_user("carol")
    now = time.time()
    endpoint, old = sqlite_store.add_webhook_endpoint(user["id"], rec.url(), ["created"], now=now)
    new = sqlite_store.rotate_webhook_secret(user["id"], endpoint["id"], now=now, overlap_s=3600)
    sqlite_store.submit(user["id"], "demo", {"prompt": "x"}, now=now, deadline_at=now + 60)
    sender = Deliverer(sqlite_store, owner="t:1", allow_private=True, timeout_s=5)
    [d] = sqlite_store.claim_deliveries("t:1", now=now, limit=5, lease_s=10, per_target=2)
    assert sender.send(d) == "succeeded"
    [req] = rec.snapshot()
    assert len(req["headers"]["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        msg = Webhook(secret).verify(req["body"], req["headers"])
        assert msg["type"] == "task.created" and msg["data"]["task"]["status"] == "queued"
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "QUJD" * 8).verify(req["body"], req["headers"])
    # After the overlap only the new secret signs.
    later = now + 3601
    sqlite_store.submit(user["id"], "demo", {"prompt": "y"}, now=later, deadline_at=later + 60)
    [d] = sqlite_store.claim_deliveries("t:1", now=later, limit=5, lease_s=10, per_target=2)
    sender.send(d)
    req = rec.snapshot()[-1]
    Webhook(new).verify(req["body"], req["headers"])
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(req["body"], req["headers"])


# -- a real server ------------------------------------------------------------------------

def test_one_finished_delivery_per_task_across_500_timeout_and_429(tmp_path, receiver):
    """Each task's finish is answered 500, then not at all (the attempt
    times out), then 429 with Retry-After, then 200: the receiver accepts
    exactly one finished message per task, with one webhook-id throughout."""
    plan = [(500, {}), HANG, (429, {"Retry-After": "3"}), (200, {})]
    rec = receiver(lambda req, n: plan[min(n, 3)])
    with ServerProcess(tmp_path / "d", env=FAST_RETRIES) as server:
        api = Api(server, server.tokens["demo"])
        ids = [api.submit(rec.url()) for _ in range(3)]
        secret = api.secret()
        wait_for(lambda: len(rec.accepted(secret)) == 3, 60, "three finished deliveries")
        time.sleep(1.0)
        accepted = rec.accepted(secret)
        assert sorted(accepted) == sorted(ids)
        assert all(len(v) == 1 for v in accepted.values()), accepted
        for task_id in ids:
            [d] = api.deliveries(task_id)
            assert d["state"] == "succeeded" and d["attempts"] == 4, d
            assert [a["status"] for a in d["log"]] == [500, None, 429, 200]
            assert "timed out" in d["log"][1]["error"]
            sent = [r for r in rec.snapshot() if r["headers"]["webhook-id"] == d["id"]]
            assert len(sent) == 4
            # Retry-After said 3 s; the schedule alone would have waited under 2.2 s.
            assert sent[3]["at"] - sent[2]["at"] >= 2.9
        # Another user's task is a 404, like a missing one.
        _, other = _add_user(server, "mallory")
        assert Api(server, other).get(f"/api/webhooks/deliveries?task_id={ids[0]}").status_code == 404


def _add_user(server, name):
    r = requests.post(server.url + "/api/admin/users", json={"name": name},
                      headers={"Authorization": f"Bearer {server.tokens['admin']}"}, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["user"], r.json()["token"]


def test_a_410_disables_the_endpoint(tmp_path, receiver):
    rec = receiver(lambda req, n: (410, {}))
    with ServerProcess(tmp_path / "d", env=FAST_RETRIES) as server:
        admin = Api(server, server.tokens["admin"])
        r = admin.post("/api/admin/users/demo/webhooks", {"url": rec.url(), "events": ["finished"]})
        assert r.status_code == 201, r.text
        assert r.json()["secret"].startswith("whsec_")
        api = Api(server, server.tokens["demo"])
        first = _submit_plain(api)
        wait_for(lambda: rec.snapshot(), 30, "the first delivery")
        endpoints = wait_for(lambda: [e for e in admin.get("/api/admin/users/demo/webhooks").json()["endpoints"]
                                      if e["disabled_at"]], 10, "the endpoint disabled")
        assert "410" in endpoints[0]["disabled_reason"]
        [d] = api.deliveries(first)
        assert d["state"] == "failed" and d["last_status"] == 410
        second = _submit_plain(api)
        wait_for(lambda: api.get(f"/api/tasks/{second}").json()["task"]["status"] == "succeeded", 30,
                 "the second task")
        time.sleep(1.0)
        assert api.deliveries(second) == []
        assert len(rec.snapshot()) == 1


def _submit_plain(api):
    r = api.post("/api/tasks", {"provider": "demo", "params": {"prompt": "x", "duration_s": 0.1}})
    assert r.status_code == 201, r.text
    return r.json()["task"]["id"]


def test_exactly_one_finished_delivery_per_task_across_kill_9(tmp_path, receiver):
    """The server is killed (SIGKILL) while tasks have finished and their
    deliveries are unanswered or not yet sent; after a restart every task's
    finish reaches the receiver under one webhook-id, none is lost and none
    is made up."""
    dead = threading.Event()
    rec = receiver(lambda req, n: HANG if not dead.is_set() else (200, {}))
    env = {**FAST_RETRIES, "HOLDFAST_WEBHOOK_TIMEOUT_S": "12", "HOLDFAST_WEBHOOK_THREADS": "2",
           "HOLDFAST_WEBHOOK_PER_ENDPOINT": "2"}
    server = ServerProcess(tmp_path / "d", env=env).start()
    try:
        api = Api(server, server.tokens["demo"])
        secret = api.secret()
        ids = [api.submit(rec.url()) for _ in range(8)]
        wait_for(lambda: all(api.get(f"/api/tasks/{t}").json()["task"]["status"] == "succeeded" for t in ids),
                 60, "all tasks finished")
        wait_for(lambda: len(rec.snapshot()) >= 2, 20, "deliveries in flight")
        server.kill()
        dead.set()
        assert len({r["headers"]["webhook-id"] for r in rec.snapshot()}) < len(ids)   # some never sent
        server = ServerProcess(tmp_path / "d", env=env, port=server.port)
        server.tokens = {"demo": api.headers["Authorization"][7:]}
        server.start()
        # The two held when it died go once their leases (2 x 12 + 5 s) run out.
        wait_for(lambda: len(rec.accepted(secret)) == len(ids), 90, "every finished delivery")
        time.sleep(1.0)
        accepted = rec.accepted(secret)
        assert sorted(accepted) == sorted(ids)
        assert all(len(v) == 1 for v in accepted.values()), accepted
        # Every message the receiver ever saw is one of those (a resend
        # after the kill carries the same webhook-id).
        finished_ids = {v[0] for v in accepted.values()}
        assert {r["headers"]["webhook-id"] for r in rec.snapshot()} == finished_ids
    finally:
        server.stop()


def test_a_receiver_that_never_answers_slows_no_other_task(tmp_path, receiver):
    """Twelve deliveries hang at one receiver (each attempt until its 15 s
    timeout); six other tasks still finish, and their deliveries arrive
    right after they do, not once the hung attempts give up."""
    slow = receiver(lambda req, n: HANG)
    fast = receiver()
    env = {**FAST_RETRIES, "HOLDFAST_WEBHOOK_TIMEOUT_S": "15"}
    with ServerProcess(tmp_path / "d", env=env) as server:
        api = Api(server, server.tokens["demo"])
        secret = api.secret()
        for _ in range(12):
            api.submit(slow.url())
        wait_for(lambda: len(slow.snapshot()) >= 2, 30, "the slow receiver holding deliveries")
        ids = [api.submit(fast.url()) for _ in range(6)]
        wait_for(lambda: len(fast.accepted(secret)) == 6, 60, "the fast receiver's deliveries")
        assert sorted(fast.accepted(secret)) == sorted(ids)
        for req in fast.snapshot():
            task = json.loads(req["body"])["data"]["task"]
            finished = datetime.strptime(task["finished_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                tzinfo=timezone.utc).timestamp()
            # A delivery that waited for a hung one would arrive about 15 s late.
            assert req["at"] - finished < 6, (task["id"], req["at"] - finished)
        # The slow receiver has its in-flight cap (2) and no more, until
        # those attempts time out.
        first = min(r["at"] for r in slow.snapshot())
        assert len([r for r in slow.snapshot() if r["at"] < first + 14]) == 2


# -- the HTTP surface ---------------------------------------------------------------------

PUBLIC = "http://93.184.215.14/hook"     # an address literal: no DNS, and nothing is sent here


def test_deliveries_are_listed_retried_and_kept_to_their_owner(client, users, sqlite_store, clock):
    alice, bob = client.as_user(users["alice"]), client.as_user(users["bob"])
    r = alice.post("/api/tasks", {"provider": "demo", "params": {}, "webhook": PUBLIC,
                                  "webhook_events": ["created", "finished"]})
    assert r.status == 201, r.body
    task_id = r.json()["task"]["id"]
    [d] = alice.get("/api/webhooks/deliveries", query={"task_id": task_id}).json()["deliveries"]
    assert (d["type"], d["state"], d["attempts"], d["url"]) == ("task.created", "pending", 0, PUBLIC)
    assert d["next_try_at"] is not None
    assert alice.get("/api/webhooks/deliveries").json()["deliveries"] == [d]
    assert bob.get("/api/webhooks/deliveries", query={"task_id": task_id}).status == 404
    assert bob.get("/api/webhooks/deliveries").json()["deliveries"] == []
    assert bob.post(f"/api/webhooks/deliveries/{d['id']}/retry").status == 404
    assert alice.post("/api/webhooks/deliveries/msg_nope/retry").status == 404
    [claimed] = sqlite_store.claim_deliveries("t:1", now=clock(), limit=5, lease_s=60, per_target=2)
    r = alice.post(f"/api/webhooks/deliveries/{d['id']}/retry")
    assert r.status == 409 and r.json()["error"]["code"] == "delivery_in_flight"
    sqlite_store.finish_delivery(d["id"], token=claimed["lease_token"], now=clock(), outcome="failed",
                                 status=500, error="the receiver answered 500")
    r = alice.post(f"/api/webhooks/deliveries/{d['id']}/retry")
    assert r.status == 200 and r.json()["delivery"]["state"] == "pending"
    assert r.json()["delivery"]["log"][0]["status"] == 500


def test_admins_manage_endpoints_and_secrets_are_shown_once(client, users, sqlite_store):
    _, admin_token = sqlite_store.create_user("root", admin=True)
    admin, alice = client.as_user(admin_token), client.as_user(users["alice"])
    path = "/api/admin/users/alice/webhooks"
    assert alice.post(path, {"url": PUBLIC}).status == 403
    for bad, code in (({"url": "http://169.254.169.254/"}, "invalid_webhook"),
                      ({"url": PUBLIC, "events": ["nope"]}, "invalid_webhook_events"),
                      ({"url": PUBLIC, "colour": "red"}, "invalid_input")):
        r = admin.post(path, bad)
        assert r.status == 400 and r.json()["error"]["code"] == code, r.body
    assert admin.get(path).json()["endpoints"] == []
    assert admin.post("/api/admin/users/nobody/webhooks", {"url": PUBLIC}).status == 404
    r = admin.post(path, {"url": PUBLIC, "events": ["finished", "created"]})
    assert r.status == 201 and r.headers["cache-control"] == "no-store"
    endpoint, secret = r.json()["endpoint"], r.json()["secret"]
    assert endpoint["events"] == ["created", "finished"] and secret.startswith("whsec_")
    listed = admin.get(path).json()
    assert listed["endpoints"] == [endpoint] and secret not in json.dumps(listed)
    r = admin.post(f"{path}/{endpoint['id']}/rotate").json()
    assert [s["secret"] for s in r["secrets"]] == [secret, r["secret"]]
    assert admin.post(f"{path}/{endpoint['id']}/enable").json()["endpoint"]["disabled_at"] is None
    assert admin.request("DELETE", f"{path}/{endpoint['id']}").status == 200
    assert admin.request("DELETE", f"{path}/{endpoint['id']}").status == 404
    # Digits to str.isdigit(), not ids: superscript two, an Arabic-Indic
    # three; in PATH_INFO as a WSGI server hands the decoded path over.
    for odd in ("\u00b2", "\u0663"):
        r = admin.request("DELETE", f"{path}/" + odd.encode().decode("latin-1"))
        assert r.status == 404 and r.json()["error"]["code"] == "endpoint_not_found", r.body
    assert admin.get(path).json()["endpoints"] == []


def test_the_command_line_adds_lists_and_rotates_endpoints(tmp_path):
    import subprocess
    import sys
    from support import ROOT
    env = {**__import__("os").environ, "HOLDFAST_DATA": str(tmp_path)}
    env.pop("HOLDFAST_CONFIG", None)

    def app(*args):
        return subprocess.run([sys.executable, f"{ROOT}/app.py", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    assert app("users", "add", "eve").returncode == 0
    added = app("webhooks", "add", "eve", PUBLIC, "--events", "created,finished")
    assert added.returncode == 0, added.stderr
    assert added.stdout.splitlines()[1].startswith("whsec_")
    assert "created,finished" in app("webhooks", "list", "eve").stdout
    refused = app("webhooks", "add", "eve", "http://127.0.0.1:9/x")
    assert refused.returncode == 2 and "loopback" in refused.stderr
    assert app("webhooks", "rotate", "eve", "1").stdout.startswith("whsec_")
    assert app("webhooks", "secret", "eve").stdout.startswith("whsec_")


def test_the_task_secret_is_made_once_and_rotates_with_an_overlap(client, users):
    alice = client.as_user(users["alice"])
    first = alice.get("/api/webhooks/secret").json()["secrets"]
    assert len(first) == 1 and first[0]["secret"].startswith("whsec_") and first[0]["expires_at"] is None
    assert alice.get("/api/webhooks/secret").json()["secrets"] == first
    r = alice.post("/api/webhooks/secret/rotate").json()
    assert [s["secret"] for s in r["secrets"]] == [first[0]["secret"], r["secret"]]
    assert r["secrets"][0]["expires_at"] is not None
    assert client.as_user(users["bob"]).get("/api/webhooks/secret").json()["secrets"][0]["secret"] not in (
        first[0]["secret"], r["secret"])


def test_two_servers_on_one_postgresql_never_send_a_delivery_twice(tmp_path, receiver, pg_schema):
    """Both processes claim from one outbox (FOR UPDATE SKIP LOCKED and a
    lease): a receiver that always answers 200 gets each message once."""
    rec = receiver()
    env = {**FAST_RETRIES, "HOLDFAST_STORE": pg_schema.url, "HOLDFAST_RATE_PER_S": "1000"}
    with ServerProcess(tmp_path / "a", env=env) as a, ServerProcess(tmp_path / "b", env=env) as b:
        token = a.tokens["demo"]
        apis = [Api(a, token), Api(b, token)]
        secret = apis[0].secret()
        ids = [apis[i % 2].submit(rec.url(), webhook_events=["created", "running", "finished"])
               for i in range(30)]
        wait_for(lambda: len(rec.accepted(secret)) == len(ids), 60, "every finished delivery")
        wait_for(lambda: len(rec.snapshot()) >= 3 * len(ids), 30, "every delivery")
        time.sleep(1.0)
        seen = [r["headers"]["webhook-id"] for r in rec.snapshot()]
        assert len(seen) == len(set(seen)) == 3 * len(ids)
        for r in rec.snapshot():
            Webhook(secret).verify(r["body"], r["headers"])


def test_a_retried_task_reports_to_the_same_webhook(client, users):
    alice = client.as_user(users["alice"])
    r = alice.post("/api/tasks", {"provider": "demo", "params": {}, "webhook": PUBLIC,
                                  "webhook_events": ["created"]})
    first = r.json()["task"]["id"]
    assert alice.post(f"/api/tasks/{first}/cancel").status == 200
    r = alice.post(f"/api/tasks/{first}/retry")
    assert r.status == 201, r.body
    retry = r.json()["task"]["id"]
    [d] = alice.get("/api/webhooks/deliveries", query={"task_id": retry}).json()["deliveries"]
    assert (d["type"], d["url"]) == ("task.created", PUBLIC)


def test_retry_after_reads_seconds_or_a_date_and_nothing_else():
    from worker.deliver import MAX_RETRY_AFTER_S, retry_after_s
    now = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()
    assert retry_after_s("7", now) == 7.0
    assert retry_after_s("Thu, 01 Jan 2026 00:00:30 GMT", now) == 30.0
    assert retry_after_s("999999999", now) == MAX_RETRY_AFTER_S
    # Digits to str.isdigit() that are no number: "²" once raised ValueError.
    for value in ("\u00b2", "soon", "", None):
        assert retry_after_s(value, now) is None
