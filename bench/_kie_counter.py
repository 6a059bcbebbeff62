"""The KIE-style provider of bench/peer_bench.py, in a process of its own so
its CPU is nobody's tracker: createTask, recordInfo and result files as
tests/fakes/kie.py shapes them, every job done `--job-s` seconds after its
create, HTTP/1.1 keep-alive, and counts of everything it was sent.

    python bench/_kie_counter.py --port N --key K --job-s S

GET /_counts?since=T&until=T&poll_s=P (no auth) answers the counts: creates
(and prompts created more than once), polls, jobs whose result was
downloaded (and when), and each poll's lag, its time minus the time it was
due (the job's previous poll plus P), for polls inside the window.
"""

import argparse
import json
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 2048


class Jobs:
    def __init__(self, job_s):
        self.job_s = job_s
        self.lock = threading.Lock()
        self.jobs = {}              # id -> [prompt, created, [poll times]]
        self.created = Counter()    # prompt -> creates
        self.downloaded = {}        # id -> first download time
        self.polls = 0

    def counts(self, since, until, poll_s):
        with self.lock:
            lags = []
            for _, _, polls in self.jobs.values():
                # From the second poll on: a peer polls once at once after
                # its create, holdfast waits P first.
                for prev, t in zip(polls, polls[1:]):
                    if since <= t <= until:
                        lags.append(t - (prev + poll_s))
            polls_in = sum(1 for _, _, p in self.jobs.values() for t in p if since <= t <= until)
            prompts_done = {self.jobs[j][0] for j in self.downloaded}
            return {"creates": sum(self.created.values()), "prompts": len(self.created),
                    "made_twice": sum(1 for n in self.created.values() if n > 1),
                    "polls": self.polls, "polls_in_window": polls_in, "downloaded": len(self.downloaded),
                    "prompts_done": len(prompts_done), "done_times": sorted(self.downloaded.values()),
                    "create_times": sorted(c for _, c, _ in self.jobs.values()), "lags": lags}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle, a keep-alive
    # client's delayed ACK would hold every answer back 40 ms.
    disable_nagle_algorithm = True
    jobs = None
    key = None

    def log_message(self, *args):
        pass

    def _send(self, status, body, ctype="application/json"):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path != "/api/v1/jobs/createTask" or self.headers.get("Authorization") != f"Bearer {self.key}":
            return self._send(404, {"code": 404, "msg": "no", "data": None})
        prompt = str(body.get("input", {}).get("prompt"))
        now = time.time()
        with self.jobs.lock:
            job_id = f"job{len(self.jobs.jobs):07d}"
            self.jobs.jobs[job_id] = [prompt, now, []]
            self.jobs.created[prompt] += 1
        self._send(200, {"code": 200, "msg": "success", "data": {"taskId": job_id}})

    def do_GET(self):
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        now = time.time()
        if parts.path == "/_counts":
            return self._send(200, self.jobs.counts(float(query["since"]), float(query["until"]),
                                                    float(query["poll_s"])))
        if parts.path.startswith("/files/"):
            job_id = parts.path.split("/")[2]
            with self.jobs.lock:
                known = job_id in self.jobs.jobs
                if known:
                    self.jobs.downloaded.setdefault(job_id, now)
            return self._send(200 if known else 404, PNG if known else b"", "image/png")
        if parts.path != "/api/v1/jobs/recordInfo" or self.headers.get("Authorization") != f"Bearer {self.key}":
            return self._send(404, {"code": 404, "msg": "no", "data": None})
        job_id = query.get("taskId")
        with self.jobs.lock:
            job = self.jobs.jobs.get(job_id)
            if job is not None:
                job[2].append(now)
                self.jobs.polls += 1
        if job is None:
            return self._send(200, {"code": 404, "msg": "task not found", "data": None})
        data = {"taskId": job_id, "model": "bench", "param": "{}", "resultJson": "", "failCode": "",
                "failMsg": "", "createTime": int(job[1] * 1000), "updateTime": int(now * 1000)}
        if now < job[1] + self.jobs.job_s:
            data["state"] = "generating"
        else:
            host = self.headers.get("Host")
            data.update(state="success", resultJson=json.dumps({"resultUrls": [f"http://{host}/files/{job_id}/0.png"]}))
        self._send(200, {"code": 200, "msg": "success", "data": data})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--job-s", type=float, default=0.0)
    args = parser.parse_args()
    handler = type("H", (Handler,), {"jobs": Jobs(args.job_s), "key": args.key})
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    server.daemon_threads = True
    server.request_queue_size = 256
    print(f"fake KIE serving on 127.0.0.1:{args.port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
