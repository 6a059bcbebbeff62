"""The bundled page shows each task whole, in Chromium against a real server:
a detail dialog (click or Enter; Escape closes) with every parameter, the
attempts, times, error, files with an enlarged image, the event timeline
growing live, and the retry chain both ways; status and provider filters; a
denser list on a desktop; and the texts that used to be stale: no last step
on an ended card, "failed" said once, "Cannot reach the server" gone once
the stream is back, a running card that says when its data may be old, times
that agree, "signed out" rather than "offline", "1 credit". At 375 and 1440
px wide, under the server's Content-Security-Policy with no violation.
Screenshots go to tests/artifacts/page_detail/."""

import os
import re
import time

import pytest

from support import CSP_WATCH, ROOT, ServerProcess, api, paying_server

ARTIFACTS = os.path.join(ROOT, "tests", "artifacts", "page_detail")
WIDTHS = [375, 1440]
HOSTILE = 'a fox <img src=x onerror="window.pwned=1"><b>bold</b> & "quotes"'
@pytest.fixture
def paying(tmp_path):
    """A real server where a demo task costs a credit; "payer" has two."""
    with paying_server(tmp_path, 2) as s:
        yield s


@pytest.fixture
def server(tmp_path):
    s = ServerProcess(tmp_path).start()
    yield s
    s.stop()


def new_page(browser, width):
    ctx = browser.new_context(viewport={"width": width, "height": 900 if width > 400 else 760})
    ctx.set_default_timeout(20_000)
    page = ctx.new_page()
    page.errors, page.csp_console = [], []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("console", lambda m: page.csp_console.append(m.text)
            if "Content Security Policy" in m.text or "Content-Security-Policy" in m.text else None)
    page.add_init_script(CSP_WATCH)
    return ctx, page


def shot(page, width, name):
    """The whole page, or, with a dialog open, what the user sees."""
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, f"{width}-{name}.png"),
                    full_page=not page.evaluate("!!document.querySelector('dialog[open]')"))


def sign_in(page, token):
    page.fill("#token-input", token)
    page.click("#token-form button[type=submit]")
    page.wait_for_selector("#submit-form", state="visible")
    page.wait_for_selector("#conn[data-state=live]")


def submit(server, token, params):
    res = api(server, token).post(server.url + "/api/tasks", timeout=10,
                                  json={"provider": "demo", "params": params})
    assert res.status_code == 201, res.text
    return res.json()["task"]["id"]


def card(task_id, status=None):
    return f'.task[data-id="{task_id}"]' + (f'[data-status="{status}"]' if status else "")


def no_violation(page):
    assert page.evaluate("window.__csp") == [] and page.csp_console == [] and page.errors == []


def timeline(page):
    return page.eval_on_selector_all("#detail .d-event", "els => els.map(e => "
                                     "[Number(e.dataset.seq), e.dataset.type, e.dataset.status])")


def wait_running_step(page, task_id):
    """The running card's step text, once it names one (not just a percentage)."""
    page.wait_for_function(
        "id => { const step = document.querySelector(`.task[data-id=\"${id}\"] .step`);"
        " return step && /[a-z]/.test(step.textContent); }",
        arg=task_id)
    return page.text_content(card(task_id) + " .step").split(" · ")[0]


@pytest.mark.parametrize("width", WIDTHS)
def test_a_task_opens_whole_with_its_timeline_and_retry_chain_and_the_texts_are_right(browser, paying, width):
    server, token = paying, paying.tokens["payer"]
    session = api(server, token)
    ctx, page = new_page(browser, width)
    try:
        page.goto(server.url + "/")
        page.wait_for_selector("#token-form", state="visible")
        # Signed out, the header says so: not "offline".
        assert page.text_content("#conn") == "signed out"
        assert page.get_attribute("#conn", "data-state") == "signed-out"
        shot(page, width, "signed-out")
        sign_in(page, token)
        page.wait_for_function("document.getElementById('me-credits').textContent === '2 credits'")

        # A failing task, with hostile text in its params; it is refunded.
        failed = submit(server, token, {"prompt": HOSTILE, "duration_s": 1, "fail": "the model refused",
                                        "nested": {"list": [1, "<i>two</i>"], "empty": None}})
        page.wait_for_selector(card(failed, "failed"))
        page.wait_for_function("id => document.querySelector(`.task[data-id=\"${id}\"] .meta`).textContent"
                               " === '1 credit refunded'", arg=failed)
        text = page.text_content(card(failed))
        assert text.lower().count("failed") == 1, text     # the status, not also the last step
        assert page.text_content(card(failed) + " .task-error") == "the model refused"
        assert page.is_hidden(card(failed) + " .step") or page.text_content(card(failed) + " .step") == ""

        # Its retry, from the card's button; it fails the same way.
        page.click(card(failed) + " button.retry")
        page.wait_for_function("id => [...document.querySelectorAll('.task')].some("
                               "c => c.querySelector('.retry-of') && c.querySelector('.retry-of').dataset.of === id)",
                               arg=failed)
        retry = page.eval_on_selector(f'.retry-of[data-of="{failed}"]', "a => a.closest('.task').dataset.id")
        assert session.get(f"{server.url}/api/tasks/{retry}", timeout=5).json()["task"]["retry_of"] == failed
        page.wait_for_selector(card(retry, "failed"), timeout=30_000)

        # The original, whole: a click on its card.
        page.click(card(failed) + " .prompt")
        page.wait_for_selector(f'#detail[open][data-id="{failed}"][data-status="failed"]')
        page.wait_for_selector('#detail .d-event[data-type="finished"]')
        params = page.text_content("#detail .d-params")
        assert "<img" in params and "&" in params and '\\"quotes\\"' in params and "<i>two</i>" in params
        assert "the model refused" in params and '"empty": null' in params
        assert page.query_selector("#detail .d-params *") is None          # text, never markup
        assert page.evaluate("window.pwned") is None
        facts = dict(zip(page.eval_on_selector_all("#detail .d-facts dt", "els => els.map(e => e.textContent)"),
                         page.eval_on_selector_all("#detail .d-facts dd", "els => els.map(e => e.textContent)")))
        task = session.get(f"{server.url}/api/tasks/{failed}", timeout=5).json()["task"]
        assert facts["Id"] == failed and facts["Attempts"] == str(task["attempts"]) == "1"
        assert facts["Credits"] == "1 credit refunded"
        assert {"Created", "Started", "Finished", "Deadline"} <= set(facts)
        assert "Step" not in facts                                          # ended: no last step
        assert page.text_content("#detail .d-error-code") == "provider_rejected"
        assert page.text_content("#detail .d-error-message") == "the model refused"
        # The timeline is the server's, oldest first.
        events = session.get(f"{server.url}/api/tasks/{failed}/events", timeout=5).json()["events"]
        assert timeline(page) == [[e["seq"], e["type"], e["status"]] for e in events]
        assert [t for _, t, _ in timeline(page)][0] == "created" and timeline(page)[-1][1:] == ["finished", "failed"]
        # Times agree: the card's and the dialog's, from one clock.
        times = page.evaluate("id => [document.querySelector(`.task[data-id=\"${id}\"] time.created`).textContent,"
                              " document.querySelector(`.task[data-id=\"${id}\"] time.created`).title,"
                              " document.querySelector('#detail dd[data-field=created_at]').textContent]",
                              arg=failed)
        assert times[2] == f"{times[1]} ({times[0]})", times
        # The retry chain, both ways, each a link to the other.
        page.wait_for_selector(f'#detail .d-retries + .d-retry-list [data-open="{retry}"]')
        shot(page, width, "detail-failed")
        page.click(f'#detail [data-open="{retry}"]')
        page.wait_for_selector(f'#detail[open][data-id="{retry}"]')
        page.wait_for_selector(f'#detail .d-retry-of [data-open="{failed}"]')
        page.wait_for_selector('#detail .d-event[data-type="finished"]')
        shot(page, width, "detail-retry")
        page.click(f'#detail .d-retry-of [data-open="{failed}"]')
        page.wait_for_selector(f'#detail[open][data-id="{failed}"]')
        # Escape closes, and the focus goes back to the card.
        page.keyboard.press("Escape")
        page.wait_for_selector("#detail", state="hidden")
        assert page.evaluate("document.activeElement.dataset.id") == failed
        # From the keyboard: Enter on a focused card opens it.
        page.focus(card(retry))
        page.keyboard.press("Enter")
        page.wait_for_selector(f'#detail[open][data-id="{retry}"]')
        page.keyboard.press("Escape")
        page.wait_for_selector("#detail", state="hidden")
        # Closed, then another card focused and opened before the dialog's
        # close event comes: that late event neither empties the new detail
        # nor takes the focus back to the card closed.
        page.focus(card(failed))
        page.keyboard.press("Enter")
        page.wait_for_selector(f'#detail[open][data-id="{failed}"] .d-facts')
        page.evaluate('''id => new Promise(resolve => {
            const dialog = document.getElementById('detail');
            dialog.addEventListener('close', () => setTimeout(resolve, 0), { once: true });
            dialog.close();
            const other = document.querySelector(`.task[data-id="${id}"]`);
            other.focus();
            other.dispatchEvent(new KeyboardEvent('keydown', { key: 'Enter', bubbles: true }));
        })''', retry)
        assert page.get_attribute("#detail", "data-id") == retry and page.is_visible("#detail")
        assert page.evaluate("document.getElementById('detail-body').childElementCount") > 0
        assert page.evaluate("document.getElementById('detail').contains(document.activeElement)")
        page.keyboard.press("Escape")
        page.wait_for_selector("#detail", state="hidden")

        # A task opened while it runs: its timeline grows live, up to the end.
        done = submit(server, token, {"prompt": "a fox in the snow", "duration_s": 3})
        page.wait_for_selector(card(done, "running"))
        page.click(card(done) + " .prompt")
        page.wait_for_selector(f'#detail[open][data-id="{done}"]')
        page.wait_for_selector('#detail .d-event[data-type="created"]')
        before = len(timeline(page))
        page.wait_for_selector('#detail .d-event[data-type="finished"][data-status="succeeded"]', timeout=30_000)
        assert len(timeline(page)) > before
        events = session.get(f"{server.url}/api/tasks/{done}/events", timeout=5).json()["events"]
        assert timeline(page) == [[e["seq"], e["type"], e["status"]] for e in events]
        # Its file, enlarged.
        page.wait_for_function("() => { const img = document.querySelector('#detail .d-thumb img');"
                               " return img && img.complete && img.naturalWidth > 0; }")
        page.click("#detail .d-thumb")
        page.wait_for_selector("#viewer[open]")
        page.wait_for_function("() => { const img = document.getElementById('viewer-img');"
                               " return img.complete && img.naturalWidth > 0; }")
        big = page.eval_on_selector("#viewer-img", "img => img.getBoundingClientRect().width")
        thumb = page.eval_on_selector(card(done) + " .thumbs img", "img => img.getBoundingClientRect().width")
        assert big >= 2.5 * thumb and big <= width, (big, thumb)
        shot(page, width, "viewer")
        page.keyboard.press("Escape")
        page.wait_for_selector("#viewer", state="hidden")
        assert page.is_visible("#detail")                    # back to the details
        page.click("#detail .d-close")
        page.wait_for_selector("#detail", state="hidden")
        page.wait_for_function("document.getElementById('me-credits').textContent === '1 credit'")

        # A cancelled card shows no last step, and a running one with a
        # reservation says "1 credit" in the header.
        long = submit(server, token, {"prompt": "a long one", "duration_s": 60})
        step = wait_running_step(page, long)
        page.wait_for_function("document.getElementById('me-credits').textContent === '0 credits (1 reserved)'")
        page.click(card(long) + " button.cancel")
        page.wait_for_selector(card(long, "cancelled"))
        assert step not in page.text_content(card(long)), step
        assert page.text_content(card(long) + " .step") == ""
        page.wait_for_function("document.getElementById('me-credits').textContent === '1 credit'")

        # Filters: by status, by provider.
        page.select_option("#filter-status", "failed")
        visible = page.eval_on_selector_all(".task", "els => els.filter(e => !e.hidden).map(e => e.dataset.id)")
        assert sorted(visible) == sorted([failed, retry])
        assert page.text_content("#filter-note") == "Showing 2 of 4 loaded tasks."
        shot(page, width, "filter-failed")
        page.select_option("#filter-status", "")
        assert "demo" in page.eval_on_selector_all("#filter-provider option", "os => os.map(o => o.value)")
        page.select_option("#filter-provider", "demo")
        assert page.eval_on_selector_all(".task", "els => els.filter(e => !e.hidden).length") == 4
        page.select_option("#filter-provider", "")
        assert page.is_hidden("#filter-note")

        # A denser list on a desktop: two cards side by side; one column on a phone.
        boxes = page.eval_on_selector_all(".task", "els => els.slice(0, 2).map(e => {"
                                          " const r = e.getBoundingClientRect(); return [r.x, r.y, r.width]; })")
        if width >= 1200:
            assert boxes[0][1] == boxes[1][1] and boxes[1][0] > boxes[0][0] + boxes[0][2] - 1, boxes
        else:
            assert boxes[0][0] == boxes[1][0] and boxes[1][1] > boxes[0][1] and boxes[0][2] <= width, boxes
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        shot(page, width, "list")
        no_violation(page)
    finally:
        ctx.close()


@pytest.mark.parametrize("width", WIDTHS)
def test_a_running_card_says_its_data_is_old_while_the_server_is_unreachable_and_errors_clear(
        browser, server, tmp_path, width):
    token = server.tokens["demo"]
    ctx, page = new_page(browser, width)
    restarted = None
    try:
        page.goto(server.url + "/")
        sign_in(page, token)
        running = submit(server, token, {"prompt": "through an outage", "duration_s": 40})
        wait_running_step(page, running)
        assert page.is_hidden(card(running) + " .stale-note")

        server.kill()
        page.wait_for_selector(card(running) + '[data-stale="1"] .stale-note', timeout=30_000)
        note = page.text_content(card(running) + " .stale-note")
        assert re.fullmatch(r"Not updated since .+: the server cannot be reached, so this may be out of date\.",
                            note), note
        # An action that cannot reach the server says so...
        page.click(card(running) + " button.cancel")
        page.wait_for_function("id => document.querySelector(`.task[data-id=\"${id}\"] .note`).textContent"
                               " === 'Cancel failed: Cannot reach the server.'", arg=running)
        shot(page, width, "unreachable")

        time.sleep(0.5)
        restarted = ServerProcess(tmp_path, port=server.port).start()
        # ...until the stream is live again: then the notes are gone.
        page.wait_for_selector("#conn[data-state=live]", timeout=40_000)
        page.wait_for_selector(card(running) + " .note", state="hidden")
        page.wait_for_selector(card(running) + " .stale-note", state="hidden")
        assert page.get_attribute(card(running), "data-stale") is None
        assert "Cannot reach" not in page.text_content("body")
        shot(page, width, "reachable-again")
        no_violation(page)
    finally:
        ctx.close()
        if restarted:
            restarted.stop()


def test_holdfast_js_lists_the_retries_of_a_task_and_reads_its_timeline(browser, server):
    token = server.tokens["demo"]
    first = submit(server, token, {"prompt": "to retry", "duration_s": 30})
    session = api(server, token)
    assert session.post(f"{server.url}/api/tasks/{first}/cancel", timeout=5).status_code == 200
    retry = session.post(f"{server.url}/api/tasks/{first}/retry", timeout=5).json()["task"]["id"]
    ctx, page = new_page(browser, 1100)
    try:
        page.goto(server.url + "/")
        got = page.evaluate("""async ([token, first]) => {
            const { connect } = await import('/static/holdfast.js');
            const hf = connect({ url: '', token });
            try {
                const retries = await hf.list({ retryOf: first });
                const cancelled = await hf.list({ status: 'cancelled' });
                const timeline = await hf.events(first);
                let bad = null;
                try { await hf.list({ retryOf: 'nope' }); } catch (err) { bad = [err.status, err.code]; }
                return { retries: retries.tasks.map((t) => t.id), cancelled: cancelled.tasks.map((t) => t.id),
                         types: timeline.events.map((e) => [e.type, e.status]), truncated: timeline.truncated,
                         bad };
            } finally { hf.close(); }
        }""", [token, first])
        assert got["retries"] == [retry] and got["cancelled"] == [first]
        assert got["types"][0] == ["created", "queued"] and got["types"][-1] == ["finished", "cancelled"]
        assert got["truncated"] is False and got["bad"] == [400, "invalid_input"]
    finally:
        ctx.close()
