"""The Python client (clients/python/holdfast_client.py) against a real
server process. A TCP proxy between them counts every request and can lose
an answer or alter a file's bytes on the way back; a real receiver records
holdfast's real webhooks for verify_webhook."""

import base64
import json
import os
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from standardwebhooks.webhooks import Webhook

from support import ROOT, ServerProcess, wait_for

sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
import holdfast_client as hc  # noqa: E402

_REQUEST_LINE = re.compile(rb"(?:^|\r\n)(GET|POST|PUT|DELETE) (\S+) HTTP/1\.1\r\n")


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of `upstream` (host, port).

    `requests` lists (method, path, time) of every request it forwarded.
    cut_next(prefix): the next request whose "METHOD path" starts with
    prefix is forwarded, the server's answer is read, and the client's
    connection is closed before any of it reaches the client (once).
    alter(substring): answers to requests whose path holds it get their
    first body byte flipped."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.requests = []
        self.cuts = 0
        self.altered = 0
        self._cut_prefix = None
        self._alter = None
        self._answer = None
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def cut_next(self, prefix):
        self._cut_prefix = prefix.encode()

    def alter(self, substring):
        self._alter = substring.encode()

    def answer_once(self, prefix, raw):
        """The next request starting with prefix gets `raw` (a whole HTTP
        answer) from the proxy and never reaches the server."""
        self._answer = (prefix.encode(), raw)

    def count(self, method=None, path_prefix=""):
        with self.lock:
            return sum(1 for m, p, _ in self.requests if (method is None or m == method) and p.startswith(path_prefix))

    def close(self):
        self.closed = True
        self.sock.close()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=60)
            except OSError:
                # The server is gone (a test's end, or a restart): the
                # client sees its connection closed, as it would without us.
                client.close()
                continue
            state = {"cut": False, "alter": False}
            threading.Thread(target=self._up, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, state), daemon=True).start()

    def _up(self, client, server, state):
        try:
            while data := client.recv(65536):
                for m in _REQUEST_LINE.finditer(data):
                    method, path = m.group(1).decode(), m.group(2).decode()
                    with self.lock:
                        self.requests.append((method, path, time.monotonic()))
                        line = m.group(1) + b" " + m.group(2)
                        if self._cut_prefix and line.startswith(self._cut_prefix):
                            self._cut_prefix, state["cut"] = None, True
                        if self._alter and self._alter in m.group(2):
                            state["alter"] = True
                        answer, self._answer = (self._answer, None) if (
                            self._answer and line.startswith(self._answer[0])) else (None, self._answer)
                if answer:
                    client.sendall(answer[1])
                    return
                server.sendall(data)
        except OSError:
            pass
        finally:
            _shut(server)

    def _down(self, server, client, state):
        in_body = False
        try:
            while data := server.recv(65536):
                if state["cut"]:
                    # the server has answered (so it committed); the client never hears it
                    with self.lock:
                        self.cuts += 1
                    break
                if state["alter"]:
                    start = 0
                    if not in_body:
                        end = data.find(b"\r\n\r\n")
                        in_body, start = end >= 0, end + 4
                    if in_body and start < len(data):
                        data = data[:start] + bytes([data[start] ^ 0xFF]) + data[start + 1:]
                        state["alter"] = False
                        with self.lock:
                            self.altered += 1
                client.sendall(data)
        except OSError:
            pass
        finally:
            _shut(client)
            _shut(server)


def _shut(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class Receiver:
    """Records every POST it gets (headers lower-cased, raw body), answers 200."""

    def __init__(self):
        self.requests = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("client"), env={"HOLDFAST_WEBHOOK_ALLOW_PRIVATE": "1"})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def proxy(server):
    p = Proxy(("127.0.0.1", server.port))
    yield p
    p.close()


def direct(server):
    return hc.Client(server.url, server.tokens["demo"], timeout=30)


def all_task_ids(server):
    return [t["id"] for t in direct(server).list(limit=7)]


def test_a_submit_whose_answer_is_lost_creates_one_task_and_returns_it(server, proxy):
    before = set(all_task_ids(server))
    client = hc.Client(proxy.url, server.tokens["demo"], timeout=30)
    proxy.cut_next("POST /api/tasks")
    task = client.submit("demo", {"prompt": "lost answer", "duration_s": 0.1})
    assert proxy.cuts == 1
    assert proxy.count("POST", "/api/tasks") == 2       # the lost try and the one that was answered
    new = set(all_task_ids(server)) - before
    assert new == {task["id"]}, new


def test_submit_tries_again_after_a_503_but_not_after_a_400(server, proxy):
    before = set(all_task_ids(server))
    client = hc.Client(proxy.url, server.tokens["demo"], timeout=30)
    proxy.answer_once("POST /api/tasks", b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 58\r\nConnection: close\r\n\r\n"
                      b'{"error": {"code": "store_unavailable", "message": "full"}}')
    started = time.monotonic()
    task = client.submit("demo", {"prompt": "after a 503", "duration_s": 0.1})
    assert time.monotonic() - started >= 1.0                  # it waited as Retry-After said
    assert proxy.count("POST", "/api/tasks") == 2
    assert set(all_task_ids(server)) - before == {task["id"]}
    with pytest.raises(hc.InvalidInput):
        client.submit("demo", {"prompt": "x", "duration_s": -1})
    assert proxy.count("POST", "/api/tasks") == 3             # a refusal is final: asked once


def first_event(client):
    try:
        return next(client.events())
    except hc.HoldfastError:
        return None     # the proxy closed under it: the test is over


def test_events_do_not_spin_when_the_server_cannot_hold_a_long_poll(tmp_path):
    # One long poll per user: while another holds it, the server answers
    # this user's polls at once and empty.
    with ServerProcess(tmp_path, env={"HOLDFAST_SSE_MAX_PER_USER": "1"}) as srv:
        token = srv.tokens["admin"]
        holder = threading.Thread(target=lambda: requests.get(
            srv.url + "/api/events/poll?wait=25", headers={"Authorization": f"Bearer {token}"}, timeout=60),
            daemon=True)
        holder.start()
        wait_for(lambda: re.search(r'holdfast_event_streams\{kind="poll"\} 1',
                                   requests.get(srv.url + "/metrics", timeout=10).text), 20, "the held poll")
        proxy = Proxy(("127.0.0.1", srv.port))
        try:
            client = hc.Client(proxy.url, token, timeout=30)
            threading.Thread(target=first_event, args=(client,), daemon=True).start()
            time.sleep(4)
            assert 1 <= proxy.count("GET", "/api/events/poll") <= 3, proxy.requests
        finally:
            proxy.close()


def test_submit_sends_the_callers_key_so_a_second_submit_gets_the_same_task(server):
    client = direct(server)
    first = client.submit("demo", {"prompt": "keyed", "duration_s": 0.1}, dedupe_key="order-1")
    again = client.submit("demo", {"prompt": "keyed", "duration_s": 0.1}, dedupe_key="order-1")
    assert again["id"] == first["id"]


def test_list_walks_every_page(server):
    client = direct(server)
    ids = [client.submit("demo", {"prompt": f"page {i}", "duration_s": 0.1})["id"] for i in range(5)]
    listed = [t["id"] for t in client.list(limit=2)]
    assert set(ids) <= set(listed)
    assert len(listed) == len(set(listed))


def test_wait_returns_the_terminal_task_without_polling_faster_than_the_long_poll(server, proxy):
    client = hc.Client(proxy.url, server.tokens["demo"], timeout=30)
    cursor = direct(server).poll_events(None, wait=0)[1]
    task_id = direct(server).submit("demo", {"prompt": "waited", "duration_s": 3})["id"]
    task = client.wait(task_id, timeout=120)
    assert task["id"] == task_id and task["status"] == "succeeded"
    # Every request either brought events or waited out the server's long
    # poll: at most the cursor, the first look at the task, one poll per
    # event and one more (all of the user's events since, counted directly).
    events, _ = direct(server).poll_events(cursor, wait=0)
    seen = [e for e in events if e["seq"] <= max(e["seq"] for e in events if e["task_id"] == task_id
                                                 and e["task"]["status"] in hc.TERMINAL)]
    total = len(proxy.requests)
    assert total <= 3 + len(seen), (total, len(seen), proxy.requests)
    polls = [p for m, p, _ in proxy.requests if p.startswith("/api/events/poll")]
    assert all("wait=25" in p for p in polls[1:]), polls


def test_wait_all_and_a_timeout(server):
    client = direct(server)
    ids = [client.submit("demo", {"prompt": f"all {i}", "duration_s": 0.5})["id"] for i in range(3)]
    done = client.wait_all(ids, timeout=120)
    assert {t["status"] for t in done.values()} == {"succeeded"} and set(done) == set(ids)
    slow = client.submit("demo", {"prompt": "slow", "duration_s": 60})["id"]
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        client.wait(slow, timeout=1.5)
    assert time.monotonic() - started < 15
    client.cancel(slow)


def test_events_resume_from_a_cursor(server):
    client = direct(server)
    _, cursor = client.poll_events(None, wait=0)
    task_id = client.submit("demo", {"prompt": "evented", "duration_s": 0.1})["id"]
    client.wait(task_id, timeout=60)
    first = next(client.events(since=cursor))
    assert first["task_id"] == task_id and first["seq"] > cursor
    stream = client.events(since=first["seq"])
    assert next(stream)["seq"] > first["seq"]


def test_download_checks_the_sha256_and_leaves_no_file_when_it_differs(server, proxy, tmp_path):
    task = direct(server).wait(direct(server).submit("demo", {"prompt": "file", "duration_s": 0.1})["id"], 60)
    name = task["files"][0]["name"]
    client = hc.Client(proxy.url, server.tokens["demo"], timeout=30)
    good = tmp_path / "good.png"
    client.download(task, name, str(good))
    assert good.stat().st_size == task["files"][0]["size"]

    proxy.alter("/files/")
    bad = tmp_path / "bad.png"
    with pytest.raises(hc.ChecksumMismatch):
        client.download(task, name, str(bad))
    assert proxy.altered == 1
    assert sorted(os.listdir(tmp_path)) == ["good.png"]     # neither the file nor its temporary copy


def test_errors_mirror_the_api_codes(server):
    client = direct(server)
    with pytest.raises(hc.NotFound) as exc:
        client.get("t_nope")
    assert exc.value.status == 404 and exc.value.code == "task_not_found"
    with pytest.raises(hc.InvalidInput):
        client.submit("no-such-provider", {})
    with pytest.raises(hc.Unauthorized):
        hc.Client(server.url, "hf_wrong").me()
    done = client.wait(client.submit("demo", {"prompt": "ended", "duration_s": 0.1})["id"], 60)
    with pytest.raises(hc.Conflict):
        client.cancel(done["id"])
    assert client.me()["user"]


def test_rate_limited_carries_retry_after():
    response = requests.Response()
    response.status_code = 429
    response.headers["Retry-After"] = "7"
    response._content = json.dumps({"error": {"code": "rate_limited", "message": "slow down"}}).encode()
    err = hc._error_from(response, response.content)
    assert isinstance(err, hc.RateLimited) and err.retry_after == 7.0 and err.code == "rate_limited"


def test_verify_webhook_accepts_real_deliveries_and_rejects_forgeries(server):
    receiver = Receiver()
    try:
        client = direct(server)
        task_id = client.submit("demo", {"prompt": "hooked", "duration_s": 0.2}, webhook=receiver.url,
                                webhook_events=["running", "finished"])["id"]
        wait_for(lambda: any(json.loads(b)["type"] == "task.finished" for _, b in receiver.requests), 60,
                 "the finished webhook")
    finally:
        receiver.stop()
    secrets = client.webhook_secrets()
    wrong = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    for headers, body in receiver.requests:
        Webhook(secrets[-1]).verify(body, headers)          # the reference library agrees they are real
        message = hc.verify_webhook(headers, body, secrets)
        assert message["data"]["task"]["id"] == task_id
        assert hc.verify_webhook(headers, body, [wrong, secrets[-1]])   # any of several secrets
        several = {**headers, "webhook-signature": "v1,bm90IGl0 " + headers["webhook-signature"]}
        assert hc.verify_webhook(several, body, secrets)                # any of several signatures

        tampered = body.replace(b'"task"', b'"tusk"', 1)
        assert tampered != body
        with pytest.raises(hc.WebhookVerificationError):
            hc.verify_webhook(headers, tampered, secrets)
        with pytest.raises(hc.WebhookVerificationError):
            hc.verify_webhook(headers, body, secrets, now=int(headers["webhook-timestamp"]) + 301)
        with pytest.raises(hc.WebhookVerificationError):
            hc.verify_webhook(headers, body, [wrong])
        with pytest.raises(hc.WebhookVerificationError):
            hc.verify_webhook({k: v for k, v in headers.items() if k != "webhook-signature"}, body, secrets)
