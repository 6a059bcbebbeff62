"""Schema migrations: versioned, backed up first, all or nothing."""

import os
import sqlite3

import pytest

import store as store_module
from errors import StoreUnavailable
from store import SqliteStore


def _add_column(db):
    db.execute_sql("ALTER TABLE tasks ADD COLUMN note TEXT")


def _add_column_then_fail(db):
    db.execute_sql("ALTER TABLE tasks ADD COLUMN half_done TEXT")
    db.execute_sql("CREATE TABLE extra (id INTEGER PRIMARY KEY)")
    raise RuntimeError("this migration fails on purpose")


def _columns(path, table):
    con = sqlite3.connect(path)
    try:
        return [r[1] for r in con.execute(f"PRAGMA table_info({table})")]
    finally:
        con.close()


@pytest.fixture
def populated(tmp_path):
    path = str(tmp_path / "holdfast.db")
    s = SqliteStore(path)
    user = s.create_user("alice")[0]
    for i in range(3):
        s.submit(user["id"], "demo", {"i": i}, now=float(i), deadline_at=1e10)
    rows = s.export_rows()
    s.close()
    return path, rows


def test_a_new_database_starts_at_the_latest_version(tmp_path):
    s = SqliteStore(str(tmp_path / "new.db"))
    try:
        assert s.schema_version() == max(v for v, _ in store_module.MIGRATIONS)
    finally:
        s.close()
    assert not (tmp_path / "backups").exists(), "nothing to back up on a new file"


def test_a_migration_backs_up_first_and_applies(populated, monkeypatch):
    path, rows = populated
    latest = max(v for v, _ in store_module.MIGRATIONS)
    # Patched in store.sql_schema, where SqlStore reads the list.
    monkeypatch.setattr(store_module.sql_schema, "MIGRATIONS", store_module.MIGRATIONS + [(latest + 1, _add_column)])
    s = SqliteStore(path)
    try:
        assert s.schema_version() == latest + 1
        assert "note" in _columns(path, "tasks")
        backup = s.last_backup
    finally:
        s.close()
    assert os.path.dirname(backup) == os.path.join(os.path.dirname(path), "backups")
    assert "note" not in _columns(backup, "tasks")
    old = SqliteStore(backup)
    try:
        assert old.export_rows()["tasks"] == rows["tasks"]
    finally:
        old.close()


def test_a_failed_migration_leaves_the_old_schema_and_data(populated, monkeypatch):
    path, rows = populated
    latest = max(v for v, _ in store_module.MIGRATIONS)
    before = _columns(path, "tasks")
    monkeypatch.setattr(store_module.sql_schema, "MIGRATIONS",
                        store_module.MIGRATIONS + [(latest + 1, _add_column_then_fail)])
    with pytest.raises(StoreUnavailable, match="database is unchanged") as info:
        SqliteStore(path)
    assert info.value.code == "migration_failed"
    assert _columns(path, "tasks") == before
    con = sqlite3.connect(path)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "extra" not in tables
        assert con.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == latest
    finally:
        con.close()
    assert len(os.listdir(os.path.join(os.path.dirname(path), "backups"))) == 1
    monkeypatch.undo()
    s = SqliteStore(path)
    try:
        assert s.export_rows()["tasks"] == rows["tasks"]
    finally:
        s.close()


def test_no_migration_without_its_backup(populated, monkeypatch):
    """A backup that cannot be written (disk full, a file where the folder
    goes) stops the migration with a clear error; the schema stays."""
    path, rows = populated
    latest = max(v for v, _ in store_module.MIGRATIONS)
    before = _columns(path, "tasks")
    with open(os.path.join(os.path.dirname(path), "backups"), "w") as fh:
        fh.write("not a folder")
    monkeypatch.setattr(store_module.sql_schema, "MIGRATIONS", store_module.MIGRATIONS + [(latest + 1, _add_column)])
    with pytest.raises(StoreUnavailable, match="nothing was migrated") as info:
        SqliteStore(path)
    assert info.value.code == "backup_failed"
    assert _columns(path, "tasks") == before
    monkeypatch.undo()
    s = SqliteStore(path)
    try:
        assert s.schema_version() == latest and s.export_rows()["tasks"] == rows["tasks"]
    finally:
        s.close()


def test_a_database_at_version_12_migrates_with_its_slot_line_filled(tmp_path, monkeypatch):
    """Migration 13 fills slot_line from the tasks waiting at the time (the
    triggers it makes see only later changes), then keeps it."""
    from store import slot_line
    path = str(tmp_path / "holdfast.db")
    monkeypatch.setattr(store_module.sql_schema, "MIGRATIONS",
                        [m for m in store_module.MIGRATIONS if m[0] <= 12])
    s = SqliteStore(path)
    try:
        alice, bob, carol = (s.create_user(n)[0]["id"] for n in ("alice", "bob", "carol"))
        for user, at, priority in ((alice, 1.0, 0), (alice, 2.0, 5), (alice, 3.0, 0),
                                   (bob, 4.0, 9), (bob, 5.0, 2), (carol, 6.0, 0)):
            s.submit(user, "demo", {"at": at}, now=at, deadline_at=1e10, priority=priority)
        held = {t["created_at"]: t for t in s.claim("w", now=10.0, limit=10, lease_s=60)}
        # bob's priority-9 task holds a slot: not waiting; carol's is cancelled.
        assert s.take_slot(held[4.0]["id"], token=held[4.0]["lease_token"], now=10.0, limit=None,
                           step="submitting")
        s.cancel(held[6.0]["id"], carol, now=10.0)
        assert s.schema_version() == 12 and not s.db.table_exists("slot_line")
    finally:
        s.close()
    monkeypatch.undo()
    s = SqliteStore(path)
    try:
        assert s.schema_version() == max(v for v, _ in store_module.MIGRATIONS)
        with s._seam():
            assert slot_line.rows(s) == [("demo", alice, 5, 1.0), ("demo", bob, 2, 5.0)]
        s.submit(carol, "demo", {}, now=20.0, deadline_at=1e10, priority=-1)
        with s._seam():
            assert slot_line.rows(s) == slot_line.recount(s) == [
                ("demo", alice, 5, 1.0), ("demo", bob, 2, 5.0), ("demo", carol, -1, 20.0)]
    finally:
        s.close()
