"""Persistence: the task model, the Store interface, its backends, migrations.

One interface, several backends, chosen by a small table (BACKENDS). The rest
of holdfast imports every name from here, whichever module holds it:

    schema.py    statuses, transitions, the peewee models, migrations, and the
                 small shared helpers (ids, times, public JSON, account limits)
    base.py      BaseStore, the interface every backend implements
    sql.py       SqlStore, the SQL implementation the backends share; its
                 accounts queries (credits, admin, sessions) in sql_accounts.py,
                 retention and the audit in sql_upkeep.py, the workers'
                 heartbeats in sql_liveness.py, migrations, export and
                 import in sql_schema.py, webhooks out (endpoints, secrets,
                 the outbox of deliveries) in sql_webhooks.py, the operator
                 console's reads in sql_console.py
    sqlite.py    SqliteStore, the default
    postgres.py  PostgresStore, for several hosts
    jsonfile.py  JsonStore, plain JSON files where SQLite cannot work
    slot_line.py the slot line's summary table and its triggers (migration
                 13): who waits for a provider's slots, read by take_slot
    files.py     FileStore, the result files
    objects.py   ObjectStore, the result files in an S3-compatible bucket, and
                 open_files, which chooses (HOLDFAST_FILES)
"""

import logging
import os

from errors import ConfigError, InvalidInput, StoreUnavailable

from .base import BaseStore
from .files import CONTENT_TYPES, FileStore, lease_dir, no_space, safe_file_name
from .jsonfile import JsonStore
from .objects import ObjectStore, open_files
from .postgres import PostgresStore
from .schema import (ACTIVE, DATA_MODELS, DEDUPE_IGNORED, ERROR_CODES, LOCAL_MODELS, MAX_CREDITS,
                     MAX_EXTERNAL_ID, MAX_JSON_DEPTH, MAX_SESSION_MESSAGES, MAX_USER_ACTIVE, MAX_USER_RATE,
                     MIGRATIONS, MODELS, POSTED_AT, SLOT_STEP, TASK_COLUMNS, TERMINAL, TRANSITIONS, Event,
                     FileExpiry, Heartbeat, Ledger, SchemaVersion, Session, Task, TaskHistory, TaskStatus,
                     User, check_json, check_session_key, check_transition, check_user_limits, dead_owners,
                     dumps, event_json, external_id_problem, hash_token, history_day, iso, lease_owner_id,
                     may_nest_too_deep, new_task_id, process_identity, session_json, stuck_reasons, task_json,
                     too_deep)
from .schema import MAX_PRIORITY, SLOT_WAIT_STEP, check_priority
from .schema import DURATION_BOUNDS_S, TaskHistoryDetail, duration_bucket
from .schema import DERIVED_TABLES
from .sql import SqlStore
from .sql_webhooks import (DEFAULT_WEBHOOK_EVENTS, WEBHOOK_EVENTS, delivery_json, endpoint_json,
                           webhook_events)
from .sqlite import SqliteStore

__all__ = [
    "ACTIVE", "BACKENDS", "BaseStore", "CONTENT_TYPES", "DATA_MODELS", "DEDUPE_IGNORED",
    "ERROR_CODES", "Event", "FileExpiry", "FileStore", "Heartbeat", "JsonStore", "LOCAL_MODELS",
    "Ledger", "MAX_CREDITS", "MAX_EXTERNAL_ID", "MAX_JSON_DEPTH", "MAX_SESSION_MESSAGES",
    "MAX_USER_ACTIVE", "MAX_USER_RATE", "MIGRATIONS", "MODELS", "POSTED_AT", "PostgresStore",
    "SLOT_STEP", "SchemaVersion", "Session", "SqlStore", "SqliteStore", "TASK_COLUMNS", "TERMINAL",
    "TRANSITIONS", "Task", "TaskHistory", "TaskStatus", "User", "check_json", "check_session_key",
    "check_transition", "check_user_limits", "dead_owners", "dumps", "event_json",
    "external_id_problem", "hash_token", "history_day", "iso", "lease_dir", "lease_owner_id",
    "may_nest_too_deep",
    "new_task_id", "no_space", "ObjectStore", "open_files", "open_store", "process_identity", "safe_file_name", "session_json",
    "stuck_reasons", "task_json", "too_deep",
    "DEFAULT_WEBHOOK_EVENTS", "WEBHOOK_EVENTS", "delivery_json", "endpoint_json", "webhook_events",
    "MAX_PRIORITY", "SLOT_WAIT_STEP", "check_priority",
    "DURATION_BOUNDS_S", "TaskHistoryDetail", "duration_bucket",
    "DERIVED_TABLES",
]

log = logging.getLogger("holdfast.store")


# -- choosing a backend --------------------------------------------------------
#
# The factories look the backend classes up here, in the package, so a
# stand-in put in `store.SqliteStore` is what open_store builds.

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
