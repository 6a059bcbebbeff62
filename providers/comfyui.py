"""ComfyUI: POST /prompt under a prompt_id holdfast chose and stored first;
GET /history/{id}, then GET /queue, to follow it; GET /view for the files.

ComfyUI answers `{}` from /history for a job that is still pending or
running *and* for one it never heard of or forgot in a restart. Only /queue
tells them apart, and a job may move from the queue to the history between
the two looks, so the history is read again before calling a job unknown.

With the `websockets` package, listen() opens ComfyUI's socket
(comfyui_ws.py) for live progress and an early word that a job ended;
every prompt carries this process's client id so that its messages come
to that socket. Without it, or without a working socket, tasks are polled
as before.
"""

import uuid
from urllib.parse import quote, urlencode

from errors import ConfigError, InvalidInput, ProviderRejected, ProviderUnavailable

from .base import Output, Status
from .comfyui_ws import ProgressSocket, websockets_module
from .http import HttpProvider
from .net import parse_json

MAX_MESSAGE = 2000


class ComfyUIProvider(HttpProvider):
    type = "comfyui"
    client_ids = True
    defaults = {**HttpProvider.defaults, "client_id": "holdfast",
                "websocket": True}      # live progress over ComfyUI's socket, when it works

    def __init__(self, name, config=None, env=None):
        super().__init__(name, config, env)
        if not isinstance(self.config["websocket"], bool):
            raise ConfigError(f"provider {name}: websocket must be true or false")
        # ComfyUI sends a prompt's messages to the one socket of its client
        # id, and a second socket with the same id takes them from the
        # first: each process has an id of its own.
        self.client_id = f"{self.config['client_id']}-{uuid.uuid4().hex[:12]}"
        self._socket = None

    def listen(self, on_progress, on_done):
        if not self.websocket or self._socket is not None:
            return False
        websockets = websockets_module()
        if websockets is None:
            return False
        self._socket = ProgressSocket(self.name, self.url, self.client_id, on_progress=on_progress,
                                      on_done=on_done, open_timeout=self.timeout_s,
                                      websockets=websockets).start()
        return True

    def unlisten(self):
        socket, self._socket = self._socket, None
        if socket is not None:
            socket.stop()

    def validate(self, params):
        super().validate(params)
        unknown = set(params) - {"workflow"}
        if unknown:
            raise InvalidInput(f"unknown params for a ComfyUI task: {', '.join(sorted(unknown))}")
        workflow = params.get("workflow")
        if not isinstance(workflow, dict) or not workflow:
            raise InvalidInput("params.workflow must be an API-format ComfyUI workflow "
                               "(an object of nodes, as 'Export (API)' saves it)")
        for node_id, node in workflow.items():
            if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
                raise InvalidInput(f"params.workflow node {node_id!r} has no class_type: "
                                   "is this the API format ('Export (API)')?")

    def new_id(self, task, now):
        return str(uuid.uuid4())

    def submit(self, task, now):
        prompt_id = task["external_id"]
        socket = self._socket
        if socket is not None:
            # Before the POST: ComfyUI may start the job before it answers.
            socket.watch(prompt_id, task["id"], task["params"]["workflow"])
        resp = self.call("POST", "/prompt", what="submit", json={
            "prompt": task["params"]["workflow"], "prompt_id": prompt_id, "client_id": self.client_id})
        if resp.status_code != 200:
            raise ProviderRejected(f"ComfyUI refused the workflow: {self._refusal(resp)}")
        body = self.json_of(resp, "submit")
        # An old ComfyUI ignores prompt_id and picks its own: keep what it says.
        given = body.get("prompt_id") if isinstance(body, dict) else None
        if socket is not None and given and str(given) != prompt_id:
            socket.watch(str(given), task["id"], task["params"]["workflow"])
        return str(given or prompt_id)

    def _refusal(self, resp):
        """ComfyUI's message for a refused prompt, node errors included."""
        try:
            body = parse_json(resp.content, "refusal")
        except ValueError:
            return f"HTTP {resp.status_code}: {resp.text[:500]}"
        if not isinstance(body, dict):
            return f"HTTP {resp.status_code}: {str(body)[:500]}"
        error = body.get("error")
        if isinstance(error, dict):
            parts = [error.get("message") or error.get("type") or "error"]
            if error.get("details"):
                parts[0] += f": {error['details']}"
        else:
            parts = [str(error or f"HTTP {resp.status_code}")]
        node_errors = body.get("node_errors")
        for node_id, entry in (node_errors.items() if isinstance(node_errors, dict) else ()):
            for err in (entry.get("errors") or []) if isinstance(entry, dict) else ():
                if isinstance(err, dict):
                    text = f"node {node_id} ({entry.get('class_type', '?')}): {err.get('message', '')}"
                    if err.get("details"):
                        text += f": {err['details']}"
                    parts.append(text)
        return "; ".join(parts)[:MAX_MESSAGE]

    def poll(self, task, now):
        prompt_id = task["external_id"]
        entry = self._history(prompt_id)
        if entry is None:
            running, pending = self._queue()
            if prompt_id in running:
                # What the socket said last, so a poll does not undo it.
                heard = self._socket.latest(prompt_id) if self._socket is not None else None
                return Status.running(*(heard or ("generating",)))
            if prompt_id in pending:
                ahead = pending.index(prompt_id) + len(running)
                return Status.queued(f"waiting ({ahead} ahead)" if ahead else "waiting")
            entry = self._history(prompt_id)
            if entry is None:
                return Status.unknown()
        if self._socket is not None:
            self._socket.forget(prompt_id)
        return self._status(prompt_id, entry)

    def _history(self, prompt_id):
        resp = self.call("GET", "/history/" + quote(prompt_id, safe=""), what="history")
        if resp.status_code != 200:
            raise ProviderUnavailable(f"{self.name}: history answered HTTP {resp.status_code}")
        body = self.json_of(resp, "history")
        entry = body.get(prompt_id) if isinstance(body, dict) else None
        return entry if isinstance(entry, dict) else None

    def _queue(self):
        """(ids running, ids pending in run order)."""
        resp = self.call("GET", "/queue", what="queue")
        if resp.status_code != 200:
            raise ProviderUnavailable(f"{self.name}: queue answered HTTP {resp.status_code}")
        body = self.json_of(resp, "queue")
        if not isinstance(body, dict):
            raise ProviderUnavailable(f"{self.name}: queue: not an object")

        def ids(items):
            items = [i for i in items or () if isinstance(i, list) and len(i) > 1]
            return [str(i[1]) for i in sorted(items, key=lambda i: i[0] if isinstance(i[0], (int, float)) else 0)]
        return ids(body.get("queue_running")), ids(body.get("queue_pending"))

    def _status(self, prompt_id, entry):
        status = entry.get("status") if isinstance(entry.get("status"), dict) else {}
        for message in reversed(status.get("messages") or []):
            if not (isinstance(message, list) and len(message) == 2 and isinstance(message[1], dict)):
                continue
            kind, data = message
            if kind == "execution_error":
                text = (f"{data.get('node_type', 'a node')} (node {data.get('node_id', '?')}): "
                        f"{data.get('exception_type', 'error')}: {str(data.get('exception_message', '')).strip()}")
                return Status.failed(text[:MAX_MESSAGE])
            if kind == "execution_interrupted":
                return Status.failed(f"interrupted at ComfyUI (node {data.get('node_id', '?')})")
        if status.get("status_str") == "error":
            return Status.failed("ComfyUI reported an error")
        return Status.succeeded(self._outputs(entry.get("outputs")))

    def _outputs(self, outputs):
        """Every file in the history's outputs (images, gifs, audio...);
        only the saved ones when there are any, previews otherwise."""
        found = []
        for node_out in (outputs or {}).values() if isinstance(outputs, dict) else ():
            for items in node_out.values() if isinstance(node_out, dict) else ():
                for item in items if isinstance(items, list) else ():
                    if isinstance(item, dict) and isinstance(item.get("filename"), str):
                        found.append(item)
        saved = [item for item in found if item.get("type", "output") == "output"]
        result = []
        for item in saved or found:
            query = urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                               "type": item.get("type", "output")})
            result.append(Output(item["filename"], url=f"{self.url}/view?{query}"))
        return result

    def cancel(self, task):
        prompt_id = task.get("external_id")
        if not prompt_id:
            return
        if self._socket is not None:
            self._socket.forget(prompt_id)
        self.call("POST", "/queue", what="cancel", json={"delete": [prompt_id]})
        # /interrupt stops whatever runs (older ComfyUI ignores prompt_id):
        # only when the running job is ours.
        running, _ = self._queue()
        if prompt_id in running:
            self.call("POST", "/interrupt", what="cancel", json={"prompt_id": prompt_id})
