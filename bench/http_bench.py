"""holdfast's two busiest endpoints against a bare Bottle /ping on the same
waitress settings, each a real server in a subprocess on 127.0.0.1; and the
POST to a KIE provider, by holdfast and by bench/_floor.py.

    .venv/bin/python bench/http_bench.py [--clients 4] [--requests 2000] [--rounds 3]

holdfast runs as `python app.py` (worker included) on a temporary data
directory. /ping is served by bench/_ping_server.py, which runs holdfast's own
serve() with the app swapped for a bare one, so threads, connection limit and
lookahead are identical. A second /ping server differs in one thing: waitress
gets threads + 1 instead of threads + 200 (HOLDFAST_SSE_MAX_STREAMS=1), to
show what the event streams' threads cost every request. Clients are threads in this process, each with one
keep-alive http.client connection; the six cases take turns, round by
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

Two more POST rows ask whether a lean tracker could reach a given fraction
of /ping at all, both posting to a `kie` provider: bench/_kie_counter.py, a
process of its own per tracker, with one-hour jobs and five-minute polls,
so the worker claims each task, takes its slot, creates the job and records
it running, and no poll falls in the run (the provider's CPU is in no row):
  POST /api/tasks, kie provider   a second holdfast server (`python app.py`,
      its own data directory and users), as the first but with a `kie`
      provider instead of `bench`: the demo row plus a real provider call
  POST /api/tasks, floor          bench/_floor.py (as peer_bench.py runs it):
      the least a tracker keeping holdfast's promises does per post (hashed
      token, rate limit, active count, task and event rows in one
      transaction; a fenced lease, "submitting", the create, "running"), on
      bare Bottle, raw sqlite3 and http.client. Its waitress runs 8 threads,
      not holdfast's 8 + 200; the last /ping row shows that hardly matters
They are measured as the demo row is (posts over several users, the
worker's take of each waited for), and afterwards each provider must have
been sent exactly one create per post, or the run fails.

--profile instead calls the app in-process through WSGI (no server, no
worker) and prints where GET and POST spend their time (cProfile, top
functions by own time).

Bounded: rounds x 6 x requests requests, about 40-80 s; every server (the
four trackers', the two /ping, the two providers) is stopped by PID and the
temporary directory removed.
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

from _common import (BENCH, PYTHON, ROOT, KieCounter, Server, fmt_ms, fmt_rate, free_port, median_ratio,
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

# The second holdfast's provider: a _kie_counter.py. A provider's own host
# and port are always allowed, 127.0.0.1 too (providers/net.py); its result
# links would need allow_private_results, but no job ends during the run.
KIE_TOML = """
[providers.kie]
type = "kie"
url = "{url}"
api_key_env = "HTTP_BENCH_KIE_KEY"
poll_interval_s = 300
max_poll_interval_s = 300
max_wait_s = 7200
"""
KIE_KEY = "http-bench-kie-key"


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


def poster(tokens, provider="bench"):
    """make_request for POST /api/tasks to `provider` (bench, the demo
    adapter, or kie), each post another prompt, the users taking turns
    (tokens[0] is left out): none of them passes max_active."""
    count = iter(range(10 ** 9))

    def post(i):
        n = next(count)
        token = tokens[1 + n % (len(tokens) - 1)]
        params = {"prompt": f"fox {n}"}
        if provider == "kie":
            # KIE's params (the floor sends them as they are): the counter
            # counts creates by input.prompt.
            params = {"model": "bench", "input": params}
        return "POST", "/api/tasks", json.dumps({"provider": provider, "params": params}), {
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
        hf_dir, kie_dir, floor_dir, ping_dir, few_dir = (
            os.path.join(tmp, d) for d in ("holdfast", "holdfast-kie", "floor", "ping", "ping-few"))
        for d in (hf_dir, kie_dir, floor_dir, ping_dir, few_dir):
            os.makedirs(d)
        for d in (hf_dir, ping_dir, few_dir):
            with open(os.path.join(d, "holdfast.toml"), "w") as fh:
                fh.write(TOML)
        # A fake KIE for each tracker: each one's creates are its own to count.
        kie_counter_hf, kie_counter_floor = (KieCounter(tmp, KIE_KEY, 3600, name)   # jobs outlast the run
                                              for name in ("kie-holdfast", "kie-floor"))
        with open(os.path.join(kie_dir, "holdfast.toml"), "w") as fh:
            fh.write(KIE_TOML.format(url=kie_counter_hf.url))
        users = 1 + -(-posts // 100)
        tokens = make_users(hf_dir, users)
        kie_tokens = make_users(kie_dir, users)
        floor_tokens = [f"floor_bench_user_token_{i:06d}" for i in range(users)]
        with open(os.path.join(floor_dir, "tokens"), "w") as fh:
            fh.write("\n".join(floor_tokens))
        hf_db = os.path.join(hf_dir, "holdfast.db")
        hf_port, kie_port, floor_port, ping_port, few_port = (free_port() for _ in range(5))
        holdfast = Server([PYTHON, os.path.join(ROOT, "app.py")], port=hf_port, cwd=hf_dir,
                          env=server_env(hf_dir, hf_port), log_path=os.path.join(tmp, "holdfast.log"))
        holdfast_kie = Server([PYTHON, os.path.join(ROOT, "app.py")], port=kie_port, cwd=kie_dir,
                              env={**server_env(kie_dir, kie_port), "HTTP_BENCH_KIE_KEY": KIE_KEY},
                              log_path=os.path.join(tmp, "holdfast-kie.log"))
        floor = Server([PYTHON, os.path.join(BENCH, "_floor.py"), "--port", str(floor_port), "--data", floor_dir,
                        "--kie", kie_counter_floor.url, "--key", KIE_KEY, "--poll-s", "300",
                        "--tokens", os.path.join(floor_dir, "tokens")], port=floor_port, cwd=floor_dir,
                       log_path=os.path.join(tmp, "floor.log"))
        ping = Server([PYTHON, os.path.join(BENCH, "_ping_server.py")], port=ping_port, cwd=ping_dir,
                      env=server_env(ping_dir, ping_port), log_path=os.path.join(tmp, "ping.log"))
        # The same, with waitress's threads cut from threads + 200 (the event
        # streams' share) to threads + 1: what the stream threads cost.
        few = Server([PYTHON, os.path.join(BENCH, "_ping_server.py")], port=few_port, cwd=few_dir,
                     env={**server_env(few_dir, few_port), "HOLDFAST_SSE_MAX_STREAMS": "1"},
                     log_path=os.path.join(tmp, "ping-few.log"))
        servers = (kie_counter_hf.server, kie_counter_floor.server, holdfast, holdfast_kie, floor, ping, few)
        try:
            for server in servers:
                server.start()
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

            kie_name, floor_name = "POST /api/tasks, kie provider", "POST /api/tasks, floor (bench/_floor.py)"
            cases = {"GET /ping (bare Bottle, baseline)": (ping_port, ping_req),
                     "GET /api/tasks/{id}": (hf_port, get_req),
                     "POST /api/tasks": (hf_port, post_req),
                     kie_name: (kie_port, poster(kie_tokens, "kie")),
                     floor_name: (floor_port, poster(floor_tokens, "kie")),
                     "GET /ping, threads + 1 instead of + 200": (few_port, ping_req)}
            # Whose worker's take of every post is waited for, after each round.
            dbs = {hf_port: hf_db, kie_port: os.path.join(kie_dir, "holdfast.db"),
                   floor_port: os.path.join(floor_dir, "floor.db")}
            counters = {kie_name: kie_counter_hf, floor_name: kie_counter_floor}
            posted = dict.fromkeys(cases, 0)         # requests answered 2xx, warm-up included
            for name, (port, make) in cases.items():     # warm up: connections, caches, first imports
                posted[name] += len(load(port, min(200, args.requests), args.clients, make)[1])
            for db in dbs.values():
                settle(db)
            rates = {name: [] for name in cases}
            lats = {name: [] for name in cases}
            used = {name: [0.0, 0] for name in cases}      # server CPU s, context switches
            pids = {server.port: server.proc.pid for server in servers}
            for _ in range(args.rounds):
                for name, (port, make) in cases.items():
                    before = server_cpu(pids[port])
                    rate, lat = load(port, args.requests, args.clients, make)
                    if port in dbs:
                        settle(dbs[port])
                    after = server_cpu(pids[port])
                    rates[name].append(rate)
                    lats[name] += lat
                    posted[name] += len(lat)
                    if before and after:
                        used[name][0] += after[0] - before[0]
                        used[name][1] += after[1] - before[1]
            # Each post made one job at its provider, and no post two: a
            # create missing or repeated would make the figure lie.
            sent = {name: counter.counts() for name, counter in counters.items()}
            for name, counts in sent.items():
                if not posted[name] == counts["creates"] == counts["prompts"]:
                    raise SystemExit(f"{name}: {posted[name]} posts, but its provider got {counts['creates']} "
                                     f"creates of {counts['prompts']} prompts ({counts['made_twice']} made twice)")
            rss = (holdfast.rss_mb(), ping.rss_mb(), holdfast_kie.rss_mb(), floor.rss_mb())
        finally:
            for server in servers:
                server.stop()

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
          f"waitress as serve() sets it (the floor's: 8 threads, not 8 + 200; the last row shows that hardly matters)")
    print("CPU ms/req: the server process's CPU, all threads, kernel included (/proc); a POST's includes "
          "the worker taking its task (claim, submit, record), waited for after each round. "
          "switches/req: its threads' voluntary context switches.")
    print("The kie and floor rows post to a fake KIE each (one-hour jobs, 300 s polls; its CPU is in no row): "
          + "; ".join(f"{name.split(', ')[1]} {posted[name]} posts, {counts['creates']} creates, "
                      f"{counts['made_twice']} made twice, {counts['polls']} polls" for name, counts in sent.items()))
    print(f"server RSS at the end: holdfast {rss[0]:.0f} MB, ping {rss[1]:.0f} MB, holdfast (kie) {rss[2]:.0f} MB, "
          f"floor {rss[3]:.0f} MB")
    print(f"http_bench: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
