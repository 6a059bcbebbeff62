"""Provider callbacks: how long after a KIE job ends its task says
`succeeded`, with callbacks on versus polling alone.

    .venv/bin/python bench/callback_bench.py [--tasks 20] [--poll-s 5]

Both runs use the same fake KIE (tests/fakes/kie.py, on 127.0.0.1), the same
seeded job lengths (uniform from 1 to 9 s) and the same poll interval
(`poll_interval_s = max_poll_interval_s = --poll-s`), against a real
`python app.py`. In one run the fake calls back each job's callBackUrl as it
ends (HOLDFAST_PUBLIC_URL set); in the other it never does, so only polls
find the end. The lag is from the job's end at the fake to the moment this
script hears the task's `finished` event (GET /api/events/poll, held open),
both on this machine's clock. The tasks are submitted a quarter second
apart, so their ends fall at every point of the poll cycle.

About 30-60 s in all.
"""

import argparse
import json
import os
import random
import statistics
import threading
import time

import requests

from _common import ROOT, PYTHON, Server, fmt_ms, free_port, percentile, table, temp_dir

from tests.fakes.kie import FakeKIE

ADMIN = "hf_bench_admin_token_0123456789"


def run(tasks, poll_s, callbacks, seed):
    rng = random.Random(seed)
    lengths = iter([rng.uniform(1.0, 9.0) for _ in range(tasks)])
    with temp_dir("callbacks") as data, FakeKIE(api_key="bench-key", callbacks=callbacks) as kie:
        kie.before_create = lambda: setattr(kie, "job_seconds", next(lengths))
        conf = os.path.join(data, "holdfast.toml")
        with open(conf, "w") as fh:
            fh.write(f'[providers.kie]\ntype = "kie"\nurl = "{kie.url}"\napi_key_env = "BENCH_KIE_KEY"\n'
                     f"timeout_s = 5\npoll_interval_s = {poll_s}\nmax_poll_interval_s = {poll_s}\n")
        port = free_port()
        env = {"HOLDFAST_DATA": data, "HOLDFAST_PORT": str(port), "HOLDFAST_CONFIG": conf,
               "HOLDFAST_ADMIN_TOKEN": ADMIN, "BENCH_KIE_KEY": "bench-key", "HOLDFAST_LOG": "text"}
        if callbacks:
            env["HOLDFAST_PUBLIC_URL"] = f"http://127.0.0.1:{port}"
        with Server([PYTHON, os.path.join(ROOT, "app.py")], port=port, env=env, cwd=data) as server:
            s = requests.Session()
            s.headers["Authorization"] = f"Bearer {ADMIN}"
            since = s.get(server.url + "/api/events/poll", params={"wait": 0}, timeout=10).json()["next"]
            heard, ended = {}, {}
            listener = threading.Thread(target=listen, args=(s, server.url, since, heard, ended, tasks,
                                                             9.0 + 3 * poll_s + tasks), daemon=True)
            listener.start()
            for i in range(tasks):
                res = s.post(server.url + "/api/tasks", timeout=10,
                             json={"provider": "kie", "params": {"model": "m", "input": {"prompt": f"p{i}"}}})
                res.raise_for_status()
                time.sleep(0.25)
            listener.join()
        bad = [t["status"] for t in ended.values() if t["status"] != "succeeded"]
        if len(heard) < tasks or bad:
            raise SystemExit(f"{'callbacks' if callbacks else 'polling'}: {len(heard)} of {tasks} ended, {bad}")
        lags = [heard[i] - kie._tasks[ended[i]["external_id"]].done_at for i in heard]
        polls = kie.requests["/api/v1/jobs/recordInfo"]
        return lags, polls, len(kie.callbacks_sent), len(kie.created)


def listen(session, url, since, heard, ended, tasks, limit_s):
    """Hear `finished` events as they come (a long poll always open), until
    `tasks` tasks ended or `limit_s` passed."""
    deadline = time.monotonic() + limit_s
    while len(heard) < tasks and time.monotonic() < deadline:
        page = session.get(url + "/api/events/poll", params={"since": since, "wait": 5}, timeout=15).json()
        now = time.time()
        since = page["next"]
        for event in page["events"]:
            if event["type"] == "finished":
                heard[event["task"]["id"]] = now
                ended[event["task"]["id"]] = event["task"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--poll-s", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rows, figures = [], {}
    for name, callbacks in (("polling only", False), ("callbacks", True)):
        lags, polls, sent, jobs = run(args.tasks, args.poll_s, callbacks, args.seed)
        figures[name] = lags
        rows.append([name, fmt_ms(statistics.median(lags)), fmt_ms(percentile(lags, 90)), fmt_ms(max(lags)),
                     str(polls), str(sent), str(jobs)])
    table(["", "median lag ms", "p90 ms", "max ms", "recordInfo calls", "callbacks", "jobs"], rows,
          title=f"job end -> task finished, {args.tasks} KIE tasks, poll interval {args.poll_s:g} s")
    print(json.dumps({k: round(statistics.median(v), 3) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
