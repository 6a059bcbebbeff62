"""Whether a worker is alive is read from its heartbeat in the store, never
from a PID: two real servers share one SQLite file, one of them in a PID
namespace of its own (as in a container with host networking: one host
name, other PIDs)."""

import collections
import os
import shutil
import subprocess
import time

import pytest

from store import SqliteStore
from support import ServerProcess, api, require

try:
    from tests.fakes import local as local_fns
except ImportError:
    from fakes import local as local_fns

UNSHARE = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
TERMINAL = ("succeeded", "partial", "failed", "cancelled")


def _can_unshare():
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def shared(tmp_path):
    """A data directory both servers use, with a local function that logs
    each run."""
    require(_can_unshare(), "needs unshare --pid (root, or user namespaces)")
    (tmp_path / "holdfast.toml").write_text(f"""
[providers.slow]
type = "local"
function = "{local_fns.__name__}:logged"
poll_interval_s = 0.2
retries = 3
""")
    return tmp_path


def servers_env(data, **extra):
    return {"HOLDFAST_CONFIG": str(data / "holdfast.toml"), **extra}


def runs(log):
    """{task name: [pid of each run]} from the function's log."""
    out = collections.defaultdict(list)
    if log.exists():
        for line in log.read_text().splitlines():
            name, pid, _ = line.split()
            out[name].append(int(pid))
    return out


def wait_terminal(session, url, ids, timeout):
    deadline = time.time() + timeout
    tasks = {}
    while time.time() < deadline:
        tasks = {i: session.get(f"{url}/api/tasks/{i}", timeout=10).json()["task"] for i in ids}
        if all(t["status"] in TERMINAL for t in tasks.values()):
            return tasks
        time.sleep(0.25)
    raise AssertionError(f"not finished: {[(t['status'], t['step']) for t in tasks.values()]}")


def heartbeats(data):
    store = SqliteStore(str(data / "holdfast.db"))
    try:
        with store._seam():
            return dict(store._exec("SELECT owner, pid_ns FROM heartbeats").fetchall())
    finally:
        store.close()


def test_two_servers_in_two_pid_namespaces_run_every_local_task_once(shared):
    log = shared / "runs.log"
    env = servers_env(shared)
    host = ServerProcess(shared, env=env).start()
    contained = None
    try:
        contained = ServerProcess(shared, env=env, wrap=UNSHARE).start()
        assert os.readlink(f"/proc/{contained.pid}/ns/pid") != os.readlink(f"/proc/{host.pid}/ns/pid")
        assert len(set(heartbeats(shared).values())) == 2, "each server beats, each names its namespace"
        session = api(host, host.tokens["demo"])
        ids = []
        for i in range(8):
            # Longer than a sweep (5 s): a sweeper that took a live server
            # for dead would free these tasks while they run.
            res = session.post(host.url + "/api/tasks", timeout=10, json={
                "provider": "slow", "params": {"name": f"t{i}", "log": str(log), "seconds": 6}})
            assert res.status_code == 201, res.text
            ids.append(res.json()["task"]["id"])
        tasks = wait_terminal(session, host.url, ids, timeout=120)
    finally:
        if contained is not None:
            contained.stop()
        host.stop()
    ran = runs(log)
    assert {name: len(pids) for name, pids in ran.items()} == {f"t{i}": 1 for i in range(8)}, ran
    for task in tasks.values():
        assert (task["status"], task["attempts"]) == ("succeeded", 1), task
    assert heartbeats(shared) == {}, "a clean stop deletes its row"


def test_a_killed_servers_tasks_are_taken_over_after_its_lease(shared):
    """kill -9 of the server in its own namespace: the other cannot see its
    PID, only that its heartbeat stopped; it takes the tasks over once the
    lease has run out, and runs each once more."""
    log = shared / "runs.log"
    lease_s = 4.0
    env = servers_env(shared, HOLDFAST_LEASE_S=str(lease_s))
    contained = ServerProcess(shared, env=env, wrap=UNSHARE).start()
    host = None
    try:
        session = api(contained, contained.tokens["demo"])
        ids = []
        for i in range(4):
            res = session.post(contained.url + "/api/tasks", timeout=10, json={
                "provider": "slow", "params": {"name": f"t{i}", "log": str(log), "seconds": 300,
                                               "rerun_seconds": 1}})
            assert res.status_code == 201, res.text
            ids.append(res.json()["task"]["id"])
        deadline = time.time() + 60
        while len(runs(log)) < 4:
            assert time.time() < deadline, f"the contained server never started them: {runs(log)}"
            time.sleep(0.1)
        host = ServerProcess(shared, env=env).start()
        # Alive, it keeps them: the host server, which cannot see its PID,
        # reads its heartbeat.
        time.sleep(lease_s * 1.5)
        assert all(len(pids) == 1 for pids in runs(log).values()), runs(log)
        assert {session.get(f"{contained.url}/api/tasks/{i}", timeout=10).json()["task"]["status"]
                for i in ids} == {"running"}
        contained.kill()
        killed_at = time.time()
        session = api(host, contained.tokens["demo"])
        tasks = wait_terminal(session, host.url, ids, timeout=120)
    finally:
        if host is not None:
            host.stop()
        contained.stop()
    ran = runs(log)
    assert {name: len(pids) for name, pids in ran.items()} == {f"t{i}": 2 for i in range(4)}, ran
    for name, (first, second) in ran.items():
        assert first != second, f"{name}: the second run is the host server's"
    restarted = [float(line.split()[2]) for line in log.read_text().splitlines()][4:]
    assert max(restarted) - killed_at < lease_s + 30, "taken over once the lease ran out"
    for task in tasks.values():
        assert (task["status"], task["attempts"]) == ("succeeded", 2), task
