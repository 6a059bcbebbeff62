"""Webhooks out: how many deliveries a second the worker sustains to a local
receiver while 1,000 tasks finish.

    .venv/bin/python bench/webhook_bench.py [--tasks 1000] [--receivers 1]
        [--per-endpoint 2] [--threads 8]

A real holdfast server (SQLite, in a subprocess) gets `--tasks` demo tasks
that take no time (duration_s 0), each with a `webhook` URL on one of
`--receivers` receivers in this process (ThreadingHTTPServer, answering 200
at once, each its own port: its own in-flight cap). Submissions go in from
8 threads. The figure is finished deliveries over the time from the first
to the last arrival, while the tasks themselves are finishing; with it,
the time from a task's `finished_at` to its delivery's arrival (p50, p99).
There the tasks' own pace (the demo provider's steps) bounds the figure.

    .venv/bin/python bench/webhook_bench.py --backlog [--tasks 1000]

measures the sender alone: the tasks are finished first, straight in an
SQLite store, and a Deliverer (threads and cap as above) then sends the
backlog of finished deliveries; the figure is how fast it drains.
"""

import argparse
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

from _common import PYTHON, ROOT, Server, free_port, percentile, table, temp_dir

ADMIN = "bench-admin-token-0123456789"


class Receiver:
    def __init__(self):
        self.arrivals = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                at = time.time()
                msg = json.loads(body)
                with receiver.lock:
                    receiver.arrivals.append((at, self.headers["webhook-id"], msg["data"]["task"]))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def _ts(text):
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=__import__("datetime").timezone.utc).timestamp()


def run(args):
    receivers = [Receiver() for _ in range(args.receivers)]
    with temp_dir("webhooks") as data:
        env = {"HOLDFAST_DATA": data, "HOLDFAST_PORT": str(free_port()), "HOLDFAST_ADMIN_TOKEN": ADMIN,
               "HOLDFAST_WEBHOOK_ALLOW_PRIVATE": "1", "HOLDFAST_MAX_ACTIVE": str(args.tasks * 2),
               "HOLDFAST_RATE_PER_S": "100000", "HOLDFAST_WEBHOOK_PER_ENDPOINT": str(args.per_endpoint),
               "HOLDFAST_WEBHOOK_THREADS": str(args.threads), "HOLDFAST_LOG": "json"}
        env.pop("HOLDFAST_CONFIG", None)
        with Server([PYTHON, os.path.join(ROOT, "app.py")], port=int(env["HOLDFAST_PORT"]), cwd=data,
                    env=env, log_path=os.path.join(data, "server.log")) as server:
            session = requests.Session()
            headers = {"Authorization": f"Bearer {ADMIN}"}

            def submit(i):
                r = session.post(server.url + "/api/tasks", headers=headers, timeout=30, json={
                    "provider": "demo", "params": {"prompt": f"bench {i}", "duration_s": 0},
                    "webhook": receivers[i % len(receivers)].url})
                r.raise_for_status()

            started = time.time()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(submit, range(args.tasks)))
            submitted = time.time() - started
            deadline = time.time() + args.timeout
            while time.time() < deadline:
                if sum(len(r.arrivals) for r in receivers) >= args.tasks:
                    break
                time.sleep(0.2)
    for r in receivers:
        r.stop()
    arrivals = sorted(a for r in receivers for a in r.arrivals)
    ids = {a[1] for a in arrivals}
    tasks = {a[2]["id"] for a in arrivals}
    window = arrivals[-1][0] - arrivals[0][0] if len(arrivals) > 1 else float("nan")
    finished = sorted(_ts(a[2]["finished_at"]) for a in arrivals)
    lags = [a[0] - _ts(a[2]["finished_at"]) for a in arrivals]
    rows = [
        ["tasks submitted", f"{args.tasks} in {submitted:.1f} s"],
        ["tasks finishing", f"{finished[-1] - finished[0]:.1f} s, first to last"],
        ["deliveries received", f"{len(arrivals)} ({len(ids)} webhook-ids, {len(tasks)} tasks)"],
        ["first to last delivery", f"{window:.1f} s"],
        ["deliveries per second", f"{(len(arrivals) - 1) / window:.0f}"],
        ["finished_at -> arrival p50", f"{percentile(lags, 50) * 1000:.0f} ms"],
        ["finished_at -> arrival p99", f"{percentile(lags, 99) * 1000:.0f} ms"],
    ]
    table(["", f"{args.receivers} receiver(s), {args.per_endpoint} in flight each, "
                     f"{args.threads} sender threads"], rows)


def backlog(args):
    from store import SqliteStore
    from worker.deliver import Deliverer
    receivers = [Receiver() for _ in range(args.receivers)]
    with temp_dir("webhooks-backlog") as data:
        store = SqliteStore(os.path.join(data, "holdfast.db"))
        user, _ = store.create_user("bench")
        now = time.time()
        for i in range(args.tasks):
            task, _ = store.submit(user["id"], "demo", {"i": i}, now=now, deadline_at=now + 3600,
                                   webhook={"url": receivers[i % len(receivers)].url, "events": ["finished"]})
            store.update(task["id"], token=None, now=now, status="running")
            store.update(task["id"], token=None, now=now, status="succeeded")
        sender = Deliverer(store, owner="bench:1", threads=args.threads, per_target=args.per_endpoint,
                           allow_private=True)
        sender.start()
        started = time.time()
        try:
            while time.time() - started < args.timeout:
                sender.tick()       # as the worker's `deliver` job does, every 0.25 s
                if sum(len(r.arrivals) for r in receivers) >= args.tasks:
                    break
                time.sleep(0.25)
        finally:
            sender.stop()
            took = time.time() - started
            store.close()
    for r in receivers:
        r.stop()
    got = sum(len(r.arrivals) for r in receivers)
    table(["", f"backlog: {args.receivers} receiver(s), {args.per_endpoint} in flight each, "
               f"{args.threads} sender threads"],
          [["deliveries received", f"{got} of {args.tasks}"], ["took", f"{took:.1f} s"],
           ["deliveries per second", f"{got / took:.0f}"]])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--receivers", type=int, default=1)
    parser.add_argument("--per-endpoint", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--backlog", action="store_true", help="the sender alone, on finished tasks")
    args = parser.parse_args()
    (backlog if args.backlog else run)(args)


if __name__ == "__main__":
    main()
