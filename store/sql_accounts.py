"""AccountsSql: SqlStore's credits, admin queries and conversation sessions.

A mixin of SqlStore, split off for size: it runs on SqlStore's seam and
helpers (_seam, _write, _exec, _one, _dicts, _lock, _user, _task,
for_update), so every backend's overrides of those apply here too.
"""

import json

from errors import Conflict, InvalidInput, NotFound

from .schema import (_TASK_SELECT, MAX_CREDITS, MAX_SESSION_MESSAGES, _is_int,
                     check_session_key, dumps, stuck_reasons)


class AccountsSql:
    """Credits and the ledger, admin queries, sessions: SqlStore's share."""

    def _user_by_id(self, user_id):
        user = self._user(self._one(f"SELECT {self._USER_COLS} FROM users WHERE id = ?", (user_id,)))
        if user is None:
            raise NotFound("user not found", code="user_not_found")
        return user

    def grant(self, user_id, amount, *, now, key=None):
        if not _is_int(amount) or amount == 0 or abs(amount) > MAX_CREDITS:
            raise InvalidInput(f"amount must be a non-zero integer from -{MAX_CREDITS} to {MAX_CREDITS}")
        ref = "" if key is None else "grant:" + key
        with self._seam():
            with self._write():
                if key is not None:
                    # One grant per key and user, even when two arrive at once:
                    # the second waits here, then finds the first's row.
                    self._lock(f"grant:{user_id}")
                    made = self._one("SELECT amount FROM ledger WHERE user_id = ? AND task_id = ? "
                                     "AND kind = 'grant'", (user_id, ref))
                    if made is not None:
                        if made[0] != amount:
                            raise Conflict(f"this Idempotency-Key was used for a grant of {made[0]}, "
                                           f"not {amount}", code="idempotency_key_reused")
                        return self._user_by_id(user_id)
                # The bounds are in the UPDATE itself: no balance outside them
                # can be written, whatever else runs at the same time.
                cur = self._exec("UPDATE users SET credit_balance = credit_balance + ? WHERE id = ? "
                                 "AND credit_balance IS NOT NULL AND credit_balance + ? >= 0 "
                                 "AND credit_balance + ? <= ?",
                                 (amount, user_id, amount, amount, MAX_CREDITS))
                if cur.rowcount == 1:
                    self._exec("INSERT INTO ledger (user_id, task_id, kind, amount, created_at) "
                               "VALUES (?, ?, 'grant', ?, ?)", (user_id, ref, amount, now))
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
        return self._dicts("ledger", ("id", "user_id", "task_id", "kind", "amount", "created_at"), "id",
                           **{"user_id = ?": user_id, "task_id = ?": task_id})

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
