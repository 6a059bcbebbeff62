"""Result files in object storage (HOLDFAST_FILES=s3://...), against moto's
S3-protocol server on 127.0.0.1: the provider suite's key flows again on a
bucket, uploads that appear whole or not at all, fencing, presigned links,
retention, the audit, export and import, a kill -9 mid-upload and a crash
round of real servers, three servers on one PostgreSQL database and one
bucket."""

import calendar
import collections
import hashlib
import http.server
import os
import random
import threading
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

import test_providers
from api import create_app
from config import Config
from errors import Conflict, InvalidInput
from recover import audit, export_data, import_data, recover
from store import TERMINAL, ObjectStore, SqliteStore
from store.objects import parse_files_url, s3_client
from support import ROOT, ServerProcess, WSGIClient, api
from test_providers import Rig, comfy, kie_conf, wait_for  # noqa: F401 (comfy: a fixture)
from tests.fakes.kie import FakeKIE
from worker import Worker

PART = 5 << 20          # S3's smallest part: a test file of a few MiB has several
TASK = "t_" + "0" * 26
MiB = 1 << 20


def object_store(moto_server, bucket, presign_s=None, part_bytes=PART):
    config = Config(files=f"s3://{bucket}/files", s3_endpoint=moto_server.url, s3_addressing="path")
    return ObjectStore(bucket, "files", client=s3_client(config, moto_server.KEYS), presign_s=presign_s,
                       part_bytes=part_bytes)


@pytest.fixture
def bucket(moto_server):
    return moto_server.new_bucket()


@pytest.fixture
def files(moto_server, bucket):
    """Overrides conftest's: every test here, and the provider classes
    below, keep their result files in a bucket of their own."""
    return object_store(moto_server, bucket)


def keys(moto_server, bucket, prefix="files/"):
    res = moto_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in res.get("Contents", ()))


def uploads(moto_server, bucket):
    return moto_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def pieces(data, size=64 * 1024):
    return (data[i:i + size] for i in range(0, len(data), size))


# -- the provider suite's key flows, on a bucket ---------------------------------

class TestComfyUIOnS3(test_providers.TestComfyUI):
    pass


class TestKIEOnS3(test_providers.TestKIE):
    pass


class TestDownloadsOnS3(test_providers.TestDownloads):
    pass


# -- the store ------------------------------------------------------------------

def test_files_setting_is_local_or_an_s3_url():
    assert parse_files_url("local") is None and parse_files_url(None) is None
    assert parse_files_url("s3://my-bucket/a/b") == ("my-bucket", "a/b")
    assert parse_files_url("s3://my-bucket") == ("my-bucket", "")
    for bad in ("s3:/x", "s3://", "s3://UPPER/x", "gs://b/p", "s3://b/../x", "nfs"):
        with pytest.raises(Exception) as info:
            parse_files_url(bad)
        assert info.value.code == "config" and "HOLDFAST_FILES" in info.value.message


def test_a_bad_files_setting_stops_the_server_with_one_line(tmp_path):
    import subprocess
    import sys
    env = {**os.environ, "HOLDFAST_DATA": str(tmp_path), "HOLDFAST_FILES": "s3:/nope"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "app.py")], env=env,
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "HOLDFAST_FILES" in proc.stderr, proc.stderr


def test_boto3_is_imported_only_for_a_bucket_with_a_hint_when_missing(tmp_path):
    import subprocess
    import sys
    local = subprocess.run([sys.executable, "-c", "import sys, app, recover, store, config, worker; "
                            "print('boto3' in sys.modules, 'botocore' in sys.modules)"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert local.stdout.split() == ["False", "False"], local.stderr
    (tmp_path / "boto3").mkdir()
    (tmp_path / "boto3" / "__init__.py").write_text("raise ImportError('No module named boto3')\n")
    env = {**os.environ, "HOLDFAST_DATA": str(tmp_path / "data"), "HOLDFAST_FILES": "s3://bucket/prefix",
           "PYTHONPATH": str(tmp_path), "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "app.py")], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "pip install boto3" in proc.stderr


def test_a_large_file_goes_up_in_parts_and_appears_only_when_whole(moto_server, bucket, files):
    data = os.urandom(12 * MiB)
    seen = {}

    def chunks():
        for i, chunk in enumerate(pieces(data)):
            if i == 11 * 16:        # 11 MiB given: two parts sent, nothing visible yet
                seen["keys"], seen["uploads"] = keys(moto_server, bucket), uploads(moto_server, bucket)
                seen["parts"] = moto_server.client().list_parts(
                    Bucket=bucket, Key=seen["uploads"][0]["Key"], UploadId=seen["uploads"][0]["UploadId"])["Parts"]
            yield chunk

    meta = files.save(TASK, "big.bin", chunks(), max_bytes=20 * MiB, scope="_lease1")
    assert seen["keys"] == [] and len(seen["uploads"]) == 1
    assert [p["Size"] for p in seen["parts"]] == [PART, PART]       # one part in memory at a time
    assert meta["sha256"] == hashlib.sha256(data).hexdigest() and meta["size"] == len(data)
    assert keys(moto_server, bucket) == [f"files/{TASK}/_lease1/big.bin"] and uploads(moto_server, bucket) == []
    assert files.sha256_of(TASK, meta) == meta["sha256"] and files.size_of(TASK, meta) == len(data)


@pytest.mark.parametrize("size", [1000, 12 * MiB])
def test_a_file_over_the_limit_or_cut_short_leaves_no_object_and_no_upload(moto_server, bucket, files, size):
    data = os.urandom(size)
    with pytest.raises(InvalidInput):
        files.save(TASK, "x.bin", pieces(data), max_bytes=size - 1, scope="_lease1")

    def broken():
        yield from pieces(data[:size // 2 + 1])
        raise ConnectionError("the provider hung up")
    with pytest.raises(ConnectionError):
        files.save(TASK, "x.bin", broken(), max_bytes=size, scope="_lease1")
    assert keys(moto_server, bucket) == [] and uploads(moto_server, bucket) == []


@pytest.mark.parametrize("size", [1000, 6 * MiB])
def test_a_committed_object_is_never_replaced(moto_server, bucket, files, size):
    """The write is conditional (If-None-Match: *): other bytes under a
    key that holds an object are refused, the same bytes (a retried request
    whose first try landed) are not an error."""
    first, other = os.urandom(size), os.urandom(size)
    meta = files.save(TASK, "a.png", pieces(first), max_bytes=size, scope="_lease2")
    with pytest.raises(Conflict) as info:
        files.save(TASK, "a.png", pieces(other), max_bytes=size, scope="_lease2")
    assert info.value.code == "object_exists"
    assert files.save(TASK, "a.png", pieces(first), max_bytes=size, scope="_lease2") == meta
    assert b"".join(files.open(TASK, meta)[0]) == first
    assert keys(moto_server, bucket) == [f"files/{TASK}/_lease2/a.png"] and uploads(moto_server, bucket) == []


class Copies(http.server.ThreadingHTTPServer):
    """A result link whose every download has other bytes ("copy 1",
    "copy 2", ...), so that whose copy was kept shows."""

    def __init__(self):
        self.served = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.served += 1
                body = f"copy {server.served}".encode()
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/x.png"
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_a_stale_worker_cannot_replace_a_committed_object(moto_server, bucket, files, sqlite_store, clock):
    """Worker A holds the task; its lease runs out and B takes it over and
    publishes the result. A, still running, downloads and uploads it too
    (other bytes): its copy goes under its own lease's key, the store
    refuses to publish it, and A removes it. The published object keeps
    B's bytes."""
    copies = Copies()
    try:
        with FakeKIE(job_seconds=0.05, result_urls=lambda task: [copies.url]) as kie:
            rig = Rig(sqlite_store, files, clock, {"kie": kie_conf(kie, allow_private_results=True)})
            task_id = rig.submit("kie", {"model": "m", "input": {}})
            rig.worker.run_once(clock())
            wait_for(lambda: time.time() > kie._tasks[rig.task(task_id)["external_id"]].done_at)
            clock.advance(1)
            [stale] = sqlite_store.claim("test:1:w", now=clock(), limit=5, lease_s=1)
            clock.advance(5)
            Worker(sqlite_store, rig.providers, files, clock=clock, owner="test:2:w").run_once(clock())
            task = rig.task(task_id)
            assert task["status"] == "succeeded" and task["files"][0]["dir"] != f"_lease{stale['lease_token']}"
            [meta] = task["files"]
            assert meta["sha256"] == hashlib.sha256(b"copy 1").hexdigest()

            rig.worker.process(stale, clock())

            assert copies.served == 2            # A did download (and upload) its copy
    finally:
        copies.shutdown()
    key = files.entry_path(task_id, meta)
    assert rig.task(task_id)["files"] == [meta] and b"".join(files.open(task_id, meta)[0]) == b"copy 1"
    assert keys(moto_server, bucket) == [key] and uploads(moto_server, bucket) == []


# -- downloads through the API ---------------------------------------------------

def _finished_task(sqlite_store, files, clock, kie):
    """A succeeded KIE task of a user "owner": (rig, task, owner's token)."""
    rig = Rig(sqlite_store, files, clock, {"kie": kie_conf(kie)})
    rig.user, token = sqlite_store.create_user("owner")
    task = rig.run(rig.submit("kie", {"model": "m", "input": {}}))
    assert task["status"] == "succeeded"
    return rig, task, token


def test_a_download_is_a_presigned_redirect_for_its_owner_only(moto_server, bucket, sqlite_store, clock, tmp_path):
    files = object_store(moto_server, bucket, presign_s=2)
    with FakeKIE(job_seconds=0.05) as kie:
        rig, task, token = _finished_task(sqlite_store, files, clock, kie)
    other = sqlite_store.create_user("other")[1]
    app = create_app(sqlite_store, rig.providers, Config(data=str(tmp_path)), files=files, clock=clock)
    [meta] = task["files"]
    path = f"/api/tasks/{task['id']}/files/{meta['name']}"

    res = WSGIClient(app, token).get(path)
    assert res.status == 302, res
    link = res.headers["location"]
    query = parse_qs(urlsplit(link).query)
    # The link lives 2 s from now. (moto does not enforce X-Amz-Expires;
    # S3, R2 and MinIO do.)
    assert query["X-Amz-Expires"] == ["2"]
    signed = calendar.timegm(time.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ"))
    assert abs(signed - time.time()) < 60
    got = requests.get(link, timeout=10)          # no holdfast token: the link alone
    assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == meta["sha256"]
    assert got.headers["Content-Type"] == meta["content_type"]

    res = WSGIClient(app, other).get(path)
    assert res.status == 404 and res.json()["error"]["code"] == "task_not_found" and "location" not in res.headers
    assert WSGIClient(app, None).get(path).status == 401


def test_with_presign_off_the_bytes_are_streamed(moto_server, bucket, sqlite_store, clock, tmp_path):
    files = object_store(moto_server, bucket, presign_s=None)
    with FakeKIE(job_seconds=0.05) as kie:
        rig, task, token = _finished_task(sqlite_store, files, clock, kie)
    app = create_app(sqlite_store, rig.providers, Config(data=str(tmp_path)), files=files, clock=clock)
    [meta] = task["files"]
    res = WSGIClient(app, token).get(f"/api/tasks/{task['id']}/files/{meta['name']}")
    assert res.status == 200 and hashlib.sha256(res.body).hexdigest() == meta["sha256"]
    assert res.headers["content-type"] == meta["content_type"] and res.headers["x-content-type-options"] == "nosniff"


def test_retention_removes_objects_and_says_the_file_expired(moto_server, bucket, files, sqlite_store, clock,
                                                             tmp_path):
    with FakeKIE(job_seconds=0.05) as kie:
        rig, task, token = _finished_task(sqlite_store, files, clock, kie)
    assert keys(moto_server, bucket)
    clock.advance(73 * 3600)
    done = Worker(sqlite_store, rig.providers, files, clock=clock, keep_files_h=72).cleanup()
    assert done["files"] == 1 and keys(moto_server, bucket) == []
    app = create_app(sqlite_store, rig.providers, Config(data=str(tmp_path)), files=files, clock=clock)
    [meta] = task["files"]
    res = WSGIClient(app, token).get(f"/api/tasks/{task['id']}/files/{meta['name']}")
    assert res.status == 404 and res.json()["error"]["code"] == "file_expired"


def test_an_unreachable_bucket_is_a_503_and_a_later_try(moto_server, bucket, files, sqlite_store, clock,
                                                       tmp_path, caplog):
    """Nothing listens at the bucket's address: a download answers 503 at
    once (bounded, no traceback), and a result the worker cannot store is
    tried again later and saved once the bucket is back."""
    from support import free_port
    config = Config(files=f"s3://{bucket}/files", s3_endpoint=f"http://127.0.0.1:{free_port()}",
                    s3_addressing="path")
    down = ObjectStore(bucket, "files", client=s3_client(config, moto_server.KEYS), presign_s=None)
    with FakeKIE(job_seconds=0.05) as kie:
        rig, task, token = _finished_task(sqlite_store, files, clock, kie)
        app = create_app(sqlite_store, rig.providers, Config(data=str(tmp_path)), files=down, clock=clock)
        [meta] = task["files"]
        started = time.monotonic()
        res = WSGIClient(app, token).get(f"/api/tasks/{task['id']}/files/{meta['name']}")
        assert res.status == 503 and res.json()["error"]["code"] == "store_unavailable"
        assert time.monotonic() - started < 30

        rig.files = rig.worker.files = down
        task_id = rig.submit("kie", {"model": "m", "input": {}})
        stuck = wait_for(lambda: (t := rig.step(task_id))["state"].get("last_error") and t, timeout=60)
        assert stuck["status"] == "running" and stuck["files"] == []
        assert stuck["state"]["last_error"].startswith("cannot save 0.png"), stuck["state"]
        assert not [r for r in caplog.records if r.exc_info], "one line, not a traceback"
        rig.worker.files = files
        done = rig.run(task_id)
    assert done["status"] == "succeeded" and files.sha256_of(task_id, done["files"][0]) == done["files"][0]["sha256"]


def test_a_retention_pass_lists_the_bucket_once_not_once_per_task(moto_server, bucket, files, sqlite_store,
                                                                  clock):
    with FakeKIE(job_seconds=0.05) as kie:
        rig, first, _ = _finished_task(sqlite_store, files, clock, kie)
        for _ in range(5):
            assert rig.run(rig.submit("kie", {"model": "m", "input": {}}))["status"] == "succeeded"
    moto_server.client().put_object(Bucket=bucket, Key=f"files/{first['id']}/_lease99/x.png", Body=b"stray")
    calls = collections.Counter()
    files.client.meta.events.register("before-call.s3.*", lambda model, **kw: calls.update([model.name]))
    done = Worker(sqlite_store, rig.providers, files, clock=clock).cleanup()
    assert done["copies"] == 1 and len(keys(moto_server, bucket)) == 6
    # One listing for the pass, one to remove the stray's folder.
    assert calls["ListObjectsV2"] == 2 and calls["ListMultipartUploads"] == 2, calls


# -- recover.py ------------------------------------------------------------------

def test_the_audit_checks_objects_and_fixes_strays(moto_server, bucket, files, sqlite_store, clock):
    with FakeKIE(job_seconds=0.05, outputs=2) as kie:
        rig, task, token = _finished_task(sqlite_store, files, clock, kie)
    good = audit(sqlite_store, files, now=clock())
    assert good["found"] == 0 and good["sha256_checked"]["files"] == 2, good["summary"]

    s3 = moto_server.client()
    first, second = task["files"]
    s3.put_object(Bucket=bucket, Key=files.entry_path(task["id"], first), Body=b"x" * first["size"])
    s3.delete_object(Bucket=bucket, Key=files.entry_path(task["id"], second))
    s3.put_object(Bucket=bucket, Key=f"files/{task['id']}/_lease99/stray.png", Body=b"stray")
    s3.put_object(Bucket=bucket, Key=f"files/t_{'9' * 26}/_lease1/orphan.png", Body=b"orphan")
    report = audit(sqlite_store, files, now=clock(), fix=True)
    assert [c["name"] for c in report["sha256_mismatches"]] == [first["name"]]
    assert report["tasks_missing_files"] == [{"task_id": task["id"], "missing": [second["name"]], "wrong_size": []}]
    assert report["unlisted_files"][0]["entries"] == ["_lease99"] and report["orphans_deleted"] == [f"t_{'9' * 26}"]
    assert keys(moto_server, bucket) == [files.entry_path(task["id"], first)]


def test_recover_aborts_an_upload_a_crash_cut_short(moto_server, bucket, files, sqlite_store, clock):
    s3 = moto_server.client()
    upload = s3.create_multipart_upload(Bucket=bucket, Key=f"files/{TASK}/_lease1/big.bin")["UploadId"]
    s3.upload_part(Bucket=bucket, Key=f"files/{TASK}/_lease1/big.bin", UploadId=upload, PartNumber=1, Body=b"x")
    report = recover(sqlite_store, {}, now=clock(), files=files)
    assert report["partial_files"] == [f"files/{TASK}/_lease1/big.bin?uploadId={upload}"]
    assert uploads(moto_server, bucket) == [] and keys(moto_server, bucket) == []


def test_a_cut_short_upload_is_an_unlisted_copy_the_task_end_removes(moto_server, bucket, files):
    s3 = moto_server.client()
    meta = files.save(TASK, "a.png", [b"published"], max_bytes=100, scope="_lease2")
    s3.create_multipart_upload(Bucket=bucket, Key=f"files/{TASK}/_lease1/big.bin")
    assert files.unlisted(TASK, [meta]) == ["_lease1"]
    assert files.remove_unlisted(TASK, [meta]) == ["_lease1"]
    assert uploads(moto_server, bucket) == [] and keys(moto_server, bucket) == [f"files/{TASK}/_lease2/a.png"]


def test_export_and_import_carry_the_file_list(moto_server, bucket, files, sqlite_store, clock, tmp_path):
    with FakeKIE(job_seconds=0.05) as kie:
        rig, task, token = _finished_task(sqlite_store, files, clock, kie)
    export_data(sqlite_store, str(tmp_path / "dump.json"))
    other = SqliteStore(str(tmp_path / "other.db"))
    try:
        import_data(other, str(tmp_path / "dump.json"))
        moved = other.get_task(task["id"])
        assert moved["files"] == task["files"]
        [meta] = moved["files"]
        assert files.sha256_of(moved["id"], meta) == meta["sha256"]
    finally:
        other.close()


# -- real servers ------------------------------------------------------------------

class SlowFile(http.server.ThreadingHTTPServer):
    """One 12 MiB result at /big.bin: the first 9 MiB at once, the rest only
    once `gate` is set. Counts its requests."""

    def __init__(self, data):
        self.data, self.gate, self.requests = data, threading.Event(), 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(server.data)))
                self.end_headers()
                try:
                    self.wfile.write(server.data[:9 * MiB])
                    self.wfile.flush()
                    server.gate.wait(60)
                    self.wfile.write(server.data[9 * MiB:])
                except OSError:
                    pass        # the downloader was killed

            def log_message(self, *args):
                pass
        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _config(path, kie_url):
    path.write_text(f"""
[providers.demo]
duration_s = 0.5
poll_interval_s = 0.2

[providers.kie]
type = "kie"
url = "{kie_url}"
api_key_env = "HOLDFAST_TEST_KIE_KEY"
poll_interval_s = 0.2
max_poll_interval_s = 0.4
timeout_s = 10
allow_private_results = true
""")
    return str(path)


def _wait_terminal(session, url, ids, timeout=90):
    deadline, tasks = time.time() + timeout, {}
    while time.time() < deadline:
        tasks = {i: session.get(f"{url}/api/tasks/{i}", timeout=10).json()["task"] for i in ids}
        if all(t["status"] in TERMINAL for t in tasks.values()):
            return tasks
        time.sleep(0.25)
    raise AssertionError(f"stuck: { {i: (t['status'], t['step']) for i, t in tasks.items()} }")


def test_an_upload_killed_halfway_leaves_no_object_under_the_final_key(moto_server, bucket, tmp_path):
    data = os.urandom(12 * MiB)
    slow = SlowFile(data)
    kie = FakeKIE(api_key="s3-key", job_seconds=0.2, result_urls=lambda task: [slow.url + "/big.bin"]).start()
    env = {**moto_server.env(bucket), "HOLDFAST_CONFIG": _config(tmp_path / "holdfast.toml", kie.url),
           "HOLDFAST_TEST_KIE_KEY": "s3-key", "HOLDFAST_LEASE_S": "5"}
    server = ServerProcess(tmp_path / "node", env=env).start()
    try:
        session = api(server, server.tokens["demo"])
        res = session.post(server.url + "/api/tasks", timeout=10,
                           json={"provider": "kie", "params": {"model": "m", "input": {}}})
        assert res.status_code == 201, res.text
        task_id = res.json()["task"]["id"]
        s3 = moto_server.client()

        def a_part_is_up():
            for u in uploads(moto_server, bucket):
                if s3.list_parts(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]).get("Parts"):
                    return True
            return False
        wait_for(a_part_is_up, timeout=60)
        server.kill()
        assert keys(moto_server, bucket) == []              # nothing under any final key
        [cut] = uploads(moto_server, bucket)
        assert cut["Key"].startswith(f"files/{task_id}/_lease")

        slow.gate.set()
        server = ServerProcess(tmp_path / "node", env=env, port=server.port).start()
        task = _wait_terminal(session, server.url, [task_id])[task_id]
        assert task["status"] == "succeeded", task
        [meta] = task["files"]
        assert meta["sha256"] == hashlib.sha256(data).hexdigest() and slow.requests == 2
        # The cut-short upload is gone: the restart's recovery aborted it.
        [key] = keys(moto_server, bucket)
        assert key.startswith(f"files/{task_id}/_lease") and key.endswith("/big.bin") and key != cut["Key"]
        assert uploads(moto_server, bucket) == []
        got = requests.get(session.get(f"{server.url}/api/tasks/{task_id}/files/big.bin", timeout=10,
                                       allow_redirects=False).headers["Location"], timeout=30)
        assert hashlib.sha256(got.content).hexdigest() == meta["sha256"]
    finally:
        server.stop()
        kie.stop()
        slow.gate.set()
        slow.shutdown()


def test_kill_9_mid_run_on_s3_loses_and_repeats_nothing(moto_server, bucket, tmp_path):
    """test_crash's kill round, with files in a bucket."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    server = ServerProcess(tmp_path, env=moto_server.env(bucket)).start()
    session = api(server, server.tokens["demo"])
    accepted = []
    try:
        for i in range(12):
            res = session.post(server.url + "/api/tasks", timeout=10, json={
                "provider": "demo", "params": {"prompt": f"p{i}", "duration_s": rng.choice([0.5, 1.0, 1.5]),
                                               **({"fail": True} if i % 5 == 4 else {})}})
            assert res.status_code == 201, res.text
            accepted.append(res.json()["task"]["id"])
        time.sleep(rng.uniform(0.3, 1.2))
        server.kill()
        server = ServerProcess(tmp_path, env=moto_server.env(bucket), port=server.port).start()
        tasks = _wait_terminal(session, server.url, accepted)
    finally:
        server.stop()
    store = SqliteStore(str(tmp_path / "holdfast.db"))
    files = object_store(moto_server, bucket)
    try:
        listed = set()
        for task_id, task in tasks.items():
            finished = [t for _, t in store.task_events(task_id) if t == "finished"]
            assert finished == ["finished"], f"seed {seed}: {task_id}"
            expect = "failed" if task["params"].get("fail") else "succeeded"
            assert task["status"] == expect and task["attempts"] == 1, f"seed {seed}: {task}"
            for meta in store.get_task(task_id)["files"]:
                assert files.sha256_of(task_id, meta) == meta["sha256"], f"seed {seed}: {task_id}"
                listed.add(files.entry_path(task_id, meta))
        assert set(keys(moto_server, bucket)) == listed, f"seed {seed}"
        assert store.lease_owners() == []
    finally:
        store.close()
    assert not os.path.exists(tmp_path / "files") or not os.listdir(tmp_path / "files")


def test_three_servers_on_one_database_and_one_bucket_serve_every_file(moto_server, bucket, tmp_path, pg_schema):
    with FakeKIE(api_key="s3-key", job_seconds=0.5) as kie:
        env = {**moto_server.env(bucket), "HOLDFAST_STORE": pg_schema.url, "HOLDFAST_LEASE_S": "5",
               "HOLDFAST_CONFIG": _config(tmp_path / "holdfast.toml", kie.url), "HOLDFAST_TEST_KIE_KEY": "s3-key"}
        servers = []
        try:
            for n in range(3):
                # The third streams the bytes itself; the others redirect.
                extra = {"HOLDFAST_S3_PRESIGN": "0"} if n == 2 else {}
                servers.append(ServerProcess(tmp_path / f"node{n}", env={**env, **extra}).start())
            token = next(s.tokens["demo"] for s in servers if "demo" in s.tokens)
            sessions = [api(s, token) for s in servers]
            ids = []
            for i in range(9):
                body = ({"provider": "kie", "params": {"model": "m", "input": {"prompt": f"p{i}"}}}
                        if i % 2 else {"provider": "demo", "params": {"prompt": f"p{i}"}})
                res = sessions[i % 3].post(servers[i % 3].url + "/api/tasks", json=body, timeout=10)
                assert res.status_code == 201, res.text
                ids.append(res.json()["task"]["id"])
            tasks = _wait_terminal(sessions[0], servers[0].url, ids)
            served = 0
            for task in tasks.values():
                assert task["status"] == "succeeded", task
                for meta in task["files"]:
                    for n, server in enumerate(servers):
                        res = sessions[n].get(server.url + meta["url"], timeout=30)   # redirects followed
                        assert res.status_code == 200, (n, res.status_code, res.text[:200])
                        assert hashlib.sha256(res.content).hexdigest() == meta["sha256"]
                        served += 1
            assert served == 27
            for server in servers:
                assert not os.path.exists(os.path.join(server.data_dir, "files"))
        finally:
            for server in servers:
                server.stop()
