"""HTTP for live events: GET /api/events (Server-Sent Events) and GET
/api/events/poll (long polling). events.py's EventHub does the waiting and
stays free of HTTP; the status codes, headers and query arguments are here.
"""

import logging
import re

import bottle

from errors import HoldfastError, InvalidInput
from .events import EventHub
from .web import error_body

log = logging.getLogger("holdfast.app")

SSE_RETRY_MS = 1000      # how soon an EventSource reconnects after a stream ends
STREAMS_FULL_RETRY_S = 15
_SEQ = re.compile(r"^[0-9]{1,18}$")
_WAIT = re.compile(r"^[0-9]{1,3}(\.[0-9]{1,3})?$")
MAX_POLL_WAIT_S = 25.0


def event_routes(app, store, config, current_user):
    """GET /api/events (Server-Sent Events) and GET /api/events/poll (long
    polling), both over the event log; events.py says how they wait. Returns
    the EventHub, whose counts() is the open-stream gauge."""
    hub = EventHub(store, max_waiters=config.sse_max_streams, max_per_user=config.sse_max_per_user)

    def cursor_arg(value, what):
        if value is None or value == "":
            return None
        if not _SEQ.match(value):
            raise InvalidInput(f"{what} must be an event seq: a non-negative integer", code="invalid_cursor")
        return int(value)

    def disconnected():
        # waitress sets this (app.serve() turns on its request lookahead);
        # in-process callers have no socket to lose.
        return bottle.request.environ.get("waitress.client_disconnected", lambda: False)

    @app.get("/api/events")
    def event_stream():
        user = current_user(allow_query=True)
        last_id = bottle.request.get_header("Last-Event-ID")
        if last_id:   # an EventSource reconnecting: this wins over the URL's since
            since = cursor_arg(last_id.strip(), "Last-Event-ID")
        else:
            since = cursor_arg(bottle.request.query.get("since"), "since")
        if not hub.admit("sse", user["id"]):
            return streams_full()
        try:
            watch, since = hub.start(user["id"], since)
        except BaseException:
            hub.leave("sse", user["id"])
            raise
        gone = disconnected()

        def body():
            try:
                yield from hub.sse(watch, user["id"], since, max_s=config.sse_max_s,
                                   keepalive_s=config.sse_keepalive_s, retry_ms=SSE_RETRY_MS,
                                   disconnected=gone)
            except HoldfastError as exc:   # the client reconnects with Last-Event-ID
                log.warning("event stream of user %s ended early: %s", user["id"], exc.message)
            finally:
                watch.close()
                hub.leave("sse", user["id"])

        res = bottle.response
        res.content_type = "text/event-stream"
        res.set_header("Cache-Control", "no-store")
        res.set_header("X-Accel-Buffering", "no")
        return body()

    def streams_full():
        bottle.response.set_header("Retry-After", str(STREAMS_FULL_RETRY_S))
        if "text/event-stream" in bottle.request.get_header("Accept", ""):
            bottle.response.status = 503
            bottle.response.content_type = "text/event-stream"
            return f"retry: {STREAMS_FULL_RETRY_S * 1000}\n\n"
        return error_body(503, "too_many_streams",
                          "too many event streams are open; use /api/events/poll or try again later")

    @app.get("/api/events/poll")
    def event_poll():
        user = current_user()
        q = bottle.request.query
        since = cursor_arg(q.get("since"), "since")
        wait = q.get("wait") or "0"
        if not _WAIT.match(wait) or float(wait) > MAX_POLL_WAIT_S:
            raise InvalidInput(f"wait must be a number of seconds from 0 to {MAX_POLL_WAIT_S:g}",
                               code="invalid_wait")
        wait = float(wait)
        # Past the cap a long poll answers at once rather than hold a thread.
        if wait > 0 and hub.admit("poll", user["id"]):
            try:
                watch, since = hub.start(user["id"], since)
                try:
                    rows, next_seq = hub.poll(watch, user["id"], since, wait_s=wait,
                                              disconnected=disconnected())
                finally:
                    watch.close()
            finally:
                hub.leave("poll", user["id"])
        else:
            since = hub.resolve(user["id"], since)
            rows = store.events_since(user["id"], since)
            next_seq = rows[-1][0] if rows else since
        bottle.response.content_type = "application/json"
        bottle.response.set_header("Cache-Control", "no-store")
        return '{"events":[%s],"next":%d}' % (",".join(text for _, text in rows), next_seq)

    return hub
