"""ConsoleSql: SqlStore's reads for the operator console (GET /api/admin/*):
every user's tasks found by filters, the users with their credits and
active tasks, the history's detail, and the webhook outbox in numbers.

A mixin of SqlStore, split off for size: it runs on SqlStore's seam and
helpers (_seam, _exec, _one, _dicts, _user, _task), so every backend's
overrides of those apply here too.
"""

from .schema import _TASK_SELECT


def _like_pattern(text):
    """`text` as a LIKE pattern that matches it anywhere, its own % and _
    taken literally (with ESCAPE '\\')."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class ConsoleSql:
    """The operator console's queries: SqlStore's share."""

    # The error code inside a task's `error` JSON; PostgreSQL says it its way.
    error_code_sql = "json_extract(error, '$.code')"
    # Case-insensitive LIKE (SQLite's LIKE already is, for ASCII).
    ilike = "LIKE"

    def find_tasks(self, *, statuses=None, provider=None, user_id=None, error_code=None, since=None,
                   until=None, text=None, limit=50, before=None, count=False):
        conditions, params = [], []
        if statuses:
            conditions.append(f"status IN ({', '.join('?' * len(statuses))})")
            params += list(statuses)
        for sql, value in (("provider = ?", provider), ("user_id = ?", user_id),
                           (f"{self.error_code_sql} = ?", error_code), ("created_at >= ?", since),
                           ("created_at < ?", until)):
            if value is not None:
                conditions.append(sql)
                params.append(value)
        if text:
            conditions.append(f"(id = ? OR dedupe_key = ? OR params {self.ilike} ? ESCAPE '\\')")
            params += [text, text, _like_pattern(text)]
        where = (" WHERE " + " AND ".join(conditions)) if conditions else ""
        page_where = where + (" AND " if where else " WHERE ") + "id < ?" if before else where
        with self._seam():
            rows = self._exec(f"{_TASK_SELECT}{page_where} ORDER BY id DESC LIMIT ?",
                              (*params, *([before] if before else []), limit + 1)).fetchall()
            total = self._one(f"SELECT COUNT(*) FROM tasks{where}", params)[0] if count else None
            tasks = [self._task(r) for r in rows[:limit]]
            names = self._user_names({t["user_id"] for t in tasks})
        found = [(t, names.get(t["user_id"])) for t in tasks]
        return found, (tasks[-1]["id"] if len(rows) > limit else None), total

    def _user_names(self, ids):
        ids = sorted(ids)
        if not ids:
            return {}
        return dict(self._exec(f"SELECT id, name FROM users WHERE id IN ({', '.join('?' * len(ids))})",
                               ids).fetchall())

    def tasks_by_ids(self, task_ids):
        found = {}
        task_ids = list(task_ids)
        with self._seam():
            for i in range(0, len(task_ids), 500):
                chunk = task_ids[i:i + 500]
                for row in self._exec(f"{_TASK_SELECT} WHERE id IN ({', '.join('?' * len(chunk))})",
                                      chunk).fetchall():
                    task = self._task(row)
                    found[task["id"]] = task
        return found

    def retried(self, task_ids):
        found = set()
        task_ids = list(task_ids)
        with self._seam():
            for i in range(0, len(task_ids), 500):
                chunk = task_ids[i:i + 500]
                found.update(r[0] for r in self._exec(
                    f"SELECT DISTINCT retry_of FROM tasks WHERE retry_of IN ({', '.join('?' * len(chunk))})",
                    chunk).fetchall())
        return found

    def admin_users(self):
        with self._seam():
            rows = self._exec(
                f"SELECT {self._USER_COLS}, "
                "(SELECT COALESCE(SUM(cost), 0) FROM tasks WHERE tasks.user_id = users.id "
                "AND credits = 'reserved'), "
                "(SELECT COUNT(*) FROM tasks WHERE tasks.user_id = users.id AND status IN ('queued', 'running')) "
                "FROM users ORDER BY name").fetchall()
        out = []
        for row in rows:
            user = self._user(row[:-2])
            user["reserved"], user["active"] = row[-2], row[-1]
            out.append(user)
        return out

    def history_detail(self, *, since_day=None, provider=None):
        return self._dicts("task_history_detail", ("provider", "day", "outcome", "error_code", "bucket", "tasks"),
                           "day, provider, outcome, error_code, bucket",
                           **{"day >= ?": since_day, "provider = ?": provider})

    def webhook_counts(self, *, since):
        with self._seam():
            pending, failing = self._one(
                "SELECT COUNT(*), COALESCE(SUM(CASE WHEN attempts > 0 THEN 1 ELSE 0 END), 0) "
                "FROM webhook_deliveries WHERE state = 'pending'")
            failed = self._one("SELECT COUNT(*) FROM webhook_deliveries WHERE state = 'failed' "
                               "AND updated_at >= ?", (since,))[0]
        return {"pending": pending, "failing": failing, "failed": failed}
