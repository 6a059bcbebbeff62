"""PostgresStore: several holdfast processes on several hosts, one database."""

import zlib
from contextlib import contextmanager

import peewee

from errors import InvalidInput, StoreUnavailable

from .sql import SqlStore


class PostgresStore(SqlStore):
    """PostgreSQL, for teams that outgrow one machine: any number of holdfast
    processes on any number of hosts share one database. Claims pass over
    rows another claim holds (FOR UPDATE SKIP LOCKED); decisions that SQLite
    serializes with BEGIN IMMEDIATE take transaction-scoped advisory locks."""

    name = "postgresql"
    multi_process = True
    multi_host = True
    placeholder = "%s"
    for_update = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url, *, read_only=False):
        from urllib.parse import parse_qsl, unquote, urlsplit

        from playhouse.pool import PooledPostgresqlDatabase
        parts = urlsplit(url)
        options = dict(parse_qsl(parts.query))
        try:
            pool = int(options.pop("pool", 8))
        except ValueError:
            raise InvalidInput("the PostgreSQL URL's pool= must be a number of connections") from None
        # Threads (API, event streams, worker) far outnumber the connections a
        # server should hold: each operation borrows one from a small pool.
        db = PooledPostgresqlDatabase(
            unquote(parts.path.lstrip("/")) or "postgres", max_connections=pool, timeout=10,
            stale_timeout=300, host=parts.hostname or None, port=parts.port or None,
            user=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None, **options)
        super().__init__(db)
        self.url = url
        if read_only:
            self._require_current_schema()
        else:
            self.migrate()

    @contextmanager
    def _seam(self):
        from playhouse.pool import MaxConnectionsExceeded
        borrowed = self.db.is_closed()
        if borrowed:
            try:
                self.db.connect()
            except (peewee.OperationalError, MaxConnectionsExceeded) as exc:
                raise StoreUnavailable(f"cannot reach PostgreSQL: {exc}") from exc
        try:
            with super()._seam():
                yield
        finally:
            if borrowed:
                self.db.close()

    def _store_clock(self, now):
        # Every host asks the one server: skewed host clocks cannot make a
        # live process look dead (or a dead one alive) to another host.
        return "EXTRACT(EPOCH FROM clock_timestamp())::double precision", []

    def _lock(self, name):
        self._exec("SELECT pg_advisory_xact_lock(?)", (zlib.crc32(name.encode()),))

    def _after_import(self):
        for table, column in (("users", "id"), ("events", "seq"), ("ledger", "id")):
            self._exec(f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
                       f"COALESCE((SELECT MAX({column}) FROM {table}), 0) + 1, false)")

