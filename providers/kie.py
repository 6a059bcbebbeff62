"""KIE-style jobs API: POST /api/v1/jobs/createTask -> data.taskId; GET
/api/v1/jobs/recordInfo?taskId= -> data.state (waiting, queuing, generating,
success, fail) and data.resultJson, a JSON string with resultUrls.

KIE puts request-level errors in the body's `code` (often with HTTP 200);
transport-level ones (401, 429, 5xx) in the HTTP status. Both are read.
KIE cannot take an id from holdfast, so a createTask whose answer was lost
(a timeout) may leave a job at KIE that holdfast never learns about: such a
submit is InDoubt, and the worker fails the task `submission_in_doubt`
rather than pay for a second job (unless `on_doubt = "resubmit"`).

With HOLDFAST_PUBLIC_URL set, createTask carries a `callBackUrl` and KIE
calls it when the job ends (api/callbacks.py). With `callback_key_env`,
each callback must carry KIE's signature (docs.kie.ai, "Webhook Security
Verification"): `X-Webhook-Signature` = base64(HMAC-SHA256(key, taskId +
"." + X-Webhook-Timestamp)). A callback also lets a submit in doubt find
its job: such a task waits `callback_grace_s` for one before it fails.
"""

import base64
import hashlib
import hmac
import os
from urllib.parse import urlsplit

from errors import (ConfigError, InDoubt, InvalidInput, InvalidResult, ProviderRejected, ProviderUnavailable,
                    Unauthorized)

from .base import Output, Status
from .http import REFUSED, HttpProvider
from .net import parse_json

# Body codes that mean "later": rate limited, maintenance, server trouble.
# 501 (generation failed) and 505 (feature disabled) are final. Of these,
# 455 (maintenance) refuses like 429 and 503; 500, 502 and 504 may come after
# the job was made (see http.py).
_TRANSIENT_CODES = frozenset({408, 429, 455, 500, 502, 503, 504})
_REFUSED_CODES = REFUSED | {455}
_QUEUED = ("waiting", "queuing")
# A signed callback older or newer than this is refused: a recorded one
# cannot be played again later.
CALLBACK_TOLERANCE_S = 300


class KIEProvider(HttpProvider):
    type = "kie"
    callbacks = True
    defaults = {**HttpProvider.defaults, "url": "https://api.kie.ai",
                "callback_key_env": None,     # the variable holding KIE's webhookHmacKey
                "callback_grace_s": 300.0}    # a submit in doubt waits this long for a callback
    required = ("api_key_env",)

    def __init__(self, name, config=None, env=None):
        super().__init__(name, config, env)
        env = os.environ if env is None else env
        self._number("callback_grace_s", positive=True)
        self._callback_key = None
        var = self.config["callback_key_env"]
        if var is not None:
            if not isinstance(var, str) or not var:
                raise ConfigError(f"provider {name}: callback_key_env must name an environment variable")
            self._callback_key = env.get(var)
            if not self._callback_key:
                raise ConfigError(f"provider {name}: the environment variable {var} (callback_key_env) is not set")

    def validate(self, params):
        super().validate(params)
        unknown = set(params) - {"model", "input"}
        if unknown:
            raise InvalidInput(f"unknown params for a KIE task: {', '.join(sorted(unknown))}")
        model = params.get("model")
        if not isinstance(model, str) or not 0 < len(model) <= 200:
            raise InvalidInput("params.model must be a model name (a string)")
        if not isinstance(params.get("input"), dict):
            raise InvalidInput("params.input must be an object (the model's input)")

    def submit(self, task, now):
        params = task["params"]
        body = {"model": params["model"], "input": params["input"]}
        if task.get("callback_url"):
            body["callBackUrl"] = task["callback_url"]
        data = self._answer(self.call("POST", "/api/v1/jobs/createTask", what="createTask", json=body),
                            "createTask")
        task_id = data.get("taskId") if isinstance(data, dict) else None
        if task_id is None or task_id == "":
            # A success without the one thing it must say: the job may exist.
            raise InDoubt(f"{self.name}: createTask answered without a taskId")
        if isinstance(task_id, bool) or not isinstance(task_id, (str, int)):
            # A job was made under an id holdfast cannot follow: asking
            # again would only make another.
            raise ProviderRejected(f"KIE's createTask answered a taskId that is not text: {str(task_id)[:100]!r}",
                                   code="invalid_result")
        return str(task_id)

    def poll(self, task, now):
        data = self._answer(self.call("GET", "/api/v1/jobs/recordInfo", what="recordInfo",
                                      params={"taskId": task["external_id"]}),
                            "recordInfo", missing_ok=True)
        if data is _MISSING:
            return Status.unknown()
        # `"data": null` beside code 200 is no word on the job: ask again,
        # never take it for a lost job and pay for a second one.
        if not isinstance(data, dict):
            raise ProviderUnavailable(f"{self.name}: recordInfo: data is not an object")
        state = data.get("state")
        if state in _QUEUED:
            return Status.queued(state)
        if state == "success":
            return self._success(data)
        if state == "fail":
            message = data.get("failMsg") or "KIE failed the task"
            if data.get("failCode"):
                message += f" (failCode {data['failCode']})"
            return Status.failed(str(message)[:2000])
        # generating, or a state newer than this adapter: the job is alive.
        return Status.running(str(state or "generating")[:60], _progress(data.get("progress")))

    def callback_job(self, headers, body, now):
        data = body.get("data")
        job = None
        if isinstance(data, dict):
            job = data.get("taskId", data.get("task_id"))
        if job is None:
            job = body.get("taskId")
        if isinstance(job, bool) or not isinstance(job, (str, int)) or not 0 < len(str(job)) <= 255:
            raise InvalidInput("the callback names no taskId", code="invalid_callback")
        job = str(job)
        if self._callback_key is not None:
            self._check_signature(headers, job, now)
        return job

    def _check_signature(self, headers, job, now):
        stamp = headers.get("X-Webhook-Timestamp") or ""
        given = headers.get("X-Webhook-Signature") or ""
        if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:
            raise Unauthorized("the callback carries no valid X-Webhook-Timestamp", code="bad_signature")
        if abs(now - int(stamp)) > CALLBACK_TOLERANCE_S:
            raise Unauthorized("the callback's timestamp is too far from now", code="bad_signature")
        mac = hmac.new(self._callback_key.encode(), f"{job}.{stamp}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(base64.b64encode(mac), given.strip().encode("ascii", "replace")):
            raise Unauthorized("the callback's signature does not match", code="bad_signature")

    def _success(self, data):
        raw = data.get("resultJson")
        try:
            result = parse_json(raw, f"{self.name}: resultJson") if isinstance(raw, (str, bytes)) else raw
        except InvalidResult as exc:
            return Status.failed(exc.message, code="invalid_result")
        except ValueError:
            return Status.failed("KIE said success but its resultJson is not JSON", code="invalid_result")
        urls = result.get("resultUrls") if isinstance(result, dict) else None
        if not isinstance(urls, list):
            return Status.failed("KIE said success but gave no resultUrls", code="invalid_result")
        outputs = []
        for i, url in enumerate(urls):
            name = os.path.basename(urlsplit(url).path) if isinstance(url, str) else ""
            outputs.append(Output(name or f"out_{i}", url=url if isinstance(url, str) else None))
        return Status.succeeded(outputs)

    def _answer(self, resp, what, missing_ok=False):
        """The `data` of a KIE answer; _MISSING for an unknown task when
        `missing_ok`. ProviderUnavailable for "later", ProviderRejected for
        "never"."""
        if resp.status_code in (401, 403):
            raise ProviderRejected(f"KIE refused the API key ({what}: HTTP {resp.status_code})")
        body = self.json_of(resp, what)
        if not isinstance(body, dict):
            raise InDoubt(f"{self.name}: {what}: the answer is not an object")
        try:
            code = int(body.get("code", resp.status_code))
        except (TypeError, ValueError):
            code = resp.status_code
        message = str(body.get("msg") or "")[:1000]
        if code == 200 and resp.status_code == 200:
            return body.get("data")
        if code == 404 and missing_ok:
            return _MISSING
        if code in _TRANSIENT_CODES:
            raise self._down(f"{what}: {message or 'try again later'} (code {code})",
                             doubt=code not in _REFUSED_CODES)
        raise ProviderRejected(f"KIE refused {what}: {message or 'no message'} (code {code})")


_MISSING = object()    # KIE's 404: it does not know the task


def _progress(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    if value > 1:
        value /= 100
    return round(min(1.0, max(0.0, value)), 3)
