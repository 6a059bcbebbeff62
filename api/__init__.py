"""The HTTP API (Bottle): `create_app(store, providers, config)`.
"""

import json
import os
import re
import time

import bottle

import metrics
from errors import (Conflict, Forbidden, HoldfastError, InvalidInput, NotFound, PaymentRequired, TooMany,
                    Unauthorized)
from store import ACTIVE, TERMINAL, TaskStatus, iso, task_json

from . import openapi
from .accounts import RateLimiter, account_routes
from .streams import event_routes
from .web import json_errors, optional_key, read_json

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATIC = os.path.join(HERE, "static")
_TASK_ID = re.compile(r"^t_[0-9A-Z]{26}$")
STATUSES = frozenset(s.value for s in TaskStatus)


# -- the app -------------------------------------------------------------------

def create_app(store, providers, config, *, worker=None, files=None, clock=time.time):
    app = bottle.Bottle(catchall=True)
    app.install(json_errors)
    limiter = RateLimiter(config.rate_per_s, config.rate_burst_s)

    def default_error(res):
        bottle.response.content_type = "application/json"
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(res.status_code, "error")
        message = res.body if isinstance(res.body, str) and res.status_code < 500 else "internal error"
        if res.status_code == 404:
            message = "no such endpoint"
        return json.dumps({"error": {"code": code, "message": message}})

    app.default_error_handler = default_error

    def bearer(allow_query=False):
        header = bottle.request.get_header("Authorization", "")
        if header.startswith("Bearer "):
            return header[7:].strip()
        if allow_query:
            return bottle.request.query.get("token") or None
        return None

    def current_user(allow_query=False):
        token = bearer(allow_query)
        user = store.user_by_token(token) if token else None
        if user is None:
            raise Unauthorized("missing or unknown token")
        return user

    def admin_user():
        user = current_user()
        if not user["is_admin"]:
            raise Forbidden("admin token required")
        return user

    def task_id_arg(task_id):
        if not _TASK_ID.match(task_id):
            raise NotFound("task not found", code="task_not_found")
        return task_id

    # tasks

    @app.post("/api/tasks")
    def submit():
        user = current_user()
        body = read_json(config.max_body)
        unknown = set(body) - {"provider", "params", "dedupe_key"}
        if unknown:
            raise InvalidInput(f"unknown field(s): {', '.join(sorted(unknown))}")
        name = body.get("provider")
        if not isinstance(name, str):
            raise InvalidInput("provider is required and must be a string")
        provider = providers.get(name)
        if provider is None:
            raise InvalidInput(f"unknown provider {name!r}", code="unknown_provider")
        params = body.get("params", {})
        if not isinstance(params, dict):
            raise InvalidInput("params must be an object")
        provider.validate(params)
        key = optional_key(body.get("dedupe_key"), "dedupe_key")
        header_key = optional_key(bottle.request.get_header("Idempotency-Key"), "Idempotency-Key")
        if key and header_key and key != header_key:
            raise InvalidInput("dedupe_key and Idempotency-Key differ")
        task, deduplicated = _submit(user, provider, params, key or header_key)
        bottle.response.status = 200 if deduplicated else 201
        return {"task": task_json(task), "deduplicated": deduplicated}

    def _submit(user, provider, params, key, retry_of=None):
        now = clock()
        try:
            task, deduplicated = store.submit(
                user["id"], provider.name, params, now=now, deadline_at=now + provider.max_wait_s,
                cost=provider.cost, dedupe_key=key, retry_of=retry_of,
                max_active=user["max_active"] or config.max_active,
                max_queued=provider.max_queued, admit=lambda: limiter.take(user, now))
        except (PaymentRequired, TooMany) as exc:
            metrics.SUBMIT_REFUSALS.inc(exc.code)
            raise
        metrics.SUBMITS.inc(provider.name)
        if deduplicated:
            metrics.DEDUPE_HITS.inc(provider.name)
        elif worker is not None:
            worker.wake()
        return task, deduplicated

    @app.get("/api/tasks")
    def list_tasks():
        user = current_user()
        q = bottle.request.query
        statuses = None
        if q.get("status"):
            wanted = q.get("status")
            if wanted == "active":
                statuses = sorted(ACTIVE)
            elif wanted == "terminal":
                statuses = sorted(TERMINAL)
            else:
                statuses = wanted.split(",")
                bad = [s for s in statuses if s not in STATUSES]
                if bad or len(statuses) > len(STATUSES):
                    raise InvalidInput(f"unknown status {', '.join(bad)}; use {', '.join(sorted(STATUSES))}, "
                                       "active or terminal")
        try:
            limit = int(q.get("limit", 50))
        except ValueError:
            raise InvalidInput("limit must be an integer") from None
        if not 1 <= limit <= 200:
            raise InvalidInput("limit must be from 1 to 200")
        before = q.get("before") or None
        if before is not None and not _TASK_ID.match(before):
            raise InvalidInput("before must be a task id (the `next` of an earlier page)")
        tasks, cursor = store.list_tasks(user["id"], statuses=statuses, limit=limit, before=before)
        return {"tasks": [task_json(t) for t in tasks], "next": cursor}

    @app.get("/api/tasks/<task_id>")
    def get_task(task_id):
        user = current_user()
        return {"task": task_json(store.get_task(task_id_arg(task_id), user["id"]))}

    @app.post("/api/tasks/<task_id>/cancel")
    def cancel(task_id):
        user = current_user()
        task = store.cancel(task_id_arg(task_id), user["id"], now=clock())
        if worker is not None:
            worker.cancel_at_provider(task)
        return {"task": task_json(task)}

    @app.post("/api/tasks/<task_id>/retry")
    def retry(task_id):
        user = current_user()
        old = store.get_task(task_id_arg(task_id), user["id"])
        if old["status"] not in ("failed", "cancelled"):
            raise Conflict(f"only failed or cancelled tasks can be retried; this one is {old['status']}",
                           code="not_retryable")
        provider = providers.get(old["provider"])
        if provider is None:
            raise InvalidInput(f"provider {old['provider']!r} is no longer configured",
                               code="unknown_provider")
        task, deduplicated = _submit(user, provider, old["params"], old["dedupe_key"], retry_of=old["id"])
        bottle.response.status = 200 if deduplicated else 201
        return {"task": task_json(task), "deduplicated": deduplicated}

    @app.get("/api/tasks/<task_id>/files/<name>")
    def get_file(task_id, name):
        user = current_user(allow_query=True)
        task = store.get_task(task_id_arg(task_id), user["id"])
        meta = next((f for f in task["files"] if f["name"] == name), None)
        if meta is None or files is None:
            raise NotFound("file not found", code="file_not_found")
        path = files.path(task["id"], name)
        if not os.path.exists(path):
            expired = store.files_expired_at(task["id"])
            if expired is not None:
                raise NotFound(f"this file expired: result files are kept {config.keep_files_h:g} hours "
                               f"after the task ends (HOLDFAST_KEEP_FILES_H); deleted at {iso(expired)}",
                               code="file_expired")
            raise NotFound("file not found", code="file_not_found")
        res = bottle.static_file(os.path.basename(path), root=os.path.dirname(path),
                                 mimetype=meta["content_type"])
        res.set_header("X-Content-Type-Options", "nosniff")
        res.set_header("Cache-Control", "private, max-age=3600")
        return res

    # the caller and the service

    @app.get("/api/providers")
    def list_providers():
        current_user()
        return {"providers": [p.describe() for p in providers.values()]}

    @app.get("/healthz")
    def healthz():
        now = clock()
        result = {"ok": True, "store": store.name, "scheduler": "off"}
        try:
            store.health()
            stats = store.stats(now)
            result.update(queue_depth=stats["queue_depth"], oldest_active_s=stats["oldest_active_s"])
        except HoldfastError as exc:
            result.update(ok=False, store=f"{store.name} ({exc.message})", queue_depth=None,
                          oldest_active_s=None)
        if worker is not None:
            result["scheduler"] = "running" if worker.alive() else "stopped"
            result["ok"] = result["ok"] and worker.alive()
        result["streams"] = event_hub.counts()
        bottle.response.status = 200 if result["ok"] else 503
        return result

    @app.get("/metrics")
    def prometheus():
        # No auth, like /healthz: aggregate counts only, nothing of any user's.
        text = metrics.REGISTRY.render([lambda: service_metrics(store, event_hub, worker)])
        bottle.response.content_type = metrics.CONTENT_TYPE
        bottle.response.set_header("Cache-Control", "no-store")
        return text

    @app.get("/openapi.json")
    def openapi_json():
        return openapi.spec()

    # the page

    @app.get("/")
    def index():
        return bottle.static_file("index.html", root=STATIC)

    @app.get("/static/<path:path>")
    def static(path):
        res = bottle.static_file(path, root=STATIC)
        if isinstance(res, bottle.HTTPError):
            raise NotFound("no such file")
        return res

    account_routes(app, store, config, clock=clock, current_user=current_user,
                   admin_user=admin_user, limiter=limiter)
    event_hub = event_routes(app, store, config, current_user)
    app.config["holdfast.events"] = event_hub
    return app


def service_metrics(store, hub, worker):
    """GET /metrics' figures read at scrape time: tasks by provider and
    status (one GROUP BY), open event streams, and whether the store and the
    scheduler answer."""
    try:
        counts = store.task_counts()
        up = 1
    except HoldfastError:
        counts, up = {}, 0
    streams = hub.counts()
    families = [
        ("holdfast_tasks", "gauge", "Tasks in the store, by provider and status.",
         [({"provider": p, "status": s}, n) for (p, s), n in sorted(counts.items())]),
        ("holdfast_store_up", "gauge", "1 when the store answered this scrape.", [({}, up)]),
        ("holdfast_event_streams", "gauge", "Open event streams (sse) and long polls (poll).",
         [({"kind": k}, streams[k]) for k in ("sse", "poll")]),
        ("holdfast_event_streams_max", "gauge", "The cap that streams and long polls share.",
         [({}, streams["max"])]),
        ("holdfast_start_time_seconds", "gauge", "When this process started (Unix time).",
         [({}, metrics.START_TIME)]),
    ]
    if worker is not None:
        families.append(("holdfast_scheduler_up", "gauge", "1 when the worker's scheduler runs.",
                         [({}, int(worker.alive()))]))
    return families
