"""Security headers on the page, the console and their files: a
Content-Security-Policy without inline script, no framing, no referrer; and
in Chromium, the page and the console work under them with no violation
reported (while an inline script, the thing the policy forbids, is reported
and does not run). Screenshots go to tests/artifacts/headers/."""

import os
import re

import pytest

from support import CSP_WATCH, ROOT, ServerProcess

ARTIFACTS = os.path.join(ROOT, "tests", "artifacts", "headers")
ASSETS = ["/", "/console", "/static/app.js", "/static/holdfast.js", "/static/style.css", "/static/console.js",
          "/static/console.css", "/static/vendor/uplot/uPlot.iife.min.js", "/static/vendor/uplot/uPlot.min.css"]


def policy(header):
    return {part.split()[0]: part.split()[1:] for part in header.split(";") if part.strip()}


@pytest.mark.parametrize("path", ASSETS)
def test_the_page_the_console_and_their_files_carry_the_headers(client, path):
    res = client.get(path, token=None)
    assert res.status == 200, res
    csp = policy(res.headers["content-security-policy"])
    assert csp["default-src"] == ["'self'"] and csp["script-src"] == ["'self'"]
    assert not any("unsafe" in v for values in csp.values() for v in values)
    assert csp["frame-ancestors"] == ["'none'"] and csp["object-src"] == ["'none'"]
    assert res.headers["x-frame-options"] == "DENY"
    assert res.headers["referrer-policy"] == "no-referrer"
    assert res.headers["x-content-type-options"] == "nosniff"


def test_a_missing_static_file_is_still_a_json_404(client):
    res = client.get("/static/nope.js", token=None)
    assert res.status == 404 and res.json()["error"]["code"]


@pytest.mark.parametrize("name", ["index.html", "console.html"])
def test_the_html_holds_no_inline_script_or_style(name):
    html = open(os.path.join(ROOT, "static", name)).read()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all('src="/static/' in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"<style\b|\sstyle=|\son[a-z]+=|javascript:", html, re.I)


# -- in Chromium -------------------------------------------------------------------

@pytest.fixture
def server(tmp_path):
    s = ServerProcess(tmp_path).start()
    yield s
    s.stop()


@pytest.fixture
def context(browser):
    ctx = browser.new_context(viewport={"width": 1100, "height": 900})
    ctx.set_default_timeout(20_000)
    yield ctx
    ctx.close()


def watched(context):
    page = context.new_page()
    page.csp_console = []
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("console", lambda m: page.csp_console.append(m.text)
            if "Content Security Policy" in m.text or "Content-Security-Policy" in m.text else None)
    page.add_init_script(CSP_WATCH)
    return page


def shot(page, name):
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, name), full_page=True)


def test_the_page_works_under_the_policy_with_no_violation(context, server):
    page = watched(context)
    page.goto(server.url + "/")
    page.fill("#token-input", server.tokens["demo"])
    page.click("#token-form button[type=submit]")
    page.wait_for_selector("#submit-form", state="visible")
    page.fill("#prompt", "a fox under a strict policy")
    page.click("#submit-btn")
    # The result image is fetched with the token and shown from a blob: URL.
    page.wait_for_function(
        "() => { const img = document.querySelector('.task[data-status=\"succeeded\"] .files img');"
        " return img && img.complete && img.naturalWidth > 0; }", timeout=30_000)
    shot(page, "page.png")
    assert page.evaluate("window.__csp") == [] and page.csp_console == [] and not page.errors
    # The listener hears what the policy forbids: an inline script is
    # reported, and does not run.
    page.evaluate("() => { const s = document.createElement('script'); s.textContent = 'window.__ran = 1';"
                  " document.body.append(s); }")
    page.wait_for_function("() => window.__csp.length > 0")
    assert page.evaluate("window.__ran") is None
    assert page.evaluate("window.__csp")[0].startswith("script-src")


def test_the_console_works_under_the_policy_with_no_violation(context, server):
    page = watched(context)
    page.goto(server.url + "/console")
    page.fill("#token-input", server.tokens["admin"])
    page.click("#token-form button[type=submit]")
    page.wait_for_selector("body[data-ready='1']")
    page.wait_for_selector("#live .card")
    shot(page, "console.png")
    assert page.evaluate("window.__csp") == [] and page.csp_console == [] and not page.errors


def test_neither_is_shown_in_a_frame(context, server):
    page = watched(context)

    def framed(path):
        page.set_content(f'<iframe id="f" src="{server.url}{path}"></iframe>')
        page.wait_for_timeout(1000)
        frame = page.frame_locator("#f")
        return frame.locator("body").inner_text(timeout=5000)

    # A response without the headers shows in a frame (the control)...
    assert '"ok"' in framed("/healthz")
    # ...the page and the console do not.
    for path in ("/", "/console"):
        assert "token" not in framed(path).lower(), path
