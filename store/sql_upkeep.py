"""UpkeepSql: SqlStore's retention and consistency-audit queries.

A mixin of SqlStore, split off for size: it runs on SqlStore's seam and
helpers (_seam, _write, _exec, _one, _dicts), so every backend's overrides
of those apply here too.
"""

import json

from . import slot_line


class UpkeepSql:
    """Retention (the worker's cleanup) and the audit (recover.py --audit):
    SqlStore's share."""

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
            self._exec(f"DELETE FROM task_webhooks WHERE task_id IN ({marks})", ids)
            self._exec(f"DELETE FROM webhook_deliveries WHERE task_id IN ({marks})", ids)
            tasks = self._exec(f"DELETE FROM tasks WHERE id IN ({marks})", ids).rowcount
        return tasks, events

    def purge_events(self, *, before):
        with self._seam(), self._write():
            return self._exec("DELETE FROM events WHERE created_at < ? "
                              "AND seq < (SELECT MAX(seq) FROM events)", (before,)).rowcount

    def history(self, *, since_day=None, provider=None):
        return self._dicts("task_history", ("provider", "day", "outcome", "tasks", "total_s", "max_s"),
                           "day, provider, outcome", **{"day >= ?": since_day, "provider = ?": provider})

    # -- the consistency audit ---------------------------------------------------

    def files_listed(self, *, after=None, limit=1000):
        with self._seam():
            rows = self._exec(
                "SELECT id, files, (SELECT 1 FROM file_expiry WHERE file_expiry.task_id = tasks.id) FROM tasks "
                "WHERE status IN ('succeeded', 'partial') AND files <> '[]' AND id > ? ORDER BY id LIMIT ?",
                (after or "", limit)).fetchall()
        return [(r[0], json.loads(r[1]), r[2] is not None) for r in rows]

    def files_of(self, task_ids):
        found = {}
        task_ids = list(task_ids)
        with self._seam():
            for i in range(0, len(task_ids), 500):
                chunk = task_ids[i:i + 500]
                for task_id, status, files, expired in self._exec(
                        "SELECT id, status, files, (SELECT 1 FROM file_expiry WHERE file_expiry.task_id = tasks.id) "
                        f"FROM tasks WHERE id IN ({', '.join('?' * len(chunk))})", chunk).fetchall():
                    found[task_id] = (status, json.loads(files or "[]"), expired is not None)
        return found

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

    def slot_line_drift(self):
        # One snapshot for both reads, so a write meanwhile is no drift.
        with self._seam(), self._snapshot():
            want = {(p, u): (b, s) for p, u, b, s in slot_line.recount(self)}
            have = {(p, u): (b, s) for p, u, b, s in slot_line.rows(self)}
        return sorted(key for key in want.keys() | have.keys() if want.get(key) != have.get(key))

    def rebuild_slot_line(self, keys):
        keys = list(keys)
        with self._seam(), self._write():
            for provider, user_id in keys:
                self._slot_lock(provider)
                slot_line.refill(self, provider, user_id)
        return len(keys)

    def existing_task_ids(self, task_ids):
        found = set()
        task_ids = list(task_ids)
        with self._seam():
            for i in range(0, len(task_ids), 500):
                chunk = task_ids[i:i + 500]
                found.update(r[0] for r in self._exec(
                    f"SELECT id FROM tasks WHERE id IN ({', '.join('?' * len(chunk))})", chunk).fetchall())
        return found
