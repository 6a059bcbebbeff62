"""The store contract: every backend passes these through the `store` fixture."""

import collections
import hashlib
import json
import os
import threading
import time

import peewee
import pytest

from errors import (Conflict, HoldfastError, InvalidInput, NotFound, PaymentRequired, StaleLease,
                    StoreUnavailable, TooMany)
from store import (MAX_SESSION_MESSAGES, TRANSITIONS, TERMINAL, JsonStore, PostgresStore, SqliteStore,
                   dead_owners, lease_dir, process_identity, task_json)


def submit(store, user_id, now, **kw):
    kw.setdefault("deadline_at", now + 3600)
    return store.submit(user_id, "demo", kw.pop("params", {"prompt": "x"}), now=now, **kw)


@pytest.fixture
def alice(store):
    return store.create_user("alice")[0]


def row(store, task_id):
    """Everything about a task, lease and schedule included."""
    return store.get_task(task_id)


def stored_bytes(store):
    """Everything the store has written where it keeps its data: the
    database file and its WAL, the JSON snapshot and journal, or (on a
    server) every row of every table."""
    paths = []
    if isinstance(store, JsonStore):
        paths = [store.snapshot_path, store.journal_path]
    elif isinstance(store, SqliteStore):
        paths = [store.path, store.path + "-wal"]
    if not paths:
        return repr(store.export_rows()).encode()
    out = b""
    for path in paths:
        if os.path.exists(path):
            with open(path, "rb") as fh:
                out += fh.read()
    return out


class TestUsers:
    def test_token_is_stored_hashed_and_finds_its_user(self, store):
        user, token = store.create_user("carol", credits=5)
        assert store.user_by_token(token)["id"] == user["id"]
        assert store.user_by_token(token + "x") is None
        assert user["credit_balance"] == 5
        assert token not in repr(store.user_by_name("carol"))
        with store._seam():
            stored = store._one("SELECT token_hash FROM users WHERE name = ?", ("carol",))[0]
        assert stored == hashlib.sha256(token.encode()).hexdigest()
        written = stored_bytes(store)
        assert stored.encode() in written, "looked where the store keeps its rows"
        assert token.encode() not in written

    def test_duplicate_name_is_a_conflict(self, store):
        store.create_user("dave")
        with pytest.raises(Conflict):
            store.create_user("dave")


class TestSubmit:
    def test_submit_creates_a_queued_task_with_an_event(self, store, alice):
        task, dedup = submit(store, alice["id"], 100.0)
        assert not dedup
        got = store.get_task(task["id"], alice["id"])
        assert got["status"] == "queued" and got["version"] == 1 and got["next_poll_at"] == 100.0
        events = store.events_since(alice["id"], 0)
        assert len(events) == 1 and '"type":"created"' in events[0][1]

    def test_same_dedupe_key_returns_the_live_task(self, store, alice):
        first, _ = submit(store, alice["id"], 1.0, dedupe_key="order-1")
        again, dedup = submit(store, alice["id"], 2.0, dedupe_key="order-1")
        assert dedup and again["id"] == first["id"]
        assert store.list_tasks(alice["id"])[0] == [store.get_task(first["id"])]

    def test_dedupe_key_is_per_user(self, store, alice):
        bob = store.create_user("bob")[0]
        a, _ = submit(store, alice["id"], 1.0, dedupe_key="k")
        b, dedup = submit(store, bob["id"], 1.0, dedupe_key="k")
        assert not dedup and a["id"] != b["id"]

    @pytest.mark.parametrize("ending", ["failed", "cancelled"])
    def test_a_failed_or_cancelled_task_frees_its_key(self, store, alice, ending):
        first, _ = submit(store, alice["id"], 1.0, dedupe_key="k")
        if ending == "cancelled":
            store.cancel(first["id"], alice["id"], now=2.0)
        else:
            store.update(first["id"], token=None, now=2.0, status="failed",
                         error={"code": "internal", "message": "x"})
        second, dedup = submit(store, alice["id"], 3.0, dedupe_key="k")
        assert not dedup and second["id"] != first["id"]

    def test_a_succeeded_task_keeps_its_key(self, store, alice):
        first, _ = submit(store, alice["id"], 1.0, dedupe_key="k")
        store.update(first["id"], token=None, now=2.0, status="running")
        store.update(first["id"], token=None, now=2.0, status="succeeded")
        again, dedup = submit(store, alice["id"], 3.0, dedupe_key="k")
        assert dedup and again["id"] == first["id"]

    def test_max_active_refuses_and_creates_nothing(self, store, alice):
        submit(store, alice["id"], 1.0, max_active=1)
        with pytest.raises(TooMany):
            submit(store, alice["id"], 1.0, max_active=1)
        assert len(store.list_tasks(alice["id"])[0]) == 1

    def test_credits_are_reserved_and_refused_when_short(self, store):
        user = store.create_user("payer", credits=3)[0]
        task, _ = submit(store, user["id"], 1.0, cost=2)
        assert task["credits"] == "reserved"
        assert store.user_by_name("payer")["credit_balance"] == 1
        with pytest.raises(PaymentRequired):
            submit(store, user["id"], 1.0, cost=2)
        assert store.user_by_name("payer")["credit_balance"] == 1
        assert len(store.list_tasks(user["id"])[0]) == 1


class TestDriverErrors:
    """A value the database refuses, or a connection that died, is one of
    holdfast's errors (a 4xx or a 503), never a driver's (a 500)."""

    def test_an_unpaired_surrogate_is_invalid_input_and_writes_nothing(self, store, alice):
        before = (store.export_rows(), store.last_seq())
        with pytest.raises(InvalidInput) as err:
            submit(store, alice["id"], 1.0, params={"prompt": "a\ud800b"})
        assert "surrogate" in err.value.message
        with pytest.raises(InvalidInput):
            store.put_session(alice["id"], "k", messages=[{"role": "user", "content": "\udc00"}], data=None,
                              now=1.0, ttl_s=60.0)
        assert (store.export_rows(), store.last_seq()) == before

    @pytest.mark.parametrize("raised,expected", [(peewee.InterfaceError("connection already closed"), StoreUnavailable),
                                                 (peewee.DataError("value out of range"), InvalidInput)])
    def test_the_seam_translates_driver_errors(self, store, raised, expected):
        with pytest.raises(expected):
            with store._seam():
                raise raised


class TestPostgres:
    """What only PostgreSQL does: text that refuses NUL, and writers that
    run side by side."""

    @pytest.fixture
    def pg(self, pg_schema):
        s = PostgresStore(pg_schema.url)
        yield s
        s.close()

    def test_a_nul_in_a_stored_string_is_invalid_input(self, pg):
        user = pg.create_user("alice")[0]
        before = (pg.export_rows(), pg.last_seq())
        with pytest.raises(InvalidInput) as err:
            submit(pg, user["id"], 1.0, dedupe_key="a\x00b")
        assert "NUL" in err.value.message
        with pytest.raises(InvalidInput):
            pg.user_by_name("al\x00ice")
        assert (pg.export_rows(), pg.last_seq()) == before
        assert pg.count_users() == 1      # the pool's connection still works

    def test_a_grant_committing_between_a_submits_read_and_its_reserve_leaves_no_negative_balance(
            self, pg, pg_schema):
        import psycopg
        cost = 5
        user = pg.create_user("payer", credits=cost)[0]
        watcher = pg_schema.admin

        def blocked_by(pids):
            """The pid of a backend waiting on a lock one of `pids` holds."""
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                row = watcher.execute("SELECT pid FROM pg_stat_activity WHERE pid <> ALL(%s::int[]) "
                                      "AND pg_blocking_pids(pid) && %s::int[]", (pids, pids)).fetchone()
                if row:
                    return row[0]
                time.sleep(0.01)
            raise AssertionError(f"nobody waited on {pids}")

        results, threads = {}, []

        def run(name, fn):
            try:
                fn()
                results[name] = "ok"
            except HoldfastError as exc:
                results[name] = exc.code

        # A third connection holds the user's row, so both writers queue on
        # it in a known order: the grant first, then the submit, which has
        # already read the balance (a plain read waits for nobody).
        holder = psycopg.connect(pg_schema.url)
        try:
            holder.execute("SELECT 1 FROM users WHERE id = %s FOR UPDATE", (user["id"],))
            held = [holder.info.backend_pid]
            for name, fn in (("grant", lambda: pg.grant(user["id"], -cost, now=2.0)),
                             ("submit", lambda: submit(pg, user["id"], 3.0, cost=cost))):
                threads.append(threading.Thread(target=run, args=(name, fn)))
                threads[-1].start()
                held.append(blocked_by(held))
            holder.rollback()
            for t in threads:
                t.join(30)
        finally:
            holder.close()
        assert results == {"grant": "ok", "submit": "insufficient_credits"}
        assert pg.user_by_name("payer")["credit_balance"] == 0
        assert pg.list_tasks(user["id"])[0] == [] and pg.reserved_credits(user["id"]) == 0


class TestReads:
    def test_another_users_task_is_not_found(self, store, alice):
        bob = store.create_user("bob")[0]
        task, _ = submit(store, alice["id"], 1.0)
        with pytest.raises(NotFound):
            store.get_task(task["id"], bob["id"])
        with pytest.raises(NotFound):
            store.cancel(task["id"], bob["id"], now=2.0)
        assert store.get_task(task["id"])["status"] == "queued"

    def test_list_is_newest_first_with_a_cursor_and_status_filter(self, store, alice):
        ids = [submit(store, alice["id"], 1000.0 + i)[0]["id"] for i in range(5)]
        page, cursor = store.list_tasks(alice["id"], limit=2)
        assert [t["id"] for t in page] == ids[::-1][:2]
        page2, _ = store.list_tasks(alice["id"], limit=10, before=cursor)
        assert [t["id"] for t in page2] == ids[::-1][2:]
        store.cancel(ids[0], alice["id"], now=2000.0)
        cancelled, _ = store.list_tasks(alice["id"], statuses=["cancelled"])
        assert [t["id"] for t in cancelled] == [ids[0]]


    def test_list_finds_the_retries_of_a_task_and_only_the_users_own(self, store, alice):
        bob = store.create_user("bob")[0]
        first, _ = submit(store, alice["id"], 1000.0)
        store.cancel(first["id"], alice["id"], now=1001.0)
        retry, _ = submit(store, alice["id"], 1002.0, retry_of=first["id"])
        store.cancel(retry["id"], alice["id"], now=1003.0)
        again, _ = submit(store, alice["id"], 1004.0, retry_of=first["id"])
        submit(store, alice["id"], 1005.0)
        found, cursor = store.list_tasks(alice["id"], retry_of=first["id"])
        assert [t["id"] for t in found] == [again["id"], retry["id"]] and cursor is None
        assert store.list_tasks(alice["id"], retry_of=retry["id"]) == ([], None)
        assert store.list_tasks(bob["id"], retry_of=first["id"]) == ([], None)
        assert [t["id"] for t in store.list_tasks(alice["id"], retry_of=first["id"], statuses=["queued"])[0]] \
            == [again["id"]]


class TestTimeline:
    def test_a_tasks_events_oldest_first_as_each_left_it(self, store, alice):
        task, _ = submit(store, alice["id"], 1.0)
        other, _ = submit(store, alice["id"], 1.5)
        store.update(task["id"], token=None, now=2.0, status="running", step="a", progress=0.25)
        store.update(other["id"], token=None, now=2.5, status="running")
        store.update(task["id"], token=None, now=3.0, status="failed", step="failed",
                     error={"code": "provider_rejected", "message": "no"})
        events, truncated = store.task_timeline(alice["id"], task["id"])
        assert truncated is False
        assert [(e["type"], e["at"], e["task"]["status"], e["task"]["step"]) for e in events] == [
            ("created", 1.0, "queued", None), ("updated", 2.0, "running", "a"),
            ("finished", 3.0, "failed", "failed")]
        assert [e["seq"] for e in events] == [s for s, _ in store.task_events(task["id"])]
        assert events[1]["task"]["progress"] == 0.25 and events[2]["task"]["error"]["code"] == "provider_rejected"
        assert events[2]["task"]["version"] == 3

    def test_only_the_newest_are_kept_and_another_users_task_has_none(self, store, alice):
        bob = store.create_user("bob")[0]
        task, _ = submit(store, alice["id"], 1.0)
        store.update(task["id"], token=None, now=2.0, status="running")
        for i in range(5):
            store.update(task["id"], token=None, now=3.0 + i, progress=i / 10)
        events, truncated = store.task_timeline(alice["id"], task["id"], limit=3)
        assert truncated is True
        assert [e["task"]["progress"] for e in events] == [0.2, 0.3, 0.4]
        assert store.task_timeline(alice["id"], task["id"], limit=7) == (
            store.task_timeline(alice["id"], task["id"])[0], False)
        assert store.task_timeline(bob["id"], task["id"]) == ([], False)


    def test_on_sqlite_a_timeline_and_the_retries_of_a_task_are_read_by_index(self, sqlite_store):
        user = sqlite_store.create_user("carol")[0]
        task, _ = submit(sqlite_store, user["id"], 1.0)
        statements = []
        conn = sqlite_store.db.connection()
        conn.set_trace_callback(statements.append)
        try:
            sqlite_store.task_timeline(user["id"], task["id"])
            sqlite_store.list_tasks(user["id"], retry_of=task["id"])
        finally:
            conn.set_trace_callback(None)
        [events] = [q for q in statements if "FROM events" in q]
        [retries] = [q for q in statements if "retry_of = " in q]
        for sql, index in ((events, "events_task"), (retries, "tasks_retry_of")):
            plan = " ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql))
            assert f"USING INDEX {index}" in plan and "SCAN" not in plan, plan


class TestTransitions:
    @pytest.mark.parametrize("old,new", [(o, n) for o in TRANSITIONS for n in TRANSITIONS
                                         if n not in TRANSITIONS[o] and o not in TERMINAL])
    def test_an_illegal_transition_is_refused(self, store, alice, old, new):
        task, _ = submit(store, alice["id"], 1.0)
        if old != "queued":
            store.update(task["id"], token=None, now=2.0, status=old)
        assert new not in TRANSITIONS[old]
        before = row(store, task["id"])
        with pytest.raises(Conflict):
            store.update(task["id"], token=None, now=3.0, status=new)
        assert row(store, task["id"]) == before

    @pytest.mark.parametrize("end", sorted(TERMINAL))
    def test_a_terminal_task_never_changes_again(self, store, alice, end):
        task, _ = submit(store, alice["id"], 1.0)
        store.update(task["id"], token=None, now=2.0, status="running")
        done = store.update(task["id"], token=None, now=3.0, status=end,
                            error={"code": "internal", "message": "x"} if end == "failed" else None)
        for new in ("running", "queued", "succeeded", end):
            with pytest.raises(Conflict):
                store.update(task["id"], token=None, now=4.0, status=new)
        with pytest.raises(Conflict):
            store.cancel(task["id"], alice["id"], now=4.0)
        assert row(store, task["id"]) == done

    def test_every_change_bumps_version_and_writes_one_event(self, store, alice):
        task, _ = submit(store, alice["id"], 1.0)
        store.update(task["id"], token=None, now=2.0, status="running", step="a", progress=0.1)
        store.update(task["id"], token=None, now=3.0, step="b", progress=0.5)
        done = store.update(task["id"], token=None, now=4.0, status="succeeded")
        assert done["version"] == 4
        assert [t for _, t in store.task_events(task["id"])] == ["created", "updated", "updated", "finished"]
        assert task_json(done)["finished_at"] is not None
        assert done["started_at"] == 2.0


class TestLeases:
    def test_claim_takes_due_tasks_once_with_a_growing_token(self, store, alice):
        task, _ = submit(store, alice["id"], 10.0)
        assert store.claim("w1", now=9.0, limit=10, lease_s=30) == []      # not due yet
        first = store.claim("w1", now=10.0, limit=10, lease_s=30)
        assert [t["id"] for t in first] == [task["id"]]
        assert store.claim("w2", now=11.0, limit=10, lease_s=30) == []     # leased
        second = store.claim("w2", now=41.0, limit=10, lease_s=30)         # lease expired
        assert second[0]["lease_token"] > first[0]["lease_token"]
        assert second[0]["lease_owner"] == "w2"

    def test_a_claim_takes_the_longest_due_first_and_fresh_first_the_youngest(self, store, alice):
        def running(submitted, started, next_poll_at):
            task, _ = submit(store, alice["id"], submitted)
            store.update(task["id"], token=None, now=started, status="running", next_poll_at=next_poll_at)
            return task["id"]
        old = running(0.0, 0.0, 5.0)            # due since 5, running for 100 s at now=100
        middle = running(30.0, 30.0, 50.0)
        young = running(60.0, 60.0, 62.0)
        running(1.0, 1.0, 200.0)                # not due
        first = submit(store, alice["id"], 10.0)[0]["id"]
        second = submit(store, alice["id"], 20.0)[0]["id"]
        # The longest due first, whatever the status.
        claimed = store.claim("w1", now=100.0, limit=5, lease_s=1)
        assert [t["id"] for t in claimed] == [old, first, second, middle, young]
        # Fresh first: a running task's turn is next_poll_at plus its age
        # (at now=102: young 104, old 107, middle 122); the queued go first.
        assert [t["id"] for t in store.claim("w2", now=102.0, limit=2, lease_s=1, fresh_first=True)] == [
            first, second]
        assert [t["id"] for t in store.claim("w2", now=102.0, limit=2, lease_s=1, fresh_first=True)] == [
            young, old]
        assert [t["id"] for t in store.claim("w3", now=104.0, limit=9, lease_s=1, fresh_first=True)] == [
            first, second, young, old, middle]

    def test_a_claim_leases_its_tasks_in_one_statement_with_each_its_own_token(self, store, alice):
        tasks = [submit(store, alice["id"], 1.0 + i / 10)[0] for i in range(3)]
        # Different tokens to start from: each task's own is raised by one.
        store.claim("w0", now=1.0, limit=1, lease_s=-1)
        store.claim("w0", now=1.1, limit=2, lease_s=-1)
        before = {t["id"]: store.get_task(t["id"])["lease_token"] for t in tasks}
        assert [before[t["id"]] for t in tasks] == [2, 1, 0]
        statements = []
        conn = store.write_connection() if hasattr(store, "write_connection") else None
        if conn is not None:
            conn.set_trace_callback(statements.append)
        try:
            claimed = store.claim("w1", now=2.0, limit=5, lease_s=30)
        finally:
            if conn is not None:
                conn.set_trace_callback(None)
        assert sorted(t["id"] for t in claimed) == sorted(before)
        for task in claimed:
            row = store.get_task(task["id"])
            assert task["lease_token"] == row["lease_token"] == before[task["id"]] + 1
            assert (task["lease_owner"], task["lease_expires_at"]) == (row["lease_owner"], row["lease_expires_at"]) == (
                "w1", 32.0)
        if conn is not None:
            assert len([q for q in statements if q.startswith("UPDATE")]) == 1, statements

    def test_a_write_that_lets_a_lease_go_claims_the_next_task_when_asked(self, store, alice):
        """claim_on_release(): a worker thread's next task is leased by the
        write that ends its step (an update with release, a task's end, a
        reschedule), in that write's transaction; once, and not by a write
        that keeps its lease or is refused."""
        a, b, c = (submit(store, alice["id"], 1.0 + i)[0] for i in range(3))
        held = store.claim("w1", now=1.0, limit=1, lease_s=30)[0]
        assert held["id"] == a["id"]

        def clock():
            return 10.0
        store.claim_on_release("w1", lease_s=30, clock=clock)
        store.update(a["id"], token=held["lease_token"], now=2.0, step="working")
        with pytest.raises(StaleLease):
            store.update(a["id"], token=held["lease_token"] + 5, now=2.0, release=True, status="running")
        assert store.claimed_on_release() is None
        assert store.get_task(b["id"])["lease_owner"] is None

        store.claim_on_release("w1", lease_s=30, clock=clock)
        commits = getattr(store, "commits", None)
        store.update(a["id"], token=held["lease_token"], now=3.0, release=True, status="running", next_poll_at=50.0)
        if commits is not None:
            assert store.commits == commits + 1          # one transaction for both
        (got,) = store.claimed_on_release()
        row = store.get_task(b["id"])
        assert got["id"] == b["id"] and got["lease_token"] == row["lease_token"] == 1
        assert (row["lease_owner"], row["lease_expires_at"]) == (got["lease_owner"], got["lease_expires_at"]) == (
            "w1", 40.0)
        assert store.get_task(a["id"])["lease_owner"] is None
        assert store.claimed_on_release() is None        # once

        store.claim_on_release("w1", lease_s=30, clock=clock)
        store.reschedule(b["id"], token=got["lease_token"], next_poll_at=60.0, polls=1)
        (third,) = store.claimed_on_release()
        assert third["id"] == c["id"] and store.get_task(c["id"])["lease_owner"] == "w1"
        # Nothing else due at 10 (a at 50, b at 60): the write takes nothing.
        store.claim_on_release("w1", lease_s=30, clock=clock)
        store.update(c["id"], token=third["lease_token"], now=4.0, release=True, status="running",
                     next_poll_at=70.0)
        assert store.claimed_on_release() == []
        assert [store.get_task(t["id"])["lease_owner"] for t in (a, b, c)] == [None, None, None]

    def test_on_sqlite_a_fresh_first_claim_reads_indexes_in_order_and_sorts_nothing(self, sqlite_store):
        # Its order is computed: in one statement it read and sorted every
        # due task, so a worker slowed down by a backlog paid for all of it
        # at every claim (bench/claim_bench.py).
        user = sqlite_store.create_user("carol")[0]
        for i in range(3):
            task, _ = submit(sqlite_store, user["id"], float(i))
            sqlite_store.update(task["id"], token=None, now=float(i), status="running", next_poll_at=float(i))
            submit(sqlite_store, user["id"], float(i))
        statements = []
        conn = sqlite_store.write_connection()
        conn.set_trace_callback(statements.append)
        try:
            for limit in (2, 9):      # the queued fill the claim, or they do not
                claimed = sqlite_store.claim("w", now=9.0, limit=limit, lease_s=-1, fresh_first=True)
                assert len(claimed) == min(limit, 6)
        finally:
            conn.set_trace_callback(None)
        selects = [q for q in statements if q.startswith("SELECT")]
        assert len(selects) == 4, selects       # the queued, then the running
        reader = sqlite_store.db.connection()
        for sql in selects:
            plan = " ".join(r[3] for r in reader.execute("EXPLAIN QUERY PLAN " + sql))
            index = "tasks_fresh" if "COALESCE(started_at" in sql else "tasks_status_next_poll_at"
            assert f"USING INDEX {index}" in plan and "TEMP B-TREE" not in plan, (sql, plan)
            assert "status = ?" not in sql and "status IN (?" not in sql, sql

    def test_a_write_with_a_stale_token_is_refused_and_changes_nothing(self, store, alice):
        task, _ = submit(store, alice["id"], 10.0)
        old = store.claim("w1", now=10.0, limit=1, lease_s=5)[0]
        new = store.claim("w2", now=20.0, limit=1, lease_s=5)[0]
        before = row(store, task["id"])
        with pytest.raises(StaleLease):
            store.update(task["id"], token=old["lease_token"], now=21.0, status="running")
        with pytest.raises(StaleLease):
            store.reschedule(task["id"], token=old["lease_token"], next_poll_at=99.0, polls=1)
        assert row(store, task["id"]) == before
        store.update(task["id"], token=new["lease_token"], now=22.0, status="running")
        assert row(store, task["id"])["status"] == "running"

    def test_a_lease_publishes_only_files_in_its_own_folder(self, store, alice):
        task, _ = submit(store, alice["id"], 10.0)
        held = store.claim("w1", now=10.0, limit=1, lease_s=30)[0]
        store.update(task["id"], token=held["lease_token"], now=11.0, status="running")
        meta = {"name": "out_0.png", "size": 1, "sha256": "0" * 64, "content_type": "image/png"}
        other = dict(meta, dir=lease_dir(held["lease_token"] - 1))
        with pytest.raises(ValueError):
            store.update(task["id"], token=held["lease_token"], now=12.0, status="succeeded", files=[other])
        assert row(store, task["id"])["files"] == []
        own = dict(meta, dir=lease_dir(held["lease_token"]))
        done = store.update(task["id"], token=held["lease_token"], now=12.0, status="succeeded", files=[own])
        assert row(store, task["id"])["files"] == [own] and done["files"] == [own]
        assert "dir" not in task_json(done)["files"][0], "where a file lies is not the API's business"

    def test_reschedule_releases_without_an_event(self, store, alice):
        task, _ = submit(store, alice["id"], 10.0)
        held = store.claim("w1", now=10.0, limit=1, lease_s=30)[0]
        store.reschedule(task["id"], token=held["lease_token"], next_poll_at=50.0, polls=3,
                         state={"failures": 1})
        got = row(store, task["id"])
        assert got["lease_owner"] is None and got["next_poll_at"] == 50.0 and got["state"] == {"failures": 1}
        assert got["version"] == 1 and len(store.task_events(task["id"])) == 1
        assert store.claim("w2", now=49.0, limit=1, lease_s=30) == []
        assert len(store.claim("w2", now=50.0, limit=1, lease_s=30)) == 1

    def test_release_leases_frees_a_dead_owners_tasks(self, store, alice):
        submit(store, alice["id"], 10.0)
        store.claim("dead", now=10.0, limit=1, lease_s=1000)
        assert store.lease_owners() == ["dead"]
        assert store.release_leases(["dead"]) == 1
        assert len(store.claim("alive", now=11.0, limit=1, lease_s=30)) == 1


def _dead_process():
    """The identity of a process of this kernel and namespace that has ended."""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=30)
    return dict(process_identity(), pid=int(out), started="1")


def _holder(store, owner, now):
    [got] = [h for h in store.lease_holders(now=now) if h["owner"] == owner]
    return got["heartbeat"]


class TestAsSeen:
    """update() and take_slot() given the task as its lease last saw it
    (`seen`): the row is written without being read again while its
    version is the one seen, and as it is now once something moved it on."""

    def _running(self, store, user_id, now):
        submit(store, user_id, now)
        claimed = store.claim("w1", now=now, limit=1, lease_s=60)[0]
        held = store.take_slot(claimed["id"], token=claimed["lease_token"], now=now, limit=4, seen=claimed,
                               step="submitting", attempts=1)
        assert held["version"] == claimed["version"] + 1
        running = store.update(held["id"], token=held["lease_token"], now=now, seen=held, status="running",
                               external_id="job-1", step="submitted", progress=0.0, next_poll_at=now + 5,
                               release=True)
        assert (running["status"], running["version"]) == ("running", held["version"] + 1)
        return running

    def test_a_change_to_a_row_that_moved_on_applies_to_the_row_as_it_is(self, store, alice):
        running = self._running(store, alice["id"], 10.0)
        # A provider's hint moves the row on while the lease holds it.
        assert store.note_progress(running["id"], step="painting", progress=0.5, now=11.0) is True
        changed = store.update(running["id"], token=running["lease_token"], now=12.0, seen=running,
                               progress=0.75)
        assert (changed["step"], changed["progress"]) == ("painting", 0.75)     # not the step seen
        assert changed["version"] == running["version"] + 2
        stored = row(store, running["id"])
        assert (stored["step"], stored["progress"], stored["version"]) == ("painting", 0.75, changed["version"])
        last = store.task_timeline(alice["id"], running["id"])[0][-1]["task"]
        assert (last["step"], last["progress"], last["version"]) == ("painting", 0.75, changed["version"])

    def test_a_change_seen_before_a_cancel_is_refused_and_writes_nothing(self, store, alice):
        running = self._running(store, alice["id"], 10.0)
        store.cancel(running["id"], alice["id"], now=11.0)
        events = store.task_events(running["id"])
        with pytest.raises(Conflict):
            store.update(running["id"], token=running["lease_token"], now=12.0, seen=running,
                         status="succeeded", files=[])
        with pytest.raises(Conflict):
            store.take_slot(running["id"], token=running["lease_token"], now=12.0, limit=4, seen=running,
                            step="again")
        assert row(store, running["id"])["status"] == "cancelled"
        assert store.task_events(running["id"]) == events

    def test_what_the_change_does_not_move_stays_as_the_row_has_it(self, store, alice):
        running = self._running(store, alice["id"], 10.0)
        task_id = running["id"]
        held = store.claim_task(task_id, "w2", now=20.0, lease_s=60)
        # Renewed and made due after the lease saw the task: neither bumps
        # the version, so the change is written without a read.
        store.renew_lease(task_id, token=held["lease_token"], expires_at=500.0)
        assert store.poll_now(task_id, now=21.0)
        store.update(task_id, token=held["lease_token"], now=22.0, seen=held, step="generating")
        stored = row(store, task_id)
        assert (stored["lease_expires_at"], stored["next_poll_at"], stored["lease_owner"]) == (500.0, 21.0, "w2")
        assert (stored["step"], stored["version"]) == ("generating", held["version"] + 1)

    def test_a_stale_lease_with_a_current_version_is_still_refused(self, store, alice):
        running = self._running(store, alice["id"], 10.0)
        old = store.claim_task(running["id"], "w2", now=20.0, lease_s=1)
        newer = store.claim_task(running["id"], "w3", now=30.0, lease_s=60)
        assert newer["version"] == old["version"]
        with pytest.raises(StaleLease):
            store.update(old["id"], token=old["lease_token"], now=31.0, seen=old, step="late")
        assert row(store, running["id"])["step"] == "submitted"

    def test_on_sqlite_a_change_as_seen_reads_no_task_row(self, sqlite_store):
        user = sqlite_store.create_user("alice")[0]
        running = self._running(sqlite_store, user["id"], 10.0)
        statements = []
        conn = sqlite_store.write_connection()
        conn.set_trace_callback(statements.append)
        try:
            sqlite_store.update(running["id"], token=running["lease_token"], now=12.0, seen=running,
                                status="succeeded", files=[], progress=1.0)
        finally:
            conn.set_trace_callback(None)
        assert not [s for s in statements if s.startswith("SELECT") and " FROM tasks " in s], statements
        # (A trigger's statements show as the statement that fired them.)
        assert {s.split(" SET ")[0] for s in statements if s.startswith("UPDATE")} == {"UPDATE tasks"}
        assert row(sqlite_store, running["id"])["status"] == "succeeded"


class TestLiveness:
    """Whether a lease owner is alive comes from its heartbeat row, on the
    store's clock (real time here: PostgreSQL reads its own)."""

    def test_a_fresh_heartbeat_is_alive_and_one_past_its_lease_is_dead(self, store, alice):
        me = process_identity()
        for owner in ("fresh", "stale"):
            submit(store, alice["id"], 1.0)
            store.heartbeat(owner, now=time.time(), lease_s=600.0 if owner == "fresh" else 0.2, identity=me)
            assert len(store.claim(owner, now=time.time(), limit=1, lease_s=600)) == 1
        beat = _holder(store, "fresh", time.time())
        assert beat["stale"] is False and beat["lease_s"] == 600.0 and beat["pid"] == os.getpid()
        deadline = time.monotonic() + 20
        while not _holder(store, "stale", time.time())["stale"]:
            assert time.monotonic() < deadline, "the heartbeat never ran out"
            time.sleep(0.05)
        assert dead_owners(store.lease_holders(now=time.time())) == ["stale"]
        assert dead_owners(store.lease_holders(now=time.time()), me="stale") == []
        store.heartbeat("stale", now=time.time(), lease_s=600.0, identity=me)
        assert dead_owners(store.lease_holders(now=time.time())) == [], "a new beat revives it"

    def test_an_owner_without_a_heartbeat_is_left_to_its_lease(self, store, alice):
        submit(store, alice["id"], 1.0)
        store.claim("no-row", now=time.time(), limit=1, lease_s=600)
        assert store.lease_holders(now=time.time()) == [{"owner": "no-row", "heartbeat": None}]
        assert dead_owners(store.lease_holders(now=time.time())) == []

    def test_a_gone_process_of_this_namespace_is_dead_at_once_one_of_another_is_not(self, store, alice):
        gone = _dead_process()
        other_ns = dict(gone, pid_ns="pid:[1]")       # a container's: its PIDs mean nothing here
        for owner, identity in (("gone", gone), ("other-ns", other_ns), ("me", process_identity()),
                                ("reused", dict(process_identity(), started="1"))):
            submit(store, alice["id"], 1.0)
            store.heartbeat(owner, now=time.time(), lease_s=600.0, identity=identity)
            store.claim(owner, now=time.time(), limit=1, lease_s=600)
        assert sorted(dead_owners(store.lease_holders(now=time.time()))) == ["gone", "reused"]

    def test_a_clean_stop_deletes_the_row_and_heartbeats_are_not_exported(self, store, alice):
        store.heartbeat("w", now=time.time(), lease_s=60.0, identity=process_identity())
        submit(store, alice["id"], 1.0)
        store.claim("w", now=time.time(), limit=1, lease_s=600)
        assert _holder(store, "w", time.time()) is not None
        assert "heartbeats" not in store.export_rows()
        assert store.end_heartbeat("w") is True and store.end_heartbeat("w") is False
        assert _holder(store, "w", time.time()) is None

    def test_rows_dead_for_over_an_hour_go_at_the_next_beat(self, store, alice):
        me = process_identity()
        # A lease far in the past on any clock: dead for over an hour.
        store.heartbeat("long-gone", now=time.time(), lease_s=-7300.0, identity=me)
        store.heartbeat("recent", now=time.time(), lease_s=0.001, identity=me)
        for owner in ("long-gone", "recent"):
            submit(store, alice["id"], 1.0)
            store.claim(owner, now=time.time(), limit=1, lease_s=600)
        store.heartbeat("w", now=time.time(), lease_s=60.0, identity=me)
        # Past "recent"'s lease on every clock (a fast machine does the
        # writes above in under its millisecond).
        time.sleep(0.05)
        assert _holder(store, "long-gone", time.time()) is None
        assert _holder(store, "recent", time.time())["stale"] is True


class TestProviderHealth:
    """What the workers saw of the providers, kept across processes."""

    def test_failures_count_up_until_an_answer_restarts_them(self, store):
        assert store.provider_health() == {}
        store.record_provider_health("kie", now=10.0, ok_at=10.0)
        store.record_provider_health("kie", now=12.0, failures=2, error=("provider_unavailable", "HTTP 503", 12.0))
        store.record_provider_health("kie", now=13.0, failures=1, error=("internal", "boom", 13.0))
        health = store.provider_health()["kie"]
        assert health == {"last_ok_at": 10.0, "last_error_at": 13.0, "last_error_code": "internal",
                          "last_error": "boom", "consecutive_failures": 3, "updated_at": 13.0}
        # An answer, then one more failure in the same report.
        store.record_provider_health("kie", now=15.0, ok_at=14.0, failures=1,
                                     error=("provider_unavailable", "no answer within 2s", 15.0))
        health = store.provider_health()["kie"]
        assert health["last_ok_at"] == 14.0 and health["consecutive_failures"] == 1
        assert health["last_error"] == "no answer within 2s" and health["last_error_at"] == 15.0

    def test_an_older_report_neither_restarts_the_count_nor_replaces_the_error(self, store):
        """Two workers report in any order: the newest answer and error stay."""
        store.record_provider_health("comfy", now=20.0, ok_at=20.0, failures=1,
                                     error=("provider_unavailable", "new", 21.0))
        store.record_provider_health("comfy", now=22.0, ok_at=5.0, failures=2,
                                     error=("provider_unavailable", "old", 6.0))
        health = store.provider_health()["comfy"]
        assert health["last_ok_at"] == 20.0 and health["last_error"] == "new"
        assert health["consecutive_failures"] == 3
        assert "provider_health" not in store.export_rows()


class TestStoreClock:
    """Whose clock a heartbeat is on."""

    def test_postgresql_stamps_beats_on_its_own_clock_not_the_callers(self, pg_schema):
        pg = PostgresStore(pg_schema.url)
        try:
            user = pg.create_user("alice")[0]
            submit(pg, user["id"], 1.0)
            # A host whose clock is an hour slow, and one an hour fast.
            pg.heartbeat("slow", now=time.time() - 3600, lease_s=60.0, identity=process_identity())
            pg.claim("slow", now=time.time(), limit=1, lease_s=600)
            assert _holder(pg, "slow", time.time() + 3600)["stale"] is False
            assert abs(_holder(pg, "slow", 0.0)["beat_at"] - time.time()) < 60
        finally:
            pg.close()

    def test_sqlite_has_one_hosts_clock_the_callers(self, sqlite_store):
        user = sqlite_store.create_user("alice")[0]
        submit(sqlite_store, user["id"], 1.0)
        sqlite_store.heartbeat("w", now=1000.0, lease_s=60.0, identity=process_identity())
        sqlite_store.claim("w", now=1000.0, limit=1, lease_s=600)
        assert _holder(sqlite_store, "w", 1059.0)["stale"] is False
        assert _holder(sqlite_store, "w", 1061.0)["stale"] is True


class TestRetry:
    """One live retry per task, whatever the races: a second retry returns it."""

    def retry(self, store, user_id, original, now, cost=0):
        return store.submit(user_id, "demo", {"prompt": "x"}, now=now, deadline_at=now + 3600, cost=cost,
                            retry_of=original)

    def test_a_second_retry_returns_the_live_one_until_it_fails_or_is_cancelled(self, store):
        user = store.create_user("payer", credits=10)[0]
        original, _ = submit(store, user["id"], 1.0, cost=2)
        store.cancel(original["id"], user["id"], now=2.0)
        first, dedup = self.retry(store, user["id"], original["id"], 3.0, cost=2)
        assert not dedup and first["retry_of"] == original["id"]
        again, dedup = self.retry(store, user["id"], original["id"], 4.0, cost=2)
        assert dedup and again["id"] == first["id"]
        assert store.user_by_name("payer")["credit_balance"] == 8, "reserved once"
        store.cancel(first["id"], user["id"], now=5.0)
        second, dedup = self.retry(store, user["id"], original["id"], 6.0, cost=2)
        assert not dedup and second["id"] not in (first["id"], original["id"])
        assert [r["kind"] for r in store.ledger(task_id=second["id"])] == ["reserve"]

    def test_concurrent_retries_of_one_task_make_one(self, store):
        user = store.create_user("payer", credits=100)[0]
        original, _ = submit(store, user["id"], 1.0, cost=1)
        store.cancel(original["id"], user["id"], now=2.0)
        barrier = threading.Barrier(8)
        results, errors = [], []

        def one(i):
            barrier.wait()
            try:
                task, dedup = self.retry(store, user["id"], original["id"], 3.0 + i, cost=1)
                results.append((task["id"], dedup))
            except Exception as exc:      # reported below: the test fails
                errors.append(repr(exc))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert len({task_id for task_id, _ in results}) == 1
        assert sorted(dedup for _, dedup in results) == [False] + [True] * 7
        assert store.user_by_name("payer")["credit_balance"] == 99
        assert len(store.list_tasks(user["id"])[0]) == 2

    def test_the_index_refuses_a_second_live_retry(self, store, alice):
        original, _ = submit(store, alice["id"], 1.0)
        store.cancel(original["id"], alice["id"], now=2.0)
        self.retry(store, alice["id"], original["id"], 3.0)
        other, _ = submit(store, alice["id"], 4.0)
        with pytest.raises(peewee.IntegrityError):
            with store._seam(), store._write():
                store._exec("UPDATE tasks SET retry_of = ? WHERE id = ?", (original["id"], other["id"]))
        assert store.get_task(other["id"])["retry_of"] is None


class TestDeadlinesAndCredits:
    def test_expire_fails_an_overdue_task_and_refunds_once(self, store):
        user = store.create_user("payer", credits=10)[0]
        task, _ = submit(store, user["id"], 1.0, cost=4, deadline_at=5.0)
        assert store.overdue(now=4.0, limit=10) == []
        assert [t["id"] for t in store.overdue(now=6.0, limit=10)] == [task["id"]]
        done = store.expire(task["id"], now=6.0, error={"code": "timeout", "message": "late"})
        assert done["status"] == "failed" and done["credits"] == "refunded"
        assert store.user_by_name("payer")["credit_balance"] == 10
        with pytest.raises(Conflict):
            store.expire(task["id"], now=7.0, error={"code": "timeout", "message": "late"})
        assert store.user_by_name("payer")["credit_balance"] == 10

    def test_settling_a_stray_reservation_bumps_version_and_writes_its_event(self, store):
        user = store.create_user("payer", credits=10)[0]
        task, _ = submit(store, user["id"], 1.0, cost=4)
        # Ended without settling, as a crash in an older version could leave it.
        with store._seam(), store._write():
            store._exec("UPDATE tasks SET status = 'failed' WHERE id = ?", (task["id"],))
        stray = store.get_task(task["id"])
        assert [t["id"] for t in store.stray_reservations()] == [task["id"]]
        assert store.settle_stray(task["id"], now=5.0) == "refunded"
        settled = store.get_task(task["id"])
        assert settled["credits"] == "refunded" and settled["updated_at"] == 5.0
        assert settled["version"] == stray["version"] + 1
        assert [t for _, t in store.task_events(task["id"])] == ["created", "updated"]
        seq, text = store.events_since(user["id"], 0)[-1]
        assert json.loads(text)["task"] == task_json(settled)
        assert store.user_by_name("payer")["credit_balance"] == 10
        assert store.settle_stray(task["id"], now=6.0) is None
        assert store.get_task(task["id"]) == settled and store.last_seq() == seq

    def test_success_charges_and_keeps_the_reservation(self, store):
        user = store.create_user("payer", credits=10)[0]
        task, _ = submit(store, user["id"], 1.0, cost=4)
        store.update(task["id"], token=None, now=2.0, status="running")
        done = store.update(task["id"], token=None, now=2.0, status="succeeded")
        assert done["credits"] == "charged"
        assert store.user_by_name("payer")["credit_balance"] == 6
        assert store.reserved_credits(user["id"]) == 0


class TestSubmitsInDoubt:
    def _parked(self, store, user_id, now, *, provider="demo", state=None, next_poll_at=None, status="queued"):
        """A task of `provider` as the worker leaves it: `state` and its next
        look set, no lease."""
        task, _ = store.submit(user_id, provider, {"prompt": "x"}, now=now, deadline_at=now + 3600)
        held = store.claim_task(task["id"], "w", now=now, lease_s=30)
        if status != "queued":
            store.update(task["id"], token=held["lease_token"], now=now, status=status)
        store.reschedule(task["id"], token=held["lease_token"], next_poll_at=next_poll_at or now, polls=0,
                         state=state)
        return task["id"]

    def test_in_doubt_finds_stored_ids_and_submits_marked_as_sent(self, store, alice):
        with_id, _ = submit(store, alice["id"], 10.0)
        held = store.claim_task(with_id["id"], "w", now=10.0, lease_s=30)
        store.update(with_id["id"], token=held["lease_token"], now=10.0, external_id="job-1", attempts=1,
                     release=True)
        sent = self._parked(store, alice["id"], 11.0, state={"posted_at": 11.0, "failures": 1})
        self._parked(store, alice["id"], 12.0, state={"failures": 2})          # not sent: not in doubt
        self._parked(store, alice["id"], 13.0, state={"posted_at": 13.0}, status="running")
        assert sorted(t["id"] for t in store.in_doubt()) == sorted([with_id["id"], sent])
        assert [t["id"] for t in store.in_doubt(limit=1)] == [min(with_id["id"], sent)]

    def test_wake_backoff_makes_only_a_providers_backed_off_queued_tasks_due(self, store, alice):
        backed_off = [self._parked(store, alice["id"], 10.0, state={"failures": n, "last_error": "down"},
                                   next_poll_at=10.0 + 30 * n) for n in (1, 2)]
        due_already = self._parked(store, alice["id"], 10.0, state={"failures": 1}, next_poll_at=15.0)
        slot_wait = self._parked(store, alice["id"], 10.0, next_poll_at=40.0)
        in_doubt = self._parked(store, alice["id"], 10.0, state={"failures": 1, "posted_at": 10.0},
                                next_poll_at=40.0)
        other = self._parked(store, alice["id"], 10.0, provider="other", state={"failures": 1},
                             next_poll_at=40.0)
        running = self._parked(store, alice["id"], 10.0, state={"failures": 1}, next_poll_at=40.0,
                               status="running")
        leased = self._parked(store, alice["id"], 10.0, state={"failures": 1}, next_poll_at=40.0)
        store.claim_task(leased, "w2", now=20.0, lease_s=30)
        before = {t: row(store, t) for t in [due_already, slot_wait, in_doubt, other, running, leased]}
        versions = {t: row(store, t)["version"] for t in backed_off}

        assert store.wake_backoff("demo", now=20.0) == 2
        for task_id in backed_off:
            got = row(store, task_id)
            assert got["next_poll_at"] == 20.0 and got["version"] == versions[task_id]
        assert {t: row(store, t) for t in before} == before
        assert {t["id"] for t in store.claim("w3", now=20.0, limit=10, lease_s=30)} >= set(backed_off)
        assert store.wake_backoff("demo", now=20.0) == 0

    def test_poll_now_makes_an_active_task_due_and_leaves_ended_and_unknown_ones_alone(self, store, alice):
        queued = self._parked(store, alice["id"], 10.0, state={"posted_at": 10.0}, next_poll_at=300.0)
        running = self._parked(store, alice["id"], 10.0, next_poll_at=300.0, status="running")
        leased = self._parked(store, alice["id"], 10.0, next_poll_at=300.0, status="running")
        held = store.claim_task(leased, "w2", now=20.0, lease_s=30)
        ended, _ = submit(store, alice["id"], 10.0)
        store.cancel(ended["id"], alice["id"], now=11.0)
        before = {t: row(store, t) for t in (queued, running, leased, ended["id"])}

        assert store.poll_now(queued, now=20.0) is True
        assert store.poll_now(running, now=20.0) is True
        assert store.poll_now(leased, now=20.0) is True
        assert store.poll_now(ended["id"], now=20.0) is False
        assert store.poll_now("t_no_such_task", now=20.0) is False
        for task_id in (queued, running, leased):
            got = row(store, task_id)
            assert got == {**before[task_id], "next_poll_at": 20.0}
        assert row(store, ended["id"]) == before[ended["id"]]
        # Due, so claimed at once; the one leased stays its holder's until
        # the lease ends, and the holder's write still counts.
        assert {t["id"] for t in store.claim("w3", now=20.0, limit=10, lease_s=30)} == {queued, running}
        store.reschedule(leased, token=held["lease_token"], next_poll_at=50.0, polls=1)

    @pytest.mark.parametrize("job_id", ["j" * 256, "ab\x00cd", "\ud800"], ids=["256 chars", "NUL", "surrogate"])
    def test_a_job_id_the_store_cannot_keep_is_refused_alike_everywhere(self, store, alice, job_id):
        task, _ = submit(store, alice["id"], 10.0)
        held = store.claim_task(task["id"], "w", now=10.0, lease_s=30)
        before = row(store, task["id"])
        with pytest.raises(InvalidInput) as caught:
            store.update(task["id"], token=held["lease_token"], now=11.0, status="running", external_id=job_id)
        assert caught.value.code == "invalid_result"
        assert row(store, task["id"]) == before
        store.update(task["id"], token=held["lease_token"], now=11.0, status="running", external_id="j" * 255)
        assert row(store, task["id"])["external_id"] == "j" * 255


class TestCreditRaces:
    """Reserving credits under real threads: the balance is checked in the
    write that lowers it, so racers can never take it below zero."""

    def race(self, n, fn):
        barrier = threading.Barrier(n)
        results, errors = [], []

        def one(i):
            barrier.wait()
            try:
                fn(i)
                results.append("ok")
            except HoldfastError as exc:
                results.append(exc.code)
            except Exception as exc:      # reported below: the test fails
                errors.append(repr(exc))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        return results

    def test_20_submits_against_a_balance_for_5_create_exactly_5(self, store):
        cost = 3
        user = store.create_user("payer", credits=5 * cost)[0]
        seen, done = [], threading.Event()

        def watch():
            while True:
                seen.append(store.user_by_name("payer")["credit_balance"])
                if done.is_set():
                    return

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            results = self.race(20, lambda i: submit(store, user["id"], 1.0 + i, cost=cost))
        finally:
            done.set()
            watcher.join(30)
        assert collections.Counter(results) == {"ok": 5, "insufficient_credits": 15}
        assert store.reserved_credits(user["id"]) == 5 * cost
        assert len(store.list_tasks(user["id"])[0]) == 5
        assert [r["kind"] for r in store.ledger(user_id=user["id"])] == ["grant"] + ["reserve"] * 5
        assert store.user_by_name("payer")["credit_balance"] == 0 and min(seen) >= 0

    def test_a_grant_taking_credits_away_racing_a_submit_never_ends_negative(self, store):
        cost = 4
        user = store.create_user("payer", credits=0)[0]
        racers = (lambda: submit(store, user["id"], 1.0, cost=cost),
                  lambda: store.grant(user["id"], -cost, now=1.0))
        for round_no in range(30):
            store.grant(user["id"], cost, now=float(round_no))
            results = self.race(2, lambda i: racers[i]())
            assert sorted(results) in (["balance_too_low", "ok"], ["insufficient_credits", "ok"]), results
            assert store.user_by_name("payer")["credit_balance"] == 0
        rows = store.ledger(user_id=user["id"])
        grants = sum(r["amount"] for r in rows if r["kind"] == "grant")
        reserves = sum(r["amount"] for r in rows if r["kind"] == "reserve")
        assert grants - reserves == 0 and reserves == cost * len(store.list_tasks(user["id"], limit=100)[0])


class TestAccounts:
    """Credits, grants, limits, admin queries and sessions: the accounts part
    of the contract."""

    def ledger_kinds(self, store, **kw):
        return [(r["kind"], r["amount"]) for r in store.ledger(**kw)]

    def test_a_starting_balance_is_a_grant_and_grants_move_the_balance(self, store):
        user = store.create_user("payer", credits=10, max_active=4, rate_per_s=0.5)[0]
        assert (user["credit_balance"], user["max_active"], user["rate_per_s"]) == (10, 4, 0.5)
        assert store.grant(user["id"], 5, now=1.0)["credit_balance"] == 15
        assert store.grant(user["id"], -15, now=2.0)["credit_balance"] == 0
        assert self.ledger_kinds(store, user_id=user["id"]) == [("grant", 10), ("grant", 5), ("grant", -15)]
        assert store.ledger(user_id=store.create_user("free")[0]["id"]) == []

    def test_a_grant_with_one_key_from_many_threads_at_once_is_made_once(self, store):
        payer = store.create_user("payer", credits=10)[0]
        errors = []
        start = threading.Barrier(6)

        def send(keys):
            start.wait(10)
            for key in keys:
                try:
                    store.grant(payer["id"], 3, now=1.0, key=key)
                except Exception as exc:        # noqa: BLE001 - any error fails the test below
                    errors.append(exc)
        keys = [f"k{i}" for i in range(20)]
        threads = [threading.Thread(target=send, args=(keys,)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == [] and not any(t.is_alive() for t in threads)
        assert store.user_by_name("payer")["credit_balance"] == 10 + 3 * len(keys)
        assert sorted(r["task_id"] for r in store.ledger(user_id=payer["id"])) == sorted(
            ["", *("grant:" + k for k in keys)])
        with pytest.raises(Conflict) as err:
            store.grant(payer["id"], 4, now=2.0, key="k0")
        assert err.value.code == "idempotency_key_reused"
        assert store.user_by_name("payer")["credit_balance"] == 10 + 3 * len(keys)

    def test_grants_never_go_below_zero_nor_to_users_without_a_limit(self, store):
        payer = store.create_user("payer", credits=3)[0]
        free = store.create_user("free")[0]
        for user_id, amount, code in ((payer["id"], -4, "balance_too_low"), (free["id"], 5, "no_credit_limit")):
            with pytest.raises(Conflict) as err:
                store.grant(user_id, amount, now=1.0)
            assert err.value.code == code
        for amount in (0, 1.5, True, "2", 10**12):
            with pytest.raises(InvalidInput):
                store.grant(payer["id"], amount, now=1.0)
        with pytest.raises(NotFound):
            store.grant(10**6, 1, now=1.0)
        assert store.user_by_name("payer")["credit_balance"] == 3
        assert store.user_by_name("free")["credit_balance"] is None
        assert self.ledger_kinds(store) == [("grant", 3)]

    @pytest.mark.parametrize("limits", [{"credits": -1}, {"credits": 1.5}, {"max_active": 0},
                                        {"rate_per_s": 0}, {"rate_per_s": float("nan")}, {"rate_per_s": True}])
    def test_bad_user_limits_are_refused(self, store, limits):
        with pytest.raises(InvalidInput):
            store.create_user("x", **limits)
        assert store.count_users() == 0

    @pytest.mark.parametrize("end,settle,balance", [("succeeded", "charge", 6), ("partial", "charge", 6),
                                                    ("failed", "refund", 10), ("cancelled", "refund", 10)])
    def test_each_ending_settles_once(self, store, end, settle, balance):
        user = store.create_user("payer", credits=10)[0]
        task, _ = submit(store, user["id"], 1.0, cost=4)
        store.update(task["id"], token=None, now=2.0, status="running")
        error = {"code": "internal", "message": "x"} if end in ("failed", "partial") else None
        done = store.update(task["id"], token=None, now=3.0, status=end, error=error)
        assert done["credits"] == ("charged" if settle == "charge" else "refunded")
        assert self.ledger_kinds(store, task_id=task["id"]) == [("reserve", 4), (settle, 4)]
        assert store.user_by_name("payer")["credit_balance"] == balance
        assert store.reserved_credits(user["id"]) == 0

    def test_a_settle_finding_its_ledger_row_written_moves_no_balance(self, store):
        user = store.create_user("payer", credits=10)[0]
        task, _ = submit(store, user["id"], 1.0, cost=4)
        # What a settle that landed without its task (a crash or race on a
        # backend that did not serialize them) leaves behind.
        with store._seam(), store._write():
            store._exec("INSERT INTO ledger (user_id, task_id, kind, amount, created_at) "
                        "VALUES (?, ?, 'refund', 4, 1)", (user["id"], task["id"]))
        done = store.cancel(task["id"], user["id"], now=2.0)
        assert done["credits"] == "refunded"
        assert self.ledger_kinds(store, task_id=task["id"]) == [("reserve", 4), ("refund", 4)]
        assert store.user_by_name("payer")["credit_balance"] == 6

    def test_a_full_provider_queue_and_a_refusing_admit_create_and_reserve_nothing(self, store):
        user = store.create_user("payer", credits=100)[0]
        submit(store, user["id"], 1.0, cost=1, max_queued=1)
        before = (store.export_rows(), store.last_seq())
        with pytest.raises(TooMany) as err:
            submit(store, user["id"], 2.0, cost=1, max_queued=1)
        assert err.value.code == "queue_full" and err.value.headers["Retry-After"]

        def refuse():
            raise TooMany("slow down", code="rate_limited")
        with pytest.raises(TooMany):
            submit(store, user["id"], 2.0, cost=1, admit=refuse)
        assert (store.export_rows(), store.last_seq()) == before
        admitted = []
        submit(store, user["id"], 3.0, cost=1, admit=lambda: admitted.append(1))
        submit(store, user["id"], 3.0, cost=1, dedupe_key="k", admit=lambda: admitted.append(1))
        again, dedup = submit(store, user["id"], 3.0, cost=1, dedupe_key="k", admit=refuse, max_queued=1)
        assert dedup and admitted == [1, 1]

    def test_admin_tasks_name_the_stuck_ones_of_every_user(self, store):
        alice, bob = store.create_user("alice")[0], store.create_user("bob")[0]
        late, _ = submit(store, alice["id"], 100.0, deadline_at=150.0)
        orphan, _ = submit(store, bob["id"], 110.0, deadline_at=9999.0)
        assert store.claim_task(orphan["id"], "gone:1:x", now=110.0, lease_s=30)
        fine, _ = submit(store, bob["id"], 195.0, deadline_at=9999.0)
        rows = store.admin_tasks(now=200.0, stuck=True, grace_s=60.0, limit=10)
        assert [(t["id"], name, reasons) for t, name, reasons in rows] == [
            (late["id"], "alice", ["past_deadline", "poll_overdue"]), (orphan["id"], "bob", ["lease_expired"])]
        assert [t["id"] for t, _, _ in store.admin_tasks(now=200.0, limit=10)] == [late["id"], orphan["id"],
                                                                                  fine["id"]]
        assert store.active_count(bob["id"]) == 2

    def test_sessions_cap_expire_and_stay_with_their_user(self, store):
        alice, bob = store.create_user("alice")[0], store.create_user("bob")[0]
        msgs = [{"role": "user", "content": str(i)} for i in range(45)]
        put = store.put_session(alice["id"], "k", messages=msgs[:30], data={"a": 1}, now=10.0, ttl_s=100.0)
        assert put["expires_at"] == 110.0 and len(put["messages"]) == 30
        session, dropped = store.append_messages(alice["id"], "k", msgs[30:], now=20.0, ttl_s=100.0)
        assert dropped == 5 and session["messages"] == msgs[5:] and len(session["messages"]) == MAX_SESSION_MESSAGES
        assert store.get_session(alice["id"], "k", now=119.0) == session
        with pytest.raises(NotFound):
            store.get_session(bob["id"], "k", now=20.0)
        assert store.delete_session(bob["id"], "k", now=20.0) is False
        with pytest.raises(NotFound):
            store.get_session(alice["id"], "k", now=120.0)
        fresh, _ = store.append_messages(alice["id"], "k", msgs[:1], now=130.0, ttl_s=100.0)
        assert fresh["messages"] == msgs[:1] and fresh["data"] is None
        with pytest.raises(InvalidInput):
            store.get_session(alice["id"], "bad key", now=130.0)

    def test_max_sessions_counts_live_sessions_and_purge_drops_expired_ones(self, store):
        user = store.create_user("alice")[0]
        for key in ("a", "b"):
            store.put_session(user["id"], key, messages=[], data=None, now=10.0, ttl_s=100.0, max_sessions=2)
        with pytest.raises(Conflict) as err:
            store.put_session(user["id"], "c", messages=[], data=None, now=10.0, ttl_s=100.0, max_sessions=2)
        assert err.value.code == "too_many_sessions"
        store.put_session(user["id"], "a", messages=[], data={"x": 1}, now=11.0, ttl_s=100.0, max_sessions=2)
        assert store.purge_sessions(now=110.5) == 1                # b expired, a was written later
        assert store.delete_session(user["id"], "a", now=110.9) is True
        assert store.purge_sessions(now=1000.0) == 0


class TestProviderHints:
    """What a provider pushes (ComfyUI's socket) reaches a task outside any
    lease: its progress, and a poll made due at once."""

    def _running(self, store, user_id, now, *, next_poll_at):
        task, _ = submit(store, user_id, now)
        held = store.claim_task(task["id"], "w", now=now, lease_s=30)
        store.update(task["id"], token=held["lease_token"], now=now, status="running", step="submitted",
                     progress=0.0, next_poll_at=next_poll_at, release=True)
        return task["id"]

    def test_note_progress_changes_a_running_task_with_its_event_and_moves_no_lease(self, store, alice):
        task_id = self._running(store, alice["id"], 10.0, next_poll_at=40.0)
        held = store.claim_task(task_id, "w2", now=11.0, lease_s=30)
        before = row(store, task_id)
        assert store.note_progress(task_id, step="KSampler 3/20", progress=0.15, now=12.0) is True
        got = row(store, task_id)
        assert (got["step"], got["progress"], got["updated_at"]) == ("KSampler 3/20", 0.15, 12.0)
        assert got["version"] == before["version"] + 1
        assert {k: got[k] for k in ("lease_owner", "lease_token", "lease_expires_at", "next_poll_at")} == \
            {k: before[k] for k in ("lease_owner", "lease_token", "lease_expires_at", "next_poll_at")}
        assert store.task_events(task_id)[-1][1] == "updated"
        seq, text = store.events_since(alice["id"], 0)[-1]
        assert json.loads(text)["task"]["step"] == "KSampler 3/20"
        # The lease holder's own write still goes through: nothing was taken from it.
        store.update(task_id, token=held["lease_token"], now=13.0, step="KSampler 4/20", progress=0.2)

    def test_note_progress_writes_nothing_when_nothing_changed_or_the_task_is_not_running(self, store, alice):
        task_id = self._running(store, alice["id"], 10.0, next_poll_at=40.0)
        assert store.note_progress(task_id, step="KSampler 3/20", progress=0.15, now=11.0)
        events, version = len(store.task_events(task_id)), row(store, task_id)["version"]
        assert store.note_progress(task_id, step="KSampler 3/20", progress=0.15, now=12.0) is False
        queued, _ = submit(store, alice["id"], 10.0)
        assert store.note_progress(queued["id"], step="KSampler 1/20", progress=0.05, now=12.0) is False
        assert store.note_progress("t_missing", step="x", progress=0.5, now=12.0) is False
        store.cancel(task_id, alice["id"], now=13.0)
        ended = row(store, task_id)
        assert store.note_progress(task_id, step="KSampler 9/20", progress=0.45, now=14.0) is False
        assert row(store, task_id) == ended and row(store, queued["id"])["step"] == queued["step"]
        assert len(store.task_events(task_id)) == events + 1 and ended["version"] == version + 1

    def test_poll_now_makes_an_active_task_due_without_an_event_and_not_an_ended_one(self, store, alice):
        task_id = self._running(store, alice["id"], 10.0, next_poll_at=400.0)
        before = row(store, task_id)
        assert store.claim("w2", now=20.0, limit=10, lease_s=30) == []
        assert store.poll_now(task_id, now=20.0) is True
        got = row(store, task_id)
        assert got["next_poll_at"] == 20.0
        assert got["version"] == before["version"] and len(store.task_events(task_id)) == 2
        assert [t["id"] for t in store.claim("w2", now=20.0, limit=10, lease_s=30)] == [task_id]
        assert store.poll_now("t_missing", now=21.0) is False
        store.cancel(task_id, alice["id"], now=22.0)
        assert store.poll_now(task_id, now=23.0) is False
        assert row(store, task_id)["next_poll_at"] is None


class TestWebhookOutbox:
    """Webhooks out: the delivery rows are written with the change they
    report, claimed with a lease, and kept to the owner."""

    HOOK = {"url": "https://hooks.example.com/in", "events": ["created", "running", "progress", "finished"]}

    def types(self, store, user_id, task_id):
        return [(d["type"], d["state"]) for d in store.deliveries(user_id, task_id)]

    def test_each_change_writes_its_delivery_in_its_own_transaction(self, store, alice):
        task, _ = submit(store, alice["id"], 1.0, webhook=self.HOOK)
        store.update(task["id"], token=None, now=2.0, status="running")
        store.update(task["id"], token=None, now=3.0, progress=0.5)
        store.update(task["id"], token=None, now=4.0, status="succeeded")
        assert self.types(store, alice["id"], task["id"]) == [
            ("task.created", "pending"), ("task.running", "pending"), ("task.progress", "pending"),
            ("task.finished", "pending")]
        body = json.loads(store.deliveries(alice["id"], task["id"])[-1]["payload"])
        assert body["type"] == "task.finished" and body["data"]["task"]["status"] == "succeeded"
        assert set(body) == {"type", "timestamp", "data"}

    def test_a_refused_change_writes_no_delivery(self, store, alice):
        task, _ = submit(store, alice["id"], 1.0, webhook={"url": self.HOOK["url"], "events": ["finished"]})
        claimed = store.claim("w1", now=2.0, limit=1, lease_s=10)[0]
        store.claim_task(task["id"], "w2", now=20.0, lease_s=10)      # taken over: w1's lease is stale
        with pytest.raises(StaleLease):
            store.update(task["id"], token=claimed["lease_token"], now=21.0, status="failed",
                         error={"code": "internal", "message": "x"})
        assert store.deliveries(alice["id"], task["id"]) == []
        store.cancel(task["id"], alice["id"], now=22.0)
        assert self.types(store, alice["id"], task["id"]) == [("task.finished", "pending")]

    def test_default_events_are_finished_only_and_endpoints_get_every_task(self, store, alice):
        endpoint, secret = store.add_webhook_endpoint(alice["id"], "https://a.example.com/h", ["created"], now=1.0)
        assert secret.startswith("whsec_") and endpoint["events"] == ["created"]
        task, _ = submit(store, alice["id"], 1.0, webhook={"url": self.HOOK["url"]})
        store.update(task["id"], token=None, now=2.0, status="running")
        store.update(task["id"], token=None, now=3.0, status="succeeded")
        got = [(d["type"], d["endpoint_id"]) for d in store.deliveries(alice["id"], task["id"])]
        assert got == [("task.created", endpoint["id"]), ("task.finished", None)]

    def test_progress_is_coalesced_latest_state_wins_and_spaced_a_second(self, store, alice):
        task, _ = submit(store, alice["id"], 1.0, webhook={"url": self.HOOK["url"], "events": ["progress"]})
        store.update(task["id"], token=None, now=2.0, status="running")
        for i, p in enumerate((0.1, 0.2, 0.3)):
            store.update(task["id"], token=None, now=2.1 + i / 10, progress=p)
        [d] = store.deliveries(alice["id"], task["id"])
        assert json.loads(d["payload"])["data"]["task"]["progress"] == 0.3
        [claimed] = store.claim_deliveries("s1", now=2.5, limit=5, lease_s=10, per_target=2)
        store.update(task["id"], token=None, now=2.6, progress=0.4)
        second = store.deliveries(alice["id"], task["id"])[1]
        assert second["id"] != claimed["id"] and second["next_try_at"] >= 3.1 - 1e-9
        assert store.claim_deliveries("s1", now=2.7, limit=5, lease_s=10, per_target=2) == []

    def test_a_lease_keeps_one_sender_and_a_lost_one_resends_the_same_message(self, store, alice):
        task, _ = submit(store, alice["id"], 1.0, webhook={"url": self.HOOK["url"], "events": ["created"]})
        [first] = store.claim_deliveries("s1", now=2.0, limit=5, lease_s=10, per_target=2)
        assert store.claim_deliveries("s2", now=5.0, limit=5, lease_s=10, per_target=2) == []
        [again] = store.claim_deliveries("s2", now=13.0, limit=5, lease_s=10, per_target=2)
        assert again["id"] == first["id"] and again["attempts"] == 2
        # The first sender's late outcome is refused; the second's counts.
        assert not store.finish_delivery(first["id"], token=first["lease_token"], now=14.0, outcome="succeeded",
                                         status=200)
        assert store.finish_delivery(again["id"], token=again["lease_token"], now=14.0, outcome="retry",
                                     status=500, error="x", next_try_at=20.0)
        [d] = store.deliveries(alice["id"])
        assert (d["state"], d["last_status"], d["next_try_at"]) == ("pending", 500, 20.0)

    def test_concurrent_claims_never_share_a_delivery(self, store, alice):
        for i in range(30):
            submit(store, alice["id"], 1.0, params={"prompt": str(i)},
                   webhook={"url": f"https://h{i % 5}.example.com/x", "events": ["created"]})
        got, errors = [], []

        def claim(name):
            try:
                for _ in range(10):
                    got.extend(d["id"] for d in store.claim_deliveries(name, now=2.0, limit=3, lease_s=60,
                                                                     per_target=10))
            except StoreUnavailable as exc:
                errors.append(exc)
        threads = [threading.Thread(target=claim, args=(f"s{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert len(got) == len(set(got)) == 30

    def test_the_per_receiver_cap_passes_over_a_busy_receiver(self, store, alice):
        for i in range(4):
            submit(store, alice["id"], 1.0 + i, params={"prompt": str(i)},
                   webhook={"url": "https://slow.example.com/x", "events": ["created"]})
        submit(store, alice["id"], 9.0, webhook={"url": "https://fast.example.com/x", "events": ["created"]})
        got = store.claim_deliveries("s1", now=10.0, limit=2, lease_s=60, per_target=2,
                                     busy={"https://slow.example.com:443": 2})
        assert [d["target"] for d in got] == ["https://fast.example.com:443"]

    def test_410_disables_the_endpoint_and_cancels_its_pending_deliveries(self, store, alice):
        endpoint, _ = store.add_webhook_endpoint(alice["id"], "https://a.example.com/h", ["created"], now=1.0)
        submit(store, alice["id"], 1.0, params={"prompt": "a"})
        submit(store, alice["id"], 1.0, params={"prompt": "b"})
        d = store.claim_deliveries("s1", now=2.0, limit=1, lease_s=10, per_target=2)[0]
        store.finish_delivery(d["id"], token=d["lease_token"], now=3.0, outcome="gone", status=410)
        assert store.webhook_endpoint(alice["id"], endpoint["id"])["disabled_at"] == 3.0
        assert sorted(x["state"] for x in store.deliveries(alice["id"])) == ["cancelled", "failed"]
        submit(store, alice["id"], 4.0, params={"prompt": "c"})
        assert len(store.deliveries(alice["id"])) == 2
        with pytest.raises(Conflict):
            store.retry_delivery(alice["id"], d["id"], now=5.0)
        store.set_webhook_endpoint_enabled(alice["id"], endpoint["id"], True, now=6.0)
        assert store.retry_delivery(alice["id"], d["id"], now=7.0)["state"] == "pending"

    def test_rotation_keeps_both_secrets_for_the_overlap(self, store, alice):
        endpoint, old = store.add_webhook_endpoint(alice["id"], "https://a.example.com/h", None, now=1.0)
        new = store.rotate_webhook_secret(alice["id"], endpoint["id"], now=10.0, overlap_s=100)
        assert [s["secret"] for s in store.webhook_secrets(alice["id"], endpoint["id"], now=50.0)] == [old, new]
        assert [s["secret"] for s in store.webhook_secrets(alice["id"], endpoint["id"], now=111.0)] == [new]
        task_secrets = store.task_webhook_secrets(alice["id"], now=1.0)
        assert len(task_secrets) == 1 and task_secrets[0]["secret"] not in (old, new)

    def test_another_users_deliveries_are_not_found(self, store, alice):
        bob = store.create_user("bob")[0]
        submit(store, alice["id"], 1.0, webhook={"url": self.HOOK["url"], "events": ["created"]})
        [d] = store.deliveries(alice["id"])
        assert store.deliveries(bob["id"]) == []
        with pytest.raises(NotFound):
            store.retry_delivery(bob["id"], d["id"], now=2.0)
        with pytest.raises(NotFound):
            store.get_delivery(bob["id"], d["id"])

    def test_retention_takes_a_tasks_deliveries_with_it(self, store, alice):
        task, _ = submit(store, alice["id"], 1.0, webhook={"url": self.HOOK["url"], "events": ["finished"]})
        store.update(task["id"], token=None, now=2.0, status="running")
        store.update(task["id"], token=None, now=3.0, status="succeeded")
        store.delete_finished([task["id"]], before=10.0)
        assert store.deliveries(alice["id"]) == [] and store.task_webhook(task["id"]) is None


# -- fair share of a provider's scarce slots --------------------------------------

def _held(store, now=100.0):
    """{task id: task} of every due task, claimed (each with its lease token)."""
    return {t["id"]: t for t in store.claim("w:1:aa", now=now, limit=100, lease_s=60)}


def _take(store, task, limit, now=100.0):
    return store.take_slot(task["id"], token=task["lease_token"], now=now, limit=limit, step="submitting")


def test_a_scarce_slot_goes_to_the_user_holding_fewest_not_the_oldest_task(store, alice):
    bob = store.create_user("bob")[0]
    a = [submit(store, alice["id"], float(i))[0]["id"] for i in range(1, 6)]
    held = _held(store)
    assert _take(store, held[a[0]], 2) and _take(store, held[a[1]], 2)
    b = submit(store, bob["id"], 10.0)[0]["id"]
    held.update(_held(store))
    store.cancel(a[0], alice["id"], now=100.0)      # one of alice's two slots comes free
    # alice's oldest waiting task asks first, but bob holds none and alice one.
    assert _take(store, held[a[2]], 2) is None
    assert row(store, b)["next_poll_at"] <= 100.0, "the one first in line is due at once"
    assert _take(store, held[b], 2)["step"] == "submitting"
    # Both hold one now: no slot is free for anyone.
    assert _take(store, held[a[3]], 2) is None


def test_a_refusal_with_a_slot_free_wakes_the_caller_once_it_is_committed(store, alice):
    """The worker's dispatcher then takes those first in line at once, not
    a tick later; a refusal with every slot taken, or a slot taken, wakes
    nobody."""
    bob = store.create_user("bob")[0]
    a = [submit(store, alice["id"], float(i))[0]["id"] for i in range(1, 5)]
    held = _held(store)
    woken = []

    def wake():
        # Called after the commit: another connection sees bob's task due.
        woken.append(row(store, b)["next_poll_at"])
    take = lambda t: store.take_slot(t["id"], token=t["lease_token"], now=100.0, limit=2, wake=wake,
                                     step="submitting")
    assert take(held[a[0]]) and woken == []
    b = submit(store, bob["id"], 10.0)[0]["id"]
    held.update(_held(store))
    assert take(held[a[1]]) is None and len(woken) == 1 and woken[0] <= 100.0
    assert take(held[b]) and len(woken) == 1
    assert take(held[a[2]]) is None and len(woken) == 1, "no slot free: nobody to wake"


def test_fair_share_comes_before_priority_across_users(store, alice):
    bob = store.create_user("bob")[0]
    a = [submit(store, alice["id"], float(i), priority=9)[0]["id"] for i in range(1, 4)]
    held = _held(store)
    assert _take(store, held[a[0]], 2) and _take(store, held[a[1]], 2)
    b = submit(store, bob["id"], 10.0)[0]["id"]
    held.update(_held(store))
    store.cancel(a[0], alice["id"], now=100.0)
    assert _take(store, held[a[2]], 2) is None
    assert _take(store, held[b], 2) is not None


def test_within_one_user_higher_priority_takes_the_next_slot(store, alice):
    low = [submit(store, alice["id"], float(i))[0]["id"] for i in range(1, 6)]
    high = submit(store, alice["id"], 10.0, priority=5)[0]
    assert high["priority"] == 5 and task_json(high)["priority"] == 5
    held = _held(store)
    assert _take(store, held[low[1]], 1) is None, "the priority-5 task is first in line"
    assert _take(store, held[high["id"]], 1) is not None
    assert _take(store, held[low[0]], 1) is None, "and holds the one slot"


def test_with_slots_to_spare_any_waiting_task_takes_one(store, alice):
    bob = store.create_user("bob")[0]
    a = [submit(store, alice["id"], float(i))[0]["id"] for i in range(1, 4)]
    submit(store, bob["id"], 10.0)
    held = _held(store)
    # Four waiting, five free: order does not matter.
    assert _take(store, held[a[2]], 5) is not None
    assert _take(store, held[a[1]], 5) is not None
    # Two waiting (alice's oldest, bob's), two free: alice's takes one.
    assert _take(store, held[a[0]], 4) is not None


def _line_by_the_rule(tasks, candidate, limit):
    """take_slot's answer for `candidate` and the ids it makes due, from
    the rule as documented (SqlStore._next_in_line), over every task."""
    mine = [t for t in tasks if t["provider"] == candidate["provider"] and t["status"] in ("queued", "running")]
    holding = [t for t in mine if t["status"] == "running" or t["step"] == "submitting"]
    waiting = [t for t in mine if t["status"] == "queued" and t["step"] != "submitting"]
    free = limit - len(holding)
    if free <= 0:
        return False, set()
    if len(waiting) <= free:
        return True, set()
    held = collections.Counter(t["user_id"] for t in holding)
    by_user = collections.defaultdict(list)
    for t in sorted(waiting, key=lambda t: (-t["priority"], t["created_at"], t["id"])):
        by_user[t["user_id"]].append(t)
    # Users level on all three take turns by id.
    line = {u: [held[u], -ts[0]["priority"], min(t["created_at"] for t in ts), len(ts)]
            for u, ts in sorted(by_user.items())}
    turns = collections.Counter()
    for _ in range(free):
        user = min(line, key=lambda u: line[u][:3])
        turns[user] += 1
        line[user][0] += 1
        line[user][3] -= 1
        if not line[user][3]:
            del line[user]
    ahead = [t["id"] for t in by_user[candidate["user_id"]]]
    if ahead.index(candidate["id"]) < turns[candidate["user_id"]]:
        return True, set()
    woken = set()
    for user, n in turns.items():
        parked = [t for t in by_user[user] if t["step"] in (None, "waiting for a slot")]
        woken.update(t["id"] for t in parked[:n])
    return False, woken


@pytest.mark.parametrize("seed", range(8))
def test_the_slot_line_decides_by_the_rule_over_mixed_priorities_ties_and_steps(store, alice, seed):
    """The line reads a few index entries per user: each decision and wake
    must still be the rule's over every waiting task (a user's oldest task
    at a lower priority, equal creation times, parked and backing-off steps,
    several free slots, slots freed by cancels)."""
    import random
    rng = random.Random(seed)
    users = [alice["id"]] + [store.create_user(f"user{i}")[0]["id"] for i in range(3)]
    # Some users with a task or two: they leave the line after their turns.
    ids = [submit(store, rng.choices(users, weights=[6, 3, 1, 1])[0], float(rng.randint(1, 6)),
                  priority=rng.choice([0, 0, 1, 3]))[0]["id"] for _ in range(24)]
    held = _held(store)
    for task_id in ids:
        token = held[task_id]["lease_token"]
        step = rng.choice([None, None, "waiting for a slot", "backing off"])
        if step:
            store.update(task_id, token=token, now=100.0, step=step)
        # Not due, so that a wake shows.
        store.reschedule(task_id, token=token, next_poll_at=1000.0 + rng.randint(0, 9), polls=1)
    limit, now = rng.choice([2, 3, 5, 8]), 200.0
    for task_id in rng.sample(ids, len(ids)):
        tasks = [row(store, i) for i in ids]
        if rng.random() < 0.3:
            holders = [t for t in tasks if t["status"] == "queued" and t["step"] == "submitting"]
            if holders:
                victim = rng.choice(holders)
                store.cancel(victim["id"], victim["user_id"], now=now)
                tasks = [row(store, i) for i in ids]
        me = next(t for t in tasks if t["id"] == task_id)
        if me["status"] != "queued" or me["step"] == "submitting":
            continue
        before = {t["id"]: t["next_poll_at"] for t in tasks}
        granted, woken = _line_by_the_rule(tasks, me, limit)
        got = store.take_slot(task_id, token=held[task_id]["lease_token"], now=now, limit=limit, step="submitting")
        assert (got is not None) == granted, (seed, task_id)
        if not granted:
            after = {i: row(store, i)["next_poll_at"] for i in ids}
            assert after == {i: min(p, now) if i in woken else p for i, p in before.items()}, (seed, task_id)


def _raw_write(store, sql, params):
    """A change no store method makes (a priority changed, a waiting task
    deleted), for the triggers that keep slot_line to see."""
    with store._seam(), store._write():
        store._exec(sql, params)


@pytest.mark.parametrize("seed", range(3))
def test_the_slot_line_summary_agrees_with_a_recount_after_any_mix_of_changes(store, alice, seed, tmp_path):
    """slot_line (kept by triggers) against a GROUP BY over the tasks after
    every change: submits, slots taken and given back, cancels, finishes,
    steps, priorities, a provider losing a job, deletes; then through an
    export and an import."""
    import random

    from store import slot_line
    rng = random.Random(seed)
    users = [alice["id"]] + [store.create_user(f"user{i}")[0]["id"] for i in range(3)]
    now, seen = 100.0, collections.Counter()
    for _ in range(300):
        now += 1.0
        tasks = [t for u in users for t in store.list_tasks(u, limit=200)[0]]
        active = [t for t in tasks if t["status"] in ("queued", "running")]
        waiting = [t for t in active if t["status"] == "queued" and t["step"] != "submitting"]
        holding = [t for t in active if t not in waiting]
        op = rng.choice(["submit"] * 4 + ["take", "take", "run", "cancel", "finish", "priority", "step",
                                           "give back", "lost", "delete"])
        if op == "submit" or not active:
            op = "submit"
            store.submit(rng.choice(users), rng.choice(["demo", "demo", "other"]), {"p": 1},
                         now=float(rng.randint(1, int(now))), deadline_at=1e10, priority=rng.choice([0, 0, 1, 5]))
        elif op == "take" and waiting:
            task = rng.choice(waiting)
            store.take_slot(task["id"], token=None, now=now, limit=rng.choice([None, 1, 3]), step="submitting")
        elif op == "cancel":
            task = rng.choice(active)
            store.cancel(task["id"], task["user_id"], now=now)
        elif op == "run" and [t for t in holding if t["status"] == "queued"]:
            task = rng.choice([t for t in holding if t["status"] == "queued"])
            store.update(task["id"], token=None, now=now, status="running", step="generating")
        elif op == "finish" and holding:
            task = rng.choice(holding)
            if task["status"] == "queued":
                store.update(task["id"], token=None, now=now, status="running", step="generating")
            store.update(task["id"], token=None, now=now, status=rng.choice(["succeeded", "failed"]),
                         **({"error": {"code": "internal", "message": "x"}} if rng.random() < 0.5 else {}))
        elif op == "priority" and waiting:
            _raw_write(store, "UPDATE tasks SET priority = ? WHERE id = ?",
                       (rng.choice([-3, 0, 2, 9]), rng.choice(waiting)["id"]))
        elif op == "step" and waiting:
            store.update(rng.choice(waiting)["id"], token=None, now=now,
                         step=rng.choice([None, "waiting for a slot", "backing off"]))
        elif op == "give back" and [t for t in holding if t["status"] == "queued"]:
            task = rng.choice([t for t in holding if t["status"] == "queued"])
            store.update(task["id"], token=None, now=now, step=None)
        elif op == "lost" and [t for t in holding if t["status"] == "running"]:
            task = rng.choice([t for t in holding if t["status"] == "running"])
            store.update(task["id"], token=None, now=now, status="queued", step=None)
        elif op == "delete" and waiting:
            _raw_write(store, "DELETE FROM tasks WHERE id = ?", (rng.choice(waiting)["id"],))
        else:
            continue
        seen[op] += 1
        with store._seam():
            assert slot_line.rows(store) == slot_line.recount(store), (seed, op, seen)
    assert len(seen) == 10 and len(slot_line.rows(store)) >= 2, seen
    copy = SqliteStore(str(tmp_path / "copy.db"))
    try:
        data = store.export_rows()
        assert "slot_line" not in data
        copy.import_rows(data)
        with store._seam(), copy._seam():
            assert slot_line.rows(copy) == slot_line.recount(copy) == slot_line.rows(store)
    finally:
        copy.close()


def test_a_priority_out_of_range_or_not_an_integer_is_refused(store, alice):
    for bad in (1001, -1001, 1.5, "5", True, None):
        with pytest.raises(InvalidInput):
            submit(store, alice["id"], 1.0, priority=bad)
    assert store.list_tasks(alice["id"])[0] == []
    user = store.set_max_priority("alice", 7)
    assert user["max_priority"] == 7 and store.user_by_name("alice")["max_priority"] == 7
    with pytest.raises(InvalidInput):
        store.set_max_priority("alice", -1)
    with pytest.raises(NotFound):
        store.set_max_priority("nobody", 1)


def test_the_slot_line_reads_neither_per_waiting_task_nor_per_waiting_user(tmp_path):
    """Ten times the tasks waiting from the same four users, then a hundred
    times the users: a refused take_slot (the line, the wake) runs about the
    same number of SQLite VM steps. A GROUP BY over the waiting tasks ran
    ten times as many at the first; a scan over the waiting users, a
    hundred times as many at the second."""
    store = SqliteStore(str(tmp_path / "line.db"))
    try:
        users = [store.create_user(f"u{i}")[0]["id"] for i in range(4)]
        for i in range(40):
            submit(store, users[i % 4], float(i + 1))
        held = {t["id"]: t for t in store.claim("w:1:aa", now=1000.0, limit=100, lease_s=600)}
        first, *_, last = sorted(held.values(), key=lambda t: t["created_at"])
        assert store.take_slot(first["id"], token=first["lease_token"], now=1000.0, limit=2, step="submitting")
        steps = []

        def refused_steps():
            count = [0]
            con = store.write_connection()     # take_slot writes
            con.set_progress_handler(lambda: count.__setitem__(0, count[0] + 1), 10)
            try:
                assert store.take_slot(last["id"], token=last["lease_token"], now=1000.0, limit=2) is None
            finally:
                con.set_progress_handler(None, 10)
            return count[0]

        steps.append(refused_steps())
        for i in range(40, 400):
            submit(store, users[i % 4], float(i + 1))
        steps.append(refused_steps())
        for i in range(396):
            submit(store, store.create_user(f"v{i}")[0]["id"], float(500 + i))
        steps.append(refused_steps())
        assert steps[0] > 0 and steps[1] < 1.5 * steps[0] and steps[2] < 1.5 * steps[0], steps
    finally:
        store.close()


def test_iso_writes_a_timestamp_as_datetime_rounds_it():
    # iso() caches each second's text; the milliseconds must still come
    # out as datetime.fromtimestamp rounds the microseconds.
    import random
    from datetime import datetime, timezone

    from store import iso

    def by_datetime(ts):
        dt = datetime.fromtimestamp(ts, timezone.utc)
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
    rnd = random.Random(18)
    now = time.time()
    values = ([rnd.uniform(0, 4e9) for _ in range(20000)] + [now + rnd.uniform(-5, 5) for _ in range(20000)]
              + [1e9 + k / 1e6 + 5e-7 for k in range(2000)]
              + [0.0, 1.9999995, 59.9999999, 1700000000.9999996, 1700000000.0000004])
    assert [iso(v) for v in values] == [by_datetime(v) for v in values]
    assert iso(None) is None and iso(0.0) == "1970-01-01T00:00:00.000Z"
