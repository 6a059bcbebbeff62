"""Test helpers: an in-process WSGI client, a real server in a subprocess,
and the switch that turns a missing service into a failure on CI."""

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from urllib.parse import urlencode

import pytest
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def require(available, reason):
    """Skip a test that needs a service this machine lacks, unless
    HOLDFAST_REQUIRE_SERVICES=1 (set by .ci/run) makes that a failure."""
    if available:
        return
    if os.environ.get("HOLDFAST_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (HOLDFAST_REQUIRE_SERVICES=1 forbids skipping)")
    pytest.skip(reason)


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.body[:200]!r}>"


class WSGIClient:
    """Calls a WSGI app in-process, as a server would."""

    def __init__(self, app, token=None):
        self.app = app
        self.token = token

    def as_user(self, token):
        return WSGIClient(self.app, token)

    def request(self, method, path, *, json_body=None, data=None, headers=None, query=None, token=...):
        body = data if data is not None else (b"" if json_body is None else json.dumps(json_body).encode())
        if isinstance(body, str):
            body = body.encode()
        path, _, qs = path.partition("?")
        if query:
            qs = urlencode(query)
        environ = {
            "REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": qs,
            "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False,
            "wsgi.run_once": False, "CONTENT_LENGTH": str(len(body)),
            "CONTENT_TYPE": "application/json",
        }
        token = self.token if token is ... else token
        if token:
            environ["HTTP_AUTHORIZATION"] = f"Bearer {token}"
        for name, value in (headers or {}).items():
            key = name.upper().replace("-", "_")
            if key == "CONTENT_LENGTH":
                environ[key] = value
            else:
                environ["HTTP_" + key] = value
        captured = {}

        def start_response(status, response_headers, exc_info=None):
            captured["status"] = int(status.split()[0])
            captured["headers"] = {k.lower(): v for k, v in response_headers}

        chunks = self.app(environ, start_response)
        try:
            out = b"".join(chunks)
        finally:
            if hasattr(chunks, "close"):
                chunks.close()
        return Response(captured["status"], captured["headers"], out)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, json_body=None, **kw):
        return self.request("POST", path, json_body=json_body, **kw)


def run_until_done(worker, clock, client, token, task_id, limit=40):
    """Move a worker by a test clock until the task ends; its last JSON."""
    for _ in range(limit):
        worker.run_once(clock())
        task = client.get(f"/api/tasks/{task_id}", token=token).json()["task"]
        if task["status"] in ("succeeded", "partial", "failed", "cancelled"):
            return task
        clock.advance(0.5)
    raise AssertionError(f"task did not finish: {task}")



def submit_until(stop, post, next_key, acked, unanswered, errors, pause):
    """A client that submits task after task until `stop` is set: the load of
    the kill -9 tests. `post(key)` sends one submission with that dedupe key;
    answered ones go into `acked` ({key: task id}), keys that got no answer
    (the server was killed) into `unanswered`, to be sent again after the
    restart; an answer that is not 200, 201 or 429 goes into `errors` and
    ends the client. `pause()` is the think time between submissions."""
    key = None
    while not stop.is_set():
        key = key or next_key()
        try:
            res = post(key)
        except requests.RequestException:
            unanswered.append(key)
            key = None
            continue
        if res.status_code == 429:        # a polite client waits, then tries the same key
            time.sleep(min(float(res.headers.get("Retry-After", 1)), 1.0))
            continue
        if res.status_code not in (200, 201):
            errors.append(f"{res.status_code} {res.text}")
            return
        acked[key] = res.json()["task"]["id"]
        key = None
        time.sleep(pause())

def wait_for(check, timeout=10.0, what="condition", step=0.05):
    """check()'s first truthy value, asked every `step` seconds; an
    AssertionError naming `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python app.py` in a subprocess on 127.0.0.1 and a free port."""

    def __init__(self, data_dir, env=None, port=None, wrap=()):
        """`wrap`: a command that runs the server, e.g. `unshare --pid --fork
        --kill-child --mount-proc` for one in a PID namespace of its own."""
        self.wrap = list(wrap)
        self.data_dir = str(data_dir)
        self.port = port or free_port()
        self.env = {**os.environ, "HOLDFAST_DATA": self.data_dir, "HOLDFAST_PORT": str(self.port),
                    "HOLDFAST_HOST": "127.0.0.1", "HOLDFAST_CONFIG": os.path.join(self.data_dir, "none.toml"),
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        if not os.path.exists(self.env["HOLDFAST_CONFIG"]):
            self.env.pop("HOLDFAST_CONFIG")
        self.proc = None
        self.tokens = {}
        self.log_path = os.path.join(self.data_dir, f"server-{self.port}.log")

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout=20):
        os.makedirs(self.data_dir, exist_ok=True)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*self.wrap, sys.executable, os.path.join(ROOT, "app.py")], cwd=self.data_dir,
                                     env=self.env, stdout=subprocess.PIPE, stderr=self.log)
        deadline = time.time() + timeout
        lines = []
        while time.time() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"server exited: {lines}\n{self.read_log()}")
            lines.append(line)
            m = re.match(r"\s+(admin|demo)\s+(hf_\S+)", line)
            if m:
                self.tokens[m.group(1)] = m.group(2)
            if line.startswith("holdfast serving on"):
                break
        else:
            raise RuntimeError(f"server did not start: {lines}")
        while time.time() < deadline:
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError("server never became healthy:\n" + self.read_log())

    def read_log(self):
        try:
            with open(self.log_path, errors="replace") as fh:
                return fh.read()[-5000:]
        except OSError:
            return ""

    @property
    def pid(self):
        """The server's own process: under `wrap`, the wrapper's child."""
        if not self.wrap:
            return self.proc.pid
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as fh:
            return int(fh.read().split()[0])

    def kill(self):
        """SIGKILL: no cleanup, no goodbye."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._close()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                pass         # gone already; the wait below says so
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._close()

    def _close(self):
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def api(server, token):
    """A requests session for one user of a real server."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    session.base = server.url
    return session


# Before a page's scripts: every Content-Security-Policy violation the
# browser reports, as "directive blocked-uri" in window.__csp.
CSP_WATCH = """
window.__csp = [];
document.addEventListener('securitypolicyviolation',
  (e) => window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`));
"""


@contextmanager
def paying_server(tmp_path, credits):
    """A real server where a demo task costs a credit, and a user "payer"
    with `credits` of them (its token in tokens["payer"])."""
    (tmp_path / "holdfast.toml").write_text("[providers.demo]\ncost = 1\n")
    s = ServerProcess(tmp_path, env={"HOLDFAST_CONFIG": str(tmp_path / "holdfast.toml")}).start()
    try:
        res = api(s, s.tokens["admin"]).post(s.url + "/api/admin/users", timeout=10,
                                             json={"name": "payer", "credits": credits})
        assert res.status_code == 201, res.text
        s.tokens["payer"] = res.json()["token"]
        yield s
    finally:
        s.stop()


def query_plans(sqlite_store, *calls):
    """[(sql, plan)] for every statement about the tasks table that the
    calls run on this thread's SQLite connection or the write connection: what a scan would cost
    at a million rows, seen without building them."""
    statements = []
    conn = sqlite_store.db.connection()
    writer = sqlite_store.write_connection()     # where the writes run
    for watched in {conn, writer}:
        watched.set_trace_callback(statements.append)
    try:
        for call in calls:
            call()
    finally:
        for watched in {conn, writer}:
            watched.set_trace_callback(None)
    return [(sql, " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)))
            for sql in statements if " tasks " in sql + " " and not sql.startswith(("EXPLAIN", "BEGIN"))]


def moto_available():
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError:
        return False
    return True


class MotoServer:
    """moto's S3-protocol server (`python -m moto.server`) on 127.0.0.1 and
    a free port, for the object store's tests: no MinIO binary can be
    installed where these tests run."""

    KEYS = {"AWS_ACCESS_KEY_ID": "holdfast-test", "AWS_SECRET_ACCESS_KEY": "holdfast-test-secret",
            "AWS_REGION": "us-east-1"}

    def __init__(self, port=None):
        self.port = port or free_port()
        self.proc = None
        self.buckets = 0

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout=30):
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("moto's server exited")
            try:
                requests.get(self.url + "/moto-api/", timeout=1)
                return self
            except requests.RequestException:
                time.sleep(0.1)
        raise RuntimeError("moto's server did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=self.KEYS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.KEYS["AWS_SECRET_ACCESS_KEY"])

    def new_bucket(self):
        """A fresh, empty bucket's name: each test has its own."""
        self.buckets += 1
        name = f"hf-test-{os.getpid()}-{self.buckets}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, bucket, prefix="files", **extra):
        """The variables that point a holdfast process at `bucket`."""
        return {**self.KEYS, "HOLDFAST_FILES": f"s3://{bucket}/{prefix}", "HOLDFAST_S3_ENDPOINT": self.url,
                "HOLDFAST_S3_ADDRESSING": "path", **extra}
