"""The fake providers answer like the real ones (ComfyUI: like the recordings)."""

import json
import socket
import threading
import time
from urllib.parse import urlsplit
from collections import Counter

import pytest
import requests

try:
    from tests.fakes.comfyui import FIXTURES, FakeComfyUI, fixture
    from tests.fakes.kie import FakeKIE
except ImportError:  # plain `pytest` puts tests/, not the repo root, on sys.path
    from fakes.comfyui import FIXTURES, FakeComfyUI, fixture
    from fakes.kie import FakeKIE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def workflow(width=64, color=0x112233, prefix="probe", batch=1):
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": width, "height": 64, "batch_size": batch, "color": color}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def shape(value):
    """The structure of a JSON value: keys and types, not contents."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    return type(value).__name__


def wait_for(predicate, timeout=3.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        result = predicate()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def only_entry(body):
    assert len(body) == 1
    return next(iter(body.values()))


# -- ComfyUI -----------------------------------------------------------------

@pytest.fixture
def comfy():
    with FakeComfyUI(job_seconds=0.1) as fake:
        yield fake


def submit(comfy, prompt, **extra):
    return requests.post(f"{comfy.url}/prompt", json={"prompt": prompt, **extra}, timeout=5)


def history(comfy, prompt_id):
    return requests.get(f"{comfy.url}/history/{prompt_id}", timeout=5).json()


def test_comfyui_success_with_client_chosen_id(comfy):
    comfy.hold()
    r = submit(comfy, workflow(), prompt_id="job-42:attempt-1", client_id="c1")
    assert r.status_code == 200
    assert r.json() == {"prompt_id": "job-42:attempt-1", "number": 0, "node_errors": {}}
    assert history(comfy, "job-42:attempt-1") == {}  # not finished yet
    comfy.release()

    body = wait_for(lambda: history(comfy, "job-42:attempt-1"))
    entry = only_entry(body)
    recorded = only_entry(fixture("history_ok"))
    assert shape(entry) == shape(recorded)
    assert entry["prompt"][1:4] == ["job-42:attempt-1", workflow(), {"client_id": "c1"}]
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    image = entry["outputs"]["2"]["images"][0]
    assert image == {"filename": "probe_00001_.png", "subfolder": "", "type": "output"}

    view = requests.get(f"{comfy.url}/view", params=image, timeout=5)
    assert view.status_code == 200
    assert view.headers["Content-Type"] == "image/png"
    assert view.content.startswith(PNG_MAGIC)
    assert comfy.submissions == ["job-42:attempt-1"] and comfy.runs["job-42:attempt-1"] == 1


def test_comfyui_outputs_differ_and_batches_number_files(comfy):
    submit(comfy, workflow(color=0xFF0000, batch=2), prompt_id="a")
    submit(comfy, workflow(color=0x00FF00), prompt_id="b")
    assert comfy.wait_idle()
    names = [i["filename"] for pid in "ab" for i in history(comfy, pid)[pid]["outputs"]["2"]["images"]]
    assert names == ["probe_00001_.png", "probe_00002_.png", "probe_00003_.png"]
    blobs = {requests.get(f"{comfy.url}/view", params={"filename": n}, timeout=5).content for n in names}
    assert len(blobs) == 3


def test_comfyui_same_id_twice_runs_twice(comfy):
    for _ in range(2):
        assert submit(comfy, workflow(), prompt_id="dup").status_code == 200
    assert comfy.wait_idle()
    assert comfy.submissions == ["dup", "dup"]
    assert comfy.runs["dup"] == 2
    # The repeat hits ComfyUI's cache: all nodes cached, same output file.
    entry = history(comfy, "dup")["dup"]
    assert entry["prompt"][0] == 1
    assert entry["status"]["messages"][1][1]["nodes"] == ["1", "2"]
    assert entry["outputs"]["2"]["images"][0]["filename"] == "probe_00001_.png"


def test_comfyui_random_id_when_none_given(comfy):
    prompt_id = submit(comfy, workflow()).json()["prompt_id"]
    assert len(prompt_id) == 36 and prompt_id.count("-") == 4


@pytest.mark.parametrize("body, recorded", [
    ({"client_id": "x"}, "post_prompt_invalid_no_prompt"),
    ({"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}, "post_prompt_invalid_unknown_class"),
    ({"prompt": {"1": workflow()["1"]}}, "post_prompt_invalid_no_output_node"),
    ({"prompt": workflow(width=0)}, "post_prompt_invalid_value_out_of_range"),
    ({"prompt": workflow(width="abc")}, "post_prompt_invalid_wrong_type"),
    ({"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                 "2": workflow()["2"]}}, "post_prompt_invalid_missing_input"),
    ({"prompt": {"2": {"class_type": "SaveImage", "inputs": {"images": ["99", 0], "filename_prefix": "p"}}}},
     "post_prompt_invalid_bad_link"),
])
def test_comfyui_validation_errors_match_recordings(comfy, body, recorded):
    r = requests.post(f"{comfy.url}/prompt", json=body, timeout=5)
    assert r.status_code == FIXTURES[recorded]["http_status"] == 400
    got, want = r.json(), fixture(recorded)
    if "traceback" in json.dumps(want):
        assert shape(got) == shape(want)
    else:
        assert got == want  # byte for byte what ComfyUI said
    assert comfy.submissions == []


def test_comfyui_runtime_error_history(comfy):
    submit(comfy, workflow(prefix="../../escape"), prompt_id="bad")
    comfy.fail_next = 1
    submit(comfy, workflow(color=1), prompt_id="unlucky")
    submit(comfy, workflow(color=2), prompt_id="fine")
    assert comfy.wait_idle()
    recorded = only_entry(fixture("history_runtime_error"))
    for pid in ("bad", "unlucky"):
        entry = history(comfy, pid)[pid]
        assert shape(entry) == shape(recorded)
        assert entry["status"]["status_str"] == "error" and entry["outputs"] == {}
        assert entry["status"]["messages"][-1][0] == "execution_error"
    bad = history(comfy, "bad")["bad"]["status"]["messages"][-1][1]
    assert "outside the output folder" in bad["exception_message"]
    assert history(comfy, "fine")["fine"]["status"]["status_str"] == "success"


def test_comfyui_queue_shows_running_and_pending_while_held(comfy):
    assert requests.get(f"{comfy.url}/queue", timeout=5).json() == fixture("queue_idle")
    comfy.hold()
    submit(comfy, workflow(), prompt_id="first")
    submit(comfy, workflow(color=5), prompt_id="second")
    queue = wait_for(lambda: (q := requests.get(f"{comfy.url}/queue", timeout=5).json())["queue_running"] and q)
    assert shape(queue) == shape(fixture("queue_busy"))
    assert [item[1] for item in queue["queue_running"]] == ["first"]
    assert [item[1] for item in queue["queue_pending"]] == ["second"]
    assert requests.get(f"{comfy.url}/prompt", timeout=5).json() == {"exec_info": {"queue_remaining": 2}}
    time.sleep(0.2)  # well past job_seconds: held jobs still do not finish
    assert history(comfy, "first") == {}
    comfy.release()
    assert comfy.wait_idle()


def test_comfyui_delete_removes_pending(comfy):
    comfy.hold()
    submit(comfy, workflow(), prompt_id="running")
    submit(comfy, workflow(color=7), prompt_id="pending")
    wait_for(lambda: requests.get(f"{comfy.url}/queue", timeout=5).json()["queue_running"])
    r = requests.post(f"{comfy.url}/queue", json={"delete": ["pending", "running"]}, timeout=5)
    assert r.status_code == 200 and r.content == b""
    queue = requests.get(f"{comfy.url}/queue", timeout=5).json()
    assert [i[1] for i in queue["queue_running"]] == ["running"]  # delete leaves the running job alone
    assert queue["queue_pending"] == []
    comfy.release()
    assert comfy.wait_idle()
    assert history(comfy, "pending") == fixture("history_deleted_pending")
    assert comfy.runs["pending"] == 0


def test_comfyui_interrupt_gives_interrupted_history(comfy):
    comfy.hold()
    submit(comfy, workflow(), prompt_id="slow")
    wait_for(lambda: requests.get(f"{comfy.url}/queue", timeout=5).json()["queue_running"])
    r = requests.post(f"{comfy.url}/interrupt", timeout=5)
    assert r.status_code == 200 and r.content == b""
    entry = wait_for(lambda: history(comfy, "slow"))["slow"]
    assert shape(entry) == shape(only_entry(fixture("history_interrupted")))
    assert (entry["status"]["status_str"], entry["status"]["completed"], entry["outputs"]) == ("error", False, {})
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    comfy.release()


def test_comfyui_restart_forgets_history_but_keeps_files(comfy):
    submit(comfy, workflow(), prompt_id="before")
    assert comfy.wait_idle()
    image = history(comfy, "before")["before"]["outputs"]["2"]["images"][0]
    comfy.hold()
    submit(comfy, workflow(color=9), prompt_id="lost-running")
    submit(comfy, workflow(color=10), prompt_id="lost-pending")
    wait_for(lambda: requests.get(f"{comfy.url}/queue", timeout=5).json()["queue_running"])

    comfy.restart()
    comfy.release()
    assert history(comfy, "before") == FIXTURES["history_after_restart"]["history_after_restart"] == {}
    assert requests.get(f"{comfy.url}/queue", timeout=5).json() == fixture("queue_idle")
    view = requests.get(f"{comfy.url}/view", params=image, timeout=5)
    assert view.status_code == 200 and view.content.startswith(PNG_MAGIC)
    time.sleep(0.2)
    assert history(comfy, "lost-running") == {} and comfy.runs["lost-pending"] == 0


def test_comfyui_view_missing_and_system_stats(comfy):
    r = requests.get(f"{comfy.url}/view", params={"filename": "nope.png", "type": "output"}, timeout=5)
    assert r.status_code == 404 and r.content == b""
    assert requests.get(f"{comfy.url}/system_stats", timeout=5).json() == fixture("system_stats")


def test_comfyui_stop_start_keeps_port_and_state():
    with FakeComfyUI(job_seconds=0.05) as comfy:
        url = comfy.url
        submit(comfy, workflow(), prompt_id="x")
        assert comfy.wait_idle()
        comfy.stop()
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/queue", timeout=1)
        comfy.start()
        assert comfy.url == url and "x" in history(comfy, "x")


# -- KIE ---------------------------------------------------------------------

AUTH = {"Authorization": "Bearer test-key"}


def create(kie, body=None, headers=AUTH, timeout=5):
    body = body if body is not None else {"model": "flux/text-to-image", "input": {"prompt": "a red fox"}}
    return requests.post(f"{kie.url}/api/v1/jobs/createTask", json=body, headers=headers, timeout=timeout)


def record(kie, task_id, timeout=5):
    return requests.get(f"{kie.url}/api/v1/jobs/recordInfo", params={"taskId": task_id},
                        headers=AUTH, timeout=timeout)


def wait_done(kie, task_id):
    return wait_for(lambda: (d := record(kie, task_id).json()["data"])["state"] in ("success", "fail") and d)


def test_kie_success_flow():
    with FakeKIE(job_seconds=0.6, outputs=2) as kie:
        r = create(kie)
        assert r.status_code == 200 and r.json()["code"] == 200
        task_id = r.json()["data"]["taskId"]
        assert kie.created == [task_id]

        first = record(kie, task_id).json()
        assert first["code"] == 200 and first["data"]["state"] == "waiting"
        assert first["data"]["resultJson"] == "" and first["data"]["completeTime"] is None
        states = {first["data"]["state"]}
        while (data := record(kie, task_id).json()["data"])["state"] != "success":
            states.add(data["state"])
            time.sleep(0.03)
        assert states == {"waiting", "queuing", "generating"}
        assert json.loads(data["param"])["input"] == {"prompt": "a red fox"}
        assert data["completeTime"] >= data["createTime"] and data["costTime"] == 600

        urls = json.loads(data["resultJson"])["resultUrls"]
        assert len(urls) == 2 and all(u.startswith(kie.url) for u in urls)
        blobs = [requests.get(u, timeout=5) for u in urls]
        assert all(b.status_code == 200 and b.content.startswith(PNG_MAGIC) for b in blobs)
        assert blobs[0].content != blobs[1].content


def test_kie_auth_and_validation_errors():
    with FakeKIE() as kie:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = create(kie, headers=headers)
            assert r.status_code == 401 and r.json()["code"] == 401
        r = create(kie, body={"input": {}})
        assert r.status_code == 200 and r.json()["code"] == 422 and "model" in r.json()["msg"]
        r = record(kie, "no-such-task")
        assert r.status_code == 200 and r.json()["code"] == 404
        assert kie.created == []
    with FakeKIE(http_errors=True) as kie:
        assert create(kie, body={"input": {}}).status_code == 422
        assert record(kie, "no-such-task").status_code == 404


def test_kie_fail_state():
    with FakeKIE(job_seconds=0.05) as kie:
        task_id = create(kie, body={"model": "m", "input": {"prompt": "x", "fail": True}}).json()["data"]["taskId"]
        data = wait_done(kie, task_id)
        assert data["state"] == "fail" and data["failCode"] == "500" and data["failMsg"]
        assert data["resultJson"] == ""


def classify(response):
    if response.status_code != 200:
        return str(response.status_code)
    try:
        response.json()
    except ValueError:
        return "malformed"
    return "ok"


def test_kie_injected_faults_follow_rates():
    n = 300
    with FakeKIE(seed=1, error_rate=0.2, malformed_rate=0.1) as kie:
        seen = Counter(classify(record(kie, "any")) for _ in range(n))
        assert seen == Counter({"ok": n - kie.faults["500"] - kie.faults["malformed"],
                                "500": kie.faults["500"], "malformed": kie.faults["malformed"]})
    assert 0.12 * n < seen["500"] < 0.28 * n
    assert 0.05 * n < seen["malformed"] < 0.15 * n


def test_kie_rate_limit_with_retry_after():
    with FakeKIE(rate_limit_once=True) as kie:
        r = create(kie)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert create(kie).status_code == 200
        kie.rate_limit_next(2, retry_after=7)
        assert [create(kie).status_code for _ in range(3)] == [429, 429, 200]
        assert kie.faults["429"] == 3 and len(kie.created) == 2


def test_kie_timeouts_happen_and_still_create():
    with FakeKIE(seed=3, timeout_rate=0.3, slow_seconds=0.3) as kie:
        timeouts = 0
        for _ in range(30):
            try:
                create(kie, timeout=0.1)
            except requests.Timeout:
                timeouts += 1
        assert 4 <= timeouts <= 16 and timeouts == kie.faults["timeout"]
        assert len(kie.created) == 30  # a timed-out createTask still made its task


def test_kie_link_expiry_and_dead_outputs():
    with FakeKIE(job_seconds=0.05, outputs=3, link_ttl=0.5, dead_outputs={1}) as kie:
        task_id = create(kie).json()["data"]["taskId"]
        urls = json.loads(wait_done(kie, task_id)["resultJson"])["resultUrls"]
        assert [requests.get(u, timeout=5).status_code for u in urls] == [200, 404, 200]
        time.sleep(0.55)
        assert [requests.get(u, timeout=5).status_code for u in urls] == [404, 404, 404]

        other = create(kie).json()["data"]["taskId"]
        url = json.loads(wait_done(kie, other)["resultJson"])["resultUrls"][0]
        assert requests.get(url, timeout=5).status_code == 200
        kie.expire(other)
        assert requests.get(url, timeout=5).status_code == 404


def test_kie_max_concurrent_seen():
    with FakeKIE(job_seconds=0.3) as kie:
        for _ in range(3):
            create(kie)
        assert kie.max_concurrent_seen == 3
        time.sleep(0.35)
        create(kie)
        assert kie.max_concurrent_seen == 3
        assert kie.requests["/api/v1/jobs/createTask"] == 4


def test_kie_counts_polls_of_one_job_that_overlap_but_not_one_whose_asker_left():
    with FakeKIE(job_seconds=5, poll_delay=0.6) as kie:
        task_id = create(kie).json()["data"]["taskId"]
        threads = [threading.Thread(target=record, args=(kie, task_id)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert kie.overlapping_polls == 1
        # An asker that closes its connection mid-poll (as a killed process's
        # kernel does) leaves: a poll right after it overlaps nothing.
        raw = socket.create_connection(("127.0.0.1", urlsplit(kie.url).port), timeout=5)
        raw.sendall(f"GET /api/v1/jobs/recordInfo?taskId={task_id} HTTP/1.1\r\nHost: x\r\n"
                    f"Authorization: {AUTH['Authorization']}\r\n\r\n".encode())
        wait_for(lambda: kie.requests["/api/v1/jobs/recordInfo"] == 3, 5)
        raw.close()
        assert record(kie, task_id).json()["code"] == 200
        assert kie.overlapping_polls == 1
