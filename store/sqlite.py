"""SqliteStore, the default backend: one SQLite file in WAL mode."""

import logging
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager

import peewee

from errors import StoreUnavailable

from .sql import SqlStore

log = logging.getLogger("holdfast.store")


# Writes one COMMIT may cover at most: a steady stream of writers must not
# keep the first of them waiting for ever.
MAX_BATCH = 32
# The WAL is copied back into the database file by the store's own thread,
# this often while writes come in. SQLite's default does it in the COMMIT
# that passes 1,000 pages, an fsync or two while that writer holds the
# write lock and every other writer waits behind it.
CHECKPOINT_EVERY_S = 0.25
# Should that thread fall behind (or stop), a COMMIT still checkpoints once
# the WAL holds this many pages (about 80 MB).
FALLBACK_CHECKPOINT_PAGES = 20_000


class _Batch:
    """The writes one COMMIT will cover; `error` is set if it failed."""

    __slots__ = ("done", "error", "writes")

    def __init__(self):
        self.done = threading.Event()
        self.error = None
        self.writes = 0

    def fail(self, exc):
        if self.error is None:
            self.error = exc


# Stands in the thread's transaction stack while it writes on the shared
# connection: peewee then nests atomic() as savepoints, and the seam knows
# a transaction is open.
_OPEN = object()


class _GroupWrite:
    """One outermost write of a thread (see SqliteStore._write): the BEGIN
    of a batch, or a part of the batch's open transaction; then a wait for
    the COMMIT that covers it.

    A write that joins a batch takes a SAVEPOINT of its own, so that
    failing it rolls back alone, unless its caller said it need not
    (`undo=False`: it raises nothing once it changed a row but for the
    database failing). That spares two statements, each a handover of the
    GIL while every other writer waits for this lock. Such a write that
    fails before changing anything leaves nothing to undo; one that fails
    after a change takes the whole batch with it, and every writer of the
    batch hears of it, as of a failed COMMIT."""

    def __init__(self, store, undo=True):
        self.store = store
        self.undo = undo

    def __enter__(self):
        store = self.store
        with store._queue:
            store._queued += 1
        store._writer.acquire()
        with store._queue:
            store._queued -= 1
        store._depth.n = 1
        state = store.db._state
        self.saved = (state.closed, state.conn, state.ctx, state.transactions, state.commit_callbacks)
        self.batch = None
        self.savepoint = False
        try:
            self.conn = conn = store._write_conn()
            state.closed, state.conn, state.ctx, state.transactions, state.commit_callbacks = (
                False, conn, [], [_OPEN], [])
            # The batch's first write needs no savepoint: undoing it is
            # undoing the whole transaction. Every statement counts here, as
            # each hands the GIL over while this lock is held.
            self.first = store._batch is None
            if self.first:
                store._exec("BEGIN IMMEDIATE")
                store._batch = _Batch()
            elif self.undo:
                store._exec("SAVEPOINT holdfast_write")
                self.savepoint = True
            else:
                self.changes = conn.total_changes
        except BaseException:
            self._leave()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        store = self.store
        try:
            if exc_type is None:
                if self.savepoint:
                    try:
                        store._exec("RELEASE SAVEPOINT holdfast_write")
                    except BaseException as failed:
                        self._undo(failed)
                        raise
                store._batch.writes += 1
                self.batch = store._batch
            else:
                self._undo(exc)
        finally:
            self._leave()
        if self.batch is not None:
            self.batch.done.wait()
            if self.batch.error is not None:
                raise peewee.OperationalError(str(self.batch.error)) from self.batch.error
        return False

    def _undo(self, exc):
        """Roll back this write alone; if SQLite ended the whole transaction
        itself (a full disk, an I/O error), or this write changed rows
        without a savepoint to go back to, every write of the batch is gone
        and each of their callers hears of it."""
        store = self.store
        try:
            if self.first:
                store._exec("ROLLBACK")
            elif self.savepoint:
                store._exec("ROLLBACK TO SAVEPOINT holdfast_write")
                store._exec("RELEASE SAVEPOINT holdfast_write")
            elif self.conn.total_changes != self.changes:
                # A failed statement undoes itself; these rows were changed
                # by statements that succeeded, and only the batch's
                # beginning is left to go back to.
                store._exec("ROLLBACK")
                exc = peewee.OperationalError(f"rolled back with another write of its batch, which failed: {exc}")
        except Exception:
            pass
        if store._batch is not None and not self.conn.in_transaction:
            store._batch.fail(exc)
            store._batch.done.set()
            store._batch = None

    def _leave(self):
        """Commit the batch unless another writer is queued to join it, give
        the thread its own connection state back, let the next writer in."""
        store = self.store
        try:
            batch = store._batch
            if batch is not None and (not store._queued or batch.writes >= MAX_BATCH):
                store._batch = None
                try:
                    store._exec("COMMIT")
                    store.commits += 1
                except BaseException as failed:
                    batch.fail(failed)
                    try:
                        store._exec("ROLLBACK")
                    except Exception:
                        pass
                finally:
                    batch.done.set()
        finally:
            state = store.db._state
            state.closed, state.conn, state.ctx, state.transactions, state.commit_callbacks = self.saved
            store._depth.n = 0
            store._writer.release()


class SqliteStore(SqlStore):
    """The default: one file in WAL mode, short BEGIN IMMEDIATE writes, one
    connection per thread for reads (peewee keeps them thread-local).

    This process's writes share one connection and commit in groups: the
    first begins a transaction that stays open while other writers are
    queued to join it, each of them in its own SAVEPOINT (but those that
    need none, see _GroupWrite), and the last of them commits the lot with
    one COMMIT. A write returns only once a COMMIT covering it succeeded; a
    write that fails rolls back only its own changes and raises to its
    caller alone (one without a savepoint that fails after a change rolls
    back its batch); a failed COMMIT raises to every writer it covered."""

    name = "sqlite"
    multi_process = True
    # Without statistics (no ANALYZE) SQLite takes the next_poll_at range
    # and sorts all of it, which is what the index is there to avoid.
    fresh_index = " INDEXED BY tasks_fresh"

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
        self._writer = threading.Lock()
        self._queue = threading.Lock()      # guards _queued
        self._queued = 0                    # writers waiting for _writer
        self._batch = None                  # the batch the open transaction holds
        self._depth = threading.local()     # this thread's write nesting
        self._conn = None                   # the shared write connection
        self._conn_pid = None
        self._checkpointer = None           # the thread that checkpoints the WAL, once writes began
        self._closing = None                # set: that thread ends
        self.checkpoints = 0                # checkpoints that thread ran
        self._grouped = path != ":memory:" and not read_only
        self.commits = 0                    # COMMITs on the shared connection
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

    def _exec(self, sql, params=()):
        # Straight to this thread's connection (the shared one inside a
        # write), under peewee's exception wrapper so errors read as they
        # always did: peewee's execute_sql adds five calls of its own to
        # each of a job's twenty statements. A closed connection (peewee
        # opens it again) goes the long way.
        state = self.db._state
        if state.closed or self.db.query_hooks:
            return self.db.execute_sql(sql, params)
        with peewee.__exception_wrapper__:
            return state.conn.execute(sql, params)

    def _write(self, undo=True):
        # This process's writers queue on a lock that hands over at once;
        # SQLite's busy handler would sleep up to 100 ms between tries.
        # Other processes still meet at BEGIN IMMEDIATE and its busy_timeout.
        if getattr(self._depth, "n", 0):
            return self.db.atomic()
        if not self._grouped:
            # ":memory:" is one database per connection: no shared writer.
            return self._plain_write()
        return _GroupWrite(self, undo)

    @contextmanager
    def _plain_write(self):
        with self._writer:
            self._depth.n = 1
            try:
                with self.db.atomic() as txn:
                    yield txn
            finally:
                self._depth.n = 0

    def _write_conn(self):
        """The one connection this process writes on (under self._writer)."""
        if self._conn is None or self._conn_pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=5, isolation_level=None, check_same_thread=False)
            self.db._add_conn_hooks(conn)
            conn.execute(f"PRAGMA wal_autocheckpoint = {FALLBACK_CHECKPOINT_PAGES}")
            self._conn, self._conn_pid = conn, os.getpid()
            self._closing = threading.Event()
            self._checkpointer = threading.Thread(target=self._checkpoint_loop, args=(self._closing,),
                                                  name="holdfast-checkpoint", daemon=True)
            self._checkpointer.start()
        return self._conn

    def _checkpoint_loop(self, closing):
        """Copy the WAL back into the database file, off the writers' path.
        PASSIVE: it waits for no reader and no writer, and copies what no
        reader still needs; the next writer then starts the WAL over."""
        conn = sqlite3.connect(self.path, timeout=5, isolation_level=None, check_same_thread=False)
        try:
            self.db._add_conn_hooks(conn)      # the store's pragmas, as the write connection has them
            seen = self.commits
            while not closing.wait(CHECKPOINT_EVERY_S):
                if self.commits == seen:
                    continue
                seen = self.commits
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error as exc:
                    # A full disk, say: writes will fail and say so; COMMITs
                    # checkpoint by themselves past the fallback.
                    log.debug("WAL checkpoint failed: %s", exc)
        finally:
            conn.close()

    def write_connection(self):
        """The sqlite3 connection this process's writes run on, for tests
        that watch the statements a write runs."""
        if not self._grouped:
            return self.db.connection()
        with self._writer:
            return self._write_conn()

    def close(self):
        super().close()
        if self._checkpointer is not None and self._conn_pid == os.getpid():
            self._closing.set()
            self._checkpointer.join(10)
            self._checkpointer = None
        with self._writer:
            batch, self._batch = self._batch, None
            if batch is not None:
                # Writes that wait for a COMMIT a queued writer would have
                # made: make it, or tell them it failed.
                try:
                    self._conn.execute("COMMIT")
                    self.commits += 1
                except sqlite3.Error as exc:
                    batch.fail(peewee.OperationalError(str(exc)))
                finally:
                    batch.done.set()
            if self._conn is not None and self._conn_pid == os.getpid():
                self._conn.close()
            self._conn = None

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
