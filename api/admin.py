"""The operator console's API (admins only; anyone else gets 401 or 403):

    GET  /api/admin/stats          counts now, per provider and day from the
                                   history, live figures, thresholds
    GET  /api/admin/users          users with balance, reserved credits,
                                   limits and active tasks
    GET  /api/admin/tasks/search   every user's tasks by filters and text
    POST /api/admin/tasks/bulk     cancel or retry a selection of tasks

The console page itself (/console) is a static file served with the page.
"""

import math
import re
import threading
import time
from collections import OrderedDict
from datetime import date, datetime, timedelta, timezone

import bottle

import metrics
from errors import Conflict, HoldfastError, InvalidInput, NotFound
from store import DURATION_BOUNDS_S, TERMINAL, history_day, iso, task_json

from .tasks import STATUSES
from .web import only_fields, optional_key, query_number, read_json

_TASK_ID = re.compile(r"^t_[0-9A-Z]{26}$")
MAX_BULK = 1000           # tasks one bulk action may name
BULK_REMEMBERED = 1000    # bulk answers kept for a repeated Idempotency-Key
BULK_KEEP_S = 3600.0
MAX_DAYS = 90
# The outcomes whose durations the percentiles describe: a cancelled task's
# time says how long its user waited, not how long the work took.
TIMED = ("succeeded", "partial", "failed")
SEARCH_PARAMS = {"status", "provider", "user", "error", "since", "until", "q", "limit", "before", "count"}


def quantile(buckets, q, longest):
    """The nearest-rank `q` quantile of durations counted in buckets
    ({index in DURATION_BOUNDS_S: count}): the upper bound of the bucket
    holding that rank, never above `longest` (the longest task seen). None
    when nothing was counted."""
    total = sum(buckets.values())
    if not total:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index in sorted(buckets):
        seen += buckets[index]
        if seen >= rank:
            return min(DURATION_BOUNDS_S[index], longest)
    return longest


def success_rate(by_outcome):
    """Succeeded over succeeded, partial and failed (a cancelled task is its
    user's choice, not the provider's failure); None when none finished so."""
    done = sum(by_outcome.get(o, 0) for o in TIMED)
    return by_outcome.get("succeeded", 0) / done if done else None


def level(value, warn, alert, *, below):
    """"ok", "warn" or "alert" for a figure against its thresholds (`below`:
    lower is worse); None for no figure."""
    if value is None:
        return None
    if below:
        return "alert" if value < alert else "warn" if value < warn else "ok"
    return "alert" if value > alert else "warn" if value > warn else "ok"


def history_series(history, detail, days):
    """Per provider, one value per day of `days` (YYYY-MM-DD, oldest first):
    tasks by outcome, success rate, p50 and p95 duration, failures by error
    code."""
    index = {day: i for i, day in enumerate(days)}
    n = len(days)
    out = {}

    def series(provider):
        if provider not in out:
            out[provider] = {"outcomes": {o: [0] * n for o in sorted(TERMINAL)}, "success_rate": [None] * n,
                             "p50_s": [None] * n, "p95_s": [None] * n, "failures": {},
                             "_longest": [0.0] * n, "_buckets": [{} for _ in range(n)]}
        return out[provider]

    for row in history:
        i = index.get(row["day"])
        if i is None:
            continue
        s = series(row["provider"])
        s["outcomes"].setdefault(row["outcome"], [0] * n)[i] += row["tasks"]
        if row["outcome"] in TIMED:
            s["_longest"][i] = max(s["_longest"][i], row["max_s"])
    for row in detail:
        i = index.get(row["day"])
        if i is None:
            continue
        s = series(row["provider"])
        if row["outcome"] in TIMED:
            b = s["_buckets"][i]
            b[row["bucket"]] = b.get(row["bucket"], 0) + row["tasks"]
        if row["outcome"] == "failed":
            code = row["error_code"] or "unknown"
            s["failures"].setdefault(code, [0] * n)[i] += row["tasks"]
    for s in out.values():
        for i in range(n):
            s["success_rate"][i] = success_rate({o: v[i] for o, v in s["outcomes"].items()})
            s["p50_s"][i] = quantile(s["_buckets"][i], 0.5, s["_longest"][i])
            s["p95_s"][i] = quantile(s["_buckets"][i], 0.95, s["_longest"][i])
        del s["_longest"], s["_buckets"]
    return out


def query_time(name):
    """A query string's time: ISO 8601 (UTC unless it says), a date, or Unix
    seconds; None when absent. InvalidInput otherwise."""
    raw = bottle.request.query.get(name)
    if raw in (None, ""):
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            when = datetime.fromisoformat(raw)
        except ValueError:
            raise InvalidInput(f"{name} must be an ISO 8601 time (2026-01-30T02:00:00Z), a date "
                               "(2026-01-30) or Unix seconds") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        value = when.timestamp()
    if not math.isfinite(value) or not 0 <= value < 1e11:
        raise InvalidInput(f"{name} is out of range")
    return value


def admin_routes(app, store, providers, config, *, worker, files, clock, admin_user, event_hub):
    """GET /api/admin/stats, /api/admin/users, /api/admin/tasks/search and
    POST /api/admin/tasks/bulk."""

    @app.get("/api/admin/stats")
    def stats():
        admin_user()
        unknown = set(bottle.request.query) - {"days"}
        if unknown:
            raise InvalidInput(f"unknown parameter(s): {', '.join(sorted(unknown))}")
        n = query_number("days", 14, 1, MAX_DAYS, int)
        now = clock()
        today = date.fromisoformat(history_day(now))
        days = [(today - timedelta(days=n - 1 - i)).isoformat() for i in range(n)]
        per_provider = history_series(store.history(since_day=days[0]),
                                      store.history_detail(since_day=days[0]), days)
        thresholds = config.thresholds()
        counts = store.task_counts()
        live = store.stats(now)
        oldest = store.admin_tasks(now=now, limit=1)
        poll_lag = store.poll_lag(now=now)
        provider_rows = []
        for name in sorted(set(providers) | set(per_provider) | {p for p, _ in counts}):
            p = providers.get(name)
            series = per_provider.get(name)
            today_rate = series["success_rate"][-1] if series else None
            provider_rows.append({
                "name": name, "configured": p is not None, "type": p.type if p else None,
                "health": p.describe()["health"] if p else None,
                "tasks": {s: counts.get((name, s), 0) for s in sorted(STATUSES)},
                "success_rate_today": today_rate,
                "level": level(today_rate, thresholds["success_rate"]["warn"],
                               thresholds["success_rate"]["alert"], below=True)})
        return {
            "now": iso(now), "thresholds": thresholds, "days": days,
            "day_starts": [datetime.fromisoformat(d).replace(tzinfo=timezone.utc).timestamp() for d in days],
            "counts": [{"provider": p, "status": s, "tasks": c} for (p, s), c in sorted(counts.items())],
            "history": per_provider,
            "providers": provider_rows,
            "live": {
                "poll_lag_s": poll_lag,
                "poll_lag_level": level(poll_lag, thresholds["poll_delay_s"]["warn"],
                                        thresholds["poll_delay_s"]["alert"], below=False),
                "worker_poll_behind_s": worker.slow_down.lag_s if worker is not None else None,
                "scheduler": ("running" if worker.alive() else "stopped") if worker is not None else "off",
                "queue_depth": live["queue_depth"], "active": live["active"],
                "oldest_active_s": live["oldest_active_s"],
                "oldest_active": ({"id": oldest[0][0]["id"], "user": oldest[0][1],
                                   "provider": oldest[0][0]["provider"], "status": oldest[0][0]["status"],
                                   "created_at": iso(oldest[0][0]["created_at"])} if oldest else None),
                "streams": event_hub.counts(),
                "webhooks": store.webhook_counts(since=now - 86400),
            },
        }

    @app.get("/api/admin/users")
    def users():
        admin_user()
        if bottle.request.query:
            raise InvalidInput(f"unknown parameter(s): {', '.join(sorted(bottle.request.query))}")
        return {"users": [{
            "name": u["name"], "admin": u["is_admin"],
            "credits": (None if u["credit_balance"] is None
                        else {"balance": u["credit_balance"], "reserved": u["reserved"]}),
            "limits": {"max_active": u["max_active"] or config.max_active,
                       "rate_per_s": u["rate_per_s"] or config.rate_per_s,
                       "max_priority": u["max_priority"] or 0},
            "active": u["active"], "created_at": iso(u["created_at"])} for u in store.admin_users()]}

    @app.get("/api/admin/tasks/search")
    def search():
        admin_user()
        q = bottle.request.query
        unknown = set(q) - SEARCH_PARAMS
        if unknown:
            raise InvalidInput(f"unknown parameter(s): {', '.join(sorted(unknown))}; use "
                               f"{', '.join(sorted(SEARCH_PARAMS))}")
        statuses = None
        if q.get("status"):
            statuses = q.get("status").split(",")
            bad = [s for s in statuses if s not in STATUSES]
            if bad:
                raise InvalidInput(f"unknown status {', '.join(bad)[:200]}; use {', '.join(sorted(STATUSES))}")
        error_code = q.get("error") or None
        if error_code is not None and not re.match(r"^[a-z_]{1,50}$", error_code):
            raise InvalidInput("error must be an error code such as provider_rejected or timeout")
        user_id = None
        if q.get("user"):
            try:
                user_id = store.user_by_name(q.get("user"))["id"]
            except NotFound:
                raise InvalidInput(f"no user named {q.get('user')[:100]!r}", code="unknown_user") from None
        provider = q.get("provider") or None
        if provider is not None and len(provider) > 200:
            raise InvalidInput("provider must be at most 200 characters")
        since, until = query_time("since"), query_time("until")
        if since is not None and until is not None and until <= since:
            raise InvalidInput("until must be after since")
        text = q.get("q") or None
        if text is not None and len(text) > 200:
            raise InvalidInput("q must be at most 200 characters")
        limit = query_number("limit", 50, 1, 200, int)
        before = q.get("before") or None
        if before is not None and not _TASK_ID.match(before):
            raise InvalidInput("before must be a task id (the `next` of an earlier page)")
        count = q.get("count", "0")
        if count not in ("0", "1"):
            raise InvalidInput("count must be 0 or 1")
        found, cursor, total = store.find_tasks(
            statuses=statuses, provider=provider, user_id=user_id, error_code=error_code, since=since,
            until=until, text=text, limit=limit, before=before, count=count == "1")
        return {"tasks": [{"task": task_json(t), "user": name} for t, name in found], "next": cursor,
                "total": total}

    # A bulk action answered once answers the same to the same key: a second
    # click (or a resent request) changes nothing more. Kept in this
    # process's memory; across processes, a retry also skips every task that
    # some task retries already, so a selection is retried once whatever
    # answers are lost.
    bulk_lock = threading.Lock()
    bulk_done = OrderedDict()     # (admin id, key) -> (time.monotonic() until which kept, request, answer)

    @app.post("/api/admin/tasks/bulk")
    def bulk():
        admin = admin_user()
        key = optional_key(bottle.request.get_header("Idempotency-Key"), "Idempotency-Key")
        if key is None:
            raise InvalidInput("an Idempotency-Key header is required: one per bulk action, sent again "
                               "with the same action")
        body = read_json(config.max_body)
        only_fields(body, {"action", "ids"})
        action = body.get("action")
        if action not in ("cancel", "retry"):
            raise InvalidInput("action must be cancel or retry")
        ids = body.get("ids")
        if not isinstance(ids, list) or not ids or len(ids) > MAX_BULK:
            raise InvalidInput(f"ids must be a list of 1 to {MAX_BULK} task ids")
        if not all(isinstance(i, str) and _TASK_ID.match(i) for i in ids):
            raise InvalidInput("every id must be a task id (t_ and 26 letters or digits)")
        ids = list(dict.fromkeys(ids))
        request = (action, tuple(ids))
        with bulk_lock:
            now_m = time.monotonic()
            while bulk_done and next(iter(bulk_done.values()))[0] < now_m:
                bulk_done.popitem(last=False)
            hit = bulk_done.get((admin["id"], key))
            if hit is not None:
                if hit[1] != request:
                    raise Conflict("this Idempotency-Key was used for another bulk action",
                                   code="idempotency_key_reused")
                return {**hit[2], "replayed": True}
            answer = (bulk_cancel if action == "cancel" else bulk_retry)(ids)
            bulk_done[(admin["id"], key)] = (now_m + BULK_KEEP_S, request, answer)
            while len(bulk_done) > BULK_REMEMBERED:
                bulk_done.popitem(last=False)
        return {**answer, "replayed": False}

    def summary(action, results):
        counts = {}
        for r in results:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        return {"action": action, "requested": len(results), "outcomes": counts, "results": results}

    def bulk_cancel(ids):
        tasks = store.tasks_by_ids(ids)
        results = []
        for task_id in ids:
            task = tasks.get(task_id)
            if task is None:
                results.append({"id": task_id, "outcome": "not_found"})
                continue
            try:
                task = store.cancel(task_id, task["user_id"], now=clock())
            except Conflict:
                results.append({"id": task_id, "outcome": "not_active"})
                continue
            except NotFound:
                results.append({"id": task_id, "outcome": "not_found"})
                continue
            if worker is not None:
                worker.cancel_at_provider(task)
            if files is not None:
                try:
                    files.remove_unlisted(task["id"], task["files"])
                except OSError:
                    pass        # retention's next pass removes them
            results.append({"id": task_id, "outcome": "cancelled"})
        return summary("cancel", results)

    def bulk_retry(ids):
        tasks = store.tasks_by_ids(ids)
        retried = store.retried(ids)
        owners = {u["id"]: u for u in store.admin_users()} if tasks else {}
        results = []
        made = False
        for task_id in ids:
            old = tasks.get(task_id)
            if old is None:
                results.append({"id": task_id, "outcome": "not_found"})
            elif old["status"] not in ("failed", "cancelled"):
                results.append({"id": task_id, "outcome": "not_retryable", "status": old["status"]})
            elif task_id in retried:
                results.append({"id": task_id, "outcome": "already_retried"})
            elif old["provider"] not in providers:
                results.append({"id": task_id, "outcome": "refused", "code": "unknown_provider",
                                "message": f"provider {old['provider']!r} is no longer configured"})
            else:
                try:
                    task, deduplicated = retry_one(old, owners[old["user_id"]])
                except HoldfastError as exc:
                    results.append({"id": task_id, "outcome": "refused", "code": exc.code,
                                    "message": exc.message})
                    continue
                made = made or not deduplicated
                results.append({"id": task_id, "outcome": "already_retried" if deduplicated else "retried",
                                "retry": task["id"]})
        if made and worker is not None:
            worker.wake()
        return summary("retry", results)

    def retry_one(old, owner):
        """A retry made for the task's own user, as its user's retry would
        be (their credits, limits, the task's webhook), without their rate
        limit: an admin's action is not the user's submission."""
        provider = providers[old["provider"]]
        now = clock()
        task, deduplicated = store.submit(
            old["user_id"], provider.name, old["params"], now=now, deadline_at=now + provider.max_wait_s,
            cost=provider.cost, dedupe_key=old["dedupe_key"], retry_of=old["id"],
            max_active=owner["max_active"] or config.max_active, max_queued=provider.max_queued,
            webhook=store.task_webhook(old["id"]), priority=min(old["priority"], owner["max_priority"] or 0))
        metrics.SUBMITS.inc(provider.name)
        return task, deduplicated
