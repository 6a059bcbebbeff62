"""The HTTP API (Bottle): `create_app(store, providers, config)` returns the app.

Nothing here is global, so tests wire test stores and fake providers the same
way app.py wires the real ones. Start reading at create_app below: it sets up
the error handling and who the caller is, then hands each group of routes
what it needs.

    tasks.py     /api/tasks: submit, list, get, cancel, retry, result files
    accounts.py  /api/me, /api/admin/*, /api/sessions/*; the submission rate limiter
    admin.py     the operator console's /api/admin/stats, users, tasks/search, tasks/bulk
    streams.py   /api/events (SSE) and /api/events/poll (long polls)
    callbacks.py /api/callbacks/{provider}/{token}: providers' word that a job changed (no bearer auth)
    cors.py      calls from the user's own frontend on another origin (HOLDFAST_CORS_ORIGINS)
    events.py    the EventHub: the slots and wake-ups of clients waiting on the event log
    webhooks.py  /api/webhooks/* and admins' /api/admin/users/<name>/webhooks; webhook URL checks
    service.py   /api/providers, /healthz, /metrics, /openapi.json, the page
    web.py       the seam every route module shares: the error hook, JSON bodies, request checks
    openapi.py   the API described as OpenAPI 3.1
    server.py    waitress, bounded against clients that hold connections (used by app.py's serve)

Nothing outside this package imports it but app.py (tests/test_layout.py).
"""

import json
import time

import bottle

from errors import Forbidden, Unauthorized

from store import hash_token

from .accounts import RateLimiter, account_routes
from .admin import admin_routes
from .callbacks import callback_routes
from .cors import with_cors
from .service import service_routes
from .streams import event_routes
from .tasks import task_routes
from .webhooks import webhook_routes
from .web import json_errors

USER_TTL_S = 1.0           # how long a token's user is taken from memory
USERS_REMEMBERED = 10_000  # tokens held at once (all dropped past it)


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

    known = {}     # sha256 of a token -> (its user, time.monotonic() until which that answer stands)

    def current_user(allow_query=False):
        token = bearer(allow_query)
        if not token:
            raise Unauthorized("missing or unknown token")
        # A user's token and name never change once made, and its limits
        # change only by an admin's PATCH, which empties this memory (another
        # process sees the change within USER_TTL_S). So a second's reuse of
        # the lookup (a query per request: a third of a GET's time) shows
        # nothing stale here; /api/me reads the balance itself. Unknown
        # tokens are always asked, so a new user works at once.
        key = hash_token(token)
        hit = known.get(key)
        now = time.monotonic()
        if hit is not None and now < hit[1]:
            return dict(hit[0])
        user = store.user_by_token(token)
        if user is None:
            raise Unauthorized("missing or unknown token")
        if len(known) >= USERS_REMEMBERED:
            known.clear()
        known[key] = (dict(user), now + USER_TTL_S)
        return user

    def admin_user():
        user = current_user()
        if not user["is_admin"]:
            raise Forbidden("admin token required")
        return user

    task_routes(app, store, providers, config, worker=worker, files=files, clock=clock,
                current_user=current_user, limiter=limiter)

    account_routes(app, store, config, clock=clock, current_user=current_user, forget_users=known.clear,
                   admin_user=admin_user, limiter=limiter)
    webhook_routes(app, store, config, clock=clock, current_user=current_user, admin_user=admin_user)
    event_hub = event_routes(app, store, config, current_user)
    callback_routes(app, store, providers, worker=worker, clock=clock)
    service_routes(app, store, providers, worker=worker, clock=clock, current_user=current_user,
                   event_hub=event_hub)
    admin_routes(app, store, providers, config, worker=worker, files=files, clock=clock, admin_user=admin_user,
                 event_hub=event_hub)
    app.config["holdfast.events"] = event_hub
    origins = getattr(config, "cors_origins", None)
    # Bottle calls its own .wsgi for every request: the cross-origin
    # answers wrap the whole app, its errors and 404s included.
    app.wsgi = with_cors(app.wsgi, set(origins.split(",")) if origins else set())
    return app
