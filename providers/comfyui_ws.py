"""ComfyUI's WebSocket (`/ws?clientId=`): live progress, and an early word
that a job ended.

ComfyUI sends the messages of a prompt to the socket whose clientId the
prompt was submitted with. ProgressSocket holds one such socket per
provider, in a thread of its own, reconnecting with backoff. It turns
`progress` {value, max, prompt_id, node} into a step such as
`KSampler 12/20` and a progress of value/max, reported at most every
REPORT_EVERY_S per job (the latest wins), and says a job ended on
`executing` with node null, which ComfyUI sends once the job is in its
history. `execution_success`, `execution_error` and `execution_interrupted`
come just before the history is written, so they count as the end only if
that `executing` does not follow within END_GRACE_S. A job whose end was
told and that the adapter's poll has not yet seen in the history (a poll
that read it a moment too early, then scheduled the next one as usual) is
told once more REMIND_S later. Binary frames (preview images) and other
messages are ignored.

Everything here is a hint: ComfyUI drops messages (while nobody is
connected, or when a socket is slow), so /history and /queue, polled as
always, remain the truth. A socket that cannot connect is logged once, and
its provider's tasks are polled as if it were not there.
"""

import json
import logging
import random
import threading
import time
from collections import OrderedDict
from urllib.parse import quote, urlsplit, urlunsplit

log = logging.getLogger("holdfast.providers")

# Preview images come as binary frames; a larger frame closes the socket
# (and it reconnects) rather than filling memory.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MAX_QUEUE = 4               # frames received and not yet read: at most this many of that size
PING_S = 20.0               # a ping this often; no pong within as long closes the socket
CLOSE_S = 2.0
REPORT_EVERY_S = 0.5        # progress reports per job: at most two a second
END_GRACE_S = 1.0
REMIND_S = 2.0
STEADY_S = 30.0             # a connection that lasted this long starts the backoff over
READ_S = 0.5                # the longest the reading thread waits before it looks at its timers
BACKOFF_S = (1, 2, 4, 8, 15, 30, 60)
MAX_WATCHED = 10_000        # jobs remembered; the oldest are forgotten first
MAX_LABEL = 200
_ENDS = ("execution_success", "execution_error", "execution_interrupted")


def websockets_module():
    """The `websockets` package, or None with a one-line hint."""
    try:
        import websockets.sync.client  # noqa: F401
        import websockets.exceptions  # noqa: F401
    except ImportError:
        log.warning("the websockets package is not installed: ComfyUI tasks are polled without live "
                    "progress (pip install websockets)")
        return None
    import websockets
    return websockets


def ws_url(url, client_id):
    """ComfyUI's socket address under its HTTP `url`."""
    parts = urlsplit(url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws",
                       "clientId=" + quote(client_id, safe=""), ""))


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and abs(value) != float("inf")


class ProgressSocket:
    """One WebSocket to a ComfyUI server, in its own thread.

    `watch(prompt_id, task_id, workflow)` before submitting a prompt;
    `on_progress(task_id, step, progress)` and `on_done(task_id)` are called
    from the socket's thread (they must be quick and must not raise);
    `latest(prompt_id)` is the last (step, progress) heard for a job.
    """

    def __init__(self, name, url, client_id, *, on_progress, on_done, open_timeout, websockets,
                 clock=time.monotonic):
        self.name = name
        self.url = ws_url(url, client_id)
        self.on_progress = on_progress
        self.on_done = on_done
        self.open_timeout = open_timeout
        self._ws = websockets
        self._clock = clock
        self._jobs = OrderedDict()      # prompt_id -> what is known of the job
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conn = None
        self._thread = None
        self._current = None            # the prompt ComfyUI runs now (progress of older ones names none)
        self._told = None               # the failure last logged, until a connection works again
        self.connects = 0
        self.messages = 0

    # -- what the adapter and the worker call ------------------------------------

    def watch(self, prompt_id, task_id, workflow):
        nodes = {str(k): v.get("class_type") for k, v in (workflow or {}).items()
                 if isinstance(v, dict) and isinstance(v.get("class_type"), str)}
        with self._lock:
            self._jobs[str(prompt_id)] = {"task": task_id, "nodes": nodes, "step": None, "progress": None,
                                          "reported": None, "at": None, "ended": None, "done": False,
                                          "remind": None}
            self._jobs.move_to_end(str(prompt_id))
            while len(self._jobs) > MAX_WATCHED:
                self._jobs.popitem(last=False)

    def forget(self, prompt_id):
        """The adapter saw the job end in the history: nothing more to tell."""
        with self._lock:
            self._jobs.pop(str(prompt_id), None)

    def latest(self, prompt_id):
        with self._lock:
            job = self._jobs.get(str(prompt_id))
            if job is None or job["step"] is None:
                return None
            return job["step"], job["progress"]

    def start(self):
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"holdfast-ws-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout=1.0):
        """Close the socket and end the thread, waiting at most `timeout`
        (a shutdown must be quick): a connect or a close handshake still
        under way ends by its own timeout, in a daemon thread."""
        self._stop.set()
        conn = self._conn
        if conn is not None:
            try:
                conn.close()
            except Exception:   # closing a socket that broke: nothing left to close
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the socket's thread ---------------------------------------------------

    def _run(self):
        failures = 0
        while not self._stop.is_set():
            try:
                conn = self._ws.sync.client.connect(
                    self.url, open_timeout=self.open_timeout, ping_interval=PING_S, ping_timeout=PING_S,
                    close_timeout=CLOSE_S, max_size=MAX_MESSAGE_BYTES, max_queue=MAX_QUEUE,
                    # Provider traffic never goes through environment proxies
                    # (README); the address is the provider's own, which its
                    # address policy always allows.
                    proxy=None)
            except Exception as exc:   # refused, timed out, not a WebSocket (404): all mean "poll"
                failures += 1
                self._failed(f"cannot connect to {self.url}: {_reason(exc)}")
            else:
                self._conn = conn
                self.connects += 1
                connected = self._clock()
                if self._told is not None:
                    log.info("%s: live progress over %s works again", self.name, self.url)
                    self._told = None
                try:
                    # As a context manager, which newer websockets expect of
                    # a connection they opened.
                    with conn:
                        self._read(conn)
                except Exception as exc:   # the connection broke or closed
                    if not self._stop.is_set():
                        self._failed(f"the socket at {self.url} closed: {_reason(exc)}")
                finally:
                    self._conn = None
                    try:
                        conn.close()
                    except Exception:
                        pass
                # One that keeps closing soon after it opens backs off as a
                # refused one does.
                failures = 1 if self._clock() - connected >= STEADY_S else failures + 1
            delay = BACKOFF_S[min(failures, len(BACKOFF_S)) - 1] * random.uniform(0.8, 1.2)
            self._stop.wait(delay)

    def _failed(self, reason):
        """One line when the socket stops working, not one per retry."""
        if self._told is None:
            log.warning("%s: no live progress (%s); its tasks are polled as before, and the socket is "
                        "tried again in the background", self.name, reason)
        else:
            log.debug("%s: %s", self.name, reason)
        self._told = reason

    def _read(self, conn):
        while not self._stop.is_set():
            try:
                message = conn.recv(timeout=self._wait())
            except TimeoutError:
                message = None
            if isinstance(message, str):
                self.messages += 1
                self._handle(message)
            self._report()

    def _wait(self):
        """How long the next read may wait before a report falls due."""
        now, wait = self._clock(), READ_S
        with self._lock:
            for job in self._jobs.values():
                if job["done"]:
                    if job["remind"] is not None:
                        wait = min(wait, job["remind"] - now)
                    continue
                if job["ended"] is not None:
                    wait = min(wait, job["ended"] + END_GRACE_S - now)
                if job["step"] is not None and (job["step"], job["progress"]) != job["reported"]:
                    wait = min(wait, (job["at"] or now) + REPORT_EVERY_S - now)
        return max(0.0, wait)

    def _handle(self, text):
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):
            return
        if not isinstance(message, dict) or not isinstance(message.get("data"), dict):
            return
        kind, data = message.get("type"), message["data"]
        prompt_id = data.get("prompt_id")
        prompt_id = str(prompt_id) if prompt_id is not None else None
        if kind in ("execution_start", "executing") and prompt_id is not None:
            self._current = prompt_id
        now = self._clock()
        with self._lock:
            if kind == "progress":
                self._progress(self._jobs.get(prompt_id or self._current), data)
            elif kind == "executing" and data.get("node") is None and prompt_id is not None:
                job = self._jobs.get(prompt_id)
                if job is not None:
                    job["ended"] = now - END_GRACE_S   # in the history now: due at once
            elif kind in _ENDS and prompt_id is not None:
                job = self._jobs.get(prompt_id)
                if job is not None and job["ended"] is None:
                    job["ended"] = now

    def _progress(self, job, data):
        value, top = data.get("value"), data.get("max")
        if job is None or job["done"] or not (_number(value) and _number(top)) or top <= 0:
            return
        node = data.get("node")
        label = job["nodes"].get(str(node)) if node is not None else None
        label = label or (f"node {node}" if node is not None else "generating")
        job["step"] = f"{label} {value:g}/{top:g}"[:MAX_LABEL]
        job["progress"] = round(min(1.0, max(0.0, value / top)), 3)

    def _report(self):
        """Call back for what fell due: progress not reported for
        REPORT_EVERY_S, jobs whose end was heard."""
        now = self._clock()
        progress, done = [], []
        with self._lock:
            for job in self._jobs.values():
                if job["done"]:
                    if job["remind"] is not None and now >= job["remind"]:
                        job["remind"] = None
                        done.append(job["task"])
                    continue
                if job["ended"] is not None and now >= job["ended"] + END_GRACE_S:
                    job["done"], job["remind"] = True, now + REMIND_S
                    done.append(job["task"])
                    continue
                state = (job["step"], job["progress"])
                if job["step"] is not None and state != job["reported"] and \
                        (job["at"] is None or now - job["at"] >= REPORT_EVERY_S):
                    job["reported"], job["at"] = state, now
                    progress.append((job["task"], *state))
        for task_id, step, value in progress:
            self.on_progress(task_id, step, value)
        for task_id in done:
            self.on_done(task_id)


def _reason(exc):
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."
