"""HTTP for webhooks out: the caller's deliveries (/api/webhooks/deliveries)
and the secret that signs their tasks' own `webhook` URLs
(/api/webhooks/secret); admins manage users' default endpoints
(/api/admin/users/<name>/webhooks). `task_webhook` checks the `webhook` and
`webhook_events` fields of POST /api/tasks.

Which secret signs what: a default endpoint has its own secrets, shown once
when it is made and when it is rotated. A task's own `webhook` URL is
signed with the user's task secret, one per user (made at first use and
shown to its owner at GET /api/webhooks/secret): a receiver must know its
secret before the first message arrives, and a task's URL is chosen per
request, so the secret cannot be per task.
"""

import re
import socket
from urllib.parse import urlsplit

import bottle

from errors import InvalidInput, NotFound
from providers.net import refusal
from store import delivery_json, endpoint_json, iso, webhook_events

from .web import only_fields, read_json

MAX_URL = 2000
_DELIVERY_ID = re.compile(r"^msg_[0-9A-Z]{26}$")
_TASK_ID = re.compile(r"^t_[0-9A-Z]{26}$")


def check_webhook_url(url, allow_private):
    """The URL if holdfast may send to it; InvalidInput (invalid_webhook)
    otherwise. Every address its host resolves to must be public, unless
    `allow_private`: the sender checks again at each connect."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise InvalidInput(f"webhook must be an http(s) URL of at most {MAX_URL} characters",
                           code="invalid_webhook")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InvalidInput("webhook is not a valid URL", code="invalid_webhook") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise InvalidInput("webhook must be an http or https URL with a host and no credentials",
                           code="invalid_webhook")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise InvalidInput("webhook must not hold spaces or control characters", code="invalid_webhook")
    if allow_private:
        return url
    try:
        infos = socket.getaddrinfo(parts.hostname, port, 0, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise InvalidInput(f"webhook host {parts.hostname!r} does not resolve", code="invalid_webhook") from None
    for info in infos:
        why = refusal(info[4][0])
        if why:
            raise InvalidInput(f"webhook host {parts.hostname!r} resolves to {info[4][0]}, {why}; "
                               "holdfast sends webhooks to public addresses only "
                               "(HOLDFAST_WEBHOOK_ALLOW_PRIVATE=1 lifts this)", code="invalid_webhook")
    return url


def task_webhook(body, config):
    """{"url", "events"} from a submission's fields, or None; InvalidInput."""
    url, events = body.get("webhook"), body.get("webhook_events")
    if url is None:
        if events is not None:
            raise InvalidInput("webhook_events needs a webhook URL", code="invalid_webhook_events")
        return None
    return {"url": check_webhook_url(url, config.webhooks_private_ok), "events": webhook_events(events)}


def webhook_routes(app, store, config, *, clock, current_user, admin_user):
    """The caller's deliveries and task secret, and admins' endpoints."""

    @app.get("/api/webhooks/deliveries")
    def list_deliveries():
        user = current_user()
        task_id = bottle.request.query.get("task_id") or None
        if task_id is not None:
            if not _TASK_ID.match(task_id):
                raise NotFound("task not found", code="task_not_found")
            store.get_task(task_id, user["id"])        # another user's task: 404
        return {"deliveries": [delivery_json(d) for d in store.deliveries(user["id"], task_id)]}

    @app.post("/api/webhooks/deliveries/<delivery_id>/retry")
    def retry_delivery(delivery_id):
        user = current_user()
        if not _DELIVERY_ID.match(delivery_id):
            raise NotFound("delivery not found", code="delivery_not_found")
        return {"delivery": delivery_json(store.retry_delivery(user["id"], delivery_id, now=clock()))}

    @app.get("/api/webhooks/secret")
    def task_secret():
        user = current_user()
        return {"secrets": _secrets(store.task_webhook_secrets(user["id"], now=clock()))}

    @app.post("/api/webhooks/secret/rotate")
    def rotate_task_secret():
        user = current_user()
        now = clock()
        secret = store.rotate_webhook_secret(user["id"], now=now, overlap_s=config.webhook_secret_overlap_s)
        return {"secret": secret, "secrets": _secrets(store.webhook_secrets(user["id"], now=now))}

    def endpoint_arg(endpoint_id):
        if not (endpoint_id.isascii() and endpoint_id.isdigit()) or len(endpoint_id) > 12:
            raise NotFound("webhook endpoint not found", code="endpoint_not_found")
        return int(endpoint_id)

    @app.get("/api/admin/users/<name>/webhooks")
    def list_endpoints(name):
        admin_user()
        user = store.user_by_name(name)
        return {"endpoints": [endpoint_json(e) for e in store.webhook_endpoints(user["id"])]}

    @app.post("/api/admin/users/<name>/webhooks")
    def add_endpoint(name):
        admin_user()
        body = read_json(config.max_body)
        only_fields(body, ("url", "events"))
        url = check_webhook_url(body.get("url"), config.webhooks_private_ok)
        events = webhook_events(body.get("events"))
        user = store.user_by_name(name)
        endpoint, secret = store.add_webhook_endpoint(user["id"], url, events, now=clock())
        bottle.response.status = 201
        bottle.response.set_header("Cache-Control", "no-store")
        return {"endpoint": endpoint_json(endpoint), "secret": secret}

    @app.delete("/api/admin/users/<name>/webhooks/<endpoint_id>")
    def remove_endpoint(name, endpoint_id):
        admin_user()
        user = store.user_by_name(name)
        store.remove_webhook_endpoint(user["id"], endpoint_arg(endpoint_id), now=clock())
        return {"removed": True}

    @app.post("/api/admin/users/<name>/webhooks/<endpoint_id>/rotate")
    def rotate_endpoint(name, endpoint_id):
        admin_user()
        user = store.user_by_name(name)
        eid = endpoint_arg(endpoint_id)
        now = clock()
        secret = store.rotate_webhook_secret(user["id"], eid, now=now, overlap_s=config.webhook_secret_overlap_s)
        return {"secret": secret, "secrets": _secrets(store.webhook_secrets(user["id"], eid, now=now))}

    @app.post("/api/admin/users/<name>/webhooks/<endpoint_id>/enable")
    def enable_endpoint(name, endpoint_id):
        admin_user()
        user = store.user_by_name(name)
        endpoint = store.set_webhook_endpoint_enabled(user["id"], endpoint_arg(endpoint_id), True, now=clock())
        return {"endpoint": endpoint_json(endpoint)}


def _secrets(rows):
    # Answers that carry secrets are not for any cache.
    bottle.response.set_header("Cache-Control", "no-store")
    return [{"secret": r["secret"], "expires_at": iso(r["expires_at"])} for r in rows]
