"""Tasks waiting for a provider's slot park: a refused task is not looked
at again while every slot stays taken, and a slot given back, by this
worker or by anything else, goes to the first in line within a tick. On a
real worker with its threads against the fake KIE; the line itself
(store.wake_line) on every backend."""

import threading
import time

import pytest

from providers import build_providers
from store import SLOT_STEP, SLOT_WAIT_STEP, TERMINAL
from support import wait_for
from tests.fakes.kie import FakeKIE
from worker import Worker
from worker.steps import PARKED_S

KEY_ENV = {"KIE_TEST_KEY": "test-key"}


def kie_providers(kie, **extra):
    conf = {"type": "kie", "url": kie.url, "api_key_env": "KIE_TEST_KEY", "timeout_s": 2,
            "poll_interval_s": 0.05, "max_poll_interval_s": 0.1, "concurrency": 1, **extra}
    return build_providers({"kie": conf}, env=KEY_ENV)


def submit(store, user, n, *, at=None):
    ids = []
    for i in range(n):
        now = time.time() if at is None else at + i * 0.001
        ids.append(store.submit(user["id"], "kie", {"model": "m", "input": {"i": i}}, now=now,
                                deadline_at=now + 600)[0]["id"])
    return ids


class Looks:
    """Counts the worker's looks at the slots: take_slot calls, and those
    refused. The real store decides every one."""

    def __init__(self, store):
        self.asked = self.refused = 0
        self.log = []     # (task id, taken), in order
        self._lock = threading.Lock()
        self._take_slot = store.take_slot
        store.take_slot = self

    def __call__(self, *args, **kwargs):
        held = self._take_slot(*args, **kwargs)
        with self._lock:
            self.asked += 1
            self.refused += held is None
            self.log.append((args[0], held is not None))
        return held


def parked(store, ids):
    tasks = [store.get_task(i) for i in ids]
    return all(t["status"] == "queued" and t["step"] == SLOT_WAIT_STEP for t in tasks) and tasks


def behind_one(store, n):
    """With a worker started: one task in the provider's one slot, then `n`
    parked behind it. (user, the first's id, the waiting ids)."""
    user = store.create_user("busy")[0]
    first, = submit(store, user, 1)
    wait_for(lambda: store.get_task(first)["status"] == "running", 10, "the first job")
    waiting = submit(store, user, n)
    wait_for(lambda: parked(store, waiting), 10, f"the {n} to park")
    return user, first, waiting


def test_tasks_behind_a_busy_slot_are_not_looked_at_again_until_it_frees(sqlite_store, files):
    """One slot, one long job in it, 40 waiting, polls every 0.05 s: each
    waiting task is refused once and then left alone. Looking again every
    poll interval, the worker asked 40 x 20 times a second."""
    with FakeKIE(job_seconds=60) as kie:
        worker = Worker(sqlite_store, kie_providers(kie), files, threads=4, tick_s=0.05)
        looks = Looks(sqlite_store)
        worker.start()
        try:
            _, _, waiting = behind_one(sqlite_store, 40)
            refused_then = looks.refused
            time.sleep(2.0)
            refused = looks.refused - refused_then
            tasks = parked(sqlite_store, waiting)
        finally:
            worker.stop()
    assert refused_then == 40, "each waiting task refused once"
    assert refused == 0, f"{refused} more looks at a slot still taken in 2 s"
    assert tasks, "all 40 still parked"
    assert all(t["next_poll_at"] >= time.time() + PARKED_S - 10 for t in tasks)
    assert len(kie.created) == 1 and kie.max_concurrent_seen == 1


@pytest.mark.parametrize("free_it", ["the worker's own poll ends it", "a cancel ends it"])
def test_a_slot_given_back_goes_to_the_first_in_line_within_a_tick(sqlite_store, files, free_it):
    """The slot frees through the worker's step (it told the line at once)
    or through a cancel from the API (the `slots` tick finds it): the
    oldest waiting task starts then, not after PARKED_S, and only it."""
    job_s = 2.0 if free_it == "the worker's own poll ends it" else 60
    with FakeKIE(job_seconds=job_s) as kie:
        worker = Worker(sqlite_store, kie_providers(kie), files, threads=4, tick_s=0.1)
        looks = Looks(sqlite_store)
        worker.start()
        try:
            user, first, waiting = behind_one(sqlite_store, 5)
            if free_it == "a cancel ends it":
                sqlite_store.cancel(first, user["id"], now=time.time())
            freed_at = time.time() if free_it == "a cancel ends it" else None
            nxt = wait_for(lambda: (t := sqlite_store.get_task(waiting[0]))["status"] == "running" and t,
                           PARKED_S / 4, "the first in line to start")
            ended = sqlite_store.get_task(first)
            rest = [sqlite_store.get_task(i) for i in waiting[1:]]
        finally:
            worker.stop()
    assert ended["status"] in TERMINAL
    freed_at = freed_at or ended["finished_at"]
    assert nxt["started_at"] - freed_at < 5.0, f"started {nxt['started_at'] - freed_at:.2f} s after the slot freed"
    assert all(t["status"] == "queued" and t["step"] == SLOT_WAIT_STEP for t in rest)
    assert len(kie.created) == 2
    if free_it == "the worker's own poll ends it":
        assert kie.max_concurrent_seen == 1
    # The five parked once each, and the one that started asked once more.
    assert looks.refused == 5 and looks.asked == 1 + 5 + 1, [(([first] + waiting).index(i), taken)
                                                             for i, taken in looks.log]


def test_tasks_parked_for_a_provider_with_no_limit_now_start_at_once(sqlite_store, files, clock):
    """Parked under a limit that a restart took away: the first look wakes
    them, not PARKED_S later."""
    with FakeKIE(job_seconds=0.05) as kie:
        user = sqlite_store.create_user("busy")[0]
        ids = submit(sqlite_store, user, 3, at=clock())
        held = sqlite_store.claim("gone", now=clock(), limit=3, lease_s=60)
        for task in held:
            sqlite_store.update(task["id"], token=task["lease_token"], now=clock(), release=True, seen=task,
                                step=SLOT_WAIT_STEP, next_poll_at=clock() + PARKED_S)
        worker = Worker(sqlite_store, kie_providers(kie, concurrency=None), files, clock=clock)
        assert worker.run_once() == 3
    assert len(kie.created) == 3
    assert all(sqlite_store.get_task(i)["status"] == "running" for i in ids)


# -- the line, on every backend ----------------------------------------------

def park(store, ids, now):
    """Claim `ids` and park them as a refused look does."""
    held = {t["id"]: t for t in store.claim("w", now=now, limit=len(ids), lease_s=60)}
    for i in ids:
        store.update(i, token=held[i]["lease_token"], now=now, release=True, seen=held[i],
                     step=SLOT_WAIT_STEP, next_poll_at=now + PARKED_S)


def hold_slot(store, task_id, now):
    task, = store.claim("w", now=now, limit=1, lease_s=60)
    assert task["id"] == task_id
    return store.take_slot(task_id, token=task["lease_token"], now=now, limit=None, step=SLOT_STEP)


def test_wake_line_wakes_as_many_as_are_free_in_turn_and_nothing_while_full(store):
    now = time.time()
    alice, bob = store.create_user("alice")[0], store.create_user("bob")[0]
    a = [store.submit(alice["id"], "p", {}, now=now + i * 0.01, deadline_at=now + 600)[0]["id"] for i in range(4)]
    b = [store.submit(bob["id"], "p", {}, now=now + 1 + i * 0.01, deadline_at=now + 600)[0]["id"] for i in range(2)]
    holding = hold_slot(store, a[0], now + 2)
    park(store, a[1:] + b, now + 2)
    due = lambda: {i for i in a + b if store.get_task(i)["next_poll_at"] <= now + 3}  # noqa: E731

    assert store.wake_line("p", limit=1, now=now + 3) == 0, "the one slot is alice's"
    assert due() - {a[0]} == set()
    # Two slots, one free: bob holds none, so his oldest is first in line.
    assert store.wake_line("p", limit=2, now=now + 3) == 1
    assert due() - {a[0]} == {b[0]}
    assert store.wake_line("p", limit=2, now=now + 3) == 0, "woken already"
    # Four slots, three free: bob's other, then alice's oldest waiting.
    assert store.wake_line("p", limit=4, now=now + 3) == 2
    assert due() - {a[0]} == {b[0], b[1], a[1]}
    assert holding["step"] == SLOT_STEP
    # No limit: every parked task of the provider.
    assert store.wake_line("p", limit=None, now=now + 3) == 2
    assert due() - {a[0]} == {*a[1:], *b}
    assert store.wake_line("q", limit=None, now=now + 3) == 0


def test_wake_line_passes_over_a_row_another_writer_holds(pg_schema):
    """A parked row locked by another transaction (a take_slot in flight)
    is passed over, not waited for; the next look wakes it."""
    import psycopg

    from store import PostgresStore
    store = PostgresStore(pg_schema.url)
    try:
        now = time.time()
        user = store.create_user("alice")[0]
        task_id = store.submit(user["id"], "p", {}, now=now, deadline_at=now + 600)[0]["id"]
        park(store, [task_id], now + 1)
        with psycopg.connect(pg_schema.url, autocommit=False, connect_timeout=5) as other:
            other.execute("SELECT id FROM tasks WHERE id = %s FOR UPDATE", (task_id,))
            started = time.monotonic()
            woken = store.wake_line("p", limit=1, now=now + 2)
            took = time.monotonic() - started
            other.rollback()
        assert woken == 0 and took < 5.0, (woken, took)
        assert store.wake_line("p", limit=1, now=now + 2) == 1
        assert store.get_task(task_id)["next_poll_at"] == pytest.approx(now + 2)
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_wake_line_reads_the_slots_and_the_line_in_one_snapshot(backend, tmp_path, request):
    """A task first in line takes the free slot between the look's count of
    slots and its read of the line: the look wakes nobody. Read statement by
    statement, it counted the slot free and then found the next task first
    in line, and woke it for a slot already taken."""
    from store import PostgresStore, SqliteStore
    if backend == "postgresql":
        opened = PostgresStore(request.getfixturevalue("pg_schema").url)
    else:
        opened = SqliteStore(str(tmp_path / "holdfast.db"))

    class TakenMeanwhile(type(opened)):
        def _turns(self, provider, held, free):
            # Another thread's take_slot commits here, between the reads
            # (once: that take_slot reads the line too).
            if threading.current_thread() is threading.main_thread():
                taker = threading.Thread(target=take_first)
                taker.start()
                taker.join(10)
            return super()._turns(provider, held, free)

    opened.__class__ = TakenMeanwhile
    store = opened
    try:
        now = time.time()
        user = store.create_user("alice")[0]
        ids = [store.submit(user["id"], "p", {}, now=now + i * 0.01, deadline_at=now + 600)[0]["id"]
               for i in range(3)]
        park(store, ids, now + 1)
        took = []

        def take_first():
            try:
                task = next(t for t in store.claim("w", now=now + 2 + PARKED_S, limit=3, lease_s=60)
                            if t["id"] == ids[0])
                took.append(store.take_slot(task["id"], token=task["lease_token"], now=now + 2, limit=1,
                                            step=SLOT_STEP))
            except Exception as exc:
                took.append(exc)

        woken = store.wake_line("p", limit=1, now=now + 2)
        assert took and not isinstance(took[0], Exception) and took[0]["id"] == ids[0], took
        assert woken == 0
        assert [store.get_task(i)["next_poll_at"] for i in ids[1:]] == [now + 1 + PARKED_S] * 2
    finally:
        store.close()
