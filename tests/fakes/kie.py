"""A fake KIE-style jobs API (createTask / recordInfo) with fault injection.

No recording of the real service exists; shapes follow DESIGN.md and KIE's
public documentation (docs.kie.ai, "Get Task Details").
"""

import base64
import hashlib
import hmac
import json
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass

import requests

from . import DROP, FakeServer, Response, json_response, png_bytes


def _default_fail_input(task_input):
    return bool(task_input.get("fail")) or task_input.get("prompt") == "fail"


@dataclass
class _Task:
    task_id: str
    model: str
    input: dict
    param: str          # the createTask body as KIE echoes it: a JSON string
    created: float      # time.time()
    seconds: float
    fails: bool
    outputs: int
    expired: bool = False
    callback_url: str = ""

    @property
    def done_at(self):
        return self.created + self.seconds


class FakeKIE(FakeServer):
    """A KIE-style jobs API on 127.0.0.1.

    Endpoints (all under /api/v1/jobs/ need `Authorization: Bearer <api_key>`):
      POST /api/v1/jobs/createTask  {"model", "input", "callBackUrl"?}
           -> {"code": 200, "msg": "success", "data": {"taskId"}}
      GET  /api/v1/jobs/recordInfo?taskId=...
           -> {"code": 200, "msg": "success", "data": {"taskId", "model",
               "state", "param", "resultJson", "failCode", "failMsg",
               "costTime", "completeTime", "createTime", "updateTime"}}
      GET  /files/<taskId>/<n>.png  (no auth, like a pre-signed link)

    Errors, one rule: like KIE, request-level errors are in the body's
    `code` with HTTP 200 -- 422 for validation (missing model/input/taskId,
    bad JSON), 404 for an unknown taskId -- unless `http_errors=True`, which
    makes the HTTP status equal the body code. Transport-level answers always
    use the real HTTP status: 401 bad/missing key, 429 rate limit (with
    Retry-After), 500 injected error. Every error body is {"code", "msg",
    "data": null}.

    A task is `waiting`, `queuing`, then `generating` for a third of its
    `job_seconds` each, then `success` (resultJson '{"resultUrls": [...]}'
    pointing at /files/) or `fail` (failCode "500", failMsg set) when
    `fail_input(input)` is true (default: input {"fail": true} or prompt
    "fail"). `callBackUrl` is stored in `param`; it is called only with
    `callbacks=True`.

    Callbacks (`callbacks=True`): when a job ends, POST its record (the
    recordInfo answer: {"code", "msg", "data": {"taskId", "state", ...}})
    to the callBackUrl its createTask gave, `callback_delay` seconds after
    the end, `callback_copies` times (a duplicate), signed as KIE signs
    them when `callback_key` is set (X-Webhook-Timestamp, X-Webhook-Signature
    = base64 HMAC-SHA256 of "taskId.timestamp"). An answer that is not 2xx
    is sent again (5xx, 429, no answer), up to `callback_retries` more
    times, after its Retry-After (at most 2 s). `send_callback()` sends one now, forged at
    will. Records: `callbacks_sent` ([(taskId, url, status or error)]).

    Faults drawn (for paths starting with one of `fault_paths`, default the
    API only) by one draw of a seeded random.Random per request:
      error_rate      answer `error_status` (500; 502 and 504 are gateways'); nothing is done
      timeout_rate    do the work, then wait `slow_seconds` before answering
                      (a client with a shorter timeout gives up, but a
                      createTask still created its task)
      malformed_rate  answer 200 with a truncated JSON body; nothing is done
    Refusals, for the next API requests whatever `fault_paths` says, before
    any draw:
      rate_limit_once / rate_limit_next(n, retry_after, status)  the next
                      requests get 429 (or `status`, e.g. 503) with
                      Retry-After; nothing is done
    Faults of createTask alone, each for the next N of them (a test counts
    how many jobs one task made):
      slow_creates    create the job, then answer after `slow_seconds`
      drop_creates    create the job, then close the connection unanswered
      create_delay    (seconds, every createTask) create the job, then wait
                      this long before answering
      task_ids        a callable giving each new job its taskId (default a
                      uuid; a test gives ids too long or odd to store)
    Result links: `link_ttl` seconds after completion they answer
    `expired_status` (404); `expire()` kills them now; output indices in
    `dead_outputs` always answer 404 (partial results).

    `before_create` (a callable) runs as a valid createTask arrives, before
    the task exists: a test holds a submit in flight there.

    Records: `created` (taskIds in order), `created_inputs` (each job's
    input, in the same order; `jobs_per(key)` counts jobs by one input
    field), `max_concurrent_seen` (most tasks
    not yet finished at once), `requests` (Counter by path), `faults`
    (Counter: "500", "429", "timeout", "malformed").
    """

    def __init__(self, api_key="test-key", *, job_seconds=0.3, outputs=1, seed=0,
                 error_rate=0.0, timeout_rate=0.0, malformed_rate=0.0, slow_seconds=2.0,
                 rate_limit_once=False, retry_after=1, link_ttl=None, expired_status=404,
                 dead_outputs=(), fail_input=_default_fail_input, http_errors=False,
                 fault_paths=("/api/",), poll_delay=0.0, null_data_polls=0, result_urls=None,
                 slow_creates=0, drop_creates=0, create_delay=0.0, task_ids=None, error_status=500,
                 callbacks=False, callback_key=None, callback_delay=0.0, callback_copies=1, callback_retries=5):
        super().__init__()
        self.callbacks = callbacks
        self.callback_key = callback_key
        self.callback_delay = callback_delay
        self.callback_copies = callback_copies
        self.callback_retries = callback_retries
        self.callbacks_sent = []
        # result_urls(task) -> the resultUrls of a successful task; default
        # this fake's own /files/ links.
        self.result_urls = result_urls
        self.error_status = error_status
        self.slow_creates = slow_creates
        self.drop_creates = drop_creates
        self.create_delay = create_delay
        self.task_ids = task_ids or (lambda: uuid.uuid4().hex)
        self.created_inputs = []
        # Each recordInfo is held open poll_delay seconds, so two clients
        # polling one job at the same moment overlap and are counted.
        self.poll_delay = poll_delay
        # The next recordInfo answers that say success with `"data": null`.
        self.null_data_polls = null_data_polls
        self.overlapping_polls = 0
        self._polling = defaultdict(list)   # job id -> the requests polling it now
        self.api_key = api_key
        self.job_seconds = job_seconds
        self.outputs = outputs
        self.error_rate = error_rate
        self.timeout_rate = timeout_rate
        self.malformed_rate = malformed_rate
        self.slow_seconds = slow_seconds
        self.link_ttl = link_ttl
        self.expired_status = expired_status
        self.dead_outputs = set(dead_outputs)
        self.fail_input = fail_input
        self.http_errors = http_errors
        self.fault_paths = tuple(fault_paths)
        self.before_create = None
        self.created = []
        self.max_concurrent_seen = 0
        self.requests = Counter()
        self.faults = Counter()
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._tasks = {}
        self._rate_limited = 1 if rate_limit_once else 0
        self._retry_after = retry_after
        self._refuse_status = 429

    def rate_limit_next(self, n, retry_after=1, status=429):
        """Answer the next `n` API requests with `status` (429, or 503 for a
        service that is down for a while) and `Retry-After: retry_after`."""
        with self._lock:
            self._rate_limited = n
            self._retry_after = retry_after
            self._refuse_status = status

    def callback_urls(self):
        """{taskId: the callBackUrl its createTask gave}."""
        with self._lock:
            return {t.task_id: t.callback_url for t in self._tasks.values()}

    def send_callback(self, task_id, url=None, *, key=..., body=None, timestamp=None, retries=0):
        """POST a callback about `task_id` to `url` (default: its callBackUrl)
        now: its record as body unless `body` is given, signed with `key`
        (default callback_key; None: unsigned). Returns the last answer's
        status (or the error's name), recorded in `callbacks_sent`."""
        with self._lock:
            task = self._tasks.get(task_id)
        url = url or task.callback_url
        if body is None:
            body = json.loads(self._record_info(task_id).body)
        key = self.callback_key if key is ... else key
        # A signer signs the taskId its body names.
        data = body.get("data") if isinstance(body, dict) else None
        signed = data.get("taskId") if isinstance(data, dict) and data.get("taskId") else task_id
        result = None
        for attempt in range(retries + 1):
            headers = {"Content-Type": "application/json"}
            if key is not None:
                stamp = str(int(time.time()) if timestamp is None else timestamp)
                mac = hmac.new(key.encode(), f"{signed}.{stamp}".encode(), hashlib.sha256).digest()
                headers.update({"X-Webhook-Timestamp": stamp,
                                "X-Webhook-Signature": base64.b64encode(mac).decode()})
            wait = 0.5
            try:
                resp = requests.post(url, data=json.dumps(body), headers=headers, timeout=(2, 5),
                                     allow_redirects=False)
                result = resp.status_code
                try:
                    wait = min(2.0, float(resp.headers.get("Retry-After", wait)))
                except ValueError:
                    pass
            except requests.RequestException as exc:
                result = type(exc).__name__
            with self._lock:
                self.callbacks_sent.append((task_id, url, result))
            if isinstance(result, int) and result < 500 and result != 429:
                break       # done, or refused for good: only 5xx, 429 and no answer are sent again
            if attempt < retries and self._stopping.wait(wait):
                break
        return result

    def _call_back_when_done(self, task):
        if self._stopping.wait(max(0.0, task.done_at - time.time()) + self.callback_delay):
            return
        for _ in range(self.callback_copies):
            self.send_callback(task.task_id, retries=self.callback_retries)

    def jobs_per(self, key="prompt"):
        """Counter: input[key] -> jobs created with it."""
        with self._lock:
            return Counter(str(i.get(key)) for i in self.created_inputs)

    def expire(self, task_id=None):
        """Make the result links of `task_id` (or of every task) dead now."""
        with self._lock:
            for task in self._tasks.values():
                if task_id in (None, task.task_id):
                    task.expired = True

    # -- HTTP ----------------------------------------------------------------

    def handle(self, req):
        with self._lock:
            self.requests[req.path] += 1
            fault = self._refusal() if req.path.startswith("/api/") else None
            if fault is None and req.path.startswith(self.fault_paths):
                fault = self._draw_fault()
        if fault == "429":
            status = self._refuse_status
            msg = "Too many requests, please slow down" if status == 429 else "Service unavailable"
            return json_response({"code": status, "msg": msg, "data": None}, status,
                                 {"Retry-After": self._retry_after})
        if fault == "500":
            return json_response({"code": self.error_status, "msg": "Internal Error, Please try again later.",
                                  "data": None}, self.error_status)
        if fault == "malformed":
            return Response(200, b'{"code": 200, "msg": "success", "data": {"taskId', {"Content-Type": "application/json"})

        response = self._route(req)
        if fault == "timeout":
            # Stop wakes the wait early so a stopped fake does not linger.
            self._stopping.wait(self.slow_seconds)
        return response

    def _refusal(self):
        if self._rate_limited <= 0:
            return None
        self._rate_limited -= 1
        self.faults[str(self._refuse_status)] += 1
        return "429"

    def _draw_fault(self):
        r = self._rng.random()
        fault = None
        for name, rate in (("500", self.error_rate), ("timeout", self.timeout_rate),
                           ("malformed", self.malformed_rate)):
            if r < rate:
                fault = name
                break
            r -= rate
        if fault:
            self.faults[fault] += 1
        return fault

    def _route(self, req):
        if req.path.startswith("/files/"):
            return self._file(req.path)
        if req.path.startswith("/api/v1/jobs/"):
            if req.headers.get("authorization") != f"Bearer {self.api_key}":
                return json_response({"code": 401, "msg": "You do not have access permissions", "data": None}, 401)
            if (req.method, req.path) == ("POST", "/api/v1/jobs/createTask"):
                return self._create(req)
            if (req.method, req.path) == ("GET", "/api/v1/jobs/recordInfo"):
                return self._watched_record_info(req.query.get("taskId"), req)
        return None

    def _fail(self, code, msg):
        return json_response({"code": code, "msg": msg, "data": None}, code if self.http_errors else 200)

    def _create(self, req):
        try:
            body = req.json()
        except ValueError:
            return self._fail(422, "request body is not valid JSON")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
            return self._fail(422, "model is required")
        if not isinstance(body.get("input"), dict):
            return self._fail(422, "input is required")
        param = {"model": body["model"], "callBackUrl": body.get("callBackUrl", ""), "input": body["input"]}
        if self.before_create is not None:
            self.before_create()
        with self._lock:
            now = time.time()
            task = _Task(task_id=self.task_ids(), model=body["model"], input=body["input"],
                         param=json.dumps(param), created=now, seconds=self.job_seconds,
                         fails=bool(self.fail_input(body["input"])), outputs=self.outputs,
                         callback_url=param["callBackUrl"] if isinstance(param["callBackUrl"], str) else "")
            self._tasks[task.task_id] = task
            self.created.append(task.task_id)
            self.created_inputs.append(body["input"])
            # The most overlapping tasks is always reached at some task's start.
            active = sum(1 for t in self._tasks.values() if t.created <= now < t.done_at)
            self.max_concurrent_seen = max(self.max_concurrent_seen, active)
            slow = self.slow_creates > 0
            drop = not slow and self.drop_creates > 0
            if slow:
                self.slow_creates -= 1
                self.faults["slow create"] += 1
            elif drop:
                self.drop_creates -= 1
                self.faults["dropped create"] += 1
        if self.callbacks and task.callback_url:
            threading.Thread(target=self._call_back_when_done, args=(task,), daemon=True,
                             name="FakeKIE-callback").start()
        if drop:
            return DROP
        wait = self.slow_seconds if slow else self.create_delay
        if wait:
            self._stopping.wait(wait)
        return json_response({"code": 200, "msg": "success", "data": {"taskId": task.task_id}})

    def _watched_record_info(self, task_id, req):
        with self._lock:
            # A poll whose asker has gone (a process killed mid-poll) is
            # nobody's poll any more: another process taking the job over
            # at once does not overlap it.
            asking = self._polling[task_id]
            asking[:] = [other for other in asking if not other.asker_gone()]
            if asking:
                self.overlapping_polls += 1
            asking.append(req)
        try:
            if self.poll_delay:
                self._stopping.wait(self.poll_delay)
            return self._record_info(task_id)
        finally:
            with self._lock:
                self._polling[task_id] = [other for other in self._polling[task_id] if other is not req]

    def _record_info(self, task_id):
        if not task_id:
            return self._fail(422, "taskId is required")
        with self._lock:
            task = self._tasks.get(task_id)
            null_data = task is not None and self.null_data_polls > 0
            if null_data:
                self.null_data_polls -= 1
        if task is None:
            return self._fail(404, "task not found")
        if null_data:
            return json_response({"code": 200, "msg": "success", "data": None})
        now = time.time()
        elapsed = now - task.created
        data = {"taskId": task.task_id, "model": task.model, "param": task.param,
                "resultJson": "", "failCode": "", "failMsg": "",
                "costTime": None, "completeTime": None,
                "createTime": int(task.created * 1000), "updateTime": int(now * 1000)}
        if now < task.done_at:
            data["state"] = ("waiting", "queuing", "generating")[min(int(3 * elapsed / task.seconds), 2)]
        else:
            data.update(costTime=int(task.seconds * 1000), completeTime=int(task.done_at * 1000),
                        updateTime=int(task.done_at * 1000))
            if task.fails:
                data.update(state="fail", failCode="500", failMsg="generation failed (FakeKIE: input asked to fail)")
            else:
                urls = (self.result_urls(task) if self.result_urls is not None else
                        [f"{self.url}/files/{task.task_id}/{n}.png" for n in range(task.outputs)])
                data.update(state="success", resultJson=json.dumps({"resultUrls": urls}))
        return json_response({"code": 200, "msg": "success", "data": data})

    def _file(self, path):
        task_id, _, name = path[len("/files/"):].partition("/")
        with self._lock:
            task = self._tasks.get(task_id)
            expired = task is not None and task.expired
        index = name.removesuffix(".png")
        if (task is None or task.fails or time.time() < task.done_at or not index.isdigit()
                or int(index) >= task.outputs or int(index) in self.dead_outputs):
            return Response(404)
        if expired or (self.link_ttl is not None and time.time() > task.done_at + self.link_ttl):
            return Response(self.expired_status)
        # Each file differs (colour from its name); a real PNG, as a model would return.
        rgb = tuple(hashlib.sha256(path.encode()).digest()[:3])
        return Response(200, png_bytes(32, 32, rgb, {"file": path}), {"Content-Type": "image/png"})
