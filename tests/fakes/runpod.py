"""A fake RunPod serverless endpoint on 127.0.0.1.

Shapes follow RunPod's queue-based endpoint operations (docs.runpod.io,
"Operation reference"):
  POST /v2/{endpoint}/run {"input"}     -> {"id", "status": "IN_QUEUE"}
  GET  /v2/{endpoint}/status/{id}       -> {"id", "status", "delayTime",
       "executionTime", "workerId", "output"} (status IN_QUEUE, IN_PROGRESS,
       COMPLETED, FAILED with "error", CANCELLED, TIMED_OUT); 404
       {"error": "request does not exist"} for an unknown id
  POST /v2/{endpoint}/cancel/{id}       -> {"id", "status": "CANCELLED"}
`Authorization: Bearer <key>` is required (401 otherwise); 429 with
Retry-After when throttled; a body without an `input` object is a 400.

The handler's output, by `output_shape`: "urls" ({"images": [URL, ...]},
the default), "comfyui" (worker-comfyui's {"images": [{"filename", "type":
"base64", "data"}]}), "data_url" ({"image": "data:image/png;base64,..."}),
"raw" ({"image": "<base64>"}) or "text" ({"text": "..."}). A job whose
input has "timeout": true ends TIMED_OUT. Counting and faults: see jobs.py.
"""

import base64
import re

from . import json_response
from .jobs import JobsFake

_PATH = re.compile(r"^/v2/([^/]+)/(run|status|cancel)(?:/([^/]+))?$")


class FakeRunPod(JobsFake):
    def __init__(self, *args, endpoint="ep123", output_shape="urls", **kwargs):
        super().__init__(*args, **kwargs)
        self.endpoint = endpoint
        self.output_shape = output_shape

    def refusal(self, status, retry_after):
        return json_response({"error": "rate limit exceeded"}, status, {"Retry-After": retry_after})

    def unauthorized(self):
        return json_response({"error": "Unauthorized"}, 401)

    def new_id(self):
        return super().new_id()[:8] + "-" + super().new_id()[:4] + "-u1"

    def route(self, req):
        match = _PATH.match(req.path)
        if match is None or match.group(1) != self.endpoint:
            return None
        op, job_id = match.group(2), match.group(3)
        if op == "run" and req.method == "POST" and job_id is None:
            try:
                body = req.json()
            except ValueError:
                body = None
            if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
                return json_response({"error": "input is required and must be an object"}, 400)
            return self.create(body["input"], lambda job: json_response({"id": job.id, "status": "IN_QUEUE"}))
        if op == "status" and req.method in ("GET", "POST") and job_id:
            job = self.job(job_id)
            if job is None:
                return json_response({"error": "request does not exist"}, 404)
            return json_response(self._status(job))
        if op == "cancel" and req.method == "POST" and job_id:
            job = self.cancel_job(job_id)
            if job is None:
                return json_response({"error": "request does not exist"}, 404)
            return json_response({"id": job.id, "status": self._status(job)["status"]})
        return None

    def _status(self, job):
        phase = job.phase()
        out = {"id": job.id, "delayTime": int(job.seconds * 333), "workerId": "w-fake-1"}
        if phase == "queued":
            return {"id": job.id, "status": "IN_QUEUE"}
        if phase == "running":
            return {**out, "status": "IN_PROGRESS"}
        if phase == "cancelled":
            return {**out, "status": "CANCELLED"}
        out["executionTime"] = int(job.seconds * 667)
        if job.input.get("timeout"):
            return {**out, "status": "TIMED_OUT"}
        if job.fails:
            return {**out, "status": "FAILED",
                    "error": '{"error_type": "<class \'ValueError\'>", "error_message": "the handler '
                             'refused the input (fake)", "error_traceback": "Traceback ..."}'}
        return {**out, "status": "COMPLETED", "output": self._output(job)}

    def _output(self, job):
        pngs = [self.png(job, n) for n in range(job.outputs)]
        b64 = [base64.b64encode(p).decode() for p in pngs]
        if self.output_shape == "urls":
            return {"images": self.file_urls(job)}
        if self.output_shape == "comfyui":
            return {"images": [{"filename": f"ComfyUI_{n:05d}_.png", "type": "base64", "data": d}
                               for n, d in enumerate(b64)]}
        if self.output_shape == "data_url":
            return {"image": "data:image/png;base64," + b64[0]}
        if self.output_shape == "raw":
            return {"image": b64[0], "seed": 42}
        return {"text": "a poem about a fox"}
