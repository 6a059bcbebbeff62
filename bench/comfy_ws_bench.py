"""ComfyUI's WebSocket against polling alone: how long after ComfyUI ends a
job does its task say `succeeded`?

    .venv/bin/python bench/comfy_ws_bench.py [--tasks 8] [--rounds 3] [--job-seconds 0.5]

The fake ComfyUI of the tests (HTTP and its WebSocket on one port, real
sockets on 127.0.0.1) runs one job at a time; each round submits --tasks
tasks at once to a real Worker (its threads, the real clock, SQLite), so
they end one after another at different points of their poll schedules.
The provider's table is the default one (first poll after 2 s, then a tenth
of the task's age, up to 30 s) in both modes: `websocket = true` (the
socket's end of job makes the poll due at once) and `websocket = false`
(polling only). Rounds alternate the two modes, so the machine's other load
hits both alike.

lag = the task's finished_at (the store) - when the fake wrote the job into
its history. Bounded: each round waits at most 120 s for its tasks.
"""

import argparse
import logging
import os
import time

from _common import ROOT, percentile, table, temp_dir

import sys
sys.path.insert(0, os.path.join(ROOT, "tests"))

from fakes.comfyui import FakeComfyUI  # noqa: E402
from providers import build_providers  # noqa: E402
from store import TERMINAL, FileStore, SqliteStore  # noqa: E402
from worker import Worker  # noqa: E402

ROUND_LIMIT_S = 120.0


def workflow(n):
    # A colour per task: the fake does not serve one task from another's cache.
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                         "color": n}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench"}}}


def one_round(tmp, fake, websocket, tasks, serial):
    """Lags (s) and /history requests per task of one round."""
    folder = os.path.join(tmp, f"round-{serial}")
    os.makedirs(folder)
    store = SqliteStore(os.path.join(folder, "holdfast.db"))
    providers = build_providers({"comfy": {"type": "comfyui", "url": fake.url, "websocket": websocket}})
    worker = Worker(store, providers, FileStore(os.path.join(folder, "files")), owner=f"bench:{serial}")
    user, _ = store.create_user("bench", max_active=10_000, rate_per_s=10_000)
    history_before = sum(n for path, n in fake.requests.items() if path.startswith("/history/"))
    worker.start()
    try:
        if websocket:
            deadline = time.monotonic() + 10
            while not fake.ws_connections_now() and time.monotonic() < deadline:
                time.sleep(0.02)
        ids = []
        for n in range(tasks):
            now = time.time()
            task, _ = store.submit(user["id"], "comfy", {"workflow": workflow(serial * 1000 + n)}, now=now,
                                   deadline_at=now + 3600)
            ids.append(task["id"])
        deadline = time.monotonic() + ROUND_LIMIT_S
        while time.monotonic() < deadline:
            done = [store.get_task(i) for i in ids]
            if all(t["status"] in TERMINAL for t in done):
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"round {serial}: tasks not finished within {ROUND_LIMIT_S:.0f} s")
    finally:
        worker.stop()
        store.close()
    bad = [t for t in done if t["status"] != "succeeded"]
    if bad:
        raise SystemExit(f"round {serial}: {len(bad)} task(s) did not succeed: {bad[0]['error']}")
    history = sum(n for path, n in fake.requests.items() if path.startswith("/history/")) - history_before
    return [t["finished_at"] - fake.finished_at[t["external_id"]] for t in done], history / tasks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--job-seconds", type=float, default=0.5)
    args = parser.parse_args()
    logging.getLogger("holdfast").setLevel(logging.ERROR)
    lags = {True: [], False: []}
    looks = {True: [], False: []}
    with temp_dir("comfy-ws") as tmp, FakeComfyUI(job_seconds=args.job_seconds, progress_steps=10) as fake:
        serial = 0
        for _ in range(args.rounds):
            for websocket in (True, False):
                serial += 1
                got, history = one_round(tmp, fake, websocket, args.tasks, serial)
                lags[websocket] += got
                looks[websocket].append(history)
        rows = []
        for websocket, name in ((True, "websocket + polls"), (False, "polls only")):
            values = lags[websocket]
            rows.append([name, len(values), f"{percentile(values, 50) * 1000:.0f}",
                         f"{percentile(values, 90) * 1000:.0f}", f"{max(values) * 1000:.0f}",
                         f"{sum(looks[websocket]) / len(looks[websocket]):.1f}"])
        table(["mode", "tasks", "p50 ms", "p90 ms", "max ms", "history GETs/task"], rows,
              title=f"ComfyUI job end -> task succeeded ({args.rounds} rounds of {args.tasks} tasks, "
                    f"{args.job_seconds:g} s jobs, default poll schedule)")
        ratio = percentile(lags[False], 50) / max(percentile(lags[True], 50), 1e-6)
        print(f"median lag, polls only / websocket: {ratio:.1f}x; socket connections: {fake.ws_connections}, "
              f"progress messages sent: {fake.ws_sent['progress']}")


if __name__ == "__main__":
    main()
