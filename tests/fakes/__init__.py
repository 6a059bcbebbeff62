"""Fake provider servers for holdfast's tests.

`comfyui.FakeComfyUI` and `kie.FakeKIE` are real HTTP servers on 127.0.0.1
(stdlib only), so adapters are tested over the wire, timeouts and all. This
module holds the two things they share: a tiny HTTP harness and a PNG encoder.
"""

import json
import select
import socket
import struct
import sys
import threading
import traceback
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


def png_bytes(width, height, rgb=(0, 0, 0), text=None):
    """A valid 8-bit RGB PNG of one flat colour.

    `text` (a dict) becomes tEXt chunks; the fakes put the file name there so
    that two outputs of the same colour still differ byte for byte.
    """

    def chunk(kind, data):
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    row = b"\x00" + bytes(rgb) * width
    out = b"\x89PNG\r\n\x1a\n"
    out += chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    for key, value in (text or {}).items():
        out += chunk(b"tEXt", key.encode("latin-1") + b"\x00" + str(value).encode("latin-1", "replace"))
    out += chunk(b"IDAT", zlib.compress(row * height))
    return out + chunk(b"IEND", b"")


@dataclass
class Request:
    method: str
    path: str
    query: dict          # first value of each query parameter
    headers: dict        # header names lower-cased
    body: bytes
    connection: object = None   # the client's socket, to ask whether it is still there

    def asker_gone(self):
        """Whether the client has closed its end (a killed process's
        sockets are closed by its kernel): it waits for no answer."""
        if self.connection is None:
            return False
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def json(self):
        """The body as JSON; raises ValueError when it is not JSON."""
        return json.loads(self.body or b"null")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""    # or an iterable of bytes, written as it comes (a huge or dripping answer)
    headers: dict = field(default_factory=dict)
    # upgrade(socket, raw request bytes): the connection is handed over (a
    # WebSocket) and closed when this returns; nothing else is sent.
    upgrade: object = None


# A handler's answer that sends nothing and closes the connection: the
# request arrived (and may have had its effect), the answer never will.
DROP = Response(0)


def json_response(obj, status=200, headers=None):
    return Response(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})


class _Handler(BaseHTTPRequestHandler):
    fake = None  # set per server by FakeServer.start()

    def log_message(self, *args):
        pass  # tests stay quiet; the fakes keep their own records

    def _dispatch(self):
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        request = Request(
            method=self.command,
            path=parts.path,
            query={k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()},
            headers={k.lower(): v for k, v in self.headers.items()},
            body=self.rfile.read(length) if length else b"",
            connection=self.connection,
        )
        try:
            response = self.fake.handle(request) or Response(404, b"404: Not Found", {"Content-Type": "text/plain"})
        except Exception:
            # A bug in a fake must be loud, not a hang.
            traceback.print_exc(file=sys.stderr)
            response = Response(500, b"fake server error", {"Content-Type": "text/plain"})
        if response.upgrade is not None:
            self.close_connection = True
            raw = self.requestline + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
            response.upgrade(self.connection, (raw + "\r\n").encode("latin-1"))
            return
        if response is DROP:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        try:
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, str(value))
            streamed = not isinstance(response.body, (bytes, bytearray))
            if not streamed:
                self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            # Streamed: Content-Length only if the fake set one; else the
            # end of the body is the end of the connection (HTTP/1.0).
            for chunk in response.body if streamed else (response.body,):
                self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a test's short timeout): nothing to tell

    do_GET = do_POST = do_PUT = do_DELETE = _dispatch


class FakeServer:
    """Start/stop/context-manager plumbing shared by the fakes.

    Subclasses implement `handle(request) -> Response | None` (None is 404).
    The first start() binds a free port; a later start() after stop() binds
    the same port again, so a test can take a provider away and bring it back
    at the same URL.
    """

    # HTTP/1.0: a connection per request. A fake that sets "HTTP/1.1" keeps
    # connections open, and every answer it streams must have a Content-Length.
    protocol = "HTTP/1.0"

    def __init__(self):
        self._httpd = None
        self._port = 0
        self._stopping = threading.Event()

    @property
    def url(self):
        if not self._port:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self._port}"

    def start(self):
        if self._httpd:
            return self
        self._stopping.clear()
        handler = type("Handler", (_Handler,), {"fake": self, "protocol_version": self.protocol})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self._port), handler)
        self._httpd.daemon_threads = True
        self._port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         name=f"{type(self).__name__}-http", daemon=True).start()
        return self

    def stop(self):
        if not self._httpd:
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def handle(self, request):
        raise NotImplementedError
