"""The data holdfast keeps and the rules on it.

Task statuses and their transition table; the peewee models below, which are
the one description of the schema, and the migrations that build it; and the
small pure functions that every backend, the API and the worker share: task
ids, times, the public JSON of tasks, events and sessions, account limits, and
lease owner ids. Nothing here opens a database.

Times are stored as float seconds since the epoch (UTC) and shown as ISO 8601.
"""

import functools
import hashlib
import json
import math
import os
import re
import secrets
import socket
import time
from datetime import datetime, timezone
from enum import Enum

from peewee import (SQL, AutoField, BooleanField, CharField, CompositeKey,
                    DoubleField, IntegerField, Model, TextField)

from errors import Conflict, InvalidInput

from . import slot_line
from .slot_line import SLOT_STEP


class TaskStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = frozenset({"queued", "running"})
TERMINAL = frozenset({"succeeded", "partial", "failed", "cancelled"})
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
ERROR_CODES = frozenset({"provider_rejected", "provider_unavailable", "timeout", "result_expired",
                         "provider_lost", "submission_in_doubt", "invalid_result", "internal"})
DEDUPE_IGNORED = ("failed", "cancelled")
# A queued task's step after take_slot refused it: it waits in line for a
# slot (see SqlStore._next_in_line).
SLOT_WAIT_STEP = "waiting for a slot"
# The worker's mark in a queued task's `state`: when its last submit was sent
# (written, and committed, before the request). Present while that submit
# may have made a job nobody has heard of; in_doubt() finds tasks by it.
POSTED_AT = "posted_at"
# external_id is a CharField: PostgreSQL keeps at most this many characters.
MAX_EXTERNAL_ID = 255


def external_id_problem(value):
    """Why a provider's job id cannot be stored (every backend alike), or None."""
    if not isinstance(value, str) or not value:
        return f"the provider's job id is not text: {str(value)[:80]!r}"
    if len(value) > MAX_EXTERNAL_ID:
        return f"the provider's job id is {len(value)} characters long; at most {MAX_EXTERNAL_ID} can be kept"
    if "\x00" in value:
        return "the provider's job id holds a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "the provider's job id is not valid Unicode"
    return None


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
    max_priority = IntegerField(null=True)     # None: 0, no task above the default

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
    # Higher first, within the user's share of a provider's scarce slots.
    priority = IntegerField(default=0, constraints=[SQL("DEFAULT 0")])

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


# Upper bounds (seconds) of the duration buckets of task_history_detail: a
# 1-2-5 series from half a second to a day, then everything longer.
DURATION_BOUNDS_S = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400,
                     28800, 86400, math.inf)


def duration_bucket(seconds):
    """The index in DURATION_BOUNDS_S of the bucket `seconds` falls in."""
    for i, bound in enumerate(DURATION_BOUNDS_S):
        if seconds <= bound:
            return i
    return len(DURATION_BOUNDS_S) - 1


class TaskHistoryDetail(_Base):
    """Beside task_history, what its totals cannot say: how the durations
    spread (for percentiles) and which error codes the failures had. Per
    provider, UTC day of finishing, outcome, error code ('' for none) and
    duration bucket (an index in DURATION_BOUNDS_S): how many tasks.
    Written with task_history as each task ends, and kept as long."""

    provider = CharField()
    day = CharField()
    outcome = CharField()
    error_code = CharField()
    bucket = IntegerField()
    tasks = IntegerField(default=0)

    class Meta:
        table_name = "task_history_detail"
        primary_key = CompositeKey("provider", "day", "outcome", "error_code", "bucket")


class Heartbeat(_Base):
    """One row per running worker process: whether a lease owner is alive
    is read here, never from a PID (containers share host names, not PID
    namespaces). `beat_at` is on the store's clock (PostgreSQL's, so hosts
    with skewed clocks agree); the owner is dead once `beat_at + lease_s`
    has passed. host, pid, boot_id, pid_ns and started (the process's start
    time, in clock ticks since boot) identify the process, so one on the
    same kernel and in the same PID namespace can tell at once that it is
    gone (see `dead_owners`)."""

    owner = CharField(primary_key=True)
    host = CharField()
    pid = IntegerField()
    boot_id = CharField(null=True)
    pid_ns = CharField(null=True)
    started = CharField(null=True)
    lease_s = DoubleField()
    beat_at = DoubleField()
    created_at = DoubleField()

    class Meta:
        table_name = "heartbeats"


class ProviderHealth(_Base):
    """What the workers saw of each provider, across processes: when it last
    answered, when a call last failed and why, and how many calls have
    failed since it last answered (GET /api/providers)."""

    provider = CharField(primary_key=True)
    last_ok_at = DoubleField(null=True)
    last_error_at = DoubleField(null=True)
    last_error_code = CharField(null=True)
    last_error = TextField(null=True)
    consecutive_failures = IntegerField(default=0)
    updated_at = DoubleField()

    class Meta:
        table_name = "provider_health"


class FileExpiry(_Base):
    """Tasks whose result files retention deleted (the task keeps its list)."""

    task_id = CharField(primary_key=True)
    expired_at = DoubleField()

    class Meta:
        table_name = "file_expiry"


class WebhookEndpoint(_Base):
    """A user's default webhook endpoint: every task of the user reports
    the `events` (JSON list) it names here. `disabled_at` is set when the
    receiver answered 410 Gone (or an admin disabled it): nothing more is
    written for it until it is enabled again."""

    id = AutoField()
    user_id = IntegerField(index=True)
    url = TextField()
    events = TextField()
    created_at = DoubleField()
    disabled_at = DoubleField(null=True)
    disabled_reason = TextField(null=True)

    class Meta:
        table_name = "webhook_endpoints"


class WebhookSecret(_Base):
    """Signing secrets (`whsec_` + base64), kept as they are: holdfast signs
    with them, so a hash would not do. `endpoint_id` NULL: the user's secret
    for the `webhook` URLs of single tasks. A rotated secret keeps signing
    until `expires_at`, so receivers can switch over without losing one."""

    id = AutoField()
    user_id = IntegerField(index=True)
    endpoint_id = IntegerField(null=True, index=True)
    secret = CharField()
    created_at = DoubleField()
    expires_at = DoubleField(null=True)

    class Meta:
        table_name = "webhook_secrets"


class TaskWebhook(_Base):
    """A task's own `webhook` URL and the events it wants (JSON list)."""

    task_id = CharField(primary_key=True)
    user_id = IntegerField()
    url = TextField()
    events = TextField()
    disabled_at = DoubleField(null=True)

    class Meta:
        table_name = "task_webhooks"


class WebhookDelivery(_Base):
    """The outbox: one row per message to one receiver, written in the
    transaction of the task change it reports. `id` is the message's
    `webhook-id`, the same at every attempt; `payload` is the body, fixed
    when written. `state`: pending, succeeded, failed (gave up) or
    cancelled (its endpoint was disabled). A sender holds a row with a
    lease (owner, expiry, token) while it sends; `tries` counts the attempts
    of the current round (a manual retry starts a new one), `attempts` all
    of them, and `log` (JSON) the latest attempts' times, status codes and
    errors."""

    id = CharField(primary_key=True)
    user_id = IntegerField()
    task_id = CharField(index=True)
    endpoint_id = IntegerField(null=True)
    url = TextField()
    target = CharField()          # scheme://host:port, for the per-receiver in-flight cap
    type = CharField()
    payload = TextField()
    state = CharField()
    attempts = IntegerField(default=0)
    tries = IntegerField(default=0)
    last_status = IntegerField(null=True)
    last_error = TextField(null=True)
    log = TextField(default="[]")
    next_try_at = DoubleField(null=True)
    lease_owner = CharField(null=True)
    lease_expires_at = DoubleField(null=True)
    lease_token = IntegerField(default=0)
    created_at = DoubleField()
    updated_at = DoubleField()

    class Meta:
        table_name = "webhook_deliveries"
        indexes = ((("state", "next_try_at"), False),)


# Version 1's tables; later migrations add theirs.
MODELS = [User, Task, Event, Ledger, Session, SchemaVersion]
DATA_MODELS = [User, Task, Event, Ledger, Session, TaskHistory, FileExpiry]
WEBHOOK_MODELS = [WebhookEndpoint, WebhookSecret, TaskWebhook, WebhookDelivery]
DATA_MODELS += WEBHOOK_MODELS
DATA_MODELS += [TaskHistoryDetail]
# Tables that describe the processes using this store, not data: an export
# leaves them out (the processes they name do not move with the data).
LOCAL_MODELS = [Heartbeat, ProviderHealth]
# Tables derived from the data by triggers: not exported; an import fills them.
DERIVED_TABLES = ["slot_line"]


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


def _migration_4(db):
    """Liveness from the store: the workers' heartbeats."""
    with db.bind_ctx([Heartbeat]):
        db.create_tables([Heartbeat])


def _migration_5(db):
    """Retry is idempotent: one live retry per task, as a constraint (the
    submit transaction checks first; this keeps a race on a backend that
    does not serialize writers from making two)."""
    db.execute_sql(
        "CREATE UNIQUE INDEX tasks_retry_once ON tasks (retry_of) "
        "WHERE retry_of IS NOT NULL AND status NOT IN ('failed', 'cancelled')")


def _migration_6(db):
    """Webhooks out: endpoints, signing secrets, tasks' own URLs, the outbox."""
    with db.bind_ctx(WEBHOOK_MODELS):
        db.create_tables(WEBHOOK_MODELS)


def _migration_7(db):
    """Priorities: a task's, and the highest a user may give. A database
    made by migration 1 of this code has them already (it builds the
    current models)."""
    for table, column, ddl in (("tasks", "priority", "INTEGER NOT NULL DEFAULT 0"),
                               ("users", "max_priority", "INTEGER")):
        if column not in {c.name for c in db.get_columns(table)}:
            db.execute_sql(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")
    # The line for a provider's scarce slots (SqlStore._next_in_line), read
    # from the index alone. Only queued tasks are in it, and their step
    # changes a few times at most: polls of running tasks never touch it.
    db.execute_sql("CREATE INDEX IF NOT EXISTS tasks_line ON tasks (provider, user_id, priority, created_at, "
                   "step, status) WHERE status = 'queued'")


def _migration_8(db):
    """Each waiting user's oldest task, from the index: with tasks_line
    (ordered by priority first) the line in SqlStore._next_in_line reads a
    few entries per user waiting, not every task waiting. And the queued
    tasks holding slots, for take_slot's count of slots held."""
    db.execute_sql("CREATE INDEX IF NOT EXISTS tasks_since ON tasks (provider, user_id, created_at, step, status) "
                   "WHERE status = 'queued'")
    # The few queued tasks that hold a slot (take_slot counts them), apart
    # from the many waiting.
    db.execute_sql(f"CREATE INDEX IF NOT EXISTS tasks_slots ON tasks (provider, status, step, user_id) "
                   f"WHERE status = 'queued' AND step = '{SLOT_STEP}'")


def _migration_11(db):
    """The operator console's numbers: duration buckets and error codes of
    finished tasks (task_history_detail), filled from the tasks still kept."""
    with db.bind_ctx([TaskHistoryDetail]):
        db.create_tables([TaskHistoryDetail])
        # Counted from the tasks alone: rows left by anything before are not counts.
        db.execute_sql("DELETE FROM task_history_detail")
        detail = {}
        for provider, status, created, finished, error in db.execute_sql(
                "SELECT provider, status, created_at, finished_at, error FROM tasks "
                "WHERE status IN ('succeeded', 'partial', 'failed', 'cancelled') AND finished_at IS NOT NULL"):
            try:
                code = str((json.loads(error or "null") or {}).get("code") or "")
            except (ValueError, AttributeError):
                code = ""
            key = (provider, history_day(finished), status, code,
                   duration_bucket(max(0.0, finished - created)))
            detail[key] = detail.get(key, 0) + 1
        for (provider, day, outcome, code, bucket), n in sorted(detail.items()):
            TaskHistoryDetail.insert(provider=provider, day=day, outcome=outcome, error_code=code,
                                     bucket=bucket, tasks=n).execute()


def _migration_12(db):
    """Provider health as the workers saw it, shared by every process."""
    with db.bind_ctx([ProviderHealth]):
        db.create_tables([ProviderHealth])


def _migration_13(db):
    """The slot line's summary, one row per user waiting at a provider, kept
    by triggers (store/slot_line.py), filled from the tasks waiting now."""
    slot_line.create(db)


def _migration_14(db):
    """A task's timeline (GET /api/tasks/<id>/events) from the index: by the
    (user_id, seq) index alone it read every event of the user, 120-200 ms
    at 200,000 of them on SQLite, 0.04-0.13 ms with this one. And the
    retries of a task (GET /api/tasks?retry_of=): 5-23 ms at 20,000-50,000
    tasks of the user, 0.03 ms by this index; retry_of never changes once
    written (bench/task_detail_bench.py)."""
    db.execute_sql("CREATE INDEX IF NOT EXISTS events_task ON events (task_id, user_id, seq)")
    db.execute_sql("CREATE INDEX IF NOT EXISTS tasks_retry_of ON tasks (retry_of, user_id, id) "
                   "WHERE retry_of IS NOT NULL")


def _migration_15(db):
    """A grant sent with an Idempotency-Key is made once: its ledger row
    carries the key (task_id 'grant:' + key), unique per user."""
    db.execute_sql("CREATE UNIQUE INDEX IF NOT EXISTS ledger_grant_once ON ledger (user_id, task_id) "
                   "WHERE kind = 'grant' AND task_id <> ''")


# A running task's turn in a fresh-first claim (the worker's slow-down) is
# next_poll_at plus its age; ordered by this, less the claim's own `now`,
# the claim reads only the first entries (store/sql.py, _due).
FRESH_ORDER = "next_poll_at - COALESCE(started_at, created_at)"


def _migration_16(db):
    """The fresh-first claim from an index: without one it read and sorted
    every running task that was due, the very backlog that turns the
    slow-down on (bench/claim_bench.py)."""
    db.execute_sql(f"CREATE INDEX IF NOT EXISTS tasks_fresh ON tasks (({FRESH_ORDER}), next_poll_at) "
                   "WHERE status = 'running'")


MIGRATIONS = [(1, _migration_1), (2, _migration_2), (3, _migration_3), (4, _migration_4),
              (5, _migration_5), (6, _migration_6), (7, _migration_7), (8, _migration_8),
              (11, _migration_11), (12, _migration_12), (13, _migration_13), (14, _migration_14),
              (15, _migration_15), (16, _migration_16)]

TASK_COLUMNS = [f.column_name for f in Task._meta.sorted_fields]
# Shared by sql.py and its mixins, which sql.py imports: here, no cycle.
_TASK_SELECT = "SELECT " + ", ".join(TASK_COLUMNS) + " FROM tasks"
# Only active tasks hold leases (finishing releases them), so lease queries
# say so and read the status index rather than every finished row.
_LEASED = "status IN ('queued', 'running') AND lease_owner IS NOT NULL"


# -- small helpers ---------------------------------------------------------

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_task_id(now=None):
    """`t_` + a ULID: sortable by creation time, unguessable."""
    ms = int((time.time() if now is None else now) * 1000)
    value = (ms << 80) | secrets.randbits(80)
    # 26 characters of 5 bits, written two at a time from the top.
    return "t_" + "".join([_CROCKFORD_PAIRS[(value >> shift) & 1023] for shift in range(120, -1, -10)])


_CROCKFORD_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]


def hash_token(token):
    return hashlib.sha256(token.encode()).hexdigest()


def history_day(ts):
    """The UTC day a task finished on, as task_history keys it."""
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def iso(ts):
    """A timestamp as the API writes it: UTC, to the millisecond, the
    microseconds rounded as datetime.fromtimestamp rounds them. Every event
    and answer carries five of these, so the second's text is cached."""
    if ts is None:
        return None
    frac, whole = math.modf(ts)
    micro = round(frac * 1e6)
    if micro >= 1_000_000:
        whole, micro = whole + 1, micro - 1_000_000
    elif micro < 0:
        whole, micro = whole - 1, micro + 1_000_000
    return _iso_second(int(whole)) + f"{micro // 1000:03d}Z"


@functools.lru_cache(maxsize=1024)
def _iso_second(whole):
    return datetime.fromtimestamp(whole, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.")


# Objects and arrays inside one another. A request body past it is refused
# (web.read_json), and so is anything stored past it (dumps), so a value
# that got in is one that every later encode and every client's parser can
# take: Python's own json gives up near 1,000, some parsers far sooner.
MAX_JSON_DEPTH = 64


def check_json(value, what="the value"):
    """InvalidInput when `value` nests deeper than MAX_JSON_DEPTH or holds a
    number that is not finite (NaN and the infinities are not JSON)."""
    # Level by level, looking only into containers: every task write passes
    # here (through dumps), so scalars cost one type check each.
    level, depth = [value], 0
    while level:
        below = []
        for item in level:
            if isinstance(item, dict):
                children = item.values()
            elif isinstance(item, (list, tuple)):
                children = item
            else:
                _check_scalar(item, what)
                continue
            if depth >= MAX_JSON_DEPTH:
                raise too_deep(what)
            for child in children:
                if isinstance(child, (dict, list, tuple)):
                    below.append(child)
                elif isinstance(child, float):
                    _check_scalar(child, what)
        level, depth = below, depth + 1


def may_nest_too_deep(text):
    """False when the JSON text `text` (str or bytes) cannot nest past
    MAX_JSON_DEPTH: every object and array opens with a bracket, so a text
    with no more of them (those inside strings count too) needs no walk."""
    opening = (b"{", b"[") if isinstance(text, (bytes, bytearray)) else ("{", "[")
    return text.count(opening[0]) + text.count(opening[1]) > MAX_JSON_DEPTH


def _check_scalar(value, what):
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInput(f"{what} holds a number that is not finite ({value!r}): "
                           "numbers must be finite, within about 1e308", code="invalid_json")


def too_deep(what):
    return InvalidInput(f"{what} is nested too deep: at most {MAX_JSON_DEPTH} levels of objects and arrays",
                        code="invalid_json")


# Compact, and strict: a non-finite number is a ValueError, never a stored "Infinity".
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def dumps(value):
    """The JSON text of a value the store keeps: strict JSON, or InvalidInput."""
    try:
        text = _ENCODE(value)
    except (ValueError, RecursionError):
        check_json(value)       # a non-finite number, or nested too deep: InvalidInput
        raise
    # Most values the store keeps are checked without walking them.
    if may_nest_too_deep(text):
        check_json(value)
    return text


def task_json(task):
    """The public JSON of a task, as every endpoint returns it."""
    tid = task["id"]
    return {
        "id": tid, "provider": task["provider"], "status": task["status"],
        "step": task["step"], "progress": task["progress"],
        "dedupe_key": task["dedupe_key"], "params": task["params"],
        "external_id": task["external_id"], "attempts": task["attempts"],
        # `dir` (the lease folder the file is in) is the file store's business.
        "files": [{**{k: v for k, v in f.items() if k != "dir"}, "url": f"/api/tasks/{tid}/files/{f['name']}"}
                  for f in task["files"]],
        "error": task["error"], "cost": task["cost"], "credits": task["credits"],
        "retry_of": task["retry_of"],
        "created_at": iso(task["created_at"]), "updated_at": iso(task["updated_at"]),
        "started_at": iso(task["started_at"]), "finished_at": iso(task["finished_at"]),
        "deadline_at": iso(task["deadline_at"]), "version": task["version"],
        "priority": task["priority"],
    }


def event_json(seq, task_id, type_, data):
    """An event as clients see it; `data` is the stored task JSON text."""
    return '{"seq":%d,"task_id":%s,"type":"%s","task":%s}' % (seq, json.dumps(task_id), type_, data)


# -- accounts: limits and public forms ------------------------------------------

MAX_CREDITS = 10 ** 9            # a balance or a grant; inside a 32-bit INTEGER on every backend
MAX_USER_ACTIVE = 100_000
MAX_USER_RATE = 10_000.0
MAX_SESSION_MESSAGES = 40
MAX_PRIORITY = 1000              # a task's priority and a user's maximum lie within +-this
_SESSION_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def check_user_limits(credits=None, max_active=None, rate_per_s=None, max_priority=None):
    """InvalidInput unless each given limit is in range (None: not set)."""
    if max_priority is not None and (not _is_int(max_priority) or not 0 <= max_priority <= MAX_PRIORITY):
        raise InvalidInput(f"max_priority must be an integer from 0 to {MAX_PRIORITY}")
    if credits is not None and (not _is_int(credits) or not 0 <= credits <= MAX_CREDITS):
        raise InvalidInput(f"credits must be an integer from 0 to {MAX_CREDITS}")
    if max_active is not None and (not _is_int(max_active) or not 1 <= max_active <= MAX_USER_ACTIVE):
        raise InvalidInput(f"max_active must be an integer from 1 to {MAX_USER_ACTIVE}")
    if rate_per_s is not None and (isinstance(rate_per_s, bool) or not isinstance(rate_per_s, (int, float))
                                   or not 0 < rate_per_s <= MAX_USER_RATE):
        raise InvalidInput(f"rate_per_s must be a number above 0 and at most {MAX_USER_RATE:g}")


def check_priority(priority):
    """InvalidInput unless `priority` is an integer within +-MAX_PRIORITY."""
    if not _is_int(priority) or not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidInput(f"priority must be an integer from -{MAX_PRIORITY} to {MAX_PRIORITY}",
                           code="invalid_priority")


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
    """host:pid:nonce: readable in logs; liveness comes from the heartbeat."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def process_identity():
    """What names this process on its kernel: {host, pid, boot_id, pid_ns,
    started}. boot_id, pid_ns and started are None where /proc cannot say,
    or where the /proc mounted here is not of this process's PID namespace
    (its `self` is not our PID): then nobody probes this process's PID."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": None, "pid_ns": None,
          "started": None}
    try:
        if int(os.readlink("/proc/self")) != me["pid"]:
            return me
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot_id = fh.read().strip()
        pid_ns = os.readlink("/proc/self/ns/pid")
        started = _start_ticks(me["pid"])
    except (OSError, ValueError):
        return me
    if started is not None:
        me.update(boot_id=boot_id, pid_ns=pid_ns, started=started)
    return me


def _start_ticks(pid):
    """The start time of process `pid` (clock ticks since boot, as text),
    or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: count after the last ')'.
    fields = stat[stat.rindex(b")") + 2:].split()
    return fields[19].decode()


def dead_owners(holders, me=None, here=None):
    """Which of `holders` (store.lease_holders()) are dead: their heartbeat
    ran out on the store's clock, or it names a process of this kernel and
    PID namespace (same boot id and namespace as `here`, this process's
    identity) that is gone or whose PID now belongs to a process started at
    another time. An owner without a heartbeat row (stopped cleanly while a
    thread still ran, a one-off like recovery, older code) is left to its
    leases' expiry; `me` is never dead."""
    here = process_identity() if here is None else here
    dead = []
    for holder in holders:
        beat = holder["heartbeat"]
        if holder["owner"] == me or beat is None:
            continue
        if beat["stale"] or _gone(beat, here):
            dead.append(holder["owner"])
    return dead


def _gone(beat, here):
    if beat["boot_id"] is None or beat["pid_ns"] is None or beat["started"] is None:
        return False
    if (beat["boot_id"], beat["pid_ns"]) != (here["boot_id"], here["pid_ns"]):
        return False     # another kernel or PID namespace: its PID means nothing here
    try:
        return _start_ticks(beat["pid"]) != beat["started"]
    except (OSError, ValueError, IndexError):
        return False
