"""SqlStore: the one implementation of the Store interface that every
backend runs, on a database peewee speaks to.

Queries run as plain SQL through the peewee database object: the query
builder costs more than the work on the hot paths (submit, claim, get by id),
and plain SQL keeps every backend honest about what it does inside a
transaction. A backend overrides only what its database does differently:
placeholders, row locks, how a write transaction begins, named locks.

Five mixins that SqlStore inherits keep this module to a readable size:
sql_accounts.py (credits, admin queries, sessions), sql_upkeep.py
(retention, the consistency audit), sql_liveness.py (the workers'
heartbeats), sql_schema.py (migrations, export and import) and
sql_webhooks.py (webhooks out: endpoints, secrets, the outbox). They run on
the seam and helpers defined here.
"""

import json
import logging
import re
import secrets
import shutil
import threading
import time

import peewee

import metrics
from errors import (Conflict, InvalidInput, NotFound, PaymentRequired, StaleLease, StoreUnavailable,
                    TooMany)

from .base import BaseStore
from .files import lease_dir
from .schema import (_LEASED, _TASK_SELECT, ERROR_CODES, FRESH_ORDER, POSTED_AT, SLOT_STEP, SLOT_WAIT_STEP,
                     TASK_COLUMNS, TERMINAL, TaskStatus, check_priority, check_transition, check_user_limits,
                     dumps, duration_bucket, event_json, external_id_problem, hash_token, history_day,
                     new_task_id, task_json)
from .sql_accounts import AccountsSql
from .sql_console import ConsoleSql
from .sql_liveness import LivenessSql
from .sql_schema import SchemaSql
from .sql_upkeep import UpkeepSql
from .sql_webhooks import WebhooksSql

log = logging.getLogger("holdfast.store")
# One line per task state change (creation included), written after commit.
task_log = logging.getLogger("holdfast.tasks")

_JSON_COLUMNS = ("params", "files", "error", "state")
_STATUSES = frozenset(s.value for s in TaskStatus)
_NEXT_POLL_AT, _STARTED_AT, _CREATED_AT = (TASK_COLUMNS.index(c) for c in ("next_poll_at", "started_at",
                                                                           "created_at"))

# A top-level key of a task's `state` JSON (dumps writes `"key":value`), for
# the two queries that look into it: in_doubt() and wake_backoff().
_POSTED = f'%"{POSTED_AT}":%'
_FAILURES = '%"failures":%'
_UPDATABLE = frozenset({"status", "step", "progress", "external_id", "attempts", "files",
                        "error", "next_poll_at", "polls", "started_at", "state",
                        "lease_expires_at"})
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Below this much free space where the store keeps its files, health() says
# the disk is full: writes fail (or soon will) there, even though a small
# one may still fit into space the WAL or journal already holds.
MIN_FREE_BYTES = 1 << 20
# After writes failed, health() tries one small write at most this often,
# so an idle server does not stay unhealthy until a user writes again.
PROBE_EVERY_S = 2.0


def _fresh_turn(row, now):
    """A running task's turn in a fresh-first claim: FRESH_ORDER plus now."""
    started = row[_STARTED_AT] if row[_STARTED_AT] is not None else row[_CREATED_AT]
    return row[_NEXT_POLL_AT] + now - started


# A task's credits once settled, by how it ended (_settle).
_SETTLED = {"succeeded": "charged", "partial": "charged", "failed": "refunded", "cancelled": "refunded"}


class _Moved(Exception):
    """The task's row no longer has the version its caller saw."""


def _check_updatable(changes):
    unknown = set(changes) - _UPDATABLE
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")
    # Refused alike by every backend, not only where PostgreSQL would.
    if changes.get("external_id") is not None:
        problem = external_id_problem(changes["external_id"])
        if problem is not None:
            raise InvalidInput(problem, code="invalid_result")


def _log_change(task_id, user_id, provider, old, new, error, credits, external_id, attempts):
    fields = {"event": "task_created" if old is None else "task_status", "task_id": task_id,
              "user_id": user_id, "provider": provider, "from": old, "to": new}
    text = f"task {task_id} user {user_id} {provider}: " + (f"{old} -> {new}" if old else f"created ({new})")
    if new == "running" and external_id:
        fields.update(external_id=external_id, attempts=attempts)
        text += f"; {external_id} (attempt {attempts})"
    if error:
        fields.update(error_code=error.get("code"), error=error.get("message"))
        text += f"; {error.get('code')}: {error.get('message')}"
    if new in TERMINAL and credits != "none":
        fields["credits"] = credits
        text += f"; credits {credits}"
    task_log.info(text, extra={"fields": fields})



def _cause(exc):
    """The error that made a transaction fail. When SQLite rolled back by
    itself (a full disk), peewee's own ROLLBACK then fails with "no
    transaction is active", which would hide the real reason."""
    while "no transaction is active" in str(exc) and exc.__context__ is not None:
        exc = exc.__context__
    return exc


def _once(fn):
    """fn, called at most once however often the wrapper is."""
    done = []

    def wrapper():
        if not done:
            done.append(fn())
    return wrapper


class _Seam:
    """SqlStore._seam(): a class, not a generator, as every store call
    enters one (a job passes some twenty)."""

    __slots__ = ("store",)

    def __init__(self, store):
        self.store = store

    def __enter__(self):
        return None

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc is not None:
                mapped = self.store._seam_error(exc)
                if mapped is not None:
                    raise mapped from exc
            return False
        finally:
            self.store._left_seam(exc is None)


class SqlStore(AccountsSql, ConsoleSql, UpkeepSql, LivenessSql, SchemaSql, WebhooksSql, BaseStore):
    """The shared implementation for databases peewee speaks to."""

    placeholder = "?"
    for_update = ""       # row locks, where writers run side by side
    skip_locked = ""      # claims that pass over rows another claim holds
    fresh_index = ""      # how a fresh-first claim names tasks_fresh, where the planner needs telling

    def __init__(self, db):
        self.db = db
        self._sql_cache = {}
        self._wrote_events = threading.local()
        self._changes = threading.local()
        self._ride = threading.local()     # claim_on_release()'s ask, and what it leased
        self._write_failure = None     # the last write error, until a write commits again
        self._probed_at = 0.0

    # one seam for driver errors; every write transaction runs inside it, so
    # leaving the outermost one is after the commit: tell the listeners then,
    # and log the state changes that committed (none of a rolled-back one).
    def _seam(self):
        return _Seam(self)

    def _seam_error(self, exc):
        """The error a driver's `exc` becomes, or None to let it through."""
        if isinstance(exc, (peewee.OperationalError, peewee.InterfaceError)):
            # InterfaceError: a pooled connection that died under us.
            cause = _cause(exc)
            if "lock" not in str(cause).lower():
                # Waiting for another writer is contention, not a store
                # that cannot write.
                self._write_failure = str(cause)
            return StoreUnavailable(f"store error: {cause}")
        if isinstance(exc, StoreUnavailable):
            if exc.code == StoreUnavailable.code:
                self._write_failure = exc.message     # e.g. the JSON journal could not be written
            return None
        if isinstance(exc, peewee.DataError):
            # A value the database refuses, e.g. a NUL in PostgreSQL text.
            return InvalidInput(f"the store cannot keep this value: {exc}")
        if isinstance(exc, UnicodeEncodeError):
            # An unpaired surrogate: the driver cannot encode it to UTF-8.
            return InvalidInput("a string holds an unpaired surrogate "
                                f"(\\u{ord(exc.object[exc.start]):04x}), which is not valid Unicode")
        return None

    def _left_seam(self, committed):
        """Leaving a seam: past the outermost transaction, what waited for
        its commit (log lines, counters) and the event listeners."""
        actions = getattr(self._changes, "pending", None)
        if actions and not self.db.transaction_depth():
            self._changes.pending = []
            if committed:
                for fn, args in actions:
                    fn(*args)
        if getattr(self._wrote_events, "flag", False) and not self.db.transaction_depth():
            self._wrote_events.flag = False
            if committed:
                # A change users see reached the store: writes work.
                self._write_failure = None
            for callback in self._event_listeners:
                callback()

    def _sql(self, sql):
        if self.placeholder == "?":
            return sql
        out = self._sql_cache.get(sql)
        if out is None:
            out = self._sql_cache[sql] = sql.replace("?", self.placeholder)
        return out

    def _exec(self, sql, params=()):
        return self.db.execute_sql(self._sql(sql), params)

    def _one(self, sql, params=()):
        return self._exec(sql, params).fetchone()

    def _dicts(self, table, columns, order, **conditions):
        """`columns` of `table`'s rows as dicts, filtered by each condition
        (a `column op ?` -> value pair) whose value is not None."""
        clauses = [(c, v) for c, v in conditions.items() if v is not None]
        sql = f"SELECT {', '.join(columns)} FROM {table}"
        if clauses:
            sql += " WHERE " + " AND ".join(c for c, _ in clauses)
        with self._seam():
            rows = self._exec(f"{sql} ORDER BY {order}", [v for _, v in clauses]).fetchall()
        return [dict(zip(columns, r)) for r in rows]

    def _write(self, undo=True):
        """A short write transaction (BEGIN IMMEDIATE on SQLite).
        `undo=False`: the caller raises nothing once it has changed a row,
        but for the database failing; SqliteStore then spares the write a
        savepoint of its own inside a shared transaction."""
        return self.db.atomic()

    def _snapshot(self):
        """A read transaction that sees one snapshot throughout, so a write
        committed meanwhile shows in all of its reads or in none.
        PostgreSQL's default isolation takes a snapshot per statement;
        SQLite's deferred BEGIN reads one (WAL) and blocks no writer."""
        begin = "REPEATABLE READ" if isinstance(self.db, peewee.PostgresqlDatabase) else "DEFERRED"
        return self.db.atomic(begin)

    def _lock(self, name):
        """Serialize the transactions that take `name` until they end.
        SQLite's BEGIN IMMEDIATE already serializes every writer; backends
        whose writers run side by side override this."""

    def close(self):
        self.db.close()

    def health(self):
        with self._seam():
            self._one("SELECT 1")
        folder = self._local_dir()
        if folder is not None:
            try:
                free = shutil.disk_usage(folder).free
            except OSError:
                free = None
            if free is not None and free < MIN_FREE_BYTES:
                raise StoreUnavailable(f"database or disk is full: {free} bytes free in {folder}")
        if self._write_failure is not None and time.monotonic() - self._probed_at >= PROBE_EVERY_S:
            self._probed_at = time.monotonic()
            try:
                self._probe_write()
            except StoreUnavailable:
                pass
        failure = self._write_failure
        if failure is not None:
            raise StoreUnavailable(f"writes are failing: {failure}")

    def _local_dir(self):
        """The folder this store keeps its files in, or None (a server's)."""
        return None

    def _probe_write(self):
        """One small real write; clears the recorded failure if it commits."""
        with self._seam(), self._write():
            self._exec("UPDATE schema_version SET applied_at = applied_at "
                       "WHERE version = (SELECT MAX(version) FROM schema_version)")
        self._write_failure = None

    @staticmethod
    def _task(row):
        task = dict(zip(TASK_COLUMNS, row))
        for col in _JSON_COLUMNS:
            value = task[col]
            task[col] = json.loads(value) if value is not None else None
        if task["files"] is None:
            task["files"] = []
        return task

    # users

    def create_user(self, name, *, admin=False, credits=None, token=None, now=None,
                    max_active=None, rate_per_s=None, max_priority=None):
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise InvalidInput("user name must be 1-64 letters, digits, '_', '.' or '-'")
        check_user_limits(credits, max_active, rate_per_s, max_priority)
        if token is not None and len(token) < 16:
            raise InvalidInput("a chosen token must be at least 16 characters")
        token = token or "hf_" + secrets.token_urlsafe(32)
        now = time.time() if now is None else now
        with self._seam():
            try:
                with self._write():
                    self._exec(
                        "INSERT INTO users (name, token_hash, is_admin, credit_balance, max_active, "
                        "rate_per_s, created_at, max_priority) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (name, hash_token(token), bool(admin), credits, max_active,
                         None if rate_per_s is None else float(rate_per_s), now, max_priority))
                    if credits:
                        user_id = self._one("SELECT id FROM users WHERE name = ?", (name,))[0]
                        self._exec("INSERT INTO ledger (user_id, task_id, kind, amount, created_at) "
                                   "VALUES (?, '', 'grant', ?, ?)", (user_id, credits, now))
            except peewee.IntegrityError as exc:
                raise Conflict(f"user {name!r} exists", code="user_exists") from exc
        return self.user_by_name(name), token

    _USER_COLS = "id, name, is_admin, credit_balance, max_active, rate_per_s, created_at, max_priority"

    def _user(self, row):
        if row is None:
            return None
        keys = ("id", "name", "is_admin", "credit_balance", "max_active", "rate_per_s", "created_at",
                "max_priority")
        user = dict(zip(keys, row))
        user["is_admin"] = bool(user["is_admin"])
        return user

    def user_by_token(self, token):
        with self._seam():
            return self._user(self._one(
                f"SELECT {self._USER_COLS} FROM users WHERE token_hash = ?", (hash_token(token),)))

    def user_by_name(self, name):
        with self._seam():
            user = self._user(self._one(f"SELECT {self._USER_COLS} FROM users WHERE name = ?", (name,)))
        if user is None:
            raise NotFound("user not found", code="user_not_found")
        return user

    def set_max_priority(self, name, max_priority):
        check_user_limits(max_priority=max_priority)
        with self._seam(), self._write():
            if self._exec("UPDATE users SET max_priority = ? WHERE name = ?",
                          (max_priority, name)).rowcount != 1:
                raise NotFound("user not found", code="user_not_found")
        return self.user_by_name(name)

    def count_users(self):
        with self._seam():
            return self._one("SELECT COUNT(*) FROM users")[0]

    def reserved_credits(self, user_id):
        with self._seam():
            return self._one("SELECT COALESCE(SUM(cost), 0) FROM tasks WHERE user_id = ? "
                             "AND credits = 'reserved'", (user_id,))[0]

    # tasks

    def submit(self, user_id, provider, params, *, now, deadline_at, cost=0,
               dedupe_key=None, retry_of=None, max_active=None, max_queued=None, admit=None, webhook=None,
               priority=0):
        check_priority(priority)
        task_id = new_task_id(now)
        params_text = dumps(params)
        if admit is not None:
            admit = _once(admit)      # the retries below are one submission
        with self._seam():
            for _ in range(3):
                try:
                    # Free of credits and of a webhook, nothing can refuse
                    # it once it changed a row: the INSERT that may fail (a
                    # dedupe race) comes first and undoes itself. A cost may
                    # be reserved before admit() refuses; a webhook's events
                    # are checked after the INSERT.
                    with self._write(undo=cost > 0 or webhook is not None):
                        return self._submit(task_id, user_id, provider, params, params_text, now,
                                            deadline_at, cost, dedupe_key, retry_of, max_active,
                                            max_queued, admit, webhook, priority)
                except peewee.IntegrityError:
                    # Another transaction took the dedupe key, or made the
                    # live retry, between our check and our insert (possible
                    # only where the backend does not serialize writers): the
                    # index kept one. Read it.
                    if dedupe_key is None and retry_of is None:
                        raise
            raise StoreUnavailable("could not settle a dedupe race")

    def _submit(self, task_id, user_id, provider, params, params_text, now, deadline_at,
                cost, dedupe_key, retry_of, max_active, max_queued=None, admit=None, webhook=None,
                priority=0):
        self._lock(f"user:{user_id}")
        if dedupe_key is not None:
            row = self._one(
                _TASK_SELECT + " WHERE user_id = ? AND dedupe_key = ? "
                "AND status NOT IN ('failed', 'cancelled')", (user_id, dedupe_key))
            if row is not None:
                return self._task(row), True
        if retry_of is not None:
            # Two tabs, or a double click: the retry already made is the answer.
            row = self._one(
                _TASK_SELECT + " WHERE retry_of = ? AND user_id = ? "
                "AND status NOT IN ('failed', 'cancelled')", (retry_of, user_id))
            if row is not None:
                return self._task(row), True
        if max_active is not None:
            active = self._one("SELECT COUNT(*) FROM tasks WHERE user_id = ? "
                               "AND status IN ('queued', 'running')", (user_id,))[0]
            if active >= max_active:
                raise TooMany(f"you have {active} active tasks (limit {max_active})",
                              code="too_many_active", retry_after=5)
        if max_queued is not None:
            self._lock(f"queue:{provider}")
            queued = self._one("SELECT COUNT(*) FROM tasks WHERE status = 'queued' AND provider = ?",
                               (provider,))[0]
            if queued >= max_queued:
                raise TooMany(f"provider {provider} has {queued} tasks waiting (limit {max_queued})",
                              code="queue_full", retry_after=5)
        credits = "none"
        if cost > 0:
            balance = self._one("SELECT credit_balance FROM users WHERE id = ?", (user_id,))[0]
            if balance is not None:
                # The check is in the UPDATE itself: a grant taking credits
                # away does not take this user's lock, and may commit between
                # the read above and this write.
                if self._exec("UPDATE users SET credit_balance = credit_balance - ? "
                              "WHERE id = ? AND credit_balance >= ?", (cost, user_id, cost)).rowcount != 1:
                    balance = self._one("SELECT credit_balance FROM users WHERE id = ?", (user_id,))[0]
                    raise PaymentRequired(
                        f"this task costs {cost} credits and your balance is {balance}")
                self._exec("INSERT INTO ledger (user_id, task_id, kind, amount, created_at) "
                           "VALUES (?, ?, 'reserve', ?, ?)", (user_id, task_id, cost, now))
                credits = "reserved"
        if admit is not None:
            admit()
        task = {
            "id": task_id, "user_id": user_id, "provider": provider, "status": "queued",
            "step": None, "progress": None, "dedupe_key": dedupe_key, "params": params,
            "external_id": None, "attempts": 0, "files": [], "error": None, "cost": cost,
            "credits": credits, "retry_of": retry_of, "created_at": now, "updated_at": now,
            "started_at": None, "finished_at": None, "deadline_at": deadline_at, "version": 1,
            "next_poll_at": now, "polls": 0, "lease_owner": None, "lease_expires_at": None,
            "lease_token": 0, "state": None, "priority": priority,
        }
        row = [task[c] for c in TASK_COLUMNS]
        row[TASK_COLUMNS.index("params")] = params_text
        row[TASK_COLUMNS.index("files")] = "[]"
        self._exec(f"INSERT INTO tasks ({', '.join(TASK_COLUMNS)}) VALUES "
                   f"({', '.join('?' * len(TASK_COLUMNS))})", row)
        self._event(task, "created", now)
        self._webhook_submit(task, webhook, now)
        self._note_change(task, None)
        return task, False

    def _event(self, task, type_, now):
        # No lock: writers that run side by side (PostgreSQL) may commit
        # events out of seq order, and readers stop at _events_upto() so that
        # a reader of seq > N still never skips one. The task's row is
        # written before its event, so the transaction has its id by the
        # time it takes a seq (PostgresStore._events_upto relies on that).
        self._exec("INSERT INTO events (user_id, task_id, type, data, created_at) VALUES (?, ?, ?, ?, ?)",
                   (task["user_id"], task["id"], type_, dumps(task_json(task)), now))
        self._wrote_events.flag = True

    def get_task(self, task_id, user_id=None):
        with self._seam():
            if user_id is None:
                row = self._one(_TASK_SELECT + " WHERE id = ?", (task_id,))
            else:
                row = self._one(_TASK_SELECT + " WHERE id = ? AND user_id = ?", (task_id, user_id))
        if row is None:
            raise NotFound("task not found", code="task_not_found")
        return self._task(row)

    def list_tasks(self, user_id, *, statuses=None, limit=50, before=None, retry_of=None):
        sql = _TASK_SELECT + " WHERE user_id = ?"
        params = [user_id]
        if retry_of is not None:
            sql += " AND retry_of = ?"
            params.append(retry_of)
        if statuses:
            sql += f" AND status IN ({', '.join('?' * len(statuses))})"
            params += list(statuses)
        if before:
            sql += " AND id < ?"
            params.append(before)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit + 1)
        with self._seam():
            rows = self._exec(sql, params).fetchall()
        tasks = [self._task(r) for r in rows[:limit]]
        return tasks, (tasks[-1]["id"] if len(rows) > limit else None)

    def claim(self, owner, *, now, limit, lease_s, statuses=("queued", "running"), fresh_first=False, skip=()):
        with self._seam(), self._write(undo=False):
            # Every row read into a task before the first is leased: from
            # then on only the database can fail this write.
            return self._lease(owner, now, lease_s,
                               [self._task(row) for row in self._due(statuses, now, limit, fresh_first, skip)])

    def _lease(self, owner, now, lease_s, tasks):
        """Lease `tasks`, read in this write, to `owner`; returns them."""
        for task in tasks:
            task["lease_owner"] = owner
            task["lease_expires_at"] = now + lease_s
            task["lease_token"] += 1
        if tasks:
            # One statement for the lot: each is a handover of the GIL
            # while this write holds the lock. The rows are as read
            # (this write holds them: the write lock, or FOR UPDATE), so
            # `lease_token + 1` is the token each task now carries.
            self._exec(f"UPDATE tasks SET lease_owner = ?, lease_expires_at = ?, "
                       f"lease_token = lease_token + 1 WHERE id IN ({', '.join('?' * len(tasks))})",
                       (owner, now + lease_s, *(task["id"] for task in tasks)))
        return tasks

    def claim_on_release(self, owner, *, lease_s, clock, fresh_first=False, skip=()):
        self._ride.ask = (owner, lease_s, clock, fresh_first, skip)
        self._ride.got = None

    def claimed_on_release(self):
        got = getattr(self._ride, "got", None)
        self._ride.ask = self._ride.got = None
        return got

    def _ride_claim(self):
        """In a write of this thread that has just let a lease go: the claim
        claim_on_release() asked for, once. What it leased is this thread's
        when the write commits (_after_commit), and never if it rolls back."""
        ask = getattr(self._ride, "ask", None)
        if ask is None:
            return
        self._ride.ask = None
        owner, lease_s, clock, fresh_first, skip = ask
        now = clock()
        rows = self._due(("queued", "running"), now, 1, fresh_first, skip)
        try:
            tasks = [self._task(row) for row in rows]
        except Exception:
            # A row that cannot be read must not undo the write it rides
            # on: nothing is leased, and the worker's own claim meets the
            # row and says why.
            return
        self._after_commit(setattr, self._ride, "got", self._lease(owner, now, lease_s, tasks))

    _DUE = " AND next_poll_at <= ? AND (lease_owner IS NULL OR lease_expires_at < ?)"

    def _due(self, statuses, now, limit, fresh_first=False, skip=()):
        """The first `limit` rows due and not leased, in claim order: the
        longest due first; with `fresh_first`, a running task's turn is
        put off by its age, so submissions and young tasks go first.
        None of the providers in `skip`: rows passed over stay due."""
        due, due_params = self._DUE, (now, now)
        if skip:
            due += f" AND provider NOT IN ({', '.join('?' * len(skip))})"
            due_params += tuple(skip)
        if not fresh_first or "running" not in statuses:
            # SQLite reads each status's range of tasks_status_next_poll_at
            # in order and leaves it once it holds `limit` rows ahead.
            marks = ", ".join("?" * len(statuses))
            return self._exec(_TASK_SELECT + f" WHERE status IN ({marks}){due} "
                              f"ORDER BY next_poll_at LIMIT ?{self.skip_locked}",
                              (*statuses, *due_params, limit)).fetchall()
        # A computed order cannot stop early: it read and sorted every due
        # row, the very backlog that turns the slow-down on. So the queued
        # first, by the same index; then the running by tasks_fresh
        # (migration 16), whose WHERE the statement repeats word for word
        # for SQLite to use it. Once `limit` queued tasks are in hand, only
        # a running task whose turn comes before the last of them can be
        # taken.
        # The statuses are written into the SQL: bound, `status = ?` made
        # SQLite plan the statement again at every run (0.05 ms), as a
        # partial index may apply depending on the value.
        others = ", ".join(f"'{s}'" for s in statuses if s != "running" and s in _STATUSES)
        keyed = []
        if others:
            keyed = [(row[_NEXT_POLL_AT], row) for row in self._exec(
                _TASK_SELECT + f" WHERE status IN ({others}){due} ORDER BY next_poll_at "
                f"LIMIT ?{self.skip_locked}", (*due_params, limit)).fetchall()]
        sql, params = _TASK_SELECT + f"{self.fresh_index} WHERE status = 'running'{due}", [*due_params]
        if len(keyed) >= limit:
            sql += f" AND {FRESH_ORDER} < ?"
            params.append(keyed[limit - 1][0] - now)
        rows = self._exec(sql + f" ORDER BY {FRESH_ORDER} LIMIT ?{self.skip_locked}", (*params, limit)).fetchall()
        keyed += [(_fresh_turn(row, now), row) for row in rows]
        keyed.sort(key=lambda turn_row: turn_row[0])
        return [row for _, row in keyed[:limit]]

    def poll_lag(self, *, now):
        with self._seam():
            oldest = self._one("SELECT MIN(next_poll_at) FROM tasks WHERE status IN ('queued', 'running') "
                               "AND next_poll_at <= ? AND (lease_owner IS NULL OR lease_expires_at < ?)",
                               (now, now))[0]
        return 0.0 if oldest is None else now - oldest

    def _task_for_update(self, task_id):
        """The task, its row locked until the transaction ends; NotFound."""
        row = self._one(_TASK_SELECT + " WHERE id = ?" + self.for_update, (task_id,))
        if row is None:
            raise NotFound("task not found", code="task_not_found")
        return self._task(row)

    def update(self, task_id, *, token, now, release=False, seen=None, **changes):
        _check_updatable(changes)
        with self._seam(), self._write(undo=False):
            return self._as_seen(task_id, token, seen, lambda task, version: self._apply(
                task, token, now, release, changes, version))

    def _as_seen(self, task_id, token, seen, change):
        """change(task, version) on the task: first as the caller's lease
        last saw it (`seen`, the task a claim, take_slot or update
        returned), with the version the write must still find, which spares
        a read; then, should the row have moved on (a cancel, a hint:
        _Moved), as it is."""
        if token is not None and seen is not None and (seen["id"], seen["lease_token"]) == (task_id, token):
            try:
                return change(dict(seen), seen["version"])
            except _Moved:
                pass
        return change(self._task_for_update(task_id), None)

    def _apply(self, task, token, now, release, changes, version=None):
        """Check and write `changes` to `task`, with its event, history and
        credits. `version`: the row must still have it, else _Moved (the
        task came from the caller's memory, not from a read). Raises
        nothing once it has changed a row, but for the database failing."""
        if token is not None and task["lease_token"] != token:
            raise StaleLease(f"lease {token} on {task['id']} is stale (now {task['lease_token']})")
        old = task["status"]
        new = changes.get("status", old)
        if old in TERMINAL:
            raise Conflict(f"task is already {old}", code="task_finished")
        check_transition(old, new)
        if token is not None and "files" in changes:
            # The fence for files: a lease publishes only what it wrote in
            # its own folder, and only while the token above is current.
            own = lease_dir(token)
            if any(f.get("dir", own) != own for f in changes["files"]):
                raise ValueError(f"lease {token} may publish only files in {own}")
        error = changes.get("error")
        if error is not None and error.get("code") not in ERROR_CODES:
            raise ValueError(f"unknown error code {error.get('code')!r}")
        task.update(changes)
        # Encoded before the row is written: past that, only the database
        # may fail this (update's and take_slot's undo=False).
        encoded = {c: dumps(task[c]) for c in _JSON_COLUMNS if c in changes}
        # Only the columns this change moves are written: those the caller
        # did not see change (a renewed lease, a poll made due) stay as
        # they are.
        cols = set(changes) | {"updated_at", "version"}
        if new == "running" and task["started_at"] is None:
            task["started_at"] = now
            cols.add("started_at")
        reserved = new in TERMINAL and task["credits"] == "reserved"
        if new in TERMINAL:
            task["finished_at"] = now
            task["next_poll_at"] = None
            release = True
            if reserved:
                task["credits"] = _SETTLED[new]      # as _settle will record it (checked below)
            cols |= {"finished_at", "next_poll_at", "credits"}
        if release:
            task["lease_owner"] = None
            task["lease_expires_at"] = None
            cols |= {"lease_owner", "lease_expires_at"}
        task["updated_at"] = now
        task["version"] += 1
        cols = sorted(cols)
        values = [encoded[c] if c in encoded else task[c] for c in cols]
        where, args = "id = ? AND lease_token = ?", [task["id"], task["lease_token"]]
        if version is not None:
            where += " AND version = ?"
            args.append(version)
        cur = self._exec(f"UPDATE tasks SET {', '.join(c + ' = ?' for c in cols)} WHERE {where}", (*values, *args))
        if cur.rowcount != 1:
            if version is not None:
                raise _Moved()
            raise StaleLease(f"task {task['id']} changed under us")
        # The row is written first, so nothing above has changed anything
        # when it refuses.
        if new in TERMINAL:
            self._after_commit(metrics.FINISHED.inc, task["provider"], new)
            self._record_history(task, new, now)
            if reserved:
                self._settle(task, new, now)
                if task["credits"] != _SETTLED[new]:
                    # Settled before, the other way (the ledger says so):
                    # the row, written as this settle would go, follows it.
                    self._exec("UPDATE tasks SET credits = ? WHERE id = ?", (task["credits"], task["id"]))
        self._event(task, "finished" if new in TERMINAL else "updated", now)
        self._webhook_change(task, old, changes, now)
        if new != old:
            self._note_change(task, old)
        if release:
            self._ride_claim()
        return task

    def _after_commit(self, fn, *args):
        """Run fn(*args) once the outermost transaction commits; never if it
        rolls back. For what must not tell of a change that did not happen:
        log lines, counters."""
        pending = getattr(self._changes, "pending", None)
        if pending is None:
            pending = self._changes.pending = []
        pending.append((fn, args))

    def _note_change(self, task, old):
        """Queue the task's log line until its transaction commits."""
        if task_log.isEnabledFor(logging.INFO):
            self._after_commit(_log_change, task["id"], task["user_id"], task["provider"], old,
                               task["status"], task["error"], task["credits"], task["external_id"],
                               task["attempts"])

    def _record_history(self, task, status, now):
        took = max(0.0, now - task["created_at"])
        self._exec("INSERT INTO task_history (provider, day, outcome, tasks, total_s, max_s) "
                   "VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT (provider, day, outcome) DO UPDATE SET "
                   "tasks = task_history.tasks + 1, total_s = task_history.total_s + excluded.total_s, "
                   "max_s = CASE WHEN excluded.max_s > task_history.max_s THEN excluded.max_s "
                   "ELSE task_history.max_s END",
                   (task["provider"], history_day(now), status, took, took))
        code = (task["error"] or {}).get("code") or ""
        self._exec("INSERT INTO task_history_detail (provider, day, outcome, error_code, bucket, tasks) "
                   "VALUES (?, ?, ?, ?, ?, 1) ON CONFLICT (provider, day, outcome, error_code, bucket) "
                   "DO UPDATE SET tasks = task_history_detail.tasks + 1",
                   (task["provider"], history_day(now), status, code, duration_bucket(took)))

    def _settle(self, task, status, now):
        """Charge on success, refund otherwise: once, by the ledger's indexes.
        The balance moves only when this transaction's ledger row went in, so
        a settle that finds one already there (a race on a backend that does
        not serialize writers, a repeat after a crash) changes no balance and
        takes the recorded outcome."""
        kind = "charge" if _SETTLED[status] == "charged" else "refund"
        cur = self._exec("INSERT INTO ledger (user_id, task_id, kind, amount, created_at) "
                         "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                         (task["user_id"], task["id"], kind, task["cost"], now))
        if cur.rowcount == 1:
            self._after_commit((metrics.CHARGES if kind == "charge" else metrics.REFUNDS).inc, task["provider"])
            if kind == "refund":
                self._exec("UPDATE users SET credit_balance = credit_balance + ? WHERE id = ?",
                           (task["cost"], task["user_id"]))
        else:
            kind = self._one("SELECT kind FROM ledger WHERE task_id = ? AND kind IN ('charge', 'refund')",
                             (task["id"],))[0]
            log.warning("task %s: credits were already settled (%s); not settling again", task["id"], kind)
        task["credits"] = "charged" if kind == "charge" else "refunded"

    def reschedule(self, task_id, *, token, next_poll_at, polls, state=None):
        sql = ("UPDATE tasks SET next_poll_at = ?, polls = ?, lease_owner = NULL, "
               "lease_expires_at = NULL")
        params = [next_poll_at, polls]
        if state is not None:
            sql += ", state = ?"
            params.append(dumps(state))
        sql += " WHERE id = ? AND lease_token = ? AND status IN ('queued', 'running')"
        with self._seam(), self._write(undo=False):
            if self._exec(sql, (*params, task_id, token)).rowcount != 1:
                raise StaleLease(f"task {task_id} is no longer held with lease {token}")
            self._ride_claim()

    # -- provider slots and long steps (the worker's) --------------------------

    def take_slot(self, task_id, *, token, now, limit, wake=None, seen=None, **changes):
        _check_updatable(changes)
        with self._seam(), self._write(undo=False):
            taken = self._as_seen(task_id, token, seen, lambda task, version: self._take_slot(
                task, token, now, limit, changes, version))
            if taken is not False:
                return taken
        # Refused with a slot free: those first in line are due now, and
        # committed; a waiting dispatcher may take them at once.
        if wake is not None:
            wake()
        return None

    def wake_line(self, provider, *, limit, now):
        waiting = f"{self._WAITING} AND (step IS NULL OR step = ?) AND next_poll_at > ?"
        chosen, ids = "", ()
        if limit is not None:
            # One snapshot, so the slots counted free and the line agree:
            # read statement by statement, a task taking a slot in between
            # was not counted as holding it, and the one after it in line
            # was woken for a slot it had just taken.
            with self._seam(), self._snapshot():
                held = dict(self._exec(self._HELD, (provider, "") * 2).fetchall())
                free = limit - sum(held.values())
                if free <= 0:
                    return 0
                ids = [task_id for user, n in self._turns(provider, held, free).items()
                       for task_id, due_at in self._first_parked(provider, user, n) if due_at > now]
            if not ids:
                return 0
            chosen = f"id IN ({', '.join('?' * len(ids))}) AND "
        # Read apart from this write, so a look that finds nothing to wake
        # (the usual one) writes nothing: the line may have moved since, so
        # each is woken only if still parked. With no limit, every parked
        # task, in this one statement however many there are. A row another
        # writer holds is passed over rather than waited for (PostgreSQL),
        # as take_slot holds its task's row and then the slot lock; the
        # next look finds it again if it still needs waking.
        with self._seam(), self._write(undo=False):
            return self._exec(
                f"UPDATE tasks SET next_poll_at = ? WHERE id IN (SELECT id FROM tasks WHERE {chosen}"
                f"{waiting}{self.skip_locked})", (now, *ids, provider, SLOT_STEP, SLOT_WAIT_STEP, now)).rowcount

    def _take_slot(self, task, token, now, limit, changes, version):
        """take_slot's decision and change: the task changed, None when
        every slot is taken, False when refused with a slot free."""
        if token is not None and task["lease_token"] != token:
            raise StaleLease(f"lease {token} on {task['id']} is stale (now {task['lease_token']})")
        holds = task["status"] == "running" or (task["status"] == "queued" and task["step"] == SLOT_STEP)
        if limit is not None and not holds:
            self._slot_lock(task["provider"])
            held = dict(self._exec(self._HELD, (task["provider"], task["id"]) * 2).fetchall())
            busy = sum(held.values())
            if busy >= limit:
                return None
            if not self._next_in_line(task, held, limit - busy, now):
                return False
        return self._apply(task, token, now, False, changes, version)

    # Slots held at a provider, by user: its running tasks and those queued
    # holding one (tasks_slots, migration 8, names the step as written),
    # never the queued tasks waiting in line.
    _HELD = ("SELECT user_id, COUNT(*) FROM (SELECT user_id FROM tasks WHERE status = 'running' AND provider = ? "
             "AND id <> ? UNION ALL SELECT user_id FROM tasks WHERE status = 'queued' AND "
             f"step = '{SLOT_STEP}' AND provider = ? AND id <> ?) h GROUP BY user_id")

    def _slot_lock(self, provider):
        """Serialize slot decisions for `provider` until the transaction ends."""
        self._lock("slot:" + provider)

    # Waiting for a provider's slot: queued and not holding one (slot_line's
    # triggers say the same, store/slot_line.py). The counts in
    # _next_in_line read these through the partial index tasks_line
    # (migration 7) alone, never the rows.
    _WAITING = "status = 'queued' AND provider = ? AND (step IS NULL OR step <> ?)"

    def _next_in_line(self, task, held, free, now):
        """Whether `task` may take one of its provider's `free` slots, inside
        take_slot's transaction, under the slot lock; `held`: {user id: slots
        held}. With no more waiting than free, yes. Otherwise users take
        turns (_turns); within a user, higher priority, then the oldest
        task. When `task` is not among those first in line, they become due
        now, so the slot it leaves free is taken at the next tick rather
        than when their own looks fall due (parked: PARKED_S).

        Every read here stops after a few index entries (counts stop at a
        cap, the line reads a row per free slot and per holder), so the
        cost grows neither with the tasks waiting nor with their users."""
        provider = task["provider"]
        if self._waiting_at_most(provider, free):
            return True
        turns = self._turns(provider, held, free)
        mine = turns.get(task["user_id"], 0)
        if mine and self._ahead(task, mine) < mine:
            return True
        for user, n in turns.items():
            self._wake(provider, user, n, now)
        return False

    def _waiting_at_most(self, provider, n):
        """Whether at most `n` tasks wait for `provider`'s slots."""
        return self._one(f"SELECT COUNT(*) FROM (SELECT 1 FROM tasks WHERE {self._WAITING} LIMIT ?) w",
                         (provider, SLOT_STEP, n + 1))[0] <= n

    def _turns(self, provider, held, free):
        """{user id: how many of `free` slots are theirs}: the next slot
        goes to the user holding fewest (`held`), then the one whose best
        waiting task has the higher priority, then the one waiting longest.
        Fewer than `free` in all when fewer tasks wait."""
        # Users level on all three take turns by user id.
        line = {user: [held.get(user, 0), -best, since, user]
                for user, best, since in self._line(provider, held, free)}
        turns = {}
        for turn in range(free):
            if not line:
                break
            user = min(line, key=line.get)
            turns[user] = turns.get(user, 0) + 1
            line[user][0] += 1
            # With turns left, whether this user has another task waiting
            # decides if they stay in line: counted (one past their turns)
            # only for the few who win a turn.
            if turn + 1 < free and turns[user] == self._one(
                    f"SELECT COUNT(*) FROM (SELECT 1 FROM tasks WHERE {self._WAITING} AND user_id = ? "
                    "LIMIT ?) n", (provider, SLOT_STEP, user, turns[user] + 1))[0]:
                del line[user]
        return turns

    def _line(self, provider, held, free):
        """[(user id, best waiting priority, oldest waiting since)] of the
        users at `provider` who may win one of `free` turns, from slot_line
        (migration 13, store/slot_line.py). Users holding none of the slots
        come before every holder, and in slot_line's order among themselves:
        one past the first `free` of them could only win a turn after each
        of those had won one. The first `free` + len(held) rows hold at
        least `free` of them; the holders' own rows, which may sort further
        down, are read apart. A user whose queued tasks all hold slots has
        no row: not waiting."""
        rows = self._exec("SELECT user_id, best, since FROM slot_line WHERE provider = ? "
                          "ORDER BY best DESC, since, user_id LIMIT ?", (provider, free + len(held))).fetchall()
        read = {r[0] for r in rows}
        holders = [user for user in held if user not in read]
        if holders:
            rows += self._exec(f"SELECT user_id, best, since FROM slot_line WHERE provider = ? "
                               f"AND user_id IN ({', '.join('?' * len(holders))})",
                               (provider, *holders)).fetchall()
        return rows

    def _ahead(self, task, cap):
        """How many of its user's waiting tasks are ahead of `task` in line,
        counted up to `cap`: two index ranges, those of higher priority and
        the older ones of its own."""
        where = f"SELECT 1 FROM tasks WHERE {self._WAITING} AND user_id = ? AND "
        key = (task["provider"], SLOT_STEP, task["user_id"])
        return self._one(
            f"SELECT (SELECT COUNT(*) FROM ({where} priority > ? LIMIT ?) h) + "
            f"(SELECT COUNT(*) FROM ({where} priority = ? AND created_at <= ? "
            "AND (created_at < ? OR id < ?) LIMIT ?) o)",
            (*key, task["priority"], cap, *key, task["priority"], task["created_at"], task["created_at"],
             task["id"], cap))[0]

    def _wake(self, provider, user, n, now):
        """Make `user`'s first `n` parked in line (_first_parked) due now."""
        ids = [task_id for task_id, due_at in self._first_parked(provider, user, n) if due_at > now]
        if ids:
            self._exec(f"UPDATE tasks SET next_poll_at = ? WHERE id IN ({', '.join('?' * len(ids))}) "
                       "AND next_poll_at > ?", (now, *ids, now))

    def _first_parked(self, provider, user, n):
        """[(id, next_poll_at)] of `user`'s first `n` in line at `provider`
        among those parked by a refusal or never tried: a task sitting out
        a backoff keeps its schedule. Read a priority at a time from the
        top, so that a user's long line of older, lower tasks is never
        sorted."""
        parked = f"{self._WAITING} AND user_id = ? AND (step IS NULL OR step = ?)"
        key = (provider, SLOT_STEP, user, SLOT_WAIT_STEP)
        below, first = None, []
        while n > 0:
            row = self._one(f"SELECT MAX(priority) FROM tasks WHERE {parked}"
                            + ("" if below is None else " AND priority < ?"),
                            key if below is None else (*key, below))
            if row is None or row[0] is None:
                break
            below = row[0]
            # The n-th oldest at this priority bounds the range read (and
            # sorted by id, for ties): the index gives created_at's order.
            nth = self._one(f"SELECT created_at FROM tasks WHERE {parked} AND priority = ? "
                            "ORDER BY created_at LIMIT 1 OFFSET ?", (*key, below, n - 1))
            upto = "" if nth is None else " AND created_at <= ?"
            rows = self._exec(
                f"SELECT id, next_poll_at FROM tasks WHERE {parked} AND priority = ?{upto} "
                "ORDER BY created_at, id LIMIT ?", (*key, below, *([] if nth is None else [nth[0]]), n)).fetchall()
            n -= len(rows)
            first += [tuple(r) for r in rows]
        return first

    def renew_lease(self, task_id, *, token, expires_at):
        with self._seam(), self._write(undo=False):
            if self._exec("UPDATE tasks SET lease_expires_at = ? WHERE id = ? AND lease_token = ? "
                          "AND lease_owner IS NOT NULL AND status IN ('queued', 'running')",
                          (expires_at, task_id, token)).rowcount != 1:
                raise StaleLease(f"task {task_id} is no longer held with lease {token}")

    def overdue(self, *, now, limit):
        with self._seam():
            rows = self._exec(_TASK_SELECT + " WHERE status IN ('queued', 'running') "
                              "AND deadline_at < ? ORDER BY deadline_at LIMIT ?", (now, limit)).fetchall()
        return [self._task(r) for r in rows]

    def expire(self, task_id, *, now, error):
        with self._seam(), self._write():
            task = self._task_for_update(task_id)
            if task["status"] in TERMINAL or task["deadline_at"] >= now:
                raise Conflict("task is not overdue", code="not_overdue")
            return self._apply(task, None, now, True, {"status": "failed", "error": error,
                                                        "step": "failed"})

    def cancel(self, task_id, user_id, *, now):
        with self._seam(), self._write():
            row = self._one(_TASK_SELECT + " WHERE id = ? AND user_id = ?" + self.for_update,
                            (task_id, user_id))
            if row is None:
                raise NotFound("task not found", code="task_not_found")
            task = self._task(row)
            if task["status"] in TERMINAL:
                raise Conflict(f"task is already {task['status']}", code="task_finished")
            return self._apply(task, None, now, True, {"status": "cancelled"})

    def lease_owners(self):
        with self._seam():
            return [r[0] for r in self._exec(
                f"SELECT DISTINCT lease_owner FROM tasks WHERE {_LEASED}").fetchall()]

    def release_leases(self, owners):
        released = 0
        with self._seam():
            for owner in owners:
                with self._write():
                    released += self._exec("UPDATE tasks SET lease_owner = NULL, lease_expires_at = NULL "
                                           f"WHERE {_LEASED} AND lease_owner = ?", (owner,)).rowcount
        return released

    def expired_leases(self, *, now):
        with self._seam():
            return [tuple(r) for r in self._exec(
                f"SELECT id, lease_owner FROM tasks WHERE {_LEASED} AND lease_expires_at < ? "
                "ORDER BY id", (now,)).fetchall()]

    def release_expired_leases(self, *, now):
        with self._seam(), self._write():
            return self._exec("UPDATE tasks SET lease_owner = NULL, lease_expires_at = NULL "
                              f"WHERE {_LEASED} AND lease_expires_at < ?", (now,)).rowcount

    def claim_task(self, task_id, owner, *, now, lease_s):
        with self._seam(), self._write():
            row = self._one(_TASK_SELECT + " WHERE id = ? AND status IN ('queued', 'running') "
                            "AND (lease_owner IS NULL OR lease_expires_at < ?)" + self.for_update,
                            (task_id, now))
            if row is None:
                return None
            task = self._task(row)
            task.update(lease_owner=owner, lease_expires_at=now + lease_s, lease_token=task["lease_token"] + 1)
            self._exec("UPDATE tasks SET lease_owner = ?, lease_expires_at = ?, lease_token = ? WHERE id = ?",
                       (owner, now + lease_s, task["lease_token"], task_id))
            return task

    def in_doubt(self, *, limit=1000):
        with self._seam():
            rows = self._exec(_TASK_SELECT + " WHERE status = 'queued' AND (external_id IS NOT NULL "
                              "OR state LIKE ?) ORDER BY id LIMIT ?", (_POSTED, limit)).fetchall()
        return [self._task(r) for r in rows]

    def wake_backoff(self, provider, *, now):
        with self._seam(), self._write():
            return self._exec("UPDATE tasks SET next_poll_at = ? WHERE status = 'queued' AND next_poll_at > ? "
                              "AND provider = ? AND lease_owner IS NULL AND state LIKE ? AND state NOT LIKE ?",
                              (now, now, provider, _FAILURES, _POSTED)).rowcount

    def poll_now(self, task_id, *, now):
        with self._seam(), self._write():
            return self._exec("UPDATE tasks SET next_poll_at = ? WHERE id = ? "
                              "AND status IN ('queued', 'running')", (now, task_id)).rowcount == 1

    def note_progress(self, task_id, *, step, progress, now):
        with self._seam(), self._write():
            row = self._one(_TASK_SELECT + " WHERE id = ? AND status = 'running'" + self.for_update, (task_id,))
            if row is None:
                return False
            task = self._task(row)
            if (task["step"], task["progress"]) == (step, progress):
                return False
            # The task's lease token is presented as it is now: these hints
            # come from outside any lease and never move one.
            self._apply(task, task["lease_token"], now, False, {"step": step, "progress": progress})
            return True

    def stray_reservations(self):
        with self._seam():
            rows = self._exec(_TASK_SELECT + " WHERE credits = 'reserved' "
                              "AND status IN ('succeeded', 'partial', 'failed', 'cancelled') ORDER BY id").fetchall()
        return [self._task(r) for r in rows]

    def settle_stray(self, task_id, *, now):
        with self._seam(), self._write():
            task = self._task_for_update(task_id)
            if task["credits"] != "reserved" or task["status"] not in TERMINAL:
                return None
            self._settle(task, task["status"], now)
            task["version"] += 1
            task["updated_at"] = now
            self._exec("UPDATE tasks SET credits = ?, version = ?, updated_at = ? WHERE id = ?",
                       (task["credits"], task["version"], now, task_id))
            self._event(task, "updated", now)
            return task["credits"]

    # events

    def events_since(self, user_id, since, limit=100):
        with self._seam():
            bound, upto = self._upto()
            rows = self._exec("SELECT seq, task_id, type, data FROM events WHERE user_id = ? AND seq > ?"
                              f"{bound} ORDER BY seq LIMIT ?", (user_id, since, *upto, limit)).fetchall()
        return [(r[0], event_json(*r)) for r in rows]

    def task_timeline(self, user_id, task_id, *, limit=500):
        with self._seam():
            bound, upto = self._upto()
            rows = self._exec("SELECT seq, type, created_at, data FROM events WHERE user_id = ? AND task_id = ?"
                              f"{bound} ORDER BY seq DESC LIMIT ?", (user_id, task_id, *upto, limit + 1)).fetchall()
        events = [{"seq": r[0], "type": r[1], "at": r[2], "task": json.loads(r[3])} for r in rows[:limit]]
        return events[::-1], len(rows) > limit

    def last_seq(self, user_id=None):
        with self._seam():
            bound, upto = self._upto()
            if user_id is None:
                row = self._one("SELECT MAX(seq) FROM events" + bound.replace(" AND", " WHERE"), upto)
            else:
                row = self._one(f"SELECT MAX(seq) FROM events WHERE user_id = ?{bound}", (user_id, *upto))
        return row[0] or 0

    def latest_events(self, since):
        with self._seam():
            bound, upto = self._upto()
            return dict(self._exec(f"SELECT user_id, MAX(seq) FROM events WHERE seq > ?{bound} "
                                   "GROUP BY user_id", (since, *upto)).fetchall())

    def _upto(self):
        """The clause and parameters that keep a read of the event log at or
        below _events_upto()."""
        upto = self._events_upto()
        return ("", ()) if upto is None else (" AND seq <= ?", (upto,))

    def _events_upto(self):
        """The highest seq a reader may return now: every event at or below
        it that will ever commit is visible already. None where events
        commit in seq order (SQLite runs one writer at a time)."""
        return None

    def task_events(self, task_id):
        """[(seq, type)] of one task, oldest first (for audits and tests)."""
        with self._seam():
            return [tuple(r) for r in self._exec(
                "SELECT seq, type FROM events WHERE task_id = ? ORDER BY seq", (task_id,)).fetchall()]

    def stats(self, now):
        with self._seam():
            # Active rows only, through the status index: /healthz asks this
            # every few seconds, and finished rows grow without bound.
            by_status = dict(self._exec("SELECT status, COUNT(*) FROM tasks "
                                        "WHERE status IN ('queued', 'running') GROUP BY status").fetchall())
            oldest = self._one("SELECT MIN(created_at) FROM tasks WHERE status IN ('queued', 'running')")[0]
        return {
            "queue_depth": by_status.get("queued", 0),
            "active": by_status.get("queued", 0) + by_status.get("running", 0),
            "oldest_active_s": round(now - oldest, 3) if oldest is not None else 0,
        }

    def task_counts(self):
        with self._seam():
            return {(provider, status): n for status, provider, n in self._exec(
                "SELECT status, provider, COUNT(*) FROM tasks GROUP BY status, provider").fetchall()}
