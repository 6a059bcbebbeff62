"""SqliteStore, the default backend: one SQLite file in WAL mode."""

import logging
import os
import secrets
import threading
import time
from contextlib import contextmanager

import peewee

from errors import StoreUnavailable

from .sql import SqlStore

log = logging.getLogger("holdfast.store")


class SqliteStore(SqlStore):
    """The default: one file in WAL mode, short BEGIN IMMEDIATE writes, one
    connection per thread (peewee keeps them thread-local)."""

    name = "sqlite"
    multi_process = True

    def __init__(self, path, *, read_only=False):
        """`read_only`: to look and change nothing (recover.py --dry-run):
        no file or folder made, no switch to WAL, no backup or migration
        (an older schema is StoreUnavailable schema_outdated), and SQLite
        refuses every write."""
        pragmas = {"journal_mode": "wal", "synchronous": "normal", "busy_timeout": 5000,
                   "cache_size": -8000}
        if read_only:
            if path == ":memory:" or not os.path.exists(path):
                raise StoreUnavailable(f"no holdfast store at {path} (the server makes one at its first start)",
                                       code="no_store")
            pragmas = {"query_only": 1, "busy_timeout": 5000, "cache_size": -8000}
        elif path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._writer = threading.RLock()
        db = peewee.SqliteDatabase(path, timeout=5, lock_type="IMMEDIATE", pragmas=pragmas)
        super().__init__(db)
        with self._seam():
            db.connect(reuse_if_open=True)
            mode = self._one("PRAGMA journal_mode")[0]
        if mode.lower() != "wal" and path != ":memory:":
            db.close()
            raise StoreUnavailable(f"SQLite file {path} cannot use WAL mode (got {mode})",
                                   code="no_wal")
        if read_only:
            self._require_current_schema()
        else:
            self.migrate()

    @contextmanager
    def _write(self):
        # This process's writers queue on a lock that hands over at once;
        # SQLite's busy handler would sleep up to 100 ms between tries.
        # Other processes still meet at BEGIN IMMEDIATE and its busy_timeout.
        with self._writer, self.db.atomic() as txn:
            yield txn

    def _local_dir(self):
        return None if self.path == ":memory:" else os.path.dirname(os.path.abspath(self.path))

    def _backup_before_migrating(self, current):
        """A consistent copy of the file (SQLite's backup API) in backups/
        beside it, taken before any migration touches the schema."""
        import sqlite3
        folder = os.path.join(os.path.dirname(os.path.abspath(self.path)), "backups")
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = os.path.join(folder, f"holdfast-v{current}-{stamp}-{secrets.token_hex(3)}.db")
        try:
            os.makedirs(folder, exist_ok=True)
            copy = sqlite3.connect(target)
            try:
                self.db.connection().backup(copy)
            finally:
                copy.close()
        except (OSError, sqlite3.Error) as exc:
            # No migration without its backup: the schema stays as it is.
            raise StoreUnavailable(f"cannot back the database up to {folder} before migrating "
                                   f"({exc}); nothing was migrated", code="backup_failed") from exc
        log.warning("schema version %d is older than this holdfast; backed the database up to %s "
                    "before migrating", current, target)
        self.last_backup = target
