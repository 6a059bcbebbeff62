"""Providers through the worker: ComfyUI and KIE against their fake servers,
local functions, slots, deadlines, downloads and configuration.

The worker runs on a test clock (run_once, sweep); the fakes run in real
time, so a test jumps its clock to the task's next look and lets a little
real time pass between looks.
"""

import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import requests

from api import create_app
from config import Config
from errors import ConfigError, InvalidInput
from providers import Output, RateLimiter, build_providers, parse_retry_after
from store import TERMINAL
from support import ROOT, WSGIClient, free_port
from worker import Worker

try:
    from tests.fakes import local as local_fns
    from tests.fakes.comfyui import FakeComfyUI
    from tests.fakes.kie import FakeKIE
except ImportError:  # plain `pytest` puts tests/, not the repo root, on sys.path
    from fakes import local as local_fns
    from fakes.comfyui import FakeComfyUI
    from fakes.kie import FakeKIE

LOCAL = local_fns.__name__
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KEY_ENV = {"KIE_TEST_KEY": "test-key"}


def workflow(width=64, color=0x336699, prefix="hf"):
    return {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": width, "height": 64, "batch_size": 1, "color": color}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


def kie_conf(kie, **extra):
    return {"type": "kie", "url": kie.url, "api_key_env": "KIE_TEST_KEY", "timeout_s": 2,
            "poll_interval_s": 0.05, "max_poll_interval_s": 0.2, **extra}


def comfy_conf(comfy, **extra):
    return {"type": "comfyui", "url": comfy.url, "timeout_s": 2, "poll_interval_s": 0.05,
            "max_poll_interval_s": 0.2, **extra}


def wait_for(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        result = predicate()
        if result:
            return result
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


class Rig:
    """A store, providers from a table, and a worker on the test clock."""

    def __init__(self, store, files, clock, table, owner="test:1:w"):
        self.store, self.files, self.clock = store, files, clock
        self.providers = build_providers(table, env=KEY_ENV)
        self.worker = Worker(store, self.providers, files, clock=clock, owner=owner)
        self.user = store.create_user(f"u{id(self) % 100000}")[0]

    def submit(self, provider, params):
        p = self.providers[provider]
        p.validate(params)
        now = self.clock()
        task, _ = self.store.submit(self.user["id"], provider, params, now=now,
                                    deadline_at=now + p.max_wait_s, cost=p.cost)
        return task["id"]

    def task(self, task_id):
        return self.store.get_task(task_id)

    def step(self, task_id):
        """One look at the task, at its next due time."""
        task = self.task(task_id)
        if task["next_poll_at"] is not None:
            self.clock.now = max(self.clock.now, task["next_poll_at"])
        self.worker.run_once(self.clock())
        return self.task(task_id)

    def run(self, task_id, limit_s=10.0, real=0.01):
        end = time.monotonic() + limit_s
        task = self.task(task_id)
        while time.monotonic() < end:
            task = self.step(task_id)
            if task["status"] in TERMINAL:
                return task
            time.sleep(real)
        raise AssertionError(f"task did not finish: {task['status']} {task['step']} {task['state']}")

    def file_bytes(self, task_id, name):
        meta = next(f for f in self.store.get_task(task_id)["files"] if f["name"] == name)
        return b"".join(self.files.open(task_id, meta)[0])     # on disk or in a bucket


@pytest.fixture
def comfy():
    with FakeComfyUI(job_seconds=0.05) as fake:
        yield fake


def comfy_rig(sqlite_store, files, clock, comfy, **extra):
    return Rig(sqlite_store, files, clock, {"comfy": comfy_conf(comfy, **extra)})


# -- ComfyUI -----------------------------------------------------------------

class TestComfyUI:
    def test_a_task_succeeds_with_its_image_stored_and_served(self, sqlite_store, files, clock, comfy, config):
        rig = comfy_rig(sqlite_store, files, clock, comfy)
        app = create_app(sqlite_store, rig.providers, config, worker=rig.worker, files=files, clock=clock)
        token = sqlite_store.create_user("carol")[1]
        client = WSGIClient(app, token)
        res = client.post("/api/tasks", {"provider": "comfy", "params": {"workflow": workflow()}})
        assert res.status == 201, res
        task = rig.run(res.json()["task"]["id"])
        assert task["status"] == "succeeded" and task["attempts"] == 1 and task["error"] is None
        [meta] = task["files"]
        assert meta["name"] == "hf_00001_.png"
        original = comfy.files[("output", "", "hf_00001_.png")]
        served = client.get(f"/api/tasks/{task['id']}/files/{meta['name']}")
        assert served.status == 200 and served.body == original and served.body.startswith(PNG_MAGIC)
        assert meta["sha256"] == hashlib.sha256(original).hexdigest() and meta["size"] == len(original)
        assert comfy.submissions == [task["external_id"]]

    def test_an_invalid_workflow_fails_at_once_with_comfyuis_message(self, sqlite_store, files, clock, comfy):
        rig = comfy_rig(sqlite_store, files, clock, comfy)
        task_id = rig.submit("comfy", {"workflow": workflow(width=0)})
        rig.worker.run_once(clock())
        task = rig.task(task_id)
        assert task["status"] == "failed" and task["error"]["code"] == "provider_rejected"
        assert "Prompt outputs failed validation" in task["error"]["message"]
        assert "node 1 (EmptyImage): Value 0 smaller than min of 1: width" in task["error"]["message"]
        assert comfy.submissions == [] and task["files"] == []

    def test_an_execution_error_fails_the_task_with_the_exception(self, sqlite_store, files, clock, comfy):
        rig = comfy_rig(sqlite_store, files, clock, comfy)
        comfy.fail_next = 1
        task = rig.run(rig.submit("comfy", {"workflow": workflow()}))
        assert task["status"] == "failed" and task["error"]["code"] == "provider_rejected"
        assert "SaveImage (node 2): RuntimeError: fake failure" in task["error"]["message"]

    def test_a_restart_mid_job_resubmits_under_a_new_prompt_id(self, sqlite_store, files, clock, comfy):
        rig = comfy_rig(sqlite_store, files, clock, comfy, retries=3)
        comfy.hold()
        task_id = rig.submit("comfy", {"workflow": workflow()})
        first = rig.step(task_id)
        assert first["status"] == "running"
        wait_for(lambda: rig.step(task_id)["step"] == "generating")
        comfy.restart()
        comfy.release()
        task = rig.run(task_id)
        assert task["status"] == "succeeded" and task["attempts"] == 2
        assert comfy.submissions == [first["external_id"], task["external_id"]]
        assert first["external_id"] != task["external_id"]

    def test_a_restart_with_no_retries_left_ends_provider_lost(self, sqlite_store, files, clock, comfy):
        rig = comfy_rig(sqlite_store, files, clock, comfy, retries=1)
        comfy.hold()
        task_id = rig.submit("comfy", {"workflow": workflow()})
        wait_for(lambda: rig.step(task_id)["step"] == "generating")
        comfy.restart()
        task = rig.run(task_id)
        assert task["status"] == "failed" and task["error"]["code"] == "provider_lost"
        assert len(comfy.submissions) == 1

    @pytest.mark.parametrize("where", ["running", "pending"])
    def test_a_crash_after_submit_before_recording_it_runs_the_job_once(
            self, sqlite_store, files, clock, comfy, monkeypatch, where):
        """The prompt_id was stored, ComfyUI got the job, then the process
        died. ComfyUI's history says {} for a job not finished: only /queue
        shows it is there, so it must not be submitted again."""
        rig = comfy_rig(sqlite_store, files, clock, comfy)
        comfy.hold()
        if where == "pending":
            requests.post(f"{comfy.url}/prompt", json={"prompt": workflow(color=1), "prompt_id": "other"},
                          timeout=5)
        provider = rig.providers["comfy"]
        real_submit = provider.submit

        class Crash(BaseException):
            pass

        def submit_then_die(task, now):
            real_submit(task, now)
            raise Crash()

        monkeypatch.setattr(provider, "submit", submit_then_die)
        task_id = rig.submit("comfy", {"workflow": workflow()})
        with pytest.raises(Crash):
            rig.worker.run_once(clock())
        monkeypatch.setattr(provider, "submit", real_submit)
        stored = rig.task(task_id)
        assert stored["status"] == "queued" and stored["external_id"] == comfy.submissions[-1]
        assert stored["lease_owner"] == "test:1:w"

        clock.advance(rig.worker.lease_s + 1)
        successor = Worker(sqlite_store, rig.providers, files, clock=clock, owner="test:2:w")
        successor.run_once(clock())
        found = rig.task(task_id)
        assert found["status"] == "running" and found["external_id"] == stored["external_id"]
        assert found["step"] == ("generating" if where == "running" else "waiting (1 ahead)")
        comfy.release()
        rig.worker = successor
        task = rig.run(task_id)
        assert task["status"] == "succeeded" and task["attempts"] == 1
        pid = stored["external_id"]
        assert comfy.submissions.count(pid) == 1 and comfy.runs[pid] == 1
        assert len([p for p in comfy.submissions if p != "other"]) == 1

    def test_a_job_that_never_finishes_ends_timeout_at_its_deadline_and_is_interrupted(
            self, sqlite_store, files, clock, comfy):
        rig = comfy_rig(sqlite_store, files, clock, comfy, max_wait_s=120)
        comfy.hold()
        task_id = rig.submit("comfy", {"workflow": workflow()})
        deadline = rig.task(task_id)["deadline_at"]
        wait_for(lambda: rig.step(task_id)["step"] == "generating")
        clock.now = deadline - 1
        rig.worker.run_once(clock())
        assert rig.worker.sweep(clock()) == 0 and rig.task(task_id)["status"] == "running"
        clock.now = deadline + 0.001
        assert rig.worker.sweep(clock()) == 1
        task = rig.task(task_id)
        assert task["status"] == "failed" and task["error"]["code"] == "timeout"
        assert task["finished_at"] == clock.now
        pid = task["external_id"]
        entry = wait_for(lambda: requests.get(f"{comfy.url}/history/{pid}", timeout=5).json())[pid]
        assert entry["status"]["messages"][-1][0] == "execution_interrupted"
        assert comfy.requests["/interrupt"] == 1
        clock.advance(10)
        rig.worker.run_once(clock())
        assert rig.task(task_id)["status"] == "failed"
        assert [t for _, t in sqlite_store.task_events(task_id)].count("finished") == 1


    @pytest.mark.parametrize("how", ["cancel", "deadline"])
    def test_a_task_that_ends_while_its_submit_is_in_flight_has_the_job_stopped(
            self, sqlite_store, files, clock, comfy, config, how):
        """The user cancels (or the sweeper expires the task) while POST
        /prompt is on its way: that cancel's delete reaches ComfyUI before
        the job does and finds nothing. The worker, finding the task ended
        when it records the submit, must stop the job it just started."""
        rig = comfy_rig(sqlite_store, files, clock, comfy, max_wait_s=120, cost=1)
        app = create_app(sqlite_store, rig.providers, config, worker=rig.worker, files=files, clock=clock)
        client = WSGIClient(app, sqlite_store.create_user("carol", credits=5)[1])
        comfy.hold()    # a job that starts runs until someone stops it
        arrived, go = threading.Event(), threading.Event()

        def hold_submit(prompt_id):
            arrived.set()
            go.wait(10)

        comfy.before_queue = hold_submit
        task_id = client.post("/api/tasks", {"provider": "comfy", "params": {"workflow": workflow()}}
                              ).json()["task"]["id"]
        runner = threading.Thread(target=rig.worker.run_once, args=(clock(),))
        runner.start()
        try:
            assert arrived.wait(10), "the submit never reached ComfyUI"
            if how == "cancel":
                assert client.post(f"/api/tasks/{task_id}/cancel").status == 200
            else:
                clock.now = rig.task(task_id)["deadline_at"] + 1
                assert rig.worker.sweep(clock()) == 1
        finally:
            go.set()
            runner.join(10)
        task = rig.task(task_id)
        pid = task["external_id"]
        assert comfy.submissions == [pid]
        # The first delete came too early; the second is the worker's, after the job.
        assert comfy.deletes == [pid, pid]
        assert comfy.wait_idle(5), "the job is left running at ComfyUI"
        assert task["status"] == ("cancelled" if how == "cancel" else "failed")
        assert task["credits"] == "refunded"
        clock.advance(600)
        rig.worker.run_once(clock())
        assert comfy.submissions == [pid] and rig.task(task_id)["version"] == task["version"]

# -- KIE ---------------------------------------------------------------------

class TestKIE:
    def test_a_task_survives_5xx_timeouts_and_a_429(self, sqlite_store, files, clock):
        """A 429 refuses createTask before any job exists: sent again once
        Retry-After has passed, as the same attempt. A createTask that timed
        out or got a 500 may have made a job: only `on_doubt = "resubmit"`
        sends it again, each time as a new attempt, capped by retries. The
        jobs at KIE are counted: each one is an attempt (by default the task
        would fail submission_in_doubt after one job: tests/test_doubt.py)."""
        # Seed 7 draws: timeout, 500, ok (createTask), then 500, ok, timeout, 500, ...
        # A timeout of 1 s: on a loaded machine a healthy answer must not look like one.
        with FakeKIE(seed=7, error_rate=0.3, timeout_rate=0.1, slow_seconds=1.5, rate_limit_once=True,
                     retry_after=7, job_seconds=0.2) as kie:
            rig = Rig(sqlite_store, files, clock, {"kie": kie_conf(kie, timeout_s=1.0, on_doubt="resubmit")})
            task_id = rig.submit("kie", {"model": "flux", "input": {"prompt": "a red fox"}})
            start = clock()
            rig.worker.run_once(start)
            after_429 = rig.task(task_id)
            assert after_429["status"] == "queued" and after_429["next_poll_at"] >= start + 7
            assert after_429["attempts"] == 1 and "posted_at" not in after_429["state"]
            task = rig.run(task_id, limit_s=15)
            assert task["status"] == "succeeded", task
            assert kie.faults["429"] == 1 and kie.faults["500"] >= 2 and kie.faults["timeout"] >= 2
            # 429, then timeout (a job made), 500 (none), ok (a job made).
            assert kie.requests["/api/v1/jobs/createTask"] == 4
            assert kie.jobs_per() == {"a red fox": 2} and task["external_id"] == kie.created[-1]
            assert task["attempts"] == 3 == rig.providers["kie"].retries
            [meta] = task["files"]
            url = f"{kie.url}/files/{task['external_id']}/0.png"
            assert rig.file_bytes(task_id, meta["name"]) == requests.get(url, timeout=5).content

    def test_a_task_survives_recordinfo_5xx_and_timeouts_with_one_job(self, sqlite_store, files, clock):
        """Polls that fail are asked again; they never make a job."""
        with FakeKIE(seed=7, error_rate=0.3, timeout_rate=0.1, slow_seconds=1.5, job_seconds=0.2,
                     fault_paths=("/api/v1/jobs/recordInfo",)) as kie:
            kie.rate_limit_next(1, retry_after=3, status=503)
            rig = Rig(sqlite_store, files, clock, {"kie": kie_conf(kie, timeout_s=1.0)})
            task = rig.run(rig.submit("kie", {"model": "flux", "input": {"prompt": "a red fox"}}), limit_s=15)
            assert task["status"] == "succeeded" and task["attempts"] == 1, task
            assert kie.faults["503"] == 1 and kie.faults["500"] >= 1 and kie.faults["timeout"] >= 1
            assert kie.requests["/api/v1/jobs/createTask"] == 2, "the refused one, then the one that made the job"
            assert kie.created == [task["external_id"]] and kie.jobs_per() == {"a red fox": 1}

    def test_a_record_without_data_is_asked_again_not_submitted_again(self, sqlite_store, files, clock):
        """`"data": null` with code 200 says nothing of the job: a second
        createTask would be a second paid job."""
        with FakeKIE(job_seconds=0.05, null_data_polls=3) as kie:
            rig = Rig(sqlite_store, files, clock, {"kie": kie_conf(kie)})
            task = rig.run(rig.submit("kie", {"model": "flux", "input": {"prompt": "fox"}}))
            assert task["status"] == "succeeded", task
            assert kie.null_data_polls == 0 and len(kie.created) == 1 and task["attempts"] == 1

    def test_a_link_that_expired_before_download_gives_result_expired(self, sqlite_store, files, clock):
        with FakeKIE(job_seconds=0.05) as kie:
            rig = Rig(sqlite_store, files, clock, {"kie": kie_conf(kie)})
            task_id = rig.submit("kie", {"model": "flux", "input": {"prompt": "fox"}})
            submitted = rig.step(task_id)
            assert submitted["status"] == "running"
            time.sleep(0.1)
            kie.expire(submitted["external_id"])
            task = rig.run(task_id)
            assert task["status"] == "failed" and task["error"]["code"] == "result_expired"
            assert task["files"] == [] and kie.requests[f"/files/{task['external_id']}/0.png"] >= 1

    def test_some_outputs_lost_gives_partial_with_the_rest_stored(self, sqlite_store, files, clock):
        with FakeKIE(job_seconds=0.05, outputs=3, dead_outputs={1}) as kie:
            rig = Rig(sqlite_store, files, clock, {"kie": kie_conf(kie)})
            task = rig.run(rig.submit("kie", {"model": "flux", "input": {"prompt": "three"}}))
            assert task["status"] == "partial" and task["error"]["code"] == "result_expired"
            assert "1 of 3" in task["error"]["message"]
            assert [f["name"] for f in task["files"]] == ["0.png", "2.png"]
            assert all(rig.file_bytes(task["id"], f["name"]).startswith(PNG_MAGIC) for f in task["files"])

    def test_a_kie_fail_gives_provider_rejected_with_fail_msg(self, sqlite_store, files, clock):
        with FakeKIE(job_seconds=0.05) as kie:
            rig = Rig(sqlite_store, files, clock, {"kie": kie_conf(kie)})
            task = rig.run(rig.submit("kie", {"model": "flux", "input": {"prompt": "x", "fail": True}}))
            assert task["status"] == "failed" and task["error"]["code"] == "provider_rejected"
            assert task["error"]["message"] == "generation failed (FakeKIE: input asked to fail) (failCode 500)"

    def test_a_wrong_api_key_fails_at_once(self, sqlite_store, files, clock):
        with FakeKIE(api_key="another-key") as kie:
            rig = Rig(sqlite_store, files, clock, {"kie": kie_conf(kie)})
            task_id = rig.submit("kie", {"model": "flux", "input": {}})
            rig.worker.run_once(clock())
            task = rig.task(task_id)
            assert task["status"] == "failed" and task["error"]["code"] == "provider_rejected"
            assert "API key" in task["error"]["message"] and kie.created == []

    def test_a_provider_that_is_down_never_fails_a_task_before_its_deadline(self, sqlite_store, files, clock):
        kie = FakeKIE().start()
        kie.stop()   # a port nobody listens on
        rig = Rig(sqlite_store, files, clock, {"kie": kie_conf(kie, max_wait_s=900, timeout_s=0.5)})
        task_id = rig.submit("kie", {"model": "flux", "input": {}})
        deadline = rig.task(task_id)["deadline_at"]
        looks = 0
        while True:
            task = rig.task(task_id)
            if task["next_poll_at"] >= deadline:
                break
            task = rig.step(task_id)
            rig.worker.sweep(clock())
            assert task["status"] == "queued" and task["error"] is None, task
            looks += 1
        assert looks >= 10 and task["state"]["failures"] == looks
        assert "cannot connect" in task["state"]["last_error"]
        clock.now = deadline + 1
        rig.worker.sweep(clock())
        task = rig.task(task_id)
        assert task["status"] == "failed" and task["error"]["code"] == "provider_unavailable"


    def test_a_task_cancelled_while_createtask_is_in_flight_has_that_job_cancelled(
            self, sqlite_store, files, clock, config, monkeypatch):
        """KIE gives the job its id only in createTask's answer: a cancel
        during the call has no id to send. The worker, finding the task
        cancelled when it records the id, asks the adapter to cancel the
        job KIE just created."""
        with FakeKIE(job_seconds=30) as kie:
            rig = Rig(sqlite_store, files, clock, {"kie": kie_conf(kie)})
            cancelled = []
            monkeypatch.setattr(rig.providers["kie"], "cancel", lambda task: cancelled.append(task["external_id"]))
            app = create_app(sqlite_store, rig.providers, config, worker=rig.worker, files=files, clock=clock)
            client = WSGIClient(app, sqlite_store.create_user("carol")[1])
            arrived, go = threading.Event(), threading.Event()

            def hold_create():
                arrived.set()
                go.wait(10)

            kie.before_create = hold_create
            task_id = client.post("/api/tasks", {"provider": "kie", "params": {"model": "m", "input": {}}}
                                  ).json()["task"]["id"]
            runner = threading.Thread(target=rig.worker.run_once, args=(clock(),))
            runner.start()
            try:
                assert arrived.wait(10), "createTask never reached KIE"
                assert client.post(f"/api/tasks/{task_id}/cancel").status == 200
                assert cancelled == [], "no id yet: nothing to cancel"
            finally:
                go.set()
                runner.join(10)
            assert len(kie.created) == 1
            assert cancelled == kie.created
            assert rig.task(task_id)["status"] == "cancelled"

# -- concurrency -------------------------------------------------------------

def test_concurrency_2_keeps_at_most_2_jobs_at_the_provider_under_20_submissions(sqlite_store, files):
    with FakeKIE(job_seconds=0.12) as kie:
        providers = build_providers({"kie": kie_conf(kie, concurrency=2, poll_interval_s=0.03,
                                                     max_poll_interval_s=0.03)}, env=KEY_ENV)
        worker = Worker(sqlite_store, providers, files, threads=8, tick_s=0.02)
        user = sqlite_store.create_user("busy")[0]
        ids = []
        for i in range(20):
            now = time.time()
            ids.append(sqlite_store.submit(user["id"], "kie", {"model": "m", "input": {"i": i}}, now=now,
                                           deadline_at=now + 600)[0]["id"])
        worker.start()
        try:
            tasks = wait_for(lambda: (ts := [sqlite_store.get_task(i) for i in ids])
                             and all(t["status"] in TERMINAL for t in ts) and ts, timeout=20)
        finally:
            worker.stop()
    assert [t["status"] for t in tasks] == ["succeeded"] * 20
    assert len(kie.created) == 20
    assert kie.max_concurrent_seen == 2


def test_take_slot_admits_exactly_limit_tasks_from_racing_threads(store):
    user = store.create_user("racer")[0]
    now = time.time()
    for _ in range(12):
        store.submit(user["id"], "p", {}, now=now, deadline_at=now + 60)
    claimed = store.claim("w", now=now + 1, limit=12, lease_s=60)
    barrier = threading.Barrier(12)
    results = []

    def race(task):
        barrier.wait()
        results.append(store.take_slot(task["id"], token=task["lease_token"], now=now + 1, limit=3,
                                       step="submitting"))

    threads = [threading.Thread(target=race, args=(t,)) for t in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    won = [r for r in results if r is not None]
    assert len(results) == 12 and len(won) == 3
    again = store.take_slot(won[0]["id"], token=won[0]["lease_token"], now=now + 2, limit=3, step="submitting")
    assert again is not None, "a task holding a slot keeps it"


# -- local functions ---------------------------------------------------------

def local_rig(sqlite_store, files, clock, function, **extra):
    conf = {"type": "local", "function": f"{LOCAL}:{function}", "retries": 3, "retry_intervals": [5, 10],
            **extra}
    return Rig(sqlite_store, files, clock, {"fn": conf})


class TestLocal:
    def test_raises_twice_then_succeeds_with_attempts_shown(self, sqlite_store, files, clock, tmp_path):
        rig = local_rig(sqlite_store, files, clock, "flaky")
        task_id = rig.submit("fn", {"counter": str(tmp_path / "n"), "fail_times": 2})
        start = clock()
        rig.worker.run_once(start)
        task = rig.task(task_id)
        assert (task["status"], task["attempts"], task["next_poll_at"]) == ("queued", 1, start + 5)
        assert "flaky failure number 1" in task["state"]["last_error"]
        assert rig.worker.run_once(start + 4.9) == 0, "the backoff is respected"
        rig.worker.run_once(start + 5)
        task = rig.task(task_id)
        assert (task["status"], task["attempts"], task["next_poll_at"]) == ("queued", 2, start + 15)
        rig.worker.run_once(start + 15)
        task = rig.task(task_id)
        assert task["status"] == "succeeded" and task["attempts"] == 3 and task["error"] is None
        [meta] = task["files"]
        assert meta["name"] == "out_0.png" and rig.file_bytes(task_id, "out_0.png").startswith(PNG_MAGIC)
        seen = [json.loads(e)["task"] for _, e in sqlite_store.events_since(rig.user["id"], 0)]
        assert {"step": "drawing", "progress": 0.5} in [{k: t[k] for k in ("step", "progress")} for t in seen]

    def test_gives_up_after_retries_with_the_last_error(self, sqlite_store, files, clock, tmp_path):
        rig = local_rig(sqlite_store, files, clock, "flaky", retries=2)
        task = rig.run(rig.submit("fn", {"counter": str(tmp_path / "n"), "fail_times": 5}))
        assert task["status"] == "failed" and task["attempts"] == 2
        assert task["error"] == {"code": "provider_rejected",
                                 "message": "RuntimeError: flaky failure number 2 (attempt 2 of 2)"}

    def test_a_provider_rejected_is_not_retried(self, sqlite_store, files, clock):
        rig = local_rig(sqlite_store, files, clock, "refuse")
        task = rig.run(rig.submit("fn", {}))
        assert task["status"] == "failed" and task["attempts"] == 1
        assert task["error"] == {"code": "provider_rejected", "message": "this input can never work"}

    def test_paths_pairs_and_bytes_are_stored_inside_the_tasks_folder(self, sqlite_store, files, clock, tmp_path):
        source = tmp_path / "picture.png"
        source.write_bytes(PNG_MAGIC + b"data")
        rig = local_rig(sqlite_store, files, clock, "files")
        task = rig.run(rig.submit("fn", {"path": str(source)}))
        assert task["status"] == "succeeded"
        assert [f["name"] for f in task["files"]] == ["picture.png", "escape.txt", "out_2.png"]
        assert rig.file_bytes(task["id"], "escape.txt") == b"hello"
        assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "files" / "escape.txt").exists()

    def test_a_return_value_that_is_not_files_fails_the_task(self, sqlite_store, files, clock):
        rig = local_rig(sqlite_store, files, clock, "wrong_type")
        task = rig.run(rig.submit("fn", {}))
        assert task["status"] == "failed" and "returned int" in task["error"]["message"]

    def test_cancelling_stops_the_function_at_its_next_report(self, sqlite_store, files, clock, monkeypatch):
        rig = local_rig(sqlite_store, files, clock, "watch_cancel")
        task_id = rig.submit("fn", {})
        calls = []
        real_update = sqlite_store.update

        def update_then_cancel(task_id_, **kw):
            calls.append(kw.get("step"))
            if kw.get("step") == "step 3":
                sqlite_store.cancel(task_id_, rig.user["id"], now=clock())
            return real_update(task_id_, **kw)

        monkeypatch.setattr(sqlite_store, "update", update_then_cancel)
        rig.worker.run_once(clock())
        task = rig.task(task_id)
        assert task["status"] == "cancelled" and task["files"] == []
        assert "step 5" not in calls

    def test_the_lease_is_renewed_while_the_function_runs(self, sqlite_store, files, clock, tmp_path):
        rig = local_rig(sqlite_store, files, clock, "gate")
        task_id = rig.submit("fn", {"gate": str(tmp_path / "open")})
        start = clock()
        runner = threading.Thread(target=rig.worker.run_once, args=(start,))
        runner.start()
        try:
            wait_for(lambda: rig.task(task_id)["status"] == "running")
            clock.advance(50)
            rig.worker.renew()
            assert rig.task(task_id)["lease_expires_at"] == clock() + rig.worker.lease_s
            other = Worker(sqlite_store, rig.providers, files, clock=clock, owner="test:2:w")
            assert other.run_once(start + rig.worker.lease_s + 1) == 0, "nobody takes over a live run"
        finally:
            (tmp_path / "open").touch()
            runner.join(10)
        task = rig.task(task_id)
        assert task["status"] == "succeeded" and task["attempts"] == 1

    def test_a_run_whose_worker_died_is_run_again(self, sqlite_store, files, clock, tmp_path):
        rig = local_rig(sqlite_store, files, clock, "flaky")
        task_id = rig.submit("fn", {"counter": str(tmp_path / "n")})
        held = sqlite_store.claim("dead:1:x", now=clock(), limit=1, lease_s=30)[0]
        sqlite_store.update(task_id, token=held["lease_token"], now=clock(), status="running",
                            attempts=1, external_id="local-1")
        clock.advance(31)
        task = rig.run(task_id)
        assert task["status"] == "succeeded" and task["attempts"] == 2


# -- downloads, the HTTP seam, rate limits -----------------------------------

class TestDownloads:
    def test_only_http_urls_are_downloaded(self):
        kie = build_providers({"k": {"type": "kie", "url": "http://127.0.0.1:9", "api_key_env": "KIE_TEST_KEY"}},
                              env=KEY_ENV)["k"]
        for url in ("file:///etc/passwd", "ftp://example.com/x.png", "gopher://x", "/etc/passwd", None):
            with pytest.raises(InvalidInput) as info:
                list(kie.fetch({}, Output("x.png", url=url)))
            assert info.value.code == "invalid_result"

    def test_a_result_over_the_size_limit_is_refused_and_leaves_nothing(self, sqlite_store, files, clock, tmp_path):
        with FakeKIE(job_seconds=0.05) as kie:
            rig = Rig(sqlite_store, files, clock, {"kie": kie_conf(kie, max_file_bytes=100)})
            task = rig.run(rig.submit("kie", {"model": "m", "input": {}}))
        assert task["status"] == "failed" and task["error"]["code"] == "invalid_result"
        assert files.partial_files() == [] and not (tmp_path / "files" / task["id"] / "0.png").exists()

    def test_a_download_that_breaks_is_retried(self, sqlite_store, files, clock):
        with FakeKIE(job_seconds=0.05, fault_paths=("/files/",), error_rate=1.0) as kie:
            rig = Rig(sqlite_store, files, clock, {"kie": kie_conf(kie)})
            task_id = rig.submit("kie", {"model": "m", "input": {}})
            task = wait_for(lambda: (t := rig.step(task_id))["state"] and t)
            assert task["status"] == "running" and "download" in task["state"]["last_error"]
            kie.error_rate = 0.0
            task = rig.run(task_id)
        assert task["status"] == "succeeded" and len(task["files"]) == 1

    def test_retry_after_in_seconds_or_as_a_date(self):
        assert parse_retry_after("7") == 7.0
        assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now=1767225600.0) == 30.0
        assert parse_retry_after("nonsense") is None and parse_retry_after(None) is None
        assert parse_retry_after("999999") == 3600.0

    def test_the_rate_limiter_spaces_calls_and_defers_far_ones(self):
        t = [0.0]
        limiter = RateLimiter(4, max_wait=1.0, clock=lambda: t[0], sleep=lambda s: t.__setitem__(0, t[0] + s))
        for _ in range(5):
            limiter.acquire()
        assert t[0] == pytest.approx(1.0)
        slow = RateLimiter(0.5, max_wait=1.0, clock=lambda: 0.0, sleep=lambda s: None)
        slow.acquire()
        with pytest.raises(Exception) as info:
            slow.acquire()
        assert info.value.code == "provider_unavailable" and info.value.retry_after == pytest.approx(2.0)

    def test_rate_per_s_paces_calls_to_the_provider(self, comfy):
        provider = build_providers({"c": comfy_conf(comfy, rate_per_s=20)})["c"]
        start = time.monotonic()
        for _ in range(6):
            provider.poll({"external_id": "nobody"}, 0)   # history, queue, history: 3 calls each
        assert time.monotonic() - start >= 17 / 20 * 0.95


# -- configuration and GET /api/providers ------------------------------------

@pytest.mark.parametrize("table, env, words", [
    ({"x": {"type": "midjourney"}}, {}, "unknown type 'midjourney'"),
    ({"x": {"type": "comfyui"}}, {}, "needs url"),
    ({"x": {"type": "comfyui", "url": "ftp://host"}}, {}, "not an http(s) URL"),
    ({"x": {"type": "comfyui", "url": "http://h", "concurency": 2}}, {}, "unknown setting 'concurency'"),
    ({"x": {"type": "comfyui", "url": "http://h", "concurrency": 0}}, {}, "concurrency must be an integer"),
    ({"x": {"type": "comfyui", "url": "http://h", "timeout_s": "10"}}, {}, "timeout_s must be a positive"),
    ({"x": {"type": "comfyui", "url": "http://h", "poll_interval_s": 60}}, {}, "max_poll_interval_s"),
    ({"x": {"type": "kie", "api_key": "sk-123"}}, {}, "secrets come from the environment"),
    ({"x": {"type": "kie"}}, {}, "needs api_key_env"),
    ({"x": {"type": "kie", "api_key_env": "NOPE"}}, {}, "NOPE (api_key_env) is not set"),
    ({"x": {"type": "local"}}, {}, "needs function"),
    ({"x": {"type": "local", "function": "no_colon"}}, {}, "must be 'module:function'"),
    ({"x": {"type": "local", "function": "no_such_module_hf:f"}}, {}, "cannot import no_such_module_hf"),
    ({"x": {"type": "local", "function": "json:no_such"}}, {}, "json has no no_such"),
    ({"x": {"type": "local", "function": "json:loads", "retry_intervals": [-1]}}, {}, "non-negative"),
    ({"bad name": {"type": "demo"}}, {}, "provider name"),
])
def test_bad_provider_config_is_a_clear_config_error(table, env, words):
    with pytest.raises(ConfigError) as info:
        build_providers(table, env=env)
    assert words in info.value.message


def test_providers_come_from_holdfast_toml(tmp_path):
    path = tmp_path / "holdfast.toml"
    path.write_text('''
[providers.comfy]
type = "comfyui"
url = "http://127.0.0.1:8188"
concurrency = 2
cost = 1
poll_interval_s = 2
max_wait_s = 7200
timeout_s = 10

[providers.kie]
type = "kie"
url = "https://api.kie.ai"
api_key_env = "KIE_TEST_KEY"
rate_per_s = 2

[providers.thumbs]
type = "local"
function = "json:dumps"
retries = 3
''')
    config = Config.load(env={"HOLDFAST_CONFIG": str(path)})
    providers = build_providers(config.providers, env=KEY_ENV)
    assert {n: p.type for n, p in providers.items()} == {"comfy": "comfyui", "kie": "kie", "thumbs": "local",
                                                          "demo": "demo"}
    assert providers["comfy"].concurrency == 2 and providers["kie"].rate_per_s == 2
    assert providers["thumbs"].retry.max_attempts == 3


def test_python_app_py_refuses_a_bad_provider_table_with_its_message(tmp_path):
    (tmp_path / "holdfast.toml").write_text('[providers.kie]\ntype = "kie"\napi_key_env = "HF_UNSET_KEY"\n')
    env = {k: v for k, v in os.environ.items() if k != "HF_UNSET_KEY"}
    env.update(HOLDFAST_CONFIG=str(tmp_path / "holdfast.toml"), HOLDFAST_DATA=str(tmp_path / "data"),
               HOLDFAST_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "app.py")], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "provider kie: the environment variable HF_UNSET_KEY (api_key_env) is not set" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_get_providers_shows_what_a_worker_in_another_process_saw(tmp_path, files, clock, config):
    """The worker writes what its calls came to into the store; an API with
    its own store connection and its own provider objects (another process,
    as far as memory goes) shows it: the failures in a row, the last error
    and its code, and then the answer that ended them."""
    from store import SqliteStore
    path = str(tmp_path / "holdfast.db")
    worker_store, api_store = SqliteStore(path), SqliteStore(path)
    try:
        with FakeKIE(job_seconds=0.05) as kie:
            rig = Rig(worker_store, files, clock, {"kie": kie_conf(kie)})
            api_providers = build_providers({"kie": kie_conf(kie)}, env=KEY_ENV)
            client = WSGIClient(create_app(api_store, api_providers, config, clock=clock),
                                api_store.create_user("dave")[1])

            def health():
                res = client.get("/api/providers")
                assert res.status == 200
                return {p["name"]: p["health"] for p in res.json()["providers"]}["kie"]

            assert health() == {"ok": None, "checked_at": None, "error": None, "last_ok_at": None,
                                "last_error_at": None, "last_error_code": None, "consecutive_failures": 0}
            kie.rate_limit_next(3, retry_after=1, status=503)
            task_id = rig.submit("kie", {"model": "flux", "input": {"prompt": "a red fox"}})
            rig.step(task_id)
            turned = health()       # written at once: the provider turned from unknown to failing
            assert turned["ok"] is False and turned["consecutive_failures"] == 1
            for _ in range(2):
                rig.step(task_id)
            assert kie.faults["503"] == 3 and rig.task(task_id)["status"] == "queued"
            rig.worker.health.write()       # the worker's `health` job, at most a second later
            failing = health()
            assert failing["ok"] is False and failing["consecutive_failures"] == 3
            assert failing["last_error_code"] == "provider_unavailable" and "HTTP 503" in failing["error"]
            assert failing["last_ok_at"] is None and failing["last_error_at"] == failing["checked_at"]
            assert api_providers["kie"].describe()["health"]["ok"] is None, "nothing seen in this process"
            task = rig.run(task_id)
            assert task["status"] == "succeeded"
            rig.worker.health.write()
            back = health()
            assert back["ok"] is True and back["consecutive_failures"] == 0 and back["error"] is None
            assert back["last_error_code"] == "provider_unavailable" and back["last_error_at"] == failing["last_error_at"]
            assert back["last_ok_at"] >= back["last_error_at"]
    finally:
        worker_store.close()
        api_store.close()


def test_health_notes_of_a_busy_or_flapping_provider_cost_a_few_writes_not_one_each(sqlite_store):
    """A thousand calls in a burst, answering and failing in turn: the
    first is written at once, the rest wait for the next write, which
    carries the count since the last answer."""
    from worker.health import HealthLog

    class Counting:
        def __init__(self, store):
            self.store, self.writes = store, 0

        def record_provider_health(self, *args, **kwargs):
            self.writes += 1
            return self.store.record_provider_health(*args, **kwargs)

    store = Counting(sqlite_store)
    health = HealthLog(store)
    start = time.monotonic()
    for i in range(1000):
        health.note("kie", 100.0 + i, ok=i % 2 == 0, error=("provider_unavailable", f"HTTP 503 #{i}"))
    elapsed = time.monotonic() - start
    assert store.writes <= 1 + int(elapsed / 0.2) + 1, (store.writes, elapsed)
    health.write()
    row = sqlite_store.provider_health()["kie"]
    assert row["last_ok_at"] == 1098.0 and row["consecutive_failures"] == 1
    assert row["last_error"] == "HTTP 503 #999" and row["last_error_at"] == 1099.0


def test_the_api_key_comes_from_the_environment_and_never_shows(comfy, sqlite_store, config):
    providers = build_providers({"k": {"type": "kie", "api_key_env": "KIE_TEST_KEY"}}, env=KEY_ENV)
    assert "test-key" not in json.dumps(providers["k"].describe())


def test_get_providers_lists_limits_and_last_seen_health(sqlite_store, files, clock, config, comfy):
    rig = comfy_rig(sqlite_store, files, clock, comfy, concurrency=2)
    client = WSGIClient(create_app(sqlite_store, rig.providers, config, worker=rig.worker, files=files,
                                   clock=clock), sqlite_store.create_user("dave")[1])

    def listed():
        res = client.get("/api/providers")
        assert res.status == 200
        return {p["name"]: p for p in res.json()["providers"]}

    comfy_entry = listed()["comfy"]
    assert comfy_entry["type"] == "comfyui" and comfy_entry["limits"]["concurrency"] == 2
    assert comfy_entry["limits"]["max_wait_s"] == 7200.0 and comfy_entry["health"]["ok"] is None
    assert set(listed()) == {"comfy", "demo"}
    rig.run(rig.submit("comfy", {"workflow": workflow()}))
    health = listed()["comfy"]["health"]
    assert health["ok"] is True and health["checked_at"].endswith("Z") and health["error"] is None
    comfy.stop()
    task_id = rig.submit("comfy", {"workflow": workflow(color=5)})
    rig.worker.run_once(clock())
    rig.worker.health.write()       # the worker's `health` job (a turn this soon after the last write waits for it)
    health = listed()["comfy"]["health"]
    assert health["ok"] is False and "cannot connect" in health["error"]
    assert rig.task(task_id)["status"] == "queued"
    assert client.get("/api/providers", token=None).status == 401
