"""fal.ai's queue API: POST {url}/{model} (the model's input as the body)
-> request_id, status_url, response_url, cancel_url; GET
{url}/{owner}/{app}/requests/{id}/status -> IN_QUEUE (queue_position),
IN_PROGRESS (logs), COMPLETED (with `error` when it failed); the result from
GET .../requests/{id} (the response_url); PUT .../requests/{id}/cancel.

The status, response and cancel URLs are built from the model and the
request id, as fal documents them (a model's subpath, `fal-ai/flux/dev`, is
sent only with the submit), so the task keeps nothing but the id.
fal picks the request id itself: an in-doubt submit fails the task
`submission_in_doubt` unless `on_doubt = "resubmit"`.
"""

import re
from urllib.parse import quote

from errors import InDoubt, InvalidInput, InvalidResult, ProviderRejected, ProviderUnavailable

from .base import Status
from .http import HttpProvider
from .net import parse_json
from .results import message_of, outputs_from

_MODEL = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)+$")
MAX_STEP = 200


class FalProvider(HttpProvider):
    type = "fal"
    defaults = {**HttpProvider.defaults, "url": "https://queue.fal.run"}
    required = ("api_key_env",)
    auth_scheme = "Key"

    def validate(self, params):
        super().validate(params)
        unknown = set(params) - {"model", "input"}
        if unknown:
            raise InvalidInput(f"unknown params for a fal task: {', '.join(sorted(unknown))}")
        model = params.get("model")
        if not isinstance(model, str) or len(model) > 200 or not _MODEL.match(model):
            raise InvalidInput("params.model must be a fal model id, e.g. 'fal-ai/flux/dev'")
        if not isinstance(params.get("input"), dict):
            raise InvalidInput("params.input must be an object (the model's input)")

    def submit(self, task, now):
        params = task["params"]
        resp = self.call("POST", "/" + params["model"], what="submit", json=params["input"])
        if resp.status_code >= 400:
            raise ProviderRejected(f"fal refused the request: {_refusal(resp)}")
        body = self.json_of(resp, "submit")
        request_id = body.get("request_id") if isinstance(body, dict) else None
        if not isinstance(request_id, str) or not request_id:
            raise InDoubt(f"{self.name}: submit answered without a request_id")
        return request_id

    def _request_url(self, task, suffix=""):
        app = "/".join(task["params"]["model"].split("/")[:2])
        return f"/{app}/requests/{quote(task['external_id'], safe='')}{suffix}"

    def poll(self, task, now):
        if not isinstance(task.get("params"), dict) or not task["params"].get("model"):
            return Status.unknown()     # no model, no queue to ask: never a job of ours
        resp = self.call("GET", self._request_url(task, "/status"), what="status", params={"logs": "1"})
        if resp.status_code == 404:
            return Status.unknown()
        if resp.status_code not in (200, 202):
            raise ProviderUnavailable(f"{self.name}: status answered {message_of(resp, 'detail')}")
        body = self.json_of(resp, "status")
        if not isinstance(body, dict):
            raise ProviderUnavailable(f"{self.name}: status: not an object")
        state = body.get("status")
        if state == "IN_QUEUE":
            position = body.get("queue_position")
            return Status.queued(f"in queue, position {position}" if isinstance(position, int) else "in queue")
        if state == "COMPLETED":
            if body.get("error"):
                return Status.failed(_text(body["error"], body.get("error_type")))
            return self._result(task)
        return Status.running(_last_log(body.get("logs")) or "in progress")

    def _result(self, task):
        resp = self.call("GET", self._request_url(task), what="result")
        if resp.status_code == 404:
            return Status.unknown()
        if resp.status_code != 200:
            # The request ended with an error: the result is the model's refusal.
            return Status.failed(f"fal: {_refusal(resp)}")
        result = self.json_of(resp, "result")
        return Status.succeeded(outputs_from(result, max_file_bytes=self.max_file_bytes,
                                             max_outputs=self.max_outputs, what=f"{self.name} result"))

    def cancel(self, task):
        if task.get("external_id") and isinstance(task.get("params"), dict) and task["params"].get("model"):
            # 202 CANCELLATION_REQUESTED, 400 ALREADY_COMPLETED, 404 NOT_FOUND: all final.
            self.call("PUT", self._request_url(task, "/cancel"), what="cancel")


def _refusal(resp):
    """fal's words in an error answer: `detail` (text, or validation errors)."""
    try:
        body = parse_json(resp.content or b"null", "error answer")
    except (ValueError, InvalidResult):
        body = None
    if isinstance(body, dict) and body.get("detail"):
        return _text(body["detail"])
    return message_of(resp, "error", "message")


def _text(error, error_type=None):
    if isinstance(error, (dict, list)):
        error = message_of_value(error)
    text = str(error)
    if error_type:
        text += f" ({error_type})"
    return text[:2000]


def message_of_value(value):
    """fal's validation errors: [{"loc", "msg", "type"}, ...] -> their msgs."""
    items = value if isinstance(value, list) else [value]
    parts = [str(i.get("msg") or i.get("message") or i) if isinstance(i, dict) else str(i) for i in items]
    return "; ".join(parts)


def _last_log(logs):
    if not isinstance(logs, list):
        return None
    for entry in reversed(logs):
        message = entry.get("message") if isinstance(entry, dict) else None
        if isinstance(message, str) and message.strip():
            return message.strip().splitlines()[-1][:MAX_STEP]
    return None
