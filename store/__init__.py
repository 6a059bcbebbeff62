"""Persistence: the task model, the Store interface, its backends, migrations.

The peewee models below are the one description of the schema. Queries run as
plain SQL through the peewee database object: the query builder costs more than
the work on the hot paths (submit, claim, get by id), and plain SQL keeps every
backend honest about what it does inside a transaction.

Times are stored as float seconds since the epoch (UTC) and shown as ISO 8601.
"""

import hashlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
import zlib
from contextlib import contextmanager
from datetime import datetime, timezone
from enum import Enum

import peewee
from peewee import (AutoField, BooleanField, CharField, CompositeKey,
                    DoubleField, IntegerField, Model, TextField)

import metrics
from errors import (ConfigError, Conflict, InvalidInput, NotFound, PaymentRequired,
                    StaleLease, StoreUnavailable, TooMany)

log = logging.getLogger("holdfast.store")
# One line per task state change (creation included), written after commit.
task_log = logging.getLogger("holdfast.tasks")


class TaskStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = frozenset({"queued", "running"})
TERMINAL = frozenset({"succeeded", "partial", "failed", "cancelled"})
# Only active tasks hold leases (finishing releases them), so lease queries
# say so and read the status index rather than every finished row.
_LEASED = "status IN ('queued', 'running') AND lease_owner IS NOT NULL"
# A task can go back from running to queued: the provider lost it and it will
# be submitted again. Results are only collected from a running task (a job
# found at the provider after a crash becomes running first). Terminal
# statuses lead nowhere.
TRANSITIONS = {
    "queued": frozenset({"queued", "running", "failed", "cancelled"}),
    "running": frozenset({"running", "queued", "succeeded", "partial", "failed", "cancelled"}),
    "succeeded": frozenset(),
    "partial": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}
ERROR_CODES = frozenset({"provider_rejected", "provider_unavailable", "timeout",
                         "result_expired", "provider_lost", "invalid_result", "internal"})
DEDUPE_IGNORED = ("failed", "cancelled")
# A queued task whose step is this holds one of its provider's slots: its
# submit is under way, or in doubt after a crash (see take_slot).
SLOT_STEP = "submitting"


def _where(sql, **conditions):
    """`sql` with `WHERE` for each condition (a `column op ?` -> value pair)
    whose value is not None, and its parameters."""
    clauses = [(c, v) for c, v in conditions.items() if v is not None]
    if clauses:
        sql += " WHERE " + " AND ".join(c for c, _ in clauses)
    return sql, [v for _, v in clauses]


def _check_updatable(changes):
    unknown = set(changes) - _UPDATABLE
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")


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


def check_transition(current, new):
    if new not in TRANSITIONS[current]:
        raise Conflict(f"illegal transition {current} -> {new}", code="illegal_transition")


# -- schema ----------------------------------------------------------------

class _Base(Model):
    class Meta:
        legacy_table_names = False


class User(_Base):
    id = AutoField()
    name = CharField(unique=True)
    token_hash = CharField(unique=True)
    is_admin = BooleanField(default=False)
    credit_balance = IntegerField(null=True)   # None: no credit limit
    max_active = IntegerField(null=True)       # None: the server default
    rate_per_s = DoubleField(null=True)
    created_at = DoubleField()

    class Meta:
        table_name = "users"


class Task(_Base):
    id = CharField(primary_key=True)
    user_id = IntegerField()
    provider = CharField()
    status = CharField()
    step = CharField(null=True)
    progress = DoubleField(null=True)
    dedupe_key = CharField(null=True)
    params = TextField()
    external_id = CharField(null=True)
    attempts = IntegerField(default=0)
    files = TextField(default="[]")
    error = TextField(null=True)
    cost = IntegerField(default=0)
    credits = CharField(default="none")
    retry_of = CharField(null=True)
    created_at = DoubleField()
    updated_at = DoubleField()
    started_at = DoubleField(null=True)
    finished_at = DoubleField(null=True)
    deadline_at = DoubleField()
    version = IntegerField(default=1)
    # Polls are data: when to look at the task next, and who is looking.
    next_poll_at = DoubleField(null=True)
    polls = IntegerField(default=0)
    lease_owner = CharField(null=True)
    lease_expires_at = DoubleField(null=True)
    lease_token = IntegerField(default=0)
    state = TextField(null=True)   # the provider adapter's private JSON

    class Meta:
        table_name = "tasks"
        indexes = (
            (("status", "next_poll_at"), False),
            (("user_id", "status"), False),
            (("user_id", "id"), False),
        )


class Event(_Base):
    seq = AutoField()
    user_id = IntegerField()
    task_id = CharField()
    type = CharField()
    data = TextField()
    created_at = DoubleField()

    class Meta:
        table_name = "events"
        indexes = ((("user_id", "seq"), False),)


class Ledger(_Base):
    id = AutoField()
    user_id = IntegerField()
    task_id = CharField()
    kind = CharField()     # reserve, charge, refund, grant
    amount = IntegerField()
    created_at = DoubleField()

    class Meta:
        table_name = "ledger"


class Session(_Base):
    user_id = IntegerField()
    key = CharField()
    messages = TextField(default="[]")
    data = TextField(null=True)
    updated_at = DoubleField()
    expires_at = DoubleField()

    class Meta:
        table_name = "sessions"
        primary_key = CompositeKey("user_id", "key")


class SchemaVersion(_Base):
    version = IntegerField(primary_key=True)
    applied_at = DoubleField()

    class Meta:
        table_name = "schema_version"


class TaskHistory(_Base):
    """What retention keeps of finished tasks for success-rate numbers: per
    provider, UTC day of finishing and outcome, how many and how long they
    took (finished_at - created_at). Written as each task ends."""

    provider = CharField()
    day = CharField()          # YYYY-MM-DD
    outcome = CharField()      # the terminal status
    tasks = IntegerField(default=0)
    total_s = DoubleField(default=0.0)
    max_s = DoubleField(default=0.0)

    class Meta:
        table_name = "task_history"
        primary_key = CompositeKey("provider", "day", "outcome")


class FileExpiry(_Base):
    """Tasks whose result files retention deleted (the task keeps its list)."""

    task_id = CharField(primary_key=True)
    expired_at = DoubleField()

    class Meta:
        table_name = "file_expiry"


# Version 1's tables; later migrations add theirs.
MODELS = [User, Task, Event, Ledger, Session, SchemaVersion]
DATA_MODELS = [User, Task, Event, Ledger, Session, TaskHistory, FileExpiry]


def _migration_1(db):
    with db.bind_ctx(MODELS):
        db.create_tables(MODELS)
    # Dedupe and settle-once are constraints, not checks in Python alone.
    db.execute_sql(
        "CREATE UNIQUE INDEX tasks_dedupe ON tasks (user_id, dedupe_key) "
        "WHERE dedupe_key IS NOT NULL AND status NOT IN ('failed', 'cancelled')")
    db.execute_sql("CREATE UNIQUE INDEX ledger_once ON ledger (task_id, kind) WHERE kind <> 'grant'")
    db.execute_sql(
        "CREATE UNIQUE INDEX ledger_settle ON ledger (task_id) WHERE kind IN ('charge', 'refund')")


def _migration_2(db):
    """Retention: the compact history (filled from the tasks already
    finished), expired-file marks, and an index to find old finished tasks."""
    with db.bind_ctx([TaskHistory, FileExpiry]):
        db.create_tables([TaskHistory, FileExpiry])
        history = {}
        for provider, status, created, finished in db.execute_sql(
                "SELECT provider, status, created_at, finished_at FROM tasks "
                "WHERE status IN ('succeeded', 'partial', 'failed', 'cancelled') AND finished_at IS NOT NULL"):
            row = history.setdefault((provider, history_day(finished), status), [0, 0.0, 0.0])
            took = max(0.0, finished - created)
            row[0] += 1
            row[1] += took
            row[2] = max(row[2], took)
        for (provider, day, outcome), (n, total, longest) in sorted(history.items()):
            TaskHistory.insert(provider=provider, day=day, outcome=outcome, tasks=n, total_s=total,
                               max_s=longest).execute()
    db.execute_sql("CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL")


def _migration_3(db):
    """GET /metrics counts tasks by status and provider at every scrape: a
    covering index makes that GROUP BY read the index, not the table (at 1M
    rows on SQLite, about 47 ms instead of 450)."""
    db.execute_sql("CREATE INDEX tasks_status_provider ON tasks (status, provider)")


MIGRATIONS = [(1, _migration_1), (2, _migration_2), (3, _migration_3)]

TASK_COLUMNS = [f.column_name for f in Task._meta.sorted_fields]
_TASK_SELECT = "SELECT " + ", ".join(TASK_COLUMNS) + " FROM tasks"
_JSON_COLUMNS = ("params", "files", "error", "state")
_UPDATABLE = frozenset({"status", "step", "progress", "external_id", "attempts", "files",
                        "error", "next_poll_at", "polls", "started_at", "state",
                        "lease_expires_at"})
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


# -- small helpers ---------------------------------------------------------

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_task_id(now=None):
    """`t_` + a ULID: sortable by creation time, unguessable."""
    ms = int((time.time() if now is None else now) * 1000)
    value = (ms << 80) | secrets.randbits(80)
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "t_" + "".join(reversed(chars))


def hash_token(token):
    return hashlib.sha256(token.encode()).hexdigest()


def history_day(ts):
    """The UTC day a task finished on, as task_history keys it."""
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def iso(ts):
    if ts is None:
        return None
    dt = datetime.fromtimestamp(ts, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def dumps(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def task_json(task):
    """The public JSON of a task, as every endpoint returns it."""
    tid = task["id"]
    return {
        "id": tid, "provider": task["provider"], "status": task["status"],
        "step": task["step"], "progress": task["progress"],
        "dedupe_key": task["dedupe_key"], "params": task["params"],
        "external_id": task["external_id"], "attempts": task["attempts"],
        "files": [dict(f, url=f"/api/tasks/{tid}/files/{f['name']}") for f in task["files"]],
        "error": task["error"], "cost": task["cost"], "credits": task["credits"],
        "retry_of": task["retry_of"],
        "created_at": iso(task["created_at"]), "updated_at": iso(task["updated_at"]),
        "started_at": iso(task["started_at"]), "finished_at": iso(task["finished_at"]),
        "deadline_at": iso(task["deadline_at"]), "version": task["version"],
    }


def event_json(seq, task_id, type_, data):
    """An event as clients see it; `data` is the stored task JSON text."""
    return '{"seq":%d,"task_id":%s,"type":"%s","task":%s}' % (seq, json.dumps(task_id), type_, data)


# -- accounts: limits and public forms ------------------------------------------

MAX_CREDITS = 10 ** 9            # a balance or a grant; inside a 32-bit INTEGER on every backend
MAX_USER_ACTIVE = 100_000
MAX_USER_RATE = 10_000.0
MAX_SESSION_MESSAGES = 40
_SESSION_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def check_user_limits(credits=None, max_active=None, rate_per_s=None):
    """InvalidInput unless each given limit is in range (None: not set)."""
    if credits is not None and (not _is_int(credits) or not 0 <= credits <= MAX_CREDITS):
        raise InvalidInput(f"credits must be an integer from 0 to {MAX_CREDITS}")
    if max_active is not None and (not _is_int(max_active) or not 1 <= max_active <= MAX_USER_ACTIVE):
        raise InvalidInput(f"max_active must be an integer from 1 to {MAX_USER_ACTIVE}")
    if rate_per_s is not None and (isinstance(rate_per_s, bool) or not isinstance(rate_per_s, (int, float))
                                   or not 0 < rate_per_s <= MAX_USER_RATE):
        raise InvalidInput(f"rate_per_s must be a number above 0 and at most {MAX_USER_RATE:g}")


def check_session_key(key):
    if not isinstance(key, str) or not _SESSION_KEY.match(key):
        raise InvalidInput("a session key is 1-128 characters: letters, digits and _ . : @ -, "
                           "starting with a letter or digit", code="invalid_session_key")
    return key


def session_json(session):
    """The public JSON of a conversation session."""
    return {"key": session["key"], "messages": session["messages"], "data": session["data"],
            "updated_at": iso(session["updated_at"]), "expires_at": iso(session["expires_at"])}


def stuck_reasons(task, now, grace_s):
    """What looks wrong with an active task: past its deadline (the sweeper
    should have ended it), a lease that ran out (its worker vanished), or a
    poll due more than `grace_s` ago that no worker took."""
    reasons = []
    if task["deadline_at"] < now:
        reasons.append("past_deadline")
    if task["lease_owner"] is not None and (task["lease_expires_at"] or 0) < now:
        reasons.append("lease_expired")
    due = task["next_poll_at"]
    if task["lease_owner"] is None and due is not None and due < now - grace_s:
        reasons.append("poll_overdue")
    return reasons


def lease_owner_id():
    """host:pid:nonce, so recovery can tell a dead local owner from a live one."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def owner_is_dead(owner):
    """True only when the owner ran on this host and its process is gone."""
    try:
        host, pid, _ = owner.rsplit(":", 2)
        pid = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# -- the interface ---------------------------------------------------------

class BaseStore:
    """What every backend does. Tasks are plain dicts with TASK_COLUMNS as keys
    (params, files, error and state already decoded); `task_json` makes the
    public form.

    Every method that changes a task bumps its `version` and writes its event
    row in the same transaction. Errors are holdfast's own (errors.py).
    """

    name = "base"
    multi_process = False   # several processes may share the store
    multi_host = False      # several hosts may share the store

    def close(self):
        """Release connections and files."""

    def health(self):
        """Raise StoreUnavailable when the store cannot answer."""
        raise NotImplementedError

    # users
    def create_user(self, name, *, admin=False, credits=None, token=None, now=None,
                    max_active=None, rate_per_s=None):
        """Create a user; return (user dict, token). The token (a new random
        one unless given) is shown only here: the store keeps its hash.
        `credits` (None: no credit limit) starts the balance with a `grant`
        ledger row; `max_active` and `rate_per_s` (None: the server's
        defaults) are the user's own limits. Conflict if the name is taken,
        InvalidInput for a bad name or limit."""
        raise NotImplementedError

    def user_by_token(self, token):
        """The user dict whose token this is, or None."""
        raise NotImplementedError

    def user_by_name(self, name):
        """The user dict with this name; NotFound otherwise."""
        raise NotImplementedError

    def count_users(self):
        raise NotImplementedError

    def reserved_credits(self, user_id):
        """Credits held by the user's tasks that have not ended."""
        raise NotImplementedError

    # tasks
    def submit(self, user_id, provider, params, *, now, deadline_at, cost=0,
               dedupe_key=None, retry_of=None, max_active=None, max_queued=None, admit=None):
        """Create a queued task, or find the user's live task with this
        dedupe_key. Returns (task, deduplicated). Reserves `cost` credits from a
        user with a balance (PaymentRequired when too low), refuses a user at
        `max_active` active tasks (TooMany, code too_many_active) and a
        provider with `max_queued` queued tasks (TooMany, code queue_full), all
        in one transaction: a refusal creates and reserves nothing. A
        deduplicated answer is never refused. `admit()` (quick, in memory; the
        caller's rate limit) runs last, only when a task is about to be
        created: what it raises refuses the task the same way."""
        raise NotImplementedError

    def get_task(self, task_id, user_id=None):
        """The task; NotFound when missing or owned by another user."""
        raise NotImplementedError

    def list_tasks(self, user_id, *, statuses=None, limit=50, before=None):
        """(tasks newest first, cursor for the next page or None)."""
        raise NotImplementedError

    def claim(self, owner, *, now, limit, lease_s, statuses=("queued", "running")):
        """Lease up to `limit` due tasks (next_poll_at <= now, no live lease)
        to `owner`. Each claim increments the task's lease_token; the returned
        tasks carry the new token, which every later write must present."""
        raise NotImplementedError

    def update(self, task_id, *, token, now, release=False, **changes):
        """Apply `changes` to a task held with lease `token` (None: no lease
        check, for users and admins). Checks the transition table; settles
        credits when the task ends; `release` drops the lease. StaleLease when
        the token is old, Conflict for an illegal transition, NotFound."""
        raise NotImplementedError

    def reschedule(self, task_id, *, token, next_poll_at, polls, state=None):
        """Set when to look at a held task next and drop the lease. Nothing a
        user sees changes, so no version bump and no event. StaleLease."""
        raise NotImplementedError

    # -- provider slots and long steps (the worker's) --------------------------

    def take_slot(self, task_id, *, token, now, limit, **changes):
        """Apply `changes` (as update(), lease kept) to a task held with
        lease `token` only if its provider has room: fewer than `limit` of
        the provider's other tasks hold a slot (None: no limit), or this task
        holds one already. A task holds a slot while it is running, or queued
        with step SLOT_STEP. The count and the change happen in one write
        transaction, serialized per provider, so the limit holds across
        threads and processes. Returns the changed task, or None (nothing
        changed) when every slot is taken. StaleLease, Conflict, NotFound."""
        raise NotImplementedError

    def renew_lease(self, task_id, *, token, expires_at):
        """Move the expiry of a lease still held with `token` to
        `expires_at` (a long download, a local function). No version bump,
        no event. StaleLease when the task is no longer held with it."""
        raise NotImplementedError

    def cancel(self, task_id, user_id, *, now):
        """Cancel a user's active task (credits refunded). Conflict if terminal."""
        raise NotImplementedError

    def overdue(self, *, now, limit):
        """Active tasks whose deadline_at has passed."""
        raise NotImplementedError

    def expire(self, task_id, *, now, error):
        """Fail an active task past its deadline, whoever holds it (refunded).
        Conflict if it ended meanwhile."""
        raise NotImplementedError

    def lease_owners(self):
        """The owners holding leases now."""
        raise NotImplementedError

    def release_leases(self, owners):
        """Drop every lease these owners hold; return how many."""
        raise NotImplementedError

    # recovery

    def expired_leases(self, *, now):
        """[(task_id, owner)] of leases that ran out before `now`."""
        raise NotImplementedError

    def release_expired_leases(self, *, now):
        """Drop the leases that ran out before `now`; return how many."""
        raise NotImplementedError

    def claim_task(self, task_id, owner, *, now, lease_s):
        """Lease one active task whatever its schedule, or None when someone
        else holds a live lease on it."""
        raise NotImplementedError

    def in_doubt(self, *, limit=1000):
        """Queued tasks that stored a provider id: their submit may have
        reached the provider before a crash."""
        raise NotImplementedError

    def stray_reservations(self):
        """Finished tasks whose credits are still `reserved`."""
        raise NotImplementedError

    def settle_stray(self, task_id, *, now):
        """Charge or refund a finished task still holding its reservation.
        Returns the new credits state, or None when it was already settled."""
        raise NotImplementedError

    # events
    def events_since(self, user_id, since, limit=100):
        """[(seq, event JSON text)] for the user's events after `since`."""
        raise NotImplementedError

    def last_seq(self, user_id=None):
        raise NotImplementedError

    def latest_events(self, since):
        """{user_id: highest seq} over every user's events after `since`:
        whose streams have news, in one query for all of them."""
        raise NotImplementedError

    _event_listeners = ()

    def on_events(self, callback):
        """Call `callback()` in the writing thread after each commit that
        added events (quick, must not raise). Only this process's writes are
        heard: readers also poll latest_events() for other processes'."""
        self._event_listeners = (*self._event_listeners, callback)

    # operations
    def stats(self, now):
        """{"queue_depth", "active", "oldest_active_s", "by_status"}."""
        raise NotImplementedError

    def task_counts(self):
        """{(provider, status): how many tasks}, every user's, in one
        GROUP BY (for GET /metrics)."""
        raise NotImplementedError

    # -- accounts: credits, admin queries, conversation sessions --------------
    #
    # The ledger has one row per credit movement: `reserve` (submit), then one
    # `charge` (succeeded/partial) or `refund` (failed/cancelled) per task,
    # both unique per task; `grant` rows (task_id '') are an admin's or the
    # initial balance. So balance = grants - reserves + refunds, always.

    def grant(self, user_id, amount, *, now):
        """Add `amount` credits (negative: take them away) to a user who has a
        credit limit, with a `grant` ledger row, in one transaction. Returns
        the user. NotFound (user_not_found); Conflict no_credit_limit for a
        user without a balance, balance_too_low when it would go below zero,
        balance_too_high past MAX_CREDITS; InvalidInput for a bad amount."""
        raise NotImplementedError

    def ledger(self, *, user_id=None, task_id=None):
        """Ledger rows, oldest first, as dicts with id, user_id, task_id,
        kind, amount, created_at; filtered by user and/or task."""
        raise NotImplementedError

    def active_count(self, user_id):
        """How many queued or running tasks the user has."""
        raise NotImplementedError

    def admin_tasks(self, *, now, stuck=False, grace_s=60.0, limit=100):
        """Active tasks of every user, oldest first, as [(task, user name,
        reasons)]. `reasons` lists what looks wrong (see `stuck_reasons`):
        past_deadline, lease_expired, poll_overdue. With `stuck`, only tasks
        with at least one reason."""
        raise NotImplementedError

    def get_session(self, user_id, key, *, now):
        """The user's live session `key` as a dict with key, messages, data,
        updated_at, expires_at. NotFound (session_not_found) when missing,
        expired, or only another user's; InvalidInput for a bad key."""
        raise NotImplementedError

    def put_session(self, user_id, key, *, messages, data, now, ttl_s, max_sessions=None):
        """Replace the session (creating it): the newest MAX_SESSION_MESSAGES
        of `messages`, `data` (a JSON value or None); it expires `ttl_s` after
        `now`. Conflict (too_many_sessions) when creating it would give the
        user more than `max_sessions` live sessions. Returns the session."""
        raise NotImplementedError

    def append_messages(self, user_id, key, messages, *, now, ttl_s, max_sessions=None):
        """Append to the session (an expired one starts empty, a missing one
        is created), keep the newest MAX_SESSION_MESSAGES, expire `ttl_s`
        after `now`; atomic against concurrent appends. Returns (session,
        how many old messages were dropped). Conflict as put_session."""
        raise NotImplementedError

    def delete_session(self, user_id, key, *, now):
        """Delete the session; True if a live one was there."""
        raise NotImplementedError

    def purge_sessions(self, *, now):
        """Delete every expired session; return how many."""
        raise NotImplementedError

    # -- retention ---------------------------------------------------------------
    #
    # The worker's cleanup job: result files go after HOLDFAST_KEEP_FILES_H
    # (the task keeps its metadata and a FileExpiry mark), finished tasks and
    # their events after HOLDFAST_KEEP_TASKS_D (ledger rows stay), every event
    # after a day. task_history keeps the numbers.

    def tasks_with_old_files(self, *, before, limit):
        """Ids of finished tasks that ended before `before`, list files, and
        whose files are not yet marked expired; oldest first."""
        raise NotImplementedError

    def mark_files_expired(self, task_ids, *, now):
        """Record that these tasks' files were deleted (no version bump, no
        event: nothing in the task JSON changes). Returns how many were new."""
        raise NotImplementedError

    def files_expired_at(self, task_id):
        """When retention deleted the task's files, or None."""
        raise NotImplementedError

    def finished_before(self, *, before, limit):
        """Ids of finished tasks that ended before `before`, oldest first."""
        raise NotImplementedError

    def delete_finished(self, task_ids, *, before):
        """Delete these tasks (those still finished before `before`), their
        events and expiry marks, in one transaction; the ledger keeps its
        rows. The newest event of all is never deleted, so event seqs are
        never reused. Returns (tasks deleted, events deleted)."""
        raise NotImplementedError

    def purge_events(self, *, before):
        """Delete events created before `before` (but never the newest);
        return how many."""
        raise NotImplementedError

    def history(self, *, since_day=None, provider=None):
        """task_history rows (dicts: provider, day, outcome, tasks, total_s,
        max_s), by day, provider and outcome; `since_day` (YYYY-MM-DD) and
        `provider` filter."""
        raise NotImplementedError

    # -- the consistency audit (recover.py --audit) ------------------------------

    def files_listed(self, *, after=None, limit=1000):
        """[(task_id, files, expired)] of succeeded and partial tasks that list
        result files, in id order after task id `after` (page by the last
        id); `expired` is True once retention deleted the files."""
        raise NotImplementedError

    def settlement_mismatches(self):
        """Ledger settlements that contradict their task's status: charges
        on failed or cancelled tasks, refunds on succeeded or partial ones.
        [dicts: task_id, user_id, status, kind, amount], by task id."""
        raise NotImplementedError

    def existing_task_ids(self, task_ids):
        """The subset of `task_ids` that are tasks in the store."""
        raise NotImplementedError


# -- SQL backends ----------------------------------------------------------

class SqlStore(BaseStore):
    """The shared implementation for databases peewee speaks to."""

    placeholder = "?"
    for_update = ""       # row locks, where writers run side by side
    skip_locked = ""      # claims that pass over rows another claim holds

    def __init__(self, db):
        self.db = db
        self._sql_cache = {}
        self._wrote_events = threading.local()
        self._changes = threading.local()

    # one seam for driver errors; every write transaction runs inside it, so
    # leaving the outermost one is after the commit: tell the listeners then,
    # and log the state changes that committed (none of a rolled-back one).
    @contextmanager
    def _seam(self):
        committed = False
        try:
            yield
            committed = True
        except (peewee.OperationalError, peewee.InterfaceError) as exc:
            # InterfaceError: a pooled connection that died under us.
            raise StoreUnavailable(f"store error: {exc}") from exc
        except peewee.DataError as exc:
            # A value the database refuses, e.g. a NUL in PostgreSQL text.
            raise InvalidInput(f"the store cannot keep this value: {exc}") from exc
        except UnicodeEncodeError as exc:
            # An unpaired surrogate: the driver cannot encode it to UTF-8.
            raise InvalidInput("a string holds an unpaired surrogate "
                               f"(\\u{ord(exc.object[exc.start]):04x}), which is not valid Unicode") from exc
        finally:
            actions = getattr(self._changes, "pending", None)
            if actions and not self.db.transaction_depth():
                self._changes.pending = []
                if committed:
                    for fn, args in actions:
                        fn(*args)
            if getattr(self._wrote_events, "flag", False) and not self.db.transaction_depth():
                self._wrote_events.flag = False
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

    def _write(self):
        """A short write transaction (BEGIN IMMEDIATE on SQLite)."""
        return self.db.atomic()

    def _lock(self, name):
        """Serialize the transactions that take `name` until they end.
        SQLite's BEGIN IMMEDIATE already serializes every writer; backends
        whose writers run side by side override this."""

    def migrate(self):
        with self._seam():
            self.db.connect(reuse_if_open=True)
            current = self.schema_version() if self.db.table_exists("schema_version") else 0
            if current and any(version > current for version, _ in MIGRATIONS):
                self._backup_before_migrating(current)
            try:
                self._migrate()
            except Exception as exc:
                # Each migration runs in the one transaction that records it,
                # so a failure leaves the old schema and data as they were.
                raise StoreUnavailable(f"migrating the schema from version {current} failed "
                                       f"({exc}); the database is unchanged", code="migration_failed") from exc

    def _backup_before_migrating(self, current):
        """Backends that can copy themselves do so here."""

    def _require_current_schema(self):
        """For a store opened only to look (read_only): migrating would
        change it, so an older schema is an error instead."""
        latest = max(version for version, _ in MIGRATIONS)
        with self._seam():
            self.db.connect(reuse_if_open=True)
            current = (self.schema_version() or 0) if self.db.table_exists("schema_version") else 0
        if current < latest:
            self.close()
            raise StoreUnavailable(f"schema version {current}, this code needs {latest}",
                                   code="schema_outdated")

    def _migrate(self, upto=None):
        """Apply the pending migrations (up to `upto`); return how many."""
        applied = 0
        with self._write():
            self._lock("migrate")
            if not self.db.table_exists("schema_version"):
                current = 0
            else:
                current = self._one("SELECT MAX(version) FROM schema_version")[0] or 0
            for version, step in MIGRATIONS:
                if version > current and (upto is None or version <= upto):
                    log.info("migrating schema to version %d", version)
                    step(self.db)
                    self._exec("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                               (version, time.time()))
                    applied += 1
        return applied

    # moving everything between stores

    def export_rows(self):
        """{table: [row dicts]} of every table but the schema's own, in
        primary-key order; the same form on every backend. One read
        transaction, so one snapshot: a write committed meanwhile is in every
        table or in none."""
        out = {}
        # PostgreSQL's default isolation takes a snapshot per statement;
        # SQLite's deferred BEGIN reads one (WAL) and blocks no writer.
        begin = "REPEATABLE READ" if isinstance(self.db, peewee.PostgresqlDatabase) else "DEFERRED"
        with self._seam(), self.db.atomic(begin):
            for model in DATA_MODELS:
                cols = [f.column_name for f in model._meta.sorted_fields]
                order = ", ".join(f.column_name for f in model._meta.get_primary_keys())
                rows = self._exec(f"SELECT {', '.join(cols)} FROM {model._meta.table_name} "
                                  f"ORDER BY {order}").fetchall()
                bools = {f.column_name for f in model._meta.sorted_fields if isinstance(f, BooleanField)}
                out[model._meta.table_name] = [
                    {c: (bool(v) if c in bools and v is not None else v) for c, v in zip(cols, r)}
                    for r in rows]
        return out

    def import_rows(self, tables):
        """Load `export_rows()` output into this store, which must be empty."""
        with self._seam():
            if self._one("SELECT COUNT(*) FROM users")[0] or self._one("SELECT COUNT(*) FROM tasks")[0]:
                raise Conflict("the target store is not empty", code="store_not_empty")
            with self._write():
                self._insert_rows(tables)

    def _insert_rows(self, tables):
        known = {m._meta.table_name: m for m in DATA_MODELS}
        unknown = set(tables) - set(known)
        if unknown:
            raise InvalidInput(f"unknown tables in the data: {sorted(unknown)}")
        for model in DATA_MODELS:
            cols = [f.column_name for f in model._meta.sorted_fields]
            sql = (f"INSERT INTO {model._meta.table_name} ({', '.join(cols)}) "
                   f"VALUES ({', '.join('?' * len(cols))})")
            for row in tables.get(model._meta.table_name, []):
                self._exec(sql, [row.get(c) for c in cols])
        self._after_import()

    def _after_import(self):
        """Backends with sequences move them past the imported ids."""

    def schema_version(self):
        with self._seam():
            return self._one("SELECT MAX(version) FROM schema_version")[0]

    def close(self):
        self.db.close()

    def health(self):
        with self._seam():
            self._one("SELECT 1")

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
                    max_active=None, rate_per_s=None):
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise InvalidInput("user name must be 1-64 letters, digits, '_', '.' or '-'")
        check_user_limits(credits, max_active, rate_per_s)
        if token is not None and len(token) < 16:
            raise InvalidInput("a chosen token must be at least 16 characters")
        token = token or "hf_" + secrets.token_urlsafe(32)
        now = time.time() if now is None else now
        with self._seam():
            try:
                with self._write():
                    self._exec(
                        "INSERT INTO users (name, token_hash, is_admin, credit_balance, max_active, "
                        "rate_per_s, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (name, hash_token(token), bool(admin), credits, max_active,
                         None if rate_per_s is None else float(rate_per_s), now))
                    if credits:
                        user_id = self._one("SELECT id FROM users WHERE name = ?", (name,))[0]
                        self._exec("INSERT INTO ledger (user_id, task_id, kind, amount, created_at) "
                                   "VALUES (?, '', 'grant', ?, ?)", (user_id, credits, now))
            except peewee.IntegrityError as exc:
                raise Conflict(f"user {name!r} exists", code="user_exists") from exc
        return self.user_by_name(name), token

    _USER_COLS = "id, name, is_admin, credit_balance, max_active, rate_per_s, created_at"

    def _user(self, row):
        if row is None:
            return None
        keys = ("id", "name", "is_admin", "credit_balance", "max_active", "rate_per_s", "created_at")
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

    def count_users(self):
        with self._seam():
            return self._one("SELECT COUNT(*) FROM users")[0]

    def reserved_credits(self, user_id):
        with self._seam():
            return self._one("SELECT COALESCE(SUM(cost), 0) FROM tasks WHERE user_id = ? "
                             "AND credits = 'reserved'", (user_id,))[0]

    # tasks

    def submit(self, user_id, provider, params, *, now, deadline_at, cost=0,
               dedupe_key=None, retry_of=None, max_active=None, max_queued=None, admit=None):
        task_id = new_task_id(now)
        params_text = dumps(params)
        with self._seam():
            for _ in range(3):
                try:
                    with self._write():
                        return self._submit(task_id, user_id, provider, params, params_text, now,
                                            deadline_at, cost, dedupe_key, retry_of, max_active,
                                            max_queued, admit)
                except peewee.IntegrityError:
                    # Another transaction took the dedupe key between our
                    # check and our insert (possible only where the backend
                    # does not serialize writers): the index kept one. Read it.
                    if dedupe_key is None:
                        raise
            raise StoreUnavailable("could not settle a dedupe race")

    def _submit(self, task_id, user_id, provider, params, params_text, now, deadline_at,
                cost, dedupe_key, retry_of, max_active, max_queued=None, admit=None):
        self._lock(f"user:{user_id}")
        if dedupe_key is not None:
            row = self._one(
                _TASK_SELECT + " WHERE user_id = ? AND dedupe_key = ? "
                "AND status NOT IN ('failed', 'cancelled')", (user_id, dedupe_key))
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
            "lease_token": 0, "state": None,
        }
        row = [task[c] for c in TASK_COLUMNS]
        row[TASK_COLUMNS.index("params")] = params_text
        row[TASK_COLUMNS.index("files")] = "[]"
        self._exec(f"INSERT INTO tasks ({', '.join(TASK_COLUMNS)}) VALUES "
                   f"({', '.join('?' * len(TASK_COLUMNS))})", row)
        self._event(task, "created", now)
        self._note_change(task, None)
        return task, False

    def _event(self, task, type_, now):
        # Events commit in seq order, so a reader of seq > N never skips one.
        self._lock("events")
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

    def list_tasks(self, user_id, *, statuses=None, limit=50, before=None):
        sql = _TASK_SELECT + " WHERE user_id = ?"
        params = [user_id]
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

    def claim(self, owner, *, now, limit, lease_s, statuses=("queued", "running")):
        marks = ", ".join("?" * len(statuses))
        with self._seam(), self._write():
            rows = self._exec(
                _TASK_SELECT + f" WHERE status IN ({marks}) AND next_poll_at <= ? "
                "AND (lease_owner IS NULL OR lease_expires_at < ?) "
                f"ORDER BY next_poll_at LIMIT ?{self.skip_locked}",
                (*statuses, now, now, limit)).fetchall()
            tasks = []
            for row in rows:
                task = self._task(row)
                task["lease_owner"] = owner
                task["lease_expires_at"] = now + lease_s
                task["lease_token"] += 1
                self._exec("UPDATE tasks SET lease_owner = ?, lease_expires_at = ?, lease_token = ? "
                           "WHERE id = ?", (owner, now + lease_s, task["lease_token"], task["id"]))
                tasks.append(task)
        return tasks

    def _task_for_update(self, task_id):
        """The task, its row locked until the transaction ends; NotFound."""
        row = self._one(_TASK_SELECT + " WHERE id = ?" + self.for_update, (task_id,))
        if row is None:
            raise NotFound("task not found", code="task_not_found")
        return self._task(row)

    def update(self, task_id, *, token, now, release=False, **changes):
        _check_updatable(changes)
        with self._seam(), self._write():
            return self._apply(self._task_for_update(task_id), token, now, release, changes)

    def _apply(self, task, token, now, release, changes):
        if token is not None and task["lease_token"] != token:
            raise StaleLease(f"lease {token} on {task['id']} is stale (now {task['lease_token']})")
        old = task["status"]
        new = changes.get("status", old)
        if old in TERMINAL:
            raise Conflict(f"task is already {old}", code="task_finished")
        check_transition(old, new)
        error = changes.get("error")
        if error is not None and error.get("code") not in ERROR_CODES:
            raise ValueError(f"unknown error code {error.get('code')!r}")
        task.update(changes)
        if new == "running" and task["started_at"] is None:
            task["started_at"] = now
        if new in TERMINAL:
            self._after_commit(metrics.FINISHED.inc, task["provider"], new)
            task["finished_at"] = now
            self._record_history(task, new, now)
            task["next_poll_at"] = None
            release = True
            if task["credits"] == "reserved":
                self._settle(task, new, now)
        if release:
            task["lease_owner"] = None
            task["lease_expires_at"] = None
        task["updated_at"] = now
        task["version"] += 1
        cols = sorted(set(changes) | {"started_at", "finished_at", "next_poll_at", "credits",
                                      "lease_owner", "lease_expires_at", "updated_at", "version"})
        values = [dumps(task[c]) if c in _JSON_COLUMNS else task[c] for c in cols]
        cur = self._exec(f"UPDATE tasks SET {', '.join(c + ' = ?' for c in cols)} "
                         "WHERE id = ? AND lease_token = ?", (*values, task["id"], task["lease_token"]))
        if cur.rowcount != 1:
            raise StaleLease(f"task {task['id']} changed under us")
        self._event(task, "finished" if new in TERMINAL else "updated", now)
        if new != old:
            self._note_change(task, old)
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

    def _settle(self, task, status, now):
        """Charge on success, refund otherwise: once, by the ledger's indexes.
        The balance moves only when this transaction's ledger row went in, so
        a settle that finds one already there (a race on a backend that does
        not serialize writers, a repeat after a crash) changes no balance and
        takes the recorded outcome."""
        kind = "charge" if status in ("succeeded", "partial") else "refund"
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
        with self._seam(), self._write():
            if self._exec(sql, (*params, task_id, token)).rowcount != 1:
                raise StaleLease(f"task {task_id} is no longer held with lease {token}")

    # -- provider slots and long steps (the worker's) --------------------------

    def take_slot(self, task_id, *, token, now, limit, **changes):
        _check_updatable(changes)
        with self._seam(), self._write():
            task = self._task_for_update(task_id)
            if token is not None and task["lease_token"] != token:
                raise StaleLease(f"lease {token} on {task_id} is stale (now {task['lease_token']})")
            holds = task["status"] == "running" or (task["status"] == "queued" and task["step"] == SLOT_STEP)
            if limit is not None and not holds:
                self._slot_lock(task["provider"])
                busy = self._one(
                    "SELECT COUNT(*) FROM tasks WHERE provider = ? AND id <> ? AND "
                    "(status = 'running' OR (status = 'queued' AND step = ?))",
                    (task["provider"], task_id, SLOT_STEP))[0]
                if busy >= limit:
                    return None
            return self._apply(task, token, now, False, changes)

    def _slot_lock(self, provider):
        """Serialize slot decisions for `provider` until the transaction ends."""
        self._lock("slot:" + provider)

    def renew_lease(self, task_id, *, token, expires_at):
        with self._seam(), self._write():
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
            rows = self._exec(_TASK_SELECT + " WHERE status = 'queued' AND external_id IS NOT NULL "
                              "ORDER BY id LIMIT ?", (limit,)).fetchall()
        return [self._task(r) for r in rows]

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
            rows = self._exec("SELECT seq, task_id, type, data FROM events WHERE user_id = ? AND seq > ? "
                              "ORDER BY seq LIMIT ?", (user_id, since, limit)).fetchall()
        return [(r[0], event_json(*r)) for r in rows]

    def last_seq(self, user_id=None):
        with self._seam():
            if user_id is None:
                row = self._one("SELECT MAX(seq) FROM events")
            else:
                row = self._one("SELECT MAX(seq) FROM events WHERE user_id = ?", (user_id,))
        return row[0] or 0

    def latest_events(self, since):
        with self._seam():
            return dict(self._exec("SELECT user_id, MAX(seq) FROM events WHERE seq > ? GROUP BY user_id",
                                   (since,)).fetchall())

    def task_events(self, task_id):
        """[(seq, type)] of one task, oldest first (for audits and tests)."""
        with self._seam():
            return [tuple(r) for r in self._exec(
                "SELECT seq, type FROM events WHERE task_id = ? ORDER BY seq", (task_id,)).fetchall()]

    def stats(self, now):
        with self._seam():
            by_status = dict(self._exec("SELECT status, COUNT(*) FROM tasks GROUP BY status").fetchall())
            oldest = self._one("SELECT MIN(created_at) FROM tasks WHERE status IN ('queued', 'running')")[0]
        return {
            "queue_depth": by_status.get("queued", 0),
            "active": by_status.get("queued", 0) + by_status.get("running", 0),
            "oldest_active_s": round(now - oldest, 3) if oldest is not None else 0,
            "by_status": by_status,
        }

    def task_counts(self):
        with self._seam():
            return {(provider, status): n for status, provider, n in self._exec(
                "SELECT status, provider, COUNT(*) FROM tasks GROUP BY status, provider").fetchall()}

    # -- accounts: credits, admin queries, conversation sessions --------------

    def _user_by_id(self, user_id):
        user = self._user(self._one(f"SELECT {self._USER_COLS} FROM users WHERE id = ?", (user_id,)))
        if user is None:
            raise NotFound("user not found", code="user_not_found")
        return user

    def grant(self, user_id, amount, *, now):
        if not _is_int(amount) or amount == 0 or abs(amount) > MAX_CREDITS:
            raise InvalidInput(f"amount must be a non-zero integer from -{MAX_CREDITS} to {MAX_CREDITS}")
        with self._seam():
            with self._write():
                # The bounds are in the UPDATE itself: no balance outside them
                # can be written, whatever else runs at the same time.
                cur = self._exec("UPDATE users SET credit_balance = credit_balance + ? WHERE id = ? "
                                 "AND credit_balance IS NOT NULL AND credit_balance + ? >= 0 "
                                 "AND credit_balance + ? <= ?",
                                 (amount, user_id, amount, amount, MAX_CREDITS))
                if cur.rowcount == 1:
                    self._exec("INSERT INTO ledger (user_id, task_id, kind, amount, created_at) "
                               "VALUES (?, '', 'grant', ?, ?)", (user_id, amount, now))
            user = self._user_by_id(user_id)
        if cur.rowcount != 1:
            balance = user["credit_balance"]
            if balance is None:
                raise Conflict(f"user {user['name']} has no credit limit; grants apply only to users "
                               "with a balance", code="no_credit_limit")
            if balance + amount < 0:
                raise Conflict(f"the balance of {user['name']} is {balance}: taking {-amount} would make "
                               "it negative", code="balance_too_low")
            raise Conflict(f"a balance cannot exceed {MAX_CREDITS}", code="balance_too_high")
        return user

    def ledger(self, *, user_id=None, task_id=None):
        sql, params = _where("SELECT id, user_id, task_id, kind, amount, created_at FROM ledger",
                             **{"user_id = ?": user_id, "task_id = ?": task_id})
        with self._seam():
            rows = self._exec(sql + " ORDER BY id", params).fetchall()
        keys = ("id", "user_id", "task_id", "kind", "amount", "created_at")
        return [dict(zip(keys, r)) for r in rows]

    def active_count(self, user_id):
        with self._seam():
            return self._one("SELECT COUNT(*) FROM tasks WHERE user_id = ? "
                             "AND status IN ('queued', 'running')", (user_id,))[0]

    def admin_tasks(self, *, now, stuck=False, grace_s=60.0, limit=100):
        sql = _TASK_SELECT + " WHERE status IN ('queued', 'running')"
        params = []
        if stuck:
            sql += (" AND (deadline_at < ? OR (lease_owner IS NOT NULL AND lease_expires_at < ?)"
                    " OR (lease_owner IS NULL AND next_poll_at < ?))")
            params += [now, now, now - grace_s]
        with self._seam():
            tasks = [self._task(r) for r in self._exec(sql + " ORDER BY created_at, id LIMIT ?",
                                                       (*params, limit)).fetchall()]
            ids = sorted({t["user_id"] for t in tasks})
            names = dict(self._exec(f"SELECT id, name FROM users WHERE id IN ({', '.join('?' * len(ids))})",
                                    ids).fetchall()) if ids else {}
        return [(t, names.get(t["user_id"]), stuck_reasons(t, now, grace_s)) for t in tasks]

    # Sessions are read-modify-write under one write transaction and the
    # user's session lock, so concurrent writes lose nothing and the count
    # of live sessions holds.

    _SESSION_COLS = "key, messages, data, updated_at, expires_at"

    @staticmethod
    def _session(row):
        return {"key": row[0], "messages": json.loads(row[1]),
                "data": None if row[2] is None else json.loads(row[2]),
                "updated_at": row[3], "expires_at": row[4]}

    def get_session(self, user_id, key, *, now):
        check_session_key(key)
        with self._seam():
            row = self._one(f"SELECT {self._SESSION_COLS} FROM sessions WHERE user_id = ? AND key = ? "
                            "AND expires_at > ?", (user_id, key, now))
        if row is None:
            raise NotFound("session not found", code="session_not_found")
        return self._session(row)

    def put_session(self, user_id, key, *, messages, data, now, ttl_s, max_sessions=None):
        return self._write_session(user_id, key, now, ttl_s, max_sessions,
                                   lambda old: (list(messages), data))[0]

    def append_messages(self, user_id, key, messages, *, now, ttl_s, max_sessions=None):
        return self._write_session(user_id, key, now, ttl_s, max_sessions,
                                   lambda old: (old["messages"] + list(messages), old["data"]))

    def _write_session(self, user_id, key, now, ttl_s, max_sessions, change):
        """Apply `change(old session) -> (messages, data)`; return (session, dropped)."""
        check_session_key(key)
        with self._seam(), self._write():
            self._lock(f"sessions:{user_id}")
            return self._write_session_locked(user_id, key, now, ttl_s, max_sessions, change)

    def _write_session_locked(self, user_id, key, now, ttl_s, max_sessions, change):
        row = self._one(f"SELECT {self._SESSION_COLS} FROM sessions WHERE user_id = ? AND key = ?"
                        + self.for_update, (user_id, key))
        live = row is not None and row[4] > now
        old = self._session(row) if live else {"messages": [], "data": None}
        messages, data = change(old)
        dropped = max(0, len(messages) - MAX_SESSION_MESSAGES)
        messages = messages[dropped:]
        session = {"key": key, "messages": messages, "data": data, "updated_at": now,
                   "expires_at": now + ttl_s}
        values = (dumps(messages), None if data is None else dumps(data), now, now + ttl_s)
        if live:
            self._exec("UPDATE sessions SET messages = ?, data = ?, updated_at = ?, expires_at = ? "
                       "WHERE user_id = ? AND key = ?", (*values, user_id, key))
        else:
            # A new session: clear this user's expired ones (this key's too)
            # and hold the user to `max_sessions` live ones.
            self._exec("DELETE FROM sessions WHERE user_id = ? AND expires_at <= ?", (user_id, now))
            if max_sessions is not None:
                count = self._one("SELECT COUNT(*) FROM sessions WHERE user_id = ?", (user_id,))[0]
                if count >= max_sessions:
                    raise Conflict(f"you have {count} sessions (limit {max_sessions}); delete one or "
                                   "let it expire", code="too_many_sessions")
            self._exec("INSERT INTO sessions (user_id, key, messages, data, updated_at, expires_at) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (user_id, key, *values))
        return session, dropped

    def delete_session(self, user_id, key, *, now):
        check_session_key(key)
        with self._seam(), self._write():
            cur = self._exec("DELETE FROM sessions WHERE user_id = ? AND key = ? AND expires_at > ?",
                             (user_id, key, now))
            self._exec("DELETE FROM sessions WHERE user_id = ? AND expires_at <= ?", (user_id, now))
        return cur.rowcount == 1

    def purge_sessions(self, *, now):
        with self._seam(), self._write():
            return self._exec("DELETE FROM sessions WHERE expires_at <= ?", (now,)).rowcount

    # -- retention ---------------------------------------------------------------

    _FINISHED = "status IN ('succeeded', 'partial', 'failed', 'cancelled') AND finished_at < ?"

    def tasks_with_old_files(self, *, before, limit):
        with self._seam():
            return [r[0] for r in self._exec(
                f"SELECT id FROM tasks WHERE {self._FINISHED} AND files <> '[]' "
                "AND NOT EXISTS (SELECT 1 FROM file_expiry WHERE file_expiry.task_id = tasks.id) "
                "ORDER BY finished_at LIMIT ?", (before, limit)).fetchall()]

    def mark_files_expired(self, task_ids, *, now):
        marked = 0
        with self._seam(), self._write():
            for task_id in task_ids:
                marked += self._exec("INSERT INTO file_expiry (task_id, expired_at) VALUES (?, ?) "
                                     "ON CONFLICT DO NOTHING", (task_id, now)).rowcount
        return marked

    def files_expired_at(self, task_id):
        with self._seam():
            row = self._one("SELECT expired_at FROM file_expiry WHERE task_id = ?", (task_id,))
        return row[0] if row else None

    def finished_before(self, *, before, limit):
        with self._seam():
            return [r[0] for r in self._exec(
                f"SELECT id FROM tasks WHERE {self._FINISHED} ORDER BY finished_at LIMIT ?",
                (before, limit)).fetchall()]

    def delete_finished(self, task_ids, *, before):
        if not task_ids:
            return 0, 0
        marks = ", ".join("?" * len(task_ids))
        with self._seam(), self._write():
            ids = [r[0] for r in self._exec(f"SELECT id FROM tasks WHERE id IN ({marks}) AND {self._FINISHED}",
                                            (*task_ids, before)).fetchall()]
            if not ids:
                return 0, 0
            marks = ", ".join("?" * len(ids))
            events = self._exec(f"DELETE FROM events WHERE task_id IN ({marks}) "
                                "AND seq < (SELECT MAX(seq) FROM events)", ids).rowcount
            self._exec(f"DELETE FROM file_expiry WHERE task_id IN ({marks})", ids)
            tasks = self._exec(f"DELETE FROM tasks WHERE id IN ({marks})", ids).rowcount
        return tasks, events

    def purge_events(self, *, before):
        with self._seam(), self._write():
            return self._exec("DELETE FROM events WHERE created_at < ? "
                              "AND seq < (SELECT MAX(seq) FROM events)", (before,)).rowcount

    def history(self, *, since_day=None, provider=None):
        sql, params = _where("SELECT provider, day, outcome, tasks, total_s, max_s FROM task_history",
                             **{"day >= ?": since_day, "provider = ?": provider})
        with self._seam():
            rows = self._exec(sql + " ORDER BY day, provider, outcome", params).fetchall()
        keys = ("provider", "day", "outcome", "tasks", "total_s", "max_s")
        return [dict(zip(keys, r)) for r in rows]

    # -- the consistency audit ---------------------------------------------------

    def files_listed(self, *, after=None, limit=1000):
        with self._seam():
            rows = self._exec(
                "SELECT id, files, (SELECT 1 FROM file_expiry WHERE file_expiry.task_id = tasks.id) FROM tasks "
                "WHERE status IN ('succeeded', 'partial') AND files <> '[]' AND id > ? ORDER BY id LIMIT ?",
                (after or "", limit)).fetchall()
        return [(r[0], json.loads(r[1]), r[2] is not None) for r in rows]

    def settlement_mismatches(self):
        with self._seam():
            rows = self._exec(
                "SELECT ledger.task_id, ledger.user_id, tasks.status, ledger.kind, ledger.amount FROM ledger "
                "JOIN tasks ON tasks.id = ledger.task_id "
                "WHERE (ledger.kind = 'charge' AND tasks.status IN ('failed', 'cancelled')) "
                "OR (ledger.kind = 'refund' AND tasks.status IN ('succeeded', 'partial')) "
                "ORDER BY ledger.task_id").fetchall()
        keys = ("task_id", "user_id", "status", "kind", "amount")
        return [dict(zip(keys, r)) for r in rows]

    def existing_task_ids(self, task_ids):
        found = set()
        task_ids = list(task_ids)
        with self._seam():
            for i in range(0, len(task_ids), 500):
                chunk = task_ids[i:i + 500]
                found.update(r[0] for r in self._exec(
                    f"SELECT id FROM tasks WHERE id IN ({', '.join('?' * len(chunk))})", chunk).fetchall())
        return found


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

    def _backup_before_migrating(self, current):
        """A consistent copy of the file (SQLite's backup API) in backups/
        beside it, taken before any migration touches the schema."""
        folder = os.path.join(os.path.dirname(os.path.abspath(self.path)), "backups")
        os.makedirs(folder, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = os.path.join(folder, f"holdfast-v{current}-{stamp}-{secrets.token_hex(3)}.db")
        import sqlite3
        copy = sqlite3.connect(target)
        try:
            self.db.connection().backup(copy)
        finally:
            copy.close()
        log.warning("schema version %d is older than this holdfast; backed the database up to %s "
                    "before migrating", current, target)
        self.last_backup = target


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

    def _lock(self, name):
        self._exec("SELECT pg_advisory_xact_lock(?)", (zlib.crc32(name.encode()),))

    def _after_import(self):
        for table, column in (("users", "id"), ("events", "seq"), ("ledger", "id")):
            self._exec(f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), "
                       f"COALESCE((SELECT MAX({column}) FROM {table}), 0) + 1, false)")


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
    _journal_bytes = 0

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
    def _write(self):
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
            if outer and self._journal_bytes > self._compact_threshold():
                self._compact_when_due()

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
            self._insert_rows(snapshot["tables"])
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
                    "tables": self.export_rows()}
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


def open_store(url, data_dir, *, read_only=False):
    """The store named by HOLDFAST_STORE: `sqlite` (default), `json`, or a
    URL. `read_only`: opened to look, changing nothing on disk (see each
    backend's constructor)."""
    url = url or "sqlite"
    scheme = url.split("://", 1)[0] if "://" in url else url
    factory = BACKENDS.get(scheme)
    if factory is None:
        raise InvalidInput(f"unknown store {url!r}; use one of {sorted(BACKENDS)}")
    return factory(url, data_dir, read_only=read_only)


def _sqlite(url, data_dir, *, read_only=False):
    path = url.split("://", 1)[1] if "://" in url else os.path.join(data_dir, "holdfast.db")
    try:
        return SqliteStore(path, read_only=read_only)
    except StoreUnavailable as exc:
        if exc.code != "no_wal":
            raise
        log.warning("!!! %s. Falling back to the JSON-file store in %s: one process only, "
                    "and the SQLite file's data is not read. !!!", exc.message, data_dir)
        return JsonStore(data_dir, label="json (fallback)", read_only=read_only)


def _json(url, data_dir, *, read_only=False):
    return JsonStore(url.split("://", 1)[1] if "://" in url else data_dir, read_only=read_only)


def _postgresql(url, data_dir, *, read_only=False):
    # The driver is installed only by those who use this backend.
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ConfigError('HOLDFAST_STORE names PostgreSQL, which needs psycopg 3: '
                          'pip install "psycopg[binary]>=3.1,<4"') from None
    return PostgresStore(url, read_only=read_only)


BACKENDS = {"sqlite": _sqlite, "json": _json, "postgresql": _postgresql, "postgres": _postgresql}


# -- result files -------------------------------------------------------------

_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                 ".webp": "image/webp", ".gif": "image/gif", ".mp4": "video/mp4",
                 ".webm": "video/webm", ".mp3": "audio/mpeg", ".wav": "audio/wav",
                 ".json": "application/json", ".txt": "text/plain"}


def safe_file_name(name):
    """A result file's name as holdfast stores it: the last path part, plain
    characters only, never empty, never hidden, never `..`."""
    base = re.split(r"[\\/]", str(name))[-1]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")[:128]
    return base if _FILE_NAME.match(base) else "file"


class FileStore:
    """Result files under data/files/<task id>/<name>, written atomically
    (temporary file, fsync, rename) with their size and sha256."""

    def __init__(self, root, *, create=True):
        self.root = os.path.abspath(root)
        if create:
            os.makedirs(self.root, exist_ok=True)

    def path(self, task_id, name):
        if not re.match(r"^t_[0-9A-Z]{26}$", task_id) or not _FILE_NAME.match(name):
            raise NotFound("file not found", code="file_not_found")
        return os.path.join(self.root, task_id, name)

    def save(self, task_id, name, chunks, *, max_bytes, content_type=None):
        """Write `chunks` (an iterable of bytes) as the task's file `name`.
        InvalidInput when it passes `max_bytes`; nothing is left behind then."""
        final = self.path(task_id, name)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = f"{final}.{secrets.token_hex(4)}.part"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as fh:
                for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise InvalidInput(f"{name} is larger than {max_bytes} bytes", code="invalid_result")
                    digest.update(chunk)
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        ext = os.path.splitext(name)[1].lower()
        return {"name": name, "size": size, "sha256": digest.hexdigest(),
                "content_type": content_type or CONTENT_TYPES.get(ext, "application/octet-stream")}

    def task_ids(self):
        """The task ids that have a folder here, sorted; other entries are
        not holdfast's and are left alone."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []      # opened with create=False before any file was saved
        return sorted(n for n in names
                      if re.match(r"^t_[0-9A-Z]{26}$", n) and os.path.isdir(os.path.join(self.root, n)))

    def partial_files(self):
        """Temporary files left by downloads a crash interrupted."""
        found = []
        for folder, _, names in os.walk(self.root):
            found += [os.path.join(folder, n) for n in names if n.endswith(".part")]
        return sorted(found)

    def remove_task(self, task_id):
        """Delete the task's files and folder. Another process removing them
        at the same moment (retention, an audit's --fix) is not an error."""
        folder = os.path.join(self.root, task_id)
        try:
            names = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return
        for name in names:
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:
                pass
        try:
            os.rmdir(folder)
        except FileNotFoundError:
            pass
