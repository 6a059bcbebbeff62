"""The README's two commands, which a newcomer types first, work as written."""

import os
import re
import shutil
import signal
import subprocess
import time

import requests

from support import ROOT, free_port, require

README = os.path.join(ROOT, "README.md")


def fenced_after(marker_or_heading):
    text = open(README).read()
    start = text.index(marker_or_heading)
    match = re.search(r"```sh\n(.*?)\n```", text[start:], re.S)
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command():
    command = fenced_after("<!-- test-command")
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "pytest" in command and "requirements-dev.txt" in command
    assert "<!-- test-command" in ci and 'eval "$cmd"' in ci
    assert "HOLDFAST_REQUIRE_SERVICES=1" in ci


def test_the_run_command_serves_the_demo_from_a_fresh_clone(tmp_path):
    require(os.environ.get("HOLDFAST_REQUIRE_SERVICES") == "1" or os.environ.get("HOLDFAST_TEST_README") == "1",
            "slow (clones the repo and builds a fresh venv): set HOLDFAST_TEST_README=1 to run it")
    require(shutil.which("git") is not None, "needs git")
    command = fenced_after("## Run it")
    assert command.endswith("python app.py")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", ROOT, str(clone)], check=True, timeout=60)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOLDFAST_", "VIRTUAL_ENV"))}
    env.update(HOLDFAST_PORT=str(port), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(["bash", "-c", command], cwd=clone, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    output = []
    try:
        deadline = time.time() + 240
        demo_token = None
        while time.time() < deadline:
            line = proc.stdout.readline().decode()
            if not line:
                break
            output.append(line)
            m = re.match(r"\s+demo\s+(hf_\S+)", line)
            if m:
                demo_token = m.group(1)
            if line.startswith("holdfast serving on"):
                break
        assert demo_token, "".join(output[-30:])
        url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {demo_token}"}
        res = requests.post(url + "/api/tasks", headers=headers, timeout=10,
                            json={"provider": "demo", "params": {"prompt": "readme", "duration_s": 0.5}})
        assert res.status_code == 201, res.text
        task_id = res.json()["task"]["id"]
        for _ in range(100):
            task = requests.get(f"{url}/api/tasks/{task_id}", headers=headers, timeout=10).json()["task"]
            if task["status"] == "succeeded":
                break
            time.sleep(0.1)
        assert task["status"] == "succeeded", task
        assert (clone / "data" / "holdfast.db").exists()
        assert requests.get(url + "/", timeout=10).status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        proc.stdout.close()
