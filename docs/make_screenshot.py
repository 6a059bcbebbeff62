"""Refresh docs/screenshot.png: a real server with a few demo tasks in
different states, the page in headless Chromium, one screenshot.

    .venv/bin/python docs/make_screenshot.py [OUT.png]
"""

import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from playwright.sync_api import sync_playwright  # noqa: E402

from support import ServerProcess, api  # noqa: E402
from test_browser import ARGS, CHROMIUM  # noqa: E402


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "docs", "screenshot.png")
    with tempfile.TemporaryDirectory(prefix="holdfast-shot-") as data:
        server = ServerProcess(data).start()
        try:
            token = server.tokens["demo"]
            s = api(server, token)

            def submit(params, **body):
                res = s.post(server.url + "/api/tasks", timeout=10,
                             json={"provider": "demo", "params": params, **body})
                return res.json()["task"]["id"]

            submit({"prompt": "a lighthouse at dusk", "duration_s": 0.5})
            submit({"prompt": "a red fox in the snow", "duration_s": 0.5}, dedupe_key="order-123")
            failed = submit({"prompt": "an impossible staircase", "duration_s": 0.5,
                             "fail": "the model refused this prompt"})
            cancelled = submit({"prompt": "a very long render", "duration_s": 120})
            s.post(f"{server.url}/api/tasks/{cancelled}/cancel", timeout=10)
            time.sleep(2.5)
            submit({"prompt": "a whale made of clouds", "duration_s": 40})
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                page = browser.new_page(viewport={"width": 1000, "height": 1180})
                page.goto(server.url + "/")
                page.fill("#token-input", token)
                page.click("#token-form button[type=submit]")
                page.wait_for_selector(f'.task[data-id="{failed}"][data-status="failed"]')
                page.wait_for_function("[...document.querySelectorAll('.files img')]"
                                       ".every(i => i.complete && i.naturalWidth > 0) && "
                                       "document.querySelectorAll('.files img').length === 2")
                page.wait_for_function("document.getElementById('conn').dataset.state === 'live'")
                page.fill("#prompt", "a harbour in the rain")
                time.sleep(6)   # the running task gets some way
                page.screenshot(path=out, full_page=True)
                browser.close()
        finally:
            server.stop()
    print(out)


if __name__ == "__main__":
    main()
