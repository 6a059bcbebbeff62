"""Where holdfast's outbound requests may go and how much they may read:
result links that point at loopback services (directly or through a
redirect), huge, deep and many-output answers, dripping downloads.

The end-to-end tests run `python app.py` (ServerProcess) against a fake KIE
on 127.0.0.1. The fake's own host and port are the provider's URL, which is
always allowed; every other loopback port is not, unless the provider's
table says allow_private_results = true.
"""

import gzip
import http.client
import io
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import pytest

from errors import InvalidResult, ProviderUnavailable
from providers import Output, build_providers
from providers import http as http_provider
from providers import net
from providers.net import _with_query, json_depth, parse_json, refusal
from support import ServerProcess, api, require
from worker import Worker

try:
    from tests.fakes import FakeServer, Response, png_bytes
    from tests.fakes.kie import FakeKIE
except ImportError:  # plain `pytest` puts tests/, not the repo root, on sys.path
    from fakes import FakeServer, Response, png_bytes
    from fakes.kie import FakeKIE

TERMINAL = ("succeeded", "partial", "failed", "cancelled")
DEEP = 100_000


class Witness(FakeServer):
    """A loopback-only service that must never hear from holdfast: it counts
    every request it gets and answers each with a small PNG."""

    def __init__(self):
        super().__init__()
        self.hits = []

    def handle(self, req):
        self.hits.append(req.path)
        return Response(200, png_bytes(4, 4, (1, 2, 3)), {"Content-Type": "image/png"})


class HostileKIE(FakeKIE):
    """A KIE whose tasks say, in their input, what the provider answers:
    `urls` become the resultUrls; `answer` picks a hostile recordInfo
    (huge, huge_unsized, deep, deep_result). Its own host also serves
    /go?to=URL (a 302, or `redirect_status`), /loop (a redirect loop), /drip (a byte every 0.5 s)
    and /blob (1 MB)."""

    def __init__(self, **kwargs):
        super().__init__(job_seconds=0.2, result_urls=lambda task: task.input.get("urls", []), **kwargs)
        self.drips = 0
        self.redirect_status = 302
        self.go_auth = []       # the Authorization each /go request came with

    def _route(self, req):
        if req.path == "/go":
            self.go_auth.append(req.headers.get("authorization"))
            return Response(self.redirect_status, b"", {"Location": req.query["to"]})
        if req.path == "/loop":
            return Response(302, b"", {"Location": "/loop"})
        if req.path == "/drip":
            self.drips += 1
            return Response(200, self._drip(), {"Content-Length": 100_000, "Content-Type": "image/png"})
        if req.path == "/blob":
            return Response(200, b"\0" * 1024 * 1024, {"Content-Type": "application/octet-stream"})
        return super()._route(req)

    def _drip(self):
        while not self._stopping.wait(0.5):
            yield b"x"

    def _record_info(self, task_id):
        with self._lock:
            task = self._tasks.get(task_id)
        answer = task.input.get("answer") if task is not None and time.time() >= task.done_at else None
        head = b'{"code": 200, "msg": "success", "data": '
        if answer in ("huge", "huge_unsized"):
            size = 100 * 1024 * 1024
            body = self._huge(head + b'{"state": "generating", "pad": "', size, b'"}}')
            headers = {"Content-Type": "application/json"}
            if answer == "huge":
                headers["Content-Length"] = size
            return Response(200, body, headers)
        if answer == "deep":
            return Response(200, head + b"[" * DEEP + b"]" * DEEP + b"}", {"Content-Type": "application/json"})
        if answer == "deep_result":
            data = {"taskId": task_id, "state": "success", "resultJson": "[" * DEEP + "]" * DEEP}
            return Response(200, json.dumps({"code": 200, "msg": "success", "data": data}).encode(),
                            {"Content-Type": "application/json"})
        return super()._record_info(task_id)

    def _huge(self, head, size, tail):
        yield head
        left = size - len(head) - len(tail)
        block = b"x" * (1024 * 1024)
        while left > 0 and not self._stopping.is_set():
            yield block[:left]
            left -= len(block)
        yield tail


def write_config(path, fake, **tables):
    text = ""
    for name, extra in {"kie": {}, **tables}.items():
        text += (f'[providers.{name}]\ntype = "kie"\nurl = "{fake.url}"\napi_key_env = "KIE_TEST_KEY"\n'
                 "poll_interval_s = 0.2\nmax_poll_interval_s = 0.5\ntimeout_s = 5\n")
        text += "".join(f"{k} = {json.dumps(v)}\n" for k, v in extra.items())
    path.write_text(text)


def server_for(tmp_path, fake, env=None, **tables):
    config = tmp_path / "holdfast.toml"
    write_config(config, fake, **tables)
    return ServerProcess(tmp_path, env={"HOLDFAST_CONFIG": str(config), "KIE_TEST_KEY": "test-key",
                                        **(env or {})})


def submit(session, provider, **task_input):
    resp = session.post(session.base + "/api/tasks", json={
        "provider": provider, "params": {"model": "m", "input": task_input}}, timeout=10)
    assert resp.status_code == 201, resp.text
    return resp.json()["task"]["id"]


def wait_all(session, ids, timeout):
    end = time.monotonic() + timeout
    tasks = {}
    while time.monotonic() < end:
        tasks = {i: session.get(f"{session.base}/api/tasks/{i}", timeout=10).json()["task"] for i in ids}
        if all(t["status"] in TERMINAL for t in tasks.values()):
            return tasks
        time.sleep(0.1)
    raise AssertionError(f"not finished in {timeout}s: {[(t['id'], t['status'], t['step']) for t in tasks.values()]}")


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


# -- the address policy, end to end -------------------------------------------------

def hostile_links(server, kie, witness):
    return {
        "metrics": server.url + "/metrics",
        "service": witness.url + "/secret.png",
        "metrics via 302": kie.url + "/go?to=" + quote(server.url + "/metrics", safe=""),
        "service via 302": kie.url + "/go?to=" + quote(witness.url + "/secret.png", safe=""),
    }


def test_result_links_to_loopback_services_fail_the_task_and_reach_nothing(tmp_path):
    """holdfast's own /metrics and another loopback service, directly and
    through a 302 from the provider's own host, and a redirect loop: each
    task fails invalid_result at once, saying why, and nothing is fetched."""
    with Witness() as witness, HostileKIE() as kie:
        with server_for(tmp_path, kie) as server:
            session = api(server, server.tokens["demo"])
            refused = {what: submit(session, "kie", urls=[url])
                       for what, url in hostile_links(server, kie, witness).items()}
            loop = submit(session, "kie", urls=[kie.url + "/loop"])
            tasks = wait_all(session, [*refused.values(), loop], timeout=60)
    for what, task_id in refused.items():
        task = tasks[task_id]
        assert (task["status"], task["error"]["code"]) == ("failed", "invalid_result"), (what, task)
        assert "127.0.0.1" in task["error"]["message"] and "loopback" in task["error"]["message"], task
        assert task["files"] == [] and task["attempts"] == 1
    assert (tasks[loop]["status"], tasks[loop]["error"]["code"]) == ("failed", "invalid_result")
    assert "redirect loop" in tasks[loop]["error"]["message"]
    assert witness.hits == []
    # One look at each redirect: no retrying until the deadline.
    assert kie.requests["/go"] == 2 and kie.requests["/loop"] == 1


def test_the_same_links_work_for_a_provider_allowed_private_results(tmp_path):
    with Witness() as witness, HostileKIE() as kie:
        with server_for(tmp_path, kie, kie_lan={"allow_private_results": True}) as server:
            session = api(server, server.tokens["demo"])
            allowed = {what: submit(session, "kie_lan", urls=[url])
                       for what, url in hostile_links(server, kie, witness).items()}
            tasks = wait_all(session, allowed.values(), timeout=60)
            for what, task_id in allowed.items():
                assert tasks[task_id]["status"] == "succeeded", (what, tasks[task_id])
            metrics = tasks[allowed["metrics via 302"]]["files"][0]
            assert b"# TYPE" in session.get(server.url + metrics["url"], timeout=10).content
    assert witness.hits == ["/secret.png", "/secret.png"]


def test_a_server_wide_setting_lets_every_provider_reach_private_addresses(tmp_path):
    with Witness() as witness, HostileKIE() as kie:
        with server_for(tmp_path, kie, env={"HOLDFAST_ALLOW_PRIVATE_RESULTS": "1"}) as server:
            session = api(server, server.tokens["demo"])
            task_id = submit(session, "kie", urls=[witness.url + "/a.png"])
            assert wait_all(session, [task_id], timeout=60)[task_id]["status"] == "succeeded"
            assert witness.hits == ["/a.png"]


# -- bounded reads, end to end --------------------------------------------------------

def test_huge_deep_and_many_output_answers_end_invalid_result_in_bounded_memory(tmp_path):
    """A 100 MB recordInfo (with and without Content-Length), one nested
    100,000 deep (the answer, or its resultJson), 300 outputs: each task
    ends invalid_result with one log line and no traceback, no output is
    downloaded, and the server's peak RSS stays under 200 MB."""
    with HostileKIE() as kie:
        with server_for(tmp_path, kie) as server:
            session = api(server, server.tokens["demo"])
            ids = {answer: submit(session, "kie", answer=answer)
                   for answer in ("huge", "huge_unsized", "deep", "deep_result")}
            ids["many"] = submit(session, "kie", urls=[kie.url + "/blob"] * 300)
            tasks = wait_all(session, ids.values(), timeout=90)
            peak = peak_rss_mb(server.proc.pid)
            time.sleep(0.5)     # the last log lines reach the file
            with open(server.log_path, errors="replace") as fh:
                log = fh.read()
    for what, task_id in ids.items():
        task = tasks[task_id]
        assert (task["status"], task["error"]["code"]) == ("failed", "invalid_result"), (what, task)
        lines = [line for line in log.splitlines() if task_id in line and "invalid_result" in line]
        assert len(lines) == 1, (what, lines)
    assert "max_answer_bytes" in tasks[ids["huge"]]["error"]["message"]
    assert "max_answer_bytes" in tasks[ids["huge_unsized"]]["error"]["message"]
    assert "nests" in tasks[ids["deep"]]["error"]["message"]
    assert "max_outputs" in tasks[ids["many"]]["error"]["message"]
    assert "Traceback" not in log and "RecursionError" not in log
    assert kie.requests["/blob"] == 0
    print(f"peak RSS {peak:.0f} MB")
    assert peak < 200, f"peak RSS {peak:.0f} MB"


# -- downloads that drip ----------------------------------------------------------------

def test_dripping_result_links_do_not_hold_the_workers_and_end_at_the_deadline(tmp_path):
    """Six result links dripping a byte every 0.5 s, on four worker threads:
    demo tasks submitted after them still finish, long before the dripping
    tasks' deadline, and those end `timeout` at it."""
    with HostileKIE() as kie:
        config = tmp_path / "holdfast.toml"
        write_config(config, kie, kie={"max_wait_s": 30})
        config.write_text(config.read_text() + "[providers.demo]\nduration_s = 0.5\npoll_interval_s = 0.2\n")
        env = {"HOLDFAST_CONFIG": str(config), "KIE_TEST_KEY": "test-key", "HOLDFAST_WORKER_THREADS": "4"}
        with ServerProcess(tmp_path, env=env) as server:
            session = api(server, server.tokens["demo"])
            started = time.monotonic()
            drips = [submit(session, "kie", urls=[kie.url + "/drip"]) for _ in range(6)]
            end = time.monotonic() + 20
            while kie.drips < 4 and time.monotonic() < end:
                time.sleep(0.05)
            assert kie.drips >= 4, "the dripping downloads never started"
            demos = []
            for n in range(4):
                resp = session.post(server.url + "/api/tasks", json={"provider": "demo",
                                                                      "params": {"prompt": f"fox {n}"}}, timeout=10)
                assert resp.status_code == 201, resp.text
                demos.append(resp.json()["task"]["id"])
            demos_at = time.monotonic()
            tasks = wait_all(session, demos, timeout=25)
            demo_s = time.monotonic() - demos_at
            assert all(t["status"] == "succeeded" for t in tasks.values()), tasks
            tasks = wait_all(session, drips, timeout=45)
            drip_s = time.monotonic() - started
    print(f"demo tasks done {demo_s:.1f}s after submission; dripping tasks ended {drip_s:.1f}s after theirs")
    assert demo_s < 20, f"the demo tasks took {demo_s:.1f}s"
    for task in tasks.values():
        assert (task["status"], task["error"]["code"]) == ("failed", "timeout"), task
    # The deadline is 30 s after submission; the sweeper looks every 5 s.
    assert drip_s < 30 + 12, f"the dripping tasks ended after {drip_s:.1f}s"


# -- the pieces, in-process -----------------------------------------------------------

def kie_provider(kie, **extra):
    table = {"kie": {"type": "kie", "url": kie.url, "api_key_env": "KIE_TEST_KEY", "timeout_s": 2, **extra}}
    return build_providers(table, env={"KIE_TEST_KEY": "test-key"})["kie"]


def download(provider, url, *check):
    return b"".join(provider.fetch({"id": "t"}, Output("out.png", url=url), *check))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"])
def test_a_name_or_address_that_means_loopback_is_refused_before_connecting(host):
    with Witness() as witness, HostileKIE() as kie:
        provider = kie_provider(kie)
        url = witness.url.replace("127.0.0.1", host) + "/x.png"
        with pytest.raises(InvalidResult, match="loopback"):
            download(provider, url)
        assert witness.hits == []
        assert download(kie_provider(kie, allow_private_results=True), witness.url + "/x.png")[:4] == b"\x89PNG"
        assert download(provider, kie.url + "/blob") == b"\0" * 1024 * 1024   # its own host: allowed


def test_an_api_call_into_a_redirect_loop_or_a_long_chain_ends_at_once():
    with HostileKIE() as kie:
        provider = kie_provider(kie)
        with pytest.raises(InvalidResult, match="redirect loop"):
            provider.call("GET", "/loop", what="recordInfo")
        assert kie.requests["/loop"] == 1
        # Distinct hops: five are followed, the sixth is refused.
        chain = "/blob"
        for _ in range(6):
            chain = "/go?to=" + quote(chain, safe="")
        with pytest.raises(InvalidResult, match="more than 5 redirects"):
            provider.call("GET", chain, what="recordInfo")
        assert kie.requests["/go"] == 6 and kie.requests["/blob"] == 0
        five = "/blob"
        for _ in range(5):
            five = "/go?to=" + quote(five, safe="")
        resp = provider.call("GET", five, what="recordInfo")
        assert resp.status_code == 200 and len(resp.content) == 1024 * 1024
        assert kie.requests["/go"] == 6 + 5 and kie.requests["/blob"] == 1


def test_query_parameters_are_added_as_a_form_would():
    assert _with_query("http://h/p", {"taskId": "a b&c", "none": None}) == "http://h/p?taskId=a+b%26c"
    assert _with_query("http://h/p?x=1#top", {"k": ["1", "2"]}) == "http://h/p?x=1&k=1&k=2#top"
    assert _with_query("http://h/p", {"none": None}) == "http://h/p"


class Recorder(FakeServer):
    """A host that records what reaches it, and answers 200 with JSON."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def handle(self, req):
        self.seen.append(req)
        return Response(200, b'{"ok": true}', {"Content-Type": "application/json"})


def test_a_redirect_away_from_the_provider_carries_neither_the_key_nor_the_body():
    """A POST answered by a 302 to another host arrives there as a GET,
    without the body and without the Authorization the provider got; a 307
    repeats the POST with its body, still without the key."""
    with Recorder() as elsewhere, HostileKIE() as kie:
        provider = kie_provider(kie, allow_private_results=True)
        for status in (302, 307):
            target = quote(f"{elsewhere.url}/landing?status={status}", safe="")
            kie.redirect_status = status
            resp = provider.call("POST", f"/go?to={target}", what="createTask", json={"secret": "input"})
            assert resp.status_code == 200 and provider.json_of(resp, "createTask") == {"ok": True}
        first, second = elsewhere.seen
    assert (first.method, first.body, first.query) == ("GET", b"", {"status": "302"})
    assert (second.method, json.loads(second.body), second.query) == ("POST", {"secret": "input"},
                                                                      {"status": "307"})
    assert "authorization" not in first.headers and "authorization" not in second.headers
    assert kie.go_auth == ["Bearer test-key"] * 2


def test_addresses_refused_and_allowed():
    for ip in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.100.100.200",
               "0.0.0.0", "224.0.0.1", "::1", "fe80::1", "fd00:ec2::254", "::ffff:10.0.0.1", "240.0.0.1",
               "64:ff9b::7f00:1", "2002:7f00:1::1", "2001:0:4136:e378:8000:63bf:80ff:fffe"):
        assert refusal(ip), ip
    for ip in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"):
        assert refusal(ip) is None, ip


def test_a_download_slower_than_the_minimum_rate_is_dropped_after_the_grace(monkeypatch):
    monkeypatch.setattr(http_provider, "RATE_GRACE_S", 1.0)
    monkeypatch.setattr(http_provider, "CHECK_EVERY_S", 0.2)
    with HostileKIE() as kie:
        provider = kie_provider(kie)
        started = time.monotonic()
        with pytest.raises(ProviderUnavailable, match="minimum rate"):
            download(provider, kie.url + "/drip")
        assert time.monotonic() - started < 5

        calls = []

        def check():
            calls.append(time.monotonic())
            if len(calls) == 2:
                raise ProviderUnavailable("the download was stopped at the task's deadline")

        monkeypatch.setattr(http_provider, "RATE_GRACE_S", 60.0)
        with pytest.raises(ProviderUnavailable, match="deadline"):
            download(provider, kie.url + "/drip", check)
        assert len(calls) == 2


def test_json_depth_is_counted_outside_strings_without_recursion():
    assert json_depth('{"a": [1, {"b": "[[[[{{{"}], "c": "\\"]]]"}') == 3
    assert json_depth("[" * DEEP) == DEEP
    with pytest.raises(InvalidResult, match="nests 100000 levels"):
        parse_json(("[" * DEEP + "]" * DEEP).encode(), "x")
    assert parse_json(b'{"a": ["\\u00e9"]}', "x") == {"a": ["\u00e9"]}
    with pytest.raises(ValueError):
        parse_json(b'{"a": ', "x")
    # No input makes the string scan quadratic: 4 MB of escaped quotes, no end.
    started = time.monotonic()
    assert json_depth('"' + '\\"' * 2 * 1024 * 1024) == 0
    assert json_depth('"abc' + "[" * 1000) == 0    # the parser stops at the unterminated string too
    assert time.monotonic() - started < 10


# -- the worker's side of a download ------------------------------------------------------

class DownloadRig:
    """A KIE task whose result links are `paths` on the fake, run by a
    worker on the real clock, in a thread of its own as the pool would."""

    def __init__(self, store, files, kie, paths, **extra):
        self.store, self.kie = store, kie
        table = {"kie": {"type": "kie", "url": kie.url, "api_key_env": "KIE_TEST_KEY", "timeout_s": 2,
                         "poll_interval_s": 0.05, "max_poll_interval_s": 0.1, **extra}}
        self.providers = build_providers(table, env={"KIE_TEST_KEY": "test-key"})
        self.worker = Worker(store, self.providers, files, clock=time.time, owner="test:1:w")
        self.user = store.create_user("u")[0]
        now = time.time()
        self.task, _ = store.submit(self.user["id"], "kie", {"model": "m", "input": {"urls": [kie.url + p for p in paths]}},
                                    now=now, deadline_at=now + self.providers["kie"].max_wait_s, cost=0)

    def start_download(self, started):
        """Step the task until its download starts (`started()` true), then
        leave it downloading in a thread."""
        end = time.monotonic() + 10
        thread = None
        while not started() and time.monotonic() < end:
            if thread is None or not thread.is_alive():
                thread = threading.Thread(target=self.worker.run_once, daemon=True)
                thread.start()
            time.sleep(0.05)
        assert started(), "the download never started"
        return thread

    def get(self):
        return self.store.get_task(self.task["id"])


@pytest.mark.parametrize("how", ["lease lost", "cancelled", "deadline"])
def test_a_download_stops_when_its_lease_is_lost_its_task_ends_or_its_deadline_passes(
        sqlite_store, files, monkeypatch, how):
    monkeypatch.setattr(http_provider, "RATE_GRACE_S", 600.0)   # only the worker's check may stop it
    with HostileKIE() as kie:
        rig = DownloadRig(sqlite_store, files, kie, ["/drip"], max_wait_s=4 if how == "deadline" else 600)
        thread = rig.start_download(lambda: kie.drips > 0)
        stopped_at = time.monotonic()
        if how == "lease lost":
            sqlite_store.release_leases(["test:1:w"])
        elif how == "cancelled":
            sqlite_store.cancel(rig.task["id"], rig.user["id"], now=time.time())
        else:
            stopped_at = time.monotonic() + max(0.0, rig.task["deadline_at"] - time.time())
        thread.join(30)
        assert not thread.is_alive(), "the download is still running"
        # The worker looks every CHECK_EVERY_S (2 s), between drips of 0.5 s.
        assert time.monotonic() - stopped_at < 4
        task = rig.get()
    assert task["files"] == []
    if how == "deadline":
        assert task["status"] == "running" and "deadline" in task["state"]["last_error"]
    assert kie.drips == 1


def test_a_task_over_max_task_bytes_fails_invalid_result(sqlite_store, files):
    with HostileKIE() as kie:
        rig = DownloadRig(sqlite_store, files, kie, ["/blob"] * 3, max_task_bytes=2_500_000)   # 1 MB each
        end = time.monotonic() + 20
        while rig.get()["status"] not in TERMINAL and time.monotonic() < end:
            rig.worker.run_once()
            time.sleep(0.05)
        task = rig.get()
    assert (task["status"], task["error"]["code"]) == ("failed", "invalid_result"), task
    assert "max_task_bytes" in task["error"]["message"]
    assert kie.requests["/blob"] == 3


# -- the client: keep-alive connections, encodings, request targets -------------------

BOMB_BYTES = 50 * 1024 * 1024


class KeepAlive(FakeServer):
    """An HTTP/1.1 host that keeps connections open. It records every
    request with the client port it came on (a port is a connection) and
    answers /gzip with gzipped JSON, /bomb with 50 MB of zeros gzipped
    (about 50 KB), and anything else with its path as sent, in JSON."""

    protocol = "HTTP/1.1"

    def __init__(self):
        super().__init__()
        self.seen = []          # (client port, path as it arrived)
        self.sockets = []
        self.bomb = gzip.compress(b"\0" * BOMB_BYTES)

    def handle(self, req):
        self.seen.append((req.connection.getpeername()[1], req.path))
        self.sockets.append(req.connection)
        if req.path == "/gzip":
            return Response(200, gzip.compress(b'{"state": "ok"}'),
                            {"Content-Type": "application/json", "Content-Encoding": "gzip"})
        if req.path == "/bomb":
            return Response(200, self.bomb, {"Content-Type": "application/json", "Content-Encoding": "gzip"})
        return Response(200, json.dumps({"path": req.path}).encode(), {"Content-Type": "application/json"})

    def connections(self):
        return len({port for port, _ in self.seen})

    def drop_idle(self):
        """Close every connection from this end without a word, as a server
        does with a keep-alive connection idle past its own timeout."""
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def test_calls_share_one_keep_alive_connection_and_one_the_server_closed_is_not_reused():
    with KeepAlive() as host:
        provider = kie_provider(host)
        for _ in range(3):
            assert provider.call("GET", "/poll", what="recordInfo").content == b'{"path": "/poll"}'
        assert len(host.seen) == 3 and host.connections() == 1
        host.drop_idle()
        time.sleep(0.2)     # the close reaches this end (loopback: at once)
        # Sent on the dead connection, this would be "in doubt"; it goes out
        # once, on a new connection, and is answered.
        assert provider.call("POST", "/create", what="createTask", json={"x": 1}).status_code == 200
        assert [path for _, path in host.seen] == ["/poll"] * 3 + ["/create"]
        assert host.connections() == 2


def test_a_gzip_answer_is_decoded_and_a_gzip_bomb_stops_at_the_byte_limit():
    with KeepAlive() as host:
        provider = kie_provider(host, max_answer_bytes=1_000_000)
        assert provider.json_of(provider.call("GET", "/gzip", what="recordInfo"), "recordInfo") == {"state": "ok"}
        tracemalloc.start()
        try:
            with pytest.raises(InvalidResult, match="over max_answer_bytes"):
                provider.call("GET", "/bomb", what="recordInfo")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # About 50 KB on the wire; the 50 MB they unpack to were never held.
        assert len(host.bomb) < 200_000
        assert peak < 8 * 1024 * 1024, f"{peak} bytes held at the peak"


def test_a_result_link_with_spaces_and_other_scripts_is_sent_percent_encoded():
    with KeepAlive() as host:
        provider = kie_provider(host)
        body = download(provider, host.url + "/out put/fuchs-ü.png?size=2 x")
        assert json.loads(body) == {"path": "/out%20put/fuchs-%C3%BC.png"}
        assert download(provider, host.url + "/already%20encoded.png") == b'{"path": "/already%20encoded.png"}'


def test_https_to_a_provider_is_verified_against_its_certificate(tmp_path, monkeypatch):
    require(shutil.which("openssl") is not None, "needs the openssl command (to make a certificate)")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    paths = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            paths.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "12")
            self.end_headers()
            self.wfile.write(b'{"ok": true}')

        def log_message(self, *args):
            pass

    class Quiet(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            pass        # the refused handshake below, expected

    server = Quiet(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        table = {"kie": {"type": "kie", "url": f"https://127.0.0.1:{server.server_address[1]}",
                         "api_key_env": "KIE_TEST_KEY", "timeout_s": 5}}
        # Not trusted (not among certifi's authorities): no request is sent.
        provider = build_providers(table, env={"KIE_TEST_KEY": "k"})["kie"]
        with pytest.raises(ProviderUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            provider.call("GET", "/poll", what="recordInfo")
        assert paths == []
        # Trusted, and checked against the name in the URL: answered.
        monkeypatch.setattr(net, "_tls_context", lambda: ssl.create_default_context(cafile=cert))
        provider = build_providers(table, env={"KIE_TEST_KEY": "k"})["kie"]
        assert provider.call("GET", "/poll", what="recordInfo").content == b'{"ok": true}'
        assert paths == ["/poll"]
    finally:
        server.shutdown()
        server.server_close()



class Echo(KeepAlive):
    """A keep-alive host that answers every request with what it got: its
    method, path, JSON body and Content-Length, in JSON."""

    def handle(self, req):
        self.seen.append((req.connection.getpeername()[1], req.path))
        return Response(200, json.dumps({"method": req.method, "path": req.path, "json": req.json(),
                                         "length": req.headers.get("content-length")}).encode(),
                        {"Content-Type": "application/json"})


class CountingSocket:
    """A connection's real socket, its sends and timeout changes counted."""

    def __init__(self, sock):
        self.sock, self.sends, self.timeouts = sock, 0, []

    def sendall(self, data):
        self.sends += 1
        return self.sock.sendall(data)

    def settimeout(self, value):
        self.timeouts.append(value)
        return self.sock.settimeout(value)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_a_request_goes_out_in_one_send_and_a_kept_connection_keeps_its_timeout():
    """A request's head and its JSON body leave in one send, not two (two
    system calls, each a handover of the GIL); a kept connection's timeout
    is set again only when a call asks for another one."""
    with Echo() as host:
        client = net.Client(net.AddressPolicy(host.url), 1_000_000)

        def call(method, path, timeout_s=5, **options):
            answer = client.request(method, host.url + path, what="test", headers_for=lambda url: {"X-Key": "k"},
                                    timeout_s=timeout_s, **options)
            return json.loads(answer.content)

        assert call("GET", "/first") == {"method": "GET", "path": "/first", "json": None, "length": None}
        (conn,) = client._idle.values()
        conn.sock = counted = CountingSocket(conn.sock)
        body = {"prompt": "a cat", "n": [1, 2, 3]}
        assert call("POST", "/create", json=body) == {
            "method": "POST", "path": "/create", "json": body, "length": str(len(net._json_body(body)))}
        assert call("GET", "/poll") == {"method": "GET", "path": "/poll", "json": None, "length": None}
        assert (counted.sends, counted.timeouts) == (2, [])
        assert call("GET", "/poll", timeout_s=7)["path"] == "/poll"
        assert counted.timeouts == [7] and counted.sock.gettimeout() == 7
        assert host.connections() == 1

class RawHost:
    """A host that answers each request on a connection with the next of
    `answers`, byte for byte as given (to send what no well-behaved server
    would), then keeps the connection open for the next request, or closes
    it after an answer that ends with the connection (`close_after`)."""

    def __init__(self, answers, close_after=()):
        self.answers, self.close_after = list(answers), set(close_after)
        self.requests = 0
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(5)
                data = b""
                while self.answers:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    if b"\r\n\r\n" not in data:
                        break
                    data = data.split(b"\r\n\r\n", 1)[1]
                    index = self.requests
                    self.requests += 1
                    conn.sendall(self.answers.pop(0))
                    if index in self.close_after:
                        break

    def close(self):
        self.sock.close()


def raw_client(host):
    return net.Client(net.AddressPolicy(host.url), 1_000_000)


def raw_get(client, host, path="/"):
    return client.request("GET", host.url + path, what="test", headers_for=lambda url: {}, timeout_s=5)


def test_an_answers_header_fields_read_as_http_client_reads_them():
    """Fields come out as the standard library's parser gives them: any
    case, the first of a field sent twice, values without the spaces
    around them; and the body is read by its length on a kept connection."""
    body = b'{"ok": true}'
    section = (b"Content-Type: application/json\r\nX-Twice: first\r\nx-twice: second\r\n"
               b"Retry-After:   7\r\nETag: \"abc\"\r\nContent-Length: %d\r\n" % len(body))
    host = RawHost([b"HTTP/1.1 200 OK\r\n" + section + b"\r\n" + body] * 2)
    try:
        client = raw_client(host)
        answers = [raw_get(client, host) for _ in range(2)]
    finally:
        host.close()
    expected = http.client.parse_headers(io.BytesIO(section + b"\r\n"))
    for answer in answers:
        assert answer.status_code == 200 and answer.content == body
        for name in ("content-type", "X-TWICE", "Retry-After", "etag", "content-length", "missing"):
            assert answer.headers.get(name) == expected.get(name), name
        assert answer.headers.get_all("X-Twice") == expected.get_all("X-Twice") == ["first", "second"]
        assert answer.headers.get("missing", "no") == "no"
    assert host.connections == 1       # the length ended each body: the connection was kept


def one_answer(raw):
    """What a Client reads from a host that answers with `raw`."""
    host = RawHost([raw])
    try:
        return raw_get(raw_client(host), host)
    finally:
        host.close()


def test_a_folded_field_is_one_value_and_a_line_without_a_colon_is_passed_over():
    answer = one_answer(b"HTTP/1.1 200 OK\r\nX-Folded: one\r\n \t two\r\nnot a field\r\n"
                        b"Content-Length: 2\r\n\r\nok")
    assert answer.headers.get("x-folded") == "one two"
    assert answer.content == b"ok" and answer.headers.get("not a field") is None


# "\u00b2" (superscript two) is a digit to str.isdigit() and no number to int().
@pytest.mark.parametrize("length", ["-5", "\u00b2", "12abc", ""])
def test_a_body_of_no_usable_length_is_read_to_the_close(length):
    """An API answer and a result file alike."""
    answer = f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\n".encode("latin-1") + b"all of it"
    host = RawHost([answer, answer], close_after={0, 1})
    try:
        assert raw_get(raw_client(host), host).content == b"all of it"
        assert download(kie_provider(host), host.url + "/0.png") == b"all of it"
    finally:
        host.close()
    assert host.requests == 2


def test_a_no_content_answer_has_no_body_and_keeps_its_connection():
    host = RawHost([b"HTTP/1.1 204 No Content\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])
    try:
        client = raw_client(host)
        first, second = raw_get(client, host), raw_get(client, host)
    finally:
        host.close()
    assert (first.status_code, first.content) == (204, b"")
    assert (second.status_code, second.content) == (200, b"ok")
    assert host.connections == 1


def test_a_hundred_continue_is_passed_over():
    answer = one_answer(b"HTTP/1.1 100 Continue\r\nX-Early: 1\r\n\r\nHTTP/1.1 200 OK\r\nX-Late: 2\r\n"
                        b"Content-Length: 2\r\n\r\nok")
    assert (answer.status_code, answer.content) == (200, b"ok")
    assert answer.headers.get("x-late") == "2" and answer.headers.get("x-early") is None


@pytest.mark.parametrize("section, problem", [
    (b"".join(b"X-Field-%d: v\r\n" % i for i in range(net.MAX_HEADERS + 1)), "more than 100 headers"),
    (b"X-Long: " + b"v" * net.MAX_HEADER_LINE + b"\r\n", "header line"),
])
def test_a_header_section_past_its_bounds_is_a_broken_answer(section, problem):
    """Past 100 fields or a 64 KB line the answer is broken (for a create,
    in doubt), as with the standard library's own reader; nothing waits for
    the rest of it."""
    host = RawHost([b"HTTP/1.1 200 OK\r\n" + section + b"Content-Length: 2\r\n\r\nok"], close_after={0})
    try:
        with pytest.raises(http.client.HTTPException, match=problem):
            raw_get(raw_client(host), host)
    finally:
        host.close()
