"""WebhooksSql: SqlStore's webhooks out: endpoints and their signing
secrets, tasks' own webhook URLs, and the outbox of deliveries.

A mixin of SqlStore, split off for size: it runs on SqlStore's seam and
helpers (_seam, _write, _exec, _one, for_update, skip_locked). SqlStore
calls `_webhook_submit` and `_webhook_change` inside the transaction that
writes a task change, so a delivery row commits with the change it reports
or not at all: a crash neither loses nor invents one.
"""

import base64
import json
import secrets
from urllib.parse import urlsplit

from errors import Conflict, InvalidInput, NotFound

from .schema import TERMINAL, dumps, iso, new_task_id, task_json

WEBHOOK_EVENTS = ("created", "running", "progress", "finished")
DEFAULT_WEBHOOK_EVENTS = ("finished",)
PROGRESS_EVERY_S = 1.0      # at most one `progress` delivery per task and receiver a second
LOG_KEEP = 20               # attempts a delivery's log keeps (the newest)
MAX_ENDPOINTS = 20          # default endpoints per user
_DELIVERY_COLS = ("id", "user_id", "task_id", "endpoint_id", "url", "target", "type", "payload", "state",
                  "attempts", "tries", "last_status", "last_error", "log", "next_try_at", "lease_owner",
                  "lease_expires_at", "lease_token", "created_at", "updated_at")
_ENDPOINT_COLS = ("id", "user_id", "url", "events", "created_at", "disabled_at", "disabled_reason")


def new_secret():
    """A signing secret as Standard Webhooks writes it: whsec_ + base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def webhook_events(value):
    """A checked list of event names (None: the default); InvalidInput."""
    if value is None:
        return list(DEFAULT_WEBHOOK_EVENTS)
    if (not isinstance(value, list) or not value
            or any(not isinstance(e, str) or e not in WEBHOOK_EVENTS for e in value)):
        raise InvalidInput(f"webhook_events must be a non-empty list of {', '.join(WEBHOOK_EVENTS)}",
                           code="invalid_webhook_events")
    return sorted(set(value), key=WEBHOOK_EVENTS.index)


def target_of(url):
    """scheme://host:port: deliveries to one receiver share its in-flight cap."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


def delivery_json(d):
    """A delivery as GET /api/webhooks/deliveries shows it."""
    return {"id": d["id"], "task_id": d["task_id"], "endpoint_id": d["endpoint_id"], "url": d["url"],
            "type": d["type"], "state": d["state"], "attempts": d["attempts"],
            "last_status": d["last_status"], "last_error": d["last_error"],
            "log": [{**a, "at": iso(a["at"])} for a in d["log"]],
            "next_try_at": iso(d["next_try_at"]) if d["state"] == "pending" else None,
            "created_at": iso(d["created_at"]), "updated_at": iso(d["updated_at"])}


def endpoint_json(e):
    return {"id": e["id"], "url": e["url"], "events": e["events"], "created_at": iso(e["created_at"]),
            "disabled_at": iso(e["disabled_at"]), "disabled_reason": e["disabled_reason"]}


class WebhooksSql:
    """Webhooks out: SqlStore's share (see BaseStore for each method)."""

    # -- endpoints and secrets ---------------------------------------------------

    def add_webhook_endpoint(self, user_id, url, events=None, *, now):
        events = webhook_events(events)
        secret = new_secret()
        with self._seam(), self._write():
            self._lock(f"user:{user_id}")
            count = self._one("SELECT COUNT(*) FROM webhook_endpoints WHERE user_id = ?", (user_id,))[0]
            if count >= MAX_ENDPOINTS:
                raise Conflict(f"a user has at most {MAX_ENDPOINTS} webhook endpoints",
                               code="too_many_endpoints")
            self._exec("INSERT INTO webhook_endpoints (user_id, url, events, created_at) VALUES (?, ?, ?, ?)",
                       (user_id, url, dumps(events), now))
            endpoint_id = self._one("SELECT MAX(id) FROM webhook_endpoints WHERE user_id = ?", (user_id,))[0]
            self._exec("INSERT INTO webhook_secrets (user_id, endpoint_id, secret, created_at) "
                       "VALUES (?, ?, ?, ?)", (user_id, endpoint_id, secret, now))
        return self.webhook_endpoint(user_id, endpoint_id), secret

    def webhook_endpoints(self, user_id):
        with self._seam():
            rows = self._exec(f"SELECT {', '.join(_ENDPOINT_COLS)} FROM webhook_endpoints WHERE user_id = ? "
                              "ORDER BY id", (user_id,)).fetchall()
        return [self._endpoint(r) for r in rows]

    def webhook_endpoint(self, user_id, endpoint_id):
        with self._seam():
            row = self._one(f"SELECT {', '.join(_ENDPOINT_COLS)} FROM webhook_endpoints "
                            "WHERE id = ? AND user_id = ?", (endpoint_id, user_id))
        if row is None:
            raise NotFound("webhook endpoint not found", code="endpoint_not_found")
        return self._endpoint(row)

    @staticmethod
    def _endpoint(row):
        e = dict(zip(_ENDPOINT_COLS, row))
        e["events"] = json.loads(e["events"])
        return e

    def remove_webhook_endpoint(self, user_id, endpoint_id, *, now):
        with self._seam(), self._write():
            if self._exec("DELETE FROM webhook_endpoints WHERE id = ? AND user_id = ?",
                          (endpoint_id, user_id)).rowcount != 1:
                raise NotFound("webhook endpoint not found", code="endpoint_not_found")
            self._exec("DELETE FROM webhook_secrets WHERE endpoint_id = ?", (endpoint_id,))
            self._cancel_pending("endpoint_id = ?", (endpoint_id,), "the endpoint was removed", now)

    def set_webhook_endpoint_enabled(self, user_id, endpoint_id, enabled, *, now, reason=None):
        with self._seam(), self._write():
            if self._exec("UPDATE webhook_endpoints SET disabled_at = ?, disabled_reason = ? "
                          "WHERE id = ? AND user_id = ?",
                          (None if enabled else now, None if enabled else (reason or "disabled by an admin"),
                           endpoint_id, user_id)).rowcount != 1:
                raise NotFound("webhook endpoint not found", code="endpoint_not_found")
            if not enabled:
                self._cancel_pending("endpoint_id = ?", (endpoint_id,), reason or "the endpoint was disabled",
                                     now)
        return self.webhook_endpoint(user_id, endpoint_id)

    def rotate_webhook_secret(self, user_id, endpoint_id=None, *, now, overlap_s):
        secret = new_secret()
        with self._seam(), self._write():
            if endpoint_id is not None and self._one(
                    "SELECT id FROM webhook_endpoints WHERE id = ? AND user_id = ?",
                    (endpoint_id, user_id)) is None:
                raise NotFound("webhook endpoint not found", code="endpoint_not_found")
            owner, args = self._secret_owner(user_id, endpoint_id)
            # Old secrets keep signing for the overlap (never longer than they
            # were to already), so receivers switch over without a gap.
            self._exec(f"UPDATE webhook_secrets SET expires_at = ? WHERE {owner} "
                       "AND (expires_at IS NULL OR expires_at > ?)", (now + overlap_s, *args, now + overlap_s))
            self._exec("DELETE FROM webhook_secrets WHERE " + owner + " AND expires_at <= ?", (*args, now))
            self._exec("INSERT INTO webhook_secrets (user_id, endpoint_id, secret, created_at) "
                       "VALUES (?, ?, ?, ?)", (user_id, endpoint_id, secret, now))
        return secret

    @staticmethod
    def _secret_owner(user_id, endpoint_id):
        if endpoint_id is None:
            return "user_id = ? AND endpoint_id IS NULL", (user_id,)
        return "endpoint_id = ?", (endpoint_id,)

    def webhook_secrets(self, user_id, endpoint_id=None, *, now):
        owner, args = self._secret_owner(user_id, endpoint_id)
        with self._seam():
            rows = self._exec(f"SELECT secret, expires_at FROM webhook_secrets WHERE {owner} "
                              "AND (expires_at IS NULL OR expires_at > ?) ORDER BY id", (*args, now)).fetchall()
        return [{"secret": s, "expires_at": e} for s, e in rows]

    def task_webhook_secrets(self, user_id, *, now):
        """The live secrets of the user's per-task webhooks, newest last;
        the first is made here when there is none."""
        live = self.webhook_secrets(user_id, now=now)
        if live:
            return live
        with self._seam(), self._write():
            self._lock(f"user:{user_id}")
            self._ensure_task_secret(user_id, now)
        return self.webhook_secrets(user_id, now=now)

    def _ensure_task_secret(self, user_id, now):
        if self._one("SELECT id FROM webhook_secrets WHERE user_id = ? AND endpoint_id IS NULL "
                     "AND (expires_at IS NULL OR expires_at > ?)", (user_id, now)) is None:
            self._exec("INSERT INTO webhook_secrets (user_id, endpoint_id, secret, created_at) "
                       "VALUES (?, NULL, ?, ?)", (user_id, new_secret(), now))

    # -- the outbox, written with the task change ---------------------------------

    def _webhook_submit(self, task, webhook, now):
        """In submit's transaction: the task's own URL, then its `created`."""
        if webhook is not None:
            self._ensure_task_secret(task["user_id"], now)
            self._exec("INSERT INTO task_webhooks (task_id, user_id, url, events) VALUES (?, ?, ?, ?)",
                       (task["id"], task["user_id"], webhook["url"], dumps(webhook_events(webhook.get("events")))))
        self._outbox(task, "created", now)

    def _webhook_change(self, task, old, changes, now):
        """In the transaction of a task change: its delivery rows, if any."""
        new = task["status"]
        if new in TERMINAL:
            kind = "finished"
        elif new == "running" and old != "running":
            kind = "running"
        elif new == "running" and ("progress" in changes or "step" in changes):
            kind = "progress"
        else:
            return
        self._outbox(task, kind, now)

    def _outbox(self, task, kind, now):
        rows = self._exec(
            "SELECT url, events, NULL FROM task_webhooks WHERE task_id = ? AND disabled_at IS NULL "
            "UNION ALL SELECT url, events, id FROM webhook_endpoints WHERE user_id = ? AND disabled_at IS NULL",
            (task["id"], task["user_id"])).fetchall()
        targets = [(url, endpoint_id) for url, events, endpoint_id in rows if kind in json.loads(events)]
        if not targets:
            return
        body = dumps({"type": f"task.{kind}", "timestamp": iso(now), "data": {"task": task_json(task)}})
        for url, endpoint_id in targets:
            if kind == "progress" and self._coalesce(task["id"], url, body, now):
                continue
            due = now
            if kind == "progress":
                last = self._one("SELECT MAX(created_at) FROM webhook_deliveries WHERE task_id = ? AND url = ? "
                                 "AND type = 'task.progress'", (task["id"], url))[0]
                if last is not None:
                    due = max(now, last + PROGRESS_EVERY_S)
            self._exec(f"INSERT INTO webhook_deliveries ({', '.join(_DELIVERY_COLS)}) VALUES "
                       f"({', '.join('?' * len(_DELIVERY_COLS))})",
                       ("msg_" + new_task_id(now)[2:], task["user_id"], task["id"], endpoint_id, url,
                        target_of(url), f"task.{kind}", body, "pending", 0, 0, None, None, "[]", due,
                        None, None, 0, now, now))

    def _coalesce(self, task_id, url, body, now):
        """A progress delivery of this task to this receiver that no one has
        tried yet takes the newer state (the latest wins); True if one did."""
        return self._exec(
            "UPDATE webhook_deliveries SET payload = ?, updated_at = ? WHERE id = ("
            "SELECT id FROM webhook_deliveries WHERE task_id = ? AND url = ? AND type = 'task.progress' "
            "AND state = 'pending' AND attempts = 0 AND lease_owner IS NULL ORDER BY created_at DESC LIMIT 1)",
            (body, now, task_id, url)).rowcount == 1

    def _cancel_pending(self, where, args, reason, now):
        self._exec(f"UPDATE webhook_deliveries SET state = 'cancelled', last_error = ?, updated_at = ? "
                   f"WHERE {where} AND state = 'pending'", (reason, now, *args))

    # -- the sender's side -------------------------------------------------------

    def claim_deliveries(self, owner, *, now, limit, lease_s, per_target, busy=None):
        busy = dict(busy or {})
        full = sorted(t for t, n in busy.items() if n >= per_target)
        sql = (f"SELECT {', '.join(_DELIVERY_COLS)} FROM webhook_deliveries WHERE state = 'pending' "
               "AND next_try_at <= ? AND (lease_owner IS NULL OR lease_expires_at < ?)")
        args = [now, now]
        if full:
            sql += f" AND target NOT IN ({', '.join('?' * len(full))})"
            args += full
        sql += f" ORDER BY next_try_at LIMIT ?{self.skip_locked}"
        args.append(limit * 4)
        claimed = []
        with self._seam():
            # Most ticks find nothing due: a read says so without taking
            # the write lock (SQLite's BEGIN IMMEDIATE) four times a second.
            if self._one("SELECT 1 FROM webhook_deliveries WHERE state = 'pending' AND next_try_at <= ? "
                         "LIMIT 1", (now,)) is None:
                return []
        with self._seam(), self._write():
            for row in self._exec(sql, args).fetchall():
                d = self._delivery(row)
                if len(claimed) >= limit or busy.get(d["target"], 0) >= per_target:
                    continue
                busy[d["target"]] = busy.get(d["target"], 0) + 1
                d.update(lease_owner=owner, lease_expires_at=now + lease_s, lease_token=d["lease_token"] + 1,
                         attempts=d["attempts"] + 1, tries=d["tries"] + 1)
                self._exec("UPDATE webhook_deliveries SET lease_owner = ?, lease_expires_at = ?, lease_token = ?, "
                           "attempts = ?, tries = ? WHERE id = ?",
                           (owner, d["lease_expires_at"], d["lease_token"], d["attempts"], d["tries"], d["id"]))
                claimed.append(d)
            for d in claimed:
                d["secrets"] = [s["secret"] for s in self._live_secrets(d["user_id"], d["endpoint_id"], now)]
        return claimed

    def _live_secrets(self, user_id, endpoint_id, now):
        owner, args = self._secret_owner(user_id, endpoint_id)
        return [{"secret": r[0]} for r in self._exec(
            f"SELECT secret FROM webhook_secrets WHERE {owner} AND (expires_at IS NULL OR expires_at > ?) "
            "ORDER BY id", (*args, now)).fetchall()]

    def finish_delivery(self, delivery_id, *, token, now, outcome, status=None, error=None,
                        next_try_at=None, took_s=None):
        """outcome: succeeded, retry (at next_try_at), failed (gave up) or
        gone (410: the endpoint, or the task's URL, is disabled)."""
        entry = {"at": now, "status": status, "error": error,
                 "took_ms": None if took_s is None else round(took_s * 1000)}
        with self._seam(), self._write():
            row = self._one(f"SELECT {', '.join(_DELIVERY_COLS)} FROM webhook_deliveries WHERE id = ? "
                            f"AND lease_token = ?{self.for_update}", (delivery_id, token))
            if row is None:
                return False        # taken over (our lease ran out) or removed: its new owner decides
            d = self._delivery(row)
            log = (d["log"] + [entry])[-LOG_KEEP:]
            state = {"succeeded": "succeeded", "retry": "pending"}.get(outcome, "failed")
            self._exec("UPDATE webhook_deliveries SET state = ?, last_status = ?, last_error = ?, log = ?, "
                       "next_try_at = ?, lease_owner = NULL, lease_expires_at = NULL, updated_at = ? "
                       "WHERE id = ?",
                       (state, status, error, dumps(log), next_try_at if state == "pending" else None, now,
                        delivery_id))
            if outcome == "gone":
                reason = f"the receiver answered {status} Gone"
                if d["endpoint_id"] is not None:
                    self._exec("UPDATE webhook_endpoints SET disabled_at = ?, disabled_reason = ? WHERE id = ?",
                               (now, reason, d["endpoint_id"]))
                    self._cancel_pending("endpoint_id = ?", (d["endpoint_id"],), reason, now)
                else:
                    self._exec("UPDATE task_webhooks SET disabled_at = ? WHERE task_id = ?", (now, d["task_id"]))
                    self._cancel_pending("task_id = ? AND endpoint_id IS NULL", (d["task_id"],), reason, now)
        return True

    @staticmethod
    def _delivery(row):
        d = dict(zip(_DELIVERY_COLS, row))
        d["log"] = json.loads(d["log"] or "[]")
        return d

    # -- the owner's view ----------------------------------------------------------

    def deliveries(self, user_id, task_id=None, *, limit=200):
        sql = f"SELECT {', '.join(_DELIVERY_COLS)} FROM webhook_deliveries WHERE user_id = ?"
        args = [user_id]
        if task_id is not None:
            sql += " AND task_id = ?"
            args.append(task_id)
        with self._seam():
            # The newest `limit`, shown oldest first.
            rows = self._exec(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit)).fetchall()
        return [self._delivery(r) for r in reversed(rows)]

    def get_delivery(self, user_id, delivery_id):
        with self._seam():
            row = self._one(f"SELECT {', '.join(_DELIVERY_COLS)} FROM webhook_deliveries "
                            "WHERE id = ? AND user_id = ?", (delivery_id, user_id))
        if row is None:
            raise NotFound("delivery not found", code="delivery_not_found")
        return self._delivery(row)

    def retry_delivery(self, user_id, delivery_id, *, now):
        with self._seam(), self._write():
            row = self._one(f"SELECT {', '.join(_DELIVERY_COLS)} FROM webhook_deliveries "
                            f"WHERE id = ? AND user_id = ?{self.for_update}", (delivery_id, user_id))
            if row is None:
                raise NotFound("delivery not found", code="delivery_not_found")
            d = self._delivery(row)
            if d["lease_owner"] is not None and (d["lease_expires_at"] or 0) >= now:
                raise Conflict("this delivery is being sent now", code="delivery_in_flight")
            if d["endpoint_id"] is not None:
                gone = self._one("SELECT disabled_at FROM webhook_endpoints WHERE id = ?", (d["endpoint_id"],))
                if gone is None or gone[0] is not None:
                    raise Conflict("its endpoint is disabled or removed", code="endpoint_disabled")
            else:
                gone = self._one("SELECT disabled_at FROM task_webhooks WHERE task_id = ?", (d["task_id"],))
                if gone is not None and gone[0] is not None:
                    # The owner asks for it: the task's URL may answer again.
                    self._exec("UPDATE task_webhooks SET disabled_at = NULL WHERE task_id = ?", (d["task_id"],))
            # A new round of tries; the same webhook-id, so a receiver that
            # got it before can tell.
            self._exec("UPDATE webhook_deliveries SET state = 'pending', tries = 0, next_try_at = ?, "
                       "lease_owner = NULL, lease_expires_at = NULL, updated_at = ? WHERE id = ?",
                       (now, now, delivery_id))
        return self.get_delivery(user_id, delivery_id)

    def task_webhook(self, task_id):
        """{"url", "events", "disabled_at"} of a task's own webhook, or None."""
        with self._seam():
            row = self._one("SELECT url, events, disabled_at FROM task_webhooks WHERE task_id = ?", (task_id,))
        return None if row is None else {"url": row[0], "events": json.loads(row[1]), "disabled_at": row[2]}
