"""holdfast's two busiest endpoints against a bare Bottle /ping on the same
waitress settings, each a real server in a subprocess on 127.0.0.1.

    .venv/bin/python bench/http_bench.py [--clients 4] [--requests 2000] [--rounds 3]

holdfast runs as `python app.py` (worker included) on a temporary data
directory. /ping is served by bench/_ping_server.py, which runs holdfast's own
serve() with the app swapped for a bare one, so threads, connection limit and
lookahead are identical. A second /ping server differs in one thing: waitress
gets threads + 1 instead of threads + 200 (HOLDFAST_SSE_MAX_STREAMS=1), to
show what the event streams' threads cost every request. Clients are threads in this process, each with one
keep-alive http.client connection; the three endpoints take turns, round by
round, and each ratio is the median of per-round ratios. The server's CPU
per request (from /proc) is steadier than its rate on a busy machine: after
each round of posts the bench waits for the worker to take every task, so a
post's CPU includes its claim, submit and record.

POST /api/tasks goes to a `bench` provider (the demo adapter with a one-hour
job and five-minute polls): the worker takes each new task once (claim,
submit, running) and then leaves it alone, as with a real long job. Posts are
spread over several users so none passes 100 active tasks (the default
max_active): the store counts a user's active tasks on every submit, and that
cost is measured on its own in store_bench.py.

--profile instead calls the app in-process through WSGI (no server, no
worker) and prints where GET and POST spend their time (cProfile, top
functions by own time).

Bounded: rounds x 4 x requests requests, about 30-60 s; both servers are
stopped by PID and the temporary directory removed.
"""

import argparse
import cProfile
import http.client
import inspect
import io
import json
import os
import pstats
import sqlite3
import statistics
import threading
import time
import tomllib

from _common import (BENCH, PYTHON, ROOT, Server, fmt_ms, fmt_rate, free_port, median_ratio,
                     percentile, table, temp_dir)

from store import SqliteStore

TOML = """
[providers.bench]
type = "demo"
duration_s = 3600
poll_interval_s = 300
max_poll_interval_s = 300
max_wait_s = 7200
"""


def make_users(data_dir, count):
    """Bench users, written before the server starts (it then makes none of
    its own). High limits where the store takes them; the environment raises
    the server's defaults as well, for a store that does not."""
    store = SqliteStore(os.path.join(data_dir, "holdfast.db"))
    limits = {}
    if "max_active" in inspect.signature(store.create_user).parameters:
        limits = {"max_active": 100_000, "rate_per_s": 10_000}
    tokens = []
    for i in range(count):
        token = f"hf_bench_user_token_{i:06d}"
        store.create_user(f"bench{i}", token=token, **limits)
        tokens.append(token)
    store.close()
    return tokens


def server_env(data_dir, port):
    return {"HOLDFAST_DATA": data_dir, "HOLDFAST_PORT": str(port), "HOLDFAST_HOST": "127.0.0.1",
            "HOLDFAST_CONFIG": os.path.join(data_dir, "holdfast.toml"),
            "HOLDFAST_MAX_ACTIVE": "100000", "HOLDFAST_RATE_PER_S": "10000"}


def server_cpu(pid):
    """(CPU seconds, voluntary context switches) of a process so far, all
    its threads, from /proc (Linux); None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        switches = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as fh:
                    switches += next(int(line.split()[1]) for line in fh
                                     if line.startswith("voluntary_ctxt_switches"))
            except (OSError, StopIteration):
                pass        # a thread that ended meanwhile
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), switches
    except OSError:
        return None


def queued(db_path):
    """Tasks the worker has not taken yet, read by a connection of this process."""
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        return conn.execute("SELECT COUNT(*) FROM tasks WHERE status = 'queued'").fetchone()[0]
    finally:
        conn.close()


def settle(db_path, limit_s=30):
    """Wait until the worker has taken every task posted (each one's claim,
    submit and record belong to the POST that made it), `limit_s` at most;
    the seconds it waited."""
    started = time.monotonic()
    while queued(db_path) and time.monotonic() < started + limit_s:
        time.sleep(0.02)
    return time.monotonic() - started


def poster(tokens):
    """make_request for POST /api/tasks to the bench provider, each post
    another prompt, the users taking turns (tokens[0] is left out): none
    of them passes max_active."""
    count = iter(range(10 ** 9))

    def post(i):
        n = next(count)
        token = tokens[1 + n % (len(tokens) - 1)]
        return "POST", "/api/tasks", json.dumps({"provider": "bench", "params": {"prompt": f"fox {n}"}}), {
            "Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    return post


def load(port, requests, clients, make_request):
    """`requests` requests from `clients` threads, each on one keep-alive
    connection. make_request(i) -> (method, path, body, headers).
    Returns (req/s, [latency s])."""
    latencies = [[] for _ in range(clients)]
    errors = []
    barrier = threading.Barrier(clients + 1)

    def client(c):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = latencies[c]
        barrier.wait()
        try:
            for i in range(c, requests, clients):
                method, path, body, headers = make_request(i)
                t0 = time.perf_counter()
                conn.request(method, path, body=body, headers=headers)
                res = conn.getresponse()
                data = res.read()
                mine.append(time.perf_counter() - t0)
                if res.status >= 300:
                    errors.append(f"{method} {path}: {res.status} {data[:200]!r}")
                    return
        except Exception as exc:   # reported below; a client thread must not die silently
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(120)
    elapsed = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"requests failed: {errors[:3]}")
    flat = [x for lat in latencies for x in lat]
    return len(flat) / elapsed, flat


def profile(n=2000):
    """GET and POST through WSGI in this process, under cProfile."""
    from api import create_app
    from config import Config
    from providers import build_providers
    from store import FileStore

    with temp_dir("http-profile") as tmp:
        tokens = make_users(tmp, 1 + n // 100)
        store = SqliteStore(os.path.join(tmp, "holdfast.db"))
        config = Config()
        config.data = tmp
        providers = build_providers(tomllib.loads(TOML)["providers"])
        app = create_app(store, providers, config, files=FileStore(os.path.join(tmp, "files")))

        def call(method, path, body, token):
            data = body.encode() if body else b""
            environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "",
                       "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
                       "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(data),
                       "wsgi.errors": io.StringIO(), "wsgi.multithread": True, "wsgi.multiprocess": False,
                       "wsgi.run_once": False, "CONTENT_LENGTH": str(len(data)),
                       "CONTENT_TYPE": "application/json", "HTTP_AUTHORIZATION": f"Bearer {token}"}
            status = []
            out = b"".join(app(environ, lambda s, h, e=None: status.append(s)))
            if not status[0].startswith("20"):
                raise SystemExit(f"{method} {path}: {status[0]} {out[:200]!r}")
            return out

        first = json.loads(call("POST", "/api/tasks", json.dumps({"provider": "bench", "params": {}}), tokens[0]))
        get = ("GET", f"/api/tasks/{first['task']['id']}", None)
        for name, make in (("GET /api/tasks/{id}", lambda i: (*get, tokens[0])),
                           ("POST /api/tasks", lambda i: ("POST", "/api/tasks", json.dumps(
                               {"provider": "bench", "params": {"prompt": f"fox {i}"}}),
                               tokens[1 + i % (len(tokens) - 1)]))):
            for i in range(100):
                call(*make(i))
            t0 = time.perf_counter()
            for i in range(100, 100 + n):
                call(*make(i))
            rate = n / (time.perf_counter() - t0)
            prof = cProfile.Profile()
            prof.enable()
            for i in range(100 + n, 100 + 2 * n):
                call(*make(i))
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
            print(f"{name} in-process (WSGI, no server, no worker): {fmt_rate(rate)} req/s; "
                  f"cProfile of {n}, by own time:")
            print("\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip()))
            print()
        store.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=2000, help="per endpoint per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.clients <= 64 or not 100 <= args.requests <= 20_000 or not 1 <= args.rounds <= 10:
        parser.error("--clients 1..64, --requests 100..20000, --rounds 1..10")
    if args.profile:
        return profile()
    started = time.perf_counter()
    posts = args.requests * (args.rounds + 1)

    with temp_dir("http") as tmp:
        hf_dir, ping_dir, few_dir = (os.path.join(tmp, d) for d in ("holdfast", "ping", "ping-few"))
        for d in (hf_dir, ping_dir, few_dir):
            os.makedirs(d)
            with open(os.path.join(d, "holdfast.toml"), "w") as fh:
                fh.write(TOML)
        tokens = make_users(hf_dir, 1 + -(-posts // 100))
        hf_db = os.path.join(hf_dir, "holdfast.db")
        hf_port, ping_port, few_port = free_port(), free_port(), free_port()
        holdfast = Server([PYTHON, os.path.join(ROOT, "app.py")], port=hf_port, cwd=hf_dir,
                          env=server_env(hf_dir, hf_port), log_path=os.path.join(tmp, "holdfast.log"))
        ping = Server([PYTHON, os.path.join(BENCH, "_ping_server.py")], port=ping_port, cwd=ping_dir,
                      env=server_env(ping_dir, ping_port), log_path=os.path.join(tmp, "ping.log"))
        # The same, with waitress's threads cut from threads + 200 (the event
        # streams' share) to threads + 1: what the stream threads cost.
        few = Server([PYTHON, os.path.join(BENCH, "_ping_server.py")], port=few_port, cwd=few_dir,
                     env={**server_env(few_dir, few_port), "HOLDFAST_SSE_MAX_STREAMS": "1"},
                     log_path=os.path.join(tmp, "ping-few.log"))
        try:
            holdfast.start()
            ping.start()
            few.start()
            headers = {"Authorization": f"Bearer {tokens[0]}", "Content-Type": "application/json"}
            conn = http.client.HTTPConnection("127.0.0.1", hf_port, timeout=30)
            conn.request("POST", "/api/tasks", body=json.dumps({"provider": "bench", "params": {"prompt": "x"}}),
                         headers=headers)
            res = conn.getresponse()
            body = res.read()
            conn.close()
            if res.status != 201:
                raise SystemExit(f"POST /api/tasks answered {res.status}: {body[:300]!r}")
            task_id = json.loads(body)["task"]["id"]
            def ping_req(i):
                return "GET", "/ping", None, {}

            def get_req(i):
                return "GET", f"/api/tasks/{task_id}", None, headers

            post_req = poster(tokens)

            cases = {"GET /ping (bare Bottle, baseline)": (ping_port, ping_req),
                     "GET /api/tasks/{id}": (hf_port, get_req),
                     "POST /api/tasks": (hf_port, post_req),
                     "GET /ping, threads + 1 instead of + 200": (few_port, ping_req)}
            for port, make in cases.values():     # warm up: connections, caches, first imports
                load(port, min(200, args.requests), args.clients, make)
            settle(hf_db)
            rates = {name: [] for name in cases}
            lats = {name: [] for name in cases}
            used = {name: [0.0, 0] for name in cases}      # server CPU s, context switches
            pids = {hf_port: holdfast.proc.pid, ping_port: ping.proc.pid, few_port: few.proc.pid}
            for _ in range(args.rounds):
                for name, (port, make) in cases.items():
                    before = server_cpu(pids[port])
                    rate, lat = load(port, args.requests, args.clients, make)
                    if port == hf_port:
                        settle(hf_db)
                    after = server_cpu(pids[port])
                    rates[name].append(rate)
                    lats[name] += lat
                    if before and after:
                        used[name][0] += after[0] - before[0]
                        used[name][1] += after[1] - before[1]
            rss = (holdfast.rss_mb(), ping.rss_mb())
        finally:
            holdfast.stop()
            ping.stop()
            few.stop()

    ping_name = "GET /ping (bare Bottle, baseline)"
    base = rates[ping_name]
    done = args.rounds * args.requests
    cpu_ms = {name: 1000 * used[name][0] / done for name in cases}
    rows = []
    for name in cases:
        rows.append([name, fmt_rate(statistics.median(rates[name])), f"{median_ratio(rates[name], base):.2f}x",
                     fmt_ms(percentile(lats[name], 50)), fmt_ms(percentile(lats[name], 99)),
                     f"{percentile(lats[name], 50) / percentile(lats[ping_name], 50):.2f}x",
                     f"{cpu_ms[name]:.3f}", f"{cpu_ms[name] / cpu_ms[ping_name]:.2f}x" if cpu_ms[ping_name] else "-",
                     f"{used[name][1] / done:.1f}"])
    table(["endpoint", "req/s", "vs ping", "p50 ms", "p99 ms", "p50 vs ping", "CPU ms/req", "vs ping",
           "switches/req"], rows,
          f"HTTP: {args.clients} keep-alive clients, {args.rounds} rounds of {args.requests} requests per endpoint, "
          f"waitress as serve() sets it")
    print("CPU ms/req: the server process's CPU, all threads, kernel included (/proc); a POST's includes "
          "the worker taking its task (claim, submit, record), waited for after each round. "
          "switches/req: its threads' voluntary context switches.")
    print(f"server RSS at the end: holdfast {rss[0]:.0f} MB, ping {rss[1]:.0f} MB")
    print(f"http_bench: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
