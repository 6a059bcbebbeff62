"""Calls from the user's own frontend on another origin (HOLDFAST_CORS_ORIGINS,
api/cors.py): preflights and answers name only the origins listed, on /api/
only; in Chromium a page on another origin runs a task through holdfast.js,
its event stream included, and one on an origin not listed cannot read a
thing. A malformed list stops the server at start-up.

The browser test is skipped when Chromium or Playwright is missing, unless
HOLDFAST_REQUIRE_SERVICES=1 (then that is a failure)."""

import http.server
import os
import threading

import pytest
import requests

from support import ROOT, ServerProcess, free_port
from test_cli import one_line, run_app

APP_PORT = free_port()
APP_ORIGIN = f"http://localhost:{APP_PORT}"        # not 127.0.0.1: another origin, still loopback
OTHER_ORIGIN = "http://localhost:9"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerProcess(tmp_path_factory.mktemp("cors"), env={"HOLDFAST_CORS_ORIGINS": APP_ORIGIN + "/"}).start()
    yield s
    s.stop()


def preflight(server, origin, path="/api/tasks"):
    return requests.options(server.url + path, timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, idempotency-key"})


def test_a_listed_origin_passes_the_preflight(server):
    res = preflight(server, APP_ORIGIN)
    assert res.status_code == 204
    assert res.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    allowed = {h.strip().lower() for h in res.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "idempotency-key", "last-event-id"} <= allowed
    assert "POST" in res.headers["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Credentials" not in res.headers


def test_an_origin_not_listed_gets_no_cross_origin_headers(server):
    res = preflight(server, OTHER_ORIGIN)
    assert "Access-Control-Allow-Origin" not in res.headers
    assert res.status_code == 405 and res.json()["error"]["code"] == "method_not_allowed"
    me = requests.get(server.url + "/api/me", timeout=10, headers={
        "Origin": OTHER_ORIGIN, "Authorization": f"Bearer {server.tokens['demo']}"})
    assert me.status_code == 200 and "Access-Control-Allow-Origin" not in me.headers


def test_answers_and_errors_on_api_name_the_listed_origin_and_nothing_else_does(server):
    auth = {"Authorization": f"Bearer {server.tokens['demo']}"}
    for path, headers, status in (("/api/me", auth, 200), ("/api/me", {}, 401), ("/api/nope", auth, 404)):
        res = requests.get(server.url + path, timeout=10, headers={"Origin": APP_ORIGIN, **headers})
        assert res.status_code == status, (path, res.text)
        assert res.headers["Access-Control-Allow-Origin"] == APP_ORIGIN, path
        assert "Origin" in res.headers["Vary"]
        assert "Retry-After" in res.headers["Access-Control-Expose-Headers"]
    page = requests.get(server.url + "/", timeout=10, headers={"Origin": APP_ORIGIN})
    assert page.status_code == 200 and "Access-Control-Allow-Origin" not in page.headers
    same = requests.get(server.url + "/api/me", timeout=10, headers=auth)
    assert "Access-Control-Allow-Origin" not in same.headers


def test_without_the_variable_no_origin_is_allowed(tmp_path):
    with ServerProcess(tmp_path) as plain:
        res = preflight(plain, APP_ORIGIN)
        assert "Access-Control-Allow-Origin" not in res.headers and res.status_code == 405


@pytest.mark.parametrize("value", ["ftp://app.example.com", "https://app.example.com/path", "app.example.com",
                                   "https://", "https://a.example.com, https://b.example.com?x=1"])
def test_a_malformed_origin_list_stops_the_server(tmp_path, value):
    data = tmp_path / "data"
    line = one_line(run_app(tmp_path, HOLDFAST_DATA=str(data), HOLDFAST_PORT=str(free_port()),
                            HOLDFAST_CORS_ORIGINS=value))
    assert "HOLDFAST_CORS_ORIGINS must list origins like https://app.example.com" in line
    assert not data.exists()


# -- in the browser -----------------------------------------------------------------

with open(os.path.join(ROOT, "static", "holdfast.js"), encoding="utf-8") as _fh:
    MODULE = _fh.read()

# The user's own page, on their own origin, with their copy of holdfast.js.
APP_PAGE = """<!doctype html><meta charset="utf-8"><title>my app</title><p id="task">none</p>
<script type="module">
import { connect } from './holdfast.js';
const q = new URLSearchParams(location.hash.slice(1));
const hf = connect({ url: q.get('url'), token: q.get('token') });
window.hf = hf;
window.seen = [];
hf.subscribe((t) => { seen.push(t.status); document.getElementById('task').dataset.status = t.status; });
window.run = () => hf.submit('demo', { prompt: 'from my app', duration_s: 1 })
  .then(({ task }) => task.id, (err) => `refused: ${err.name} ${err.message}`);
</script>"""


@pytest.fixture(scope="module")
def app_site():
    """The user's own site: a real server on loopback (a page fulfilled by
    the test would count as a public address, and Chromium keeps those off
    loopback whatever the CORS answer)."""
    files = {"/app.html": ("text/html", APP_PAGE), "/holdfast.js": ("text/javascript", MODULE)}

    class Site(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            kind, body = files.get(self.path, ("text/plain", None))
            data = (body or "not found").encode()
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", APP_PORT), Site)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    yield
    site.shutdown()
    site.server_close()
    thread.join(10)


def open_app(browser, server):
    context = browser.new_context()
    context.set_default_timeout(20_000)
    page = context.new_page()
    page.goto(f"{APP_ORIGIN}/app.html#url={server.url}&token={server.tokens['demo']}")
    page.wait_for_function("window.hf !== undefined")
    return context, page


def test_a_page_on_a_listed_origin_runs_a_task_through_holdfast_js(browser, server, app_site):
    context, page = open_app(browser, server)
    try:
        task_id = page.evaluate("run()")
        assert task_id.startswith("t_"), task_id
        page.wait_for_selector("#task[data-status=succeeded]")
        assert page.evaluate("hf.state().transport") == "sse", "the event stream crossed origins too"
        assert page.evaluate("seen")[-1] == "succeeded"
        task = requests.get(f"{server.url}/api/tasks/{task_id}", timeout=10,
                            headers={"Authorization": f"Bearer {server.tokens['demo']}"}).json()["task"]
        assert task["params"]["prompt"] == "from my app" and task["status"] == "succeeded"
    finally:
        context.close()


def test_a_page_on_an_origin_not_listed_can_neither_submit_nor_read(browser, tmp_path, app_site):
    with ServerProcess(tmp_path, env={"HOLDFAST_CORS_ORIGINS": OTHER_ORIGIN}) as other:
        context, page = open_app(browser, other)
        try:
            assert page.evaluate("run()").startswith("refused: ")
            tasks = requests.get(f"{other.url}/api/tasks", timeout=10,
                                 headers={"Authorization": f"Bearer {other.tokens['demo']}"}).json()["tasks"]
            assert tasks == [], "the preflight was refused, so no POST was sent"
        finally:
            context.close()
