"""SQLite group commit: this process's writes share one connection, each in
its own savepoint, and one COMMIT covers the writes that queued meanwhile.
Real threads, a real file, a real process killed with SIGKILL."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from errors import StoreUnavailable
from store import SqliteStore
from support import ROOT


def _count(path, sql, params=()):
    """A count read by another process: only what reached the file."""
    code = ("import sqlite3, sys, json; c = sqlite3.connect(sys.argv[1]); "
            "print(c.execute(sys.argv[2], json.loads(sys.argv[3])).fetchone()[0])")
    import json
    out = subprocess.run([sys.executable, "-c", code, path, sql, json.dumps(list(params))],
                         capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout)


def _submit(store, user_id, i):
    now = time.time()
    return store.submit(user_id, "demo", {"i": i}, now=now, deadline_at=now + 600)[0]["id"]


def _in_threads(n, fn):
    """Run fn(k) in n threads started together; their results and errors."""
    barrier = threading.Barrier(n)
    results, errors = {}, {}

    def run(k):
        barrier.wait(30)
        try:
            results[k] = fn(k)
        except Exception as exc:
            errors[k] = exc
    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive()
    return results, errors


def _writes_durable_on_return(store, path, user_id, per_thread):
    """Each thread checks, right after every submit returns, that another
    connection already sees it; the ids of the submits."""
    def writer(k):
        ids = []
        reader = sqlite3.connect(path, timeout=10)
        try:
            for i in range(per_thread):
                task_id = _submit(store, user_id, k * 1000 + i)
                seen = reader.execute("SELECT COUNT(*) FROM tasks WHERE id = ?", (task_id,)).fetchone()[0]
                assert seen == 1, f"{task_id} returned but is not in the file"
                ids.append(task_id)
        finally:
            reader.close()
        return ids
    return writer


def test_concurrent_writers_are_all_durable_when_their_calls_return(tmp_path):
    path = str(tmp_path / "group.db")
    store = SqliteStore(path)
    try:
        user = store.create_user("alice")[0]
        results, errors = _in_threads(8, _writes_durable_on_return(store, path, user["id"], 60))
        assert errors == {}
        ids = [i for ids in results.values() for i in ids]
        assert len(ids) == len(set(ids)) == 8 * 60
    finally:
        store.close()
    # Counted by another process after the store is closed: 480 tasks, 480
    # `created` events, each once.
    assert _count(path, "SELECT COUNT(*) FROM tasks") == 480
    assert _count(path, "SELECT COUNT(DISTINCT id) FROM tasks") == 480
    assert _count(path, "SELECT COUNT(*) FROM events WHERE type = 'created'") == 480


def test_commits_are_shared_under_concurrency_and_not_when_alone(tmp_path):
    path = str(tmp_path / "group.db")
    store = SqliteStore(path)
    try:
        user = store.create_user("alice")[0]
        before = store.commits
        for i in range(20):
            _submit(store, user["id"], i)
        # Alone, no write waits for a later one: one COMMIT each.
        assert store.commits - before == 20

        before = store.commits
        results, errors = _in_threads(8, lambda k: [_submit(store, user["id"], k * 1000 + i) for i in range(100)])
        assert errors == {}
        commits = store.commits - before
        assert 0 < commits < 800 * 0.8, f"{commits} COMMITs for 800 concurrent writes"
        assert _count(path, "SELECT COUNT(*) FROM tasks") == 820
    finally:
        store.close()


def _table(path, sql):
    con = sqlite3.connect(path)
    con.executescript(sql)
    con.close()


def _raw_write(store, sql, params=()):
    with store._seam(), store._write():
        store._exec(sql, params)


def _wait_for_queued(store, n):
    deadline = time.monotonic() + 30
    while store._queued < n:
        assert time.monotonic() < deadline, "the other writers never queued"
        time.sleep(0.001)


@pytest.mark.parametrize("failing", ["first", "second"])
def test_a_failing_write_rolls_back_alone_and_raises_only_to_its_caller(tmp_path, failing):
    """Three writes in one batch: `first` holds the write until the other
    two queue behind it. The one that fails (the batch's first, which began
    the transaction, or one in a savepoint) takes only its own row away."""
    path = str(tmp_path / "group.db")
    store = SqliteStore(path)
    _table(path, "CREATE TABLE marks (id INTEGER PRIMARY KEY, who TEXT NOT NULL)")
    outcome = {}
    first_in = threading.Event()

    def write(who):
        if who != "first":
            first_in.wait(30)
            if who == "third":
                _wait_for_queued(store, 1)       # behind the second
        try:
            with store._seam(), store._write():
                store._exec("INSERT INTO marks (who) VALUES (?)", (who,))
                if who == "first":
                    first_in.set()
                    _wait_for_queued(store, 2)
                if who == failing:
                    raise ValueError(f"{who} changes its mind")
            outcome[who] = "ok"
        except ValueError as exc:
            outcome[who] = exc
    try:
        before = store.commits
        threads = [threading.Thread(target=write, args=(who,)) for who in ("first", "second", "third")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert str(outcome.pop(failing)) == f"{failing} changes its mind"
        assert outcome == {who: "ok" for who in ("first", "second", "third") if who != failing}
        assert store.commits - before == 1        # one COMMIT for the others
    finally:
        store.close()
    assert _count(path, "SELECT COUNT(*) FROM marks WHERE who != ?", (failing,)) == 2
    assert _count(path, "SELECT COUNT(*) FROM marks WHERE who = ?", (failing,)) == 0


def _batch_of_two(store, second, first_sql="INSERT INTO marks (who) VALUES ('first')"):
    """`first` runs `first_sql` and holds the batch open until
    `second(store)` queues behind it and joins; what each came to."""
    outcome = {}
    first_in = threading.Event()

    def first():
        try:
            with store._seam(), store._write():
                store._exec(first_sql)
                first_in.set()
                _wait_for_queued(store, 1)
            outcome["first"] = "ok"
        except Exception as exc:
            outcome["first"] = exc

    def then():
        first_in.wait(30)
        try:
            second(store)
            outcome["second"] = "ok"
        except Exception as exc:
            outcome["second"] = exc
    threads = [threading.Thread(target=f) for f in (first, then)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    return outcome


@pytest.mark.parametrize("changed", [False, True])
def test_a_write_without_a_savepoint_fails_alone_before_a_change_and_with_its_batch_after(tmp_path, changed):
    """undo=False: no savepoint of its own. Failing before it changed a
    row leaves the batch to commit; failing after, it takes the batch's
    other writes with it, and their callers hear so (never a half write)."""
    path = str(tmp_path / "group.db")
    store = SqliteStore(path)
    _table(path, "CREATE TABLE marks (id INTEGER PRIMARY KEY, who TEXT NOT NULL)")

    def second(store):
        with store._seam(), store._write(undo=False):
            store._one("SELECT COUNT(*) FROM marks")
            if changed:
                store._exec("INSERT INTO marks (who) VALUES ('second')")
            raise ValueError("second changes its mind")
    statements = []
    store.write_connection().set_trace_callback(statements.append)
    try:
        outcome = _batch_of_two(store, second)
        assert str(outcome["second"]) == "second changes its mind"
        assert not any("SAVEPOINT" in s for s in statements), statements
        if changed:
            assert isinstance(outcome["first"], StoreUnavailable), outcome
            assert "rolled back with another write of its batch, which failed: second changes its mind" \
                in str(outcome["first"])
            assert _count(path, "SELECT COUNT(*) FROM marks") == 0
        else:
            assert outcome["first"] == "ok"
            assert _count(path, "SELECT COUNT(*) FROM marks") == 1
        # The connection is usable again: the next write commits.
        _raw_write(store, "INSERT INTO marks (who) VALUES ('later')")
        assert _count(path, "SELECT COUNT(*) FROM marks WHERE who = 'later'") == 1
    finally:
        store.write_connection().set_trace_callback(None)
        store.close()


def test_the_workers_writes_join_a_batch_without_a_savepoint_and_a_submit_with_one(tmp_path):
    """A claim, a step's update, a reschedule, a lease renewal and a submit
    without credits or webhook raise nothing after their first change but
    a database failure: two statements fewer each, when they join a batch.
    A submit with a webhook (or a cost) keeps its savepoint."""
    path = str(tmp_path / "group.db")
    store = SqliteStore(path)
    _table(path, "CREATE TABLE marks (id INTEGER PRIMARY KEY, who TEXT NOT NULL)")
    user = store.create_user("alice")[0]
    _submit(store, user["id"], 0)
    now = time.time()
    held = {}
    joined = {
        "claim": lambda s: held.update(task=s.claim("me", now=now, limit=1, lease_s=60)[0]),
        "update": lambda s: held.update(task=s.update(held["task"]["id"], token=held["task"]["lease_token"],
                                                      now=now, step="submitting")),
        "renew_lease": lambda s: s.renew_lease(held["task"]["id"], token=held["task"]["lease_token"],
                                               expires_at=now + 120),
        "reschedule": lambda s: s.reschedule(held["task"]["id"], token=held["task"]["lease_token"],
                                             next_poll_at=now + 5, polls=1),
        "submit": lambda s: _submit(s, user["id"], 1),
        "submit with a webhook": lambda s: s.submit(user["id"], "demo", {}, now=now, deadline_at=now + 600,
                                                    webhook={"url": "https://example.com/hook"}),
    }
    try:
        for name, write in joined.items():
            statements = []
            store.write_connection().set_trace_callback(statements.append)
            try:
                outcome = _batch_of_two(store, write)
            finally:
                store.write_connection().set_trace_callback(None)
            assert outcome == {"first": "ok", "second": "ok"}, (name, outcome)
            savepoints = [s for s in statements if "SAVEPOINT" in s]
            if name == "submit with a webhook":
                assert savepoints == ["SAVEPOINT holdfast_write", "RELEASE SAVEPOINT holdfast_write"]
            else:
                assert savepoints == [], (name, statements)
            assert statements.count("COMMIT") == 1, (name, statements)
    finally:
        store.close()
    assert _count(path, "SELECT COUNT(*) FROM marks") == 6
    assert _count(path, "SELECT COUNT(*) FROM tasks WHERE next_poll_at > ? AND polls = 1", (now + 4,)) == 1
    assert _count(path, "SELECT COUNT(*) FROM tasks") == 3


def test_a_failed_commit_fails_every_writer_of_its_batch_and_the_next_batch_works(tmp_path):
    path = str(tmp_path / "group.db")
    store = SqliteStore(path)
    # A deferred foreign key is checked only at COMMIT: a child without its
    # parent makes the batch's COMMIT fail after every savepoint succeeded.
    _table(path, "CREATE TABLE parents (id INTEGER PRIMARY KEY);"
                 "CREATE TABLE children (id INTEGER PRIMARY KEY, parent INTEGER NOT NULL "
                 "REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)")
    store.write_connection().execute("PRAGMA foreign_keys = ON")

    def orphan(store):
        with store._seam(), store._write():
            store._exec("INSERT INTO children (id, parent) VALUES (1, 99)")
    try:
        outcome = _batch_of_two(store, orphan, "INSERT INTO parents (id) VALUES (1)")
        for who in ("first", "second"):
            assert isinstance(outcome[who], StoreUnavailable), outcome
            assert "FOREIGN KEY" in str(outcome[who])
        assert _count(path, "SELECT COUNT(*) FROM parents") == 0
        assert _count(path, "SELECT COUNT(*) FROM children") == 0
        # The connection is usable again: the next write commits alone.
        _raw_write(store, "INSERT INTO parents (id) VALUES (2)")
        assert _count(path, "SELECT COUNT(*) FROM parents") == 1
    finally:
        store.close()


_CHILD = textwrap.dedent("""
    import os, signal, sys, threading, time
    sys.path.insert(0, sys.argv[1])
    kill_at = int(sys.argv[3])
    from store import SqliteStore
    store = SqliteStore(sys.argv[2])
    user = store.create_user("alice")[0]
    out = threading.Lock()
    printed = [0]

    def writer(k):
        i = 0
        while True:
            now = time.time()
            task = store.submit(user["id"], "demo", {"k": k, "i": i}, now=now, deadline_at=now + 600)[0]
            with out:
                sys.stdout.write(task["id"] + "\\n")
                sys.stdout.flush()
                printed[0] += 1
                if printed[0] == kill_at:
                    # At once, while the other writers are mid-batch.
                    os.kill(os.getpid(), signal.SIGKILL)
            i += 1

    for k in range(8):
        threading.Thread(target=writer, args=(k,), daemon=True).start()
    time.sleep(600)
""")


@pytest.mark.parametrize("after,by", [(150, "parent"), (600, "parent"), (100, "itself"), (400, "itself")])
def test_kill_9_mid_batch_loses_no_write_whose_call_returned(tmp_path, after, by):
    """The child prints each submit's id once the call returned; it is
    killed by this test, or kills itself right after printing, while its
    other threads are inside a batch."""
    path = str(tmp_path / "group.db")
    kill_at = after if by == "itself" else 0
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(ROOT), path, str(kill_at)],
                             stdout=subprocess.PIPE, text=True)
    returned = []
    try:
        deadline = time.monotonic() + 120
        while len(returned) < after:
            assert time.monotonic() < deadline, "the child stopped writing"
            line = child.stdout.readline()
            if line.endswith("\n"):
                returned.append(line.strip())
            elif child.poll() is not None:
                break
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    # What the child printed after our last read also returned before the kill.
    returned += [line.strip() for line in child.stdout.read().split("\n")[:-1]]
    child.stdout.close()
    con = sqlite3.connect(path)
    try:
        present = {row[0] for row in con.execute("SELECT id FROM tasks")}
        created = con.execute("SELECT COUNT(*), COUNT(DISTINCT task_id) FROM events "
                              "WHERE type = 'created'").fetchone()
    finally:
        con.close()
    missing = set(returned) - present
    assert len(returned) >= after and not missing, f"{len(missing)} returned writes lost"
    # Nothing twice; each task has its one `created` event.
    assert created[0] == created[1] == len(present)


def test_closing_the_store_commits_a_batch_its_writers_wait_for(tmp_path):
    """A batch left open for a queued writer, and close() takes the lock
    first: the waiting write still commits and its call returns."""
    path = str(tmp_path / "group.db")
    store = SqliteStore(path)
    _table(path, "CREATE TABLE marks (id INTEGER PRIMARY KEY, who TEXT NOT NULL)")
    outcome = {}
    store._queued += 1        # a writer about to join, as _leave sees it

    def write():
        try:
            _raw_write(store, "INSERT INTO marks (who) VALUES ('waiting')")
            outcome["write"] = "ok"
        except StoreUnavailable as exc:
            outcome["write"] = exc
    writer = threading.Thread(target=write)
    writer.start()
    deadline = time.monotonic() + 30
    while store._batch is None or store._batch.writes < 1 or store._writer.locked():
        assert time.monotonic() < deadline
        time.sleep(0.001)
    store._queued -= 1
    store.close()
    writer.join(10)
    assert not writer.is_alive() and outcome == {"write": "ok"}
    assert _count(path, "SELECT COUNT(*) FROM marks WHERE who = 'waiting'") == 1


def test_the_wal_is_checkpointed_by_the_stores_own_thread_and_not_in_a_commit(tmp_path):
    # SQLite's default checkpoints in the COMMIT that passes 1,000 pages:
    # an fsync or two while that writer holds the write lock.
    from store.sqlite import FALLBACK_CHECKPOINT_PAGES
    path = str(tmp_path / "holdfast.db")
    store = SqliteStore(path)
    try:
        user = store.create_user("alice")[0]
        conn = store.write_connection()
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == FALLBACK_CHECKPOINT_PAGES
        size = os.path.getsize(path)
        for i in range(400):     # about 1,500 pages of WAL
            store.submit(user["id"], "demo", {"prompt": "x" * 3000, "i": i}, now=1.0 + i, deadline_at=1e9)
        deadline = time.monotonic() + 10
        while store.checkpoints == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.checkpoints > 0
        assert store._checkpointer.name == "holdfast-checkpoint" and store._checkpointer.is_alive()
        # The pages reached the database file itself, not only the WAL.
        assert os.path.getsize(path) > size + 400 * 3000
        assert _count(path, "SELECT COUNT(*) FROM tasks") == 400
        thread = store._checkpointer
    finally:
        store.close()
    assert not thread.is_alive()
