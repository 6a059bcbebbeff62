"""Logs: one line per task state change, with task id and user, written once
the change is committed; HOLDFAST_LOG=json makes them JSON lines."""

import json
import logging

import pytest

from config import _JsonFormatter, log_output, setup_logging, stop_logging
from errors import StoreUnavailable

TASKS = "holdfast.tasks"


def changes(caplog):
    return [r for r in caplog.records if r.name == TASKS]


def submit(client, token, **params):
    res = client.post("/api/tasks", {"provider": "demo", "params": {"prompt": "fox", **params}}, token=token)
    assert res.status == 201, res
    return res.json()["task"]["id"]


def test_a_task_life_is_one_line_per_status_change(client, users, worker, clock, sqlite_store, caplog):
    caplog.set_level(logging.INFO, logger=TASKS)
    alice_id = sqlite_store.user_by_name("alice")["id"]
    task_id = submit(client, users["alice"])
    for _ in range(30):
        worker.run_once(clock())
        clock.advance(0.5)
    assert sqlite_store.get_task(task_id)["status"] == "succeeded"
    assert len(sqlite_store.task_events(task_id)) > 3, "progress updates happened, and are not logged"
    lines = changes(caplog)
    assert [(r.fields["from"], r.fields["to"]) for r in lines] == [
        (None, "queued"), ("queued", "running"), ("running", "succeeded")]
    for r in lines:
        assert r.levelno == logging.INFO
        assert r.fields["task_id"] == task_id and r.fields["user_id"] == alice_id
        assert task_id in r.getMessage() and f"user {alice_id}" in r.getMessage()
    assert lines[1].fields["external_id"].startswith("demo-") and lines[1].fields["attempts"] == 1
    assert "queued -> running" in lines[1].getMessage()


def test_failures_cancels_and_timeouts_say_why(client, users, worker, clock, sqlite_store, caplog, providers):
    caplog.set_level(logging.INFO, logger=TASKS)
    _, token = sqlite_store.create_user("carol", credits=10)
    providers["demo"].config["cost"] = 1
    failing = submit(client, token, fail="no foxes today")
    cancelled = submit(client, token)
    late = submit(client, token, duration_s=600)
    client.post(f"/api/tasks/{cancelled}/cancel", token=token)
    worker.run_once(clock())
    worker.run_once(clock.advance(1))
    worker.sweep(clock.advance(700))
    last = {r.fields["task_id"]: r for r in changes(caplog)}
    assert last[failing].fields["to"] == "failed" and last[failing].fields["error_code"] == "provider_rejected"
    assert "no foxes today" in last[failing].getMessage() and "credits refunded" in last[failing].getMessage()
    assert last[cancelled].fields["from"] == "queued" and last[cancelled].fields["to"] == "cancelled"
    assert last[late].fields["error_code"] == "timeout" and last[late].fields["credits"] == "refunded"


def test_refused_and_rolled_back_changes_are_not_logged(client, users, worker, clock, sqlite_store, caplog,
                                                        monkeypatch):
    caplog.set_level(logging.INFO, logger=TASKS)
    task_id = submit(client, users["alice"])
    client.post(f"/api/tasks/{task_id}/cancel", token=users["alice"])
    assert client.post(f"/api/tasks/{task_id}/cancel", token=users["alice"]).status == 409
    assert len(changes(caplog)) == 2

    other = submit(client, users["alice"])
    real_note = sqlite_store._note_change

    def note_then_fail(task, old):   # the change is noted, then its transaction rolls back
        real_note(task, old)
        raise StoreUnavailable("disk full")

    monkeypatch.setattr(sqlite_store, "_note_change", note_then_fail)
    with pytest.raises(StoreUnavailable):
        sqlite_store.cancel(other, sqlite_store.user_by_name("alice")["id"], now=clock())
    assert sqlite_store.get_task(other)["status"] == "queued"
    assert [r.fields["to"] for r in changes(caplog)] == ["queued", "cancelled", "queued"]


def test_json_lines_carry_the_fields(client, users, sqlite_store, caplog):
    caplog.set_level(logging.INFO, logger=TASKS)
    task_id = submit(client, users["alice"])
    [record] = changes(caplog)
    line = _JsonFormatter().format(record)
    out = json.loads(line)
    assert "\n" not in line
    assert out["logger"] == TASKS and out["level"] == "INFO" and out["event"] == "task_created"
    assert out["task_id"] == task_id and out["user_id"] == sqlite_store.user_by_name("alice")["id"]
    assert out["to"] == "queued" and task_id in out["message"]


@pytest.fixture
def own_logging():
    """setup_logging() for one test: the root logger as it was afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    stop_logging()
    root.handlers[:], level = saved
    root.setLevel(level)


def test_holdfast_log_json_installs_the_json_formatter(own_logging):
    setup_logging("json")
    assert isinstance(log_output().formatter, _JsonFormatter)
    setup_logging("text")
    assert not isinstance(log_output().formatter, _JsonFormatter)


def test_a_real_server_with_holdfast_log_json_writes_json_lines(tmp_path):
    import time

    from support import ServerProcess, api
    with ServerProcess(tmp_path / "data", env={"HOLDFAST_LOG": "json"}) as server:
        session = api(server, server.tokens["demo"])
        res = session.post(server.url + "/api/tasks", json={"provider": "demo",
                                                            "params": {"prompt": "fox", "duration_s": 0.5}})
        task_id = res.json()["task"]["id"]
        deadline = time.time() + 20
        while session.get(f"{server.url}/api/tasks/{task_id}").json()["task"]["status"] != "succeeded":
            assert time.time() < deadline, "the demo task did not finish"
            time.sleep(0.1)
        time.sleep(0.2)
    with open(server.log_path) as fh:
        lines = [json.loads(line) for line in fh if line.strip()]   # every line is JSON
    mine = [(x["from"], x["to"]) for x in lines if x.get("task_id") == task_id and x["logger"] == TASKS]
    assert mine == [(None, "queued"), ("queued", "running"), ("running", "succeeded")]


def test_a_log_line_is_written_by_the_logging_thread_and_the_caller_does_not_wait(monkeypatch, own_logging):
    import io
    import sys
    import threading
    import time

    class Held(io.StringIO):
        """stderr whose writes wait for the test to let them through."""

        def __init__(self):
            super().__init__()
            self.gate, self.writers = threading.Event(), []

        def write(self, text):
            self.writers.append(threading.current_thread().name)
            self.gate.wait(10)
            return super().write(text)

    out = Held()
    monkeypatch.setattr(sys, "stderr", out)
    try:
        setup_logging("text")
        started = time.monotonic()
        logging.getLogger("holdfast.test").info("one %s", "line")
        assert time.monotonic() - started < 1.0      # the write waits; the caller did not
    finally:
        out.gate.set()
    stop_logging()      # writes out what is queued
    assert "INFO holdfast.test: one line" in out.getvalue()
    assert out.writers and threading.current_thread().name not in out.writers


class _Counted:
    """stderr that counts its writes."""

    def __init__(self):
        import threading
        self.writes, self.text, self.lock = 0, "", threading.Lock()

    def write(self, text):
        with self.lock:
            self.writes += 1
            self.text += text
        return len(text)

    def flush(self):
        pass


def test_a_burst_of_lines_is_written_in_a_few_writes(monkeypatch, own_logging):
    import sys
    out = _Counted()
    monkeypatch.setattr(sys, "stderr", out)
    setup_logging("text")
    log = logging.getLogger("holdfast.test")
    for i in range(200):
        log.info("line %d", i)
    stop_logging()
    lines = out.text.splitlines()
    assert [line.split("holdfast.test: ")[1] for line in lines] == [f"line {i}" for i in range(200)]
    # One write per batch, not per line: the logging thread wakes once for
    # the lines of a batch (config.LOG_BATCH_S).
    assert out.writes <= 10, out.writes


def test_a_line_is_written_without_waiting_for_the_end(monkeypatch, own_logging):
    import sys
    import time
    out = _Counted()
    monkeypatch.setattr(sys, "stderr", out)
    setup_logging("json")
    logging.getLogger("holdfast.test").info("alone")
    deadline = time.monotonic() + 10
    while "alone" not in out.text:
        assert time.monotonic() < deadline, "the line was never written"
        time.sleep(0.01)
    assert json.loads(out.text)["message"] == "alone"


def test_a_warning_is_written_at_once_with_the_lines_before_it(monkeypatch, own_logging):
    import sys
    import time

    import config
    out = _Counted()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.setattr(config, "LOG_BATCH_S", 30.0)     # INFO lines would wait that long
    setup_logging("text")
    log = logging.getLogger("holdfast.test")
    log.info("quiet")
    time.sleep(0.3)
    assert out.text == ""       # waiting for more lines to write with it
    log.warning("loud")
    deadline = time.monotonic() + 10
    while "loud" not in out.text:
        assert time.monotonic() < deadline, "the warning waited for the batch"
        time.sleep(0.01)
    assert [line.split(": ", 1)[1] for line in out.text.splitlines()] == ["quiet", "loud"]


def test_flush_logs_writes_what_waits_before_the_caller_goes_on(monkeypatch, own_logging):
    import sys

    import config
    out = _Counted()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.setattr(config, "LOG_BATCH_S", 30.0)
    setup_logging("text")
    logging.getLogger("holdfast.test").info("migrated")
    config.flush_logs()
    print("holdfast: a start-up error", file=sys.stderr)   # as app.main() writes one
    lines = out.text.splitlines()
    assert lines[0].endswith("holdfast.test: migrated") and lines[1] == "holdfast: a start-up error"
