"""No blind resubmission (DESIGN.md guarantee 5): a failed submit is not
sent, refused, or in doubt; only the first two are sent again as they were.
Every test counts the jobs each task made at a fake provider on 127.0.0.1,
not only how the task ended."""

import collections
import os
import random
import threading
import time

import pytest

from errors import ConfigError, InDoubt, ProviderUnavailable
from providers import HttpProvider, build_providers
from recover import recover
from store import POSTED_AT, PostgresStore, SqliteStore
from support import ServerProcess, api, submit_until
from test_crash import _users_add
from test_providers import KEY_ENV, Rig, comfy_conf, kie_conf, wait_for, workflow
from worker import Worker

try:
    from tests.fakes.comfyui import FakeComfyUI
    from tests.fakes.kie import FakeKIE
except ImportError:  # plain `pytest` puts tests/, not the repo root, on sys.path
    from fakes.comfyui import FakeComfyUI
    from fakes.kie import FakeKIE

TERMINAL = ("succeeded", "partial", "failed", "cancelled")
CREATE = "/api/v1/jobs/createTask"


def paying_rig(store, files, clock, table, credits=10):
    """A Rig whose user pays: refunds show in the balance."""
    rig = Rig(store, files, clock, table)
    rig.user = store.create_user("payer", credits=credits)[0]
    return rig


def kie_prompts(rig, n, provider="kie"):
    return [rig.submit(provider, {"model": "flux", "input": {"prompt": f"t{i}"}}) for i in range(n)]


def run_real(worker, store, ids, limit_s):
    """The worker on the real clock (as a server runs it) until every task ends."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        worker.run_once(time.time())
        tasks = [store.get_task(i) for i in ids]
        if all(t["status"] in TERMINAL for t in tasks):
            return tasks
        time.sleep(0.02)
    raise AssertionError(f"tasks did not finish: {[(t['status'], t['step'], t['state']) for t in tasks]}")


# -- the seam: what a failure means ------------------------------------------

def _outcome(provider, path="/api/v1/jobs/createTask"):
    try:
        provider.json_of(provider.call("POST", path, what="submit", json={"model": "m", "input": {"prompt": "p"}}),
                         "submit")
    except InDoubt as exc:
        return "in doubt", exc
    except ProviderUnavailable as exc:
        return "not sent or refused", exc
    return "answered", None


def _seam_provider(url, timeout_s=1.0):
    return HttpProvider("p", {"url": url, "timeout_s": timeout_s, "api_key_env": "KIE_TEST_KEY"}, env=KEY_ENV)


class TestSeam:
    def test_a_connection_that_never_opened_was_not_sent(self):
        kie = FakeKIE().start()
        kie.stop()      # a port nobody listens on
        assert _outcome(_seam_provider(kie.url))[0] == "not sent or refused"
        # .invalid never resolves (RFC 6761): a DNS failure.
        assert _outcome(_seam_provider("http://holdfast-test.invalid:9"))[0] == "not sent or refused"

    @pytest.mark.parametrize("fault", ["answer after the timeout", "reset after sending", "500", "502", "504",
                                       "unreadable answer"])
    def test_a_request_that_went_out_and_came_back_without_an_answer_is_in_doubt(self, fault):
        knobs = {"answer after the timeout": {"slow_creates": 1}, "reset after sending": {"drop_creates": 1},
                 "unreadable answer": {"malformed_rate": 1.0}}.get(fault)
        with FakeKIE(slow_seconds=2.0, **(knobs or {"error_rate": 1.0, "error_status": int(fault)})) as kie:
            kind, exc = _outcome(_seam_provider(kie.url))
            assert kind == "in doubt", exc
            assert exc.code == "submission_in_doubt"

    @pytest.mark.parametrize("status", [408, 429, 503])
    def test_a_refusal_says_when_to_come_back(self, status):
        with FakeKIE() as kie:
            kie.rate_limit_next(1, retry_after=7, status=status)
            kind, exc = _outcome(_seam_provider(kie.url))
            assert kind == "not sent or refused" and exc.retry_after == 7
            assert kie.created == []

    def test_on_doubt_is_checked_when_the_table_is_loaded(self):
        conf = {"type": "kie", "url": "http://127.0.0.1:9", "api_key_env": "KIE_TEST_KEY"}
        assert build_providers({"kie": {**conf, "on_doubt": "resubmit"}}, env=KEY_ENV)["kie"].on_doubt == "resubmit"
        assert build_providers({"kie": conf}, env=KEY_ENV)["kie"].on_doubt == "fail"
        with pytest.raises(ConfigError, match="on_doubt must be one of fail, resubmit"):
            build_providers({"kie": {**conf, "on_doubt": "retry"}}, env=KEY_ENV)


# -- KIE: no client id, so nothing to ask about --------------------------------

class TestKIE:
    def test_a_createtask_answered_after_timeout_makes_one_job_and_fails_in_doubt_refunded(
            self, sqlite_store, files, clock):
        with FakeKIE(job_seconds=0.05, slow_creates=10**6, slow_seconds=0.8) as kie:
            rig = paying_rig(sqlite_store, files, clock, {"kie": kie_conf(kie, timeout_s=0.3, cost=1)})
            ids = kie_prompts(rig, 3)
            assert rig.store.user_by_name("payer")["credit_balance"] == 7
            tasks = [rig.run(i) for i in ids]
            for task in tasks:
                assert task["status"] == "failed" and task["error"]["code"] == "submission_in_doubt", task
                assert "not submitted again" in task["error"]["message"]
                assert task["credits"] == "refunded" and task["attempts"] == 1
            assert rig.store.user_by_name("payer")["credit_balance"] == 10
            # An hour later nothing more went out.
            clock.advance(3600)
            rig.worker.run_once(clock())
            wait_for(lambda: kie.faults["slow create"] == 3)
            assert kie.jobs_per() == {"t0": 1, "t1": 1, "t2": 1}
            assert kie.requests[CREATE] == 3

    def test_a_createtask_whose_connection_dropped_after_sending_makes_one_job(self, sqlite_store, files, clock):
        with FakeKIE(job_seconds=0.05, drop_creates=2) as kie:
            rig = paying_rig(sqlite_store, files, clock, {"kie": kie_conf(kie, cost=1)})
            tasks = [rig.run(i) for i in kie_prompts(rig, 3)]
            assert [(t["status"], (t["error"] or {}).get("code")) for t in tasks] == [
                ("failed", "submission_in_doubt"), ("failed", "submission_in_doubt"), ("succeeded", None)]
            assert kie.jobs_per() == {"t0": 1, "t1": 1, "t2": 1}
            assert rig.store.user_by_name("payer")["credit_balance"] == 9

    def test_on_doubt_resubmit_sends_it_again_up_to_retries(self, sqlite_store, files, clock):
        # A timeout of 1 s: on a loaded machine a healthy answer must not look like one.
        with FakeKIE(job_seconds=0.05, slow_creates=1, slow_seconds=2.0) as kie:
            rig = paying_rig(sqlite_store, files, clock,
                             {"kie": kie_conf(kie, timeout_s=1.0, cost=1, on_doubt="resubmit"),
                              "kie2": kie_conf(kie, timeout_s=1.0, cost=1, on_doubt="resubmit", retries=2)})
            [task] = [rig.run(i) for i in kie_prompts(rig, 1)]
            assert task["status"] == "succeeded" and task["attempts"] == 2, task
            # At least once: the late job and the one that succeeded.
            assert kie.jobs_per() == {"t0": 2} and task["external_id"] == kie.created[-1]

            kie.slow_creates = 10**6
            [lost] = [rig.run(i) for i in kie_prompts(rig, 1, provider="kie2")]
            assert lost["status"] == "failed" and lost["error"]["code"] == "submission_in_doubt", lost
            assert lost["attempts"] == 2 and lost["credits"] == "refunded"
            assert kie.jobs_per()["t0"] == 2 + 2, "retries = 2 caps the submits"

    def test_refusals_with_retry_after_make_one_job_each_and_a_provider_that_answers_again_is_used_at_once(
            self, sqlite_store, files, clock):
        """503 (and 429) say no job was made: each task is sent again, once
        Retry-After has passed, and makes one job. When the provider
        answers again (here: a new task gets through), the tasks still
        waiting out their backoff go now, not 60 s later."""
        with FakeKIE(job_seconds=0.05) as kie:
            rig = Rig(sqlite_store, files, clock, {"kie": kie_conf(kie)})
            kie.rate_limit_next(3, retry_after=60, status=503)
            waiting = kie_prompts(rig, 3)
            start = clock()
            rig.worker.run_once(start)
            for task_id in waiting:
                task = rig.task(task_id)
                assert task["status"] == "queued" and task["next_poll_at"] >= start + 60, task
                assert "HTTP 503" in task["state"]["last_error"] and POSTED_AT not in task["state"]
            assert kie.faults["503"] == 3 and kie.created == []
            clock.advance(1)
            [late] = [rig.submit("kie", {"model": "flux", "input": {"prompt": "t3"}})]
            rig.worker.run_once(clock())
            assert rig.task(late)["status"] == "running"
            for task_id in waiting:
                assert rig.task(task_id)["next_poll_at"] <= clock(), "still waiting out its backoff"
            tasks = [rig.run(i, limit_s=10) for i in waiting + [late]]
            assert all(t["status"] == "succeeded" and t["attempts"] == 1 for t in tasks), tasks
            assert clock() < start + 30, "the woken tasks went at once"
            assert kie.jobs_per() == {"t0": 1, "t1": 1, "t2": 1, "t3": 1}

    def test_a_submit_a_crash_interrupted_is_in_doubt_at_recovery_and_not_sent_again(
            self, sqlite_store, files, clock, monkeypatch):
        """createTask answered, then the process died before the id was
        stored: recovery finds the task in doubt by its mark, not by an id."""
        with FakeKIE(job_seconds=0.05) as kie:
            rig = paying_rig(sqlite_store, files, clock, {"kie": kie_conf(kie, cost=1)})
            provider = rig.providers["kie"]
            real_submit = provider.submit

            class Crash(BaseException):
                pass

            def submit_then_die(task, now):
                real_submit(task, now)
                raise Crash()

            monkeypatch.setattr(provider, "submit", submit_then_die)
            [task_id] = kie_prompts(rig, 1)
            with pytest.raises(Crash):
                rig.worker.run_once(clock())
            monkeypatch.setattr(provider, "submit", real_submit)
            stored = rig.task(task_id)
            assert stored["status"] == "queued" and stored["external_id"] is None
            assert stored["state"][POSTED_AT] == clock() and stored["attempts"] == 1

            clock.advance(rig.worker.lease_s + 1)
            report = recover(sqlite_store, rig.providers, now=clock(), files=files)
            assert report["submissions_in_doubt"] == [task_id]
            assert report["submissions_reconciled"] == {task_id: "failed"}
            task = rig.task(task_id)
            assert task["error"]["code"] == "submission_in_doubt" and task["credits"] == "refunded"
            clock.advance(600)
            rig.worker.run_once(clock())
            assert len(kie.created) == 1 and kie.requests[CREATE] == 1

    @pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
    @pytest.mark.parametrize("kind", ["300 characters", "a NUL"])
    def test_a_job_id_the_store_cannot_keep_makes_one_job_and_ends_invalid_result(
            self, request, tmp_path, files, clock, backend, kind):
        store = (PostgresStore(request.getfixturevalue("pg_schema").url) if backend == "postgresql"
                 else SqliteStore(str(tmp_path / "holdfast.db")))
        odd = {"300 characters": lambda: os.urandom(150).hex(),
               "a NUL": lambda: "job\x00" + os.urandom(4).hex()}[kind]
        try:
            with FakeKIE(job_seconds=0.05, task_ids=odd) as kie:
                rig = paying_rig(store, files, clock, {"kie": kie_conf(kie, cost=1)})
                tasks = [rig.run(i) for i in kie_prompts(rig, 2)]
                for task in tasks:
                    assert task["status"] == "failed" and task["error"]["code"] == "invalid_result", task
                    assert "job id" in task["error"]["message"] and task["credits"] == "refunded"
                clock.advance(600)
                rig.worker.run_once(clock())
                assert kie.jobs_per() == {"t0": 1, "t1": 1} and kie.requests[CREATE] == 2
        finally:
            store.close()


# -- ComfyUI: our prompt_id, so ask about it, but not too soon -----------------

class TestComfyUI:
    def test_a_first_post_slower_than_timeout_runs_each_task_once(self, sqlite_store, files):
        """The first POST /prompt is still being handled when the client
        gives up; a look at /history and /queue then finds nothing. Only
        after the grace period is it asked about, found, and followed."""
        with FakeComfyUI(job_seconds=0.05, slow_posts=1, slow_seconds=2.5) as comfy:
            providers = build_providers({"comfy": comfy_conf(comfy, timeout_s=0.5)})
            worker = Worker(sqlite_store, providers, files, clock=time.time, owner="test:1:w")
            user = sqlite_store.create_user("carol")[0]
            started = time.time()
            ids = [sqlite_store.submit(user["id"], "comfy", {"workflow": workflow(color=i)}, now=started,
                                       deadline_at=started + 600)[0]["id"] for i in range(3)]
            tasks = run_real(worker, sqlite_store, ids, limit_s=30)
            # Whatever the worker did, the slow POST's job is queued by now.
            time.sleep(max(0.0, started + 3.0 - time.time()))
            assert comfy.wait_idle(10)
            assert all(t["status"] == "succeeded" and t["attempts"] == 1 for t in tasks), tasks
            assert sorted(comfy.submissions) == sorted(t["external_id"] for t in tasks)
            assert comfy.runs == collections.Counter({t["external_id"]: 1 for t in tasks})
            assert comfy.slow_posts == 0

    @pytest.mark.parametrize("retries", [3, 1])
    def test_a_prompt_that_never_arrived_is_sent_again_only_after_the_grace(
            self, sqlite_store, files, clock, retries):
        """A 500 before the job was queued: in doubt. /history and /queue
        are asked only once doubt_grace_s has passed since the POST; the
        job is unknown, so it goes again as attempt 2 (or, out of retries,
        the task ends provider_lost)."""
        with FakeComfyUI(job_seconds=0.05) as comfy:
            rig = Rig(sqlite_store, files, clock, {"comfy": comfy_conf(comfy, timeout_s=2, retries=retries)})
            grace = rig.providers["comfy"].doubt_grace_s
            assert grace >= 2 + 5

            def fail_once(prompt_id):
                comfy.before_queue = None
                raise RuntimeError("lost before the queue")

            comfy.before_queue = fail_once
            task_id = rig.submit("comfy", {"workflow": workflow()})
            posted = clock()
            rig.worker.run_once(posted)
            doubt = rig.task(task_id)
            assert doubt["status"] == "queued" and doubt["state"][POSTED_AT] == posted
            assert doubt["next_poll_at"] >= posted + grace and doubt["attempts"] == 1
            clock.now = posted + grace - 0.5
            rig.worker.run_once(clock())
            assert comfy.requests["/queue"] == 0 and comfy.requests["/prompt"] == 1, "asked too soon"
            task = rig.run(task_id)
            assert comfy.requests["/queue"] >= 1
            if retries == 1:
                assert task["status"] == "failed" and task["error"]["code"] == "provider_lost", task
                assert comfy.requests["/prompt"] == 1 and comfy.submissions == []
            else:
                assert task["status"] == "succeeded" and task["attempts"] == 2, task
                assert comfy.requests["/prompt"] == 2 and comfy.submissions == [task["external_id"]]
                assert comfy.runs == {task["external_id"]: 1}


# -- a real server killed while KIE tasks are submitted --------------------------

def test_kill_9_while_kie_tasks_are_submitted_never_makes_a_second_job(tmp_path):
    """Twenty rounds: tasks stream in while KIE answers each createTask
    0.3 s after making its job, and the server is killed at a random
    moment. However a kill falls (before the POST, during it, after the
    answer and before the id was stored), no task makes a second job."""
    seed = int(os.environ.get("HOLDFAST_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    why = f"(seed {seed}; rerun with HOLDFAST_CRASH_SEED={seed})"
    kie = FakeKIE(job_seconds=0.2, create_delay=0.3).start()
    (tmp_path / "holdfast.toml").write_text(
        f'[providers.kie]\ntype = "kie"\nurl = "{kie.url}"\napi_key_env = "KIE_TEST_KEY"\ncost = 1\n'
        'timeout_s = 3\npoll_interval_s = 0.1\nmax_poll_interval_s = 0.3\n')
    env = {"HOLDFAST_STORE": "sqlite", "HOLDFAST_CONFIG": str(tmp_path / "holdfast.toml"), **KEY_ENV}
    start_credits = 10_000
    token = _users_add(tmp_path, {**os.environ, "HOLDFAST_DATA": str(tmp_path), **env}, "payer", start_credits)
    server = ServerProcess(tmp_path, env=env).start()
    session = api(server, token)
    acked, unanswered = {}, []
    counter = iter(range(10**6))

    def post(key):
        return session.post(server.url + "/api/tasks", timeout=5, json={
            "provider": "kie", "params": {"model": "flux", "input": {"prompt": key}}, "dedupe_key": key})

    began = time.monotonic()
    try:
        for round_no in range(20):
            stop, errors = threading.Event(), []
            thread = threading.Thread(target=submit_until, args=(
                stop, post, lambda: f"k{next(counter)}", acked, unanswered, errors,
                lambda: rng.uniform(0.02, 0.15)))
            thread.start()
            time.sleep(rng.uniform(0.2, 0.8))
            server.kill()
            stop.set()
            thread.join(30)
            assert errors == [], f"{why} {errors}"
            server = ServerProcess(tmp_path, env=env, port=server.port).start()
            while unanswered:           # a client that got no answer tries the same key again
                res = post(unanswered[-1])
                if res.status_code == 429:
                    time.sleep(min(float(res.headers.get("Retry-After", 1)), 1.0))
                    continue
                assert res.status_code in (200, 201), f"{why} {res.text}"
                acked[unanswered.pop()] = res.json()["task"]["id"]
        deadline = time.time() + 60
        while True:
            tasks = {k: session.get(f"{server.url}/api/tasks/{i}", timeout=10).json()["task"]
                     for k, i in acked.items()}
            if all(t["status"] in TERMINAL for t in tasks.values()) or time.time() > deadline:
                break
            time.sleep(0.25)
        me = session.get(server.url + "/api/me", timeout=10).json()
    finally:
        server.stop()
        kie.stop()

    jobs = kie.jobs_per()
    print(f"{why} {len(acked)} tasks, {sum(jobs.values())} jobs at KIE, jobs per task: "
          f"{dict(sorted(collections.Counter(jobs[k] for k in acked).items()))}")
    twice = {k: n for k, n in jobs.items() if n > 1}
    assert twice == {}, f"{why} tasks with a second job at KIE: {twice}"
    stuck = {k: (t["status"], t["step"]) for k, t in tasks.items() if t["status"] not in TERMINAL}
    assert stuck == {}, f"{why} tasks that never ended: {stuck}"
    outcomes = collections.Counter((t["status"], (t["error"] or {}).get("code")) for t in tasks.values())
    assert set(outcomes) <= {("succeeded", None), ("failed", "submission_in_doubt")}, f"{why} {outcomes}"
    for key, task in tasks.items():
        if task["status"] == "succeeded":
            assert jobs[key] == 1 and task["attempts"] == 1, f"{why} {task}"
        else:
            assert task["credits"] == "refunded", f"{why} {task}"
    succeeded = outcomes[("succeeded", None)]
    assert me["credits"] == {"balance": start_credits - succeeded, "reserved": 0}, why
    assert outcomes[("failed", "submission_in_doubt")] >= 1, f"{why} no kill hit a createTask: {outcomes}"
    assert len(acked) >= 40, f"{why} too few submissions to mean anything: {len(acked)}"
    print(f"{why} {len(acked)} tasks in {time.monotonic() - began:.0f}s: {dict(outcomes)}; "
          f"{sum(jobs.values())} jobs at KIE")
