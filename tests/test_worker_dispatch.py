"""How the worker schedules: the started worker keeps its pool fed (a
backlog is claimed batch after batch as the pool drains, not one batch per
scheduler tick), polls back off with a task's age, and a provider's bug
costs one task a retry, never the worker."""

import logging
import threading
import time

import pytest

from providers import DemoProvider, build_providers
from support import query_plans
from worker import Worker

try:
    from tests.fakes import local as local_fns
except ImportError:  # plain `pytest` puts tests/, not the repo root, on sys.path
    from fakes import local as local_fns


def test_the_pool_asks_for_the_next_batch_as_it_drains(sqlite_store, files):
    providers = build_providers({"demo": {"duration_s": 600}})
    user = sqlite_store.create_user("alice")[0]
    now = time.time()
    ids = [sqlite_store.submit(user["id"], "demo", {"prompt": str(i)}, now=now, deadline_at=now + 3600)[0]["id"]
           for i in range(60)]
    # An hour between ticks: only the pool's own refills can move the backlog.
    worker = Worker(sqlite_store, providers, files, threads=2, tick_s=3600, sweep_s=3600)
    worker.start()
    try:
        worker.wake()
        deadline = time.time() + 30
        while time.time() < deadline:
            submitted = sum(1 for i in ids if sqlite_store.get_task(i)["status"] == "running")
            if submitted == len(ids):
                break
            time.sleep(0.05)
    finally:
        worker.stop()
    assert submitted == len(ids), f"only {submitted} of {len(ids)} submitted without a tick"


def test_a_busy_worker_holds_leases_only_on_the_tasks_its_threads_run(sqlite_store, files, tmp_path):
    """Two threads, each in a long local function, and four more tasks due:
    the worker leases (and renews) only the two it runs; another worker
    claims the other four at once instead of waiting for the first two."""
    gate = tmp_path / "gate"
    providers = build_providers({"slow": {"type": "local", "function": f"{local_fns.__name__}:slow"}})
    user = sqlite_store.create_user("alice")[0]
    now = time.time()
    ids = [sqlite_store.submit(user["id"], "slow", {"seconds": 60, "gate": str(gate),
                                                    "counter": str(tmp_path / f"calls-{i}")},
                               now=now, deadline_at=now + 3600)[0]["id"] for i in range(6)]
    worker = Worker(sqlite_store, providers, files, threads=2, tick_s=0.05, sweep_s=3600, lease_s=30)
    worker.start()

    def leased():
        tasks = [sqlite_store.get_task(i) for i in ids]
        return ({t["id"] for t in tasks if t["lease_owner"] == worker.owner},
                {t["id"] for t in tasks if t["step"] == "working"})
    try:
        deadline = time.time() + 20
        while time.time() < deadline and len(leased()[1]) < 2:
            time.sleep(0.02)
        # A few ticks and renewals later, still only what the threads run.
        for _ in range(20):
            mine, running = leased()
            assert len(running) == 2 and mine == running, (mine, running)
            time.sleep(0.05)
        others = sqlite_store.claim("elsewhere:1:ab", now=time.time(), limit=10, lease_s=30)
        assert {t["id"] for t in others} == set(ids) - running
        sqlite_store.release_leases(["elsewhere:1:ab"])
    finally:
        gate.touch()
        worker.stop()


class _Around:
    """The store, through which a test watches or steers some of the
    worker's calls; every other call goes straight to the store."""

    def __init__(self, store):
        self.store = store
        self.worker = None

    def __getattr__(self, name):
        return getattr(self.store, name)


class _StopsDuringClaim(_Around):
    """The store, except that the worker is stopped (as SIGTERM does in
    app.serve) right after a claim returns: stop() races a tick."""

    def claim(self, *args, **kwargs):
        tasks = self.store.claim(*args, **kwargs)
        self.worker.stop(wait=False)
        return tasks


def _queued(store, n):
    user = store.create_user("alice")[0]
    now = time.time()
    return [store.submit(user["id"], "demo", {"prompt": str(i)}, now=now, deadline_at=now + 3600)[0]["id"]
            for i in range(n)]


class _SlowClaims(_Around):
    """The store, with every claim taking 50 ms and counted."""

    def __init__(self, store):
        super().__init__(store)
        self.claims = 0

    def claim(self, *args, **kwargs):
        self.claims += 1
        time.sleep(0.05)
        return self.store.claim(*args, **kwargs)


def test_wakes_during_a_dispatch_make_one_more_dispatch_and_no_scheduler_warnings(sqlite_store, files, caplog):
    """A submit wakes the worker, and so does every freed pool thread of a
    busy one: hundreds a second. Wakes that come while a dispatch runs are
    folded into one more dispatch, never a warning per wake from the
    scheduler (its "maximum number of running instances reached")."""
    task_id = _queued(sqlite_store, 1)[0]
    store = _SlowClaims(sqlite_store)
    worker = Worker(store, build_providers({"demo": {"duration_s": 600}}), files, tick_s=3600, sweep_s=3600)
    caplog.set_level(logging.WARNING)
    worker.start()
    try:
        for _ in range(100):
            worker.wake()
            time.sleep(0.002)
        deadline = time.time() + 10
        while time.time() < deadline and sqlite_store.get_task(task_id)["status"] != "running":
            time.sleep(0.02)
        time.sleep(0.2)
    finally:
        worker.stop()
    assert sqlite_store.get_task(task_id)["status"] == "running"
    # 100 wakes over about 0.3 s of 50 ms claims: a handful of dispatches.
    assert 1 <= store.claims <= 20, store.claims
    assert not [r for r in caplog.records if r.name.startswith("apscheduler")], caplog.text


class _ClaimThreads(_Around):
    """The store, noting in which thread each task was claimed: by claim(),
    or by the write ending a step (claimed_on_release); and the most tasks
    leased to one owner at any write that let a lease go."""

    def __init__(self, store):
        super().__init__(store)
        self.claims = []        # thread names, a task each
        self.rides = []
        self.most_leased = 0

    def claim(self, *args, **kwargs):
        tasks = self.store.claim(*args, **kwargs)
        self.claims += [threading.current_thread().name] * len(tasks)
        return tasks

    def claimed_on_release(self):
        got = self.store.claimed_on_release()
        if got:
            self.rides.append(threading.current_thread().name)
            owner = got[0]["lease_owner"]
            leased = self.store._one("SELECT COUNT(*) FROM tasks WHERE lease_owner = ?", (owner,))[0]
            self.most_leased = max(self.most_leased, leased)
        return got


def test_a_pool_thread_freed_with_a_backlog_takes_its_next_task_in_the_write_ending_its_step(sqlite_store, files):
    """Under load the write that ends a step also claims the next task for
    the thread it frees, which runs it at once: no write of its own for the
    claim, no other thread woken to make it, and never more tasks leased
    than there are threads."""
    ids = _queued(sqlite_store, 30)
    store = _ClaimThreads(sqlite_store)
    worker = Worker(store, build_providers({"demo": {"duration_s": 600}}), files, threads=2,
                    tick_s=3600, sweep_s=3600)
    worker.start()
    try:
        worker.wake()
        deadline = time.time() + 30
        while time.time() < deadline and any(sqlite_store.get_task(i)["status"] != "running" for i in ids):
            time.sleep(0.05)
    finally:
        worker.stop()
    assert all(sqlite_store.get_task(i)["status"] == "running" for i in ids)
    assert len(store.claims) + len(store.rides) == len(ids)
    # The wake's claim fills both threads; nearly every later task rode on a
    # step's last write, in the pool thread that step freed.
    assert len(store.rides) >= len(ids) - 6, (store.claims, store.rides)
    assert all(name.startswith("holdfast-task") for name in store.rides), store.rides
    assert 1 <= store.most_leased <= 2


class _SlowSubmits(DemoProvider):
    """A demo whose submits take 10 ms each, and whose cancels note how
    many tasks were still queued when they ran."""

    def __init__(self, name, store):
        super().__init__(name, {})
        self.store = store
        self.cancelled_with_queued = []

    def submit(self, task, now):
        time.sleep(0.01)
        return super().submit(task, now)

    def cancel(self, task):
        self.cancelled_with_queued.append(self.store.stats(time.time())["queue_depth"])


def test_a_cancel_handed_to_the_pool_waits_for_one_step_not_for_the_backlog(sqlite_store, files):
    """Threads go on from step to step while a backlog lasts, but not past
    other work handed to the pool: a cancel at the provider runs as soon
    as a thread ends its step."""
    ids = _queued(sqlite_store, 80)
    provider = _SlowSubmits("demo", sqlite_store)
    worker = Worker(sqlite_store, {"demo": provider}, files, threads=2, tick_s=3600, sweep_s=3600)
    worker.start()
    try:
        worker.wake()
        deadline = time.time() + 30
        while time.time() < deadline and sqlite_store.stats(time.time())["queue_depth"] > 60:
            time.sleep(0.01)
        running = next(t for t in map(sqlite_store.get_task, ids) if t["external_id"])
        worker.cancel_at_provider(running)
        while time.time() < deadline and not provider.cancelled_with_queued:
            time.sleep(0.01)
    finally:
        worker.stop()
    # 80 submits of 10 ms on two threads: about 0.4 s of backlog; the cancel
    # came with 60 or fewer still queued and ran a step or two later.
    assert len(provider.cancelled_with_queued) == 1
    assert provider.cancelled_with_queued[0] >= 20, provider.cancelled_with_queued


class _SubmitsAsTheBacklogEnds(_Around):
    """The store, with a task submitted (and the worker woken) right after
    the write ending a step found nothing more to claim: the wake finds
    every thread busy, and the thread about to be free must still take it."""

    def __init__(self, store, user_id):
        super().__init__(store)
        self.user_id = user_id
        self.late = None

    def claimed_on_release(self):
        got = self.store.claimed_on_release()
        if got == [] and self.late is None:
            now = time.time()
            self.late = self.store.submit(self.user_id, "demo", {"prompt": "late"}, now=now,
                                          deadline_at=now + 3600)[0]["id"]
            # The wake's dispatch runs (and finds no free thread) before
            # this thread goes on.
            ticked = self.worker.last_tick
            self.worker.wake()
            deadline = time.time() + 5
            while self.worker.last_tick == ticked and time.time() < deadline:
                time.sleep(0.005)
            time.sleep(0.05)
        return got


def test_a_task_submitted_as_a_backlog_ends_is_claimed_without_waiting_for_a_tick(sqlite_store, files):
    first = _queued(sqlite_store, 1)[0]
    store = _SubmitsAsTheBacklogEnds(sqlite_store, sqlite_store.get_task(first)["user_id"])
    worker = Worker(store, build_providers({"demo": {"duration_s": 600}}), files, threads=1,
                    tick_s=3600, sweep_s=3600)
    store.worker = worker
    worker.start()
    try:
        worker.wake()
        deadline = time.time() + 10
        while time.time() < deadline and (store.late is None
                                          or sqlite_store.get_task(store.late)["status"] != "running"):
            time.sleep(0.02)
    finally:
        worker.stop()
    assert store.late is not None
    assert sqlite_store.get_task(store.late)["status"] == "running"


def test_a_stop_racing_a_tick_hands_nothing_to_the_gone_pool(sqlite_store, files):
    ids = _queued(sqlite_store, 3)
    store = _StopsDuringClaim(sqlite_store)
    worker = Worker(store, build_providers({"demo": {"duration_s": 600}}), files,
                    tick_s=3600, sweep_s=3600)
    store.worker = worker
    worker.start()
    assert worker.dispatch() == 0
    assert worker._inflight == 0 and worker._held == {}
    # The claimed tasks stay with their leases, for recovery or another worker.
    assert all(sqlite_store.get_task(i)["status"] == "queued" for i in ids)


class _StopsAsAStepEnds(_Around):
    """The store, except that the worker is stopped right after the write
    ending a step claimed its thread's next task."""

    def claimed_on_release(self):
        got = self.store.claimed_on_release()
        if got:
            self.worker.stop(wait=False)
        return got


def test_a_task_claimed_as_a_step_ends_while_the_worker_stops_is_left_to_its_lease(sqlite_store, files):
    first, second = _queued(sqlite_store, 2)
    store = _StopsAsAStepEnds(sqlite_store)
    worker = Worker(store, build_providers({"demo": {"duration_s": 600}}), files, threads=1,
                    tick_s=3600, sweep_s=3600)
    store.worker = worker
    worker.start()
    worker.wake()
    deadline = time.time() + 10
    while time.time() < deadline and not (worker._stopping and worker._inflight == 0):
        time.sleep(0.02)
    assert worker._stopping and worker._inflight == 0 and worker._held == {}
    ran, left = sorted(map(sqlite_store.get_task, (first, second)), key=lambda t: t["status"] != "running")
    assert ran["status"] == "running"
    # Claimed, never started: its lease stays for shutdown() to hand back.
    assert (left["status"], left["step"], left["lease_owner"]) == ("queued", None, worker.owner)


def test_a_stopped_worker_claims_nothing(sqlite_store, files):
    ids = _queued(sqlite_store, 2)
    worker = Worker(sqlite_store, build_providers({"demo": {}}), files, tick_s=3600, sweep_s=3600)
    worker.start()
    worker.stop()
    assert worker.dispatch() == 0
    assert sqlite_store.claim("someone-else", now=time.time(), limit=10, lease_s=60)
    assert {t["id"] for t in sqlite_store.claim("x", now=time.time() + 120, limit=10, lease_s=60)} == set(ids)


def test_the_sweepers_lease_queries_read_only_active_rows(sqlite_store):
    """lease_owners() and the expired-lease queries run every few seconds:
    they search the status index instead of scanning a million finished rows."""
    plans = query_plans(sqlite_store, sqlite_store.lease_owners, lambda: sqlite_store.expired_leases(now=1.0),
                        lambda: sqlite_store.release_leases(["gone:1"]),
                        lambda: sqlite_store.release_expired_leases(now=1.0))
    assert len(plans) == 4, plans
    for sql, plan in plans:
        assert plan.startswith("SEARCH tasks USING") and "SCAN" not in plan, (sql, plan)
    # The sweeper's liveness check: the owners by the status index, each
    # one's heartbeat by its key.
    [(sql, plan)] = query_plans(sqlite_store, lambda: sqlite_store.lease_holders(now=1.0))
    assert "SEARCH tasks USING" in plan and "SCAN tasks" not in plan and "SCAN h" not in plan, (sql, plan)


def test_polls_back_off_with_age_from_poll_interval_to_max_poll_interval(sqlite_store, files, clock):
    """The schedule: the first poll poll_interval_s (2 s) after the submit;
    then, at each poll, the next one min(max_poll_interval_s, max(poll_interval_s,
    age / 10)) later, age counted from the submit: every 2 s while the job is
    under 20 s old, then 10% of its age (2.2 s at 22 s, 10 s at 100 s), at
    most every 30 s once it is 300 s old."""
    providers = build_providers({"demo": {"poll_interval_s": 2, "max_poll_interval_s": 30,
                                          "max_wait_s": 7200}})
    worker = Worker(sqlite_store, providers, files, clock=clock, owner="test:1:w")
    user = sqlite_store.create_user("alice")[0]
    start = clock()
    task_id = sqlite_store.submit(user["id"], "demo", {"prompt": "slow", "duration_s": 600}, now=start,
                                  deadline_at=start + 7200)[0]["id"]
    worker.run_once(start)
    task = sqlite_store.get_task(task_id)
    assert task["status"] == "running" and task["started_at"] == start
    assert task["next_poll_at"] == start + 2
    looks = []          # (age at the poll, delay to the next one)
    while True:
        clock.now = task["next_poll_at"]
        worker.run_once(clock())
        task = sqlite_store.get_task(task_id)
        if task["status"] != "running":
            break
        looks.append((clock.now - start, task["next_poll_at"] - clock.now))
    assert task["status"] == "succeeded"
    for age, delay in looks:
        assert delay == pytest.approx(min(30.0, max(2.0, age / 10))), (age, delay)
    delays = [d for _, d in looks]
    assert delays == sorted(delays), "the delay never shrinks as the task ages"
    assert [d for a, d in looks if a <= 20] == [pytest.approx(2.0)] * 10
    assert delays[10] == pytest.approx(2.2)            # at 22 s
    assert max(delays) == pytest.approx(30.0) and delays[-1] == pytest.approx(30.0)
    # About 10 + 28 + 10 polls for a 10-minute job, where a fixed 2 s would be 300.
    assert 40 <= len(looks) <= 55, len(looks)


class _BuggyDemo(DemoProvider):
    """An adapter with a bug: poll raises for a prompt of "boom"."""

    def poll(self, task, now):
        if task["params"].get("prompt") == "boom":
            raise RuntimeError("adapter bug")
        return super().poll(task, now)


def _buggy_rig(store, files, clock, **worker_kw):
    providers = {"demo": _BuggyDemo("demo", {"poll_interval_s": 0.5})}
    worker = Worker(store, providers, files, clock=clock, owner="test:1:w", **worker_kw)
    user = store.create_user("alice")[0]

    def submit(prompt):
        now = clock()
        return store.submit(user["id"], "demo", {"prompt": prompt, "duration_s": 0}, now=now,
                            deadline_at=now + 3600)[0]["id"]
    return worker, submit


def test_a_provider_raising_in_poll_is_retried_with_its_error_and_the_next_task_still_runs(
        sqlite_store, files, clock):
    worker, submit = _buggy_rig(sqlite_store, files, clock)
    boom = submit("boom")
    worker.run_once(clock())
    clock.advance(0.1)
    fine = submit("fine")
    worker.run_once(clock())
    assert {sqlite_store.get_task(i)["status"] for i in (boom, fine)} == {"running"}
    # One tick, both due, the buggy one first (its next look is earlier).
    clock.advance(0.5)
    assert sqlite_store.get_task(boom)["next_poll_at"] < sqlite_store.get_task(fine)["next_poll_at"] <= clock()
    assert worker.run_once(clock()) == 2
    task = sqlite_store.get_task(boom)
    assert task["status"] == "running" and task["error"] is None
    assert task["state"]["failures"] == 1 and task["state"]["last_error"] == "internal: adapter bug"
    assert task["next_poll_at"] == clock() + 1 and task["lease_owner"] is None
    assert sqlite_store.get_task(fine)["status"] == "succeeded"
    # And at its next look it is tried again, the streak counted.
    clock.now = task["next_poll_at"]
    assert worker.run_once(clock()) == 1
    assert sqlite_store.get_task(boom)["state"]["failures"] == 2


def test_the_started_worker_survives_a_provider_raising_in_poll(sqlite_store, files, clock):
    worker, submit = _buggy_rig(sqlite_store, files, clock, tick_s=0.05, sweep_s=3600)
    boom, fine = submit("boom"), submit("fine")

    def wait_for(what, predicate):
        deadline = time.time() + 20
        while time.time() < deadline:
            if predicate():
                return
            time.sleep(0.02)
        raise AssertionError(f"{what}: {[sqlite_store.get_task(i) for i in (boom, fine)]}")

    worker.start()
    try:
        wait_for("both submitted", lambda: all(sqlite_store.get_task(i)["status"] == "running"
                                               for i in (boom, fine)))
        clock.advance(1)
        wait_for("the buggy poll noted", lambda: (sqlite_store.get_task(boom)["state"] or {}).get("failures") == 1)
        wait_for("the other task done", lambda: sqlite_store.get_task(fine)["status"] == "succeeded")
        clock.advance(5)
        wait_for("a later tick", lambda: sqlite_store.get_task(boom)["state"]["failures"] == 2)
        assert worker.alive()
    finally:
        worker.stop()
    assert sqlite_store.get_task(boom)["state"]["last_error"] == "internal: adapter bug"


class _SlowWrites(_Around):
    """The store, with each heartbeat and the sweeper's first read waiting
    `pause` seconds, as they do behind another writer's transaction
    (busy_timeout) or a slow PostgreSQL."""

    def __init__(self, store, pause):
        super().__init__(store)
        self.pause = pause
        self.beats = 0

    def heartbeat(self, *args, **kwargs):
        self.beats += 1
        time.sleep(self.pause)
        return self.store.heartbeat(*args, **kwargs)

    def lease_holders(self, *args, **kwargs):
        time.sleep(self.pause)
        return self.store.lease_holders(*args, **kwargs)


def test_slow_jobs_make_no_scheduler_warnings_and_hold_up_no_other_job(sqlite_store, files, caplog):
    """Heartbeats and sweeps slower than their interval (a write waiting
    for the lock) skip their next turn quietly, and the dispatch tick still
    runs beside them: no "maximum number of running instances" from
    APScheduler, and the queued task is taken by the tick alone."""
    store = _SlowWrites(sqlite_store, pause=0.5)
    worker = Worker(store, build_providers({"demo": {"duration_s": 600}}), files, tick_s=0.1, sweep_s=0.1,
                    lease_s=0.6)
    caplog.set_level(logging.WARNING)
    worker.start()
    try:
        time.sleep(0.8)           # the slow jobs hold their threads
        task_id = _queued(sqlite_store, 1)[0]   # no wake(): only a tick can take it
        deadline = time.time() + 5
        while time.time() < deadline and sqlite_store.get_task(task_id)["status"] != "running":
            time.sleep(0.02)
        time.sleep(1.0)
    finally:
        worker.stop()
    assert sqlite_store.get_task(task_id)["status"] == "running"
    assert store.beats >= 3, store.beats       # it kept beating, once at a time
    assert not [r for r in caplog.records if r.name.startswith("apscheduler")], caplog.text
