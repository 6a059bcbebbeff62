"""The floor of peer_bench.py's workload A: the least a tracker that keeps
holdfast's promises for a KIE job must do, written as lean as Python
allows, in one process, as `python app.py` is one process. Not holdfast:
a yardstick for what its layers cost.

    python bench/_floor.py --port N --data DIR --kie URL --key K --poll-s P --tokens FILE

Per job, what holdfast does too and no less:
  - the submit over HTTP (waitress changed as holdfast changes it: its
    loop kept from spinning, an answer in one send, idle threads woken
    newest first; bare Bottle): the bearer token's SHA-256 looked up, a
    per-user rate limit, the user's active tasks counted (429 queue
    full), the task row and its event row in one BEGIN IMMEDIATE
    transaction, 201 with the contract's task JSON;
  - a lease with a fencing token taken in the store before any call, and
    every later write fenced by it;
  - "submitting" written before the create call (no blind resubmission),
    the provider's job id, status and next poll time after it;
  - the poll schedule in the store (next_at), not in a sleeping thread;
  - the result downloaded with a size limit, checksummed, written to a
    temporary file, fsynced and renamed, before the task is `succeeded`;
  - an event row with each change, in the same transaction, holding the
    task's JSON as the contract's events carry it; version grows with
    every change, and an ended task is never changed again.
Its threads run on one CPU, as holdfast's do (cpu.py; --cpu all spreads
them): placed otherwise, the floor would price the placement, not the work.
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
    id TEXT PRIMARY KEY, user_id INTEGER NOT NULL, provider TEXT NOT NULL, status TEXT NOT NULL,
    step TEXT, params TEXT NOT NULL, external_id TEXT, attempts INTEGER NOT NULL DEFAULT 0, files TEXT,
    next_at REAL NOT NULL, lease_until REAL NOT NULL DEFAULT 0, lease_token INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL, started_at TEXT, finished_at TEXT,
    deadline_at TEXT NOT NULL, version INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_due ON tasks (status, next_at);
CREATE INDEX IF NOT EXISTS tasks_user ON tasks (user_id, status);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, task_id TEXT NOT NULL, user_id INTEGER NOT NULL, type TEXT NOT NULL,
    task TEXT NOT NULL);
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

    def change(self, held, release=False, next_at=None, **fields):
        """A fenced update of a held task (held["task"] is its JSON as the
        lease last saw it) and its event with the task as it now is; False
        when the lease was lost or the task had ended."""
        task = held["task"]
        task.update(fields, updated_at=iso(time.time()), version=task["version"] + 1)
        fields["updated_at"], fields["version"] = task["updated_at"], task["version"]
        if "files" in fields:
            fields["files"] = json.dumps(fields["files"])
        if next_at is not None:
            fields["next_at"] = next_at
        if release:
            fields["lease_until"] = 0
        kind = "finished" if task["status"] in TERMINAL else "updated"

        def fn(conn):
            cur = conn.execute(f"UPDATE tasks SET {', '.join(f'{k} = ?' for k in fields)} "
                               "WHERE id = ? AND lease_token = ? AND status NOT IN ('succeeded', 'failed')",
                               (*fields.values(), task["id"], held["token"]))
            if cur.rowcount != 1:
                return False
            conn.execute("INSERT INTO events (task_id, user_id, type, task) VALUES (?, ?, ?, ?)",
                         (task["id"], held["user"], kind, json.dumps(task)))
            return True
        return self.write(fn)

    def claim(self, limit):
        now = time.time()

        def fn(conn):
            rows = conn.execute(f"SELECT {', '.join(COLUMNS)}, user_id, lease_token FROM tasks "
                                "WHERE status IN ('queued', 'running') AND next_at <= ? AND lease_until < ? "
                                "ORDER BY next_at LIMIT ?", (now, now, limit)).fetchall()
            if rows:
                marks = ",".join("?" * len(rows))
                conn.execute(f"UPDATE tasks SET lease_token = lease_token + 1, lease_until = ? "
                             f"WHERE id IN ({marks})", (now + LEASE_S, *(r[0] for r in rows)))
            return [{"task": task_json(r), "user": r[-2], "token": r[-1] + 1} for r in rows]
        return self.write(fn)


TERMINAL = ("succeeded", "failed")
COLUMNS = ("id", "provider", "status", "step", "params", "external_id", "attempts", "files", "created_at",
           "updated_at", "started_at", "finished_at", "deadline_at", "version")


def task_json(row):
    """The contract's task JSON from a row of COLUMNS (what the floor keeps of it)."""
    task = dict(zip(COLUMNS, row))
    task["params"] = json.loads(task["params"])
    task["files"] = json.loads(task["files"] or "[]")
    task.update(progress=1.0 if task["status"] == "succeeded" else 0.0, dedupe_key=None, error=None,
                cost=0, credits="none")
    return task


def iso(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


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

    def _step(self, held):
        task = held["task"]
        if task["external_id"] is None:
            if task["step"] == "submitting":
                return      # a crash between this write and the next: in doubt, and never sent twice
            if not self.store.change(held, step="submitting", attempts=task["attempts"] + 1):
                return
            remote = self.kie.create(json.dumps(task["params"]))
            if self.store.change(held, True, time.time() + self.poll_s, status="running", step="submitted",
                                 external_id=remote, started_at=iso(time.time())) and LOG:
                LOG.info("task %s user %s kie: queued -> running; %s", task["id"], held["user"], remote)
            return
        urls = self.kie.poll(task["external_id"])
        if urls is None:
            self.store.change(held, True, time.time() + self.poll_s, step="generating")
            return
        folder = os.path.join(self.files, task["id"], str(held["token"]))
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
            files.append({"name": f"{n}.png", "size": len(body), "sha256": hashlib.sha256(body).hexdigest(),
                          "content_type": "image/png", "url": f"/api/tasks/{task['id']}/files/{n}.png"})
        if self.store.change(held, True, status="succeeded", step="done", files=files,
                             finished_at=iso(time.time())) and LOG:
            LOG.info("task %s user %s kie: running -> succeeded", task["id"], held["user"])


def make_app(store, worker, max_active=100_000, rate_per_s=10_000):
    app = bottle.Bottle()
    buckets = {}            # user -> (tokens, at): the per-user rate limit
    lock = threading.Lock()

    def error(status, code, message):
        bottle.response.status = status
        return {"error": {"code": code, "message": message}}

    @app.post("/api/tasks")
    def submit():
        auth = bottle.request.get_header("Authorization", "")
        token_hash = hashlib.sha256(auth.removeprefix("Bearer ").encode()).hexdigest()
        row = store.conn().execute("SELECT id FROM users WHERE token_hash = ?", (token_hash,)).fetchone()
        if row is None:
            return error(401, "unauthorized", "unknown token")
        user, now = row[0], time.time()
        with lock:
            tokens, at = buckets.get(user, (rate_per_s, now))
            tokens = min(rate_per_s, tokens + (now - at) * rate_per_s)
            if tokens < 1:
                return error(429, "rate_limited", "too many submissions")
            buckets[user] = (tokens - 1, now)
        body = bottle.request.json
        if not isinstance(body, dict) or body.get("provider") != "kie" or not isinstance(body.get("params"), dict):
            return error(400, "invalid_input", "provider must be kie and params an object")
        task = {"id": "t_" + secrets.token_hex(12), "provider": "kie", "status": "queued", "step": None,
                "progress": 0.0, "dedupe_key": None, "params": body["params"], "external_id": None,
                "attempts": 0, "files": [], "error": None, "cost": 0, "credits": "none",
                "created_at": iso(now), "updated_at": iso(now), "started_at": None, "finished_at": None,
                "deadline_at": iso(now + 7200), "version": 1}

        def fn(conn):
            active = conn.execute("SELECT count(*) FROM tasks WHERE user_id = ? AND status IN ('queued', 'running')",
                                  (user,)).fetchone()[0]
            if active >= max_active:
                return False
            conn.execute("INSERT INTO tasks (id, user_id, provider, status, params, next_at, created_at, "
                         "updated_at, deadline_at, version) VALUES (?, ?, 'kie', 'queued', ?, ?, ?, ?, ?, 1)",
                         (task["id"], user, json.dumps(body["params"]), now, task["created_at"],
                          task["updated_at"], task["deadline_at"]))
            conn.execute("INSERT INTO events (task_id, user_id, type, task) VALUES (?, ?, 'created', ?)",
                         (task["id"], user, json.dumps(task)))
            return True
        if not store.write(fn):
            return error(429, "queue_full", f"{max_active} tasks active")
        if LOG:
            LOG.info("task %s user %s kie: created (queued)", task["id"], user)
        worker.wake.set()
        bottle.response.status = 201
        return {"task": task, "deduplicated": False}

    return app


def main():
    parser = argparse.ArgumentParser()
    for flag in ("--data", "--kie", "--key", "--tokens"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--poll-s", type=float, default=0.5)
    parser.add_argument("--with", dest="pieces", default="", help="holdfast's pieces to add: log,client")
    parser.add_argument("--cpu", default="auto", help="as HOLDFAST_CPU: auto (one CPU, as holdfast), all, or N")
    args = parser.parse_args()
    # Placed as `python app.py` places its threads (cpu.py), before any starts.
    import cpu
    cpu.confine(cpu.check(args.cpu))
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
    from waitress.channel import HTTPChannel

    from api.server import Dispatcher, OneSend, QuietLoop

    class Channel(QuietLoop, HTTPChannel):
        """waitress's own, changed as holdfast's is: its loop kept from
        spinning, an answer's head sent with its body. A floor without
        them would price waitress's ways, not the work."""
        task_class = OneSend

    threads = 8
    pool = Dispatcher()         # idle threads woken newest first, as holdfast's
    pool.set_thread_count(threads)      # waitress leaves a pool it is handed as it is
    server = waitress.create_server(make_app(store, worker), host="127.0.0.1", port=args.port, threads=threads,
                                    _dispatcher=pool)
    server.channel_class = Channel
    print(f"floor serving on http://127.0.0.1:{args.port}", flush=True)
    server.run()


if __name__ == "__main__":
    sys.exit(main())
