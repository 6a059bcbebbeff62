"""The bundled page in a real browser (Debian's Chromium driven by Playwright)
against a real server: a task to its thumbnail, a reload mid-task, two tabs
sharing one stream (also without BroadcastChannel or Web Locks), cancel and
retry, a second device, no leaked timers or listeners, a server killed and
started again under the page, a refused token, and a Content-Security-Policy
that allows no inline script.

Skipped when Chromium or Playwright is missing, unless
HOLDFAST_REQUIRE_SERVICES=1 (then that is a failure)."""

import time

import pytest
import requests

from support import ServerProcess, api, paying_server

STATE = "({role: holdfast.role, transport: holdfast.transport, lastSeq: holdfast.lastSeq, " \
        "conn: document.getElementById('conn').dataset.state})"


@pytest.fixture
def server(tmp_path, request):
    """A real server; parametrize it indirectly with a dict to set its environment."""
    s = ServerProcess(tmp_path, env=getattr(request, "param", None)).start()
    yield s
    s.stop()


@pytest.fixture
def paying(tmp_path):
    """A real server where a demo task costs a credit; "payer" has three."""
    with paying_server(tmp_path, 3) as s:
        yield s


@pytest.fixture
def context(browser):
    ctx = browser.new_context(viewport={"width": 1100, "height": 900})
    ctx.set_default_timeout(20_000)
    yield ctx
    ctx.close()


def open_page(context, server, token=None, signed_in=True):
    """A tab on the page; with `token`, signed in through the token form;
    `signed_in=False`: the page is expected to ask for a token."""
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.goto(server.url + "/")
    if token:
        sign_in(page, token)
    else:
        page.wait_for_selector("#submit-form" if signed_in else "#token-form", state="visible")
    return page


def card(task_id, status=None):
    return f'.task[data-id="{task_id}"]' + (f'[data-status="{status}"]' if status else "")


def wait_thumbnail(page, task_id, timeout=20_000):
    page.wait_for_selector(card(task_id, "succeeded") + " .files img", timeout=timeout)
    page.wait_for_function(
        "id => { const img = document.querySelector(`.task[data-id=\"${id}\"] .files img`);"
        " return img && img.complete && img.naturalWidth > 0; }", arg=task_id, timeout=timeout)


def streams(server, token):
    return api(server, token).get(server.url + "/healthz", timeout=5).json()["streams"]


def wait_streams(server, token, sse, timeout=10):
    deadline = time.time() + timeout
    while True:
        got = streams(server, token)
        if got["sse"] == sse or time.time() > deadline:
            return got
        time.sleep(0.1)


def assert_streams_stay(server, token, sse, seconds):
    """The server holds exactly `sse` streams throughout, e.g. across the
    fallback election's lease beats."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert streams(server, token)["sse"] == sse
        time.sleep(0.1)


def track_streams(page):
    """Record every event stream the page gets opened by the server (a
    browser-side view of the connection, not the server's count)."""
    page.stream_opens = []
    page.on("response", lambda res: res.request.resource_type == "eventsource" and res.status == 200
            and page.stream_opens.append(res.url))


def leader_and_follower(first, second, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        roles = sorted(p.evaluate("holdfast.role") for p in (first, second))
        if roles == ["follower", "leader"]:
            break
        time.sleep(0.1)
    assert roles == ["follower", "leader"]
    return (first, second) if first.evaluate("holdfast.role") == "leader" else (second, first)


def sign_in(page, token):
    page.fill("#token-input", token)
    page.click("#token-form button[type=submit]")
    page.wait_for_selector("#submit-form", state="visible")


LIVE = "holdfast.role === 'leader' && holdfast.transport === 'sse' && " \
       "document.getElementById('conn').dataset.state === 'live'"


def submit_api(server, token, prompt, duration_s=1.5):
    res = api(server, token).post(server.url + "/api/tasks", timeout=10, json={
        "provider": "demo", "params": {"prompt": prompt, "duration_s": duration_s}})
    assert res.status_code == 201, res.text
    return res.json()["task"]["id"]


PROMPT = 'a red fox <img src=x onerror="window.pwned=1"><b>in the snow</b>'


# Streams of one second: the task's updates cross several reconnections.
@pytest.mark.parametrize("server", [{"HOLDFAST_SSE_MAX_S": "1"}], ids=["1s-streams"], indirect=True)
def test_a_demo_task_submitted_in_the_page_runs_live_to_its_thumbnail(context, server):
    token = server.tokens["demo"]
    page = open_page(context, server, token)
    page.wait_for_function("holdfast.role === 'leader' && holdfast.transport === 'sse'")
    page.fill("#prompt", PROMPT)
    page.fill("#params", '{"duration_s": 3}')
    page.dblclick("#submit-btn")      # a double click must not make two tasks
    page.wait_for_selector(".task")
    task_id = page.get_attribute(".task", "data-id")
    # Nor a second click after the first answer came back: the form is unchanged.
    page.wait_for_function("document.getElementById('submit-btn').disabled === false")
    page.click("#submit-btn")
    page.wait_for_function("document.getElementById('form-note').textContent.startsWith('Already submitted')")
    page.wait_for_selector(card(task_id, "running"))
    wait_thumbnail(page, task_id)
    assert page.text_content(card(task_id) + " .files a") == "out_0.png"
    # User data is text, never HTML.
    assert page.text_content(card(task_id) + " .prompt") == PROMPT
    assert page.evaluate("window.pwned") is None and page.query_selector(card(task_id) + " .prompt b") is None
    listed = api(server, token).get(server.url + "/api/tasks", timeout=5).json()["tasks"]
    assert [t["id"] for t in listed] == [task_id]
    page.wait_for_function("holdfast.transport === 'sse' && document.getElementById('conn').dataset.state === 'live'")
    assert page.evaluate("holdfast.lastSeq") >= 5     # created, several updates, finished
    assert page.errors == []


def test_a_reload_mid_task_restores_it_and_it_carries_on(context, server):
    token = server.tokens["demo"]
    page = open_page(context, server, token)
    page.fill("#prompt", "reload me")
    page.fill("#params", '{"duration_s": 4}')
    page.click("#submit-btn")
    page.wait_for_selector(".task[data-status=running]")
    task_id = page.get_attribute(".task", "data-id")
    page.reload()
    page.wait_for_selector(card(task_id))     # restored from the server, token from localStorage
    assert page.get_attribute(card(task_id), "data-status") in ("queued", "running")
    wait_thumbnail(page, task_id)
    page.wait_for_function("holdfast.transport === 'sse'")
    assert wait_streams(server, token, 1)["sse"] == 1, "the old page's stream must be closed"
    assert page.errors == []


def test_a_refused_token_signs_out_with_a_message_and_leaves_nothing_open(context, server):
    token = server.tokens["demo"]
    page = open_page(context, server, signed_in=False)
    page.fill("#token-input", "hf_not_a_real_token")
    page.click("#token-form button[type=submit]")
    page.wait_for_function("document.getElementById('token-error').textContent.includes('(401)')")
    assert page.is_visible("#token-form") and page.is_hidden("#app")
    assert page.evaluate("localStorage.getItem('holdfast.token')") is None
    assert page.evaluate(STATE) == {"role": "follower", "transport": "none", "lastSeq": 0, "conn": "signed-out"}
    assert wait_streams(server, token, 0) == {"sse": 0, "poll": 0, "max": 200}
    # The right token afterwards works as usual.
    sign_in(page, token)
    page.wait_for_function(LIVE)
    assert page.is_hidden("#token-error")
    assert page.errors == []


def test_the_page_runs_under_a_content_security_policy_without_inline_script(context, server):
    """Only scripts from the server's origin, none inline: the page and
    holdfast.js still sign in, stream and show a task."""
    token = server.tokens["demo"]
    csp = "script-src 'self'; object-src 'none'; base-uri 'none'"

    def with_csp(route):
        res = route.fetch()
        route.fulfill(response=res, headers={**res.headers, "content-security-policy": csp})

    context.route(server.url + "/", with_csp)
    page = context.new_page()
    violations, page.errors = [], []
    page.on("console", lambda msg: "Content Security Policy" in msg.text and violations.append(msg.text))
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.goto(server.url + "/")
    # Selectors only: wait_for_function evaluates a string, which this policy forbids.
    sign_in(page, token)
    page.wait_for_selector("body[data-role=leader][data-transport=sse] #conn[data-state=live]")
    task_id = submit_api(server, token, "under a policy", duration_s=0.5)
    # The thumbnail's src is set once holdfast.js has fetched the file.
    page.wait_for_selector(card(task_id, "succeeded") + " .files img[src^='blob:']:not(.broken)")
    assert violations == [] and page.errors == []


# Init scripts that take a feature away before app.js runs: the page's
# fallbacks (a localStorage channel, a localStorage lease) must do the job.
NO_CHANNEL = "delete window.BroadcastChannel;"
NO_LOCKS = "delete Navigator.prototype.locks;"
MISSING = {"native": "", "no-broadcastchannel": NO_CHANNEL, "no-locks": NO_LOCKS,
           "neither": NO_CHANNEL + NO_LOCKS}


@pytest.mark.parametrize("missing", list(MISSING), ids=list(MISSING))
def test_two_tabs_share_one_stream_and_both_update_and_a_closing_leader_hands_over(context, server, missing):
    token = server.tokens["demo"]
    if MISSING[missing]:
        context.add_init_script(MISSING[missing])
    first = open_page(context, server, token)
    second = open_page(context, server)      # signed in by the shared localStorage
    for page in (first, second):
        assert page.evaluate("[typeof BroadcastChannel, typeof navigator.locks]") == [
            "undefined" if NO_CHANNEL in MISSING[missing] else "function",
            "undefined" if NO_LOCKS in MISSING[missing] else "object"]
        page.wait_for_function("holdfast.role === 'leader' || holdfast.role === 'follower'")
    leader, follower = leader_and_follower(first, second)
    leader.wait_for_function(LIVE)
    # Two tabs that both took the lease at once settle on one within a beat;
    # from then on one stream, across the next beats too.
    assert wait_streams(server, token, 1) == {"sse": 1, "poll": 0, "max": 200}
    assert_streams_stay(server, token, 1, seconds=2.5)
    assert leader_and_follower(first, second) == (leader, follower)
    assert follower.evaluate("holdfast.transport") == "none"
    follower.wait_for_function("document.getElementById('conn').dataset.state === 'live' && "
                               "document.getElementById('conn-note').textContent === 'via another tab'")

    task_id = submit_api(server, token, "seen by both")
    for page in (leader, follower):
        wait_thumbnail(page, task_id)
    assert follower.evaluate("holdfast.lastSeq") == leader.evaluate("holdfast.lastSeq") > 0

    track_streams(follower)
    leader.close()
    # At once, not after the fallback lease runs out (LEASE_MS, 6 s): the
    # closing tab gives its lock or lease up.
    follower.wait_for_function("holdfast.role === 'leader'", timeout=4_000)
    follower.wait_for_function(LIVE)
    # The follower opened a stream of its own, and it is the only one: the
    # closed leader's stream is gone, not just counted once.
    assert len(follower.stream_opens) == 1
    assert wait_streams(server, token, 1)["sse"] == 1
    after = submit_api(server, token, "after the hand-over", duration_s=0.5)
    wait_thumbnail(follower, after)
    assert follower.evaluate("holdfast.transport") == "sse" and len(follower.stream_opens) == 1
    assert streams(server, token)["sse"] == 1
    assert follower.errors == []


def one_leader(pages, timeout=10):
    """The leader once exactly one of `pages` leads and streams."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        roles = [p.evaluate("holdfast.role") for p in pages]
        if roles.count("leader") == 1 and roles.count("follower") == len(pages) - 1:
            leader = pages[roles.index("leader")]
            leader.wait_for_function(LIVE)
            return leader
        time.sleep(0.1)
    raise AssertionError(f"not one leader: {roles}")


# Without Web Locks the tabs elect a leader through a lease in localStorage,
# whose writes reach the other tabs a moment later: tabs that start together,
# or followers that all see the leader's lease go, must still elect one tab.
# "slow": each tab's renderer runs six times slower (Chromium's CPU
# throttling), as on a loaded machine, where a claim reaches the other tabs late.
@pytest.mark.parametrize("missing,slow", [("no-locks", False), ("neither", False), ("neither", True)],
                         ids=["no-locks", "neither", "neither-slow"])
def test_without_web_locks_tabs_that_start_or_take_over_together_elect_one(context, server, missing, slow):
    token = server.tokens["demo"]
    context.add_init_script(MISSING[missing])
    open_page(context, server, token).close()       # leaves the token in localStorage
    tabs = [context.new_page() for _ in range(3)]
    for page in tabs:
        if slow:
            context.new_cdp_session(page).send("Emulation.setCPUThrottlingRate", {"rate": 6})
        page.errors = []
        page.on("pageerror", lambda exc, page=page: page.errors.append(str(exc)))
        track_streams(page)
    for page in tabs:
        page.goto(server.url + "/", wait_until="commit")
    for page in tabs:
        page.wait_for_selector("#submit-form", state="visible")
    leader = one_leader(tabs)
    assert wait_streams(server, token, 1)["sse"] == 1
    assert_streams_stay(server, token, 1, seconds=2.5)
    assert one_leader(tabs) is leader
    assert sum(len(p.stream_opens) for p in tabs) == 1, [p.stream_opens for p in tabs]

    rest = [p for p in tabs if p is not leader]
    leader.close()
    new_leader = one_leader(rest)
    task_id = submit_api(server, token, "after the hand-over", duration_s=0.5)
    for page in rest:
        wait_thumbnail(page, task_id)
    assert one_leader(rest) is new_leader
    # Only the new leader ever opened a stream, and it is the only one left.
    assert [len(p.stream_opens) for p in rest] == [int(p is new_leader) for p in rest]
    assert wait_streams(server, token, 1)["sse"] == 1
    assert all(p.errors == [] for p in rest)


def submit_form(page, prompt, params):
    page.fill("#prompt", prompt)
    page.fill("#params", params)
    before = page.evaluate("holdfast.tasks.size")
    page.click("#submit-btn")
    page.wait_for_function("n => holdfast.tasks.size > n", arg=before)
    page.wait_for_function("document.getElementById('form-note').textContent === 'Submitted.'")
    return page.get_attribute(".task", "data-id")      # newest first


def test_cancel_refunds_a_running_task_and_retry_runs_a_failed_one_again(context, paying):
    server, token = paying, paying.tokens["payer"]
    session = api(server, token)

    def credits():
        return session.get(server.url + "/api/me", timeout=5).json()["credits"]

    def task(task_id):
        return session.get(f"{server.url}/api/tasks/{task_id}", timeout=5).json()["task"]

    def shows_credits(text):
        page.wait_for_function("t => document.getElementById('me-credits').textContent === t", arg=text)

    page = open_page(context, server, token)
    page.wait_for_function(LIVE)
    shows_credits("3 credits")

    long_id = submit_form(page, "a very long render", '{"duration_s": 120}')
    page.wait_for_selector(card(long_id, "running") + " progress.bar:visible")
    assert credits()["reserved"] == 1
    shows_credits(f"{credits()['balance']} credits (1 reserved)")
    assert page.is_visible(card(long_id) + " button.cancel")
    assert not page.is_visible(card(long_id) + " button.retry")
    page.click(card(long_id) + " button.cancel")
    page.wait_for_selector(card(long_id, "cancelled"))
    assert page.text_content(card(long_id) + " .meta") == "1 credit refunded"
    assert (task(long_id)["status"], task(long_id)["credits"]) == ("cancelled", "refunded")
    assert credits() == {"balance": 3, "reserved": 0}
    shows_credits("3 credits")
    assert not page.is_visible(card(long_id) + " button.cancel")
    assert not page.is_visible(card(long_id) + " progress.bar")

    failed_id = submit_form(page, "an impossible staircase", '{"duration_s": 3, "fail": "the model refused"}')
    page.wait_for_selector(card(failed_id, "failed"))
    assert page.text_content(card(failed_id) + " .task-error") == "the model refused"
    page.wait_for_function("id => document.querySelector(`.task[data-id=\"${id}\"] .meta`).textContent"
                           " === '1 credit refunded'", arg=failed_id)
    page.click(card(failed_id) + " button.retry")
    page.wait_for_function("n => holdfast.tasks.size === n", arg=3)
    retried = page.get_attribute(".task", "data-id")     # the newest, on top
    assert retried not in (long_id, failed_id)
    assert task(retried)["retry_of"] == failed_id
    assert task(retried)["params"] == {"prompt": "an impossible staircase", "duration_s": 3,
                                       "fail": "the model refused"}
    # The retry names its original; the original offers no second Retry
    # while this one lives (the server would return this one anyway).
    link = card(retried) + " a.retry-of"
    assert page.is_visible(link) and page.get_attribute(link, "data-of") == failed_id
    assert page.text_content(link) == f"retry of …{failed_id[-8:]}"
    assert not page.is_visible(card(long_id) + " a.retry-of")
    page.click(link)
    page.wait_for_selector(card(failed_id) + ".fresh")     # the link leads to the original
    page.wait_for_selector(card(failed_id) + " button.retry", state="detached")
    # It runs (and, with the same params, fails the same way); the old one stays failed.
    page.wait_for_selector(card(retried, "running"))
    page.wait_for_selector(card(retried, "failed"))
    page.wait_for_selector(card(failed_id) + " button.retry", state="visible")
    assert page.get_attribute(card(failed_id), "data-status") == "failed"
    assert [t["id"] for t in session.get(server.url + "/api/tasks", timeout=5).json()["tasks"]] == \
        page.eval_on_selector_all(".task", "els => els.map(e => e.dataset.id)")
    assert credits() == {"balance": 3, "reserved": 0}
    shows_credits("3 credits")
    assert page.errors == []


def test_another_device_with_the_same_token_shows_every_task(browser, server):
    """A second browser context shares no localStorage (nor Web Locks): it asks
    for the token, then restores every task from the server, a first page and
    the rest behind "Load more", and follows the first device's new tasks."""
    res = api(server, server.tokens["admin"]).post(server.url + "/api/admin/users", timeout=10,
                                                   json={"name": "traveller", "rate_per_s": 1000})
    token = res.json()["token"]
    session = api(server, token)
    first_ctx = browser.new_context(viewport={"width": 1100, "height": 900})
    second_ctx = browser.new_context(viewport={"width": 1100, "height": 900})
    try:
        first_ctx.set_default_timeout(20_000)
        second_ctx.set_default_timeout(20_000)
        first = open_page(first_ctx, server, token)
        first.wait_for_function(LIVE)
        # More than a page (50) of tasks; quick failures, so no images to make.
        for n in range(52):
            res = session.post(server.url + "/api/tasks", timeout=10, json={
                "provider": "demo", "params": {"prompt": f"old {n}", "duration_s": 0, "fail": True}})
            assert res.status_code == 201, res.text
        done = submit_form(first, "made on the first device", '{"duration_s": 0.5}')
        wait_thumbnail(first, done)
        running = submit_form(first, "still running", '{"duration_s": 4}')
        first.wait_for_selector(card(running, "running"))

        second = open_page(second_ctx, server, signed_in=False)
        assert second.evaluate("localStorage.getItem('holdfast.token')") is None
        sign_in(second, token)
        second.wait_for_function(LIVE)
        second.wait_for_selector("#load-more:visible")
        assert second.eval_on_selector_all(".task", "els => els.length") == 50
        second.click("#load-more")
        second.wait_for_function("document.querySelectorAll('.task').length === 54")
        assert second.is_hidden("#load-more")

        listed, cursor = [], None
        while True:
            page_ = session.get(server.url + "/api/tasks", timeout=5,
                                params={"limit": 200, **({"before": cursor} if cursor else {})}).json()
            listed += [t["id"] for t in page_["tasks"]]
            cursor = page_["next"]
            if not cursor:
                break
        ids = "els => els.map(e => e.dataset.id)"
        assert second.eval_on_selector_all(".task", ids) == listed
        assert first.eval_on_selector_all(".task", ids) == listed
        wait_thumbnail(second, done)
        wait_thumbnail(second, running)          # followed live on the second device
        assert second.text_content(card(running) + " .prompt") == "still running"

        # Each device streams on its own; a task made on one shows up on the other.
        assert wait_streams(server, token, 2)["sse"] == 2
        newer = submit_form(first, "seen on both devices", '{"duration_s": 0.5}')
        wait_thumbnail(second, newer)
        assert second.eval_on_selector_all(".task", ids)[0] == newer
        assert first.errors == [] and second.errors == []
    finally:
        first_ctx.close()
        second_ctx.close()


# Counts what the page holds live: timers not yet fired or cleared, intervals,
# listeners on targets that can still fire (the window, the document, nodes in
# it, open event streams and channels), open EventSources and channels. A
# listener on a removed card or a closed stream dies with it and is not counted.
TRACK = """(() => {
  const w = window;
  const live = { timeouts: new Set(), intervals: new Set(), listeners: new Map(),
                 sources: [], channels: new Set(), opens: 0 };
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
  const proto = EventTarget.prototype;
  const add = proto.addEventListener, remove = proto.removeEventListener;
  const key = (type, opts) => `${type}|${typeof opts === 'boolean' ? opts : Boolean(opts && opts.capture)}`;
  proto.addEventListener = function (type, fn, opts) {
    if (fn) {
      let byKey = live.listeners.get(this);
      if (!byKey) live.listeners.set(this, byKey = new Map());
      if (!byKey.has(key(type, opts))) byKey.set(key(type, opts), new Set());
      byKey.get(key(type, opts)).add(fn);
    }
    return add.call(this, type, fn, opts);
  };
  proto.removeEventListener = function (type, fn, opts) {
    const byKey = live.listeners.get(this);
    if (byKey && byKey.has(key(type, opts))) byKey.get(key(type, opts)).delete(fn);
    return remove.call(this, type, fn, opts);
  };
  const ES = w.EventSource;
  w.EventSource = class extends ES {
    constructor(...a) {
      super(...a);
      live.sources.push(this);
      add.call(this, 'open', () => { live.opens += 1; });
    }
  };
  if (typeof w.BroadcastChannel === 'function') {
    const BC = w.BroadcastChannel;
    const close = BC.prototype.close;
    w.BroadcastChannel = class extends BC {
      constructor(...a) { super(...a); live.channels.add(this); }
      close() { live.channels.delete(this); return close.call(this); }
    };
  }
  const canFire = (t) => t === w || t === document || (t instanceof Node && t.isConnected)
    || (t instanceof ES && t.readyState !== ES.CLOSED) || live.channels.has(t);
  // Listeners inside a task's card are counted per card: there are as many
  // cards as tasks, and the number of tasks grows in the test.
  w.__live = () => {
    let listeners = 0;
    const perCard = new Map();
    for (const [t, byKey] of live.listeners) {
      if (!canFire(t)) continue;
      let n = 0;
      for (const fns of byKey.values()) n += fns.size;
      const card = t instanceof Element && t.closest('.task');
      if (card) perCard.set(card, (perCard.get(card) || 0) + n);
      else listeners += n;
    }
    return { timeouts: live.timeouts.size, intervals: live.intervals.size, listeners,
             perCard: Math.max(0, ...perCard.values()), cards: document.querySelectorAll('.task').length,
             sources: live.sources.filter((es) => es.readyState !== ES.CLOSED).length,
             made: live.sources.length, opens: live.opens, channels: live.channels.size };
  };
  w.__locks = async () => {
    if (!navigator.locks) return { held: 0, pending: 0 };
    const q = await navigator.locks.query();
    return { held: q.held.length, pending: q.pending.length };
  };
})();"""
HELD = ("timeouts", "intervals", "listeners", "perCard", "sources", "channels")


# Streams of one second: every cycle crosses a few stream reconnections.
@pytest.mark.parametrize("missing", ["native", "neither"])
@pytest.mark.parametrize("server", [{"HOLDFAST_SSE_MAX_S": "1"}], ids=["1s-streams"], indirect=True)
def test_sign_out_and_in_reconnects_and_updates_leak_no_timer_listener_or_stream(context, server, missing):
    token = server.tokens["demo"]
    context.add_init_script(MISSING[missing] + TRACK)
    page = open_page(context, server, token)
    signed_out = []

    def settle():
        """Signed in, streaming, idle: what it holds then is its steady state."""
        page.wait_for_function(LIVE)
        page.wait_for_function("__live().timeouts === 0", timeout=5_000)   # fetches, scheduleMe
        return {**page.evaluate("__live()"), **page.evaluate("__locks()")}

    def cycle(i):
        # Two task runs of 1.5 s: updates and thumbnails across stream
        # reconnections, which the browser makes on the same EventSource.
        page.wait_for_function(LIVE)
        before = page.evaluate("__live()")
        for n in range(2):
            wait_thumbnail(page, submit_api(server, token, f"cycle {i}.{n}"))
        page.wait_for_function("o => __live().opens > o", arg=before["opens"])
        assert page.evaluate("__live().made") == before["made"]
        page.click("#signout")
        page.wait_for_selector("#token-form", state="visible")
        # Signed out: nothing of the session survives.
        page.wait_for_function("__live().timeouts === 0", timeout=5_000)
        out = {**page.evaluate("__live()"), **page.evaluate("__locks()")}
        signed_out.append(out["listeners"])      # the page's own, the same every time
        assert {k: out[k] for k in HELD + ("cards", "held", "pending")} == {
            "timeouts": 0, "intervals": 0, "listeners": signed_out[0], "perCard": 0, "sources": 0,
            "channels": 0, "cards": 0, "held": 0, "pending": 0}, f"after sign-out {i}"
        sign_in(page, token)

    cycle(0)
    first = settle()
    for i in range(1, 5):
        cycle(i)
    last = settle()
    # Ten cards now, two then; each of them a download link's listener.
    assert (first["cards"], last["cards"]) == (2, 10)
    assert {k: last[k] for k in HELD} == {k: first[k] for k in HELD}, (first, last)
    assert last["perCard"] == 1
    assert last["sources"] == 1 and last["intervals"] == (1 if missing == "native" else 2)
    assert (last["held"], last["pending"]) == ((1, 0) if missing == "native" else (0, 0))
    # One EventSource per sign-in, each reconnected by the browser; the
    # server holds one stream.
    assert last["made"] == 6 and last["opens"] >= last["made"] + 5, last
    assert wait_streams(server, token, 1)["sse"] == 1
    assert page.errors == []


def test_the_page_recovers_by_itself_when_the_server_is_killed_and_restarted(context, server, tmp_path):
    token = server.tokens["demo"]
    page = open_page(context, server, token)
    page.wait_for_function("holdfast.transport === 'sse' && holdfast.role === 'leader'")
    page.fill("#prompt", "survives kill -9")
    page.fill("#params", '{"duration_s": 3}')
    page.click("#submit-btn")
    page.wait_for_selector(".task[data-status=running]")
    in_flight = page.get_attribute(".task", "data-id")

    server.kill()
    page.wait_for_function("document.getElementById('conn').dataset.state !== 'live'", timeout=15_000)
    time.sleep(1)
    restarted = ServerProcess(tmp_path, port=server.port).start()
    try:
        wait_thumbnail(page, in_flight, timeout=30_000)       # the task finished after the restart
        later = submit_api(restarted, token, "after the restart", duration_s=0.5)
        wait_thumbnail(page, later, timeout=20_000)
        page.wait_for_function("holdfast.transport === 'sse' && "
                               "document.getElementById('conn').dataset.state === 'live'", timeout=20_000)
        assert wait_streams(restarted, token, 1)["sse"] == 1
        assert page.errors == []
    finally:
        restarted.stop()


# One slot, taken by another client: the page's stream gets 503 and it polls.
@pytest.mark.parametrize("server", [{"HOLDFAST_SSE_MAX_STREAMS": "1"}], ids=["cap-1"], indirect=True)
def test_past_the_stream_cap_the_page_falls_back_to_polling_and_still_updates(context, server):
    token = server.tokens["demo"]
    hog = requests.get(f"{server.url}/api/events?token={token}", stream=True, timeout=10)
    try:
        assert hog.status_code == 200 and wait_streams(server, token, 1)["sse"] == 1
        page = open_page(context, server, token)
        page.wait_for_function("holdfast.transport === 'poll' && "
                               "document.getElementById('conn').dataset.state === 'polling'")
        task_id = submit_api(server, token, "polled", duration_s=1)
        page.wait_for_selector(card(task_id))
        wait_thumbnail(page, task_id)
        assert page.errors == []
    finally:
        hog.close()


# A user with no events yet has cursor 0. The page's first poll asks "from
# now"; every later poll must resume from the cursor it got, or a task made
# between two polls (after the list was loaded) is never shown.
@pytest.mark.parametrize("server", [{"HOLDFAST_SSE_MAX_STREAMS": "1"}], ids=["cap-1"], indirect=True)
def test_a_polling_page_misses_no_task_made_between_its_first_polls(context, server):
    token = server.tokens["demo"]
    hog = requests.get(f"{server.url}/api/events?token={token}", stream=True, timeout=10)
    held, lists = [], []
    try:
        assert hog.status_code == 200 and wait_streams(server, token, 1)["sse"] == 1

        def on_poll(route):
            if "wait=0" in route.request.url:
                route.continue_()
            else:
                held.append(route)      # the first long poll waits until the test lets it go

        context.route("**/api/events/poll?*", on_poll)
        page = open_page(context, server, token)
        page.on("response", lambda res: "/api/tasks?" in res.url and lists.append(res.url))
        deadline = time.time() + 20
        while not held and time.time() < deadline:
            page.wait_for_timeout(100)
        assert held, "the page never sent its long poll"
        # The resync after the first poll has loaded the list: the task comes after it.
        while len(lists) < 1 and time.time() < deadline:
            page.wait_for_timeout(100)
        page.wait_for_timeout(500)
        task_id = submit_api(server, token, "between two polls", duration_s=0.2)
        while api(server, token).get(f"{server.url}/api/tasks/{task_id}", timeout=5).json()["task"][
                "status"] != "succeeded" and time.time() < deadline:
            time.sleep(0.1)
        held[0].continue_()
        page.wait_for_selector(card(task_id), timeout=10_000)
        assert page.errors == []
    finally:
        hog.close()
