"""The provider contract: every adapter, against its fake, answers the same
questions the same way. Adapter-level tests call submit/poll/fetch/cancel
directly; the worker-level ones run each adapter (local included) through a
worker and a store.

A new adapter joins by adding a Harness: how to build it against its fake,
params that succeed, params the provider refuses, params whose job fails.
"""

import hashlib
import time
import uuid

import pytest

from errors import ProviderRejected, ProviderUnavailable
from providers import PROVIDER_TYPES, Status, build_providers
from store import TERMINAL
from worker import Worker

try:
    from tests.fakes import local as local_fns
    from tests.fakes.comfyui import FakeComfyUI
    from tests.fakes.fal import FakeFal
    from tests.fakes.kie import FakeKIE
    from tests.fakes.replicate import FakeReplicate
    from tests.fakes.runpod import FakeRunPod
except ImportError:  # plain `pytest` puts tests/, not the repo root, on sys.path
    from fakes import local as local_fns
    from fakes.comfyui import FakeComfyUI
    from fakes.fal import FakeFal
    from fakes.kie import FakeKIE
    from fakes.replicate import FakeReplicate
    from fakes.runpod import FakeRunPod
from test_adapters import kie_as_http

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENV = {"KIE_TEST_KEY": "test-key"}


def workflow(color=0x102030, width=64):
    return {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": width, "height": 64, "batch_size": 1, "color": color}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "c"}}}


class Harness:
    name = None
    networked = True   # has a server that can go away
    fake = None

    def conf(self):
        raise NotImplementedError

    def provider(self):
        return build_providers({self.name: self.conf()}, env=ENV)[self.name]

    def failing(self, tmp_path):
        """Params whose job the provider accepts, then fails."""
        raise NotImplementedError

    def stop(self):
        if self.fake is not None:
            self.fake.stop()


class ComfyHarness(Harness):
    name = "comfyui"

    def __init__(self):
        self.fake = FakeComfyUI(job_seconds=0.05).start()

    def conf(self):
        return {"type": "comfyui", "url": self.fake.url, "timeout_s": 2, "poll_interval_s": 0.05}

    def good(self, tmp_path):
        return {"workflow": workflow(color=int(uuid.uuid4()) % 0xFFFFFF)}

    refused = {"workflow": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}

    def failing(self, tmp_path):
        self.fake.fail_next = 1
        return self.good(tmp_path)

    unknown_id = "never-submitted"


class KIEHarness(Harness):
    name = "kie"

    def __init__(self):
        self.fake = FakeKIE(job_seconds=0.05).start()

    def conf(self):
        return {"type": "kie", "url": self.fake.url, "api_key_env": "KIE_TEST_KEY", "timeout_s": 2,
                "poll_interval_s": 0.05}

    def good(self, tmp_path):
        return {"model": "flux", "input": {"prompt": "fox"}}

    refused = {"model": "flux", "input": "not an object"}

    def failing(self, tmp_path):
        return {"model": "flux", "input": {"prompt": "x", "fail": True}}

    unknown_id = "no-such-task"


class DemoHarness(Harness):
    name = "demo"
    networked = False

    def conf(self):
        return {"type": "demo", "duration_s": 0.05, "poll_interval_s": 0.05}

    def good(self, tmp_path):
        return {"prompt": "a fox"}

    refused = None   # the demo refuses nothing at submit; validate() does

    def failing(self, tmp_path):
        return {"prompt": "x", "fail": "the demo failed"}

    unknown_id = "garbage"


class LocalHarness(Harness):
    name = "local"
    networked = False

    def conf(self):
        return {"type": "local", "function": f"{local_fns.__name__}:flaky", "retries": 1}

    def good(self, tmp_path):
        return {"counter": str(tmp_path / f"n{uuid.uuid4().hex}")}

    def failing(self, tmp_path):
        return {"counter": str(tmp_path / f"n{uuid.uuid4().hex}"), "fail_times": 1}


class ReplicateHarness(Harness):
    name = "replicate"

    def __init__(self):
        self.fake = FakeReplicate(job_seconds=0.05).start()

    def conf(self):
        return {"type": "replicate", "url": self.fake.url, "api_key_env": "KIE_TEST_KEY", "timeout_s": 2,
                "poll_interval_s": 0.05}

    def good(self, tmp_path):
        return {"version": "5c7d5dc6dd8b", "input": {"prompt": "fox"}}

    refused = {"version": "5c7d5dc6dd8b", "input": "not an object"}

    def failing(self, tmp_path):
        return {"model": "owner/model", "input": {"prompt": "x", "fail": True}}

    unknown_id = "no-such-prediction"


class FalHarness(Harness):
    name = "fal"

    def __init__(self):
        self.fake = FakeFal(job_seconds=0.05).start()

    def conf(self):
        return {"type": "fal", "url": self.fake.url, "api_key_env": "KIE_TEST_KEY", "timeout_s": 2,
                "poll_interval_s": 0.05}

    def good(self, tmp_path):
        return {"model": "fal-ai/flux/dev", "input": {"prompt": "fox"}}

    refused = {"model": "fal-ai/flux/dev", "input": "not an object"}

    def failing(self, tmp_path):
        return {"model": "fal-ai/flux/dev", "input": {"prompt": "x", "fail": True}}

    unknown_id = "no-such-request"


class RunPodHarness(Harness):
    name = "runpod"

    def __init__(self):
        self.fake = FakeRunPod(job_seconds=0.05).start()

    def conf(self):
        return {"type": "runpod", "url": self.fake.url, "endpoint": self.fake.endpoint,
                "api_key_env": "KIE_TEST_KEY", "timeout_s": 2, "poll_interval_s": 0.05}

    def good(self, tmp_path):
        return {"input": {"prompt": "fox"}}

    refused = {"input": "not an object"}

    def failing(self, tmp_path):
        return {"input": {"prompt": "x", "fail": True}}

    unknown_id = "no-such-job"


class HttpHarness(KIEHarness):
    """`http`, described as KIE (README's table), against the KIE fake."""

    name = "http"

    def conf(self):
        return {**kie_as_http(self.fake), "timeout_s": 2, "poll_interval_s": 0.05}


SUBMITTING = [ComfyHarness, KIEHarness, DemoHarness, ReplicateHarness, FalHarness, RunPodHarness,
              HttpHarness]     # submit/poll adapters
EVERY = SUBMITTING + [LocalHarness]


def test_every_provider_type_has_a_harness():
    assert {h.name for h in EVERY} == set(PROVIDER_TYPES)


def harness_fixture(classes):
    @pytest.fixture(params=classes, ids=lambda h: h.name)
    def fixture(request):
        harness = request.param()
        request.addfinalizer(harness.stop)
        return harness
    return fixture


harness = harness_fixture(SUBMITTING)
refusing = harness_fixture([h for h in SUBMITTING if h.refused is not None])
networked = harness_fixture([h for h in SUBMITTING if h.networked])
any_harness = harness_fixture(EVERY)


def new_task(provider, params, now=None):
    """A task dict as the worker hands it over, with the id stored first."""
    now = time.time() if now is None else now
    task = {"id": "t_01JCONTRACT0000000000000000", "params": params, "external_id": None, "state": None,
            "attempts": 1}
    task["external_id"] = provider.new_id(task, now)
    return task


def submit(provider, params):
    provider.validate(params)
    task = new_task(provider, params)
    task["external_id"] = provider.submit(task, time.time())
    assert isinstance(task["external_id"], str) and task["external_id"]
    return task


def poll_until_final(provider, task, timeout=5.0, final=("succeeded", "failed")):
    seen = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = provider.poll(task, time.time())
        assert isinstance(status, Status) and status.state in ("queued", "running", *final)
        seen.append(status.state)
        if status.state in final:
            return status, seen
        time.sleep(0.02)
    raise AssertionError(f"no final status; saw {seen}")


# -- adapter level -------------------------------------------------------------

def test_a_job_succeeds_and_its_outputs_download_as_png(harness, tmp_path):
    provider = harness.provider()
    task = submit(provider, harness.good(tmp_path))
    status, _ = poll_until_final(provider, task)
    assert status.state == "succeeded" and status.outputs and status.progress == 1.0
    for output in status.outputs:
        data = b"".join(provider.fetch(task, output))
        assert data.startswith(PNG_MAGIC) and output.name


def test_a_client_chosen_id_is_the_one_submitted(harness, tmp_path):
    provider = harness.provider()
    task = new_task(provider, harness.good(tmp_path))
    chosen = task["external_id"]
    returned = provider.submit(task, time.time())
    if provider.client_ids:
        assert chosen and returned == chosen
    else:
        assert chosen is None and returned


def test_a_fresh_adapter_follows_a_job_another_one_started(harness, tmp_path):
    """No task state in memory: a new process (a new instance) carries on."""
    task = submit(harness.provider(), harness.good(tmp_path))
    status, _ = poll_until_final(harness.provider(), task)
    assert status.state == "succeeded"


def test_a_refused_job_raises_provider_rejected_at_submit(refusing):
    provider = refusing.provider()
    with pytest.raises(ProviderRejected) as info:
        provider.submit(new_task(provider, refusing.refused), time.time())
    assert info.value.code == "provider_rejected" and info.value.message


def test_a_failing_job_polls_failed_with_a_message(harness, tmp_path):
    provider = harness.provider()
    task = submit(provider, harness.failing(tmp_path))
    status, _ = poll_until_final(provider, task)
    assert status.state == "failed" and status.code == "provider_rejected" and status.message


def test_an_id_the_provider_never_saw_polls_unknown(harness):
    provider = harness.provider()
    assert provider.poll({"external_id": harness.unknown_id, "params": {}}, time.time()).state == "unknown"


def test_an_unreachable_provider_raises_provider_unavailable(networked, tmp_path):
    provider = networked.provider()
    task = submit(provider, networked.good(tmp_path))
    assert provider.describe()["health"]["ok"] is True
    networked.stop()
    with pytest.raises(ProviderUnavailable):
        provider.submit(new_task(provider, networked.good(tmp_path)), time.time())
    with pytest.raises(ProviderUnavailable):
        provider.poll(task, time.time())
    assert provider.describe()["health"]["ok"] is False


def test_cancel_is_safe_whatever_the_job_state(harness, tmp_path):
    provider = harness.provider()
    task = submit(provider, harness.good(tmp_path))
    provider.cancel(task)                       # pending or running
    poll_until_final(provider, task, final=("succeeded", "failed", "unknown"))
    provider.cancel(task)                       # finished, or already gone
    provider.cancel({"external_id": harness.unknown_id, "params": {}})


def test_describe_has_name_type_limits_and_health(any_harness):
    out = any_harness.provider().describe()
    assert out["name"] == any_harness.name and out["type"] == any_harness.name
    assert {"concurrency", "cost", "max_wait_s", "timeout_s", "rate_per_s", "retries"} <= set(out["limits"])
    assert set(out["health"]) == {"ok", "checked_at", "error"}


# -- through the worker --------------------------------------------------------

def run_through_worker(harness, store, files, params, timeout=5.0):
    providers = build_providers({harness.name: harness.conf()}, env=ENV)
    worker = Worker(store, providers, files, owner="contract:1:w")
    user = store.create_user(f"c{uuid.uuid4().hex[:8]}")[0]
    now = time.time()
    task, _ = store.submit(user["id"], harness.name, params, now=now, deadline_at=now + 600)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        worker.run_once(time.time())
        task = store.get_task(task["id"])
        if task["status"] in TERMINAL:
            return task
        time.sleep(0.02)
    raise AssertionError(f"{harness.name}: task did not finish: {task}")


def test_through_the_worker_a_job_ends_succeeded_with_its_files(any_harness, sqlite_store, files, tmp_path):
    task = run_through_worker(any_harness, sqlite_store, files, any_harness.good(tmp_path))
    assert task["status"] == "succeeded" and task["files"] and task["attempts"] == 1
    for meta in task["files"]:
        body = b"".join(files.open(task["id"], meta)[0])      # on disk or in a bucket
        assert body.startswith(PNG_MAGIC) and hashlib.sha256(body).hexdigest() == meta["sha256"]


def test_through_the_worker_a_failing_job_ends_provider_rejected(any_harness, sqlite_store, files, tmp_path):
    task = run_through_worker(any_harness, sqlite_store, files, any_harness.failing(tmp_path))
    assert task["status"] == "failed" and task["error"]["code"] == "provider_rejected"
    assert task["error"]["message"] and task["files"] == []
