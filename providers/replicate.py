"""Replicate: POST /v1/predictions ({"version", "input"}) or a model's own
POST /v1/models/{owner}/{name}/predictions ({"input"}); GET
/v1/predictions/{id} (status starting, processing, succeeded, failed,
canceled; `logs`; `output`, `error`); POST /v1/predictions/{id}/cancel.

Replicate picks the prediction's id itself, so a create whose answer was
lost may have started a paid prediction holdfast cannot name: InDoubt, and
the task fails `submission_in_doubt` unless `on_doubt = "resubmit"`. Its
output links are deleted about an hour after the prediction ends: they are
downloaded as soon as it succeeds, like every provider's.
"""

import re
from urllib.parse import quote

from errors import InDoubt, InvalidInput, ProviderRejected, ProviderUnavailable

from .base import Status
from .http import HttpProvider
from .results import message_of, outputs_from

_MODEL = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
_PERCENT = re.compile(r"(\d{1,3})%")
MAX_STEP = 200


class ReplicateProvider(HttpProvider):
    type = "replicate"
    defaults = {**HttpProvider.defaults, "url": "https://api.replicate.com"}
    required = ("api_key_env",)

    def validate(self, params):
        super().validate(params)
        unknown = set(params) - {"version", "model", "input"}
        if unknown:
            raise InvalidInput(f"unknown params for a Replicate task: {', '.join(sorted(unknown))}")
        version, model = params.get("version"), params.get("model")
        if (version is None) == (model is None):
            raise InvalidInput("a Replicate task needs params.version (a version id) or params.model "
                               "('owner/name', run on the model's own endpoint), not both")
        if version is not None and (not isinstance(version, str) or not 0 < len(version) <= 200):
            raise InvalidInput("params.version must be a version id (a string)")
        if model is not None and (not isinstance(model, str) or not _MODEL.match(model)):
            raise InvalidInput("params.model must be 'owner/name'")
        if not isinstance(params.get("input"), dict):
            raise InvalidInput("params.input must be an object (the model's input)")

    def submit(self, task, now):
        params = task["params"]
        if params.get("model"):
            path, body = f"/v1/models/{params['model']}/predictions", {"input": params["input"]}
        else:
            path, body = "/v1/predictions", {"version": params["version"], "input": params["input"]}
        resp = self.call("POST", path, what="create prediction", json=body)
        if resp.status_code >= 400:
            raise ProviderRejected(f"Replicate refused the prediction: {message_of(resp, 'detail', 'title')}")
        prediction = self.json_of(resp, "create prediction")
        pid = prediction.get("id") if isinstance(prediction, dict) else None
        if not isinstance(pid, str) or not pid:
            # A success without the one thing it must say: the prediction may exist.
            raise InDoubt(f"{self.name}: create prediction answered without an id")
        return pid

    def poll(self, task, now):
        resp = self.call("GET", "/v1/predictions/" + quote(task["external_id"], safe=""), what="get prediction")
        if resp.status_code == 404:
            return Status.unknown()
        if resp.status_code != 200:
            raise ProviderUnavailable(f"{self.name}: get prediction answered "
                                      f"{message_of(resp, 'detail', 'title')}")
        prediction = self.json_of(resp, "get prediction")
        if not isinstance(prediction, dict):
            raise ProviderUnavailable(f"{self.name}: get prediction: not an object")
        status = prediction.get("status")
        if status == "succeeded":
            return Status.succeeded(outputs_from(prediction.get("output"), max_file_bytes=self.max_file_bytes,
                                                 max_outputs=self.max_outputs, what=f"{self.name} output"))
        if status == "failed":
            return Status.failed(str(prediction.get("error") or "Replicate failed the prediction")[:2000])
        if status == "canceled":
            return Status.failed("the prediction was canceled at Replicate")
        step, progress = _from_logs(prediction.get("logs"))
        if status == "starting":
            return Status.queued(step or "starting")
        return Status.running(step or str(status or "processing")[:60], progress)

    def cancel(self, task):
        if task.get("external_id"):
            self.call("POST", "/v1/predictions/" + quote(task["external_id"], safe="") + "/cancel",
                      what="cancel")


def _from_logs(logs):
    """(the last line of `logs`, as the step; a percentage in it, as progress)."""
    if not isinstance(logs, str):
        return None, None
    lines = [line.strip() for line in logs.replace("\r", "\n").splitlines() if line.strip()]
    if not lines:
        return None, None
    last = lines[-1][:MAX_STEP]
    match = _PERCENT.search(last)
    progress = min(100, int(match.group(1))) / 100 if match else None
    return last, progress
