"""HTTP for the service itself: the providers, /healthz, /metrics,
/openapi.json, and the page with its static files.
"""

import os
import time

import bottle

import metrics
from errors import HoldfastError, NotFound
from store import iso

from . import openapi

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATIC = os.path.join(HERE, "static")
# The page, the console and their files: no inline script or style, nothing
# from elsewhere, never in a frame, no address sent on to other sites.
# (img-src: the page's favicon is a data: URL and result images are blob:
# URLs of files fetched with the token.)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def _secured(res):
    for name, value in SECURITY_HEADERS.items():
        res.set_header(name, value)
    return res


def service_routes(app, store, providers, *, worker, clock, current_user, event_hub):
    """GET /api/providers, /healthz, /metrics, /openapi.json, / and /static/*."""

    @app.get("/api/providers")
    def list_providers():
        current_user()
        seen = store.provider_health()
        return {"providers": [dict(p.describe(), health=health_json(seen.get(p.name)))
                              for p in providers.values()]}

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
            result["slow_down"] = worker.slow_down.describe()
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
        return _secured(bottle.static_file("index.html", root=STATIC))

    @app.get("/console")
    def console():
        # The page holds no data; the admin API it reads answers admins only.
        return _secured(bottle.static_file("console.html", root=STATIC))

    @app.get("/static/<path:path>")
    def static(path):
        res = bottle.static_file(path, root=STATIC)
        if isinstance(res, bottle.HTTPError):
            raise NotFound("no such file")
        return _secured(res)


def health_json(row):
    """A provider's health as the workers saw it (store.provider_health()):
    `ok` is whether its last call got an answer (no call failed since the
    last answer; null: never called),
    `checked_at` that call's time and `error` its error while it fails;
    then the last answer, the last failure with its code, and how many calls
    in a row have failed since the last answer."""
    if row is None or (row["last_ok_at"] is None and row["last_error_at"] is None):
        return {"ok": None, "checked_at": None, "error": None, "last_ok_at": None, "last_error_at": None,
                "last_error_code": None, "consecutive_failures": 0}
    ok_at, error_at = row["last_ok_at"], row["last_error_at"]
    ok = row["consecutive_failures"] == 0
    return {"ok": ok, "checked_at": iso(max(t for t in (ok_at, error_at) if t is not None)),
            "error": None if ok else row["last_error"], "last_ok_at": iso(ok_at), "last_error_at": iso(error_at),
            "last_error_code": row["last_error_code"], "consecutive_failures": row["consecutive_failures"]}


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
    try:
        hooks = store.webhook_counts(since=time.time() - 86400)
    except HoldfastError:
        hooks = {}
    families = [
        ("holdfast_tasks", "gauge", "Tasks in the store, by provider and status.",
         [({"provider": p, "status": s}, n) for (p, s), n in sorted(counts.items())]),
        ("holdfast_store_up", "gauge", "1 when the store answered this scrape.", [({}, up)]),
        ("holdfast_event_streams", "gauge", "Open event streams (sse) and long polls (poll).",
         [({"kind": k}, streams[k]) for k in ("sse", "poll")]),
        ("holdfast_event_streams_max", "gauge", "The cap that streams and long polls share.",
         [({}, streams["max"])]),
        ("holdfast_webhook_deliveries", "gauge", "Webhook deliveries: pending, failing (pending after a "
         "failed try), failed (given up in the last 24 hours).",
         [({"state": k}, hooks[k]) for k in ("pending", "failing", "failed") if k in hooks]),
        ("holdfast_start_time_seconds", "gauge", "When this process started (Unix time).",
         [({}, metrics.START_TIME)]),
    ]
    if worker is not None:
        families.append(("holdfast_scheduler_up", "gauge", "1 when the worker's scheduler runs.",
                         [({}, int(worker.alive()))]))
        families.append(("holdfast_slow_down", "gauge", "1 while the worker is behind on polls and "
                         "stretches old tasks' polls (see /healthz).", [({}, int(worker.slow_down.active))]))
        families.append(("holdfast_poll_behind_seconds", "gauge", "How late the longest-due poll was at the "
                         "worker's last claim.", [({}, worker.slow_down.lag_s)]))
    return families
