"""A fake Replicate predictions API on 127.0.0.1.

Shapes follow Replicate's HTTP API reference (replicate.com/docs/reference/http):
  POST /v1/predictions {"version", "input"}                  -> 201 prediction
  POST /v1/models/{owner}/{name}/predictions {"input"}       -> 201 prediction
  GET  /v1/predictions/{id}                                  -> prediction, or 404 {"detail": "Not found."}
  POST /v1/predictions/{id}/cancel                           -> prediction
A prediction is {"id", "model", "version", "input", "logs", "output",
"error", "status", "created_at", "started_at", "completed_at", "urls":
{"get", "cancel"}}; status is starting, processing (logs grow, the last
line with a percentage), then succeeded (output), failed (error) or
canceled. Errors are problem details: {"title", "detail", "status"}; 401
without `Authorization: Bearer <key>`; 422 for an invalid body; 429 with
Retry-After when throttled.

`output_shape`: "list" (a list of file URLs, the default), "single" (one
URL), "nested" ({"images": [...]}) or "text" (a string, no file).
Counting and faults: see jobs.py.
"""

import re
from datetime import datetime, timezone

from . import json_response
from .jobs import JobsFake

_MODEL_PATH = re.compile(r"^/v1/models/([^/]+)/([^/]+)/predictions$")
_PREDICTION = re.compile(r"^/v1/predictions/([^/]+)(/cancel)?$")


def _iso(t):
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if t else None


class FakeReplicate(JobsFake):
    def __init__(self, *args, output_shape="list", **kwargs):
        super().__init__(*args, **kwargs)
        self.output_shape = output_shape

    def refusal(self, status, retry_after):
        return json_response({"title": "Request was throttled",
                              "detail": f"Request was throttled. Expected available in {retry_after} seconds.",
                              "status": status}, status, {"Retry-After": retry_after})

    def unauthorized(self):
        return json_response({"title": "Unauthenticated", "status": 401,
                              "detail": "You did not pass a valid authentication token"}, 401)

    def _invalid(self, detail):
        return json_response({"title": "Input validation failed", "status": 422, "detail": detail}, 422)

    def route(self, req):
        if req.method == "POST" and (req.path == "/v1/predictions" or _MODEL_PATH.match(req.path)):
            return self._create(req)
        match = _PREDICTION.match(req.path)
        if match and req.method == "GET" and not match.group(2):
            job = self.job(match.group(1))
            if job is None:
                return json_response({"detail": "Not found.", "status": 404}, 404)
            return json_response(self._prediction(job))
        if match and req.method == "POST" and match.group(2):
            job = self.cancel_job(match.group(1))
            if job is None:
                return json_response({"detail": "Not found.", "status": 404}, 404)
            return json_response(self._prediction(job))
        return None

    def _create(self, req):
        try:
            body = req.json()
        except ValueError:
            return self._invalid("the body is not valid JSON")
        if not isinstance(body, dict):
            return self._invalid("the body must be an object")
        model = _MODEL_PATH.match(req.path)
        if model is None and not isinstance(body.get("version"), str):
            return self._invalid("- version: Invalid type. Expected: string, given: null")
        if not isinstance(body.get("input"), dict):
            return self._invalid("- input: Invalid type. Expected: object")
        name = f"{model.group(1)}/{model.group(2)}" if model else "owner/model"
        return self.create(body["input"], lambda job: json_response(self._prediction(job), 201),
                           model=name, version=body.get("version") or "v1")

    def _prediction(self, job):
        phase = job.phase()
        done_at = job.created + job.seconds
        out = {"id": job.id, "model": job.extra["model"], "version": job.extra["version"], "input": job.input,
               "logs": "", "output": None, "error": None, "data_removed": False,
               "created_at": _iso(job.created), "started_at": None, "completed_at": None,
               "urls": {"get": f"{self.url}/v1/predictions/{job.id}",
                        "cancel": f"{self.url}/v1/predictions/{job.id}/cancel"}}
        if phase == "queued":
            out["status"] = "starting"
        elif phase == "running":
            out.update(status="processing", started_at=_iso(job.created + job.seconds / 3),
                       logs="Using seed: 42\nstep 1/2\n 50%|#####     | 1/2\n")
        elif phase == "cancelled":
            out.update(status="canceled", completed_at=_iso(job.created))
        elif job.fails:
            out.update(status="failed", completed_at=_iso(done_at), logs="Traceback ...\n",
                       error="CUDA out of memory (fake model asked to fail)")
        else:
            urls = self.file_urls(job)
            output = {"list": urls, "single": urls[0] if urls else None, "nested": {"images": urls},
                      "text": "a poem about a fox"}[self.output_shape]
            out.update(status="succeeded", completed_at=_iso(done_at), output=output,
                       logs="step 2/2\n100%|##########| 2/2\n", metrics={"predict_time": job.seconds})
        return out
