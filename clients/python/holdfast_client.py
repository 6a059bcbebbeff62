"""A Python client for holdfast's HTTP API, in one module that needs only
`requests` (install with `pip install ./clients/python`, or copy this file).

    client = Client("http://127.0.0.1:8080", token)
    task = client.submit("demo", {"prompt": "a fox"}, dedupe_key="order-123")
    task = client.wait(task["id"], timeout=600)
    client.download(task, task["files"][0]["name"], "fox.png")

Errors are HoldfastError subclasses named after the API's error codes.
verify_webhook() checks a Standard Webhooks delivery for a receiver.
"""

import base64
import hashlib
import hmac
import json
import os
import random
import tempfile
import time
import uuid

import requests

__all__ = ["Client", "verify_webhook", "HoldfastError", "InvalidInput", "Unauthorized", "PaymentRequired",
           "Forbidden", "NotFound", "Conflict", "TooLarge", "RateLimited", "Unavailable", "ChecksumMismatch",
           "WebhookVerificationError", "TERMINAL"]

TERMINAL = frozenset({"succeeded", "partial", "failed", "cancelled"})
MAX_POLL_WAIT_S = 25          # the server's cap on GET /api/events/poll?wait=
MAX_JSON_BYTES = 16 * 1024 * 1024   # a page of 200 tasks is far below
MAX_ERROR_BYTES = 64 * 1024
CHUNK = 64 * 1024


class HoldfastError(Exception):
    """An error answer of the API (or of the way to it): `status` (HTTP,
    or None when no answer came), `code` and `message` as the API sent them."""

    def __init__(self, message, *, status=None, code=None):
        super().__init__(f"{code}: {message}" if code else message)
        self.status, self.code, self.message = status, code, message


class InvalidInput(HoldfastError):
    """400: the request was refused as it was; nothing changed."""


class Unauthorized(HoldfastError):
    """401: the token is missing, unknown or revoked."""


class PaymentRequired(HoldfastError):
    """402 insufficient_credits: nothing was created."""


class Forbidden(HoldfastError):
    """403."""


class NotFound(HoldfastError):
    """404: missing, or another user's."""


class Conflict(HoldfastError):
    """409: e.g. cancelling a task that already ended."""


class TooLarge(HoldfastError):
    """413: the body is over the server's limit."""


class RateLimited(HoldfastError):
    """429: `retry_after` is the server's hint in seconds (or None)."""

    def __init__(self, message, *, status=None, code=None, retry_after=None):
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after


class Unavailable(HoldfastError):
    """503 (store or provider unavailable), or no answer at all."""

    def __init__(self, message, *, status=None, code=None, retry_after=None):
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after


class ChecksumMismatch(HoldfastError):
    """A downloaded file's bytes do not match the task's sha256 or size."""


class WebhookVerificationError(Exception):
    """A webhook whose signature, timestamp or headers do not check out."""


_BY_STATUS = {400: InvalidInput, 401: Unauthorized, 402: PaymentRequired, 403: Forbidden, 404: NotFound,
              409: Conflict, 413: TooLarge, 429: RateLimited, 503: Unavailable}


def _retry_after(response):
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _error_from(response, body):
    try:
        error = json.loads(body)["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        code, message = None, (body.decode("utf-8", "replace") or response.reason or "")[:500]
    cls = _BY_STATUS.get(response.status_code, HoldfastError)
    if cls in (RateLimited, Unavailable):
        return cls(message, status=response.status_code, code=code, retry_after=_retry_after(response))
    return cls(message, status=response.status_code, code=code)


def _read_capped(response, limit, deadline, what):
    """The body, at most `limit` bytes and read by `deadline` (monotonic):
    the read timeout bounds each wait for bytes, this bounds them all."""
    parts, size = [], 0
    try:
        for chunk in response.iter_content(CHUNK):
            size += len(chunk)
            if size > limit:
                raise HoldfastError(f"{what}: answer over {limit} bytes", status=response.status_code)
            if time.monotonic() > deadline:
                raise Unavailable(f"{what}: answer still coming after the deadline", status=response.status_code)
            parts.append(chunk)
    except requests.RequestException as exc:
        raise Unavailable(f"{what}: answer broke off: {exc}") from None
    return b"".join(parts)


class Client:
    """One user's view of a holdfast server. `timeout` is the read timeout
    of each request (the connect timeout is `connect_timeout`); `retry_s`
    bounds the total time submit() spends retrying, `attempts` its tries,
    and `download_s` the whole of one download."""

    def __init__(self, url, token, timeout=30.0, *, connect_timeout=5.0, attempts=6, retry_s=60.0,
                 download_s=3600.0, session=None):
        self.url = url.rstrip("/")
        self.timeout = (connect_timeout, timeout)
        self.attempts = attempts
        self.retry_s = retry_s
        self.download_s = download_s
        self.session = session or requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    # -- the HTTP seam -------------------------------------------------------

    def _request(self, method, path, *, read_timeout=None, **kw):
        """The response (streamed; close it) to a request that succeeded,
        or the HoldfastError of its answer."""
        timeout = (self.timeout[0], read_timeout or self.timeout[1])
        what = f"{method} {path}"
        try:
            response = self.session.request(method, self.url + path, timeout=timeout, stream=True, **kw)
        except requests.RequestException as exc:
            raise Unavailable(f"{what}: {exc.__class__.__name__}: {exc}") from None
        if response.status_code >= 400:
            with response:
                body = _read_capped(response, MAX_ERROR_BYTES, time.monotonic() + sum(timeout), what)
            raise _error_from(response, body)
        return response

    def _json(self, method, path, *, read_timeout=None, **kw):
        what = f"{method} {path}"
        deadline = time.monotonic() + self.timeout[0] + 2 * (read_timeout or self.timeout[1])
        with self._request(method, path, read_timeout=read_timeout, **kw) as response:
            body = _read_capped(response, MAX_JSON_BYTES, deadline, what)
        try:
            return json.loads(body)
        except ValueError:
            raise HoldfastError(f"{what}: answer is not JSON", status=response.status_code) from None

    # -- tasks ---------------------------------------------------------------

    def submit(self, provider, params, *, dedupe_key=None, webhook=None, webhook_events=None, priority=None):
        """Create a task (or get the one this key already made) -> the task.

        Connection errors, 429 and 503 are tried again with backoff, at most
        `attempts` times within `retry_s`. That is safe although the first
        try may have created the task (the answer lost on the way back):
        every try carries the same Idempotency-Key, and the server answers a
        known key with the task it already made instead of a second one."""
        key = dedupe_key or str(uuid.uuid4())
        body = {"provider": provider, "params": params}
        for name, value in (("webhook", webhook), ("webhook_events", webhook_events), ("priority", priority)):
            if value is not None:
                body[name] = value
        deadline = time.monotonic() + self.retry_s
        for attempt in range(1, self.attempts + 1):
            try:
                return self._json("POST", "/api/tasks", json=body, headers={"Idempotency-Key": key})["task"]
            except (RateLimited, Unavailable) as exc:
                pause = self._backoff(attempt, exc.retry_after)
                if attempt == self.attempts or time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)

    @staticmethod
    def _backoff(attempt, hint):
        if hint is not None:
            return hint
        return min(10.0, 0.25 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)

    def get(self, task_id):
        """The task, as GET /api/tasks/{id} shows it."""
        return self._json("GET", f"/api/tasks/{_path(task_id)}")["task"]

    def list(self, status=None, limit=50):
        """Every task of this user, newest first, fetching pages of `limit`
        as the iteration goes. `status`: e.g. "active", "terminal" or
        "queued,running"."""
        before = None
        while True:
            query = {"limit": limit}
            if status:
                query["status"] = status
            if before:
                query["before"] = before
            page = self._json("GET", "/api/tasks", params=query)
            yield from page["tasks"]
            before = page.get("next")
            if not before or not page["tasks"]:
                return

    def cancel(self, task_id):
        """Cancel a task -> the task; Conflict when it already ended."""
        return self._json("POST", f"/api/tasks/{_path(task_id)}/cancel")["task"]

    def retry(self, task_id):
        """A new task with a failed or cancelled task's provider and params."""
        return self._json("POST", f"/api/tasks/{_path(task_id)}/retry")["task"]

    def me(self):
        """{"user", "credits", "limits"}."""
        return self._json("GET", "/api/me")

    def webhook_secrets(self):
        """The secrets that sign this user's task webhooks (two during a
        rotation), for verify_webhook()."""
        return [s["secret"] for s in self._json("GET", "/api/webhooks/secret")["secrets"]]

    def download(self, task, name, path):
        """Save the task's result file `name` at `path`, streamed through a
        temporary file beside it that becomes `path` only once its size and
        sha256 match what the task lists (ChecksumMismatch otherwise, and
        nothing is left at `path`). `task`: a task dict or its id."""
        if not isinstance(task, dict):
            task = self.get(task)
        listed = next((f for f in task.get("files") or [] if f.get("name") == name), None)
        if listed is None:
            raise NotFound(f"task {task.get('id')} lists no file {name!r}", code="not_found")
        folder = os.path.dirname(os.path.abspath(path))
        deadline = time.monotonic() + self.download_s
        fd, partial = tempfile.mkstemp(prefix=".holdfast-", dir=folder)
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out:
                with self._request("GET", f"/api/tasks/{_path(task['id'])}/files/{_path(name)}") as response:
                    try:
                        for chunk in response.iter_content(CHUNK):
                            size += len(chunk)
                            if size > listed["size"]:
                                break       # already wrong: the check below says so
                            if time.monotonic() > deadline:
                                raise Unavailable(f"download of {name} took over {self.download_s}s")
                            digest.update(chunk)
                            out.write(chunk)
                    except requests.RequestException as exc:
                        raise Unavailable(f"download of {name} broke off: {exc}") from None
            if size != listed["size"] or digest.hexdigest() != listed["sha256"]:
                raise ChecksumMismatch(f"{name}: got {size} bytes with sha256 {digest.hexdigest()}, "
                                       f"the task lists {listed['size']} bytes with {listed['sha256']}",
                                       code="checksum_mismatch")
            os.replace(partial, path)
        except BaseException:
            try:
                os.unlink(partial)
            except OSError:
                pass
            raise
        return path

    # -- events --------------------------------------------------------------

    def poll_events(self, since=None, wait=MAX_POLL_WAIT_S):
        """One GET /api/events/poll -> (events, next cursor)."""
        query = {"wait": f"{min(wait, MAX_POLL_WAIT_S):.3f}"}
        if since is not None:
            query["since"] = since
        page = self._json("GET", "/api/events/poll", params=query, read_timeout=self.timeout[1] + wait)
        return page["events"], page["next"]

    def events(self, since=None, wait=MAX_POLL_WAIT_S):
        """This user's events ({"seq", "task_id", "type", "task"}) from
        `since` (None: from now on), for ever. Resume after a break with
        the last event's seq. Each request waits on the server up to `wait`
        seconds; an empty answer that came early (the server's long polls
        were all taken) is followed by a pause, never by an immediate ask."""
        if since is None:
            _, since = self.poll_events(None, wait=0)
        while True:
            started = time.monotonic()
            events, since = self.poll_events(since, wait)
            yield from events
            if not events:
                _pause_rest(started, wait)

    def wait(self, task_id, timeout=600.0):
        """The task once it is terminal; TimeoutError after `timeout`
        seconds. Waits on the event log's long poll, not by polling the task."""
        return self.wait_all([task_id], timeout)[task_id]

    def wait_all(self, ids, timeout=600.0):
        """{id: task} once every task in `ids` is terminal; TimeoutError after
        `timeout` seconds, naming those still going."""
        deadline = time.monotonic() + timeout
        _, since = self.poll_events(None, wait=0)    # the cursor first: no event slips between
        done = {}
        for task_id in ids:
            task = self.get(task_id)
            if task["status"] in TERMINAL:
                done[task_id] = task
        pending = set(ids) - set(done)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"tasks still not finished after {timeout}s: {sorted(pending)}")
            started = time.monotonic()
            wait = min(MAX_POLL_WAIT_S, left)
            events, since = self.poll_events(since, wait)
            for event in events:
                task = event.get("task") or {}
                if event.get("task_id") in pending and task.get("status") in TERMINAL:
                    done[event["task_id"]] = task
                    pending.discard(event["task_id"])
            if not events:
                _pause_rest(started, wait)
        return done


def _pause_rest(started, wait):
    # An empty answer before `wait` is up means the server could not hold
    # the poll (its slots are full): wait out the rest here instead of asking
    # again at once.
    rest = started + wait - time.monotonic()
    if rest > 0.05:
        time.sleep(rest)


def _path(part):
    return requests.utils.quote(str(part), safe="")


# -- webhooks ----------------------------------------------------------------

def verify_webhook(headers, body, secrets, tolerance=300, now=None):
    """Check a Standard Webhooks delivery; returns the parsed body.

    `headers`: a mapping (any case), `body`: the raw bytes as received,
    `secrets`: one `whsec_...` secret or several (during a rotation both
    sign). Raises WebhookVerificationError when the headers are missing, the
    timestamp is more than `tolerance` seconds from now, or no signature
    matches any secret. Dedupe on `headers["webhook-id"]`: a delivery may
    come twice."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, signatures = (lower.get(h) for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not (msg_id and stamp and signatures):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        sent_at = int(stamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not a number") from None
    now = time.time() if now is None else now
    if abs(now - sent_at) > tolerance:
        raise WebhookVerificationError("webhook-timestamp is too far from now")
    if isinstance(body, str):
        body = body.encode()
    if isinstance(secrets, (str, bytes)):
        secrets = [secrets]
    signed = msg_id.encode() + b"." + stamp.encode() + b"." + body
    offered = [s.partition(",")[2].encode() for s in signatures.split() if s.startswith("v1,")]
    for secret in secrets:
        expected = base64.b64encode(hmac.new(_secret_bytes(secret), signed, hashlib.sha256).digest())
        # compare_digest with every offered signature, never a short-circuit on content
        if any(hmac.compare_digest(expected, sig) for sig in offered):
            try:
                return json.loads(body)
            except ValueError:
                raise WebhookVerificationError("the signed body is not JSON") from None
    raise WebhookVerificationError("no signature matches")


def _secret_bytes(secret):
    if isinstance(secret, bytes):
        return secret
    if secret.startswith("whsec_"):
        secret = secret[len("whsec_"):]
    try:
        return base64.b64decode(secret, validate=True)
    except ValueError:
        raise WebhookVerificationError("a secret is not whsec_ + base64") from None
