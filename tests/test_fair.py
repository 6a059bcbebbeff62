"""Fair under load, on real servers with real workers: one user's burst at a
provider with `concurrency = 2` does not starve another user, across
processes on one PostgreSQL database too; priorities order one user's own
tasks; an overloaded worker stretches old tasks' polls, not fresh ones'."""

import logging
import time
from datetime import datetime

import requests

from support import ServerProcess, api, wait_for
from tests.fakes.kie import FakeKIE

TERMINAL = ("succeeded", "partial", "failed", "cancelled")
BURST_CONFIG = """
[providers.demo]
concurrency = 2
duration_s = 1.0
poll_interval_s = 0.2
max_poll_interval_s = 0.5
"""


def ts(value):
    return None if value is None else datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def make_user(server, name, **limits):
    admin = api(server, server.tokens["admin"])
    res = admin.post(server.url + "/api/admin/users", timeout=10,
                     json={"name": name, "max_active": 1000, "rate_per_s": 1000, **limits})
    assert res.status_code == 201, res.text
    return api(server, res.json()["token"])


def submit(session, url, **body):
    res = session.post(url + "/api/tasks", timeout=10, json={"provider": "demo", **body})
    assert res.status_code == 201, res.text
    return res.json()["task"]


def tasks_of(session, url):
    res = session.get(url + "/api/tasks", params={"limit": 200}, timeout=10)
    assert res.status_code == 200, res.text
    return {t["id"]: t for t in res.json()["tasks"]}


def burst_then_two(alice, alice_url, bob, bob_url):
    """alice queues 30 one-second tasks, bob 2 right after; returns when
    bob's are done and alice has 10 finished: (alice's tasks, bob's)."""
    a_ids = [submit(alice, alice_url, params={"prompt": f"a{i}"})["id"] for i in range(30)]
    b_ids = [submit(bob, bob_url, params={"prompt": f"b{i}"})["id"] for i in range(2)]

    def done():
        a, b = tasks_of(alice, alice_url), tasks_of(bob, bob_url)
        finished = [t for t in a.values() if t["status"] in TERMINAL]
        if all(b[i]["status"] in TERMINAL for i in b_ids) and len(finished) >= 10:
            return [a[i] for i in a_ids], [b[i] for i in b_ids]
        return None
    return wait_for(done, 120, "bob's two tasks and ten of alice's")


def check_fair(a_tasks, b_tasks):
    assert all(t["status"] == "succeeded" for t in b_tasks), b_tasks
    first = b_tasks[0]
    wait = ts(first["started_at"]) - ts(first["created_at"])
    tenth = sorted(ts(t["finished_at"]) for t in a_tasks if t["finished_at"])[9]
    b_done = max(ts(t["finished_at"]) for t in b_tasks)
    assert wait <= 2.0, f"bob's first task waited {wait:.2f} s to start"
    assert b_done < tenth, f"bob's last finished {b_done - tenth:+.2f} s after alice's tenth"
    return wait


def test_a_burst_of_one_user_does_not_starve_another(tmp_path):
    (tmp_path / "holdfast.toml").write_text(BURST_CONFIG)
    with ServerProcess(tmp_path, env={"HOLDFAST_CONFIG": str(tmp_path / "holdfast.toml")}) as server:
        alice, bob = make_user(server, "alice"), make_user(server, "bob")
        a_tasks, b_tasks = burst_then_two(alice, server.url, bob, server.url)
        wait = check_fair(a_tasks, b_tasks)
        print(f"bob's first task waited {wait:.2f} s")


def test_fair_share_holds_across_two_processes_on_postgresql(tmp_path, pg_schema):
    (tmp_path / "holdfast.toml").write_text(BURST_CONFIG)
    env = {"HOLDFAST_STORE": pg_schema.url, "HOLDFAST_CONFIG": str(tmp_path / "holdfast.toml")}
    servers = []
    try:
        for n in range(2):
            servers.append(ServerProcess(tmp_path / f"node{n}", env=env).start())
        admin_at = next(s for s in servers if "admin" in s.tokens)
        for s in servers:
            s.tokens.setdefault("admin", admin_at.tokens["admin"])
        alice, bob = make_user(servers[0], "alice"), make_user(servers[0], "bob")
        # alice submits to one process, bob to the other; both workers claim.
        a_tasks, b_tasks = burst_then_two(alice, servers[0].url, bob, servers[1].url)
        wait = check_fair(a_tasks, b_tasks)
        print(f"bob's first task waited {wait:.2f} s")
    finally:
        for s in servers:
            s.stop()


def test_a_higher_priority_task_of_one_user_starts_next(tmp_path):
    (tmp_path / "holdfast.toml").write_text(BURST_CONFIG)
    with ServerProcess(tmp_path, env={"HOLDFAST_CONFIG": str(tmp_path / "holdfast.toml")}) as server:
        alice = make_user(server, "alice", max_priority=5)
        low = [submit(alice, server.url, params={"prompt": f"p0-{i}"})["id"] for i in range(20)]
        # Above the maximum, or not an integer: a 400 that creates nothing.
        for priority, code in ((6, "priority_not_allowed"), ("5", "invalid_priority"),
                               (5.0, "invalid_priority"), (True, "invalid_priority")):
            res = alice.post(server.url + "/api/tasks", timeout=10,
                             json={"provider": "demo", "priority": priority})
            assert res.status_code == 400 and res.json()["error"]["code"] == code, (priority, res.text)
        assert len(tasks_of(alice, server.url)) == 20
        high = submit(alice, server.url, params={"prompt": "p5"}, priority=5)
        assert high["priority"] == 5
        started_before = {i for i, t in tasks_of(alice, server.url).items() if t["started_at"]}

        def high_started():
            tasks = tasks_of(alice, server.url)
            return tasks if tasks[high["id"]]["started_at"] else None
        tasks = wait_for(high_started, 60, "the priority-5 task to start")
        # Of the tasks that had not started when it was submitted, it is
        # first. The two running ones started together, so both slots may
        # come free together: one priority-0 task may start in the same
        # moment (its started_at is when its step began, a moment earlier).
        at = ts(tasks[high["id"]]["started_at"])
        later = [i for i in low if i not in started_before and tasks[i]["started_at"]
                 and ts(tasks[i]["started_at"]) < at]
        assert len(later) <= 1 and all(at - ts(tasks[i]["started_at"]) < 0.5 for i in later), (
            f"{len(later)} priority-0 task(s) started before the priority-5 one",
            [(tasks[i]["created_at"], tasks[i]["started_at"]) for i in [high["id"], *later]])
        assert len(started_before) <= 3, started_before
        assert tasks[low[0]]["priority"] == 0

        # An admin raises or lowers the maximum.
        admin = api(server, server.tokens["admin"])
        res = admin.patch(server.url + "/api/admin/users/alice", json={"max_priority": 0}, timeout=10)
        assert res.status_code == 200 and res.json()["user"]["max_priority"] == 0, res.text
        res = alice.post(server.url + "/api/tasks", json={"provider": "demo", "priority": 1}, timeout=10)
        assert res.status_code == 400 and res.json()["error"]["code"] == "priority_not_allowed"
        res = admin.patch(server.url + "/api/admin/users/nobody", json={"max_priority": 1}, timeout=10)
        assert res.status_code == 404


class PollLog(FakeKIE):
    """The fake KIE, noting when each of its jobs was polled."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.polled = {}

    def _watched_record_info(self, task_id, req):
        with self._lock:
            self.polled.setdefault(task_id, []).append(time.time())
        return super()._watched_record_info(task_id, req)


def test_behind_on_polls_fresh_tasks_are_polled_on_time_and_old_ones_stretch(tmp_path):
    # Each poll takes 0.2 s and the worker has 2 threads: about 10 polls a
    # second, for 60 tasks that each ask for one every 0.2 s.
    kie = PollLog(api_key="slow-key", job_seconds=600, poll_delay=0.2).start()
    (tmp_path / "holdfast.toml").write_text(f"""
[providers.kie]
type = "kie"
url = "{kie.url}"
api_key_env = "HOLDFAST_TEST_KIE_KEY"
poll_interval_s = 0.2
max_poll_interval_s = 0.2
timeout_s = 5
""")
    env = {"HOLDFAST_CONFIG": str(tmp_path / "holdfast.toml"), "HOLDFAST_TEST_KIE_KEY": "slow-key",
           "HOLDFAST_WORKER_THREADS": "2"}
    try:
        with ServerProcess(tmp_path, env=env) as server:
            alice = make_user(server, "alice")
            admin = api(server, server.tokens["admin"])
            old = [submit(alice, server.url, provider="kie",
                          params={"model": "m", "input": {"prompt": f"old {i}"}})["id"] for i in range(60)]

            def slowed():
                health = requests.get(server.url + "/healthz", timeout=10).json()
                return health if health.get("slow_down", {}).get("active") else None
            health = wait_for(slowed, 60, "/healthz to show the slow-down")
            assert health["ok"] and health["slow_down"]["poll_lag_s"] > 0.6, health
            metrics_text = requests.get(server.url + "/metrics", timeout=10).text
            assert "holdfast_slow_down 1" in metrics_text

            # Old tasks, polled while behind, wait several intervals for their next poll.
            def stretched():
                rows = admin.get(server.url + "/api/admin/tasks", params={"limit": 500}, timeout=10).json()
                ahead = [ts(r["next_poll_at"]) - ts(rows["now"]) for r in rows["tasks"]
                         if r["task"]["id"] in old and r["next_poll_at"]]
                return max(ahead, default=0) > 0.6
            wait_for(stretched, 60, "an old task's next poll to be stretched")

            fresh = submit(alice, server.url, provider="kie",
                           params={"model": "m", "input": {"prompt": "fresh"}})

            def first_poll():
                task = tasks_of(alice, server.url)[fresh["id"]]
                polls = kie.polled.get(task["external_id"] or "")
                return (task, polls[0]) if polls else None
            task, polled_at = wait_for(first_poll, 60, "the fresh task's first poll")
            started, created = ts(task["started_at"]), ts(task["created_at"])
            print(f"fresh task: submitted after {started - created:.2f} s, "
                  f"first poll {polled_at - started:.2f} s after that")
            assert started - created < 2.0, f"the fresh task waited {started - created:.2f} s to be submitted"
            assert polled_at - started < 2.0, f"first poll {polled_at - started:.2f} s after it started"
            # Meanwhile the oldest tasks are polled far less often than every 0.2 s.
            assert server.proc.poll() is None
    finally:
        kie.stop()


def test_the_slow_down_logs_once_when_it_starts_and_once_when_it_ends(caplog):
    from worker.slowdown import SlowDown
    mode = SlowDown(0.5)
    with caplog.at_level(logging.INFO, logger="holdfast.worker"):
        for now, lag in enumerate((0.2, 1.0, 1.6, 3.0, 9.0, 2.0, 0.8, 0.4, 0.1, 0.0, 1.4)):
            mode.observe(lag, float(now))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "slowing down" in lines[0] and "caught up" in lines[1], lines
    assert not mode.active and mode.describe() == {"active": False, "since": None, "poll_lag_s": 1.4}

    # Only while on, and only old running tasks: fresh ones and queued ones keep their interval.
    class Provider:
        poll_interval_s = 0.5
    mode.observe(5.0, 100.0)
    old = {"status": "running", "started_at": 0.0, "created_at": 0.0}
    assert mode.stretch(old, Provider, 20.0) == 4.0 and mode.stretch(old, Provider, 1000.0) == 8.0
    assert mode.stretch({**old, "started_at": 18.0}, Provider, 20.0) == 1.0
    assert mode.stretch({**old, "status": "queued"}, Provider, 20.0) == 1.0
