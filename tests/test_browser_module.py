"""static/holdfast.js, the browser module, through examples/page.html in a
real browser (Debian's Chromium driven by Playwright) against a real server:
a task's progress through a server killed and started again, two tabs
sharing one stream, long polling without EventSource or past the server's
stream cap, a submit whose answer is lost making one task, and close()
leaving no stream, timer or channel behind (counted with the browser's own
constructors, not the module's variables).

Skipped when Chromium or Playwright is missing, unless
HOLDFAST_REQUIRE_SERVICES=1 (then that is a failure)."""

import os
import time

import pytest
import requests

from support import ROOT, ServerProcess, api

EXAMPLE = os.path.join(ROOT, "examples", "page.html")
PAGE = "/examples/page.html"

# Before any page script: count the timers, event streams and channels that
# are alive, by wrapping the browser's own constructors and functions.
TRACK = """(() => {
  const w = window;
  const live = { timeouts: new Set(), intervals: new Set(), sources: [], channels: new Set(), made: 0 };
  const [st, ct, si, ci] = [w.setTimeout, w.clearTimeout, w.setInterval, w.clearInterval];
  w.setTimeout = function (fn, ms, ...rest) {
    const id = st.call(w, function (...a) {
      live.timeouts.delete(id);
      if (typeof fn === 'function') return fn.apply(this, a);
    }, ms, ...rest);
    live.timeouts.add(id);
    return id;
  };
  w.setInterval = function (...a) { const id = si.apply(w, a); live.intervals.add(id); return id; };
  // Either clear ends either kind, as in the browser.
  const forget = (id) => { live.timeouts.delete(id); live.intervals.delete(id); };
  w.clearTimeout = function (id) { forget(id); return ct.call(w, id); };
  w.clearInterval = function (id) { forget(id); return ci.call(w, id); };
  const ES = w.EventSource;
  w.EventSource = class extends ES {
    constructor(...a) { super(...a); live.sources.push(this); live.made += 1; }
  };
  if (typeof w.BroadcastChannel === 'function') {
    const BC = w.BroadcastChannel;
    const close = BC.prototype.close;
    w.BroadcastChannel = class extends BC {
      constructor(...a) { super(...a); live.channels.add(this); }
      close() { live.channels.delete(this); return close.call(this); }
    };
  }
  w.__live = () => ({
    timeouts: live.timeouts.size, intervals: live.intervals.size, channels: live.channels.size,
    sources: live.sources.filter((es) => es.readyState !== ES.CLOSED).length, made: live.made,
  });
})();"""

# Take a feature away before the module runs: its fallbacks (a localStorage
# channel, a localStorage lease) must do the job, and close() end them too.
NO_CHANNEL = "delete window.BroadcastChannel;"
NO_LOCKS = "delete Navigator.prototype.locks;"
MISSING = {"native": "", "neither": NO_CHANNEL + NO_LOCKS}


@pytest.fixture
def server(tmp_path, request):
    """A real server; parametrize it indirectly with a dict to set its environment."""
    s = ServerProcess(tmp_path, env=getattr(request, "param", None)).start()
    yield s
    s.stop()


@pytest.fixture
def context(browser):
    ctx = browser.new_context()
    ctx.set_default_timeout(20_000)
    # The example as a user would deploy it: on the server's origin, beside /static/.
    with open(EXAMPLE, encoding="utf-8") as fh:
        html = fh.read()
    ctx.route(f"**{PAGE}", lambda route: route.fulfill(status=200, content_type="text/html", body=html))
    yield ctx
    ctx.close()


def open_example(context, server, token):
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.stream_requests = []
    page.streams_ended = []
    page.on("request", lambda req: "/api/events?" in req.url and page.stream_requests.append(req))
    for event in ("requestfailed", "requestfinished"):
        page.on(event, lambda req: "/api/events?" in req.url and page.streams_ended.append(req))
    page.goto(f"{server.url}{PAGE}#token={token}")
    page.wait_for_function("window.hf !== undefined")
    return page


def state(page):
    return page.evaluate("hf.state()")


def sse_streams(server):
    return requests.get(server.url + "/healthz", timeout=5).json()["streams"]["sse"]


def wait_sse_streams(server, n, timeout=15):
    deadline = time.time() + timeout
    while True:
        got = sse_streams(server)
        if got == n or time.time() > deadline:
            return got
        time.sleep(0.1)


def submit_api(server, token, prompt, duration_s=1.5):
    res = api(server, token).post(server.url + "/api/tasks", timeout=10, json={
        "provider": "demo", "params": {"prompt": prompt, "duration_s": duration_s}})
    assert res.status_code == 201, res.text
    return res.json()["task"]["id"]


# Every task version a page's client hands its subscribers, as "id status".
WATCH = "window.seen = []; hf.subscribe((t) => { seen.push(`${t.id} ${t.status}`); }); 0"
LIVE = "hf.state().role === 'leader' && hf.state().transport === 'sse' && hf.state().conn === 'live'"


def test_the_example_page_shows_a_task_through_a_server_killed_and_restarted(context, server, tmp_path):
    token = server.tokens["demo"]
    page = open_example(context, server, token)
    page.wait_for_function(LIVE)
    page.click("#run")
    page.wait_for_selector("#task[data-status=running]")
    task_id = page.text_content("#task").split(":")[0]
    page.wait_for_function("document.getElementById('bar').value > 0")

    server.kill()
    page.wait_for_function("hf.state().conn !== 'live'", timeout=15_000)
    time.sleep(1)
    restarted = ServerProcess(tmp_path, port=server.port).start()
    try:
        # The task carried on in the restarted server; the page saw it end.
        page.wait_for_selector("#task[data-status=succeeded]", timeout=40_000)
        assert page.text_content("#task") == f"{task_id}: succeeded"
        assert page.evaluate("document.getElementById('bar').value") == 1
        page.wait_for_function(LIVE, timeout=30_000)
        assert wait_sse_streams(restarted, 1) == 1
        # A reload restores the task from the server.
        page.reload()
        page.wait_for_selector("#task[data-status=succeeded]")
        assert page.text_content("#task") == f"{task_id}: succeeded"
        assert page.errors == []
    finally:
        restarted.stop()


def test_two_tabs_share_one_stream_and_both_see_the_task(context, server):
    token = server.tokens["demo"]
    context.add_init_script(TRACK)
    first = open_example(context, server, token)
    first.wait_for_function(LIVE)
    second = open_example(context, server, token)
    second.wait_for_function("hf.state().role === 'follower' && hf.state().conn === 'live'")
    # Watched over a few seconds: the second tab never opens a stream, and the
    # server holds one.
    deadline = time.time() + 3
    while time.time() < deadline:
        assert sse_streams(server) == 1
        time.sleep(0.2)
    assert second.stream_requests == [] and second.evaluate("__live().made") == 0
    assert first.evaluate("__live().sources") == 1

    # A task submitted in the follower reaches the leader's page through the
    # stream, and the follower's through the leader.
    for page in (first, second):
        page.evaluate(WATCH)
    second.click("#run")
    second.wait_for_selector("#task[data-status=running]")
    task_id = second.text_content("#task").split(":")[0]
    second.wait_for_selector("#task[data-status=succeeded]", timeout=30_000)
    first.wait_for_function(f"seen.includes('{task_id} succeeded')", timeout=30_000, polling=100)
    assert second.stream_requests == []
    assert sse_streams(server) == 1

    # The leader closes: the follower takes over with a stream of its own.
    first.close()
    second.wait_for_function(LIVE, timeout=20_000)
    assert wait_sse_streams(server, 1) == 1
    later = submit_api(server, token, "after the hand-over", duration_s=0.5)
    second.wait_for_function(f"seen.includes('{later} succeeded')", timeout=30_000, polling=100)
    assert len(second.stream_requests) >= 1
    assert second.errors == []


def run_polled(page):
    page.wait_for_function("hf.state().transport === 'poll' && hf.state().conn === 'polling'")
    page.click("#run")
    page.wait_for_selector("#task[data-status=running]")
    page.wait_for_selector("#task[data-status=succeeded]", timeout=30_000)
    assert page.evaluate("document.getElementById('bar').value") == 1


def test_without_eventsource_the_client_long_polls(context, server):
    context.add_init_script("delete window.EventSource;")
    page = open_example(context, server, server.tokens["demo"])
    run_polled(page)
    assert page.stream_requests == [] and sse_streams(server) == 0
    assert page.errors == []


# One slot, taken by another client: the client's stream gets 503 and it polls.
@pytest.mark.parametrize("server", [{"HOLDFAST_SSE_MAX_STREAMS": "1"}], ids=["cap-1"], indirect=True)
def test_past_the_stream_cap_the_client_long_polls(context, server):
    token = server.tokens["demo"]
    hog = requests.get(f"{server.url}/api/events?token={token}", stream=True, timeout=10)
    try:
        assert hog.status_code == 200 and wait_sse_streams(server, 1) == 1
        page = open_example(context, server, token)
        run_polled(page)
        assert [r.response().status for r in page.stream_requests] == [503]
        assert page.errors == []
    finally:
        hog.close()


def closed_cleanly(page):
    """After close(): no timer, stream or channel alive in the page."""
    # Requests aborted by close() clear their timeouts as they settle.
    page.wait_for_function("__live().timeouts === 0", timeout=10_000)
    got = page.evaluate("__live()")
    return {k: got[k] for k in ("timeouts", "intervals", "channels", "sources")}


NOTHING = {"timeouts": 0, "intervals": 0, "channels": 0, "sources": 0}


@pytest.mark.parametrize("missing", list(MISSING), ids=list(MISSING))
def test_close_leaves_no_stream_timer_or_channel(context, server, missing):
    token = server.tokens["demo"]
    context.add_init_script(MISSING[missing] + TRACK)
    leader = open_example(context, server, token)
    leader.wait_for_function(LIVE)
    follower = open_example(context, server, token)
    follower.wait_for_function("hf.state().role === 'follower' && hf.state().conn === 'live'")
    follower.click("#run")
    follower.wait_for_selector("#task[data-status=succeeded]", timeout=30_000)
    for page in (leader, follower):
        held = page.evaluate("__live()")
        assert held["channels"] == (1 if missing == "native" else 0), held
        assert held["intervals"] == (0 if missing == "native" else 1), held    # the lease's beat
    assert leader.evaluate("__live().sources") == 1
    streams = list(leader.stream_requests)
    assert len(streams) >= 1 and follower.stream_requests == []

    follower.evaluate("hf.close()")
    assert closed_cleanly(follower) == NOTHING
    leader.evaluate("hf.close()")
    assert closed_cleanly(leader) == NOTHING
    # The browser ended the stream's request, and the server let it go.
    assert wait_sse_streams(server, 0) == 0
    deadline = time.time() + 10
    while len(leader.streams_ended) < len(streams) and time.time() < deadline:
        leader.wait_for_timeout(100)
    assert set(leader.streams_ended) == set(streams)
    # Nothing starts again later (a timer that escaped, a lease beat, a poll).
    leader.wait_for_timeout(3000)
    for page in (leader, follower):
        assert closed_cleanly(page) == NOTHING
        assert page.evaluate("__live().made") == len(page.stream_requests)
    assert leader.stream_requests == streams, "a closed client opened a stream again"
    assert sse_streams(server) == 0
    assert leader.errors == [] and follower.errors == []


def test_submit_sends_again_with_its_key_and_close_settles_a_waiting_submit(context, server):
    token = server.tokens["demo"]
    context.add_init_script(TRACK)
    page = open_example(context, server, token)
    page.wait_for_function(LIVE)
    posts, refuse = [], {"left": 1, "retry_after": "1"}

    def on_tasks(route):
        if route.request.method != "POST":
            return route.continue_()
        posts.append(route.request.headers.get("idempotency-key"))
        if refuse["left"]:
            refuse["left"] -= 1
            if refuse["retry_after"] == "1":
                route.fetch()      # the server makes the task; its answer is lost on the way back
            return route.fulfill(status=503, headers={"Retry-After": refuse["retry_after"]},
                                 content_type="application/json",
                                 body='{"error": {"code": "unavailable", "message": "busy"}}')
        return route.continue_()

    page.route("**/api/tasks", on_tasks)
    task_id = page.evaluate("hf.submit('demo', {prompt: 'twice', duration_s: 0.2}).then((r) => r.task.id)")
    assert len(posts) == 2 and posts[0] and posts[0] == posts[1]
    listed = api(server, token).get(server.url + "/api/tasks", timeout=10).json()["tasks"]
    assert [t["id"] for t in listed] == [task_id]

    # Refused again and again: close() ends the wait, and the submit settles.
    refuse.update(left=100, retry_after="30")
    page.evaluate("window.outcome = null; hf.submit('demo', {}).then(() => { outcome = 'ok'; },"
                  " (e) => { outcome = e.code; }); 0")
    deadline = time.time() + 20
    while len(posts) < 3 and time.time() < deadline:
        page.wait_for_timeout(100)
    assert len(posts) == 3
    page.wait_for_timeout(500)
    page.evaluate("hf.close()")
    page.wait_for_function("outcome !== null", timeout=5_000, polling=100)
    assert page.evaluate("outcome") == "aborted"
    assert closed_cleanly(page) == NOTHING
    assert len(posts) == 3
