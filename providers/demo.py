"""The built-in demo provider: no network, a small real PNG."""

import hashlib
import math
import re
import secrets
import struct
import zlib

from errors import InvalidInput

from .base import BaseProvider, Output, Status

_DEMO_ID = re.compile(r"^demo-(\d+)-[0-9a-f]+$")
_DEMO_STEPS = ("sketching", "painting", "varnishing")


class DemoProvider(BaseProvider):
    """Built in, no network: a small real PNG from params.prompt over
    `duration_s` seconds, with steps and progress. The job's start time is in
    its id, so the demo keeps no state and survives restarts like a real
    provider would."""

    type = "demo"
    client_ids = True
    defaults = {**BaseProvider.defaults, "poll_interval_s": 0.5, "max_poll_interval_s": 2.0,
                "duration_s": 3.0, "max_wait_s": 600.0}

    def __init__(self, name, config=None, env=None):
        super().__init__(name, config, env)
        self._number("duration_s")

    def validate(self, params):
        super().validate(params)
        prompt = params.get("prompt", "")
        if not isinstance(prompt, str) or len(prompt) > 2000:
            raise InvalidInput("params.prompt must be a string of at most 2000 characters")
        duration = params.get("duration_s")
        if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float))
                                     or not 0 <= duration <= 600):
            raise InvalidInput("params.duration_s must be a number from 0 to 600")
        if "fail" in params and not isinstance(params["fail"], (bool, str)):
            raise InvalidInput("params.fail must be true/false or a message")

    def new_id(self, task, now):
        return f"demo-{int(now * 1000)}-{secrets.token_hex(4)}"

    def submit(self, task, now):
        return task["external_id"]

    def poll(self, task, now):
        match = _DEMO_ID.match(task["external_id"] or "")
        if match is None:
            return Status.unknown()
        params = task["params"]
        duration = params.get("duration_s", self.duration_s)
        elapsed = now - int(match.group(1)) / 1000
        progress = 1.0 if duration <= 0 else min(1.0, max(0.0, elapsed / duration))
        if params.get("fail") and progress >= 0.5:
            message = params["fail"] if isinstance(params["fail"], str) else "the demo failed on request"
            return Status.failed(message)
        if progress >= 1.0:
            png = demo_png(params.get("prompt", ""))
            return Status.succeeded([Output("out_0.png", data=png, content_type="image/png")])
        step = _DEMO_STEPS[min(int(progress * len(_DEMO_STEPS)), len(_DEMO_STEPS) - 1)]
        return Status.running(step, round(progress, 3))


def demo_png(prompt, size=64):
    """A small, real PNG whose colours and waves come from the prompt."""
    digest = hashlib.sha256(prompt.encode()).digest()
    base = digest[:3]
    accent = digest[3:6]
    freq = 1 + digest[6] % 5
    rows = []
    for y in range(size):
        row = bytearray()
        for x in range(size):
            wave = math.sin((x + digest[7]) / size * freq * math.pi) * size / 4 + size / 2
            c = accent if abs(y - wave) < 3 else base
            shade = 0.6 + 0.4 * y / size
            row += bytes(int(v * shade) for v in c)
        rows.append(bytes(row))
    return encode_png(size, size, rows)


def encode_png(width, height, rows):
    """RGB rows -> PNG bytes, with zlib only."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    raw = b"".join(b"\x00" + r for r in rows)
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
