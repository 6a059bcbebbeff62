"""The floor of peer_bench.py's workload A: the least a tracker that keeps
holdfast's promises for a KIE job must do, written as lean as Python
allows, in one process, as `python app.py` is one process. Not holdfast:
a yardstick for what its layers cost.

    python bench/_floor.py --port N --data DIR --kie URL --key K --poll-s P --tokens FILE

Per job, what holdfast does too and no less:
  - the submit over HTTP (waitress, bare Bottle): the bearer token's
    SHA-256 looked up, the task row and its event row in one BEGIN
    IMMEDIATE transaction, 201 with the task as JSON;
  - a lease with a fencing token taken in the store before any call, and
    every later write fenced by it;
  - "submitting" written before the create call (no blind resubmission),
    the provider's job id, status and next poll time after it;
  - the poll schedule in the store (next_at), not in a sleeping thread;
  - the result downloaded with a size limit, checksummed, written to a
    temporary file, fsynced and renamed, before the task is `succeeded`;
  - an event row with each change, in the same transaction.
And no more: no credits, quotas, webhooks, JSON logs, metrics, retries,
dedupe, SSE, migrations, peewee. Every outbound call has a timeout; the
bench bounds the run.

FILE holds one token a line; their hashes are the users.

--with adds one of holdfast's own pieces at a time, to price it in the
same run: `log`, a task's three INFO lines (created, running, succeeded)
through config.setup_logging, as holdfast writes them; `client`, every
provider call through providers/net.py's Client instead of http.client.
"""

import argparse
import hashlib
import http.client
import json
import os
import queue
import secrets
import sqlite3
import sys
import threading
import time
from urllib.parse import urlsplit

import bottle
import waitress

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOG = None      # holdfast's task logger, with --with log

MAX_BYTES = 16 * 1024 * 1024
LEASE_S = 60.0
SCHEMA = """
CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, token_hash TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, user_id INTEGER NOT NULL, status TEXT NOT NULL, params TEXT NOT NULL,
    remote_id TEXT, next_at REAL NOT NULL, lease_until REAL NOT NULL DEFAULT 0,
    lease_token INTEGER NOT NULL DEFAULT 0, files TEXT, created_at REAL NOT NULL, version INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_due ON tasks (status, next_at);
CREATE INDEX IF NOT EXISTS tasks_user ON tasks (user_id, created_at);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, task_id TEXT NOT NULL, user_id INTEGER NOT NULL, status TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS events_user ON events (user_id, id);
"""


class Store:
    """One connection per thread, short BEGIN IMMEDIATE transactions."""

    def __init__(self, path):
        self.path = path
        self.local = threading.local()
        self.conn().executescript(SCHEMA)

    def conn(self):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5)
            for pragma in ("journal_mode=wal", "synchronous=NORMAL", "busy_timeout=5000"):
                conn.execute(f"PRAGMA {pragma}")
            self.local.conn = conn
        return conn

    def write(self, fn):
        conn = self.conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            out = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return out

    def change(self, task, status, fields=""):
        """A fenced update of one task and its event; False when the lease was lost."""
        def fn(conn):
            cur = conn.execute(f"UPDATE tasks SET status = ?, version = version + 1{fields and ', ' + fields} "
                               "WHERE id = ? AND lease_token = ?", (status, *task["args"], task["id"], task["token"]))
            if cur.rowcount != 1:
                return False
            conn.execute("INSERT INTO events (task_id, user_id, status, at) VALUES (?, ?, ?, ?)",
                         (task["id"], task["user"], status, time.time()))
            return True
        return self.write(fn)

    def claim(self, limit):
        now = time.time()

        def fn(conn):
            rows = conn.execute("SELECT id, user_id, status, params, remote_id, lease_token FROM tasks "
                                "WHERE status IN ('queued', 'running') AND next_at <= ? AND lease_until < ? "
                                "ORDER BY next_at LIMIT ?", (now, now, limit)).fetchall()
            if rows:
                marks = ",".join("?" * len(rows))
                conn.execute(f"UPDATE tasks SET lease_token = lease_token + 1, lease_until = ? "
                             f"WHERE id IN ({marks})", (now + LEASE_S, *(r[0] for r in rows)))
            return [{"id": r[0], "user": r[1], "status": r[2], "params": r[3], "remote_id": r[4],
                     "token": r[5] + 1} for r in rows]
        return self.write(fn)


class Kie:
    """The provider over one keep-alive http.client connection per thread."""

    def __init__(self, url, key, holdfast_client=False):
        parts = urlsplit(url)
        self.url, self.host, self.port, self.key = url, parts.hostname, parts.port, key
        self.local = threading.local()
        if holdfast_client:
            from providers.net import AddressPolicy, Client
            self.policy, self.client_class = AddressPolicy(url), Client
            self._call = self._holdfast_call

    def _holdfast_call(self, method, path, body=None, auth=True):
        client = getattr(self.local, "client", None)
        if client is None:
            client = self.local.client = self.client_class(self.policy, MAX_BYTES)
        headers = {"Authorization": f"Bearer {self.key}"} if auth else {}
        answer = client.request(method, self.url + path, what=path, headers_for=lambda url: headers, timeout_s=10,
                                json=None if body is None else json.loads(body))
        if answer.status_code != 200:
            raise RuntimeError(f"{method} {path}: {answer.status_code}")
        return answer.content

    def _call(self, method, path, body=None, auth=True):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        headers = {"Authorization": f"Bearer {self.key}"} if auth else {}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read(MAX_BYTES + 1)
        except Exception:
            conn.close()
            self.local.conn = None
            raise
        if resp.status != 200 or len(data) > MAX_BYTES:
            raise RuntimeError(f"{method} {path}: {resp.status}")
        return data

    def create(self, params):
        return json.loads(self._call("POST", "/api/v1/jobs/createTask", params))["data"]["taskId"]

    def poll(self, job_id):
        data = json.loads(self._call("GET", f"/api/v1/jobs/recordInfo?taskId={job_id}"))["data"]
        return json.loads(data["resultJson"])["resultUrls"] if data["state"] == "success" else None

    def download(self, url):
        return self._call("GET", urlsplit(url).path, auth=False)


class Worker:
    def __init__(self, store, kie, files, poll_s, threads=4):
        self.store, self.kie, self.files, self.poll_s = store, kie, files, poll_s
        self.jobs = queue.Queue()
        self.wake = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        self.threads.append(threading.Thread(target=self._dispatch, daemon=True))

    def start(self):
        for t in self.threads:
            t.start()

    def _dispatch(self):
        while True:
            self.wake.clear()
            tasks = self.store.claim(16)
            for task in tasks:
                self.jobs.put(task)
            if len(tasks) < 16:
                self.wake.wait(0.05)        # a poll falls due at most 50 ms late

    def _run(self):
        while True:
            task = self.jobs.get()
            try:
                self._step(task)
            except Exception as exc:        # the lease expires and another claim retries
                print(f"floor: task {task['id']}: {exc!r}", file=sys.stderr, flush=True)

    def _step(self, task):
        if task["remote_id"] is None:
            task["args"] = ()
            if not self.store.change(task, "submitting"):
                return
            remote = self.kie.create(task["params"])
            task["args"] = (remote, time.time() + self.poll_s)
            if self.store.change(task, "running", "remote_id = ?, next_at = ?, lease_until = 0") and LOG:
                LOG.info("task %s user %s kie: queued -> running; %s", task["id"], task["user"], remote)
            return
        urls = self.kie.poll(task["remote_id"])
        if urls is None:
            task["args"] = (time.time() + self.poll_s,)
            self.store.change(task, "running", "next_at = ?, lease_until = 0")
            return
        folder = os.path.join(self.files, task["id"], str(task["token"]))
        os.makedirs(folder, exist_ok=True)
        files = []
        for n, url in enumerate(urls):
            body = self.kie.download(url)
            final = os.path.join(folder, f"{n}.png")
            tmp = f"{final}.{secrets.token_hex(4)}.part"
            with open(tmp, "wb") as fh:
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            files.append({"name": f"{n}.png", "size": len(body), "sha256": hashlib.sha256(body).hexdigest()})
        task["args"] = (json.dumps(files),)
        if self.store.change(task, "succeeded", "files = ?, lease_until = 0") and LOG:
            LOG.info("task %s user %s kie: running -> succeeded", task["id"], task["user"])


def make_app(store, worker):
    app = bottle.Bottle()

    @app.post("/api/tasks")
    def submit():
        auth = bottle.request.get_header("Authorization", "")
        token_hash = hashlib.sha256(auth.removeprefix("Bearer ").encode()).hexdigest()
        row = store.conn().execute("SELECT id FROM users WHERE token_hash = ?", (token_hash,)).fetchone()
        if row is None:
            bottle.response.status = 401
            return {"error": {"code": "unauthorized", "message": "unknown token"}}
        body = bottle.request.json
        if not isinstance(body, dict) or not isinstance(body.get("params"), dict):
            bottle.response.status = 400
            return {"error": {"code": "invalid_input", "message": "params must be an object"}}
        now = time.time()
        task = {"id": "t_" + secrets.token_hex(12), "status": "queued", "provider": body.get("provider"),
                "created_at": now, "version": 1}

        def fn(conn):
            conn.execute("INSERT INTO tasks (id, user_id, status, params, next_at, created_at, version) "
                         "VALUES (?, ?, 'queued', ?, ?, ?, 1)",
                         (task["id"], row[0], json.dumps(body["params"]), now, now))
            conn.execute("INSERT INTO events (task_id, user_id, status, at) VALUES (?, ?, 'queued', ?)",
                         (task["id"], row[0], now))
        store.write(fn)
        if LOG:
            LOG.info("task %s user %s %s: created (queued)", task["id"], row[0], task["provider"])
        worker.wake.set()
        bottle.response.status = 201
        return task

    return app


def main():
    parser = argparse.ArgumentParser()
    for flag in ("--data", "--kie", "--key", "--tokens"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--poll-s", type=float, default=0.5)
    parser.add_argument("--with", dest="pieces", default="", help="holdfast's pieces to add: log,client")
    args = parser.parse_args()
    pieces = {p for p in args.pieces.split(",") if p}
    if pieces - {"log", "client"}:
        parser.error("--with takes log,client")
    if "log" in pieces:
        global LOG
        import logging

        from config import setup_logging
        setup_logging("text")
        LOG = logging.getLogger("holdfast.tasks")
    store = Store(os.path.join(args.data, "floor.db"))
    with open(args.tokens) as fh:
        hashes = [(hashlib.sha256(line.strip().encode()).hexdigest(),) for line in fh if line.strip()]
    store.write(lambda conn: conn.executemany("INSERT OR IGNORE INTO users (token_hash) VALUES (?)", hashes))
    worker = Worker(store, Kie(args.kie, args.key, "client" in pieces), os.path.join(args.data, "files"), args.poll_s)
    worker.start()
    print(f"floor serving on http://127.0.0.1:{args.port}", flush=True)
    waitress.serve(make_app(store, worker), host="127.0.0.1", port=args.port, threads=8, _quiet=True)


if __name__ == "__main__":
    sys.exit(main())
