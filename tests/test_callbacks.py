"""Provider callbacks in, as wake-up hints: a real holdfast process
(`python app.py`) and a fake KIE that calls back over real HTTP on
127.0.0.1. The poll interval is 30 s throughout, so a task that ends within
a few seconds ended because of a callback; every test counts the jobs,
polls and callbacks the fake saw, not only how the task ended."""

import hashlib
import os
import subprocess
import sys
import time

import pytest
import requests

from store import open_store
from support import ROOT, ServerProcess, free_port, wait_for

try:
    from tests.fakes.kie import FakeKIE
except ImportError:  # plain `pytest` puts tests/, not the repo root, on sys.path
    from fakes.kie import FakeKIE

CREATE = "/api/v1/jobs/createTask"
RECORD = "/api/v1/jobs/recordInfo"
KEY_ENV = {"KIE_TEST_KEY": "test-key", "KIE_CALLBACK_KEY": "whk-secret"}
TERMINAL = ("succeeded", "partial", "failed", "cancelled")
SLOW_POLL_S = 30


class Holdfast:
    """A holdfast process whose [providers.kie] is the fake, reachable at
    HOLDFAST_PUBLIC_URL (itself) unless `public` is False."""

    def __init__(self, tmp_path, kie, *, public=True, signed=False, poll_s=SLOW_POLL_S, **table):
        port = free_port()
        conf = {"type": "kie", "url": kie.url, "api_key_env": "KIE_TEST_KEY", "timeout_s": 2,
                "poll_interval_s": poll_s, "max_poll_interval_s": poll_s, "cost": 1, **table}
        if signed:
            conf["callback_key_env"] = "KIE_CALLBACK_KEY"
        lines = ["[providers.kie]"] + [f"{k} = {_toml(v)}" for k, v in conf.items()]
        (tmp_path / "holdfast.toml").write_text("\n".join(lines) + "\n")
        env = {"HOLDFAST_CONFIG": str(tmp_path / "holdfast.toml"), **KEY_ENV}
        if public:
            env["HOLDFAST_PUBLIC_URL"] = f"http://127.0.0.1:{port}/"
        self.server = ServerProcess(tmp_path, env=env, port=port).start()
        self._again = (tmp_path, env, port)
        self.url = self.server.url
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {self.server.tokens['demo']}"

    def submit(self, prompt):
        res = self.session.post(self.url + "/api/tasks", timeout=10,
                                json={"provider": "kie", "params": {"model": "m", "input": {"prompt": prompt}}})
        assert res.status_code == 201, res.text
        return res.json()["task"]["id"]

    def task(self, task_id):
        return self.session.get(f"{self.url}/api/tasks/{task_id}", timeout=10).json()["task"]

    def wait(self, task_ids, predicate, timeout):
        end = time.monotonic() + timeout
        while True:
            tasks = [self.task(i) for i in task_ids]
            if all(predicate(t) for t in tasks):
                return tasks
            if time.monotonic() > end:
                raise AssertionError(f"not in time: {[(t['status'], t['step']) for t in tasks]}\n"
                                     + self.server.read_log())
            time.sleep(0.05)

    def done(self, task_ids, timeout):
        return self.wait(task_ids, lambda t: t["status"] in TERMINAL, timeout)

    def kill_and_restart(self):
        """kill -9, then the same server again on the same port and data."""
        self.server.kill()
        tmp_path, env, port = self._again
        self.server = ServerProcess(tmp_path, env=env, port=port).start()

    def stop(self):
        self.server.stop()


def _toml(value):
    return f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


@pytest.fixture
def holdfast(tmp_path):
    started = []

    def start(kie, **kw):
        started.append(Holdfast(tmp_path, kie, **kw))
        return started[-1]

    yield start
    for server in started:
        server.stop()


# -- a callback finishes the task before its next poll -------------------------

@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_a_callback_finishes_tasks_long_before_their_next_poll(holdfast, signed):
    with FakeKIE(job_seconds=1.0, callbacks=True, callback_key="whk-secret" if signed else None) as kie:
        hf = holdfast(kie, signed=signed)
        started = time.monotonic()
        ids = [hf.submit(f"p{i}") for i in range(3)]
        tasks = hf.done(ids, timeout=20)
        took = time.monotonic() - started
        assert [t["status"] for t in tasks] == ["succeeded"] * 3, tasks
        # Polling alone would have looked first SLOW_POLL_S after each submit.
        assert took < SLOW_POLL_S - 5, took
        assert all(len(t["files"]) == 1 for t in tasks)
        assert len(kie.created) == kie.requests[CREATE] == 3
        # One look per task, the one the callback asked for (30 s polling: none).
        assert kie.requests[RECORD] == 3
        assert sorted(status for _, _, status in kie.callbacks_sent) == [200] * 3
        for url in kie.callback_urls().values():
            assert url.startswith(f"{hf.url}/api/callbacks/kie/t_")


def test_with_callbacks_lost_polling_still_finishes_the_tasks(holdfast, tmp_path):
    with FakeKIE(job_seconds=0.5) as kie:       # it never calls back
        hf = holdfast(kie, poll_s=1)
        ids = [hf.submit(f"p{i}") for i in range(3)]
        tasks = hf.done(ids, timeout=30)
        assert [t["status"] for t in tasks] == ["succeeded"] * 3, tasks
        assert kie.callbacks_sent == [] and len(kie.created) == 3
        assert kie.requests[RECORD] >= 3
        # The URL went out; the store keeps only its token's hash.
        urls = kie.callback_urls()
        store = open_store("sqlite", str(tmp_path), read_only=True)
        try:
            for task in tasks:
                token = urls[task["external_id"]].rsplit("/", 1)[1]
                assert token.startswith(task["id"] + ".")
                state = store.get_task(task["id"])["state"]
                assert state["callback_hash"] == hashlib.sha256(token.encode()).hexdigest()
                assert token.split(".", 1)[1] not in repr(store.get_task(task["id"]))
        finally:
            store.close()


def test_without_a_public_url_submits_carry_no_callback_url(holdfast):
    with FakeKIE(job_seconds=0.2, callbacks=True) as kie:
        hf = holdfast(kie, public=False, poll_s=0.5)
        tasks = hf.done([hf.submit("p")], timeout=20)
        assert tasks[0]["status"] == "succeeded"
        assert list(kie.callback_urls().values()) == [""] and kie.callbacks_sent == []


# -- forged, unknown and replayed callbacks change nothing -----------------------

def _seen(hf, task_id):
    task = hf.task(task_id)
    return task["version"], task["status"], task["step"], task["updated_at"]


def test_forged_unknown_and_replayed_callbacks_change_nothing(holdfast):
    with FakeKIE(job_seconds=8.0, callback_key="whk-secret") as kie:     # calls back when the test says
        hf = holdfast(kie, signed=True)
        task_id = hf.submit("p")
        hf.wait([task_id], lambda t: t["status"] == "running", timeout=15)
        job = kie.created[0]
        url = kie.callback_urls()[job]
        base, token = url.rsplit("/", 1)
        random_part = token.split(".", 1)[1]
        before = _seen(hf, task_id)
        polls = kie.requests[RECORD]

        other_task = "t_" + "0" * 26
        forged = {
            "wrong token": (f"{base}/{task_id}.{'A' * len(random_part)}", {}, 404),
            "unknown task": (f"{base}/{other_task}.{random_part}", {}, 404),
            "malformed token": (f"{base}/{random_part}", {}, 404),
            "unknown provider": (f"{hf.url}/api/callbacks/nope/{token}", {}, 404),
            "provider without callbacks": (f"{hf.url}/api/callbacks/demo/{token}", {}, 404),
            "bad signature": (url, {"key": "not-the-key"}, 401),
            "no signature": (url, {"key": None}, 401),
            "stale signature": (url, {"timestamp": int(time.time()) - 3600}, 401),
            "another job": (url, {"body": {"code": 200, "data": {"taskId": "someone-elses-job"}}}, 404),
            "no job named": (url, {"body": {"code": 200, "data": {}}}, 400),
        }
        for name, (target, kw, status) in forged.items():
            assert kie.send_callback(job, target, **kw) == status, name
        raw = [requests.post(url, data=b"{not json", timeout=5, headers={"Content-Type": "application/json"}),
               requests.post(url, data=b"[" * 10 + b"]" * 10, timeout=5),
               requests.post(url, data=b"{}" + b" " * (65 * 1024), timeout=5),
               requests.get(url, timeout=5)]
        assert [r.status_code for r in raw] == [400, 400, 413, 405]
        assert all(r.headers["Content-Type"] == "application/json" for r in raw)
        time.sleep(1.0)     # a wrongly woken worker would have polled by now
        assert _seen(hf, task_id) == before
        assert kie.requests[RECORD] == polls and len(kie.created) == 1

        # A genuine callback whose body lies (says success, points at the
        # metadata address) while the job still runs: a hint, not a result.
        lie = {"code": 200, "data": {"taskId": job, "state": "success",
                                     "resultJson": '{"resultUrls": ["http://169.254.169.254/latest"]}'}}
        assert kie.send_callback(job, body=lie) == 200
        hf.wait([task_id], lambda t: t["step"] in ("queuing", "generating", "waiting"), timeout=10)
        assert kie.requests[RECORD] == polls + 1
        assert hf.task(task_id)["status"] == "running"

        # The job ends; its genuine callback finishes the task at once.
        time.sleep(max(0.0, 8.2 - (time.time() - kie._tasks[job].created)))
        assert kie.send_callback(job) == 200
        task = hf.done([task_id], timeout=15)[0]
        assert task["status"] == "succeeded" and task["files"][0]["name"] == "0.png"
        assert not any(path.startswith("/latest") for path in kie.requests)

        # Replayed once the task ended: nothing to wake.
        finished = _seen(hf, task_id)
        polls = kie.requests[RECORD]
        assert kie.send_callback(job) == 404
        time.sleep(0.5)
        assert _seen(hf, task_id) == finished and kie.requests[RECORD] == polls


# -- a callback after a lost createTask answer adopts the job --------------------

@pytest.mark.parametrize("lost", ["connection dropped", "answer after the timeout"])
def test_a_callback_after_a_lost_createtask_answer_adopts_the_job(holdfast, lost):
    fault = {"drop_creates": 1} if lost == "connection dropped" else {"slow_creates": 1, "slow_seconds": 6.0}
    with FakeKIE(job_seconds=2.5, callbacks=True, callback_key="whk-secret", callback_copies=2, **fault) as kie:
        hf = holdfast(kie, signed=True, timeout_s=1, callback_grace_s=60)
        task_id = hf.submit("p")
        task = hf.done([task_id], timeout=30)[0]
        assert task["status"] == "succeeded", task
        assert task["external_id"] == kie.created[0] and task["attempts"] == 1
        assert len(task["files"]) == 1
        # One job, made by the one createTask; its result came from recordInfo.
        assert len(kie.created) == kie.requests[CREATE] == 1
        assert kie.requests[RECORD] >= 1
        # The log is written by a thread of its own, in batches: the line may trail the task.
        wait_for(lambda: "adopting job" in hf.server.read_log(), 10, "the adoption's log line")
        # The copy of the callback finds the job adopted (200: a poll) or the task ended (404).
        wait_until = time.monotonic() + 10
        while len([s for _, _, s in kie.callbacks_sent if s in (200, 404)]) < 2:
            assert time.monotonic() < wait_until, kie.callbacks_sent
            time.sleep(0.05)
        assert [s for _, _, s in kie.callbacks_sent if s not in (503,)][0] == 200, kie.callbacks_sent
        assert len(kie.created) == 1


def test_a_submit_in_doubt_with_no_callback_fails_after_the_grace_without_a_second_job(holdfast):
    with FakeKIE(job_seconds=0.3, drop_creates=1) as kie:      # the job is made, nobody calls back
        hf = holdfast(kie, timeout_s=1, callback_grace_s=2)
        started = time.monotonic()
        task_id = hf.submit("p")
        task = hf.done([task_id], timeout=30)[0]
        assert task["status"] == "failed" and task["error"]["code"] == "submission_in_doubt", task
        assert "no callback" in task["error"]["message"]
        assert time.monotonic() - started >= 2
        assert len(kie.created) == kie.requests[CREATE] == 1
        # The job's callback arrives late: the task ended, so nothing changes.
        job = kie.created[0]
        before = _seen(hf, task_id)
        assert kie.send_callback(job) == 404
        assert _seen(hf, task_id) == before and len(kie.created) == 1


# -- configuration ---------------------------------------------------------------

@pytest.mark.parametrize("value", ["ftp://example.com", "https://", "example.com", "http://h:99999",
                                   "https://h.example/?q=1"])
def test_a_bad_public_url_is_one_line_and_exit_2(tmp_path, value):
    env = {**os.environ, "HOLDFAST_DATA": str(tmp_path), "HOLDFAST_PUBLIC_URL": value,
           "HOLDFAST_PORT": str(free_port())}
    env.pop("HOLDFAST_CONFIG", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "app.py")], cwd=tmp_path, env=env,
                          capture_output=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "HOLDFAST_PUBLIC_URL" in lines[0], lines


def test_a_callback_naming_a_job_kie_does_not_know_adopts_nothing_and_the_real_one_still_can(holdfast):
    with FakeKIE(job_seconds=6.0, drop_creates=1) as kie:       # calls back when the test says
        hf = holdfast(kie, timeout_s=1, callback_grace_s=60)
        task_id = hf.submit("p")
        wait_until = time.monotonic() + 15
        while not (kie.created and "waiting" in hf.server.read_log()):
            assert time.monotonic() < wait_until, hf.server.read_log()
            time.sleep(0.05)
        job = kie.created[0]
        ghost = {"code": 200, "data": {"taskId": "ghost-job", "state": "success"}}
        assert kie.send_callback(job, body=ghost) == 200      # only KIE could ask: the token is right
        end = time.monotonic() + 15
        while "does not know" not in hf.server.read_log():
            assert time.monotonic() < end, hf.server.read_log()
            time.sleep(0.05)
        task = hf.task(task_id)
        assert task["status"] == "queued" and task["external_id"] is None, task
        assert kie.requests[RECORD] == 1      # KIE was asked about the ghost, and said 404
        # The real job's callback, once it ends, is adopted as before.
        time.sleep(max(0.0, 6.2 - (time.time() - kie._tasks[job].created)))
        assert kie.send_callback(job, retries=5) == 200
        task = hf.done([task_id], timeout=20)[0]
        assert task["status"] == "succeeded" and task["external_id"] == job
        assert len(kie.created) == kie.requests[CREATE] == 1


def test_a_kill_9_during_the_grace_period_neither_fails_the_task_nor_makes_a_second_job(holdfast):
    # The callback comes while holdfast is down or starting: KIE's sender
    # tries again on no answer, here every half second for 20 s.
    with FakeKIE(job_seconds=8.0, drop_creates=1, callbacks=True, callback_retries=40) as kie:
        hf = holdfast(kie, timeout_s=1, callback_grace_s=60)
        task_id = hf.submit("p")
        end = time.monotonic() + 15
        while "waiting" not in hf.server.read_log():
            assert time.monotonic() < end, hf.server.read_log()
            time.sleep(0.05)
        hf.kill_and_restart()
        # Recovery looked at the submit in doubt and left it waiting.
        assert hf.task(task_id)["status"] == "queued"
        task = hf.done([task_id], timeout=40)[0]
        assert task["status"] == "succeeded" and task["external_id"] == kie.created[0], task
        assert len(kie.created) == kie.requests[CREATE] == 1


# -- the route's decisions, in-process (no worker: a stub counts the wake-ups) ------

class _Wakes:
    def __init__(self):
        self.count = 0

    def wake(self):
        self.count += 1


class TestRouteInProcess:
    @pytest.fixture
    def rig(self, sqlite_store, config, clock):
        from api import create_app
        from providers import build_providers
        from support import WSGIClient
        providers = build_providers({"kie": {"type": "kie", "url": "http://127.0.0.1:9",
                                             "api_key_env": "KIE_TEST_KEY"}}, env=KEY_ENV)
        wakes = _Wakes()
        client = WSGIClient(create_app(sqlite_store, providers, config, worker=wakes, clock=clock))
        user = sqlite_store.create_user("alice")[0]
        return sqlite_store, client, wakes, user, clock

    def _task(self, store, user, now, *, external_id=None, posted=True, status="queued"):
        from providers.callbacks import new_token
        task, _ = store.submit(user["id"], "kie", {"model": "m", "input": {}}, now=now, deadline_at=now + 3600)
        token, digest = new_token(task["id"])
        held = store.claim_task(task["id"], "w", now=now, lease_s=30)
        changes = {"external_id": external_id} if external_id else {}
        if status != "queued" or changes:
            store.update(task["id"], token=held["lease_token"], now=now, status=status, **changes)
        state = {"callback_hash": digest, **({"posted_at": now} if posted else {})}
        store.reschedule(task["id"], token=held["lease_token"], next_poll_at=now + 300, polls=0, state=state)
        return task["id"], token

    def _post(self, client, token, job):
        return client.post(f"/api/callbacks/kie/{token}", {"code": 200, "data": {"taskId": job}})

    def _seen(self, store, task_id):
        t = store.get_task(task_id)
        return t["status"], t["external_id"], t["state"], t["next_poll_at"], t["version"]

    def test_a_submit_in_doubt_records_the_named_job_once(self, rig):
        store, client, wakes, user, clock = rig
        now = clock()
        task_id, token = self._task(store, user, now)
        version = store.get_task(task_id)["version"]
        assert self._post(client, token, "job-1").status == 200
        got = store.get_task(task_id)
        assert got["state"]["adopted_job"] == "job-1" and got["next_poll_at"] == now
        assert got["version"] == version and got["lease_owner"] is None and wakes.count == 1
        assert self._post(client, token, "job-1").status == 200         # the same callback again
        seen = self._seen(store, task_id)
        res = self._post(client, token, "job-2")                        # another job: not this task's
        assert res.status == 404 and res.json()["error"]["code"] == "callback_not_found"
        assert self._seen(store, task_id) == seen

    def test_a_task_a_worker_holds_gets_503_and_no_change(self, rig):
        store, client, wakes, user, clock = rig
        task_id, token = self._task(store, user, clock())
        store.claim_task(task_id, "worker", now=clock(), lease_s=30)
        seen = self._seen(store, task_id)
        res = self._post(client, token, "job-1")
        assert res.status == 503 and res.headers["retry-after"] == "1"
        assert self._seen(store, task_id) == seen and wakes.count == 0

    def test_a_running_task_is_due_now_only_for_its_own_job(self, rig):
        store, client, wakes, user, clock = rig
        task_id, token = self._task(store, user, clock(), external_id="job-1", status="running")
        seen = self._seen(store, task_id)
        assert self._post(client, token, "job-9").status == 404
        assert self._seen(store, task_id) == seen and wakes.count == 0
        assert self._post(client, token, "job-1").status == 200
        assert store.get_task(task_id)["next_poll_at"] == clock() and wakes.count == 1

    def test_a_task_not_in_doubt_or_ended_is_404(self, rig):
        store, client, wakes, user, clock = rig
        waiting, token = self._task(store, user, clock(), posted=False)   # nothing was sent
        seen = self._seen(store, waiting)
        assert self._post(client, token, "job-1").status == 404
        assert self._seen(store, waiting) == seen
        ended, token = self._task(store, user, clock())
        store.cancel(ended, user["id"], now=clock())
        seen = self._seen(store, ended)
        assert self._post(client, token, "job-1").status == 404
        assert self._seen(store, ended) == seen and wakes.count == 0


# -- the provider's side: its settings and KIE's signature scheme -----------------------

def _kie(**table):
    from providers import build_providers
    conf = {"type": "kie", "url": "http://127.0.0.1:9", "api_key_env": "KIE_TEST_KEY", **table}
    return build_providers({"kie": conf}, env=KEY_ENV)["kie"]


def test_callback_settings_are_checked_when_the_table_is_loaded():
    from errors import ConfigError
    assert _kie().callback_grace_s == 300 and _kie(callback_grace_s=5).callback_grace_s == 5
    with pytest.raises(ConfigError, match="KIE_NOPE .callback_key_env. is not set"):
        _kie(callback_key_env="KIE_NOPE")
    with pytest.raises(ConfigError, match="callback_grace_s must be a positive number"):
        _kie(callback_grace_s=0)
    with pytest.raises(ConfigError, match="looks like a secret"):
        _kie(callback_key="whk-secret")


def test_kie_signature_is_base64_hmac_sha256_of_task_id_dot_timestamp():
    import base64
    import hmac as hmac_
    from errors import Unauthorized
    kie = _kie(callback_key_env="KIE_CALLBACK_KEY")
    now = 1_760_000_000
    sig = base64.b64encode(hmac_.new(b"whk-secret", b"job-7.1760000000", hashlib.sha256).digest()).decode()
    body = {"code": 200, "msg": "ok", "data": {"taskId": "job-7", "state": "success"}}
    headers = {"X-Webhook-Timestamp": "1760000000", "X-Webhook-Signature": sig}
    assert kie.callback_job(headers, body, now) == "job-7"
    assert kie.callback_job(headers, body, now + 299) == "job-7"
    for bad in ({**headers, "X-Webhook-Signature": sig[:-4] + "AAA="}, {**headers, "X-Webhook-Timestamp": "1760000001"},
                {"X-Webhook-Timestamp": "1760000000"}, {}):
        with pytest.raises(Unauthorized):
            kie.callback_job(bad, body, now)
    with pytest.raises(Unauthorized):
        kie.callback_job(headers, body, now + 301)       # a recorded callback played again later
    with pytest.raises(Unauthorized):                     # signed for another job
        kie.callback_job(headers, {"data": {"taskId": "job-8"}}, now)
    # Unsigned, when no key is configured: the path's token is the check.
    assert _kie().callback_job({}, body, now) == "job-7"
