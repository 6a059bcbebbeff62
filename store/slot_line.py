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
