"""The examples in examples/ run: the web app attaches a finished task's
result to its order once, however often holdfast's real webhook arrives,
and mytasks.make_thumbnail serves the README's `[providers.thumbs]`
through a real server."""

import os
import re
import struct
import subprocess
import sys
import threading

import pytest
import requests
import waitress

from support import ROOT, ServerProcess, free_port, wait_for

sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import holdfast_client as hc  # noqa: E402
import webapp  # noqa: E402


def readme_thumbs_toml():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    return re.search(r"^\[providers\.thumbs\]\n.*?(?=\n\n|\n```)", text, re.S | re.M).group(0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("examples")
    config = data / "holdfast.toml"
    config.write_text(readme_thumbs_toml() + "\n")
    srv = ServerProcess(data, env={"HOLDFAST_WEBHOOK_ALLOW_PRIVATE": "1", "HOLDFAST_CONFIG": str(config),
                                   "PYTHONPATH": os.path.join(ROOT, "examples")})
    srv.start()
    yield srv
    srv.stop()


class Recorder:
    """WSGI middleware that keeps each webhook request as received."""

    def __init__(self, app):
        self.app, self.hooks = app, []

    def __call__(self, environ, start_response):
        if environ["PATH_INFO"] == "/holdfast/webhook":
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
            headers["content-type"] = environ.get("CONTENT_TYPE", "")
            self.hooks.append((headers, body))
            environ["wsgi.input"] = __import__("io").BytesIO(body)
        return self.app(environ, start_response)


@pytest.fixture
def app_server(server, tmp_path):
    client = hc.Client(server.url, server.tokens["demo"], timeout=30)
    listener = waitress.create_server(lambda e, s: None, host="127.0.0.1", port=0)
    url = f"http://127.0.0.1:{listener.effective_port}"
    orders = webapp.Orders(str(tmp_path / "orders.sqlite3"))
    recorder = Recorder(webapp.make_app(orders, client, client.webhook_secrets(), url))
    listener.application = recorder
    thread = threading.Thread(target=listener.run, daemon=True)
    thread.start()
    yield url, orders, recorder

    # Closed from its own loop: closing the sockets from here while the loop
    # thread selects on them fails that thread with EBADF.
    def close_all():
        for dispatcher in list(listener._map.values()):
            dispatcher.close()
    listener.trigger.pull_trigger(close_all)
    thread.join(10)
    assert not thread.is_alive(), "the example's server did not stop"
    listener.task_dispatcher.shutdown()


def test_the_web_app_attaches_a_result_once_when_the_webhook_comes_twice(app_server):
    url, orders, recorder = app_server
    r = requests.post(url + "/orders", json={"prompt": "a fox"}, timeout=30)
    assert r.status_code == 201, r.text
    order = r.json()
    assert order["task_id"].startswith("t_")
    done = wait_for(lambda: requests.get(f"{url}/orders/{order['id']}", timeout=10).json()["results"], 60,
                    "the order's result")
    assert len(done) == 1 and done[0]["url"].startswith(f"/api/tasks/{order['task_id']}/files/")
    assert len(recorder.hooks) == 1

    headers, body = recorder.hooks[0]      # holdfast's real delivery, sent again as it was
    replies = []

    def replay():
        replies.append(requests.post(url + "/holdfast/webhook", data=body, headers=headers, timeout=30))
    threads = [threading.Thread(target=replay) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [x.status_code for x in replies] == [200] * 4
    after = requests.get(f"{url}/orders/{order['id']}", timeout=10).json()
    assert after["results"] == done and after["status"] == "succeeded"
    assert all(x.json()["duplicate"] for x in replies)

    forged = body.replace(b"succeeded", b"cancelled")
    r = requests.post(url + "/holdfast/webhook", data=forged, headers={**headers, "webhook-id": "msg_forged"},
                      timeout=30)
    assert r.status_code == 400
    assert requests.get(f"{url}/orders/{order['id']}", timeout=10).json() == after


def test_mytasks_make_thumbnail_runs_as_the_readme_configures_it(server, tmp_path):
    client = hc.Client(server.url, server.tokens["demo"], timeout=30)
    task = client.wait(client.submit("thumbs", {"width": 32, "height": 20, "color": [1, 2, 3]})["id"], 60)
    assert task["status"] == "succeeded", task
    assert [f["name"] for f in task["files"]] == ["thumb.png"]
    path = client.download(task, "thumb.png", str(tmp_path / "thumb.png"))
    with open(path, "rb") as fh:
        data = fh.read()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert struct.unpack(">II", data[16:24]) == (32, 20)


def test_the_web_app_runs_as_the_readme_says(server, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HOLDFAST_URL": server.url, "HOLDFAST_TOKEN": server.tokens["demo"],
           "WEBAPP_PUBLIC_URL": url, "WEBAPP_PORT": str(port), "WEBAPP_DB": str(tmp_path / "orders.sqlite3")}
    env.pop("PYTHONPATH", None)      # it finds the client in the checkout by itself
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "examples", "webapp.py")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout.readline().decode().startswith("webapp serving on")
        order = wait_for(lambda: _post(url + "/orders", {"prompt": "a heron"}), 20, "the app to answer")
        assert order.status_code == 201, order.text
        results = wait_for(lambda: requests.get(f"{url}/orders/{order.json()['id']}", timeout=10).json()["results"],
                           60, "the order's result")
        assert len(results) == 1
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def _post(url, body):
    try:
        return requests.post(url, json=body, timeout=30)
    except requests.ConnectionError:
        return None
