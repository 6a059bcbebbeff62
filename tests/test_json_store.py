"""What only the JSON-file store has to prove: durability across kill -9 of
its process, torn journal lines, one process at a time, bounded journal, and
the automatic fallback."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import store as store_module
from api import create_app
from errors import StoreUnavailable
from store import JsonStore, open_store
from support import ROOT, WSGIClient

WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from store import JsonStore
    s = JsonStore({path!r})
    s.min_compact_bytes = {min_compact_bytes}
    user = s.user_by_name("alice")
    i = 0
    while True:
        now = time.time()
        task, _ = s.submit(user["id"], "demo", {{"i": i}}, now=now, deadline_at=now + 60)
        print(task["id"], flush=True)    # acknowledged: the transaction is on disk
        i += 1
""")


def snapshot_generation(path):
    with open(os.path.join(path, "holdfast.json")) as fh:
        return json.load(fh)["generation"]


def test_every_acknowledged_write_survives_kill_9(tmp_path):
    path = str(tmp_path / "js")
    s = JsonStore(path)
    s.min_compact_bytes = 1
    s.create_user("alice")
    s.close()
    started_at = snapshot_generation(path)
    # The writer compacts whenever its journal outgrows the snapshot, so the
    # kill can land in a compaction as well as in an append.
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=ROOT, path=path, min_compact_bytes=1)],
                            stdout=subprocess.PIPE, text=True)
    acked = []
    for line in proc.stdout:
        acked.append(line.strip())
        if len(acked) == 300:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    compactions = snapshot_generation(path) - started_at
    assert compactions >= 3, "the writer compacted several times before the kill"
    s = JsonStore(path)
    try:
        user = s.user_by_name("alice")
        stored = set()
        cursor = None
        while True:
            page, cursor = s.list_tasks(user["id"], limit=200, before=cursor)
            stored |= {t["id"] for t in page}
            if cursor is None:
                break
        assert set(acked) <= stored
        # Events and the task rows were written together.
        assert s.last_seq(user["id"]) == len(stored)
    finally:
        s.close()


def test_a_torn_last_journal_line_is_dropped(tmp_path):
    path = str(tmp_path / "js")
    s = JsonStore(path)
    user = s.create_user("alice")[0]
    task, _ = s.submit(user["id"], "demo", {}, now=1.0, deadline_at=9.0)
    s.close()
    with open(os.path.join(path, "holdfast.journal"), "ab") as fh:
        fh.write(b'[["INSERT INTO tasks (id) VALUES (?)", ["t_half')      # a crash mid-write
    s = JsonStore(path)
    try:
        assert [t["id"] for t in s.list_tasks(user["id"])[0]] == [task["id"]]
        s.submit(user["id"], "demo", {}, now=2.0, deadline_at=9.0)
    finally:
        s.close()
    s = JsonStore(path)
    try:
        assert len(s.list_tasks(user["id"])[0]) == 2
    finally:
        s.close()


def test_a_second_process_is_refused_with_a_clear_error(tmp_path):
    path = str(tmp_path / "js")
    s = JsonStore(path)
    try:
        code = f"import sys; sys.path.insert(0, {ROOT!r}); from store import JsonStore; JsonStore({path!r})"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert proc.returncode != 0
        assert "another holdfast process is using the JSON store" in proc.stderr
    finally:
        s.close()


def test_the_journal_is_compacted_and_stays_bounded(tmp_path):
    path = str(tmp_path / "js")
    s = JsonStore(path)
    s.min_compact_bytes = 64 * 1024
    user = s.create_user("alice")[0]
    biggest = 0
    for i in range(400):
        task, _ = s.submit(user["id"], "demo", {"prompt": "p" * 200, "i": i}, now=float(i), deadline_at=1e10)
        s.update(task["id"], token=None, now=float(i), status="running")
        biggest = max(biggest, os.path.getsize(os.path.join(path, "holdfast.journal")))
    snapshot_size = os.path.getsize(os.path.join(path, "holdfast.json"))
    assert snapshot_size > 64 * 1024, "compaction happened"
    assert biggest <= max(s.min_compact_bytes, snapshot_size) + 16 * 1024
    s.close()
    s = JsonStore(path)
    try:
        tasks, _ = s.list_tasks(user["id"], limit=200)
        assert len(tasks) == 200 and all(t["status"] == "running" for t in tasks)
        assert s.last_seq() == 800
    finally:
        s.close()


def test_sqlite_without_wal_falls_back_loudly_to_json(tmp_path, monkeypatch, caplog, providers, config):
    def no_wal(path, **_):
        raise StoreUnavailable(f"SQLite file {path} cannot use WAL mode (got delete)", code="no_wal")

    monkeypatch.setitem(store_module.BACKENDS, "sqlite", store_module.BACKENDS["sqlite"])
    monkeypatch.setattr(store_module, "SqliteStore", no_wal)
    s = open_store("sqlite", str(tmp_path))
    try:
        assert isinstance(s, JsonStore) and s.name == "json (fallback)"
        assert any("Falling back to the JSON-file store" in r.message for r in caplog.records)
        health = WSGIClient(create_app(s, providers, config)).get("/healthz")
        assert health.status == 200 and health.json()["store"] == "json (fallback)"
    finally:
        s.close()


def test_an_unknown_store_name_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="unknown store"):
        open_store("mongodb://x", str(tmp_path))


# The child compacts and is killed between the two steps: the new snapshot is
# on disk, the journal it already holds is not yet emptied.
COMPACT_THEN_DIE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import store.jsonfile
    real = store.jsonfile._fsync_dir

    def die_after_the_snapshot(path):
        real(path)
        os.kill(os.getpid(), signal.SIGKILL)

    s = store.JsonStore({path!r})
    store.jsonfile._fsync_dir = die_after_the_snapshot
    s.compact()
""")


@pytest.mark.parametrize("journal", ["grants only", "users, grants and tasks"])
def test_a_crash_between_snapshot_and_journal_reset_applies_nothing_twice(tmp_path, journal):
    path = str(tmp_path / "js")
    s = JsonStore(path)
    alice = s.create_user("alice", credits=10)[0]
    if journal == "grants only":
        s.compact()          # alice is in the snapshot; only the grants are in the journal
    s.grant(alice["id"], 5, now=1.0)
    s.grant(alice["id"], 7, now=2.0)
    if journal != "grants only":
        s.create_user("bob", credits=3)
        task, _ = s.submit(alice["id"], "demo", {"p": 1}, now=3.0, deadline_at=99.0, cost=4)
        s.cancel(task["id"], alice["id"], now=4.0)
        s.submit(alice["id"], "demo", {"p": 2}, now=5.0, deadline_at=99.0, cost=2)
    before = s.export_rows()
    s.close()
    journal_path = os.path.join(path, "holdfast.journal")
    journal_bytes = open(journal_path, "rb").read()
    assert journal_bytes

    proc = subprocess.run([sys.executable, "-c", COMPACT_THEN_DIE.format(root=ROOT, path=path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert open(journal_path, "rb").read() == journal_bytes, "killed before the journal was emptied"

    s = JsonStore(path)
    try:
        assert s.export_rows() == before
        assert s.user_by_name("alice")["credit_balance"] == before["users"][0]["credit_balance"]
        assert [r["amount"] for r in s.ledger(user_id=alice["id"]) if r["kind"] == "grant"] == [10, 5, 7]
        s.grant(alice["id"], 1, now=6.0)       # the store writes on as usual
        after = s.export_rows()
    finally:
        s.close()
    s = JsonStore(path)
    try:
        assert s.export_rows() == after
    finally:
        s.close()


def test_files_written_before_generations_were_numbered_still_load(tmp_path):
    path = str(tmp_path / "js")
    s = JsonStore(path)
    alice = s.create_user("alice", credits=10)[0]
    s.compact()
    s.grant(alice["id"], 5, now=1.0)
    before = s.export_rows()
    s.close()
    snapshot_path, journal_path = os.path.join(path, "holdfast.json"), os.path.join(path, "holdfast.journal")
    with open(snapshot_path) as fh:
        data = json.load(fh)
    del data["generation"]
    with open(snapshot_path, "w") as fh:
        json.dump(data, fh)
    with open(journal_path, "rb") as fh:
        header, *lines = fh.readlines()
    assert json.loads(header) == {"generation": 1}
    with open(journal_path, "wb") as fh:
        fh.writelines(lines)
    s = JsonStore(path)
    try:
        assert s.export_rows() == before
    finally:
        s.close()


def test_a_journal_newer_than_its_snapshot_is_refused(tmp_path):
    path = str(tmp_path / "js")
    s = JsonStore(path)
    alice = s.create_user("alice", credits=10)[0]
    s.compact()
    old_snapshot = open(os.path.join(path, "holdfast.json"), "rb").read()
    s.grant(alice["id"], 5, now=1.0)
    s.compact()
    s.grant(alice["id"], 7, now=2.0)
    s.close()
    with open(os.path.join(path, "holdfast.json"), "wb") as fh:
        fh.write(old_snapshot)        # as a restore of an old backup would
    journal = open(os.path.join(path, "holdfast.journal"), "rb").read()
    with pytest.raises(StoreUnavailable, match="refusing to open") as info:
        JsonStore(path)
    assert info.value.code == "journal_mismatch"
    assert open(os.path.join(path, "holdfast.journal"), "rb").read() == journal


def test_a_failed_compaction_keeps_the_committed_write_and_retries_later(tmp_path, caplog, clock):
    path = str(tmp_path / "js")
    s = JsonStore(path, clock=clock)
    s.min_compact_bytes = 1
    user = s.create_user("alice", credits=100)[0]
    generation = snapshot_generation(path)
    # The next snapshot cannot be written (a real OSError, as a full disk gives).
    blocker = os.path.join(path, "holdfast.json.tmp")
    os.mkdir(blocker)
    caplog.set_level(logging.WARNING, logger="holdfast.store")

    def tries():
        return [r.getMessage() for r in caplog.records if "cannot compact" in r.getMessage()]

    def submit(i):
        return s.submit(user["id"], "demo", {"i": i}, now=float(i), deadline_at=1e10, cost=1)[0]["id"]

    try:
        ids = [submit(0)]                 # committed, so reported as committed
        assert len(tries()) == 1 and "\n" not in tries()[0]
        ids += [submit(i) for i in range(1, 20)]
        assert len(tries()) == 1, "not tried again on every write"
        first, _ = JsonStore.compact_retry_s
        clock.advance(first + 0.1)
        ids.append(submit(20))
        assert len(tries()) == 2
        clock.advance(first + 0.1)        # the delay doubled
        ids.append(submit(21))
        assert len(tries()) == 2
        clock.advance(first)
        ids.append(submit(22))
        assert len(tries()) == 3
        assert snapshot_generation(path) == generation
        os.rmdir(blocker)
        clock.advance(4 * first + 0.1)
        ids.append(submit(23))
        assert len(tries()) == 3
        assert snapshot_generation(path) == generation + 1
        assert os.path.getsize(os.path.join(path, "holdfast.journal")) == 0
        # Success resets the delay: the next failure waits the first one again.
        os.mkdir(blocker)
        i = 24
        while len(tries()) == 3 and i < 500:
            ids.append(submit(i))
            i += 1
        assert tries()[-1].endswith(f"trying again in {first:.0f} s")
        before = s.export_rows()
    finally:
        s.close()
    s = JsonStore(path)
    try:
        assert s.export_rows() == before
        assert {t["id"] for t in before["tasks"]} == set(ids)
        assert s.user_by_name("alice")["credit_balance"] == 100 - len(ids)
    finally:
        s.close()


# The disk fills in the middle of a journal line (RLIMIT_FSIZE: a real short
# write, then EFBIG), then has room again.
DISK_FULL_MID_LINE = textwrap.dedent("""
    import json, os, resource, signal, sys
    sys.path.insert(0, {root!r})
    from errors import StoreUnavailable
    from store import JsonStore
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    s = JsonStore({path!r})
    user = s.user_by_name("alice")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(s.journal_path) + 100, hard))
    try:
        s.submit(user["id"], "demo", {{"prompt": "x" * 2000}}, now=2.0, deadline_at=1e10, cost=3)
        print(json.dumps({{"refused": None}}))
    except StoreUnavailable as exc:
        print(json.dumps({{"refused": exc.message}}))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    s.submit(user["id"], "demo", {{"prompt": "after"}}, now=3.0, deadline_at=1e10, cost=1)
    print(json.dumps(s.export_rows()))
    s.close()
""")


def test_a_journal_line_cut_short_by_a_full_disk_is_removed(tmp_path):
    path = str(tmp_path / "js")
    s = JsonStore(path)
    user = s.create_user("alice", credits=10)[0]
    s.submit(user["id"], "demo", {"prompt": "before"}, now=1.0, deadline_at=1e10, cost=1)
    s.close()
    proc = subprocess.run([sys.executable, "-c", DISK_FULL_MID_LINE.format(root=ROOT, path=path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    refusal, memory = (json.loads(line) for line in proc.stdout.splitlines())
    assert "cannot write the JSON journal" in refusal["refused"]
    # The refused task is gone from memory, the later one is there.
    assert [t["params"] for t in memory["tasks"]] == ['{"prompt":"before"}', '{"prompt":"after"}']
    assert memory["users"][0]["credit_balance"] == 8
    s = JsonStore(path)
    try:
        assert s.export_rows() == memory
    finally:
        s.close()


def every_kind_of_write(s, now, prefix=""):
    """One of each write the server makes: accounts, the task life cycle,
    leases and slots, sessions, retention. Each call checks it did something,
    so a change in the store cannot quietly make this test test less."""
    alice = s.create_user(prefix + "alice", credits=50, max_active=5, rate_per_s=2.0, now=now)[0]
    bob = s.create_user(prefix + "bob", admin=True, now=now)[0]
    s.grant(alice["id"], 10, now=now + 1)
    s.grant(alice["id"], -3, now=now + 2)
    done, _ = s.submit(alice["id"], "demo", {"p": "done"}, now=now + 3, deadline_at=now + 1e5, cost=4,
                       dedupe_key="k1")
    assert s.submit(alice["id"], "demo", {"p": "done"}, now=now + 3, deadline_at=now + 1e5, cost=4,
                    dedupe_key="k1")[1], "deduplicated"
    failed, _ = s.submit(alice["id"], "demo", {"p": "failed"}, now=now + 4, deadline_at=now + 1e5, cost=2)
    cancelled, _ = s.submit(alice["id"], "demo", {"p": "cancelled"}, now=now + 5, deadline_at=now + 1e5, cost=1)
    late, _ = s.submit(bob["id"], "demo", {"p": "late"}, now=now + 6, deadline_at=now + 7)
    leased, _ = s.submit(bob["id"], "demo", {"p": "leased"}, now=now + 6, deadline_at=now + 1e5)
    claimed = {t["id"]: t for t in s.claim("host:1:a", now=now + 10, limit=10, lease_s=30)}
    assert {done["id"], failed["id"], cancelled["id"], late["id"], leased["id"]} <= set(claimed)
    token = claimed[done["id"]]["lease_token"]
    assert s.take_slot(done["id"], token=token, now=now + 11, limit=2, step="submitting", external_id="x-1")
    s.renew_lease(done["id"], token=token, expires_at=now + 100)
    s.update(done["id"], token=token, now=now + 12, status="running", attempts=1, progress=0.5)
    s.reschedule(done["id"], token=token, next_poll_at=now + 13, polls=1, state={"cursor": 3})
    token = s.claim_task(done["id"], "host:1:a", now=now + 14, lease_s=30)["lease_token"]
    s.update(done["id"], token=token, now=now + 15, status="succeeded", release=True,
             files=[{"name": "out_0.png", "size": 3, "sha256": "ab", "content_type": "image/png"}])
    token = claimed[failed["id"]]["lease_token"]
    s.update(failed["id"], token=token, now=now + 16, status="failed",
             error={"code": "provider_rejected", "message": "no"})
    s.cancel(cancelled["id"], alice["id"], now=now + 17)
    s.expire(late["id"], now=now + 18, error={"code": "timeout", "message": "past its deadline"})
    assert s.release_leases(["host:1:a"]) >= 1
    s.claim_task(leased["id"], "host:2:b", now=now + 19, lease_s=1)
    assert s.release_expired_leases(now=now + 30) == 1
    # A finished task still holding its reservation (as an old version could
    # leave it), settled by recovery.
    stray, _ = s.submit(alice["id"], "demo", {"p": "stray"}, now=now + 20, deadline_at=now + 1e5, cost=5)
    with s._seam(), s._write():
        s._exec("UPDATE tasks SET status = 'failed', finished_at = ? WHERE id = ?", (now + 21, stray["id"]))
    assert s.settle_stray(stray["id"], now=now + 22) == "refunded"

    s.put_session(alice["id"], "chat", messages=[{"role": "user", "content": "hi"}], data={"a": 1},
                  now=now + 23, ttl_s=100)
    s.append_messages(alice["id"], "chat", [{"role": "assistant", "content": "hello"}], now=now + 24, ttl_s=100)
    s.put_session(alice["id"], "gone", messages=[], data=None, now=now + 25, ttl_s=100)
    assert s.delete_session(alice["id"], "gone", now=now + 26)
    s.put_session(bob["id"], "brief", messages=[], data=None, now=now + 27, ttl_s=1)
    assert s.purge_sessions(now=now + 40) >= 1

    assert s.tasks_with_old_files(before=now + 50, limit=10) == [done["id"]]
    assert s.mark_files_expired([done["id"]], now=now + 51) == 1
    assert late["id"] in s.finished_before(before=now + 19, limit=100)
    assert s.delete_finished([late["id"]], before=now + 19)[0] == 1
    assert s.purge_events(before=now + 16) >= 1


@pytest.mark.parametrize("compacted", [False, True], ids=["journal only", "snapshot and journal"])
def test_every_kind_of_write_is_on_disk(tmp_path, compacted):
    path = str(tmp_path / "js")
    s = JsonStore(path)
    try:
        every_kind_of_write(s, 1_000.0)
        if compacted:
            s.compact()
            every_kind_of_write(s, 2_000.0, prefix="more_")
        before = s.export_rows()
    finally:
        s.close()
    assert all(before[t] for t in ("users", "tasks", "events", "ledger", "sessions", "task_history",
                                   "file_expiry"))
    s = JsonStore(path)
    try:
        assert s.export_rows() == before
    finally:
        s.close()


def test_read_only_reads_past_a_torn_tail_and_writes_nothing(tmp_path):
    path = str(tmp_path / "js")
    s = JsonStore(path)
    s.create_user("alice")
    before = s.export_rows()
    s.close()
    journal = os.path.join(path, "holdfast.journal")
    with open(journal, "ab") as fh:
        fh.write(b'[["INSERT INTO tasks (id) VALUES (?)", ["t_half')
    on_disk = {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)}
    s = JsonStore(path, read_only=True)
    try:
        assert s.export_rows() == before
        with pytest.raises(StoreUnavailable) as info:
            s.create_user("bob")
        assert info.value.code == "read_only"
    finally:
        s.close()
    assert {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)} == on_disk


@pytest.mark.parametrize("read_only", [False, True])
def test_opens_a_journal_left_past_the_compaction_threshold(tmp_path, monkeypatch, read_only):
    """A kill between a journal append and the compaction it called for
    leaves a journal bigger than the threshold; opening it again (or a copy
    read-only, as recover does) loads it, and a writer compacts it then."""
    path = str(tmp_path / "js")
    s = JsonStore(path)
    s.min_compact_bytes = 1 << 30         # the compaction that the kill prevented
    user = s.create_user("alice", credits=100)[0]
    s.compact()
    ids = [s.submit(user["id"], "demo", {"i": i}, now=float(i), deadline_at=1e10)[0]["id"] for i in range(30)]
    s.close()
    journal = os.path.join(path, "holdfast.journal")
    assert os.path.getsize(journal) > os.path.getsize(os.path.join(path, "holdfast.json"))
    generation = snapshot_generation(path)
    monkeypatch.setattr(JsonStore, "min_compact_bytes", 1)
    again = JsonStore(path, read_only=read_only)
    try:
        assert [again.get_task(i, user["id"])["id"] for i in ids] == ids
    finally:
        again.close()
    if read_only:
        assert snapshot_generation(path) == generation
    else:
        assert snapshot_generation(path) == generation + 1
        assert os.path.getsize(journal) == 0
