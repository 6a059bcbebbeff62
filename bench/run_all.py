"""Run every benchmark in bench/, one after another, and print everything.

    .venv/bin/python bench/run_all.py [--only store_bench,http_bench]

Each script runs in its own process with a time limit; one that overruns
gets SIGTERM (its cleanup runs: servers stopped, temporary files removed),
then SIGKILL. The whole run stays under 10 minutes on this machine.
"""

import argparse
import os
import signal
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)

# (script, seconds it may take)
SCRIPTS = [("store_bench.py", 120), ("job_store_bench.py", 90), ("http_bench.py", 120), ("e2e_bench.py", 150),
           ("poll_lag_bench.py", 120), ("dispatch_bench.py", 120), ("claim_bench.py", 90),
           ("client_bench.py", 60), ("worker_bench.py", 150), ("sse_load.py", 120), ("s3_bench.py", 120)]
TOTAL_LIMIT_S = 600


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(script, limit):
    argv = [sys.executable, os.path.join("bench", script)]
    print(f"=== {' '.join(['.venv/bin/python'] + argv[1:])}", flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT)
    try:
        code = proc.wait(limit)
    except subprocess.TimeoutExpired:
        print(f"!!! {script} passed its {limit:.0f} s limit: stopping it", flush=True)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        raise
    elapsed = time.perf_counter() - started
    print(f"=== {script}: exit {code}, {elapsed:.0f} s\n", flush=True)
    return code, elapsed


def main():
    # Stopped from outside: stop the running script too (see run()).
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated script names (without .py)")
    args = parser.parse_args()
    wanted = set(args.only.split(",")) if args.only else None
    started = time.perf_counter()
    summary = []
    for script, limit in SCRIPTS:
        if wanted is not None and script[:-3] not in wanted:
            continue
        if not os.path.exists(os.path.join(BENCH, script)):
            print(f"=== {script}: not here, skipped\n")
            continue
        left = TOTAL_LIMIT_S - (time.perf_counter() - started)
        if left < 10:
            summary.append((script, "not run: out of time", 0))
            continue
        code, elapsed = run(script, min(limit, left))
        summary.append((script, "ok" if code == 0 else f"exit {code}", elapsed))
    total = time.perf_counter() - started
    print("=== summary")
    for script, status, elapsed in summary:
        print(f"{script:20} {status:22} {elapsed:5.0f} s")
    print(f"{'total':20} {'':22} {total:5.0f} s (limit {TOTAL_LIMIT_S} s)")
    return 0 if all(s == "ok" for _, s, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
