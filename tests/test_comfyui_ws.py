"""ComfyUI's WebSocket: live progress into the task and its events, a job's
end heard before its next poll, and polling as the safety net when the
socket dies or never works. Real servers on 127.0.0.1: the fake ComfyUI
(HTTP and its WebSocket on one port) and the worker's threads, on a real
SQLite store; the API is asked in-process."""

import json
import logging
import re
import threading
import time

import pytest

from api import create_app
from config import Config
from fakes.comfyui import FIXTURES, FakeComfyUI
from providers import build_providers
from providers.comfyui_ws import ProgressSocket
from store import FileStore, SqliteStore
from support import ServerProcess, WSGIClient, api
from worker import Worker

WORKFLOW = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                         "color": 255}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "ws"}}}
STEP = re.compile(r"^EmptyImage (\d+)/20$")


class Holdfast:
    """The worker (its own threads, the real clock) and the API, on one store."""

    def __init__(self, tmp_path, fake, **conf):
        self.store = SqliteStore(str(tmp_path / "holdfast.db"))
        table = {"type": "comfyui", "url": fake.url, "timeout_s": 5, **conf}
        self.providers = build_providers({"comfy": table})
        self.files = FileStore(str(tmp_path / "files"))
        self.worker = Worker(self.store, self.providers, self.files, owner="test:ws", tick_s=0.2)
        app = create_app(self.store, self.providers, Config(data=str(tmp_path)), worker=self.worker,
                         files=self.files)
        self.token = self.store.create_user("alice")[1]
        self.client = WSGIClient(app, self.token)
        self.worker.start()

    def submit(self):
        res = self.client.post("/api/tasks", {"provider": "comfy", "params": {"workflow": WORKFLOW}})
        assert res.status == 201, res
        return res.json()["task"]["id"]

    def task(self, task_id):
        return self.client.get(f"/api/tasks/{task_id}").json()["task"]

    def wait(self, task_id, until, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = self.task(task_id)
            if until(task):
                return task
            time.sleep(0.05)
        raise AssertionError(f"not reached within {timeout}s: {task}")

    def events(self, task_id):
        """The task JSON of each of its events, oldest first, read through
        GET /api/events/poll."""
        out, since = [], 0
        while True:
            body = self.client.get(f"/api/events/poll?since={since}&wait=0").json()
            if not body["events"]:
                return out
            out += [e["task"] for e in body["events"] if e["task_id"] == task_id]
            since = body["next"]

    def close(self):
        self.worker.stop()
        self.store.close()


@pytest.fixture
def run(tmp_path):
    made = []

    def start(fake, **conf):
        made.append(Holdfast(tmp_path, fake, **conf))
        return made[-1]
    yield start
    for holdfast in made:
        holdfast.close()


@pytest.fixture
def fake():
    server = FakeComfyUI(job_seconds=3.0, progress_steps=20).start()
    yield server
    server.stop()


def fixture_messages():
    return FIXTURES["ws_messages"]


def _progress_steps(tasks):
    return [t for t in tasks if t["step"] and STEP.match(t["step"])]


def test_progress_from_the_socket_shows_in_the_task_and_its_events_and_polls_do_not_undo_it(run, fake):
    hf = run(fake, poll_interval_s=0.5, max_poll_interval_s=0.5)
    noted = []
    note_progress = hf.store.note_progress

    def counted(task_id, **kw):
        changed = note_progress(task_id, **kw)
        noted.append((time.monotonic(), changed))
        return changed
    hf.store.note_progress = counted
    task_id = hf.submit()
    seen = hf.wait(task_id, lambda t: t["step"] and STEP.match(t["step"]) and 0 < t["progress"] < 1, 20)
    value = int(STEP.match(seen["step"]).group(1))
    assert seen["progress"] == pytest.approx(value / 20, abs=0.001)
    done = hf.wait(task_id, lambda t: t["status"] == "succeeded", 30)
    assert done["files"] and done["progress"] == 1.0

    events = hf.events(task_id)
    steps = _progress_steps(events)
    assert len({t["step"] for t in steps}) >= 3, [e["step"] for e in events]
    # Polls every half second saw the job running; none took the step back to "generating".
    first = events.index(steps[0])
    assert all(e["step"] != "generating" for e in events[first:]), [e["step"] for e in events]
    # 20 progress messages (and 20 preview frames, ignored) over 3 s: at
    # most two writes a second.
    assert fake.ws_sent["progress"] == 20 and fake.ws_sent["binary"] == 20
    assert 3 <= len(noted) <= 9, noted
    gaps = [b[0] - a[0] for a, b in zip(noted, noted[1:])]
    assert min(gaps) >= 0.3, gaps
    assert fake.ws_connections == 1


def test_a_long_poll_interval_still_ends_the_task_soon_after_comfyui_says_it_ended(run, fake):
    fake.job_seconds = 1.0
    hf = run(fake, poll_interval_s=120, max_poll_interval_s=120)
    started = time.monotonic()
    task_id = hf.submit()
    done = hf.wait(task_id, lambda t: t["status"] == "succeeded", 60)
    took = time.monotonic() - started
    assert took < 60, f"took {took:.1f}s: the poll 120 s after the submit did it, not the socket"
    assert done["files"]
    assert fake.ws_sent["execution_success"] == 1 and fake.ws_sent["executing"] >= 2
    # One look at the history, the one the socket asked for.
    history = sum(n for path, n in fake.requests.items() if path.startswith("/history/"))
    assert history == 1, fake.requests


@pytest.mark.parametrize("failing", [False, True], ids=["execution_success", "execution_error"])
def test_without_the_final_executing_the_end_message_alone_ends_the_task_early(run, fake, failing):
    # ComfyUI drops messages: here every `executing`, the null one included.
    fake.ws_drop = {"executing"}
    fake.job_seconds = 1.0
    fake.fail_next = int(failing)
    hf = run(fake, poll_interval_s=120, max_poll_interval_s=120)
    started = time.monotonic()
    task_id = hf.submit()
    done = hf.wait(task_id, lambda t: t["status"] in ("succeeded", "failed"), 60)
    assert time.monotonic() - started < 60
    assert done["status"] == ("failed" if failing else "succeeded")
    if failing:
        assert done["error"]["code"] == "provider_rejected" and "fake failure" in done["error"]["message"]
    ended = "execution_error" if failing else "execution_success"
    assert fake.ws_sent[ended] == 1 and fake.ws_sent["executing"] == 0


def test_an_end_told_before_the_history_has_it_is_told_again(run, fake):
    # The poll the end asked for finds the job still running and schedules
    # the next one as usual, two minutes on; the end is told once more.
    fake.ws_end_before_history = 1.5
    fake.ws_drop = {"execution_success"}
    fake.job_seconds = 1.0
    hf = run(fake, poll_interval_s=120, max_poll_interval_s=120)
    started = time.monotonic()
    task_id = hf.submit()
    done = hf.wait(task_id, lambda t: t["status"] == "succeeded", 60)
    assert time.monotonic() - started < 60 and done["files"]
    history = sum(n for path, n in fake.requests.items() if path.startswith("/history/"))
    assert history == 2 and fake.requests["/queue"] == 1, fake.requests


def test_when_the_socket_dies_mid_job_the_task_still_ends_through_polling(run, fake, caplog):
    caplog.set_level(logging.INFO, "holdfast")
    fake.ws_kill_after_progress = 3
    hf = run(fake, poll_interval_s=1, max_poll_interval_s=1)
    task_id = hf.submit()
    done = hf.wait(task_id, lambda t: t["status"] == "succeeded", 40)
    assert done["files"]
    # The socket worked, then died before the end: no end was ever sent,
    # every reconnect was refused, and the poll found the job done.
    assert fake.ws_connections == 1
    assert 1 <= fake.ws_sent["progress"] <= 3 and fake.ws_sent["execution_success"] == 0
    assert _progress_steps(hf.events(task_id))
    hf.wait(task_id, lambda t: fake.ws_refused >= 1, 20)
    told = [r for r in caplog.records if "no live progress" in r.getMessage()]
    assert len(told) == 1, [r.getMessage() for r in told]


def test_a_comfyui_without_a_socket_is_polled_as_before_and_said_so_once(run, caplog):
    caplog.set_level(logging.INFO, "holdfast")
    with FakeComfyUI(job_seconds=0.5, progress_steps=20, websocket=False) as fake:
        hf = run(fake, poll_interval_s=0.5, max_poll_interval_s=0.5)
        task_id = hf.submit()
        done = hf.wait(task_id, lambda t: t["status"] == "succeeded", 30)
        assert done["files"] and fake.submissions == [done["external_id"]]
        # Tried again in the background (the backoff starts at about a second)...
        hf.wait(task_id, lambda t: fake.ws_refused >= 2, 20)
        assert fake.ws_connections == 0 and not fake.ws_sent["progress"]
        # ...and said once, not per try.
        told = [r for r in caplog.records if "no live progress" in r.getMessage()]
        assert len(told) == 1, [r.getMessage() for r in told]
        assert told[0].levelno == logging.WARNING


def test_websocket_false_in_the_table_opens_no_socket(run):
    with FakeComfyUI(job_seconds=0.5) as fake:
        hf = run(fake, poll_interval_s=0.5, max_poll_interval_s=0.5, websocket=False)
        task_id = hf.submit()
        hf.wait(task_id, lambda t: t["status"] == "succeeded", 30)
        assert fake.ws_connections == 0 and fake.ws_refused == 0 and fake.requests["/ws"] == 0


def test_the_server_follows_the_socket_and_closes_it_on_sigterm(tmp_path, fake):
    """`python app.py` as users run it: the worker it starts opens the
    socket, progress reaches GET /api/tasks/{id}, the end comes before the
    two-minute poll, and SIGTERM closes the socket on the way out."""
    (tmp_path / "holdfast.toml").write_text(
        f'[providers.comfy]\ntype = "comfyui"\nurl = "{fake.url}"\npoll_interval_s = 120\n'
        'max_poll_interval_s = 120\ntimeout_s = 5\n')
    server = ServerProcess(tmp_path, env={"HOLDFAST_CONFIG": str(tmp_path / "holdfast.toml")}).start()
    try:
        session = api(server, server.tokens["demo"])
        res = session.post(server.url + "/api/tasks", json={"provider": "comfy", "params": {"workflow": WORKFLOW}},
                           timeout=10)
        assert res.status_code == 201, res.text
        task_id = res.json()["task"]["id"]
        started, steps = time.monotonic(), set()
        while time.monotonic() - started < 60:
            task = session.get(f"{server.url}/api/tasks/{task_id}", timeout=10).json()["task"]
            if task["step"] and STEP.match(task["step"]):
                steps.add(task["step"])
            if task["status"] == "succeeded":
                break
            time.sleep(0.05)
        assert task["status"] == "succeeded", task
        assert steps and fake.ws_connections == 1 and fake.ws_connections_now() == 1
    finally:
        server.stop()
    assert server.proc.returncode == 0
    deadline = time.monotonic() + 10
    while fake.ws_connections_now() and time.monotonic() < deadline:
        time.sleep(0.05)
    # Closed with a close frame by the server, not torn down by its exit.
    assert fake.ws_connections_now() == 0 and fake.ws_closed_cleanly == 1


def test_stopping_the_worker_closes_the_socket_and_ends_its_thread(run, fake):
    hf = run(fake)
    deadline = time.monotonic() + 20
    while not fake.ws_connections_now() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.ws_connections_now() == 1
    hf.worker.stop()
    deadline = time.monotonic() + 10
    while fake.ws_connections_now() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.ws_connections_now() == 0 and fake.ws_closed_cleanly == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("holdfast-ws-") and t.is_alive()]
    assert fake.ws_connections == 1, "nothing reconnects after the stop"


def test_the_messages_a_real_comfyui_sent_end_each_of_its_jobs_once_and_move_no_progress():
    """The socket's reading, fed what a real ComfyUI 0.3.64 sent
    (tests/fixtures/comfyui/ws_messages.json: successes, a cached run, an
    interruption, an error; `progress_state`, which is not `progress`),
    then an old ComfyUI's `progress` that names neither prompt nor node."""
    recorded = fixture_messages()
    prompts = list(dict.fromkeys(m["data"]["prompt_id"] for m in recorded if "prompt_id" in m["data"]))
    progress, done, now = [], [], [100.0]
    sock = ProgressSocket("comfy", "http://127.0.0.1:1", "c", on_progress=lambda *a: progress.append(a),
                          on_done=done.append, open_timeout=1, websockets=None, clock=lambda: now[0])
    for n, prompt_id in enumerate(prompts):
        sock.watch(prompt_id, f"t{n}", WORKFLOW)
    for message in recorded:
        sock._handle(json.dumps({"type": message["type"], "data": message["data"]}))
        sock._report()
    now[0] += 10
    sock._report()
    ended = {m["data"]["prompt_id"] for m in recorded if m["type"] == "executing" and m["data"]["node"] is None}
    assert len(ended) == 5
    # Told once at the end, and once more as a reminder: nothing here is a
    # poll that saw the job in its history and forgot it.
    assert sorted(done) == sorted(2 * [f"t{prompts.index(p)}" for p in ended])
    assert progress == []

    sock.watch("old", "t-old", WORKFLOW)
    sock._handle(json.dumps({"type": "execution_start", "data": {"prompt_id": "old"}}))
    sock._handle(json.dumps({"type": "progress", "data": {"value": 3, "max": 20}}))
    sock._report()
    for value in (4, 5):      # within half a second of the last report: the latest wins
        sock._handle(json.dumps({"type": "progress",
                                 "data": {"value": value, "max": 20, "node": "1", "prompt_id": "old"}}))
        sock._handle("not JSON")
        sock._report()
    assert progress == [("t-old", "generating 3/20", 0.15)]
    now[0] += 0.5
    sock._report()
    assert progress[1:] == [("t-old", "EmptyImage 5/20", 0.25)]
    assert sock.latest("old") == ("EmptyImage 5/20", 0.25)
