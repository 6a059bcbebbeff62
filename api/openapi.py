"""GET /openapi.json: holdfast's HTTP API described as OpenAPI 3.1.

Written by hand, next to the routes in tasks.py, accounts.py, admin.py,
streams.py, callbacks.py and service.py; tests/test_openapi.py fails when a route is missing here (or
described here but gone), and fuzzes a real server against this description
with schemathesis.
"""

VERSION = "1.0.0"

_ERROR = {"$ref": "#/components/schemas/Error"}
_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}


def _error(description):
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def _json(schema, description="OK"):
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required, properties, extra=False):
    return {"type": "object", "required": list(required), "properties": properties,
            "additionalProperties": extra}


ERRORS = {
    "400": _error("bad input: the body, a parameter or a field (nothing changed)"),
    "401": _error("missing or unknown token"),
    "402": _error("not enough credits for this task (insufficient_credits)"),
    "403": _error("an admin token is required"),
    "404": _error("not found (another user's resource looks the same as a missing one)"),
    "405": _error("method not allowed"),
    "409": _error("conflict with the resource's state"),
    "413": _error("request body over HOLDFAST_MAX_BODY"),
    "429": {**_error("rate limit, active-task limit or full queue; see Retry-After"),
            "headers": {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}}},
    "503": _error("the store or the event streams cannot serve now"),
}


def _errors(*codes):
    return {code: {"$ref": f"#/components/responses/E{code}"} for code in codes}


TASK_ID = {"name": "task_id", "in": "path", "required": True,
           "schema": {"type": "string", "pattern": "^t_[0-9A-Z]{26}$"},
           "description": "`t_` and a 26-character ULID"}
SESSION_KEY = {"name": "key", "in": "path", "required": True,
               "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"},
               "description": "1-128 letters, digits and `_ . : @ -`, starting with a letter or digit"}
_STATUS = "(queued|running|succeeded|partial|failed|cancelled)"
_SSE_EVENT = {"type": "object", "description": "one Server-Sent Event: `data` is an Event as JSON text "
              "(the first, `ready`, carries the starting cursor)",
              "properties": {"event": {"type": "string"}, "data": {"type": "string"},
                             "id": {"type": "string"}, "retry": {"type": "integer"}}}
TOKEN_QUERY = {"name": "token", "in": "query", "required": False, "schema": {"type": "string"},
               "description": "the bearer token, for clients that cannot set headers (EventSource, <img>)"}
BODY_TOO = ("400", "401", "413")

SCHEMAS = {
    "Error": _obj(["error"], {"error": _obj(["code", "message"], {
        "code": {"type": "string", "examples": ["invalid_input", "task_not_found"]},
        "message": {"type": "string"}})}),
    "TaskFile": _obj(["name", "size", "sha256", "content_type", "url"], {
        "name": {"type": "string"}, "size": {"type": "integer", "minimum": 0},
        "sha256": {"type": "string"}, "content_type": {"type": "string"},
        "url": {"type": "string"}}),
    "Task": _obj(
        ["id", "provider", "status", "step", "progress", "dedupe_key", "params", "external_id",
         "attempts", "files", "error", "cost", "credits", "retry_of", "created_at", "updated_at",
         "started_at", "finished_at", "deadline_at", "version", "priority"], {
            "id": {"type": "string"}, "provider": {"type": "string"},
            "status": {"enum": ["queued", "running", "succeeded", "partial", "failed", "cancelled"]},
            "step": {"type": ["string", "null"]},
            "progress": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
            "dedupe_key": {"type": ["string", "null"]}, "params": {"type": "object"},
            "external_id": {"type": ["string", "null"]}, "attempts": {"type": "integer"},
            "files": {"type": "array", "items": _ref("TaskFile")},
            "error": {"oneOf": [{"type": "null"}, _obj(["code", "message"], {
                "code": {"enum": ["provider_rejected", "provider_unavailable", "timeout", "result_expired",
                                  "provider_lost", "submission_in_doubt", "invalid_result", "internal"]},
                "message": {"type": "string"}})]},
            "cost": {"type": "integer"},
            "credits": {"enum": ["none", "reserved", "charged", "refunded"],
                        "description": "what became of this task's `cost`: a settlement state, never an "
                                       "amount (`none`: nothing was reserved, the cost is 0 or the user has "
                                       "no credit limit). A user's balance is `credits` of GET /api/me, an "
                                       "object"},
            "retry_of": {"type": ["string", "null"]},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
            "started_at": _NULLABLE_TIME, "finished_at": _NULLABLE_TIME,
            "deadline_at": {"type": "string", "format": "date-time"},
            "version": {"type": "integer", "minimum": 1},
            "priority": {"type": "integer"}}),
    "SubmitRequest": _obj(["provider"], {
        "provider": {"type": "string", "examples": ["demo"]},
        "params": {"type": "object", "examples": [{"prompt": "a red fox"}]},
        "dedupe_key": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,200}$"},
        "webhook": {"type": "string", "format": "uri", "maxLength": 2000,
                    "description": "http(s) URL that receives this task's events (see `webhooks`); a host "
                                   "that resolves to a loopback, private or link-local address is refused "
                                   "(invalid_webhook) unless HOLDFAST_WEBHOOK_ALLOW_PRIVATE=1"},
        "webhook_events": {"type": "array", "minItems": 1, "uniqueItems": True,
                           "items": {"enum": ["created", "running", "progress", "finished"]},
                           "default": ["finished"]},
        "priority": {"type": "integer", "minimum": -1000, "maximum": 1000, "default": 0,
                     "description": "higher first among the caller's own tasks waiting for a provider's "
                                    "slots (users share scarce slots fairly before priority counts); "
                                    "at most the caller's max_priority (GET /api/me), else 400 "
                                    "priority_not_allowed"}}),
    "TaskAnswer": _obj(["task", "deduplicated"], {"task": _ref("Task"), "deduplicated": {"type": "boolean"}}),
    "OneTask": _obj(["task"], {"task": _ref("Task")}),
    "TaskPage": _obj(["tasks", "next"], {"tasks": {"type": "array", "items": _ref("Task")},
                                         "next": {"type": ["string", "null"]}}),
    "Credits": {"oneOf": [{"type": "null"}, _obj(["balance", "reserved"], {
        "balance": {"type": "integer", "description": "credits the user can spend now"},
        "reserved": {"type": "integer", "description": "credits held by the user's unfinished tasks"}})],
                "description": "a user's credit amounts; null for a user without a credit limit. Not "
                               "the `credits` of a task, which is the settlement state of its cost"},
    "Me": _obj(["user", "credits", "limits", "usage"], {
        "user": _obj(["name", "admin"], {"name": {"type": "string"}, "admin": {"type": "boolean"}}),
        "credits": _ref("Credits"),
        "limits": {"type": "object", "additionalProperties": {"type": "number"}},
        "usage": _obj(["active"], {"active": {"type": "integer"}})}),
    "Provider": _obj(["name", "type", "limits", "health"], {
        "name": {"type": "string"}, "type": {"type": "string"},
        "limits": {"type": "object"},
        "health": _obj(["ok", "checked_at", "error", "last_ok_at", "last_error_at", "last_error_code",
                        "consecutive_failures"], {
            "ok": {"type": ["boolean", "null"],
                   "description": "no call has failed since the provider last answered; null: no worker "
                                  "has called it yet"},
            "checked_at": _NULLABLE_TIME,
            "error": {"type": ["string", "null"], "description": "the last failure's message, while it fails"},
            "last_ok_at": _NULLABLE_TIME, "last_error_at": _NULLABLE_TIME,
            "last_error_code": {"type": ["string", "null"], "enum": ["provider_unavailable", "internal", None],
                                "description": "provider_unavailable: unreachable, no answer, or 408/429/5xx; "
                                               "internal: the adapter failed"},
            "consecutive_failures": {"type": "integer", "minimum": 0}})}),
    "Health": _obj(["ok", "store", "scheduler", "queue_depth", "oldest_active_s"], {
        "ok": {"type": "boolean"}, "store": {"type": "string"},
        "scheduler": {"enum": ["running", "stopped", "off"]},
        "queue_depth": {"type": ["integer", "null"]}, "oldest_active_s": {"type": ["number", "null"]},
        "streams": _obj(["sse", "poll", "max"], {"sse": {"type": "integer"}, "poll": {"type": "integer"},
                                                 "max": {"type": "integer"}}),
        "slow_down": {"type": "object", "description": "whether this process's worker is behind on polls "
                      "and stretches the polls of its oldest running tasks (active), since when, and how "
                      "late the oldest due poll was at the last tick (poll_lag_s)"}}),
    "Message": _obj(["role", "content"], {
        "role": {"enum": ["system", "user", "assistant", "tool"]},
        "content": {"type": "string", "maxLength": 16000}}),
    "Session": _obj(["key", "messages", "data", "updated_at", "expires_at"], {
        "key": {"type": "string"}, "messages": {"type": "array", "items": _ref("Message"), "maxItems": 40},
        "data": {"type": ["object", "null"]},
        "updated_at": {"type": "string", "format": "date-time"},
        "expires_at": {"type": "string", "format": "date-time"}}),
    "SessionAnswer": _obj(["session", "dropped"], {"session": _ref("Session"),
                                                   "dropped": {"type": "integer", "minimum": 0}}),
    "User": _obj(["name", "admin", "credits", "max_active", "rate_per_s", "max_priority", "created_at"], {
        "name": {"type": "string"}, "admin": {"type": "boolean"}, "credits": _ref("Credits"),
        "max_active": {"type": ["integer", "null"]}, "rate_per_s": {"type": ["number", "null"]},
        "max_priority": {"type": "integer"}, "created_at": _NULLABLE_TIME}),
    "TimelineEvent": _obj(["seq", "type", "at", "status", "step", "progress", "attempts", "error", "credits",
                           "version"], {
        "seq": {"type": "integer"}, "type": {"enum": ["created", "updated", "finished"]},
        "at": {"type": "string", "format": "date-time"},
        "status": {"enum": ["queued", "running", "succeeded", "partial", "failed", "cancelled"]},
        "step": {"type": ["string", "null"]}, "progress": {"type": ["number", "null"]},
        "attempts": {"type": "integer"}, "error": {"type": ["object", "null"]},
        "credits": {"enum": ["none", "reserved", "charged", "refunded"]},
        "version": {"type": "integer"}}),
    "Timeline": _obj(["events", "truncated"], {
        "events": {"type": "array", "items": _ref("TimelineEvent"), "maxItems": 500},
        "truncated": {"type": "boolean", "description": "older events than these were left out"}}),
    "Event": _obj(["seq", "task_id", "type", "task"], {
        "seq": {"type": "integer"}, "task_id": {"type": "string"},
        "type": {"enum": ["created", "updated", "finished"]}, "task": _ref("Task")}),
}

_BEARER = [{"bearer": []}]
_BEARER_OR_QUERY = [{"bearer": []}, {"query_token": []}]


def _op(summary, responses, *, security=_BEARER, params=(), body=None, tags=("tasks",), errors=()):
    op = {"summary": summary, "tags": list(tags), "responses": {**responses, **_errors(*errors)}}
    if security is not None:
        op["security"] = security
        op["responses"].update(_errors("401"))
    else:
        op["security"] = []
    if params:
        op["parameters"] = list(params)
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


PATHS = {
    "/api/tasks": {
        "post": _op(
            "Submit a task, or find the caller's live task with the same dedupe key",
            {"201": _json(_ref("TaskAnswer"), "created"),
             "200": _json(_ref("TaskAnswer"), "deduplicated: the existing task")},
            params=[{"name": "Idempotency-Key", "in": "header", "required": False,
                     "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,200}$"},
                     "description": "the same as dedupe_key"}],
            body=_ref("SubmitRequest"), errors=(*BODY_TOO, "402", "429")),
        "get": _op(
            "The caller's tasks, newest first",
            {"200": _json(_ref("TaskPage"))},
            params=[{"name": "status", "in": "query",
                     "schema": {"type": "string",
                                "pattern": f"^(active|terminal|{_STATUS}(,{_STATUS}){{0,5}})?$"},
                     "description": "comma-separated statuses, or active or terminal"},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                "maximum": 200, "default": 50}},
                    {"name": "before", "in": "query", "schema": {"type": "string",
                                                                 "pattern": "^(t_[0-9A-Z]{26})?$"},
                     "description": "`next` of the previous page"},
                    {"name": "retry_of", "in": "query", "schema": {"type": "string",
                                                                   "pattern": "^(t_[0-9A-Z]{26})?$"},
                     "description": "only the tasks that retry this task (their `retry_of`)"}],
            errors=("400",)),
    },
    "/api/tasks/{task_id}": {
        "get": _op("One task", {"200": _json(_ref("OneTask"))}, params=[TASK_ID], errors=("404",)),
    },
    "/api/tasks/{task_id}/events": {
        "get": _op("The task's timeline: its newest 500 events at most, oldest first, each with what the "
                   "task was after it",
                   {"200": _json(_ref("Timeline"))}, params=[TASK_ID], errors=("404",)),
    },
    "/api/tasks/{task_id}/cancel": {
        "post": _op("Cancel an active task (credits refunded)", {"200": _json(_ref("OneTask"))},
                    params=[TASK_ID], errors=("404", "409")),
    },
    "/api/tasks/{task_id}/retry": {
        "post": _op("A new task with the same provider and params as a failed or cancelled one; "
                    "while an earlier retry of it is not failed or cancelled, that retry",
                    {"201": _json(_ref("TaskAnswer"), "created"),
                     "200": _json(_ref("TaskAnswer"), "deduplicated: its live retry (or the live task "
                                  "with its dedupe key)")},
                    params=[TASK_ID], errors=("400", "402", "404", "409", "429")),
    },
    "/api/tasks/{task_id}/files/{name}": {
        "get": _op("A stored result file, with its content type; 404 `file_expired` once retention "
                   "deleted it (HOLDFAST_KEEP_FILES_H after the task ended)",
                   {"200": {"description": "the file", "content": {"*/*": {
                       "schema": {"type": "string", "format": "binary"}}}},
                    "302": {"description": "with HOLDFAST_FILES=s3://...: a presigned link to the file "
                                           "in the bucket, valid HOLDFAST_S3_PRESIGN_S seconds",
                            "headers": {"Location": {"schema": {"type": "string"}}}}},
                   security=_BEARER_OR_QUERY,
                   params=[TASK_ID, {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                           TOKEN_QUERY],
                   errors=("404",)),
    },
    "/api/events": {
        "get": _op(
            "Server-Sent Events for the caller's tasks; each stream ends after HOLDFAST_SSE_MAX_S",
            {"200": {"description": "an event stream: `id:` is the event seq, `data:` an Event",
                     "content": {"text/event-stream": {"schema": _SSE_EVENT}}},
             "503": {"description": "too many streams are open: use /api/events/poll or retry later",
                     "headers": {"Retry-After": {"schema": {"type": "string"}}},
                     "content": {"application/json": {"schema": _ERROR},
                                 "text/event-stream": {"schema": _SSE_EVENT}}}},
            security=_BEARER_OR_QUERY, tags=("events",),
            params=[{"name": "since", "in": "query", "schema": {"type": "string", "pattern": "^([0-9]{1,18})?$"}},
                    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}}, TOKEN_QUERY],
            errors=("400",)),
    },
    "/api/events/poll": {
        "get": _op(
            "The same events as JSON, long-polling up to `wait` seconds",
            {"200": _json(_obj(["events", "next"], {"events": {"type": "array", "items": _ref("Event")},
                                                    "next": {"type": "integer"}}))},
            tags=("events",),
            params=[{"name": "since", "in": "query", "schema": {"type": "string", "pattern": "^([0-9]{1,18})?$"}},
                    {"name": "wait", "in": "query",
                     "schema": {"type": "string",
                                "pattern": "^((1?[0-9]|2[0-4])(\\.[0-9]{1,3})?|25(\\.0{1,3})?)?$"},
                     "description": "seconds, at most 25"}],
            errors=("400",)),
    },
    "/api/callbacks/{provider}/{token}": {
        "post": _op(
            "A provider's callback (KIE's `callBackUrl`, sent when HOLDFAST_PUBLIC_URL is set): no bearer "
            "token; checked by the per-task token in the path and, when the provider's table names "
            "`callback_key_env`, by KIE's signature (`X-Webhook-Timestamp`, `X-Webhook-Signature` = base64 "
            "HMAC-SHA256 of `taskId.timestamp`, within 5 minutes). A hint only: the body is read for its "
            "taskId alone, and holdfast asks the provider for the job's state itself. Unknown, replayed "
            "(the task ended) or mismatched callbacks are 404, a bad signature 401; neither changes anything",
            {"200": _json(_obj(["ok"], {"ok": {"const": True}}), "noted: the task's next poll is due now"),
             "503": {**_error("the task is held by a worker for a moment: send it again"),
                     "headers": {"Retry-After": {"schema": {"type": "string"}}}}},
            security=None, tags=("callbacks",),
            params=[{"name": "provider", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "token", "in": "path", "required": True,
                     "schema": {"type": "string"}, "description": "`<task id>.<random>`, from the callback URL"},
                    {"name": "X-Webhook-Timestamp", "in": "header", "required": False,
                     "schema": {"type": "string"}},
                    {"name": "X-Webhook-Signature", "in": "header", "required": False,
                     "schema": {"type": "string"}}],
            body={"type": "object", "description": "the provider's job record, e.g. KIE's "
                  "`{\"code\", \"msg\", \"data\": {\"taskId\", \"state\", ...}}`; at most 64 KiB"},
            errors=("400", "401", "404", "413")),
    },
    "/api/me": {
        "get": _op("The caller, their credits and limits", {"200": _json(_ref("Me"))}, tags=("accounts",)),
    },
    "/api/providers": {
        "get": _op("Configured providers, their limits and health",
                   {"200": _json(_obj(["providers"], {"providers": {"type": "array",
                                                                    "items": _ref("Provider")}}))},
                   tags=("service",)),
    },
    "/api/sessions/{key}": {
        "get": _op("A live conversation session", {"200": _json(_obj(["session"], {"session": _ref("Session")}))},
                   params=[SESSION_KEY], tags=("sessions",), errors=("400", "404")),
        "put": _op("Replace (or create) a session; keeps the newest 40 messages",
                   {"200": _json(_ref("SessionAnswer"))}, params=[SESSION_KEY], tags=("sessions",),
                   body=_obj([], {"messages": {"type": "array", "items": _ref("Message")},
                                  "data": {"type": ["object", "null"]}}),
                   errors=(*BODY_TOO, "409")),
        "delete": _op("Delete a session", {"204": {"description": "deleted"}}, params=[SESSION_KEY],
                      tags=("sessions",), errors=("400", "404")),
    },
    "/api/sessions/{key}/messages": {
        "post": _op("Append one message, or {\"messages\": [...]}, to a session (created if missing)",
                    {"200": _json(_ref("SessionAnswer"))}, params=[SESSION_KEY], tags=("sessions",),
                    body={"oneOf": [_ref("Message"),
                                    _obj(["messages"], {"messages": {"type": "array", "items": _ref("Message"),
                                                                     "minItems": 1}})]},
                    errors=(*BODY_TOO, "409")),
    },
    "/api/admin/users": {
        "post": _op("Create a user; the token is shown only here",
                    {"201": _json(_obj(["user", "token"], {"user": _ref("User"), "token": {"type": "string"}}),
                                  "created")},
                    tags=("admin",),
                    body=_obj(["name"], {"name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
                                         "credits": {"type": ["integer", "null"], "minimum": 0,
                                                     "maximum": 10 ** 9,
                                                     "description": "the starting balance; null or absent: "
                                                                    "no credit limit"},
                                         "admin": {"type": "boolean"},
                                         "max_active": {"type": ["integer", "null"], "minimum": 1,
                                                        "maximum": 100_000},
                                         "rate_per_s": {"type": ["number", "null"], "exclusiveMinimum": 0,
                                                        "maximum": 10_000},
                                         "max_priority": {"type": ["integer", "null"], "minimum": 0,
                                                          "maximum": 1000}}),
                    errors=(*BODY_TOO, "403", "409")),
    },
    "/api/admin/users/{name}": {
        "patch": _op("Change a user's max_priority: the highest priority their tasks may have",
                     {"200": _json(_obj(["user"], {"user": _ref("User")}))},
                     tags=("admin",),
                     params=[{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                     body=_obj(["max_priority"], {"max_priority": {"type": ["integer", "null"], "minimum": 0,
                                                                   "maximum": 1000}}),
                     errors=(*BODY_TOO, "403", "404")),
    },
    "/api/admin/users/{name}/credits": {
        "post": _op("Grant credits (negative takes them away, never below zero). With an Idempotency-Key, "
                    "the grant is made once per key and user, however often it is sent; the same key with "
                    "another amount is a 409 idempotency_key_reused",
                    {"200": _json(_obj(["user", "granted"], {"user": _ref("User"), "granted": {"type": "integer"}}))},
                    tags=("admin",),
                    params=[{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                            {"name": "Idempotency-Key", "in": "header", "required": False,
                             "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,200}$"}}],
                    body=_obj(["amount"], {"amount": {"type": "integer", "minimum": -10 ** 9,
                                                      "maximum": 10 ** 9, "not": {"const": 0}}}),
                    errors=(*BODY_TOO, "403", "404", "409")),
    },
    "/api/admin/tasks": {
        "get": _op("Active tasks of every user; with stuck=1 only those that look stuck",
                   {"200": _json(_obj(["now", "tasks"], {"now": {"type": "string"}, "tasks": {
                       "type": "array", "items": _obj(
                           ["task", "user", "stuck", "lease_owner", "lease_expires_at", "next_poll_at"], {
                               "task": _ref("Task"), "user": {"type": ["string", "null"]},
                               "stuck": {"type": "array", "items": {
                                   "enum": ["past_deadline", "lease_expired", "poll_overdue"]}},
                               "lease_owner": {"type": ["string", "null"]},
                               "lease_expires_at": _NULLABLE_TIME, "next_poll_at": _NULLABLE_TIME})}}))},
                   tags=("admin",),
                   params=[{"name": "stuck", "in": "query", "schema": {"enum": ["0", "1"]}},
                           {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                       "maximum": 500}},
                           {"name": "grace_s", "in": "query", "schema": {"type": "number", "minimum": 0,
                                                                         "maximum": 86400}}],
                   errors=("400", "403")),
    },
    "/healthz": {
        "get": _op("Store, scheduler, queue depth and oldest active task; 503 when not ok",
                   {"200": _json(_ref("Health")), "503": _json(_ref("Health"), "not ok")},
                   security=None, tags=("service",)),
    },
    "/metrics": {
        "get": _op("Counters and gauges in Prometheus' text format",
                   {"200": {"description": "Prometheus text format 0.0.4",
                            "content": {"text/plain": {"schema": {"type": "string"}}}}},
                   security=None, tags=("service",)),
    },
    "/openapi.json": {
        "get": _op("This description", {"200": _json({"type": "object"})}, security=None, tags=("service",)),
    },
    "/": {
        "get": _op("The web page", {"200": {"description": "HTML",
                                            "content": {"text/html": {"schema": {"type": "string"}}}}},
                   security=None, tags=("page",)),
    },
    "/static/{path}": {
        "get": _op("The page's scripts and styles",
                   {"200": {"description": "a static file", "content": {"*/*": {"schema": {"type": "string"}}}}},
                   security=None, tags=("page",),
                   params=[{"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}],
                   errors=("404",)),
    },
}


# -- webhooks out ----------------------------------------------------------------

_ENDPOINT_ID = {"name": "endpoint_id", "in": "path", "required": True, "schema": {"type": "string",
                                                                               "pattern": "^[0-9]{1,12}$"}}
_USER_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_EVENTS = {"type": "array", "items": {"enum": ["created", "running", "progress", "finished"]}}
_SECRETS = {"type": "array", "items": _obj(["secret", "expires_at"], {
    "secret": {"type": "string", "pattern": "^whsec_"}, "expires_at": _NULLABLE_TIME})}
SCHEMAS.update({
    "Delivery": _obj(
        ["id", "task_id", "endpoint_id", "url", "type", "state", "attempts", "last_status", "last_error",
         "log", "next_try_at", "created_at", "updated_at"], {
            "id": {"type": "string", "description": "the message's `webhook-id`, the same at every attempt"},
            "task_id": {"type": "string"}, "endpoint_id": {"type": ["integer", "null"]},
            "url": {"type": "string"},
            "type": {"enum": ["task.created", "task.running", "task.progress", "task.finished"]},
            "state": {"enum": ["pending", "succeeded", "failed", "cancelled"]},
            "attempts": {"type": "integer"}, "last_status": {"type": ["integer", "null"]},
            "last_error": {"type": ["string", "null"]},
            "log": {"type": "array", "description": "the latest attempts", "items": _obj(
                ["at", "status", "error", "took_ms"], {"at": {"type": "string"},
                                                       "status": {"type": ["integer", "null"]},
                                                       "error": {"type": ["string", "null"]},
                                                       "took_ms": {"type": ["integer", "null"]}})},
            "next_try_at": _NULLABLE_TIME, "created_at": {"type": "string"}, "updated_at": {"type": "string"}}),
    "Endpoint": _obj(["id", "url", "events", "created_at", "disabled_at", "disabled_reason"], {
        "id": {"type": "integer"}, "url": {"type": "string"}, "events": _EVENTS,
        "created_at": {"type": "string"}, "disabled_at": _NULLABLE_TIME,
        "disabled_reason": {"type": ["string", "null"]}}),
    "WebhookMessage": _obj(["type", "timestamp", "data"], {
        "type": {"enum": ["task.created", "task.running", "task.progress", "task.finished"]},
        "timestamp": {"type": "string", "format": "date-time"},
        "data": _obj(["task"], {"task": _ref("Task")})}),
})
PATHS.update({
    "/api/webhooks/deliveries": {
        "get": _op("The caller's webhook deliveries (of one task with task_id), oldest first",
                   {"200": _json(_obj(["deliveries"], {"deliveries": {"type": "array",
                                                                      "items": _ref("Delivery")}}))},
                   tags=("webhooks",), errors=("404",),
                   params=[{"name": "task_id", "in": "query", "schema": {"type": "string"}}]),
    },
    "/api/webhooks/deliveries/{delivery_id}/retry": {
        "post": _op("Send a delivery again (a new round of tries, the same webhook-id)",
                    {"200": _json(_obj(["delivery"], {"delivery": _ref("Delivery")}))}, tags=("webhooks",),
                    params=[{"name": "delivery_id", "in": "path", "required": True,
                             "schema": {"type": "string"}}], errors=("404", "409")),
    },
    "/api/webhooks/secret": {
        "get": _op("The secrets that sign the caller's tasks' own webhook URLs (made at first use)",
                   {"200": _json(_obj(["secrets"], {"secrets": _SECRETS}))}, tags=("webhooks",)),
    },
    "/api/webhooks/secret/rotate": {
        "post": _op("A new task webhook secret; the old ones sign too until HOLDFAST_WEBHOOK_SECRET_OVERLAP_S",
                    {"200": _json(_obj(["secret", "secrets"], {"secret": {"type": "string"},
                                                               "secrets": _SECRETS}))}, tags=("webhooks",)),
    },
    "/api/admin/users/{name}/webhooks": {
        "get": _op("A user's default webhook endpoints", {"200": _json(_obj(["endpoints"], {
            "endpoints": {"type": "array", "items": _ref("Endpoint")}}))}, tags=("admin",), params=[_USER_NAME],
                   errors=("403", "404")),
        "post": _op("Add a default endpoint for every task of the user; its secret is shown only here",
                    {"201": _json(_obj(["endpoint", "secret"], {"endpoint": _ref("Endpoint"),
                                                                "secret": {"type": "string"}}), "created")},
                    tags=("admin",), params=[_USER_NAME],
                    body=_obj(["url"], {"url": {"type": "string", "format": "uri", "maxLength": 2000},
                                        "events": {**_EVENTS, "minItems": 1, "default": ["finished"]}}),
                    errors=(*BODY_TOO, "403", "404", "409")),
    },
    "/api/admin/users/{name}/webhooks/{endpoint_id}": {
        "delete": _op("Remove an endpoint (its pending deliveries are cancelled)",
                      {"200": _json(_obj(["removed"], {"removed": {"type": "boolean"}}))}, tags=("admin",),
                      params=[_USER_NAME, _ENDPOINT_ID], errors=("403", "404")),
    },
    "/api/admin/users/{name}/webhooks/{endpoint_id}/rotate": {
        "post": _op("A new secret for the endpoint, shown only here; the old one signs too for the overlap",
                    {"200": _json(_obj(["secret", "secrets"], {"secret": {"type": "string"},
                                                               "secrets": _SECRETS}))}, tags=("admin",),
                    params=[_USER_NAME, _ENDPOINT_ID], errors=("403", "404")),
    },
    "/api/admin/users/{name}/webhooks/{endpoint_id}/enable": {
        "post": _op("Enable an endpoint again (after a 410 Gone)",
                    {"200": _json(_obj(["endpoint"], {"endpoint": _ref("Endpoint")}))}, tags=("admin",),
                    params=[_USER_NAME, _ENDPOINT_ID], errors=("403", "404")),
    },
})
# -- the operator console (api/admin.py) ---------------------------------------------

_NUM_OR_NULL = {"type": ["number", "null"]}
_SERIES = {"type": "array", "items": _NUM_OR_NULL}
_LEVEL = {"enum": ["ok", "warn", "alert", None]}
_TASK_ID_PATTERN = "^t_[0-9A-Z]{26}$"
SCHEMAS.update({
    "AdminUser": _obj(["name", "admin", "credits", "limits", "active", "created_at"], {
        "name": {"type": "string"}, "admin": {"type": "boolean"}, "credits": _ref("Credits"),
        "limits": _obj(["max_active", "rate_per_s", "max_priority"], {
            "max_active": {"type": "integer"}, "rate_per_s": {"type": "number"},
            "max_priority": {"type": "integer"}}),
        "active": {"type": "integer"}, "created_at": _NULLABLE_TIME}),
    "ProviderDays": _obj(["outcomes", "success_rate", "p50_s", "p95_s", "failures"], {
        "outcomes": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "integer"}}},
        "success_rate": _SERIES, "p50_s": _SERIES, "p95_s": _SERIES,
        "failures": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "integer"}}}}),
    "BulkResult": _obj(["action", "requested", "outcomes", "results", "replayed"], {
        "action": {"enum": ["cancel", "retry"]}, "requested": {"type": "integer"},
        "outcomes": {"type": "object", "additionalProperties": {"type": "integer"}},
        "results": {"type": "array", "items": {"type": "object", "required": ["id", "outcome"], "properties": {
            "id": {"type": "string"}, "outcome": {"enum": ["cancelled", "not_active", "not_found", "retried",
                                                            "already_retried", "not_retryable", "refused"]},
            "retry": {"type": "string"}, "status": {"type": "string"}, "code": {"type": "string"},
            "message": {"type": "string"}}}},
        "replayed": {"type": "boolean"}}),
})
PATHS["/api/admin/users"]["get"] = _op(
    "Every user with balance, reserved credits, limits (their own or the server's) and active tasks",
    {"200": _json(_obj(["users"], {"users": {"type": "array", "items": _ref("AdminUser")}}))},
    tags=("admin",), errors=("400", "403"))
PATHS.update({
    "/api/admin/stats": {
        "get": _op("The console's figures: tasks by provider and status now; per provider and UTC day "
                   "(from task_history) tasks by outcome, success rate (succeeded over succeeded, partial "
                   "and failed), p50/p95 duration and failures by error code; live poll lag, queue, oldest "
                   "active task, streams, webhook deliveries; the warning and alert thresholds",
                   {"200": _json({"type": "object", "required": [
                       "now", "thresholds", "days", "day_starts", "counts", "history", "providers", "live"],
                       "properties": {
                           "now": {"type": "string"}, "days": {"type": "array", "items": {"type": "string"}},
                           "day_starts": {"type": "array", "items": {"type": "number"}},
                           "thresholds": {"type": "object"},
                           "counts": {"type": "array", "items": _obj(["provider", "status", "tasks"], {
                               "provider": {"type": "string"}, "status": {"type": "string"},
                               "tasks": {"type": "integer"}})},
                           "history": {"type": "object", "additionalProperties": _ref("ProviderDays")},
                           "providers": {"type": "array", "items": {"type": "object", "required": [
                               "name", "configured", "health", "tasks", "success_rate_today", "level"],
                               "properties": {"level": _LEVEL, "success_rate_today": _NUM_OR_NULL}}},
                           "live": {"type": "object", "required": [
                               "poll_lag_s", "poll_lag_level", "queue_depth", "active", "oldest_active_s",
                               "oldest_active", "streams", "webhooks", "scheduler"],
                               "properties": {"poll_lag_level": _LEVEL}}}})},
                   tags=("admin",), errors=("400", "403"),
                   params=[{"name": "days", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                      "maximum": 90}}]),
    },
    "/api/admin/tasks/search": {
        "get": _op("Every user's tasks, newest first, by filters and text (a task id, a dedupe key, or "
                   "words in the params); `total` (with count=1) counts all that match",
                   {"200": _json(_obj(["tasks", "next", "total"], {
                       "tasks": {"type": "array", "items": _obj(["task", "user"], {
                           "task": _ref("Task"), "user": {"type": ["string", "null"]}})},
                       "next": {"type": ["string", "null"]}, "total": {"type": ["integer", "null"]}}))},
                   tags=("admin",), errors=("400", "403"),
                   params=[{"name": "status", "in": "query", "schema": {"type": "string"},
                            "description": "statuses, comma-separated"},
                           {"name": "provider", "in": "query", "schema": {"type": "string"}},
                           {"name": "user", "in": "query", "schema": {"type": "string"},
                            "description": "a user's name"},
                           {"name": "error", "in": "query", "schema": {"type": "string"},
                            "description": "an error code"},
                           {"name": "since", "in": "query", "schema": {"type": "string"},
                            "description": "created at or after: ISO 8601, a date, or Unix seconds"},
                           {"name": "until", "in": "query", "schema": {"type": "string"},
                            "description": "created before"},
                           {"name": "q", "in": "query", "schema": {"type": "string", "maxLength": 200}},
                           {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                       "maximum": 200}},
                           {"name": "before", "in": "query", "schema": {"type": "string",
                                                                        "pattern": _TASK_ID_PATTERN}},
                           {"name": "count", "in": "query", "schema": {"enum": ["0", "1"]}}]),
    },
    "/api/admin/tasks/bulk": {
        "post": _op("Cancel or retry the named tasks of any user, each as its user would (credits, limits). "
                    "The same Idempotency-Key gets the first answer again; a retry skips a task that some "
                    "task retries already, so each task is retried once",
                    {"200": _json(_ref("BulkResult"))}, tags=("admin",),
                    params=[{"name": "Idempotency-Key", "in": "header", "required": True,
                             "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,200}$"}}],
                    body=_obj(["action", "ids"], {
                        "action": {"enum": ["cancel", "retry"]},
                        "ids": {"type": "array", "minItems": 1, "maxItems": 1000,
                                "items": {"type": "string", "pattern": _TASK_ID_PATTERN}}}),
                    errors=(*BODY_TOO, "403", "409")),
    },
    "/console": {
        "get": _op("The operator console (for admins: it shows nothing to anyone else)",
                   {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}},
                   security=None, tags=("page",)),
    },
})


WEBHOOKS = {
    f"task.{kind}": {"post": {
        "summary": summary,
        "description": "Standard Webhooks 1.0. Headers: `webhook-id` (the same at every attempt: dedupe on "
                       "it), `webhook-timestamp` (Unix seconds of the attempt), `webhook-signature` "
                       "(`v1,` + base64 HMAC-SHA256 of `id.timestamp.body` with the secret's base64-decoded "
                       "bytes, one per live secret, space-separated). Answer 2xx within 15 s; other "
                       "answers and timeouts are tried again for about a day (429 and 503 after "
                       "`Retry-After`); 410 disables the endpoint.",
        "parameters": [{"name": h, "in": "header", "required": True, "schema": {"type": "string"}}
                       for h in ("webhook-id", "webhook-timestamp", "webhook-signature")],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("WebhookMessage")}}},
        "responses": {"2XX": {"description": "received"},
                      "410": {"description": "gone: disable this endpoint"}}}}
    for kind, summary in (("created", "A task was accepted"), ("running", "A task's provider has it"),
                          ("progress", "A running task's step or progress changed (at most once a second)"),
                          ("finished", "A task ended: succeeded, partial, failed or cancelled"))
}


def spec():
    """The OpenAPI document (a new dict each call)."""
    import copy
    return {
        "openapi": "3.1.0",
        "info": {"title": "holdfast", "version": VERSION,
                 "description": "Durable AI-generation jobs. Every error is "
                                "`{\"error\": {\"code\", \"message\"}}` with a 4xx status."},
        "paths": copy.deepcopy(PATHS),
        "webhooks": copy.deepcopy(WEBHOOKS),
        "components": {
            "schemas": copy.deepcopy(SCHEMAS),
            "responses": {f"E{code}": response for code, response in copy.deepcopy(ERRORS).items()},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "query_token": {"type": "apiKey", "in": "query", "name": "token"},
            },
        },
    }
