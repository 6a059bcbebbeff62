"""recover.py: it finds what a crash left behind, --dry-run changes nothing,
and export/import move every row between stores."""

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from store import FileStore, JsonStore, SqliteStore
from support import ROOT


def run_recover(data_dir, *args, store="sqlite"):
    env = {**os.environ, "HOLDFAST_DATA": str(data_dir), "HOLDFAST_STORE": store}
    env.pop("HOLDFAST_CONFIG", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "recover.py"), *args], env=env,
                          cwd=str(data_dir), capture_output=True, text=True, timeout=60)
    return proc


def snapshot(data_dir):
    """Every row and every file name under the data directory."""
    store = SqliteStore(str(data_dir / "holdfast.db"))
    try:
        rows = store.export_rows()
    finally:
        store.close()
    files = sorted(os.path.relpath(os.path.join(d, n), data_dir)
                   for d, _, names in os.walk(data_dir / "files") for n in names)
    return rows, files


def fingerprint(data_dir):
    """Every folder and file under the data directory (backups/ too), files
    with the sha256 of their bytes: what "changes nothing" means on disk."""
    out = {}
    for folder, dirs, names in os.walk(data_dir):
        for name in dirs:
            out[os.path.relpath(os.path.join(folder, name), data_dir)] = "folder"
        for name in names:
            with open(os.path.join(folder, name), "rb") as fh:
                out[os.path.relpath(os.path.join(folder, name), data_dir)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture
def crashed(tmp_path):
    """A data directory as a crash leaves it: a lease that ran out, a task
    past its deadline, a half-written download, a submission in doubt."""
    store = SqliteStore(str(tmp_path / "holdfast.db"))
    files = FileStore(str(tmp_path / "files"))
    user = store.create_user("alice", credits=10)[0]
    now = time.time()
    leased, _ = store.submit(user["id"], "demo", {"prompt": "a", "duration_s": 0}, now=now - 120,
                             deadline_at=now + 3600)
    store.claim("otherhost:1:abcd", now=now - 120, limit=1, lease_s=30)
    late, _ = store.submit(user["id"], "demo", {"prompt": "b"}, now=now - 100, deadline_at=now - 10, cost=3)
    doubt, _ = store.submit(user["id"], "demo", {"prompt": "c", "duration_s": 600}, now=now,
                            deadline_at=now + 3600)
    held = store.claim_task(doubt["id"], "otherhost:2:abcd", now=now, lease_s=0.0)
    store.update(doubt["id"], token=held["lease_token"], now=now, external_id=f"demo-{int(now * 1000)}-00ff",
                 attempts=1, release=True)
    part = tmp_path / "files" / leased["id"] / "out_0.png.1234abcd.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\x89PNG half")
    store.close()
    return {"dir": tmp_path, "leased": leased["id"], "late": late["id"], "doubt": doubt["id"],
            "part": part, "files": files}


def test_dry_run_reports_everything_and_changes_nothing(crashed):
    before = snapshot(crashed["dir"])
    on_disk = fingerprint(crashed["dir"])
    proc = run_recover(crashed["dir"], "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["dry_run"] is True
    assert report["expired_leases"] == [crashed["leased"]]
    assert report["past_deadline"] == [crashed["late"]]
    assert report["partial_files"] == [str(crashed["part"])]
    assert report["submissions_in_doubt"] == [crashed["doubt"]]
    assert fingerprint(crashed["dir"]) == on_disk
    assert snapshot(crashed["dir"]) == before
    assert crashed["part"].exists()


def test_recover_fixes_what_it_found(crashed):
    proc = run_recover(crashed["dir"], "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["leases_released"] >= 1
    assert report["failed_past_deadline"] == 1
    assert report["submissions_reconciled"] == {crashed["doubt"]: "running"}
    assert not crashed["part"].exists()
    store = SqliteStore(str(crashed["dir"] / "holdfast.db"))
    try:
        assert store.get_task(crashed["leased"])["lease_owner"] is None
        late = store.get_task(crashed["late"])
        assert late["status"] == "failed" and late["error"]["code"] == "timeout"
        assert late["credits"] == "refunded" and store.user_by_name("alice")["credit_balance"] == 10
        doubt = store.get_task(crashed["doubt"])
        assert doubt["status"] == "running" and doubt["attempts"] == 1, "found, not submitted again"
    finally:
        store.close()
    again = json.loads(run_recover(crashed["dir"], "--json").stdout)
    assert again["changed"] is False


def test_a_stray_reservation_is_settled_once(tmp_path):
    store = SqliteStore(str(tmp_path / "holdfast.db"))
    user = store.create_user("alice", credits=10)[0]
    task, _ = store.submit(user["id"], "demo", {}, now=1.0, deadline_at=99.0, cost=4)
    # As an older version or a hand edit might leave it: ended, still reserved.
    store._exec("UPDATE tasks SET status = 'failed' WHERE id = ?", (task["id"],))
    assert [t["id"] for t in store.stray_reservations()] == [task["id"]]
    store.close()
    for _ in range(2):
        assert run_recover(tmp_path).returncode == 0
    store = SqliteStore(str(tmp_path / "holdfast.db"))
    try:
        ledger = [(r["kind"], r["amount"]) for r in store.export_rows()["ledger"] if r["task_id"] == task["id"]]
        assert sorted(ledger) == [("refund", 4), ("reserve", 4)]
        assert store.user_by_name("alice")["credit_balance"] == 10
        assert store.get_task(task["id"])["credits"] == "refunded"
    finally:
        store.close()


def test_export_from_sqlite_import_into_json_export_again_is_identical(crashed, tmp_path):
    assert run_recover(crashed["dir"]).returncode == 0       # some history: events, ledger, ends
    store = SqliteStore(str(crashed["dir"] / "holdfast.db"))
    try:
        alice = store.user_by_name("alice")["id"]
        store.put_session(alice, "chat", messages=[{"role": "user", "content": "hi"}], data={"n": 1},
                          now=time.time(), ttl_s=3600)
        store.mark_files_expired([crashed["late"]], now=time.time())
        store.add_webhook_endpoint(alice, "https://hooks.example.com/a", ["finished"], now=time.time())
        store.submit(alice, "demo", {"prompt": "w"}, now=time.time(), deadline_at=time.time() + 60,
                     webhook={"url": "https://hooks.example.com/t", "events": ["created"]})
    finally:
        store.close()
    first = tmp_path / "first.json"
    assert run_recover(crashed["dir"], "--export", str(first)).returncode == 0
    target = tmp_path / "json-target"
    target.mkdir()
    proc = run_recover(target, "--import", str(first), store="json")
    assert proc.returncode == 0, proc.stderr
    second = tmp_path / "second.json"
    assert run_recover(target, "--export", str(second), store="json").returncode == 0
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert a == b
    empty = [table for table, rows in a["tables"].items() if not rows]
    assert empty == [], f"nothing in {empty} is moved by this test"
    # The imported store works: tokens, tasks, events, sessions are all there.
    store = JsonStore(str(target))
    try:
        assert store.last_seq() == max(e["seq"] for e in a["tables"]["events"])
        assert {t["id"] for t in store.list_tasks(1, limit=200)[0]} == {t["id"] for t in a["tables"]["tasks"]}
        assert store.get_session(alice, "chat", now=time.time())["data"] == {"n": 1}
        assert store.files_expired_at(crashed["late"]) is not None
    finally:
        store.close()


def test_import_refuses_a_store_that_is_not_empty_and_a_foreign_file(crashed, tmp_path):
    dump = tmp_path / "dump.json"
    assert run_recover(crashed["dir"], "--export", str(dump)).returncode == 0
    before = snapshot(crashed["dir"])
    proc = run_recover(crashed["dir"], "--import", str(dump))
    assert proc.returncode == 2 and "not empty" in proc.stderr
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"tables": {}}')
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_recover(empty, "--import", str(bogus))
    assert proc.returncode == 2 and "not a holdfast export" in proc.stderr
    assert snapshot(crashed["dir"]) == before


def make_schema_older(path):
    """Turn a current database into what the previous holdfast left: its
    last migration undone."""
    from store import MIGRATIONS
    latest = max(v for v, _ in MIGRATIONS)
    con = sqlite3.connect(path)
    with con:
        con.execute("DROP INDEX tasks_retry_once")    # what migration 5 adds
        con.execute("DELETE FROM schema_version WHERE version = ?", (latest,))
    con.close()
    return latest


@pytest.mark.parametrize("args", [["--dry-run"], ["--audit"]])
def test_looking_at_an_older_schema_is_refused_not_migrated(crashed, args):
    from store import MIGRATIONS
    latest = make_schema_older(str(crashed["dir"] / "holdfast.db"))
    previous = sorted(v for v, _ in MIGRATIONS)[-2]     # numbers may skip one given to another branch
    on_disk = fingerprint(crashed["dir"])
    proc = run_recover(crashed["dir"], *args)
    assert proc.returncode == 2
    assert f"schema version {previous}, this code needs {latest}" in proc.stderr
    assert "or start the server, to migrate" in proc.stderr
    assert fingerprint(crashed["dir"]) == on_disk
    assert not (crashed["dir"] / "backups").exists()
    # Without --dry-run it migrates, after a backup.
    assert run_recover(crashed["dir"]).returncode == 0
    assert len(os.listdir(crashed["dir"] / "backups")) == 1


def test_looking_at_a_missing_store_creates_nothing(tmp_path):
    proc = run_recover(tmp_path, "--dry-run")
    assert proc.returncode == 2 and "no holdfast store" in proc.stderr
    assert fingerprint(tmp_path) == {}


@pytest.fixture
def json_crashed(tmp_path):
    """A JSON store as a crash leaves it: a task past its deadline, a torn
    last journal line, and a half-written download."""
    from store import JsonStore
    store = JsonStore(str(tmp_path))
    user = store.create_user("alice", credits=10)[0]
    now = time.time()
    late, _ = store.submit(user["id"], "demo", {"prompt": "b"}, now=now - 100, deadline_at=now - 10, cost=3)
    store.close()
    with open(tmp_path / "holdfast.journal", "ab") as fh:
        fh.write(b'[["UPDATE tasks SET status = ?", ["fail')           # a crash mid-write
    part = tmp_path / "files" / late["id"] / "out_0.png.1234abcd.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\x89PNG half")
    return {"dir": tmp_path, "late": late["id"], "part": part}


@pytest.mark.parametrize("args", [["--dry-run", "--json"], ["--audit", "--json"]])
def test_looking_at_a_json_store_leaves_its_torn_tail_alone(json_crashed, args):
    on_disk = fingerprint(json_crashed["dir"])
    proc = run_recover(json_crashed["dir"], *args, store="json")
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    if "--dry-run" in args:
        assert report["past_deadline"] == [json_crashed["late"]]
        assert report["partial_files"] == [str(json_crashed["part"])]
    else:
        assert report["found"] == 0
    assert fingerprint(json_crashed["dir"]) == on_disk
    # Opened to write, the store drops the tail as before.
    assert run_recover(json_crashed["dir"], store="json").returncode == 0
    assert fingerprint(json_crashed["dir"]) != on_disk


def test_recover_keeps_the_part_files_of_tasks_a_live_worker_holds(tmp_path):
    """recover runs beside the server: a download in progress (its task
    under a live lease) keeps its temporary file; one whose task nobody
    holds, or whose lease ran out, was cut short and goes."""
    from providers import build_providers
    from recover import recover
    store = SqliteStore(str(tmp_path / "holdfast.db"))
    files = FileStore(str(tmp_path / "files"))
    try:
        user = store.create_user("alice")[0]
        now = time.time()

        def task_with_part(owner=None, leased_at=None):
            task, _ = store.submit(user["id"], "demo", {"prompt": "p"}, now=now - 300, deadline_at=now + 3600)
            if owner:
                assert store.claim_task(task["id"], owner, now=leased_at, lease_s=60) is not None
            part = tmp_path / "files" / task["id"] / "out_0.png.0badc0de.part"
            part.parent.mkdir(parents=True)
            part.write_bytes(b"\x89PNG half")
            return part

        live = task_with_part("otherhost:1:live", leased_at=now - 10)
        expired = task_with_part("otherhost:2:gone", leased_at=now - 120)
        unleased = task_with_part()
        orphan = tmp_path / "files" / "stray.bin.part"
        orphan.write_bytes(b"?")
        providers = build_providers({})

        report = recover(store, providers, now=now, files=files, dry_run=True)
        assert report["partial_files"] == sorted(map(str, (expired, unleased, orphan)))
        assert report["partial_files_in_use"] == [str(live)]
        assert all(p.exists() for p in (live, expired, unleased, orphan))

        report = recover(store, providers, now=now, files=files)
        assert report["partial_files_in_use"] == [str(live)]
        assert live.exists(), "a download in progress lost its file"
        assert not any(p.exists() for p in (expired, unleased, orphan))
    finally:
        store.close()


def test_recover_releases_the_leases_of_owners_whose_heartbeat_says_dead_only(tmp_path):
    """A container on this host (same host name, another PID namespace)
    whose PID means nothing here keeps its tasks while it beats; an owner
    whose heartbeat ran out loses them; so does one of this namespace whose
    process is gone, at once."""
    import socket

    from providers import build_providers
    from recover import recover
    from store import process_identity
    store = SqliteStore(str(tmp_path / "holdfast.db"))
    try:
        now = time.time()
        user = store.create_user("alice")[0]
        child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                               text=True, timeout=30)
        gone_pid = int(child.stdout)     # no process of this namespace has it now
        here = process_identity()
        owners = {
            # Probing PIDs by host name took this one for dead.
            "container": (f"{socket.gethostname()}:{gone_pid}:c0ffee", now,
                          dict(here, pid=gone_pid, pid_ns="pid:[4026530000]", started="5")),
            "stale": ("otherhost:7:dead", now - 120, dict(here, host="otherhost", boot_id="another-boot")),
            "gone": (f"{socket.gethostname()}:{gone_pid}:beef", now, dict(here, pid=gone_pid, started="5")),
        }
        tasks = {}
        for name, (owner, beat_at, identity) in owners.items():
            store.heartbeat(owner, now=beat_at, lease_s=60.0, identity=identity)
            tasks[name], _ = store.submit(user["id"], "demo", {}, now=now, deadline_at=now + 3600)
            assert store.claim_task(tasks[name]["id"], owner, now=now, lease_s=600) is not None
        report = recover(store, build_providers({}), now=now)
        assert sorted(report["dead_owners"]) == sorted([owners["stale"][0], owners["gone"][0]])
        assert report["leases_released"] == 2
        held = {name: store.get_task(task["id"])["lease_owner"] for name, task in tasks.items()}
        assert held == {"container": owners["container"][0], "stale": None, "gone": None}
    finally:
        store.close()


def test_every_table_the_migrations_create_is_exported(store):
    """A table missing from DATA_MODELS would be missing from both sides of
    an export/import test: compare with what the migrations made."""
    import store as store_module
    with store._seam():
        if isinstance(store, store_module.PostgresStore):   # each test has a schema of its own
            tables = set(store.db.get_tables(schema=store._one("SELECT current_schema()")[0]))
        else:
            tables = set(store.db.get_tables())
    exported = {m._meta.table_name for m in store_module.DATA_MODELS}
    local = {m._meta.table_name for m in store_module.LOCAL_MODELS}
    assert tables - {"schema_version"} - local - set(store_module.DERIVED_TABLES) == exported
    assert set(store.export_rows()) == exported


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_export_reads_one_snapshot_while_a_writer_commits(tmp_path, request, backend):
    """A submission committed between the export's reads of users and of
    tasks: in a snapshot it is in no table; read table by table, the export
    would hold its task and reserve but the balance from before it."""
    import threading

    from store import PostgresStore
    if backend == "postgresql":
        store = PostgresStore(request.getfixturevalue("pg_schema").url)
    else:
        store = SqliteStore(str(tmp_path / "holdfast.db"))
    try:
        user = store.create_user("alice", credits=10)[0]
        writer = threading.Thread(target=store.submit, args=(user["id"], "demo", {}),
                                  kwargs={"now": 1.0, "deadline_at": 99.0, "cost": 4})
        real_exec = store._exec

        def exec_between_tables(sql, params=()):
            if (threading.current_thread() is threading.main_thread() and " FROM tasks ORDER BY" in sql
                    and writer.ident is None):
                writer.start()
                writer.join(10)
            return real_exec(sql, params)

        store._exec = exec_between_tables
        rows = store.export_rows()
        del store._exec
        assert writer.ident is not None and not writer.is_alive()
        assert len(store.export_rows()["tasks"]) == 1, "the writer committed"
        [exported] = rows["users"]
        ledger = sum(r["amount"] if r["kind"] in ("grant", "refund") else -r["amount"]
                     for r in rows["ledger"] if r["kind"] != "charge")
        assert exported["credit_balance"] == ledger == 10
        assert rows["tasks"] == [] and rows["events"] == []
    finally:
        store.close()
