"""holdfast's worker alone against the floor's worker: the CPU one job of
peer_bench's workload A costs the worker, without the HTTP server.

    .venv/bin/python bench/worker_bench.py [--jobs 3000] [--rounds 3] [--cpu auto|all|N]

peer_bench's workload A measures the whole tracker: submits over HTTP,
waitress, the worker's four threads and the one GIL they share, on a
machine whose load moves its figures by a third from run to run. This
measures the worker's part, steadier: tasks are put in the store first,
then the worker runs until every one has succeeded: created at the fake
KIE provider (bench/_kie_counter.py, a process of its own), polled,
its result downloaded and saved. Each measure runs in a process of its
own, with one worker thread (Worker.run_once in a loop, the tasks due
at once) and with four (the worker started, as `python app.py` runs it),
its threads on one CPU as `python app.py` places them (cpu.py; --cpu all
spreads them, for both trackers).

The baseline is bench/_floor.py's worker in the same round, the least a
tracker keeping holdfast's promises does per job (see peer_bench's
section in BENCHMARKS.md). Printed: CPU per job of the measuring process
(all its threads, kernel included, the provider's not), user and kernel
apart, jobs/s, context switches per job (voluntary and not, all threads:
with four threads most are the GIL or a lock changing hands, and they
move far less from run to run than CPU time does), and holdfast against
the floor; medians of the rounds.
The provider's counts are checked: every job created once and downloaded.
The store and the files live in /dev/shm (tmpfs) where it exists: see
MEMORY.

Bounded: about 30-60 s; everything lives in temporary directories.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from _common import ROOT, KieCounter, table, temp_dir

KEY = "worker-bench-key"
POLL_S = 0.01           # every poll due at once: the worker, not the schedule, sets the pace
LIMIT_S = 120           # one measure's deadline


def holdfast(data, kie_url, jobs, threads, tag):
    """Run holdfast's Worker over `jobs` stored tasks; (CPU s, user s, system s, wall s)."""
    with open(os.path.join(data, "holdfast.toml"), "w") as fh:
        fh.write(f'[providers.kie]\ntype = "kie"\nurl = "{kie_url}"\napi_key_env = "BENCH_KIE_KEY"\n'
                 f"poll_interval_s = {POLL_S}\nmax_poll_interval_s = {POLL_S}\nmax_wait_s = 3600\n"
                 "allow_private_results = true\n")
    os.environ.update(HOLDFAST_DATA=data, HOLDFAST_CONFIG=os.path.join(data, "holdfast.toml"),
                      BENCH_KIE_KEY=KEY)
    from config import Config, open_everything, setup_logging
    from worker import Worker
    config = Config.load()
    setup_logging(config.log)       # the log lines are part of a job's cost (stderr: /dev/null)
    store, providers, files = open_everything(config)
    user = store.create_user("bench")[0]["id"]
    now = time.time()
    for i in range(jobs):
        store.submit(user, "kie", {"model": "bench", "input": {"prompt": f"{tag} {i}"}}, now=now,
                     deadline_at=now + 3600, max_active=100_000)
    worker = Worker(store, providers, files, threads=threads, lease_s=config.lease_s)

    spent = _until_done(threads, worker.run_once, worker.start, lambda: store.stats(time.time())["active"])
    worker.shutdown()
    done = sum(n for (_, status), n in store.task_counts().items() if status == "succeeded")
    store.close()
    return spent, done


def floor(data, kie_url, jobs, threads, tag):
    """The same with bench/_floor.py's Store and Worker."""
    import _floor
    store = _floor.Store(os.path.join(data, "floor.db"))
    store.write(lambda conn: conn.execute("INSERT INTO users (token_hash) VALUES ('bench')"))
    now = time.time()

    def submit(conn):
        for i in range(jobs):
            conn.execute("INSERT INTO tasks (id, user_id, provider, status, params, next_at, created_at, "
                         "updated_at, deadline_at, version) VALUES (?, 1, 'kie', 'queued', ?, ?, '', '', '', 1)",
                         (f"t_{i:08d}", json.dumps({"model": "bench", "input": {"prompt": f"{tag} {i}"}}), now))
    store.write(submit)
    worker = _floor.Worker(store, _floor.Kie(kie_url, KEY), os.path.join(data, "files"), POLL_S,
                           threads=threads)

    def one_pass():
        held = store.claim(16)
        for task in held:
            worker._step(task)
        return len(held)

    def active():
        return store.conn().execute("SELECT count(*) FROM tasks WHERE status NOT IN ('succeeded', 'failed')"
                                    ).fetchone()[0]
    spent = _until_done(threads, one_pass, worker.start, active)
    done = store.conn().execute("SELECT count(*) FROM tasks WHERE status = 'succeeded'").fetchone()[0]
    return spent, done


def _until_done(threads, one_pass, start_threads, active):
    """Run the tasks until none is `active()` (or LIMIT_S passes): with one
    thread, one_pass() (how many it took) in this one, waiting for the next
    poll when nothing was due; else start_threads() and wait. Returns (CPU,
    user, system, wall seconds, context switches) spent."""
    begin = _clocks()

    def left():
        return active() and time.perf_counter() - begin[3] < LIMIT_S
    if threads == 1:
        while True:
            if one_pass():
                continue
            if not left():
                break
            time.sleep(POLL_S)      # nothing was due, and tasks remain
    else:
        start_threads()
        while left():
            time.sleep(0.02)
    return [b - a for a, b in zip(begin, _clocks())]


def _clocks():
    t = os.times()
    use = resource.getrusage(resource.RUSAGE_SELF)
    return t.user + t.system, t.user, t.system, time.perf_counter(), use.ru_nvcsw + use.ru_nivcsw


def one(args):
    """A measure in this process: its figures as a JSON line on stdout."""
    sys.path.insert(0, ROOT)
    import cpu
    cpu.confine(cpu.check(args.cpu))
    sink = open(os.devnull, "w")        # the log lines are written, to nowhere
    sys.stderr = sink
    run = holdfast if args.one == "holdfast" else floor
    (cpu, user, system, wall, switches), done = run(args.data, args.kie, args.jobs, args.threads, args.tag)
    print(json.dumps({"cpu": cpu, "user": user, "system": system, "wall": wall, "switches": switches,
                      "done": done}), flush=True)
    os._exit(0)         # the floor's threads never end by themselves


def measure(kind, kie, jobs, threads, tag, placement):
    with temp_dir(f"worker-bench-{kind}", MEMORY) as data:
        since = time.time()
        out = subprocess.run([sys.executable, __file__, "--one", kind, "--data", data, "--kie", kie.url,
                              "--jobs", str(jobs), "--threads", str(threads), "--tag", tag, "--cpu", placement],
                             capture_output=True, text=True, timeout=LIMIT_S + 60, cwd=ROOT)
        if out.returncode != 0:
            raise SystemExit(f"{kind}: exit {out.returncode}: {out.stderr[-2000:]}")
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        counts = kie.counts(since, time.time(), POLL_S)
        # Each measure's prompts are its own (`tag`); the provider counts since it started.
        if figures["done"] != jobs or counts["made_twice"]:
            raise SystemExit(f"{kind}: {figures['done']} of {jobs} succeeded, "
                             f"{counts['made_twice']} jobs made twice at the provider")
        return figures


# Measures keep their files in memory (tmpfs) where there is one. On this
# machine's ext4, a file or folder made soon after thousands were deleted
# costs up to a millisecond of kernel time (its allocator skips recently
# deleted inodes), and each measure deletes thousands: on disk the
# measures' order would matter more than the code. peer_bench keeps the disk.
MEMORY = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", choices=("holdfast", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--kie", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="job", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", default="auto", help="as HOLDFAST_CPU, for both trackers: auto (default), all, N")
    args = parser.parse_args()
    if args.one:
        return one(args)
    started = time.perf_counter()
    results = {}
    with temp_dir("worker-bench-kie") as tmp:
        kie = KieCounter(tmp, KEY, 0)
        kie.server.start(30)
        try:
            for r in range(args.rounds):
                for threads in (1, 4):
                    # Alternate who goes first: the second of two runs meets a warmer disk.
                    for kind in (("holdfast", "floor") if r % 2 == 0 else ("floor", "holdfast")):
                        tag = f"{kind}-{threads}-{r}"
                        results.setdefault((kind, threads), []).append(
                            measure(kind, kie, args.jobs, threads, tag, args.cpu))
        finally:
            kie.server.stop()
    rows = []
    for threads in (1, 4):
        base = results[("floor", threads)]
        for kind in ("floor", "holdfast"):
            runs = results[(kind, threads)]
            cpu = [f["cpu"] / args.jobs * 1000 for f in runs]
            ratio = statistics.median(f["cpu"] / b["cpu"] for f, b in zip(runs, base))
            rows.append([f"{kind}, {threads} thread{'s' if threads > 1 else ''}" + (" (baseline)" if kind == "floor"
                                                                                    else ""),
                         f"{statistics.median(cpu):.2f}",
                         f"{statistics.median(f['user'] for f in runs) / args.jobs * 1000:.2f}",
                         f"{statistics.median(f['system'] for f in runs) / args.jobs * 1000:.2f}",
                         f"{statistics.median(args.jobs / f['wall'] for f in runs):,.0f}",
                         f"{statistics.median(f['switches'] for f in runs) / args.jobs:.1f}",
                         f"{ratio:.2f}x"])
    table(["worker", "CPU ms/job", "user", "kernel", "jobs/s", "switches/job", "CPU vs floor"], rows,
          title=f"A's job, worker alone: {args.rounds} rounds of {args.jobs} jobs, threads on "
                f"{'every CPU' if args.cpu == 'all' else 'one CPU'} (--cpu {args.cpu}), medians; "
                "ratio = median of per-round ratios")
    print(f"worker_bench: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
