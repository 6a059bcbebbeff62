"""HTTP for tasks: submit, list, get, cancel and retry (/api/tasks/*), and a
task's result files. Submissions take from the RateLimiter that create_app
shares with the account routes.
"""

import os
import re

import bottle

import metrics
from errors import Conflict, InvalidInput, NotFound, PaymentRequired, StoreUnavailable, TooMany
from store import ACTIVE, TERMINAL, TaskStatus, check_priority, iso, task_json

from .web import optional_key, read_json
from .webhooks import task_webhook

_TASK_ID = re.compile(r"^t_[0-9A-Z]{26}$")
STATUSES = frozenset(s.value for s in TaskStatus)
TIMELINE_LIMIT = 500        # the newest events of one task that GET /api/tasks/<id>/events returns
TIMELINE_FIELDS = ("status", "step", "progress", "attempts", "error", "credits", "version")


def task_routes(app, store, providers, config, *, worker, files, clock, current_user, limiter):
    """POST and GET /api/tasks, GET /api/tasks/<id>, its events, cancel and
    retry, and GET /api/tasks/<id>/files/<name>."""

    def task_id_arg(task_id):
        if not _TASK_ID.match(task_id):
            raise NotFound("task not found", code="task_not_found")
        return task_id

    @app.post("/api/tasks")
    def submit():
        user = current_user()
        body = read_json(config.max_body)
        unknown = set(body) - {"provider", "params", "dedupe_key", "webhook", "webhook_events", "priority"}
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
        priority = _priority(user, body.get("priority", 0))
        key = optional_key(body.get("dedupe_key"), "dedupe_key")
        header_key = optional_key(bottle.request.get_header("Idempotency-Key"), "Idempotency-Key")
        if key and header_key and key != header_key:
            raise InvalidInput("dedupe_key and Idempotency-Key differ")
        webhook = task_webhook(body, config)
        task, deduplicated = _submit(user, provider, params, key or header_key, webhook=webhook,
                                     priority=priority)
        bottle.response.status = 200 if deduplicated else 201
        return {"task": task_json(task), "deduplicated": deduplicated}

    def _priority(user, priority):
        check_priority(priority)
        allowed = user["max_priority"] or 0
        if priority > allowed:
            raise InvalidInput(f"priority {priority} is above your maximum of {allowed} (an admin sets "
                               "max_priority)", code="priority_not_allowed")
        return priority

    def _submit(user, provider, params, key, retry_of=None, webhook=None, priority=0):
        now = clock()
        try:
            task, deduplicated = store.submit(
                user["id"], provider.name, params, now=now, deadline_at=now + provider.max_wait_s,
                cost=provider.cost, dedupe_key=key, retry_of=retry_of,
                max_active=user["max_active"] or config.max_active,
                max_queued=provider.max_queued, admit=lambda: limiter.take(user, now), webhook=webhook,
                priority=priority)
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
        retry_of = q.get("retry_of") or None
        if retry_of is not None and not _TASK_ID.match(retry_of):
            raise InvalidInput("retry_of must be a task id")
        tasks, cursor = store.list_tasks(user["id"], statuses=statuses, limit=limit, before=before,
                                         retry_of=retry_of)
        return {"tasks": [task_json(t) for t in tasks], "next": cursor}

    @app.get("/api/tasks/<task_id>")
    def get_task(task_id):
        user = current_user()
        return {"task": task_json(store.get_task(task_id_arg(task_id), user["id"]))}

    @app.get("/api/tasks/<task_id>/events")
    def task_timeline(task_id):
        user = current_user()
        task = store.get_task(task_id_arg(task_id), user["id"])
        events, truncated = store.task_timeline(user["id"], task["id"], limit=TIMELINE_LIMIT)
        return {"events": [_timeline_entry(e) for e in events], "truncated": truncated}

    @app.post("/api/tasks/<task_id>/cancel")
    def cancel(task_id):
        user = current_user()
        task = store.cancel(task_id_arg(task_id), user["id"], now=clock())
        if worker is not None:
            worker.cancel_at_provider(task)
        if files is not None:
            # A download of this task may have saved some files already.
            try:
                files.remove_unlisted(task["id"], task["files"])
            except OSError:
                pass        # retention's next pass removes them
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
        # The retry reports to the same webhook URL as the task it repeats, with
        # the old task's priority as far as the user may still give it.
        priority = min(old["priority"], user["max_priority"] or 0)
        task, deduplicated = _submit(user, provider, old["params"], old["dedupe_key"], retry_of=old["id"],
                                     webhook=store.task_webhook(old["id"]), priority=priority)
        bottle.response.status = 200 if deduplicated else 201
        return {"task": task_json(task), "deduplicated": deduplicated}

    @app.get("/api/tasks/<task_id>/files/<name>")
    def get_file(task_id, name):
        user = current_user(allow_query=True)
        task = store.get_task(task_id_arg(task_id), user["id"])
        meta = next((f for f in task["files"] if f["name"] == name), None)
        if meta is None or files is None:
            raise NotFound("file not found", code="file_not_found")
        # Where the fenced update that published it says (old tasks' entries
        # name no lease folder).
        try:
            there = files.exists(task["id"], meta)
        except OSError as exc:
            raise StoreUnavailable(f"the file store is unavailable: {exc}") from None
        if not there:
            expired = store.files_expired_at(task["id"])
            if expired is not None:
                raise NotFound(f"this file expired: result files are kept {config.keep_files_h:g} hours "
                               f"after the task ends (HOLDFAST_KEEP_FILES_H); deleted at {iso(expired)}",
                               code="file_expired")
            raise NotFound("file not found", code="file_not_found")
        if files.remote:
            return _object_response(files, task["id"], meta)
        path = files.entry_path(task["id"], meta)
        res = bottle.static_file(os.path.basename(path), root=os.path.dirname(path),
                                 mimetype=meta["content_type"])
        res.set_header("X-Content-Type-Options", "nosniff")
        res.set_header("Cache-Control", "private, max-age=3600")
        return res


def _timeline_entry(event):
    """One event of a task's timeline: what it changed, not the whole task
    again (its params may be large, and they never change)."""
    task = event["task"]
    return {"seq": event["seq"], "type": event["type"], "at": iso(event["at"]),
            **{k: task.get(k) for k in TIMELINE_FIELDS}}


def _object_response(files, task_id, meta):
    """A file in a bucket: a redirect to a short-lived presigned link (the
    caller was authorised above; the link names this one object), or, with
    HOLDFAST_S3_PRESIGN=0, its bytes streamed through here."""
    try:
        if files.presign_s:
            res = bottle.HTTPResponse(status=302)
            res.set_header("Location", files.link(task_id, meta))
            res.set_header("Cache-Control", "no-store")     # the link runs out; the route does not
            return res
        chunks, size = files.open(task_id, meta)
    except FileNotFoundError:
        raise NotFound("file not found", code="file_not_found") from None
    except OSError as exc:
        raise StoreUnavailable(f"the file store is unavailable: {exc}") from None
    res = bottle.HTTPResponse(body=chunks, status=200)
    res.set_header("Content-Type", meta["content_type"])
    res.set_header("Content-Length", str(size))
    res.set_header("X-Content-Type-Options", "nosniff")
    res.set_header("Cache-Control", "private, max-age=3600")
    return res
