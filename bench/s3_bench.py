"""The object store (HOLDFAST_FILES=s3://...) against local files, in one run:
upload throughput to an S3-protocol server against writing the same bytes to
local disk, and the latency a bucket adds between a provider's success and
the task's `succeeded`, per file.

    .venv/bin/python bench/s3_bench.py [--mib 64] [--rounds 3] [--tasks 40]

The S3 server is moto's (`python -m moto.server`, from requirements-dev.txt)
on 127.0.0.1, started here and stopped by its PID. No network is crossed,
but moto is pure Python and keeps objects in its own process: most of the
bucket's cost here is moto's, which is why the baseline row is there. Tables:

  upload      FileStore.save vs ObjectStore.save of the same random bytes in
              64 KiB chunks (multipart, 8 MiB parts, one at a time), MiB/s,
              median of rounds, and the ratio of each round's pair; boto3's
              own threaded upload_fileobj of the bytes from memory shows what
              the server itself allows
  collect     one worker tick that sees a KIE job's success, downloads its
              one file and marks the task succeeded: local vs bucket, tasks
              interleaved, median and p90 ms; the difference is what the
              bucket adds per file

Bounded: about 30-60 s; everything lives in one temporary directory.
"""

import argparse
import io
import os
import statistics
import subprocess
import time

from _common import PYTHON, free_port, percentile, table, temp_dir

from config import Config
from providers import build_providers
from store import FileStore, ObjectStore, SqliteStore
from store.objects import s3_client
from worker import Worker

KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_REGION": "us-east-1"}
MiB = 1 << 20


def start_moto():
    port = free_port()
    proc = subprocess.Popen([PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    import requests
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            requests.get(url + "/moto-api/", timeout=1)
            return proc, url
        except requests.RequestException:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto's server did not start")


def bucket_store(url, name):
    config = Config(files=f"s3://{name}/files", s3_endpoint=url, s3_addressing="path")
    client = s3_client(config, KEYS)
    client.create_bucket(Bucket=name)
    return ObjectStore(name, "files", client=client, presign_s=None)


def upload(local, remote, mib, count):
    data = os.urandom(mib * MiB)
    chunks = [data[i:i + 65536] for i in range(0, len(data), 65536)]
    rates = {"local": [], "s3": [], "boto3 upload_fileobj": []}
    for r in range(count):
        for name, files in (("local", local), ("s3", remote)):
            task = f"t_{r:026d}"
            t0 = time.perf_counter()
            files.save(task, "big.bin", iter(chunks), max_bytes=len(data), scope="_lease1")
            rates[name].append(len(data) / MiB / (time.perf_counter() - t0))
            files.remove_task(task)
        # The same bytes through boto3's own managed transfer (8 MiB parts,
        # 10 threads), from memory: what the server allows at best.
        t0 = time.perf_counter()
        remote.client.upload_fileobj(io.BytesIO(data), remote.bucket, "baseline.bin")
        rates["boto3 upload_fileobj"].append(len(data) / MiB / (time.perf_counter() - t0))
        remote.client.delete_object(Bucket=remote.bucket, Key="baseline.bin")
    ratios = [s / loc for s, loc in zip(rates["s3"], rates["local"])]
    table(["store", "MiB/s (median)", "rounds"],
          [[name, f"{statistics.median(v):,.1f}", " ".join(f"{x:,.0f}" for x in v)] for name, v in rates.items()],
          title=f"upload: {mib} MiB in 64 KiB chunks, {count} rounds")
    print(f"s3 / local throughput: {statistics.median(ratios):.3f} (median of per-round ratios)\n")


def collect(tmp, local, remote, tasks):
    from tests.fakes.kie import FakeKIE
    with FakeKIE(api_key="bench-key", job_seconds=0.01) as kie:
        table_ = {"kie": {"type": "kie", "url": kie.url, "api_key_env": "BENCH_KIE_KEY",
                          "poll_interval_s": 0.05, "timeout_s": 5}}
        rigs = {}
        for name, files in (("local", local), ("s3", remote)):
            store = SqliteStore(os.path.join(tmp, f"{name}.db"))
            providers = build_providers(table_, env={"BENCH_KIE_KEY": "bench-key"})
            clock = [1_800_000_000.0]
            worker = Worker(store, providers, files, clock=lambda c=clock: c[0], owner=f"bench:{name}:w")
            rigs[name] = (store, providers, worker, clock, store.create_user("bench")[0], [])
        for i in range(tasks):
            for name, (store, providers, worker, clock, user, times) in rigs.items():
                now = clock[0]
                task, _ = store.submit(user["id"], "kie", {"model": "m", "input": {"prompt": f"p{i}"}}, now=now,
                                       deadline_at=now + 3600, cost=providers["kie"].cost)
                worker.run_once(now)                        # the submit
                time.sleep(0.02)                            # the job ends at the provider
                clock[0] = max(clock[0], store.get_task(task["id"])["next_poll_at"])
                t0 = time.perf_counter()
                worker.run_once(clock[0])                   # success seen, file saved, succeeded
                times.append(time.perf_counter() - t0)
                done = store.get_task(task["id"])
                assert done["status"] == "succeeded" and len(done["files"]) == 1, done
        rows = []
        for name, (store, _, _, _, _, times) in rigs.items():
            rows.append([name, f"{statistics.median(times) * 1000:.1f}", f"{percentile(times, 90) * 1000:.1f}"])
            store.close()
        med = {name: statistics.median(r[5]) for name, r in rigs.items()}
        table(["store", "median ms", "p90 ms"], rows,
              title=f"collect: provider success -> succeeded, one file per task, {tasks} tasks each")
        print(f"added by the bucket per file: {(med['s3'] - med['local']) * 1000:.1f} ms (median s3 - median local)\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=40)
    args = parser.parse_args()
    proc, url = start_moto()
    try:
        with temp_dir("s3") as tmp:
            local = FileStore(os.path.join(tmp, "files"))
            upload(local, bucket_store(url, "bench-upload"), args.mib, args.rounds)
            collect(tmp, local, bucket_store(url, "bench-collect"), args.tasks)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


if __name__ == "__main__":
    main()
