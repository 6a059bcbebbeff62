"""How much do open event streams cost the API? Starts a real server on
127.0.0.1 (a temporary data directory), then times GET /api/tasks/{id} with
no stream open, with STREAMS streams open and idle, and with them open while
tasks run: all of one user (every stream woken by every event, the worst
case, past the default per-user cap), and spread over users at the default
cap of 20 streams each (an event wakes its own user's 20). Prints p50/p99
for each and the p99 ratio streams/none.

    .venv/bin/python bench/sse_load.py [--streams 200] [--requests 1000] [--rounds 3] [--json]

Bounded: at most --streams sockets, --requests requests per phase and round,
a 30 s cap on the busy phase; the server is stopped at the end whatever
happens. The machine's other load shows as noise: compare the rounds.
"""

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from support import ServerProcess, api  # noqa: E402


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def time_gets(session, url, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        res = session.get(url, timeout=10)
        out.append(time.perf_counter() - t0)
        if res.status_code != 200:
            raise SystemExit(f"GET answered {res.status_code}: {res.text[:200]}")
    return out


def open_streams(port, token, n):
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(f"GET /api/events?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  "Accept: text/event-stream\r\n\r\n".encode())
        socks.append(s)
    for s in socks:
        data = b""
        while b"event: ready" not in data:
            chunk = s.recv(65536)
            if not chunk:
                raise SystemExit(f"a stream was refused: {data[:200]!r}")
            data += chunk
        if not data.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"a stream was refused: {data[:200]!r}")
        s.setblocking(False)
    return socks


def drain(socks):
    for s in socks:
        try:
            while s.recv(65536):
                pass
        except (BlockingIOError, OSError):
            pass


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def wait_streams(session, url, n, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if session.get(url + "/healthz", timeout=10).json()["streams"]["sse"] == n:
            return
        time.sleep(0.1)
    raise SystemExit(f"the server never counted {n} open streams")


PER_USER = 20     # HOLDFAST_SSE_MAX_PER_USER's default


def one_round(server, session, url, token, others, args):
    """{phase: timings} for one round: none, idle streams, streams while
    tasks run (all the demo user's, then spread over users)."""
    out = {}
    wait_streams(session, server.url, 0)
    out["none"] = time_gets(session, url, args.requests)
    socks = open_streams(server.port, token, args.streams)
    try:
        wait_streams(session, server.url, args.streams)
        time.sleep(0.3)
        out["idle"] = time_gets(session, url, args.requests)
        out["busy"] = busy_phase(server, session, url, socks, args)
    finally:
        for s in socks:
            s.close()
    wait_streams(session, server.url, 0)
    socks = open_streams(server.port, token, min(PER_USER, args.streams))
    try:
        for other in others:
            socks += open_streams(server.port, other, min(PER_USER, args.streams - len(socks)))
        wait_streams(session, server.url, len(socks))
        out["spread"] = busy_phase(server, session, url, socks, args)
    finally:
        for s in socks:
            s.close()
    return out


def busy_phase(server, session, url, socks, args):
    """Timings while 5 of the demo user's tasks run and their events go out."""
    ids = [session.post(server.url + "/api/tasks", timeout=10, json={
        "provider": "demo", "params": {"prompt": f"busy {i}", "duration_s": 4}}).json()["task"]["id"]
        for i in range(5)]
    busy = []
    t_end = time.time() + 30
    while len(busy) < args.requests and time.time() < t_end:
        busy += time_gets(session, url, 20)
        drain(socks)
    while time.time() < t_end and any(
            session.get(f"{server.url}/api/tasks/{i}", timeout=10).json()["task"]["status"]
            in ("queued", "running") for i in ids):
        drain(socks)
        time.sleep(0.2)
    return busy


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--requests", type=int, default=1000, help="per phase and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.streams <= 1000 or not 100 <= args.requests <= 20000 or not 1 <= args.rounds <= 10:
        parser.error("--streams 1..1000, --requests 100..20000, --rounds 1..10")

    rounds = []
    with tempfile.TemporaryDirectory(prefix="holdfast-bench-") as data:
        cap = str(max(200, args.streams))
        server = ServerProcess(data, env={"HOLDFAST_SSE_MAX_STREAMS": cap, "HOLDFAST_SSE_MAX_PER_USER": cap,
                                          "HOLDFAST_SSE_MAX_S": "600"}).start()
        try:
            token = server.tokens["demo"]
            session = api(server, token)
            task_id = session.post(server.url + "/api/tasks", timeout=10, json={
                "provider": "demo", "params": {"prompt": "bench", "duration_s": 0}}).json()["task"]["id"]
            url = f"{server.url}/api/tasks/{task_id}"
            time_gets(session, url, 200)   # warm up
            admin = api(server, server.tokens["admin"])
            others = [admin.post(server.url + "/api/admin/users", timeout=10, json={"name": f"viewer{n}"}
                                 ).json()["token"] for n in range(-(-args.streams // PER_USER) - 1)]
            for _ in range(args.rounds):
                rounds.append(one_round(server, session, url, token, others, args))
            rss = rss_mb(server.proc.pid)
        finally:
            server.stop()

    names = {"none": "no streams", "idle": f"{args.streams} idle streams",
             "busy": f"{args.streams} streams, 5 tasks running",
             "spread": f"{args.streams} of {len(others) + 1} users, 5 running"}
    # Each round's p99, then the median over rounds: other load on the
    # machine hits one round, not the figure.
    table = {}
    for key in names:
        p50s = [statistics.median(r[key]) * 1000 for r in rounds]
        p99s = [percentile(r[key], 99) * 1000 for r in rounds]
        table[key] = {"phase": names[key], "p50_ms": round(statistics.median(p50s), 3),
                      "p99_ms": round(statistics.median(p99s), 3),
                      "p99_ms_by_round": [round(v, 3) for v in p99s]}
    ratio = table["idle"]["p99_ms"] / table["none"]["p99_ms"]
    busy_ratio = table["busy"]["p99_ms"] / table["none"]["p99_ms"]
    spread_ratio = table["spread"]["p99_ms"] / table["none"]["p99_ms"]
    if args.json:
        print(json.dumps({"phases": list(table.values()), "server_rss_mb": rss,
                          "p99_ratio_streams_vs_none": round(ratio, 2),
                          "p99_ratio_busy_vs_none": round(busy_ratio, 2),
                          "p99_ratio_spread_vs_none": round(spread_ratio, 2)}))
        return
    print(f"GET /api/tasks/{{id}}: {args.requests} sequential requests per phase, {args.rounds} rounds, "
          "one keep-alive client; medians over rounds")
    print(f"{'phase':34} {'p50 ms':>8} {'p99 ms':>8}   p99 by round")
    for row in table.values():
        print(f"{row['phase']:34} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f}   "
              + " ".join(f"{v:.2f}" for v in row["p99_ms_by_round"]))
    print(f"server RSS at the end: {rss:.0f} MB" if rss else "server RSS: unknown")
    print(f"p99 ratio, {args.streams} idle streams vs none: {ratio:.2f}")
    print(f"p99 ratio, {args.streams} streams of one user with tasks running vs none: {busy_ratio:.2f}")
    print(f"p99 ratio, {args.streams} streams of {len(others) + 1} users with tasks running vs none: "
          f"{spread_ratio:.2f}")


if __name__ == "__main__":
    main()
