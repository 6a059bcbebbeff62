"""Would a worker in a process of its own make submits cheaper? POSTs from
4 keep-alive clients to `python app.py` (worker inside, as shipped) and to
the same server without its worker, beside a worker alone in a second
process on the same SQLite file (bench/_split_worker.py).

    .venv/bin/python bench/split_bench.py [--requests 4000] [--rounds 2]

Each round posts `requests` tasks to the bench provider of http_bench.py
(a one-hour demo job), then waits until the worker has taken them all
(claim, submit, record). Printed per layout: POST/s, how long after the
last POST the worker was done, and the CPU per task of each process
(/proc), whose sum is what two cores shared with the clients must pay.
The layouts alternate, round by round. Bounded: 2 x rounds x requests
posts, about a minute; every process stopped by its PID.
"""

import argparse
import os
import statistics
import time

from _common import PYTHON, ROOT, Server, fmt_ms, free_port, percentile, table, temp_dir
from http_bench import TOML, load, make_users, poster, server_cpu, server_env, settle


def run(layout, tmp, requests, rounds, tokens_needed):
    data = os.path.join(tmp, layout)
    os.makedirs(data)
    with open(os.path.join(data, "holdfast.toml"), "w") as fh:
        fh.write(TOML)
    tokens = make_users(data, tokens_needed)
    port = free_port()
    env = server_env(data, port)
    split = layout == "split"
    argv = [PYTHON, os.path.join(ROOT, "bench", "_split_worker.py"), "server"] if split else \
        [PYTHON, os.path.join(ROOT, "app.py")]
    procs = [Server(argv, port=port, cwd=data, env=env, log_path=os.path.join(tmp, f"{layout}.log"))]
    if split:
        procs.append(Server([PYTHON, os.path.join(ROOT, "bench", "_split_worker.py"), "worker"], port=port,
                            cwd=data, env=env, ready="worker serving",
                            log_path=os.path.join(tmp, f"{layout}-worker.log")))
    post = poster(tokens)
    db = os.path.join(data, "holdfast.db")
    results = []
    try:
        for proc in procs:
            proc.start()
        load(port, 200, 4, post)            # warm up
        settle(db)
        for _ in range(rounds):
            before = [server_cpu(p.proc.pid) for p in procs]
            rate, lat = load(port, requests, 4, post)
            behind = settle(db, limit_s=60)
            after = [server_cpu(p.proc.pid) for p in procs]
            cpu = [1000 * (b[0] - a[0]) / requests for a, b in zip(before, after)]
            results.append((rate, percentile(lat, 50), behind, cpu))
            yield results[-1]
    finally:
        for proc in procs:
            proc.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not 200 <= args.requests <= 20_000 or not 1 <= args.rounds <= 10:
        parser.error("--requests 200..20000, --rounds 1..10")
    started = time.perf_counter()
    tokens_needed = 1 + -(-(args.requests * args.rounds + 200) // 100)
    with temp_dir("split") as tmp:
        runs = {layout: run(layout, tmp, args.requests, args.rounds, tokens_needed) for layout in ("one", "split")}
        seen = {layout: [] for layout in runs}
        # Round by round, alternated: both layouts' processes stay up from
        # their first round to the end, idle while the other one posts.
        for _ in range(args.rounds):
            for layout, gen in runs.items():
                seen[layout].append(next(gen))
        for gen in runs.values():
            gen.close()
    rows = []
    names = {"one": "python app.py (worker inside)", "split": "server + worker process"}
    for layout, got in seen.items():
        rate = statistics.median(r[0] for r in got)
        cpus = [statistics.median(r[3][i] for r in got) for i in range(len(got[0][3]))]
        rows.append([names[layout], f"{rate:,.0f}", f"{rate / statistics.median(r[0] for r in seen['one']):.2f}x",
                     fmt_ms(statistics.median(r[1] for r in got)),
                     f"{statistics.median(r[2] for r in got):.2f}",
                     " + ".join(f"{c:.3f}" for c in cpus), f"{sum(cpus):.3f}"])
    table(["layout", "POST/s", "vs one", "p50 ms", "worker done s after", "CPU ms/task (per process)",
           "CPU ms/task"], rows,
          f"split: {args.rounds} rounds of {args.requests} POSTs, 4 keep-alive clients, bench provider")
    print(f"split_bench: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
