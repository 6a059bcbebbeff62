"""python recover.py --audit [--fix]: finished tasks missing their files,
reservations left on finished tasks, settlements that contradict their
task, and files without a task; --fix repairs only what is safe."""

import json
import os
import sqlite3

import pytest

from store import FileStore, SqliteStore, new_task_id
from test_recover import run_recover, snapshot

T0 = 1_800_000_000.0


def finished(store, files, user_id, *, status="succeeded", cost=0, data=b"png bytes", now=T0):
    task, _ = store.submit(user_id, "demo", {}, now=now, deadline_at=now + 1e6, cost=cost)
    held = store.claim_task(task["id"], "t:1:x", now=now, lease_s=60)
    store.update(task["id"], token=held["lease_token"], now=now, status="running")
    changes = {}
    if status == "succeeded" and files is not None:
        changes["files"] = [files.save(task["id"], "out_0.png", [data], max_bytes=1000)]
    if status == "failed":
        changes["error"] = {"code": "provider_rejected", "message": "no"}
    store.update(task["id"], token=held["lease_token"], now=now + 1, status=status, **changes)
    return task["id"]


@pytest.fixture
def messy(tmp_path):
    """A data directory with one of each inconsistency, and a clean task."""
    store = SqliteStore(str(tmp_path / "holdfast.db"))
    files = FileStore(str(tmp_path / "files"))
    uid = store.create_user("alice", credits=100)[0]["id"]
    ok = finished(store, files, uid)
    lost = finished(store, files, uid)
    os.unlink(files.path(lost, "out_0.png"))
    shrunk = finished(store, files, uid)
    with open(files.path(shrunk, "out_0.png"), "wb") as fh:
        fh.write(b"png")
    expired = finished(store, files, uid)
    files.remove_task(expired)
    store.mark_files_expired([expired], now=T0 + 10)
    # A task that failed while its credits stayed reserved, and one whose
    # charge stands though the task says failed (as a bad restore or a hand
    # edit could leave them).
    stray = store.submit(uid, "demo", {}, now=T0, deadline_at=T0 + 1e6, cost=7)[0]["id"]
    charged = finished(store, files, uid, cost=5)
    store.close()
    con = sqlite3.connect(str(tmp_path / "holdfast.db"))
    with con:
        con.execute("UPDATE tasks SET status = 'failed', finished_at = ?, "
                    "error = '{\"code\": \"internal\", \"message\": \"x\"}' WHERE id = ?", (T0 + 5, stray))
        con.execute("UPDATE tasks SET status = 'failed', files = '[]' WHERE id = ?", (charged,))
    con.close()
    files.remove_task(charged)
    orphan = new_task_id(T0)
    (tmp_path / "files" / orphan).mkdir()
    (tmp_path / "files" / orphan / "out_0.png").write_bytes(b"nobody's")
    (tmp_path / "files" / "notes.txt").write_text("not holdfast's: left alone")
    return {"dir": tmp_path, "ok": ok, "lost": lost, "shrunk": shrunk, "expired": expired, "stray": stray,
            "charged": charged, "orphan": orphan, "user": uid}


def audit(data_dir, *args):
    proc = run_recover(data_dir, "--audit", "--json", *args)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_audit_reports_every_problem_and_changes_nothing(messy):
    before = snapshot(messy["dir"])
    code, report = audit(messy["dir"])
    assert code == 1
    assert report["tasks_missing_files"] == sorted([
        {"task_id": messy["lost"], "missing": ["out_0.png"], "wrong_size": []},
        {"task_id": messy["shrunk"], "missing": [], "wrong_size": ["out_0.png"]}], key=lambda r: r["task_id"])
    assert report["stray_reservations"] == [messy["stray"]]
    assert [(m["task_id"], m["kind"], m["status"], m["amount"]) for m in report["settlement_mismatches"]] == [
        (messy["charged"], "charge", "failed", 5)]
    assert report["orphan_files"] == [messy["orphan"]]
    assert report["found"] == 5 and report["unfixed"] == 5
    assert report["reservations_settled"] == {} and report["orphans_deleted"] == []
    assert snapshot(messy["dir"]) == before
    assert (messy["dir"] / "files" / messy["orphan"]).exists()


def test_fix_settles_stray_reservations_and_deletes_orphans_and_reports_the_rest(messy):
    store = SqliteStore(str(messy["dir"] / "holdfast.db"))
    balance = store.user_by_name("alice")["credit_balance"]
    store.close()
    code, report = audit(messy["dir"], "--fix")
    assert code == 1, "missing files and a contradicting charge need a human"
    assert report["reservations_settled"] == {messy["stray"]: "refunded"}
    assert report["orphans_deleted"] == [messy["orphan"]] and report["unfixed"] == 3
    assert not (messy["dir"] / "files" / messy["orphan"]).exists()
    assert (messy["dir"] / "files" / "notes.txt").exists()
    store = SqliteStore(str(messy["dir"] / "holdfast.db"))
    try:
        assert store.user_by_name("alice")["credit_balance"] == balance + 7
        assert store.get_task(messy["stray"])["credits"] == "refunded"
        assert [r["kind"] for r in store.ledger(task_id=messy["stray"])] == ["reserve", "refund"]
        assert os.path.exists(FileStore(str(messy["dir"] / "files")).path(messy["ok"], "out_0.png"))
    finally:
        store.close()

    code, again = audit(messy["dir"], "--fix")
    assert code == 1 and again["stray_reservations"] == [] and again["orphan_files"] == []
    assert again["reservations_settled"] == {} and again["found"] == again["unfixed"] == 3
    store = SqliteStore(str(messy["dir"] / "holdfast.db"))
    try:
        assert store.user_by_name("alice")["credit_balance"] == balance + 7, "refunded once"
    finally:
        store.close()


def test_a_consistent_store_exits_0(tmp_path):
    store = SqliteStore(str(tmp_path / "holdfast.db"))
    files = FileStore(str(tmp_path / "files"))
    uid = store.create_user("alice", credits=10)[0]["id"]
    finished(store, files, uid, cost=2)
    finished(store, files, uid, status="failed", cost=2)
    store.close()
    proc = run_recover(tmp_path, "--audit")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("-> consistent")


@pytest.mark.parametrize("args", [["--fix"], ["--audit", "--dry-run"], ["--audit", "--export", "x.json"]])
def test_bad_flag_combinations_are_usage_errors(tmp_path, args):
    proc = run_recover(tmp_path, *args)
    assert proc.returncode == 2 and "usage" in proc.stderr


class TestAuditQueries:
    """The store's side of the audit, on every backend."""

    def test_slot_line_drift_is_found_and_counted_again(self, store):
        alice = store.create_user("alice")[0]["id"]
        bob = store.create_user("bob")[0]["id"]
        for user, at, priority in ((alice, 1.0, 0), (alice, 2.0, 3), (bob, 3.0, 0)):
            store.submit(user, "demo", {}, now=T0 + at, deadline_at=T0 + 1e6, priority=priority)
        assert store.slot_line_drift() == []
        with store._seam(), store._write():
            store._exec("UPDATE slot_line SET best = 0 WHERE user_id = ?", (alice,))
            store._exec("DELETE FROM slot_line WHERE user_id = ?", (bob,))
        assert store.slot_line_drift() == [("demo", alice), ("demo", bob)]
        assert store.rebuild_slot_line(store.slot_line_drift()) == 2
        assert store.slot_line_drift() == []
        assert sorted(store._exec("SELECT user_id, best, since FROM slot_line").fetchall()) == [
            (alice, 3, T0 + 1.0), (bob, 0, T0 + 3.0)]

    def test_files_listed_pages_and_flags_expired(self, store, tmp_path):
        files = FileStore(str(tmp_path / "f"))
        uid = store.create_user("alice")[0]["id"]
        ids = sorted(finished(store, files, uid, now=T0 + i) for i in range(5))
        finished(store, files, uid, status="failed")
        store.mark_files_expired([ids[1]], now=T0)
        first = store.files_listed(limit=3)
        rest = store.files_listed(after=first[-1][0], limit=3)
        assert [r[0] for r in first + rest] == ids
        assert [r[2] for r in first + rest] == [False, True, False, False, False]
        assert first[0][1][0]["name"] == "out_0.png"

    def test_settlement_mismatches_and_existing_ids(self, store):
        uid = store.create_user("alice", credits=10)[0]["id"]
        charged = finished(store, None, uid, cost=3)
        refunded = finished(store, None, uid, status="failed", cost=2)
        assert store.settlement_mismatches() == []
        with store._seam(), store._write():
            store._exec("UPDATE tasks SET status = 'cancelled' WHERE id = ?", (charged,))
            store._exec("UPDATE tasks SET status = 'partial' WHERE id = ?", (refunded,))
        got = {(m["task_id"], m["kind"], m["status"], m["amount"], m["user_id"]) for m in store.settlement_mismatches()}
        assert got == {(charged, "charge", "cancelled", 3, uid), (refunded, "refund", "partial", 2, uid)}
        ghost = new_task_id(T0)
        assert store.existing_task_ids([charged, ghost, refunded]) == {charged, refunded}
        assert store.existing_task_ids([]) == set()


    def test_files_of_says_whose_folder_it_is(self, store, tmp_path):
        files = FileStore(str(tmp_path / "f"))
        uid = store.create_user("alice")[0]["id"]
        done = finished(store, files, uid)
        failed = finished(store, files, uid, status="failed")
        active = store.submit(uid, "demo", {}, now=T0, deadline_at=T0 + 1e6)[0]["id"]
        store.mark_files_expired([done], now=T0)
        got = store.files_of([done, failed, active, new_task_id(T0)])
        assert set(got) == {done, failed, active}
        status, listed, expired = got[done]
        assert status == "succeeded" and [f["name"] for f in listed] == ["out_0.png"] and expired is True
        assert got[failed] == ("failed", [], False) and got[active] == ("queued", [], False)
        assert store.files_of([]) == {}


def test_files_retention_deletes_during_the_audit_are_not_reported(tmp_path, monkeypatch):
    from recover import audit as run_audit
    store = SqliteStore(str(tmp_path / "holdfast.db"))
    files = FileStore(str(tmp_path / "files"))
    try:
        uid = store.create_user("alice")[0]["id"]
        expiring, gone, lost = (finished(store, files, uid) for _ in range(3))
        os.unlink(files.path(lost, "out_0.png"))
        listed = store.files_listed

        def retention_runs_meanwhile(**kw):
            page = listed(**kw)
            for task_id in (expiring, gone):
                files.remove_task(task_id)
            store.mark_files_expired([expiring], now=T0)
            store.delete_finished([gone], before=T0 + 10)
            return page

        monkeypatch.setattr(store, "files_listed", retention_runs_meanwhile)
        report = run_audit(store, files, now=T0 + 20)
        assert [m["task_id"] for m in report["tasks_missing_files"]] == [lost]
    finally:
        store.close()


def test_the_summary_line_names_the_tasks_it_counts_a_few_of_each(messy):
    """Without --json the one line names what it counts: the ids of each
    kind of problem, the first five and how many more."""
    extra = sorted(new_task_id(T0 + i) for i in range(1, 7))
    for task_id in extra:
        (messy["dir"] / "files" / task_id).mkdir()
    proc = run_recover(messy["dir"], "--audit")
    assert proc.returncode == 1, proc.stderr
    [line] = proc.stdout.splitlines()
    lost, shrunk = sorted([messy["lost"], messy["shrunk"]])
    assert f"2 finished task(s) missing files ({lost}, {shrunk})" in line
    assert f"1 stray reservation(s) ({messy['stray']})" in line
    assert f"1 settlement(s) contradicting their task ({messy['charged']} charge but failed)" in line
    orphans = sorted([messy["orphan"], *extra])
    assert f"7 folder(s) of files without a task ({', '.join(orphans[:5])} and 2 more)" in line
    for hidden in orphans[5:]:
        assert hidden not in line
    assert "0 file(s) whose bytes do not match their sha256 (checked" in line


def test_a_slot_line_out_of_step_with_its_tasks_is_reported_and_counted_again(tmp_path):
    """The summary take_slot reads is kept by triggers; a hand edit (or a
    restore that skipped them) leaves it wrong, which the audit finds and
    --fix counts again from the tasks, changing nothing else."""
    path = str(tmp_path / "holdfast.db")
    store = SqliteStore(path)
    alice = store.create_user("alice")[0]["id"]
    bob = store.create_user("bob")[0]["id"]
    for user, at, priority in ((alice, 1.0, 0), (alice, 2.0, 3), (bob, 3.0, 0)):
        store.submit(user, "demo", {}, now=T0 + at, deadline_at=T0 + 1e6, priority=priority)
    want = sorted(store._exec("SELECT provider, user_id, best, since FROM slot_line").fetchall())
    store.close()
    con = sqlite3.connect(path)
    with con:
        con.execute("UPDATE slot_line SET best = 0 WHERE user_id = ?", (alice,))
        con.execute("DELETE FROM slot_line WHERE user_id = ?", (bob,))
        con.execute("INSERT INTO slot_line (provider, user_id, best, since) VALUES ('demo', 999, 1, 0)")
    con.close()
    before = snapshot(tmp_path)

    code, report = audit(tmp_path)
    assert code == 1 and report["found"] == report["unfixed"] == 3
    assert report["slot_line_drift"] == [{"provider": "demo", "user_id": u} for u in sorted([alice, bob, 999])]
    assert f"3 user(s) whose place in a provider's line disagrees with their tasks (demo/{min(alice, bob)}" \
        in report["summary"]
    assert snapshot(tmp_path) == before

    code, report = audit(tmp_path, "--fix")
    assert code == 0 and report["slot_line_rebuilt"] == 3 and report["unfixed"] == 0
    assert "(counted again)" in report["summary"]
    store = SqliteStore(path)
    try:
        assert sorted(store._exec("SELECT provider, user_id, best, since FROM slot_line").fetchall()) == want
        assert store.slot_line_drift() == []
    finally:
        store.close()
    code, again = audit(tmp_path)
    assert code == 0 and again["found"] == 0 and again["slot_line_drift"] == []
