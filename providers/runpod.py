"""RunPod serverless: POST /v2/{endpoint}/run ({"input"}) -> id; GET
/v2/{endpoint}/status/{id} -> IN_QUEUE, IN_PROGRESS, COMPLETED (`output`),
FAILED (`error`), CANCELLED, TIMED_OUT; POST /v2/{endpoint}/cancel/{id}.

A handler's output is whatever JSON it returns: every file URL in it, and
the base64 images handlers commonly return (data URLs, or raw base64 under
`image`, `images`, ...; worker-comfyui's `{"type": "base64", "data"}`),
become result files, each within max_file_bytes (see results.py).
RunPod picks the job id itself: an in-doubt /run fails the task
`submission_in_doubt` unless `on_doubt = "resubmit"`.
"""

import re
from urllib.parse import quote

from errors import ConfigError, InDoubt, InvalidInput, InvalidResult, ProviderRejected, ProviderUnavailable

from .base import Status
from .http import HttpProvider
from .net import parse_json
from .results import message_of, outputs_from

_ENDPOINT = re.compile(r"^[A-Za-z0-9_-]{1,100}$")


class RunPodProvider(HttpProvider):
    type = "runpod"
    defaults = {**HttpProvider.defaults, "url": "https://api.runpod.ai", "endpoint": None}
    required = ("api_key_env", "endpoint")

    def __init__(self, name, config=None, env=None):
        super().__init__(name, config, env)
        if not isinstance(self.endpoint, str) or not _ENDPOINT.match(self.endpoint):
            raise ConfigError(f"provider {name}: endpoint must be a RunPod endpoint id, not {self.endpoint!r}")

    def validate(self, params):
        super().validate(params)
        unknown = set(params) - {"input"}
        if unknown:
            raise InvalidInput(f"unknown params for a RunPod task: {', '.join(sorted(unknown))}")
        if not isinstance(params.get("input"), dict):
            raise InvalidInput("params.input must be an object (the handler's input)")

    def submit(self, task, now):
        resp = self.call("POST", f"/v2/{self.endpoint}/run", what="run", json={"input": task["params"]["input"]})
        if resp.status_code >= 400:
            raise ProviderRejected(f"RunPod refused the job: {message_of(resp, 'error', 'detail', 'message')}")
        body = self.json_of(resp, "run")
        job_id = body.get("id") if isinstance(body, dict) else None
        if not isinstance(job_id, str) or not job_id:
            raise InDoubt(f"{self.name}: run answered without an id")
        return job_id

    def poll(self, task, now):
        resp = self.call("GET", f"/v2/{self.endpoint}/status/" + quote(task["external_id"], safe=""),
                         what="status")
        if resp.status_code == 404:
            return Status.unknown()
        if resp.status_code != 200:
            raise ProviderUnavailable(f"{self.name}: status answered {message_of(resp, 'error', 'message')}")
        body = self.json_of(resp, "status")
        if not isinstance(body, dict):
            raise ProviderUnavailable(f"{self.name}: status: not an object")
        state = body.get("status")
        if state == "IN_QUEUE":
            return Status.queued("in queue")
        if state == "COMPLETED":
            return Status.succeeded(outputs_from(body.get("output"), max_file_bytes=self.max_file_bytes,
                                                 max_outputs=self.max_outputs, what=f"{self.name} output"))
        if state == "FAILED":
            return Status.failed(_error(body.get("error")) or "the RunPod job failed")
        if state == "CANCELLED":
            return Status.failed("the job was cancelled at RunPod")
        if state == "TIMED_OUT":
            return Status.failed("the job timed out at RunPod (the endpoint's execution timeout)")
        return Status.running("in progress")

    def cancel(self, task):
        if task.get("external_id"):
            self.call("POST", f"/v2/{self.endpoint}/cancel/" + quote(task["external_id"], safe=""), what="cancel")


def _error(error):
    """RunPod's `error`: text, or a handler's JSON error text
    ({"error_type", "error_message", "error_traceback"})."""
    if isinstance(error, str) and error.startswith("{"):
        try:
            error = parse_json(error, "error")
        except (ValueError, InvalidResult):
            pass
    if isinstance(error, dict):
        return str(error.get("error_message") or error.get("message") or error)[:2000]
    return str(error)[:2000] if error else None
