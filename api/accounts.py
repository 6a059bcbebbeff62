"""Accounts over HTTP: the caller (/api/me), admins (/api/admin/*), per-user
limits and conversation sessions (/api/sessions/*). create_app wires these
beside the task routes and hands them its RateLimiter, the one submissions
take from, so /api/me reports the bucket that is really applied.
"""

import json
import threading

import bottle

from errors import InvalidInput, NotFound, TooMany
from store import MAX_SESSION_MESSAGES, check_session_key, iso, session_json, task_json
from .web import only_fields, optional_key, query_number, read_json


class RateLimiter:
    """Submissions per second per user, as token buckets: a bucket holds
    `rate * burst_s` submissions (at least one) and refills at `rate` per
    second. Kept in memory, per process: a restart forgives, and several
    processes on one store each allow the rate."""

    def __init__(self, default_rate, burst_s):
        self.default_rate = default_rate
        self.burst_s = burst_s
        self._buckets = {}
        self._lock = threading.Lock()

    def rate(self, user):
        return user["rate_per_s"] or self.default_rate

    def capacity(self, rate):
        return max(1.0, rate * self.burst_s)

    def take(self, user, now):
        """Take one submission from the user's bucket; TooMany (with how long
        to wait) when it is empty."""
        rate = self.rate(user)
        full = self.capacity(rate)
        with self._lock:
            tokens, last = self._buckets.get(user["id"], (full, now))
            tokens = min(full, tokens + max(0.0, now - last) * rate)
            if tokens < 1.0:
                self._buckets[user["id"]] = (tokens, now)
                raise TooMany(f"too many submissions: at most {rate:g} per second",
                              code="rate_limited", retry_after=(1.0 - tokens) / rate)
            self._buckets[user["id"]] = (tokens - 1.0, now)


SESSION_ROLES = frozenset({"system", "user", "assistant", "tool"})
MAX_MESSAGE_CHARS = 16_000
MAX_SESSION_DATA = 16 * 1024


def session_messages(value, *, allow_empty):
    """A list of {"role", "content"} messages, checked; InvalidInput otherwise."""
    if not isinstance(value, list):
        raise InvalidInput("messages must be a list of {\"role\", \"content\"} objects")
    if not value and not allow_empty:
        raise InvalidInput("messages must hold at least one message")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise InvalidInput(f"message {i} must be an object with exactly \"role\" and \"content\"")
        if not isinstance(message["role"], str) or message["role"] not in SESSION_ROLES:
            raise InvalidInput(f"message {i}: role must be one of {', '.join(sorted(SESSION_ROLES))}")
        if not isinstance(message["content"], str) or len(message["content"]) > MAX_MESSAGE_CHARS:
            raise InvalidInput(f"message {i}: content must be a string of at most {MAX_MESSAGE_CHARS} "
                               "characters")
    return value


def session_data(value):
    if value is not None and not isinstance(value, dict):
        raise InvalidInput("data must be an object or null")
    if value is not None and len(json.dumps(value, separators=(",", ":")).encode()) > MAX_SESSION_DATA:
        raise InvalidInput(f"data must be at most {MAX_SESSION_DATA} bytes as JSON")
    return value


def account_routes(app, store, config, *, clock, current_user, admin_user, limiter, forget_users=lambda: None):
    """/api/me, /api/admin/* and /api/sessions/*."""

    def credits_of(user):
        # Read now: the caller's user may be a second old (api/__init__.py).
        balance = store.user_by_name(user["name"])["credit_balance"]
        if balance is None:
            return None
        return {"balance": balance, "reserved": store.reserved_credits(user["id"])}

    def user_json(user):
        return {"name": user["name"], "admin": user["is_admin"], "credits": credits_of(user),
                "max_active": user["max_active"], "rate_per_s": user["rate_per_s"],
                "max_priority": user["max_priority"] or 0, "created_at": iso(user["created_at"])}

    @app.get("/api/me")
    def me():
        user = current_user()
        rate = limiter.rate(user)
        return {"user": {"name": user["name"], "admin": user["is_admin"]}, "credits": credits_of(user),
                "limits": {"max_active": user["max_active"] or config.max_active,
                           "rate_per_s": rate, "burst": limiter.capacity(rate),
                           "max_priority": user["max_priority"] or 0,
                           "max_body": config.max_body, "max_sessions": config.max_sessions,
                           "session_messages": MAX_SESSION_MESSAGES, "session_ttl_s": config.session_ttl_s,
                           "message_chars": MAX_MESSAGE_CHARS, "session_data_bytes": MAX_SESSION_DATA},
                "usage": {"active": store.active_count(user["id"])}}

    # admin

    @app.post("/api/admin/users")
    def admin_create_user():
        admin_user()
        body = read_json(config.max_body)
        only_fields(body, {"name", "credits", "admin", "max_active", "rate_per_s", "max_priority"})
        if not isinstance(body.get("name"), str):
            raise InvalidInput("name is required and must be a string")
        if not isinstance(body.get("admin", False), bool):
            raise InvalidInput("admin must be true or false")
        user, token = store.create_user(body["name"], admin=body.get("admin", False),
                                        credits=body.get("credits"), max_active=body.get("max_active"),
                                        rate_per_s=body.get("rate_per_s"), now=clock(),
                                        max_priority=body.get("max_priority"))
        bottle.response.status = 201
        bottle.response.set_header("Cache-Control", "no-store")
        return {"user": user_json(user), "token": token}

    @app.route("/api/admin/users/<name>", method="PATCH")
    def admin_change_user(name):
        admin_user()
        body = read_json(config.max_body)
        only_fields(body, {"max_priority"})
        if "max_priority" not in body:
            raise InvalidInput("max_priority is required: an integer from 0 (the default) up")
        user = store.set_max_priority(name, body["max_priority"])
        forget_users()      # the next request of that user's sees its new maximum
        return {"user": user_json(user)}

    @app.post("/api/admin/users/<name>/credits")
    def admin_grant(name):
        admin_user()
        # With a key, sending the grant again (its answer lost) grants once.
        key = optional_key(bottle.request.get_header("Idempotency-Key"), "Idempotency-Key")
        body = read_json(config.max_body)
        only_fields(body, {"amount"})
        if "amount" not in body:
            raise InvalidInput("amount is required: a non-zero integer (negative takes credits away)")
        user = store.grant(store.user_by_name(name)["id"], body["amount"], now=clock(), key=key)
        return {"user": user_json(user), "granted": body["amount"]}

    @app.get("/api/admin/tasks")
    def admin_tasks():
        admin_user()
        unknown = set(bottle.request.query) - {"stuck", "limit", "grace_s"}
        if unknown:
            raise InvalidInput(f"unknown parameter(s): {', '.join(sorted(unknown))}")
        stuck = bottle.request.query.get("stuck", "0")
        if stuck not in ("0", "1"):
            raise InvalidInput("stuck must be 0 or 1")
        limit = query_number("limit", 100, 1, 500, int)
        grace_s = query_number("grace_s", 60.0, 0, 86400)
        now = clock()
        rows = store.admin_tasks(now=now, stuck=stuck == "1", grace_s=grace_s, limit=limit)
        return {"now": iso(now), "tasks": [
            {"task": task_json(task), "user": name, "stuck": reasons, "lease_owner": task["lease_owner"],
             "lease_expires_at": iso(task["lease_expires_at"]), "next_poll_at": iso(task["next_poll_at"])}
            for task, name, reasons in rows]}

    # conversation sessions

    @app.get("/api/sessions/<key>")
    def get_session(key):
        user = current_user()
        return {"session": session_json(store.get_session(user["id"], key, now=clock()))}

    @app.put("/api/sessions/<key>")
    def put_session(key):
        user = current_user()
        check_session_key(key)
        body = read_json(config.max_body)
        only_fields(body, {"messages", "data"})
        messages = session_messages(body.get("messages", []), allow_empty=True)
        data = session_data(body.get("data"))
        session = store.put_session(user["id"], key, messages=messages, data=data, now=clock(),
                                    ttl_s=config.session_ttl_s, max_sessions=config.max_sessions)
        return {"session": session_json(session), "dropped": max(0, len(messages) - MAX_SESSION_MESSAGES)}

    @app.post("/api/sessions/<key>/messages")
    def append_messages(key):
        user = current_user()
        check_session_key(key)
        body = read_json(config.max_body)
        if "messages" in body:
            only_fields(body, {"messages"})
            messages = session_messages(body["messages"], allow_empty=False)
        else:
            messages = session_messages([body], allow_empty=False)
        session, dropped = store.append_messages(user["id"], key, messages, now=clock(),
                                                 ttl_s=config.session_ttl_s, max_sessions=config.max_sessions)
        return {"session": session_json(session), "dropped": dropped}

    @app.delete("/api/sessions/<key>")
    def delete_session(key):
        user = current_user()
        if not store.delete_session(user["id"], key, now=clock()):
            raise NotFound("session not found", code="session_not_found")
        bottle.response.status = 204
        return ""
