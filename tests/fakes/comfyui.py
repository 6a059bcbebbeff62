"""A fake ComfyUI server that answers like the real one.

Every shape here comes from answers recorded from a real ComfyUI 0.3.64,
kept in tests/fixtures/comfyui/ (loaded at import time): validation errors,
queue items, history entries, the `{}` for ids it does not know.
"""

import copy
import json
import os
import random
import socket
import string
import struct
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from . import FakeServer, Response, json_response, png_bytes


def _fixtures_dir():
    default = Path(__file__).resolve().parents[1] / "fixtures"
    root = Path(os.environ.get("HOLDFAST_FIXTURES") or default)
    # HOLDFAST_FIXTURES may name the fixtures root or its comfyui/ directory.
    path = root / "comfyui" if (root / "comfyui").is_dir() else root
    if not (path / "history_ok.json").is_file():
        raise RuntimeError(f"ComfyUI fixtures not found in {path}; set HOLDFAST_FIXTURES")
    return path


FIXTURES_DIR = _fixtures_dir()
FIXTURES = {p.stem: json.loads(p.read_text()) for p in sorted(FIXTURES_DIR.glob("*.json"))}


def fixture(name):
    """A fresh copy of the recorded response body `name` (file stem)."""
    return copy.deepcopy(FIXTURES[name]["body"])


def _only_entry(name):
    return next(iter(fixture(name).values()))


# The node types the fake knows. EmptyImage's spec is ComfyUI's own
# (/object_info/EmptyImage); the two output nodes need only their inputs.
NODE_INPUTS = {
    "EmptyImage": fixture("object_info_EmptyImage")["EmptyImage"]["input"]["required"],
    "SaveImage": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
    "PreviewImage": {"images": ["IMAGE", {}]},
}
OUTPUT_NODES = {"SaveImage", "PreviewImage"}

_BAD_LINK_ERROR = fixture("post_prompt_invalid_bad_link")["node_errors"]["2"]["errors"][0]
_RUNTIME_ERROR = _only_entry("history_runtime_error")["status"]["messages"][-1][1]
_INTERRUPTED = _only_entry("history_interrupted")["status"]["messages"][-1][1]


def _now_ms():
    return int(time.time() * 1000)


def _is_link(value):
    return isinstance(value, list) and len(value) == 2


def _error(kind, message, details="", node_errors=None):
    return {"error": {"type": kind, "message": message, "details": details, "extra_info": {}},
            "node_errors": node_errors or {}}


def _upstream(prompt, node_id, seen=None):
    """`node_id` and every existing node it reads from, depth first."""
    seen = [] if seen is None else seen
    if node_id in seen or node_id not in prompt:
        return seen
    seen.append(node_id)
    for value in (prompt[node_id].get("inputs") or {}).values():
        if _is_link(value):
            _upstream(prompt, str(value[0]), seen)
    return seen


def _input_errors(prompt, node_id):
    node = prompt[node_id]
    inputs = node.get("inputs") or {}
    errors = []
    for name, config in NODE_INPUTS[node["class_type"]].items():
        kind, options = config
        if name not in inputs:
            errors.append({"type": "required_input_missing", "message": "Required input is missing",
                           "details": name, "extra_info": {"input_name": name}})
            continue
        value = inputs[name]
        extra = {"input_name": name, "input_config": config, "received_value": value}
        if _is_link(value):
            if str(value[0]) not in prompt:
                # ComfyUI trips over the dangling link with a KeyError and
                # reports that, and nothing else, for the node.
                error = copy.deepcopy(_BAD_LINK_ERROR)
                error["details"] = repr(str(value[0]))
                return [error]
        elif kind == "IMAGE":
            errors.append({"type": "bad_linked_input",
                           "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                           "details": name, "extra_info": extra})
        elif kind == "INT":
            try:
                number = int(value)
            except (TypeError, ValueError) as exc:
                errors.append({"type": "invalid_input_type",
                               "message": f"Failed to convert an input value to a {kind} value",
                               "details": f"{name}, {value}, {exc}",
                               "extra_info": {**extra, "exception_message": str(exc)}})
                continue
            if "min" in options and number < options["min"]:
                errors.append({"type": "value_smaller_than_min",
                               "message": f"Value {number} smaller than min of {options['min']}",
                               "details": name, "extra_info": extra})
            elif "max" in options and number > options["max"]:
                errors.append({"type": "value_bigger_than_max",
                               "message": f"Value {number} bigger than max of {options['max']}",
                               "details": name, "extra_info": extra})
    return errors


def validate_prompt(prompt):
    """(output node ids, None) if ComfyUI would queue `prompt`, else (None, its 400 body).

    Same order as ComfyUI's validate_prompt: unknown node types first, then
    "no outputs", then the inputs of every node an output depends on.
    """
    if not isinstance(prompt, dict):
        return None, _error("invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                            "Node ID '#'")
    outputs = []
    for node_id, node in prompt.items():
        class_type = node.get("class_type") if isinstance(node, dict) else None
        if class_type is None:
            return None, _error("invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                                f"Node ID '#{node_id}'")
        if class_type not in NODE_INPUTS:
            return None, _error("invalid_prompt", f"Cannot execute because node {class_type} does not exist.",
                                f"Node ID '#{node_id}'")
        if class_type in OUTPUT_NODES:
            outputs.append(node_id)
    if not outputs:
        return None, _error("prompt_no_outputs", "Prompt has no outputs")

    node_errors, details = {}, []
    for out in outputs:
        for node_id in _upstream(prompt, out):
            errors = _input_errors(prompt, node_id)
            if not errors:
                continue
            entry = node_errors.setdefault(node_id, {"errors": errors, "dependent_outputs": [],
                                                     "class_type": prompt[node_id]["class_type"]})
            entry["dependent_outputs"].append(out)
            # Only an output node's own errors reach the top-level details.
            if node_id == out:
                details += [f"{e['message']}: {e['details']}" for e in errors]
    if node_errors:
        return None, _error("prompt_outputs_failed_validation", "Prompt outputs failed validation",
                            "\n".join(details), node_errors)
    return outputs, None


@dataclass
class _Job:
    number: int
    prompt_id: str
    prompt: dict
    extra: dict
    outputs: list
    interrupted: bool = False
    started_ms: int = 0
    steps_sent: int = 0

    def item(self):
        """The job as /queue and /history show it."""
        return [self.number, self.prompt_id, self.prompt, self.extra, self.outputs]


class FakeComfyUI(FakeServer):
    """A ComfyUI server on 127.0.0.1 that runs one job at a time.

    Endpoints: POST /prompt, GET /prompt, GET|POST /queue, POST /interrupt,
    GET /history, GET /history/{id}, POST /history, GET /view,
    GET /system_stats, GET /features, GET /object_info/EmptyImage.

    Known node types: EmptyImage, SaveImage, PreviewImage. A job takes
    `job_seconds`; each image is a real small PNG of the EmptyImage colour.
    A SaveImage `filename_prefix` containing ".." fails at run time, as in
    ComfyUI. Running the same workflow twice in a row reuses the first run's
    outputs ("execution_cached"), as ComfyUI's cache does.

    Test knobs: `job_seconds`, `fail_next` (the next N jobs to finish fail
    with an execution_error), `hold()`/`release()` (a held job starts but does
    not finish), `restart()`, `wait_idle()`, `before_queue` (a callable run
    as a valid POST /prompt arrives, before its job is queued: a test holds
    a submit in flight there), `slow_posts` (the next N valid POST /prompt
    take `slow_seconds` before their job is queued and answered: a client
    with a shorter timeout gives up while the POST is still being handled).
    Records: `submissions` (accepted prompt_ids in order, duplicates kept),
    `runs` (Counter: prompt_id -> times execution started, cached runs
    included), `requests` (Counter by path), `deletes` (prompt_ids named by
    POST /queue {"delete"}, in order), `restarts`, `files`.

    WebSocket `/ws?clientId=` on the same port, as ComfyUI's: `status` to
    every socket; for a prompt submitted with a client id, to that id's
    socket (a new socket with the same id takes over, as in ComfyUI):
    `execution_start`, `execution_cached`, `executing` (the first node),
    `progress_steps` times `progress` {value, max, prompt_id, node} spread
    over the job, each followed by a binary preview frame, `executed`,
    then `execution_success` (or `_error`, `_interrupted`), the history
    entry, and `executing` with node null. Knobs: `websocket` (False: /ws
    answers 404, like a proxy that does not pass WebSockets),
    `ws_kill_after_progress` (after that many progress messages of a job,
    every socket is cut without a close frame and `websocket` turns False),
    `ws_drop` (a set of message types never sent), `ws_end_before_history`
    (seconds: the final `executing` comes that long before the job leaves
    the queue for the history, a poll in between finds it running),
    `kill_sockets()`.
    Records: `ws_connections`, `ws_refused`, `ws_closed_cleanly` (closed
    by the client with a close frame), `ws_sent` (Counter by message
    type, "binary" for preview frames), `finished_at` (prompt_id -> when its
    history entry was written).

    `stop()` then `start()` is an outage: same port, state kept, the running
    job resumes. `restart()` is a ComfyUI restart: queue, history and cache
    are gone, output files stay.
    """

    def __init__(self, job_seconds=0.2, slow_posts=0, slow_seconds=2.0, progress_steps=4, websocket=True):
        super().__init__()
        self.job_seconds = job_seconds
        self.progress_steps = progress_steps
        self.websocket = websocket
        self.ws_kill_after_progress = None
        self.ws_drop = set()  # message types never sent (ComfyUI drops messages)
        self.ws_end_before_history = 0  # seconds between the final executing and the history entry
        self.ws_connections = 0
        self.ws_refused = 0
        self.ws_closed_cleanly = 0  # sockets the client closed with a close frame
        self.ws_sent = Counter()
        self._sockets = {}  # client id -> _Socket
        self.finished_at = {}  # prompt_id -> time.time() its history entry was written
        self.slow_posts = slow_posts
        self.slow_seconds = slow_seconds
        self.fail_next = 0
        self.before_queue = None
        self.submissions = []
        self.deletes = []
        self.runs = Counter()
        self.requests = Counter()
        self.restarts = 0
        self._cv = threading.Condition()
        self._held = False
        self._worker = None
        self._files = {}  # (type, subfolder, filename) -> PNG bytes
        # ComfyUI numbers files from what is on disk, so numbering outlives restarts.
        self._counters = Counter()
        self._reset()

    def _reset(self):
        self._number = 0
        self._pending = []
        self._running = None
        self._history = {}
        self._cache = None  # (workflow key, outputs, meta) of the last successful run

    # -- lifecycle and knobs -------------------------------------------------

    def start(self):
        super().start()
        if not (self._worker and self._worker.is_alive()):
            self._worker = threading.Thread(target=self._work, name="FakeComfyUI-worker", daemon=True)
            self._worker.start()
        return self

    def stop(self):
        super().stop()
        self.kill_sockets()
        with self._cv:
            self._cv.notify_all()
        if self._worker:
            self._worker.join(timeout=5)

    def ws_connections_now(self):
        """How many WebSockets are open now."""
        with self._cv:
            return len(self._sockets)

    def kill_sockets(self):
        """Cut every WebSocket at once, without a close frame (a crash, a
        network cut)."""
        with self._cv:
            sockets = list(self._sockets.values())
            self._sockets.clear()
        for sock in sockets:
            sock.kill()

    def hold(self):
        """Let jobs start but not finish until release()."""
        with self._cv:
            self._held = True

    def release(self):
        with self._cv:
            self._held = False
            self._cv.notify_all()

    def restart(self):
        """Forget queue, running job, history and cache, like a ComfyUI restart.

        Output files survive (they are on disk); temp files do not (ComfyUI
        empties its temp folder on start).
        """
        with self._cv:
            self._reset()
            self._files = {key: data for key, data in self._files.items() if key[0] != "temp"}
            self.restarts += 1
            self._cv.notify_all()

    def wait_idle(self, timeout=5.0):
        """Block until nothing is pending or running; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._pending and self._running is None, timeout)

    @property
    def files(self):
        """{(type, subfolder, filename): bytes} of every image written."""
        with self._cv:
            return dict(self._files)

    # -- HTTP ----------------------------------------------------------------

    def handle(self, req):
        with self._cv:
            self.requests[req.path] += 1
        route = (req.method, req.path)
        if route == ("GET", "/ws"):
            return self._ws(req)
        if route == ("POST", "/prompt"):
            return self._post_prompt(req)
        if route == ("GET", "/prompt"):
            with self._cv:
                remaining = len(self._pending) + (self._running is not None)
            return json_response({"exec_info": {"queue_remaining": remaining}})
        if route == ("GET", "/queue"):
            with self._cv:
                return json_response({
                    "queue_running": [self._running.item()] if self._running else [],
                    "queue_pending": [job.item() for job in sorted(self._pending, key=lambda j: j.number)],
                })
        if route == ("POST", "/queue"):
            return self._post_queue(req)
        if route == ("POST", "/interrupt"):
            return self._interrupt(req)
        if route == ("GET", "/history"):
            with self._cv:
                items = list(self._history.items())
                if req.query.get("max_items", "").isdigit():
                    items = items[-int(req.query["max_items"]):]
                return json_response(dict(items))
        if req.method == "GET" and req.path.startswith("/history/"):
            prompt_id = unquote(req.path[len("/history/"):])
            with self._cv:
                entry = self._history.get(prompt_id)
                return json_response({prompt_id: entry} if entry else {})
        if route == ("POST", "/history"):
            return self._post_history(req)
        if route == ("GET", "/view"):
            return self._view(req)
        if route == ("GET", "/system_stats"):
            return json_response(fixture("system_stats"))
        if route == ("GET", "/features"):
            return json_response(fixture("features"))
        if route == ("GET", "/object_info/EmptyImage"):
            return json_response(fixture("object_info_EmptyImage"))
        return None

    @staticmethod
    def _body(req):
        try:
            data = req.json()
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def _post_prompt(self, req):
        try:
            data = req.json()
        except ValueError:
            # aiohttp's request.json() raises and ComfyUI lets it become a 500.
            return Response(500, b"500 Internal Server Error\n\nServer got itself in trouble",
                            {"Content-Type": "text/plain"})
        if not isinstance(data, dict) or "prompt" not in data:
            return json_response(fixture("post_prompt_invalid_no_prompt"), 400)
        outputs, error = validate_prompt(data["prompt"])
        if error:
            return json_response(error, 400)
        # Exactly ComfyUI's rule: any value, stringified; a repeat id is fine.
        prompt_id = str(data.get("prompt_id", uuid.uuid4()))
        extra = dict(data.get("extra_data") or {})
        if "client_id" in data:
            extra["client_id"] = data["client_id"]
        if self.before_queue is not None:
            self.before_queue(prompt_id)
        with self._cv:
            slow = self.slow_posts > 0
            self.slow_posts -= slow
        if slow:
            self._stopping.wait(self.slow_seconds)
        with self._cv:
            number = self._number
            self._number += 1
            if data.get("front"):
                number = -number
            self._pending.append(_Job(number, prompt_id, data["prompt"], extra, outputs))
            self.submissions.append(prompt_id)
            self._cv.notify_all()
        return json_response({"prompt_id": prompt_id, "number": number, "node_errors": {}})

    def _post_queue(self, req):
        data = self._body(req) or {}
        with self._cv:
            if data.get("clear"):
                self._pending.clear()
            # Like ComfyUI, delete touches only pending jobs, never the running one.
            doomed = set(map(str, data.get("delete") or []))
            self.deletes += sorted(doomed)
            self._pending = [job for job in self._pending if job.prompt_id not in doomed]
            self._cv.notify_all()
        return Response(200)

    def _interrupt(self, req):
        target = (self._body(req) or {}).get("prompt_id")
        with self._cv:
            job = self._running
            if job and (target is None or target == job.prompt_id):
                job.interrupted = True
                self._cv.notify_all()
        return Response(200)

    def _post_history(self, req):
        data = self._body(req) or {}
        with self._cv:
            if data.get("clear"):
                self._history.clear()
            for prompt_id in data.get("delete") or []:
                self._history.pop(str(prompt_id), None)
        return Response(200)

    def _view(self, req):
        filename = req.query.get("filename", "")
        if filename.startswith("/") or ".." in filename:
            return Response(400)
        key = (req.query.get("type") or "output", req.query.get("subfolder", ""), filename)
        with self._cv:
            data = self._files.get(key)
        if data is None:
            return Response(404)
        return Response(200, data, {"Content-Type": "image/png",
                                    "Content-Disposition": f'filename="{filename}"'})

    # -- WebSocket -------------------------------------------------------------

    def _ws(self, req):
        with self._cv:
            if not self.websocket or req.headers.get("upgrade", "").lower() != "websocket":
                self.ws_refused += 1
                return None
        client_id = req.query.get("clientId") or uuid.uuid4().hex
        return Response(101, upgrade=lambda sock, raw: self._serve_socket(sock, raw, client_id))

    def _serve_socket(self, sock, raw, client_id):
        conn = _Socket(sock, raw)
        if not conn.open:
            return
        with self._cv:
            old = self._sockets.pop(client_id, None)
            self._sockets[client_id] = conn
            self.ws_connections += 1
            self._send(client_id, "status", {"status": self._queue_info(), "sid": client_id})
        if old is not None:
            old.kill()
        conn.serve(self._stopping)
        with self._cv:
            if self._sockets.get(client_id) is conn:
                del self._sockets[client_id]
            self.ws_closed_cleanly += conn.protocol.close_rcvd is not None

    def _queue_info(self):
        return {"exec_info": {"queue_remaining": len(self._pending) + (self._running is not None)}}

    def _send(self, client_id, kind, data):
        """One JSON message to `client_id`'s socket (None: to every socket).
        Called with self._cv held."""
        if kind in self.ws_drop:
            return
        targets = list(self._sockets.values()) if client_id is None else [self._sockets.get(client_id)]
        for conn in targets:
            if conn is not None and conn.send(json.dumps({"type": kind, "data": data})):
                self.ws_sent[kind] += 1

    def _send_preview(self, client_id):
        conn = self._sockets.get(client_id)
        # ComfyUI's PREVIEW_IMAGE frame: event 1, image type 1 (JPEG), the image.
        if conn is not None and conn.send(struct.pack(">II", 1, 1) + b"\xff\xd8\xff\xe0fake preview"):
            self.ws_sent["binary"] += 1

    def _job_started(self, job):
        client_id = job.extra.get("client_id")
        self._send(None, "status", {"status": self._queue_info()})
        if client_id is None:
            return
        pid = job.prompt_id
        self._send(client_id, "execution_start", {"prompt_id": pid, "timestamp": job.started_ms})
        self._send(client_id, "execution_cached", {"nodes": [], "prompt_id": pid, "timestamp": job.started_ms})
        node = self._progress_node(job)
        self._send(client_id, "executing", {"node": node, "display_node": node, "prompt_id": pid})

    @staticmethod
    def _progress_node(job):
        """The node whose progress bar moves: the first that is not an output."""
        return next((n for n in job.prompt if n not in job.outputs), job.outputs[0])

    def _progress(self, job, done_steps):
        """Send the progress messages of steps up to `done_steps`."""
        client_id = job.extra.get("client_id")
        while job.steps_sent < done_steps:
            job.steps_sent += 1
            if client_id is None:
                continue
            self._send(client_id, "progress", {"value": job.steps_sent, "max": self.progress_steps,
                                               "prompt_id": job.prompt_id, "node": self._progress_node(job)})
            self._send_preview(client_id)
            if self.ws_kill_after_progress is not None and job.steps_sent >= self.ws_kill_after_progress:
                self.websocket = False
                sockets = list(self._sockets.values())
                self._sockets.clear()
                for conn in sockets:
                    conn.kill()

    def _job_ended(self, job, entry):
        """The end as ComfyUI tells it: executed and execution_success (or an
        error) before the history entry is written, executing null after."""
        client_id = job.extra.get("client_id")
        early = client_id is not None and self.ws_end_before_history
        if early:
            self._send(client_id, "executing", {"node": None, "prompt_id": job.prompt_id})
            # The lock is let go meanwhile: /queue shows the job running, /history knows nothing.
            until = time.monotonic() + self.ws_end_before_history
            while (left := until - time.monotonic()) > 0 and not self._stopping.is_set():
                self._cv.wait(left)
        if client_id is not None:
            for node_id, output in entry["outputs"].items():
                self._send(client_id, "executed", {"node": node_id, "display_node": node_id, "output": output,
                                                   "prompt_id": job.prompt_id})
            kind, data = entry["status"]["messages"][-1]
            self._send(client_id, kind, data)
        self._history[job.prompt_id] = entry
        self.finished_at[job.prompt_id] = time.time()
        self._running = None
        self._send(None, "status", {"status": self._queue_info()})
        if client_id is not None and not early:
            self._send(client_id, "executing", {"node": None, "prompt_id": job.prompt_id})

    # -- execution -----------------------------------------------------------

    def _work(self):
        with self._cv:
            while not self._stopping.is_set():
                job = self._running
                if job is None:
                    if not self._pending:
                        self._cv.wait()
                        continue
                    job = min(self._pending, key=lambda j: j.number)
                    self._pending.remove(job)
                    self._running = job
                    job.started_ms = _now_ms()
                    self.runs[job.prompt_id] += 1
                    self._job_started(job)
                began = time.monotonic()
                deadline = began + self.job_seconds
                step_s = self.job_seconds / max(1, self.progress_steps)
                while not self._stopping.is_set() and self._running is job and not job.interrupted:
                    now = time.monotonic()
                    if self.progress_steps:
                        self._progress(job, min(self.progress_steps, int((now - began) / step_s)))
                    remaining = deadline - now
                    if remaining <= 0 and not self._held:
                        break
                    if remaining > 0 and self.progress_steps:
                        remaining = min(remaining, step_s)
                    self._cv.wait(remaining if remaining > 0 else None)
                if self._stopping.is_set() or self._running is not job:
                    continue  # stopped (the job resumes on start()) or lost to restart()
                self._job_ended(job, self._run(job))
                self._cv.notify_all()

    def _run(self, job):
        """The history entry for `job`, writing its files on success."""
        pid, prompt = job.prompt_id, job.prompt
        messages = [["execution_start", {"prompt_id": pid, "timestamp": job.started_ms}]]
        key = json.dumps(prompt, sort_keys=True)
        cached = self._cache is not None and self._cache[0] == key
        messages.append(["execution_cached", {"nodes": list(prompt) if cached else [], "prompt_id": pid,
                                              "timestamp": job.started_ms}])

        escaping = [n for n in job.outputs if ".." in str(prompt[n]["inputs"].get("filename_prefix", ""))]
        failed_node = escaping[0] if escaping else None
        if failed_node is None and self.fail_next > 0 and not job.interrupted:
            self.fail_next -= 1
            failed_node = job.outputs[0]

        if job.interrupted or failed_node:
            node_id = job.outputs[0] if job.interrupted else failed_node
            event = copy.deepcopy(_INTERRUPTED if job.interrupted else _RUNTIME_ERROR)
            event.update(prompt_id=pid, node_id=node_id, node_type=prompt[node_id]["class_type"],
                         executed=_upstream(prompt, node_id)[1:], timestamp=_now_ms())
            if not job.interrupted:
                inputs = prompt[node_id]["inputs"]
                event["current_inputs"] = {name: ["tensor(...)" if _is_link(value) else value]
                                           for name, value in inputs.items()}
                event["current_inputs"].update(prompt=[str(prompt)], extra_pnginfo=[None])
                event["current_outputs"] = _upstream(prompt, node_id)
                if not escaping:
                    event.update(exception_message="fake failure (FakeComfyUI.fail_next)",
                                 exception_type="RuntimeError")
            messages.append(["execution_interrupted" if job.interrupted else "execution_error", event])
            self._cache = None
            return {"prompt": job.item(), "outputs": {},
                    "status": {"status_str": "error", "completed": False, "messages": messages}, "meta": {}}

        if cached:
            outputs, meta = copy.deepcopy(self._cache[1:])
        else:
            outputs, meta = self._save_outputs(job)
            self._cache = (key, copy.deepcopy(outputs), copy.deepcopy(meta))
        messages.append(["execution_success", {"prompt_id": pid, "timestamp": _now_ms()}])
        return {"prompt": job.item(), "outputs": outputs,
                "status": {"status_str": "success", "completed": True, "messages": messages}, "meta": meta}

    def _save_outputs(self, job):
        outputs, meta = {}, {}
        for node_id in job.outputs:
            node = job.prompt[node_id]
            source = job.prompt.get(str(node["inputs"]["images"][0]), {})
            params = source.get("inputs", {}) if source.get("class_type") == "EmptyImage" else {}
            # Small pictures keep the fake fast; the colour is the workflow's.
            width, height = (min(int(params.get(k, 64)), 64) for k in ("width", "height"))
            count = min(int(params.get("batch_size", 1)), 16)
            color = int(params.get("color", 0))
            rgb = ((color >> 16) & 255, (color >> 8) & 255, color & 255)
            if node["class_type"] == "SaveImage":
                kind = "output"
                subfolder, _, prefix = str(node["inputs"]["filename_prefix"]).rpartition("/")
            else:
                kind, subfolder = "temp", ""
                prefix = "ComfyUI_temp_" + "".join(random.choices(string.ascii_lowercase, k=5))
            images = []
            for _ in range(count):
                self._counters[(kind, subfolder, prefix)] += 1
                filename = f"{prefix}_{self._counters[(kind, subfolder, prefix)]:05}_.png"
                self._files[(kind, subfolder, filename)] = png_bytes(
                    width, height, rgb, {"prompt": json.dumps(job.prompt), "filename": filename})
                images.append({"filename": filename, "subfolder": subfolder, "type": kind})
            outputs[node_id] = {"images": images}
            meta[node_id] = {"node_id": node_id, "display_node": node_id, "parent_node": None,
                             "real_node_id": node_id}
        return outputs, meta


class _Socket:
    """The server side of one WebSocket, on the `websockets` package's
    sans-I/O protocol (so framing, pings and the close handshake are a
    real implementation's): the fake's threads send, serve() reads."""

    def __init__(self, sock, raw_request):
        from websockets.server import ServerProtocol
        self.sock = sock
        self.lock = threading.Lock()
        self.protocol = ServerProtocol(max_size=1 << 20)
        self.protocol.receive_data(raw_request)
        request = self.protocol.events_received()[0]
        response = self.protocol.accept(request)
        self.protocol.send_response(response)
        self.open = response.status_code == 101
        sock.settimeout(5.0)
        with self.lock:
            self._flush()

    def _flush(self):
        for data in self.protocol.data_to_send():
            if data:
                self.sock.sendall(data)

    def send(self, message):
        """Send text (str) or a binary frame (bytes); False once closed."""
        with self.lock:
            if not self.open:
                return False
            try:
                if isinstance(message, str):
                    self.protocol.send_text(message.encode())
                else:
                    self.protocol.send_binary(message)
                self._flush()
            except Exception:
                self.open = False
                return False
            return True

    def kill(self):
        with self.lock:
            self.open = False
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def serve(self, stopping):
        """Read (answering pings, the close handshake) until the end."""
        while self.open and not stopping.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            with self.lock:
                if data:
                    self.protocol.receive_data(data)
                else:
                    self.protocol.receive_eof()
                self.protocol.events_received()
                try:
                    self._flush()
                except OSError:
                    break
                if not data or self.protocol.close_expected():
                    break
        with self.lock:
            self.open = False
