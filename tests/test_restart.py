"""A real server stopped and started again: SIGTERM leaves within seconds
and hands its work to the next process; start-up never waits on a provider."""

import subprocess
import threading
import time

import pytest
import requests

from store import SqliteStore
from support import ServerProcess, api

try:
    from tests.fakes import local as local_fns
    from tests.fakes.comfyui import FakeComfyUI
except ImportError:  # plain `pytest` puts tests/, not the repo root, on sys.path
    from fakes import local as local_fns
    from fakes.comfyui import FakeComfyUI

TERMINAL = ("succeeded", "partial", "failed", "cancelled")


def wait_for(what, predicate, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout}s")


@pytest.mark.parametrize("quiet", [False, True], ids=["reporting", "never-reporting"])
def test_sigterm_with_a_40s_local_function_running_exits_within_5s_and_the_next_server_finishes_it(
        tmp_path, quiet):
    """A function that reports stops at its next report(); one that never
    reports is left running when the process exits, after a short grace."""
    config = tmp_path / "holdfast.toml"
    config.write_text(f'[providers.slow]\ntype = "local"\nfunction = "{local_fns.__name__}:slow"\n'
                      'poll_interval_s = 0.2\n')
    env = {"HOLDFAST_CONFIG": str(config)}
    server = ServerProcess(tmp_path, env=env).start()
    session = api(server, server.tokens["demo"])
    counter = tmp_path / "calls"
    try:
        res = session.post(server.url + "/api/tasks", timeout=10, json={
            "provider": "slow", "params": {"seconds": 40, "again_seconds": 0.3, "counter": str(counter),
                                           "quiet": quiet}})
        assert res.status_code == 201, res.text
        task_id = res.json()["task"]["id"]
        wait_for("the function running", lambda: counter.exists() and session.get(
            f"{server.url}/api/tasks/{task_id}", timeout=10).json()["task"]["status"] == "running")
        started = time.monotonic()
        server.proc.terminate()
        try:
            code = server.proc.wait(10)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - started
        assert code == 0 and took < 5, f"exit {code} after {took:.1f}s:\n{server.read_log()}"
    finally:
        server.stop()

    # The lease went back with the exit: the next process need not wait for it to run out.
    store = SqliteStore(str(tmp_path / "holdfast.db"))
    try:
        assert store.get_task(task_id)["lease_owner"] is None
    finally:
        store.close()
    with ServerProcess(tmp_path, env=env, port=server.port) as again:
        task = wait_for("the task finished by the next server", lambda: (
            lambda t: t if t["status"] in TERMINAL else None)(
                session.get(f"{again.url}/api/tasks/{task_id}", timeout=10).json()["task"]), timeout=30)
    assert task["status"] == "succeeded", task
    assert counter.read_text() == "2"      # the interrupted run, and the one that finished


def _workflow(n):
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": n}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": f"t{n}"}}}


def test_a_restart_answers_healthz_within_2s_while_a_dozen_submissions_hang_at_providers(tmp_path):
    """Two ComfyUI servers that take every POST /prompt and never answer:
    twelve submissions in doubt when the server is killed. The restarted
    server binds its port and answers /healthz at once, and asks the
    providers about those submissions in the background."""
    gate = threading.Event()
    fakes = [FakeComfyUI(job_seconds=0.05), FakeComfyUI(job_seconds=0.05)]
    for fake in fakes:
        fake.before_queue = lambda prompt_id: gate.wait(60)
        fake.start()
    config = tmp_path / "holdfast.toml"
    config.write_text("".join(
        f'[providers.comfy{i}]\ntype = "comfyui"\nurl = "{fake.url}"\ntimeout_s = 2\n'
        'poll_interval_s = 0.2\nmax_poll_interval_s = 0.5\n' for i, fake in enumerate(fakes)))
    env = {"HOLDFAST_CONFIG": str(config), "HOLDFAST_WORKER_THREADS": "12"}
    server = ServerProcess(tmp_path, env=env).start()
    session = api(server, server.tokens["demo"])
    again = None
    try:
        ids = []
        for n in range(12):
            res = session.post(server.url + "/api/tasks", timeout=10, json={
                "provider": f"comfy{n % 2}", "params": {"workflow": _workflow(n)}})
            assert res.status_code == 201, res.text
            ids.append(res.json()["task"]["id"])

        def all_sent():
            tasks = [session.get(f"{server.url}/api/tasks/{i}", timeout=10).json()["task"] for i in ids]
            return all(t["status"] == "queued" and t["external_id"] for t in tasks)
        wait_for("every submission sent and unanswered", all_sent)
        server.kill()

        # What a start costs on this machine right now, with nothing to
        # recover: on a loaded machine, imports alone can take seconds. The
        # bound is 2 s on a quiet one; asking the providers before binding
        # the port would cost 12 x timeout_s = 24 s more.
        started = time.monotonic()
        ServerProcess(tmp_path / "fresh", env=env).start().stop()
        fresh = time.monotonic() - started

        asked_before = sum(f.requests["/queue"] for f in fakes)
        started = time.monotonic()
        again = ServerProcess(tmp_path, env=env, port=server.port).start(timeout=90)
        took = time.monotonic() - started
        print(f"restart to /healthz: {took:.2f}s (a fresh start: {fresh:.2f}s)")
        assert took < max(2.0, 2 * fresh + 1.0), \
            f"/healthz first answered {took:.1f}s after the restart (fresh: {fresh:.1f}s):\n{again.read_log()}"
        # The submissions in doubt are asked about by the worker, in the background.
        wait_for("the providers asked about the submissions in doubt",
                 lambda: sum(f.requests["/queue"] for f in fakes) > asked_before)
        assert requests.get(again.url + "/healthz", timeout=5).status_code == 200
        gate.set()
        wait_for("every task finished", lambda: all(
            session.get(f"{again.url}/api/tasks/{i}", timeout=10).json()["task"]["status"] in TERMINAL
            for i in ids), timeout=60)
    finally:
        gate.set()
        if again is not None:
            again.stop()
        server.stop()
        for fake in fakes:
            fake.stop()
