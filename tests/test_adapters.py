"""Replicate, fal.ai, RunPod and the declarative `http` adapter, each
through the worker against its fake on 127.0.0.1: files saved, a failure
with the provider's message, a cancel that reaches the provider, a 429's
Retry-After honoured, and an in-doubt submit that makes at most one job.
Every test counts what the fake was sent, not only how the task ended.

`http` runs twice: described as KIE (the README's table, exactly) against
the KIE fake the `kie` adapter uses, and described as RunPod (with a cancel
request and a secret header from the environment) against the RunPod fake.
"""

import json
import os
import re
import subprocess
import sys
import threading
import tomllib
import uuid

import pytest
import requests

from api import create_app
from errors import ConfigError, InvalidInput, ProviderRejected
from providers import build_providers
from recover import recover
from support import ROOT, WSGIClient, free_port
from test_providers import PNG_MAGIC, Rig, kie_conf, wait_for
from worker import Worker

try:
    from tests.fakes.fal import FakeFal
    from tests.fakes.kie import FakeKIE
    from tests.fakes.replicate import FakeReplicate
    from tests.fakes.runpod import FakeRunPod
except ImportError:  # plain `pytest` puts tests/, not the repo root, on sys.path
    from fakes.fal import FakeFal
    from fakes.kie import FakeKIE
    from fakes.replicate import FakeReplicate
    from fakes.runpod import FakeRunPod

ENV = {"KIE_TEST_KEY": "test-key", "RUNPOD_AUTH": "Bearer test-key"}
FAST = {"timeout_s": 2, "poll_interval_s": 0.05, "max_poll_interval_s": 0.2}


def kie_as_http(kie):
    """The README's `http` description of KIE, pointed at `kie` (a FakeKIE)."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"<!-- kie-as-http -->\n```toml\n(.*?)\n```", text, re.S).group(1)
    conf = tomllib.loads(block)["providers"]["kie_http"]
    return {**conf, "url": kie.url, "api_key_env": "KIE_TEST_KEY"}


def runpod_as_http(fake):
    """RunPod's serverless API as an `http` table, the key in a header from
    the environment."""
    ep = fake.endpoint
    return {"type": "http", "url": fake.url, "headers_env": {"Authorization": "RUNPOD_AUTH"},
            "message_path": "error",
            "submit": {"path": f"/v2/{ep}/run", "body": {"input": "{params.input}"}, "id_path": "id"},
            "status": {"path": f"/v2/{ep}/status/{{id}}", "state_path": "status",
                       "states": {"IN_QUEUE": "queued", "IN_PROGRESS": "running", "COMPLETED": "succeeded",
                                  "FAILED": "failed", "CANCELLED": "failed", "TIMED_OUT": "failed"},
                       "result_urls": "output.images", "error_path": ["error.error_message", "error"]},
            "cancel": {"method": "POST", "path": f"/v2/{ep}/cancel/{{id}}"}}


class Spec:
    """One adapter against its fake: how to make both, what to submit, where
    the fake counts submits, what a failure says."""

    def __init__(self, name, fake, conf, params, submit_key, failure, cancels=True):
        self.name, self.fake_cls, self._conf, self._params = name, fake, conf, params
        self.submit_key, self.failure, self.cancels = submit_key, failure, cancels

    def fake(self, **kwargs):
        return self.fake_cls(**kwargs)

    def conf(self, fake, **extra):
        return {**self._conf(fake), **FAST, **extra}

    def params(self, prompt="a red fox", fail=False):
        job_input = {"prompt": prompt, **({"fail": True} if fail else {})}
        return self._params(job_input)

    def submits(self, fake):
        return fake.requests[self.submit_key]


SPECS = [
    Spec("replicate", FakeReplicate,
         lambda f: {"type": "replicate", "url": f.url, "api_key_env": "KIE_TEST_KEY"},
         lambda i: {"version": "5c7d5dc6dd8b", "input": i}, "POST /v1/predictions",
         "CUDA out of memory (fake model asked to fail)"),
    Spec("fal", FakeFal, lambda f: {"type": "fal", "url": f.url, "api_key_env": "KIE_TEST_KEY"},
         lambda i: {"model": "fal-ai/flux/dev", "input": i}, "POST /fal-ai/flux/dev",
         "the fake model refused the prompt (validation_error)"),
    Spec("runpod", FakeRunPod,
         lambda f: {"type": "runpod", "url": f.url, "endpoint": f.endpoint, "api_key_env": "KIE_TEST_KEY"},
         lambda i: {"input": i}, "POST /v2/ep123/run", "the handler refused the input (fake)"),
    Spec("http-as-kie", FakeKIE, kie_as_http, lambda i: {"model": "flux", "input": i},
         "/api/v1/jobs/createTask", "generation failed (FakeKIE: input asked to fail)", cancels=False),
    Spec("http-as-runpod", FakeRunPod, runpod_as_http, lambda i: {"input": i}, "POST /v2/ep123/run",
         "the handler refused the input (fake)"),
]


@pytest.fixture(params=SPECS, ids=lambda s: s.name)
def spec(request):
    return request.param


class AdapterRig(Rig):
    def __init__(self, store, files, clock, table):
        self.store, self.files, self.clock = store, files, clock
        self.providers = build_providers(table, env=ENV)
        self.worker = Worker(store, self.providers, files, clock=clock, owner="test:1:w")
        self.user = store.create_user(f"a{uuid.uuid4().hex[:10]}")[0]


def rig_for(spec, fake, store, files, clock, **extra):
    return AdapterRig(store, files, clock, {"p": spec.conf(fake, **extra)})


# -- each adapter against its fake -------------------------------------------

def test_a_job_succeeds_with_its_files_saved(spec, sqlite_store, files, clock):
    with spec.fake(job_seconds=0.1, outputs=2) as fake:
        rig = rig_for(spec, fake, sqlite_store, files, clock)
        task = rig.run(rig.submit("p", spec.params()))
        assert task["status"] == "succeeded", task
        assert len(fake.created) == 1 == spec.submits(fake) and task["external_id"] == fake.created[0]
        assert [f["name"] for f in task["files"]] == ["0.png", "1.png"]
        for n, meta in enumerate(task["files"]):
            url = f"{fake.url}/files/{task['external_id']}/{n}.png"
            assert rig.file_bytes(task["id"], meta["name"]) == requests.get(url, timeout=5).content
            assert rig.file_bytes(task["id"], meta["name"]).startswith(PNG_MAGIC)


def test_a_failed_job_ends_provider_rejected_with_the_providers_message(spec, sqlite_store, files, clock):
    with spec.fake(job_seconds=0.05) as fake:
        rig = rig_for(spec, fake, sqlite_store, files, clock)
        task = rig.run(rig.submit("p", spec.params(fail=True)))
        assert task["status"] == "failed" and task["error"]["code"] == "provider_rejected", task
        assert spec.failure in task["error"]["message"]
        assert task["files"] == [] and len(fake.created) == 1


# KIE has no cancel request: for `http` as KIE, see test_a_cancel_during_the_submit_reaches_the_job_made.
@pytest.mark.parametrize("spec", [s for s in SPECS if s.cancels], ids=lambda s: s.name)
def test_cancelling_a_task_cancels_its_job_at_the_provider(spec, sqlite_store, files, clock, config):
    with spec.fake(job_seconds=60) as fake:
        rig = rig_for(spec, fake, sqlite_store, files, clock)
        app = create_app(sqlite_store, rig.providers, config, worker=rig.worker, files=files, clock=clock)
        client = WSGIClient(app, sqlite_store.create_user("carol")[1])
        task_id = client.post("/api/tasks", {"provider": "p", "params": spec.params()}).json()["task"]["id"]
        running = rig.step(task_id)
        assert running["status"] == "running" and fake.created == [running["external_id"]]
        assert fake.cancelled == []
        assert client.post(f"/api/tasks/{task_id}/cancel").status == 200
        wait_for(lambda: fake.cancelled)
        assert fake.cancelled == fake.created
        assert fake.jobs[fake.created[0]].phase() == "cancelled"
        assert rig.task(task_id)["status"] == "cancelled"


def test_a_429_is_sent_again_only_after_its_retry_after(spec, sqlite_store, files, clock):
    with spec.fake(job_seconds=0.05) as fake:
        rig = rig_for(spec, fake, sqlite_store, files, clock)
        fake.rate_limit_next(1, retry_after=7)
        task_id = rig.submit("p", spec.params())
        start = clock()
        rig.worker.run_once(start)
        refused = rig.task(task_id)
        assert refused["status"] == "queued" and refused["next_poll_at"] >= start + 7, refused
        assert fake.faults["429"] == 1 and spec.submits(fake) == 1 and fake.created == []
        rig.worker.run_once(start + 6.5)
        assert spec.submits(fake) == 1, "a new submit before Retry-After had passed"
        task = rig.run(task_id)
        assert task["status"] == "succeeded" and task["attempts"] == 1, task
        assert spec.submits(fake) == 2 and len(fake.created) == 1


FAULT_SEEN = {"slow_creates": "slow create", "drop_creates": "dropped create", "lost_creates": "lost create"}
# The KIE fake has no "made the job, then a 502" (its 5xx come before any work).
DOUBTS = [(s, f) for s in SPECS for f in FAULT_SEEN if not (s.fake_cls is FakeKIE and f == "lost_creates")]


@pytest.mark.parametrize("spec, fault", DOUBTS, ids=[f"{s.name}-{f}" for s, f in DOUBTS])
def test_a_submit_in_doubt_makes_at_most_one_job(spec, fault, sqlite_store, files, clock):
    """The job is made, its answer comes after the timeout, never, or as a
    gateway's 502: the provider chose the id, so there is nothing to ask
    about; the task fails submission_in_doubt and the provider has one job,
    not two."""
    # A timeout of 1 s: on a loaded machine a healthy answer must not look like a lost one.
    with spec.fake(job_seconds=0.05, slow_seconds=2.5, **{fault: 1}) as fake:
        rig = rig_for(spec, fake, sqlite_store, files, clock, timeout_s=1.0)
        task = rig.run(rig.submit("p", spec.params()))
        assert task["status"] == "failed" and task["error"]["code"] == "submission_in_doubt", task
        wait_for(lambda: fake.faults[FAULT_SEEN[fault]] == 1)
        assert len(fake.created) == 1 and spec.submits(fake) == 1


def test_a_submit_a_crash_cut_off_is_in_doubt_at_recovery_and_not_sent_again(spec, sqlite_store, files, clock,
                                                                            monkeypatch):
    """The provider answered with its id, then the process died before the
    id was stored: recovery finds the task by its mark, fails it
    submission_in_doubt, and no later look makes a second job."""
    with spec.fake(job_seconds=0.05) as fake:
        rig = rig_for(spec, fake, sqlite_store, files, clock)
        provider = rig.providers["p"]
        real_submit = provider.submit

        class Crash(BaseException):
            pass

        def submit_then_die(task, now):
            real_submit(task, now)
            raise Crash()

        monkeypatch.setattr(provider, "submit", submit_then_die)
        task_id = rig.submit("p", spec.params())
        with pytest.raises(Crash):
            rig.worker.run_once(clock())
        monkeypatch.setattr(provider, "submit", real_submit)
        assert rig.task(task_id)["external_id"] is None and len(fake.created) == 1
        clock.advance(rig.worker.lease_s + 1)
        report = recover(sqlite_store, rig.providers, now=clock(), files=files)
        assert report["submissions_in_doubt"] == [task_id]
        assert rig.task(task_id)["error"]["code"] == "submission_in_doubt"
        clock.advance(600)
        rig.worker.run_once(clock())
        assert len(fake.created) == 1 and spec.submits(fake) == 1


def test_a_refused_poll_waits_its_retry_after_and_never_submits_again(spec, sqlite_store, files, clock):
    with spec.fake(job_seconds=0.05) as fake:
        rig = rig_for(spec, fake, sqlite_store, files, clock)
        task_id = rig.submit("p", spec.params())
        assert rig.step(task_id)["status"] == "running"
        fake.rate_limit_next(1, retry_after=9)
        asked_at = max(clock(), rig.task(task_id)["next_poll_at"])
        refused = rig.step(task_id)
        assert fake.faults["429"] == 1 and refused["next_poll_at"] >= asked_at + 9, refused
        task = rig.run(task_id)
        assert task["status"] == "succeeded" and len(fake.created) == 1 == spec.submits(fake), task


def test_on_doubt_resubmit_sends_it_again(spec, sqlite_store, files, clock):
    with spec.fake(job_seconds=0.05, slow_seconds=2.5, slow_creates=1) as fake:
        rig = rig_for(spec, fake, sqlite_store, files, clock, timeout_s=1.0, on_doubt="resubmit")
        task = rig.run(rig.submit("p", spec.params()), limit_s=30)
        assert task["status"] == "succeeded" and task["attempts"] == 2, task
        assert len(fake.created) == 2 and task["external_id"] == fake.created[-1]


# -- KIE's tests, for `http` described as KIE ----------------------------------

@pytest.mark.parametrize("kind", ["kie", "http"])
def test_a_cancel_during_the_submit_reaches_the_job_made(kind, sqlite_store, files, clock, config, monkeypatch):
    """KIE gives the job its id only in createTask's answer: a cancel during
    the call has no id to send; the worker, finding the task cancelled as it
    records the id, cancels the job just made (KIE has no cancel request:
    the adapter's cancel is watched)."""
    with FakeKIE(job_seconds=30) as kie:
        conf = kie_conf(kie) if kind == "kie" else {**kie_as_http(kie), **FAST}
        rig = AdapterRig(sqlite_store, files, clock, {"k": conf})
        cancelled = []
        monkeypatch.setattr(rig.providers["k"], "cancel", lambda task: cancelled.append(task["external_id"]))
        app = create_app(sqlite_store, rig.providers, config, worker=rig.worker, files=files, clock=clock)
        client = WSGIClient(app, sqlite_store.create_user("carol")[1])
        arrived, go = threading.Event(), threading.Event()

        def hold_create():
            arrived.set()
            go.wait(10)

        kie.before_create = hold_create
        task_id = client.post("/api/tasks", {"provider": "k", "params": {"model": "m", "input": {}}}
                              ).json()["task"]["id"]
        runner = threading.Thread(target=rig.worker.run_once, args=(clock(),))
        runner.start()
        try:
            assert arrived.wait(10), "createTask never reached KIE"
            assert client.post(f"/api/tasks/{task_id}/cancel").status == 200
            assert cancelled == []
        finally:
            go.set()
            runner.join(10)
        assert len(kie.created) == 1 and cancelled == kie.created
        assert rig.task(task_id)["status"] == "cancelled"


@pytest.mark.parametrize("kind", ["kie", "http"])
def test_kie_answers_read_the_same_by_both(kind, sqlite_store, files, clock):
    """A wrong key, a 503 refusal, a null record and some lost outputs:
    the `kie` adapter and the README's `http` description of KIE agree."""
    def conf(kie, **extra):
        return kie_conf(kie, **extra) if kind == "kie" else {**kie_as_http(kie), **FAST, **extra}

    with FakeKIE(api_key="another-key") as kie:
        rig = AdapterRig(sqlite_store, files, clock, {"k": conf(kie)})
        task_id = rig.submit("k", {"model": "flux", "input": {}})
        rig.worker.run_once(clock())
        task = rig.task(task_id)
        assert task["status"] == "failed" and task["error"]["code"] == "provider_rejected" and kie.created == []
    with FakeKIE(job_seconds=0.05, outputs=3, dead_outputs={1}, null_data_polls=2) as kie:
        kie.rate_limit_next(1, retry_after=3, status=503)
        rig = AdapterRig(sqlite_store, files, clock, {"k2": conf(kie)})
        task = rig.run(rig.submit("k2", {"model": "flux", "input": {"prompt": "three"}}))
        assert task["status"] == "partial" and [f["name"] for f in task["files"]] == ["0.png", "2.png"], task
        assert kie.faults["503"] == 1 and kie.null_data_polls == 0 and len(kie.created) == 1


# -- what each adapter reads from its provider ----------------------------------

@pytest.mark.parametrize("shape, names", [("single", ["0.png"]), ("nested", ["0.png"]),
                                          ("text", ["output.json"])])
def test_replicate_outputs_of_every_shape_are_saved(shape, names, sqlite_store, files, clock):
    with FakeReplicate(job_seconds=0.05, output_shape=shape) as fake:
        rig = rig_for(SPECS[0], fake, sqlite_store, files, clock)
        task = rig.run(rig.submit("p", {"model": "owner/model", "input": {"prompt": "x"}}))
        assert task["status"] == "succeeded" and [f["name"] for f in task["files"]] == names, task
        assert fake.requests["POST /v1/models/owner/model/predictions"] == 1
        if shape == "text":
            assert rig.file_bytes(task["id"], "output.json") == b'"a poem about a fox"'


def test_replicate_shows_the_last_log_line_as_the_step(sqlite_store, files, clock):
    with FakeReplicate(job_seconds=9) as fake:     # processing from 3 s to 9 s
        rig = rig_for(SPECS[0], fake, sqlite_store, files, clock)
        task_id = rig.submit("p", {"version": "v", "input": {}})
        task = wait_for(lambda: (t := rig.step(task_id))["step"].startswith("50%") and t, timeout=20)
        assert task["step"] == "50%|#####     | 1/2" and task["progress"] == 0.5


def test_fal_shows_the_queue_position_and_reads_an_error_from_the_response(sqlite_store, files, clock):
    with FakeFal(job_seconds=9, error_in_status=False) as fake:     # in the queue for 3 s
        rig = rig_for(SPECS[1], fake, sqlite_store, files, clock)
        task_id = rig.submit("p", {"model": "fal-ai/flux/dev", "input": {"prompt": "x", "fail": True}})
        assert rig.step(task_id)["step"] == "submitted"
        assert rig.step(task_id)["step"] == "in queue, position 2"
        task = rig.run(task_id, limit_s=30)
        assert task["status"] == "failed" and task["error"]["message"] == "fal: the fake model refused the prompt"
        assert fake.requests[f"GET /fal-ai/flux/requests/{task['external_id']}"] == 1


@pytest.mark.parametrize("shape, name", [("comfyui", "ComfyUI_00000_.png"), ("data_url", "out_0.png"),
                                         ("raw", "out_0.png")])
def test_runpod_base64_images_become_files(shape, name, sqlite_store, files, clock):
    with FakeRunPod(job_seconds=0.05, output_shape=shape) as fake:
        rig = rig_for(SPECS[2], fake, sqlite_store, files, clock)
        task = rig.run(rig.submit("p", {"input": {"prompt": "x"}}))
        assert task["status"] == "succeeded" and [f["name"] for f in task["files"]] == [name], task
        assert rig.file_bytes(task["id"], name) == fake.png(fake.jobs[task["external_id"]], 0)
        assert task["files"][0]["content_type"] == "image/png"


def test_runpod_a_base64_image_over_max_file_bytes_fails_invalid_result(sqlite_store, files, clock):
    with FakeRunPod(job_seconds=0.05, output_shape="raw") as fake:
        rig = rig_for(SPECS[2], fake, sqlite_store, files, clock, max_file_bytes=100)
        task = rig.run(rig.submit("p", {"input": {"prompt": "x"}}))
        assert task["status"] == "failed" and task["error"]["code"] == "invalid_result", task
        assert "max_file_bytes" in task["error"]["message"] and task["files"] == []


def test_runpod_a_timed_out_job_fails_with_that_said(sqlite_store, files, clock):
    with FakeRunPod(job_seconds=0.05) as fake:
        rig = rig_for(SPECS[2], fake, sqlite_store, files, clock)
        task = rig.run(rig.submit("p", {"input": {"prompt": "x", "timeout": True}}))
        assert task["status"] == "failed" and "timed out at RunPod" in task["error"]["message"]


# -- the `http` table is checked when it is loaded --------------------------------

def _kie_table():
    return kie_as_http(type("K", (), {"url": "http://127.0.0.1:9"})())


def _without(table, section, key):
    return {**table, section: {k: v for k, v in table[section].items() if k != key}}


@pytest.mark.parametrize("change, words", [
    (lambda t: {k: v for k, v in t.items() if k != "submit"}, "needs submit"),
    (lambda t: _without(t, "submit", "id_path"), "[submit] needs id_path"),
    (lambda t: {**t, "submit": {**t["submit"], "method": "FETCH"}}, "method must be one of"),
    (lambda t: {**t, "submit": {**t["submit"], "idpath": "x"}}, "unknown setting 'idpath'"),
    (lambda t: {**t, "submit": {**t["submit"], "path": "/x/{id}"}}, "{id} is not known before the submit"),
    (lambda t: {**t, "submit": {**t["submit"], "body": {"m": "{model}"}}}, "placeholders are"),
    (lambda t: {**t, "status": {**t["status"], "path": "/jobs"}}, "must name the job with {id}"),
    (lambda t: {**t, "status": {**t["status"], "states": {"success": "done"}}}, "use one of queued"),
    (lambda t: _without(t, "status", "result_urls"), "[status] needs result_urls"),
    (lambda t: {**t, "status": {**t["status"], "states": {"success": "running"}}}, "which of the provider's"),
    (lambda t: {**t, "headers_env": "X_KEY"}, "headers_env must be a table"),
    (lambda t: {**t, "status": {**t["status"], "state_path": "data..state"}}, "is not a JSON path"),
    (lambda t: {**t, "headers": {"Authorization": "Bearer sk-1"}}, "looks like a secret"),
    (lambda t: {**t, "headers_env": {"X-Key": "HF_UNSET_VAR"}}, "HF_UNSET_VAR (headers_env.X-Key) is not set"),
    (lambda t: {**t, "ok_codes": "200"}, "ok_codes must be a list of integers"),
    (lambda t: {**t, "api_token": "sk-1"}, "secrets come from the environment"),
])
def test_a_bad_http_table_is_a_config_error_naming_it(change, words):
    with pytest.raises(ConfigError) as info:
        build_providers({"x": change(_kie_table())}, env=ENV)
    assert words in info.value.message


def test_params_a_template_needs_are_checked_at_submission():
    provider = build_providers({"x": _kie_table()}, env=ENV)["x"]
    provider.validate({"model": "m", "input": {}})
    with pytest.raises(InvalidInput, match="params.model is needed"):
        provider.validate({"input": {}})


def test_python_app_py_refuses_a_bad_http_table_in_one_line(tmp_path):
    (tmp_path / "holdfast.toml").write_text('[providers.jobs]\ntype = "http"\nurl = "https://example.com"\n'
                                            '[providers.jobs.submit]\npath = "/run"\n'
                                            '[providers.jobs.status]\npath = "/s/{id}"\nstate_path = "s"\n'
                                            'states = { ok = "succeeded" }\nresult_urls = "urls"\n')
    env = dict(os.environ, HOLDFAST_CONFIG=str(tmp_path / "holdfast.toml"), HOLDFAST_DATA=str(tmp_path / "data"),
               HOLDFAST_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "app.py")], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "holdfast: provider jobs: [submit] needs id_path", proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_declarative_adapter_never_shows_its_secret_header():
    with FakeRunPod() as fake:
        provider = build_providers({"x": runpod_as_http(fake)}, env=ENV)["x"]
        assert "test-key" not in repr(provider.describe())


def test_a_code_that_only_looks_like_a_number_is_read_as_text():
    """The README's `http` description of KIE reads `code`: "200" is 200,
    and "\u00b2" (a digit to str.isdigit(), no number to int()) is a code
    that is not OK, not an error of holdfast's own."""
    class Answer:
        def __init__(self, body):
            self.status_code, self.content, self.headers = 200, json.dumps(body).encode(), {}

    with FakeKIE() as kie:
        provider = build_providers({"k": kie_as_http(kie)}, env=ENV)["k"]
    assert provider._answer(Answer({"code": "200", "data": {}}), "recordInfo") == {"code": "200", "data": {}}
    with pytest.raises(ProviderRejected, match="code \u00b2"):
        provider._answer(Answer({"code": "\u00b2", "msg": "odd"}), "recordInfo")
