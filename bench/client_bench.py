"""What one provider call costs holdfast's own CPU: the outbound client
(providers/net.py: http.client with the address policy, a byte limit, a
time limit, redirects followed by hand) against the same GET by the
standard library's http.client alone and, where urllib3 is installed,
by urllib3's connection pool (the client holdfast used before), each on
one keep-alive connection to the fake KIE provider of peer_bench.py in a
process of its own.

    .venv/bin/python bench/client_bench.py [--calls 2000] [--rounds 3]

A KIE job in peer_bench's workload A makes three such calls (create, poll,
download). Printed: CPU per call in this process (the client's side only)
and wall time per call, the rounds alternated, medians. Bounded: rounds x
3 x calls GETs to 127.0.0.1, about 10-20 s; the fake is stopped by its PID.
"""

import argparse
import http.client
import json
import os
import statistics
import time

from _common import BENCH, PYTHON, Server, free_port, table

from providers.net import AddressPolicy, Client

KEY = "bench-key"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not 100 <= args.calls <= 50_000 or not 1 <= args.rounds <= 10:
        parser.error("--calls 100..50000, --rounds 1..10")
    started = time.perf_counter()
    port = free_port()
    fake = Server([PYTHON, os.path.join(BENCH, "_kie_counter.py"), "--port", str(port), "--key", KEY],
                  port=port, ready="fake KIE serving")
    fake.start()
    try:
        url = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {KEY}"}
        client = Client(AddressPolicy(url), 1 << 20)
        made = client.request("POST", url + "/api/v1/jobs/createTask", what="create", headers_for=lambda u: auth,
                              timeout_s=10, json={"model": "m", "input": {"prompt": "fox"}})
        path = f"/api/v1/jobs/recordInfo?taskId={json.loads(made.content)['data']['taskId']}"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

        def holdfast():
            return client.request("GET", url + path, what="poll", headers_for=lambda u: auth, timeout_s=10).content

        def stdlib():
            conn.request("GET", path, headers=auth)
            return conn.getresponse().read()

        cases = {"providers/net.py Client (holdfast)": holdfast, "http.client, one connection (baseline)": stdlib}
        try:
            import urllib3
        except ImportError:
            pass
        else:
            pool = urllib3.HTTPConnectionPool("127.0.0.1", port, maxsize=1)
            timeout = urllib3.Timeout(connect=10, read=10)

            def pool_alone():
                raw = pool.urlopen("GET", path, headers=auth, redirect=False, retries=False, timeout=timeout,
                                   preload_content=False, decode_content=False)
                data = raw.read()
                raw.release_conn()
                return data
            cases["urllib3 connection pool alone"] = pool_alone
        cpu = {name: [] for name in cases}
        wall = {name: [] for name in cases}
        for fn in cases.values():
            for _ in range(100):        # warm up, and check every answer
                if b'"state"' not in fn():
                    raise SystemExit("the fake's answer has no state")
        for _ in range(args.rounds):
            for name, fn in cases.items():
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(args.calls):
                    fn()
                cpu[name].append((time.process_time() - c0) / args.calls)
                wall[name].append((time.perf_counter() - t0) / args.calls)
        conn.close()
        client.close()
        if "urllib3 connection pool alone" in cases:
            pool.close()
    finally:
        fake.stop()
    base = statistics.median(cpu["http.client, one connection (baseline)"])
    rows = [[name, f"{1e6 * statistics.median(cpu[name]):.0f}", f"{statistics.median(cpu[name]) / base:.2f}x",
             f"{1e6 * statistics.median(wall[name]):.0f}"] for name in cases]
    table(["client", "CPU us/call", "vs http.client", "wall us/call"], rows,
          f"one GET to a local fake provider, {args.rounds} rounds of {args.calls} calls, medians")
    print(f"client_bench: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
