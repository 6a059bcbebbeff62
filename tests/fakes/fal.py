"""A fake fal.ai queue API on 127.0.0.1.

Shapes follow fal's Queue API reference (docs.fal.ai, "Queue"):
  POST /{owner}/{app}[/{subpath}]  (the model's input as the body)
       -> {"request_id", "response_url", "status_url", "cancel_url", "queue_position"}
  GET  /{owner}/{app}/requests/{id}/status[?logs=1]
       -> {"status": "IN_QUEUE", "queue_position", "response_url"}
        | {"status": "IN_PROGRESS", "logs": [{"message", "level", "timestamp"}], "response_url"}
        | {"status": "COMPLETED", "logs", "metrics", "response_url"} (+ "error", "error_type" when it failed)
  GET  /{owner}/{app}/requests/{id}  -> the model's output: {"images": [{"url",
       "content_type", "width", "height"}], "seed", ...}; 400 while it runs;
       a failed request answers its error (422 {"detail": [{"loc", "msg", "type"}]})
  PUT  /{owner}/{app}/requests/{id}/cancel  -> 202 {"status": "CANCELLATION_REQUESTED"},
       400 {"status": "ALREADY_COMPLETED"}, 404 {"status": "NOT_FOUND"}
Unknown request ids answer 404. `Authorization: Key <key>` is required (401
otherwise); 429 with Retry-After when throttled; an input that is not an
object is a 422 at submit.

`error_in_status` (default true): a failed request says so in its status;
false: only its response_url does (the status is a plain COMPLETED).
Counting and faults: see jobs.py.
"""

import re
from datetime import datetime, timezone

from . import json_response
from .jobs import JobsFake

_REQUEST = re.compile(r"^/([^/]+)/([^/]+)/requests/([^/]+)(/status|/cancel)?$")
FAIL_DETAIL = [{"loc": ["body", "prompt"], "msg": "the fake model refused the prompt", "type": "value_error"}]


class FakeFal(JobsFake):
    auth_prefix = "Key"

    def __init__(self, *args, error_in_status=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.error_in_status = error_in_status

    def unauthorized(self):
        return json_response({"detail": "Cannot access application: invalid key"}, 401)

    def route(self, req):
        match = _REQUEST.match(req.path)
        if match:
            owner, app, request_id, tail = match.groups()
            job = self.job(request_id)
            if tail == "/cancel" and req.method == "PUT":
                return self._cancel(request_id)
            if job is None or job.extra["app"] != f"{owner}/{app}":
                return json_response({"detail": "Request not found"}, 404)
            if tail == "/status" and req.method == "GET":
                return json_response(self._status(job, req.query.get("logs") == "1"))
            if tail is None and req.method == "GET":
                return self._response(job)
            return None
        parts = req.path.strip("/").split("/")
        if req.method == "POST" and len(parts) >= 2:
            try:
                body = req.json()
            except ValueError:
                body = None
            if not isinstance(body, dict):
                return json_response({"detail": [{"loc": ["body"], "msg": "Input should be an object",
                                                  "type": "model_attributes_type"}]}, 422)
            return self.create(body, self._submitted, app=f"{parts[0]}/{parts[1]}")
        return None

    def _urls(self, job):
        base = f"{self.url}/{job.extra['app']}/requests/{job.id}"
        return {"response_url": base, "status_url": base + "/status", "cancel_url": base + "/cancel"}

    def _submitted(self, job):
        return json_response({"request_id": job.id, **self._urls(job), "queue_position": 0})

    def _status(self, job, logs):
        phase = job.phase()
        urls = self._urls(job)
        if phase == "queued":
            return {"status": "IN_QUEUE", "queue_position": 2, "response_url": urls["response_url"]}
        lines = [{"message": "loading model", "level": "INFO", "timestamp": _now()},
                 {"message": "step 1/2", "level": "INFO", "timestamp": _now()}] if logs else None
        if phase == "running":
            return {"status": "IN_PROGRESS", "logs": lines, "response_url": urls["response_url"]}
        out = {"status": "COMPLETED", "logs": lines, "metrics": {"inference_time": job.seconds},
               "response_url": urls["response_url"]}
        if phase == "cancelled":
            out.update(error="Request was cancelled", error_type="request_cancelled")
        elif job.fails and self.error_in_status:
            out.update(error="the fake model refused the prompt", error_type="validation_error")
        return out

    def _response(self, job):
        phase = job.phase()
        if phase in ("queued", "running"):
            return json_response({"detail": "Request is still in progress"}, 400)
        if phase == "cancelled":
            return json_response({"detail": "Request was cancelled"}, 400)
        if job.fails:
            return json_response({"detail": FAIL_DETAIL}, 422)
        images = [{"url": url, "content_type": "image/png", "width": 16, "height": 16}
                  for url in self.file_urls(job)]
        return json_response({"images": images, "seed": 42, "has_nsfw_concepts": [False] * len(images),
                              "prompt": job.input.get("prompt")})

    def _cancel(self, request_id):
        job = self.job(request_id)
        if job is None:
            return json_response({"status": "NOT_FOUND"}, 404)
        if job.phase() == "done":
            self.cancel_job(request_id)
            return json_response({"status": "ALREADY_COMPLETED"}, 400)
        self.cancel_job(request_id)
        return json_response({"status": "CANCELLATION_REQUESTED"}, 202)


def _now():
    return datetime.now(timezone.utc).isoformat()
