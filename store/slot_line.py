"""The slot line's summary (migration 13): one row per (provider, user) with
tasks waiting for one of the provider's slots, kept by triggers on tasks.

`best` is the highest priority among the user's waiting tasks, `since` the
creation time of their oldest waiting one: what SqlStore._next_in_line
orders users by. Waiting is SqlStore._WAITING: queued and not holding a
slot. Reading the first few rows of slot_line_order costs the same at ten
users waiting as at ten thousand, where a scan over the waiting users grew
with them.

A task that starts waiting (a submit, a slot given back, a priority raised)
only raises `best` or lowers `since`: the row is merged, no read. A task
that stops waiting (it took a slot, was cancelled, changed priority) may
have been the best or the oldest: the row is counted again from the
indexes tasks_line and tasks_since, two reads of one index entry each, and
deleted when nothing waits.

The table is derived from tasks: an export leaves it out, and an import
fills it by the same triggers as it inserts the tasks.
"""

import peewee

# A queued task whose step is this holds one of its provider's slots: its
# submit is under way, or in doubt after a crash (see take_slot). Here, as
# the line is what it decides; store.schema gives it to the rest.
SLOT_STEP = "submitting"
# A queued task's step after take_slot refused it: it waits in line for a
# slot (see SqlStore._next_in_line), parked until a slot is given back.
SLOT_WAIT_STEP = "waiting for a slot"


def waiting(row):
    return f"{row}.status = 'queued' AND ({row}.step IS NULL OR {row}.step <> '{SLOT_STEP}')"


def _same(old, new):
    """The task waits in the same row with the same priority before and
    after: the row cannot change (created_at never does)."""
    return (f"{waiting(old)} AND {waiting(new)} AND {old}.provider = {new}.provider "
            f"AND {old}.user_id = {new}.user_id AND {old}.priority = {new}.priority")


_USERS_WAITING = ("FROM tasks WHERE status = 'queued' AND provider = {p} AND user_id = {u} "
                  f"AND (step IS NULL OR step <> '{SLOT_STEP}')")


def _sqlite_recount(row):
    where = _USERS_WAITING.format(p=f"{row}.provider", u=f"{row}.user_id")
    return (f"DELETE FROM slot_line WHERE provider = {row}.provider AND user_id = {row}.user_id; "
            f"INSERT INTO slot_line (provider, user_id, best, since) "
            f"SELECT {row}.provider, {row}.user_id, b, s FROM (SELECT "
            f"(SELECT priority {where} ORDER BY priority DESC LIMIT 1) AS b, "
            f"(SELECT created_at {where} ORDER BY created_at LIMIT 1) AS s) WHERE b IS NOT NULL;")


def _merge(row, greatest, least):
    return (f"INSERT INTO slot_line (provider, user_id, best, since) "
            f"VALUES ({row}.provider, {row}.user_id, {row}.priority, {row}.created_at) "
            f"ON CONFLICT (provider, user_id) DO UPDATE SET "
            f"best = {greatest}(slot_line.best, excluded.best), since = {least}(slot_line.since, excluded.since) "
            # Mostly a newer task at no higher priority: nothing to write.
            f"WHERE excluded.best > slot_line.best OR excluded.since < slot_line.since;")


_COLUMNS = "status, step, priority, provider, user_id"


def _counts(row):
    """Whether the task that stops waiting may be the one that sets its
    row's `best` or `since`: a task below the best and younger than the
    oldest leaves both to others that still wait. Read outside the row's
    lock, so only where writers run one at a time (SQLite)."""
    return (f"EXISTS (SELECT 1 FROM slot_line WHERE provider = {row}.provider AND user_id = {row}.user_id "
            f"AND (best <= {row}.priority OR since >= {row}.created_at))")


_SQLITE = [
    f"CREATE TRIGGER slot_line_insert AFTER INSERT ON tasks WHEN {waiting('NEW')} "
    f"BEGIN {_merge('NEW', 'MAX', 'MIN')} END",
    f"CREATE TRIGGER slot_line_leave AFTER UPDATE OF {_COLUMNS} ON tasks "
    f"WHEN {waiting('OLD')} AND NOT ({_same('OLD', 'NEW')}) AND {_counts('OLD')} "
    f"BEGIN {_sqlite_recount('OLD')} END",
    f"CREATE TRIGGER slot_line_join AFTER UPDATE OF {_COLUMNS} ON tasks "
    f"WHEN {waiting('NEW')} AND NOT ({_same('OLD', 'NEW')}) BEGIN {_merge('NEW', 'MAX', 'MIN')} END",
    f"CREATE TRIGGER slot_line_delete AFTER DELETE ON tasks WHEN {waiting('OLD')} AND {_counts('OLD')} "
    f"BEGIN {_sqlite_recount('OLD')} END",
]

# PostgreSQL runs writers side by side, and submits do not take the slot
# lock. Each change to a row first takes the row's lock (the upsert below
# inserts a placeholder when there is none), and only then reads the
# tasks, in a statement of its own: under READ COMMITTED that read sees
# every transaction that held the lock before. Two counts can then never
# both miss each other's task, nor two inserts both make the row. A merge
# is an upsert too, and GREATEST/LEAST gives the same row in either order.
_PG = [
    "CREATE OR REPLACE FUNCTION slot_line_recount(p VARCHAR, u INTEGER) RETURNS void AS $$\n"
    "DECLARE b INTEGER; s DOUBLE PRECISION;\n"
    "BEGIN\n"
    "  INSERT INTO slot_line (provider, user_id, best, since) VALUES (p, u, 0, 0)\n"
    "    ON CONFLICT (provider, user_id) DO UPDATE SET best = slot_line.best;\n"
    f"  SELECT priority INTO b {_USERS_WAITING.format(p='p', u='u')} ORDER BY priority DESC LIMIT 1;\n"
    "  IF b IS NULL THEN\n"
    "    DELETE FROM slot_line WHERE provider = p AND user_id = u;\n"
    "    RETURN;\n"
    "  END IF;\n"
    f"  SELECT created_at INTO s {_USERS_WAITING.format(p='p', u='u')} ORDER BY created_at LIMIT 1;\n"
    "  UPDATE slot_line SET best = b, since = s WHERE provider = p AND user_id = u;\n"
    "END $$ LANGUAGE plpgsql",
    "CREATE OR REPLACE FUNCTION slot_line_keep() RETURNS trigger AS $$\n"
    "BEGIN\n"
    f"  IF TG_OP = 'UPDATE' AND {_same('OLD', 'NEW')} THEN RETURN NULL; END IF;\n"
    f"  IF TG_OP <> 'INSERT' AND {waiting('OLD')} THEN\n"
    "    PERFORM slot_line_recount(OLD.provider, OLD.user_id);\n"
    "  END IF;\n"
    f"  IF TG_OP <> 'DELETE' AND {waiting('NEW')} THEN\n"
    f"    {_merge('NEW', 'GREATEST', 'LEAST')}\n"
    "  END IF;\n"
    "  RETURN NULL;\n"
    "END $$ LANGUAGE plpgsql",
    f"CREATE TRIGGER slot_line_insert AFTER INSERT ON tasks FOR EACH ROW WHEN ({waiting('NEW')}) "
    "EXECUTE FUNCTION slot_line_keep()",
    f"CREATE TRIGGER slot_line_update AFTER UPDATE OF {_COLUMNS} ON tasks FOR EACH ROW "
    "WHEN (OLD.status = 'queued' OR NEW.status = 'queued') EXECUTE FUNCTION slot_line_keep()",
    f"CREATE TRIGGER slot_line_delete AFTER DELETE ON tasks FOR EACH ROW WHEN ({waiting('OLD')}) "
    "EXECUTE FUNCTION slot_line_keep()",
]


_TRIGGERS = ("slot_line_insert", "slot_line_update", "slot_line_leave", "slot_line_join", "slot_line_delete")


_FILL = "INSERT INTO slot_line (provider, user_id, best, since) "


def _counted(where=""):
    """The rows slot_line must hold, counted from the tasks themselves
    (those matching `where` too, e.g. one user's)."""
    return ("SELECT provider, user_id, MAX(priority), MIN(created_at) FROM tasks "
            f"WHERE {waiting('tasks')}{where} GROUP BY provider, user_id")


def create(db):
    """Make the table, its index and triggers, and fill it from the tasks.
    Safe to run again over a database that has them (a store migrates
    from its highest recorded version)."""
    db.execute_sql("CREATE TABLE IF NOT EXISTS slot_line (provider VARCHAR(255) NOT NULL, "
                   "user_id INTEGER NOT NULL, best INTEGER NOT NULL, since DOUBLE PRECISION NOT NULL, "
                   "PRIMARY KEY (provider, user_id))")
    db.execute_sql("CREATE INDEX IF NOT EXISTS slot_line_order ON slot_line (provider, best DESC, since, user_id)")
    postgres = isinstance(db, peewee.PostgresqlDatabase)
    for name in _TRIGGERS:
        db.execute_sql(f"DROP TRIGGER IF EXISTS {name}" + (" ON tasks" if postgres else ""))
    db.execute_sql("DELETE FROM slot_line")
    db.execute_sql(_FILL + _counted())
    for sql in _PG if postgres else _SQLITE:
        db.execute_sql(sql)


def recount(store):
    """[(provider, user id, best, since)] of every user waiting, counted from
    the tasks themselves: what slot_line must hold (for tests and audits)."""
    return sorted(tuple(r) for r in store._exec(_counted()).fetchall())


def refill(store, provider, user_id):
    """Count one user's row at `provider` again from the tasks, inside the
    caller's write transaction (gone when nothing of theirs waits)."""
    store._exec("DELETE FROM slot_line WHERE provider = ? AND user_id = ?", (provider, user_id))
    store._exec(_FILL + _counted(" AND provider = ? AND user_id = ?"), (provider, user_id))


def rows(store):
    """slot_line as it is, in the same form as recount()."""
    return sorted(tuple(r) for r in store._exec(
        "SELECT provider, user_id, best, since FROM slot_line").fetchall())


# -- the wake: a slot given back (migration 17) --------------------------------
#
# A task refused a slot is parked (SLOT_WAIT_STEP) and due again only after
# a long while (worker/steps.py, SLOT_RECHECK_S): looking every poll
# interval, each parked task cost a claim and two writes a look, and
# thousands of them waiting behind one GPU kept a third of a core busy.
# Instead, the change that gives a slot back (a task ends, is cancelled, a
# submit lets go, a job is lost) makes one parked task due at that change's
# time, in the same transaction, whichever code path made it: the first
# parked task of the first user in line, users holding none of the
# provider's slots first. Its take_slot then takes the slot, or, where the
# rule gives the turn to another user, makes those first in line due
# (SqlStore._next_in_line). Reads stay in indexes: tasks_parked, and the
# slot line's rows of users with a task parked.

def _holds(row):
    # COALESCE: a NULL step must read as holding nothing, not as unknown
    # (which would make NOT _holds unknown too).
    return f"({row}.status = 'running' OR ({row}.status = 'queued' AND COALESCE({row}.step, '') = '{SLOT_STEP}'))"


def _parked(row, provider, user, now):
    return (f"{row}.status = 'queued' AND {row}.step = '{SLOT_WAIT_STEP}' AND {row}.provider = {provider} "
            f"AND {row}.user_id = {user} AND {row}.next_poll_at > {now}")


def _any_parked(provider, sqlite):
    return (f"EXISTS (SELECT 1 FROM tasks p{_index(sqlite, 'tasks_parked')} WHERE p.status = 'queued' "
            f"AND p.step = '{SLOT_WAIT_STEP}' AND p.provider = {provider})")


def _index(sqlite, name):
    # Without statistics (no ANALYZE) SQLite picks an index that covers the
    # columns over the one that holds only the rows asked for: every queued
    # task of the provider read through tasks_since, every task a user ever
    # had through tasks_user_id_id. PostgreSQL plans from its statistics.
    return f" INDEXED BY {name}" if sqlite else ""


def _wake_first(provider, now, sqlite):
    # Users in slot_line_order's order, each read stopping at its first
    # match: the first holding none of the slots (running, or queued and
    # submitting: as SqlStore._HELD counts them) with a task parked, else
    # the first with a task parked.
    def first_user(holding_none):
        none = (f"AND NOT EXISTS (SELECT 1 FROM tasks r{_index(sqlite, 'tasks_status_provider')} "
                f"WHERE r.status = 'running' AND r.provider = {provider} AND r.user_id = l.user_id) "
                f"AND NOT EXISTS (SELECT 1 FROM tasks s{_index(sqlite, 'tasks_slots')} WHERE s.status = 'queued' "
                f"AND s.step = '{SLOT_STEP}' AND s.provider = {provider} AND s.user_id = l.user_id) "
                if holding_none else "")
        return (f"(SELECT l.user_id FROM slot_line l WHERE l.provider = {provider} {none}"
                f"AND EXISTS (SELECT 1 FROM tasks w{_index(sqlite, 'tasks_parked')} "
                f"WHERE {_parked('w', provider, 'l.user_id', now)}) "
                f"ORDER BY l.best DESC, l.since, l.user_id LIMIT 1)")
    user = f"COALESCE({first_user(True)}, {first_user(False)})"
    # PostgreSQL: a parked row another transaction holds (a claim, a
    # take_slot) is passed over, not waited for: that wait could close a
    # cycle with the slot line's row locks.
    lock = "" if sqlite else " FOR UPDATE SKIP LOCKED"
    return (f"UPDATE tasks SET next_poll_at = {now} WHERE id = (SELECT t.id FROM tasks t"
            f"{_index(sqlite, 'tasks_parked')} WHERE {_parked('t', provider, user, now)} "
            f"ORDER BY t.priority DESC, t.created_at, t.id LIMIT 1{lock});")


_GIVEN_BACK = f"{_holds('OLD')} AND NOT {_holds('NEW')}"

_WAKE_SQLITE = [
    f"CREATE TRIGGER slot_given_back AFTER UPDATE OF status, step ON tasks "
    f"WHEN {_GIVEN_BACK} AND {_any_parked('OLD.provider', True)} "
    f"BEGIN {_wake_first('OLD.provider', 'NEW.updated_at', True)} END",
]

# A trigger's WHEN takes no subquery on PostgreSQL: the function asks.
_WAKE_PG = [
    "CREATE OR REPLACE FUNCTION slot_given_back() RETURNS trigger AS $$\n"
    "BEGIN\n"
    f"  IF {_any_parked('OLD.provider', False)} THEN\n"
    f"    {_wake_first('OLD.provider', 'NEW.updated_at', False)}\n"
    "  END IF;\n"
    "  RETURN NULL;\n"
    "END $$ LANGUAGE plpgsql",
    f"CREATE TRIGGER slot_given_back AFTER UPDATE OF status, step ON tasks FOR EACH ROW WHEN ({_GIVEN_BACK}) "
    "EXECUTE FUNCTION slot_given_back()",
]


def create_wake(db):
    """The parked tasks' index and the trigger that wakes one of them when a
    slot is given back. Safe to run again."""
    db.execute_sql("CREATE INDEX IF NOT EXISTS tasks_parked ON tasks (provider, user_id, priority DESC, "
                   f"created_at, id) WHERE status = 'queued' AND step = '{SLOT_WAIT_STEP}'")
    postgres = isinstance(db, peewee.PostgresqlDatabase)
    db.execute_sql("DROP TRIGGER IF EXISTS slot_given_back" + (" ON tasks" if postgres else ""))
    for sql in _WAKE_PG if postgres else _WAKE_SQLITE:
        db.execute_sql(sql)
