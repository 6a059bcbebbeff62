"""A real `python app.py` puts every one of its threads on one CPU
(HOLDFAST_CPU, cpu.py): its threads share one GIL, and on one core they do
the same work for less. `all` leaves them where the kernel puts them; a
CPU it may not use is one line and exit 2; a local function runs on every
CPU the server started with, and so do the threads it starts."""

import json
import os
import threading

import pytest

import cpu
from errors import ConfigError
from support import ServerProcess, api, free_port, wait_for
from test_cli import one_line, run_app

try:
    from tests.fakes import local as local_fns
except ImportError:  # plain `pytest` puts tests/, not the repo root, on sys.path
    from fakes import local as local_fns

ALLOWED = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
pytestmark = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs Linux and a process allowed two CPUs or more")


def thread_cpus(pid):
    """{thread id: the CPUs it may run on} for every thread of process `pid`."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as fh:
                line = next(x for x in fh if x.startswith("Cpus_allowed_list:"))
        except (OSError, StopIteration):
            continue        # ended meanwhile
        found[int(tid)] = _cpu_set(line.split(":", 1)[1].strip())
    return found


def _cpu_set(text):
    cpus = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def _demo_task_done(server):
    """A demo task through submit, worker and files: the worker's threads,
    waitress's and the store's are all started by then."""
    session = api(server, server.tokens["demo"])
    res = session.post(server.url + "/api/tasks", json={"provider": "demo", "params": {"prompt": "cpu"}}, timeout=10)
    assert res.status_code == 201, res.text
    task_id = res.json()["task"]["id"]
    return wait_for(lambda: (lambda t: t if t["status"] == "succeeded" else None)(
        session.get(f"{server.url}/api/tasks/{task_id}", timeout=10).json()["task"]), timeout=30,
        what="the demo task succeeded")


def test_every_thread_of_the_server_runs_on_one_cpu_it_may_use(tmp_path):
    with ServerProcess(tmp_path) as server:
        _demo_task_done(server)
        threads = thread_cpus(server.pid)
        log = server.read_log()
    assert len(threads) > 10, threads       # waitress's, the worker's, the store's, the log's
    placements = set(map(frozenset, threads.values()))
    assert len(placements) == 1, placements
    (only,) = next(iter(placements))
    assert only in ALLOWED
    assert f"threads confined to CPU {only} of " in log, log


def test_a_cpu_number_puts_them_there_and_all_leaves_them_everywhere(tmp_path):
    chosen = max(ALLOWED)
    with ServerProcess(tmp_path / "one", env={"HOLDFAST_CPU": str(chosen)}) as server:
        _demo_task_done(server)
        assert set(map(frozenset, thread_cpus(server.pid).values())) == {frozenset({chosen})}
    with ServerProcess(tmp_path / "all", env={"HOLDFAST_CPU": "all"}) as server:
        _demo_task_done(server)
        assert set(map(frozenset, thread_cpus(server.pid).values())) == {frozenset(ALLOWED)}
        assert "threads confined" not in server.read_log()


@pytest.mark.parametrize("value, says", [
    ("banana", "HOLDFAST_CPU must be auto, all or a CPU number, not 'banana'"),
    ("-1", "HOLDFAST_CPU must be auto, all or a CPU number"),
    ("4095", "HOLDFAST_CPU is 4095, but this process may run only on CPUs "),
])
def test_a_cpu_it_cannot_use_is_one_line_and_exit_2_before_anything_is_written(tmp_path, value, says):
    if value == "4095" and 4095 in ALLOWED:
        pytest.skip("this machine has a CPU 4095")
    line = one_line(run_app(tmp_path, HOLDFAST_CPU=value, HOLDFAST_DATA=str(tmp_path / "data"),
                            HOLDFAST_PORT=str(free_port())))
    assert says in line, line
    assert not (tmp_path / "data").exists()


def test_a_local_function_and_its_threads_run_on_every_cpu_and_the_worker_goes_back_to_one(tmp_path):
    config = tmp_path / "holdfast.toml"
    config.write_text(f'[providers.where]\ntype = "local"\nfunction = "{local_fns.__name__}:affinity"\n')
    with ServerProcess(tmp_path, env={"HOLDFAST_CONFIG": str(config)}) as server:
        session = api(server, server.tokens["demo"])
        res = session.post(server.url + "/api/tasks", json={"provider": "where", "params": {}}, timeout=10)
        assert res.status_code == 201, res.text
        task_id = res.json()["task"]["id"]
        task = wait_for(lambda: (lambda t: t if t["status"] in ("succeeded", "failed") else None)(
            session.get(f"{server.url}/api/tasks/{task_id}", timeout=10).json()["task"]), timeout=30,
            what="the local task ended")
        assert task["status"] == "succeeded", task
        seen = json.loads(session.get(server.url + task["files"][0]["url"], timeout=10).content)
        after = set(map(frozenset, thread_cpus(server.pid).values()))
    assert seen == {"function": sorted(ALLOWED), "thread": sorted(ALLOWED)}, seen
    # The function's thread ended with it; the worker's thread is on its one CPU again.
    assert len(after) == 1 and len(next(iter(after))) == 1, after


def test_everywhere_without_confine_changes_nothing():
    before = os.sched_getaffinity(0)
    with cpu.everywhere():
        assert os.sched_getaffinity(0) == before
    assert os.sched_getaffinity(0) == before


def test_a_system_that_refuses_leaves_every_thread_where_it_was(monkeypatch, caplog):
    """No sandbox here forbids sched_setaffinity, so the refusal is the
    one call faked: the second thread's move fails after the first's."""
    calls = []
    real = os.sched_setaffinity

    def refusing(tid, cpus):
        calls.append((tid, set(cpus)))
        if len(calls) == 2:
            raise PermissionError(1, "Operation not permitted")
        return real(tid, cpus)

    started = threading.Event()
    stop = threading.Event()
    other = threading.Thread(target=lambda: (started.set(), stop.wait(10)), daemon=True)
    other.start()
    started.wait(5)
    monkeypatch.setattr(os, "sched_setaffinity", refusing)
    try:
        with caplog.at_level("WARNING", logger="holdfast.cpu"):
            assert cpu.confine("auto") is None
        assert "the system refused to confine them (Operation not permitted)" in caplog.text
        assert calls[-1][1] == ALLOWED, calls      # the first thread moved back
        calls.clear()
        with pytest.raises(ConfigError, match="the system refused it: Operation not permitted"):
            cpu.confine(str(min(ALLOWED)))
        assert cpu._started_with is None
    finally:
        stop.set()
        monkeypatch.undo()
    assert set(map(frozenset, thread_cpus(os.getpid()).values())) == {frozenset(ALLOWED)}
