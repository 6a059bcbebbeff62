"""PostgresStore: several holdfast processes on several hosts, one database."""

import re
import threading
import time
import zlib
from contextlib import contextmanager

import peewee

from errors import InvalidInput, StoreUnavailable

from .sql import SqlStore

# Server settings each connection starts with, unless the URL's query sets
# them (`?lock_timeout=2s`; PostgreSQL's units, a bare number is ms). One
# process stopped inside a transaction (a paused VM, SIGSTOP, a swap storm)
# must not hold the others for longer than this: a wait for a lock it holds
# ends after lock_timeout, its session is ended by the server after
# idle_in_transaction_session_timeout (its transaction rolls back and its
# locks go), and no statement runs past statement_timeout. Each of these
# comes back as StoreUnavailable: 503 for a request, a retry for the worker.
SESSION_SETTINGS = {
    "lock_timeout": "5s",
    "statement_timeout": "30s",
    "idle_in_transaction_session_timeout": "15s",
    # The server's side of TCP keepalives: a client host that vanished
    # (partition, power loss) gives its connections back within about 1.5 min.
    "tcp_keepalives_idle": "60",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "3",
}
# libpq's (the client's) side, the same names as in any libpq URL: a server
# or network that vanished fails the waiting call instead of hanging it.
CLIENT_SETTINGS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "60",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}
# How long a read of the event log waits for the transactions older than its
# mark to end (see PostgresStore._events_upto).
MARK_WAIT_S = 0.5
_SETTING_VALUE = re.compile(r"^[0-9]+(us|ms|s|min|h|d)?$")


def _startup_options(options):
    """libpq's `options` (sent at connect, so no round trip per connection):
    the URL's own, then `-c name=value` for each of SESSION_SETTINGS, which
    are taken out of `options` (libpq would refuse them as its own). A
    setting the URL's own `options` already sets (`-c lock_timeout=2s`) is
    left to it."""
    given = options.pop("options", "")
    parts = [given] if given else []
    for name, default in SESSION_SETTINGS.items():
        if name not in options and re.search(rf"(-c\s*|--){name}=", given):
            continue
        value = str(options.pop(name, default)).strip()
        if not _SETTING_VALUE.match(value):
            raise InvalidInput(f"the PostgreSQL URL's {name}= must be a duration such as 5s or 500ms "
                               f"(a number for the tcp_ ones), not {value!r}")
        parts.append(f"-c {name}={value}")
    return " ".join(parts)


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
    error_code_sql = "(error::jsonb ->> 'code')"
    ilike = "ILIKE"

    def __init__(self, url, *, read_only=False):
        from urllib.parse import parse_qsl, unquote, urlsplit

        from playhouse.pool import PooledPostgresqlDatabase
        parts = urlsplit(url)
        options = dict(parse_qsl(parts.query))
        try:
            pool = int(options.pop("pool", 8))
        except ValueError:
            raise InvalidInput("the PostgreSQL URL's pool= must be a number of connections") from None
        options = {**CLIENT_SETTINGS, **options}
        options["options"] = _startup_options(options)
        # Threads (API, event streams, worker) far outnumber the connections a
        # server should hold: each operation borrows one from a small pool.
        db = PooledPostgresqlDatabase(
            unquote(parts.path.lstrip("/")) or "postgres", max_connections=pool, timeout=10,
            stale_timeout=300, host=parts.hostname or None, port=parts.port or None,
            user=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None, **options)
        super().__init__(db)
        self.url = url
        self._frontier = _Frontier()
        self._sequence = None
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
                try:
                    yield
                except peewee.InternalError as exc:
                    # The server ended a session idle inside a transaction
                    # (idle_in_transaction_session_timeout) or refused a
                    # statement in a transaction that already failed.
                    raise StoreUnavailable(f"store error: {exc}") from exc
        finally:
            if borrowed:
                self.db.close()

    def _migrate(self, upto=None):
        # A migration may build an index over every row, or wait for another
        # process's migration: neither is a stall to cut short. SET LOCAL
        # ends with this transaction, so the pooled connection keeps its bounds.
        with self._write():
            self._exec("SET LOCAL statement_timeout = 0")
            self._exec("SET LOCAL lock_timeout = 0")
            return super()._migrate(upto)

    def _store_clock(self, now):
        # Every host asks the one server: skewed host clocks cannot make a
        # live process look dead (or a dead one alive) to another host.
        return "EXTRACT(EPOCH FROM clock_timestamp())::double precision", []

    def _lock(self, name):
        self._exec("SELECT pg_advisory_xact_lock(?)", (zlib.crc32(name.encode()),))

    # -- how far the event log may be read ------------------------------------
    #
    # Writers take seqs from a sequence and commit side by side, so seq 7 may
    # commit before seq 6 does (or before 6 rolls back). A reader that
    # returned 7 and moved its cursor past 6 would lose 6 for good. A
    # cluster-wide lock held to COMMIT kept commits in seq order, but let one
    # stopped process stall every writer. Instead a reader stops at a bound
    # below which nothing can still appear:
    #
    #   1. in one statement, read the sequence's last value V, then take a
    #      new transaction id X. Every writer of a seq <= V took its seq
    #      before V was read, and had its own transaction id before that
    #      (it wrote its task row first), so its id is below X;
    #   2. once a later snapshot's xmin (every transaction id below it has
    #      ended) reaches X, each of those writers has committed or rolled
    #      back: every seq <= V that will ever exist is visible, and V is
    #      the bound.
    #
    # Writers never wait for readers or for each other. What waits is the
    # announcement: an event is read once the transactions older than the
    # mark have ended, which holdfast's own sessions do within their
    # statement and idle-in-transaction timeouts. xmin is the cluster's, so a
    # long transaction of another application on the same cluster delays
    # live events (never writes) by as long as it runs.

    def _events_upto(self):
        frontier = self._frontier
        xmin, allocated = self._one(
            f"SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint, {self._ALLOCATED} "
            f"FROM {self._events_sequence()}")
        # A new mark when none is waiting and seqs were taken since the last
        # one; not inside a transaction, whose id would be older than V.
        if frontier.settle(xmin) and allocated > frontier.upto and not self.db.transaction_depth():
            seq, xid = self._one(
                f"WITH allocated AS MATERIALIZED (SELECT {self._ALLOCATED} AS seq "
                f"FROM {self._events_sequence()}) "
                # The CTE is read before the row it feeds is projected, so
                # the sequence is read before the id is taken.
                "SELECT seq, pg_current_xact_id()::text::bigint FROM allocated")
            frontier.add(seq, xid)
            # Transactions are short: the mark is mostly good at once, or
            # within a few ms. Past MARK_WAIT_S this read returns the older
            # bound, and a later one takes the mark in.
            pause, waited = 0.001, 0.0
            while not frontier.settle(self._xmin()) and waited < MARK_WAIT_S:
                time.sleep(pause)
                waited += pause
                pause = min(pause * 2, 0.05)
        return frontier.upto

    # The highest seq taken from the sequence (setval(..., false), as after
    # an import, means the next one, not yet taken).
    _ALLOCATED = "CASE WHEN is_called THEN last_value ELSE last_value - 1 END"

    def _xmin(self):
        return self._one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")[0]

    def _events_sequence(self):
        if self._sequence is None:
            self._sequence = self._one("SELECT pg_get_serial_sequence('events', 'seq')")[0]
        return self._sequence

    def _after_import(self):
        for table, column in (("users", "id"), ("events", "seq"), ("ledger", "id"),
                              ("webhook_endpoints", "id"), ("webhook_secrets", "id")):
            self._exec(f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
                       f"COALESCE((SELECT MAX({column}) FROM {table}), 0) + 1, false)")


class _Frontier:
    """One process's bound on the event log (PostgresStore._events_upto):
    `upto`, and the marks (seq, transaction id) waiting to become it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.upto = 0
        self._marks = []

    def add(self, seq, xid):
        with self._lock:
            self._marks.append((seq, xid))

    def settle(self, xmin):
        """Take in the marks whose transactions before them have all ended;
        True when none is left waiting (time for a new one)."""
        with self._lock:
            done = [seq for seq, xid in self._marks if xid <= xmin]
            if done:
                self.upto = max(self.upto, *done)
                self._marks = [(seq, xid) for seq, xid in self._marks if xid > xmin]
            return not self._marks
