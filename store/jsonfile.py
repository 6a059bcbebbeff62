"""JsonStore: the store kept in plain JSON files (a snapshot and a journal),
for hosts where an SQLite file cannot work."""

import json
import logging
import os
import threading
import time
from contextlib import contextmanager

import peewee

from errors import StoreUnavailable

from .schema import DATA_MODELS, LOCAL_MODELS
from .sql import SqlStore

log = logging.getLogger("holdfast.store")
# The snapshot is this store's whole state, heartbeats included: a restart
# after a crash tells from its predecessor's row that it is gone.
SNAPSHOT_MODELS = DATA_MODELS + LOCAL_MODELS


class JsonStore(SqlStore):
    """The store in plain JSON files, for hosts where an SQLite file cannot
    work (no WAL, no file locks) or by choice. One process only.

    `holdfast.json` is a snapshot of every table; `holdfast.journal` gets one
    fsynced line per committed transaction, listing the statements it wrote.
    Queries run on an in-memory SQLite engine loaded from the two files, so
    this backend runs exactly the SQL the others run and cannot drift from
    the contract. A torn last journal line (a crash mid-write) was never
    committed and is dropped. The snapshot is rewritten (atomic replace) once
    the journal outgrows it, so a write costs the same at 10k tasks as at 100.

    Each snapshot carries a generation number, and the journal's first line
    names the generation it follows. A crash after a new snapshot replaced
    the old one but before the journal was emptied leaves a journal of an
    older generation: the snapshot already holds it, so it is discarded, not
    applied a second time.
    """

    name = "json"
    multi_process = False
    min_compact_bytes = 1 << 20
    # After a failed compaction, wait this long before the next try, doubling
    # up to the second number: each try rewrites the whole snapshot.
    compact_retry_s = (5.0, 300.0)

    def __init__(self, directory, *, label="json", clock=time.monotonic, read_only=False):
        """`read_only`: to look and change nothing (recover.py --dry-run): a
        torn journal tail is ignored but left in the file, nothing is
        compacted or created, and writes are StoreUnavailable."""
        import fcntl
        self.name = label
        self.read_only = read_only
        self._clock = clock
        self._compact_delay = 0.0
        self._compact_after = None
        self.snapshot_path = os.path.join(directory, "holdfast.json")
        self.journal_path = os.path.join(directory, "holdfast.journal")
        lock_path = os.path.join(directory, "holdfast.json.lock")
        if read_only:
            if not (os.path.exists(self.snapshot_path) or os.path.exists(self.journal_path)):
                raise StoreUnavailable(f"no holdfast store in {directory} (the server makes one at its "
                                       "first start)", code="no_store")
            # Still the one process at a time: a writer's half-done
            # compaction is not for reading.
            self._mutexfile = open(lock_path, "rb") if os.path.exists(lock_path) else None
        else:
            os.makedirs(directory, exist_ok=True)
            self._mutexfile = open(lock_path, "a")
        try:
            if self._mutexfile:
                fcntl.flock(self._mutexfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._mutexfile.close()
            raise StoreUnavailable(f"another holdfast process is using the JSON store in {directory}; "
                                   "it serves one process only (use SQLite or PostgreSQL for more)",
                                   code="store_locked") from None
        db = peewee.SqliteDatabase(":memory:", thread_safe=False, check_same_thread=False)
        super().__init__(db)
        self._mutex = threading.RLock()
        self._depth = 0
        self._pending = []
        self._journal_bytes = 0
        self._replaying = True
        try:
            self._load()
            self._replaying = False
            if read_only:
                return
            with self._file_errors("cannot open the JSON journal"):
                # Unbuffered: after a failed write no bytes wait in a buffer
                # to be flushed behind the next line.
                self._journal = open(self.journal_path, "ab", buffering=0)
                if self._journal_fix:
                    self._cut_journal()
            # Journal lines written from now on use the migrated schema: the
            # snapshot must have it first.
            if self._migrated_on_load:
                self.compact()
        except BaseException:
            self.close()     # a store that did not open holds no lock
            raise
        if self._journal_bytes > self._compact_threshold():
            self._compact_when_due()

    # Every read and write holds the one lock: one connection, one process.
    @contextmanager
    def _seam(self):
        with self._mutex, super()._seam():
            yield

    @contextmanager
    def _write(self, undo=True):
        if self.read_only and not self._replaying:
            raise StoreUnavailable("the JSON store was opened read-only", code="read_only")
        with self._mutex:
            outer = self._depth == 0
            self._depth += 1
            try:
                with self.db.atomic() as txn:
                    yield txn
                    if outer and self._pending and not self._replaying:
                        self._append(self._pending)
            finally:
                self._depth -= 1
                if outer:
                    self._pending = []
            # Not while loading: the journal is not open yet, and __init__
            # compacts once it is.
            if outer and not self._replaying and self._journal_bytes > self._compact_threshold():
                self._compact_when_due()

    def _local_dir(self):
        return os.path.dirname(os.path.abspath(self.snapshot_path))

    def _exec(self, sql, params=()):
        if self._depth and not self._replaying and not sql.lstrip().upper().startswith("SELECT"):
            self._pending.append((sql, list(params)))
        return super()._exec(sql, params)

    def _append(self, statements):
        line = (json.dumps(statements, separators=(",", ":")) + "\n").encode()
        if self._journal_bytes == 0:
            line = self._journal_header() + line
        try:
            if self._journal_fix:
                self._cut_journal()
            rest = memoryview(line)
            while rest:
                rest = rest[self._journal.write(rest):]
            os.fsync(self._journal.fileno())
        except OSError as exc:
            # The transaction rolls back in memory; the part of its line that
            # reached the file goes too, or the next line would be glued to
            # it and a reload would stop there, losing every later write.
            # If cutting fails as well, the next append cuts first.
            self._journal_fix = True
            try:
                self._cut_journal()
            except OSError:
                pass
            raise StoreUnavailable(f"cannot write the JSON journal: {exc}") from exc
        self._journal_bytes += len(line)

    def _journal_header(self):
        return (json.dumps({"generation": self._generation}) + "\n").encode()

    def _cut_journal(self):
        """Cut the journal file back to its last committed line (to nothing
        when the snapshot holds it all)."""
        if self._journal_bytes == 0:
            # Emptying the journal is safe only once the snapshot that holds
            # it has reached the disk.
            _fsync_dir(os.path.dirname(self.snapshot_path))
        self._journal.truncate(self._journal_bytes)
        os.fsync(self._journal.fileno())
        self._journal_fix = False

    def _compact_threshold(self):
        return max(self.min_compact_bytes, self._snapshot_bytes)

    def _compact_when_due(self):
        """Compact after a committed write. A failure does not undo the
        write (it is safe in the journal) and is not news on every write:
        one line in the log, the next try after a growing delay."""
        now = self._clock()
        if self._compact_after is not None and now < self._compact_after:
            return
        try:
            self.compact()
        except StoreUnavailable as exc:
            first, longest = self.compact_retry_s
            self._compact_delay = min(longest, self._compact_delay * 2) if self._compact_delay else first
            self._compact_after = now + self._compact_delay
            log.warning("%s; the journal keeps every write, trying again in %.0f s",
                        exc.message, self._compact_delay)
        else:
            self._compact_delay, self._compact_after = 0.0, None

    def _load(self):
        self.db.connect()
        snapshot = None
        self._snapshot_bytes = 0
        if os.path.exists(self.snapshot_path):
            self._snapshot_bytes = os.path.getsize(self.snapshot_path)
            with open(self.snapshot_path, encoding="utf-8") as fh:
                snapshot = json.load(fh)
        # A snapshot written before generations were numbered is generation 0.
        self._generation = snapshot.get("generation", 0) if snapshot else 0
        self._migrate(upto=snapshot["schema_version"] if snapshot else None)
        if snapshot:
            self._insert_rows(snapshot["tables"], SNAPSHOT_MODELS)
        size = 0
        if os.path.exists(self.journal_path):
            with open(self.journal_path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                self._journal_bytes = self._replay(fh)
        # Until the file is cut back to what was replayed, no line may follow it.
        self._journal_fix = self._journal_bytes != size
        if self._migrate():
            self._migrated_on_load = True

    def _replay(self, fh):
        """Apply the journal's committed lines; return how many of its bytes
        to keep (0: none of it belongs after this snapshot)."""
        good = 0
        for number, line in enumerate(fh):
            if not line.endswith(b"\n"):
                break
            try:
                entry = json.loads(line)
            except ValueError:
                break
            if number == 0:
                # A journal without a header line was written before
                # generations were numbered: it follows generation 0.
                generation = entry.get("generation") if isinstance(entry, dict) else 0
                if generation != self._generation:
                    return self._stale_journal(generation)
                if isinstance(entry, dict):
                    good += len(line)
                    continue
            with self.db.atomic():
                for sql, params in entry:
                    super()._exec(sql, params)
            good += len(line)
        if good != os.fstat(fh.fileno()).st_size:
            log.warning("JSON journal: %s a torn last entry (a crash mid-write)",
                        "ignoring" if self.read_only else "dropping")
        return good

    def _stale_journal(self, generation):
        if not isinstance(generation, int) or generation > self._generation:
            raise StoreUnavailable(
                f"the JSON journal {self.journal_path} follows snapshot generation {generation}, "
                f"but {self.snapshot_path} is generation {self._generation}: the snapshot is not "
                "the one this journal was written after (restored from a backup?); refusing to "
                "open rather than lose or misapply writes", code="journal_mismatch")
        log.warning("JSON journal: generation %d is already in the snapshot (generation %d), "
                    "a compaction was cut short; %s it", generation, self._generation,
                    "ignoring" if self.read_only else "discarding")
        return 0

    _migrated_on_load = False

    def compact(self):
        """Rewrite the snapshot from memory, as the next generation, and
        empty the journal. StoreUnavailable when the files cannot be
        written; the store stays usable."""
        with self._mutex, self._file_errors("cannot compact the JSON store"):
            generation = self._generation + 1
            data = {"schema_version": self.schema_version(), "generation": generation,
                    "tables": self.export_rows(SNAPSHOT_MODELS)}
            tmp = self.snapshot_path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(data, fh, separators=(",", ":"))
                fh.flush()
                os.fsync(fh.fileno())
            size = os.path.getsize(tmp)
            os.replace(tmp, self.snapshot_path)
            # From here the journal on disk is of an older generation: no
            # line may be added to it, whatever happens next.
            self._generation = generation
            self._snapshot_bytes = size
            self._journal_bytes = 0
            self._journal_fix = True
            self._cut_journal()

    @staticmethod
    @contextmanager
    def _file_errors(what):
        try:
            yield
        except OSError as exc:
            raise StoreUnavailable(f"{what}: {exc}") from exc

    def close(self):
        with self._mutex:
            if getattr(self, "_journal", None) and not self._journal.closed:
                self._journal.close()
            self.db.close()
            if self._mutexfile:
                self._mutexfile.close()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
