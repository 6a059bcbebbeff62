"""What the fake Replicate, fal.ai and RunPod servers share: jobs that are
queued, then running, then done after `job_seconds`; result files served
under /files/; the witnesses a test counts; the faults it injects.

Records: `created` (job ids in order), `created_inputs` (each job's input;
`jobs_per(key)` counts jobs by one input field), `cancelled` (job ids a
cancel reached), `requests` (Counter by "METHOD path"), `faults` (Counter),
`refused_at` and `created_at` (time.time() of each refused request and of
each job made).

Faults, for the next API requests, before any work:
  rate_limit_next(n, retry_after, status)  answer `status` (429) with
                  Retry-After; nothing is done
Faults of the submit alone, each for the next N of them:
  slow_creates    make the job, then answer after `slow_seconds`
  drop_creates    make the job, then close the connection unanswered
  lost_creates    make the job, then answer `lost_status` (502: a gateway
                  that lost the answer)
A job fails when `fail_input(input)` (default: input {"fail": true}).
"""

import hashlib
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from . import DROP, FakeServer, Response, json_response, png_bytes


def _default_fail_input(job_input):
    return isinstance(job_input, dict) and bool(job_input.get("fail"))


@dataclass
class Job:
    id: str
    input: object
    created: float
    seconds: float
    fails: bool
    outputs: int
    cancelled: bool = False
    extra: dict = field(default_factory=dict)

    def phase(self, now=None):
        """queued, running, done or cancelled."""
        if self.cancelled:
            return "cancelled"
        elapsed = (time.time() if now is None else now) - self.created
        if elapsed >= self.seconds:
            return "done"
        return "queued" if elapsed < self.seconds / 3 else "running"


class JobsFake(FakeServer):
    """The shared machinery; a subclass routes its API in `route(req)` and
    says how a refusal and a missing key look."""

    auth_prefix = "Bearer"
    api_prefix = "/v"

    def __init__(self, api_key="test-key", *, job_seconds=0.3, outputs=1, fail_input=_default_fail_input,
                 slow_creates=0, drop_creates=0, slow_seconds=2.0, lost_creates=0, lost_status=502):
        super().__init__()
        self.api_key = api_key
        self.job_seconds = job_seconds
        self.outputs = outputs
        self.fail_input = fail_input
        self.slow_creates = slow_creates
        self.drop_creates = drop_creates
        self.slow_seconds = slow_seconds
        self.lost_creates = lost_creates
        self.lost_status = lost_status
        self.jobs = {}
        self.created = []
        self.created_inputs = []
        self.created_at = []
        self.cancelled = []
        self.refused_at = []
        self.requests = Counter()
        self.faults = Counter()
        self._lock = threading.Lock()
        self._refuse = 0
        self._retry_after = 1
        self._refuse_status = 429

    def rate_limit_next(self, n, retry_after=1, status=429):
        with self._lock:
            self._refuse, self._retry_after, self._refuse_status = n, retry_after, status

    def jobs_per(self, key="prompt"):
        with self._lock:
            return Counter(str(i.get(key)) if isinstance(i, dict) else "?" for i in self.created_inputs)

    # -- HTTP ----------------------------------------------------------------

    def handle(self, req):
        with self._lock:
            self.requests[f"{req.method} {req.path}"] += 1
            refuse = not req.path.startswith("/files/") and self._refuse > 0
            if refuse:
                self._refuse -= 1
                self.faults[str(self._refuse_status)] += 1
                self.refused_at.append(time.time())
        if refuse:
            return self.refusal(self._refuse_status, self._retry_after)
        if req.path.startswith("/files/"):
            return self._file(req.path)
        if req.headers.get("authorization") != f"{self.auth_prefix} {self.api_key}":
            return self.unauthorized()
        return self.route(req)

    def route(self, req):
        raise NotImplementedError

    def refusal(self, status, retry_after):
        return json_response({"detail": "Request was throttled."}, status, {"Retry-After": retry_after})

    def unauthorized(self):
        return json_response({"detail": "Invalid token."}, 401)

    # -- jobs ----------------------------------------------------------------

    def create(self, job_input, answer, **extra):
        """Make a job, then answer `answer(job)` (a Response), late or never
        when a fault says so."""
        with self._lock:
            job = Job(id=self.new_id(), input=job_input, created=time.time(), seconds=self.job_seconds,
                      fails=bool(self.fail_input(job_input)), outputs=self.outputs, extra=extra)
            self.jobs[job.id] = job
            self.created.append(job.id)
            self.created_inputs.append(job_input)
            self.created_at.append(job.created)
            slow = self.slow_creates > 0
            drop = not slow and self.drop_creates > 0
            lost = not slow and not drop and self.lost_creates > 0
            if slow:
                self.slow_creates -= 1
                self.faults["slow create"] += 1
            elif drop:
                self.drop_creates -= 1
                self.faults["dropped create"] += 1
            elif lost:
                self.lost_creates -= 1
                self.faults["lost create"] += 1
        if drop:
            return DROP
        if lost:
            return Response(self.lost_status, b"<html>502 Bad Gateway</html>", {"Content-Type": "text/html"})
        if slow:
            self._stopping.wait(self.slow_seconds)
        return answer(job)

    def new_id(self):
        return uuid.uuid4().hex

    def job(self, job_id):
        with self._lock:
            return self.jobs.get(job_id)

    def cancel_job(self, job_id):
        """Mark the job cancelled (if it has not ended); the job or None."""
        with self._lock:
            job = self.jobs.get(job_id)
            if job is not None:
                self.cancelled.append(job_id)
                if job.phase() != "done":
                    job.cancelled = True
            return job

    def file_urls(self, job):
        return [f"{self.url}/files/{job.id}/{n}.png" for n in range(job.outputs)]

    def png(self, job, n):
        path = f"/files/{job.id}/{n}.png"
        rgb = tuple(hashlib.sha256(path.encode()).digest()[:3])
        return png_bytes(16, 16, rgb, {"file": path})

    def _file(self, path):
        job_id, _, name = path[len("/files/"):].partition("/")
        job = self.job(job_id)
        index = name.removesuffix(".png")
        if job is None or job.phase() != "done" or job.fails or not index.isdigit() or int(index) >= job.outputs:
            return Response(404)
        return Response(200, self.png(job, int(index)), {"Content-Type": "image/png"})
