"""Provider adapters and their registry.

Each adapter turns its provider's answers into one small common `Status`:
queued, running(step, progress), succeeded(outputs), failed(code, message) or
unknown. Adapters hold no task state of their own between calls: what they need
to remember goes into the task (`external_id`, `state`), so a restart loses
nothing.
"""

import hashlib
import math
import re
import secrets
import struct
import zlib
from dataclasses import dataclass, field

from errors import ConfigError, InvalidInput


@dataclass(frozen=True)
class Output:
    """One result file: either bytes in hand or a URL to download."""

    name: str
    url: str = None
    data: bytes = None
    content_type: str = None
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Status:
    state: str                 # queued, running, succeeded, failed, unknown
    step: str = None
    progress: float = None
    outputs: tuple = ()
    code: str = None           # for failed: an error code from store.ERROR_CODES
    message: str = None
    missing: int = 0           # for succeeded: outputs the provider lost (partial)

    @classmethod
    def queued(cls, step="queued"):
        return cls("queued", step=step)

    @classmethod
    def running(cls, step=None, progress=None):
        return cls("running", step=step, progress=progress)

    @classmethod
    def succeeded(cls, outputs, missing=0):
        return cls("succeeded", step="done", progress=1.0, outputs=tuple(outputs), missing=missing)

    @classmethod
    def failed(cls, message, code="provider_rejected"):
        return cls("failed", code=code, message=message)

    @classmethod
    def unknown(cls):
        return cls("unknown")


class Retry:
    """A retry policy as a value: `max_attempts` tries in all, waiting
    `intervals[i]` seconds before try i+2; the last interval repeats."""

    def __init__(self, max_attempts, intervals=(1, 2, 4, 8, 16, 30)):
        if max_attempts < 1 or not intervals or min(intervals) < 0:
            raise ConfigError("retry needs max_attempts >= 1 and non-negative intervals")
        self.max_attempts = int(max_attempts)
        self.intervals = tuple(float(i) for i in intervals)

    def delay(self, attempt):
        """Seconds to wait after failed try number `attempt` (1-based)."""
        return self.intervals[min(attempt, len(self.intervals)) - 1]

    def exhausted(self, attempt):
        return attempt >= self.max_attempts


class BaseProvider:
    """What every adapter does. `task` arguments are store task dicts."""

    type = None
    # The provider accepts an id chosen by holdfast before submitting (ComfyUI's
    # prompt_id), so a crash between submit and recording it cannot run a job twice.
    client_ids = False

    defaults = {
        "concurrency": None, "cost": 0, "poll_interval_s": 2.0, "max_poll_interval_s": 30.0,
        "max_wait_s": 7200.0, "timeout_s": 10.0, "rate_per_s": None, "retries": 3,
        "max_file_bytes": 100 * 1024 * 1024,
    }

    def __init__(self, name, config=None):
        config = dict(config or {})
        config.pop("type", None)
        self.name = name
        self.config = {**self.defaults, **config}
        for key in ("poll_interval_s", "max_poll_interval_s", "max_wait_s", "timeout_s"):
            value = self.config[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"provider {name}: {key} must be a positive number")
        for key in ("concurrency", "cost", "retries", "max_file_bytes"):
            value = self.config[key]
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ConfigError(f"provider {name}: {key} must be a non-negative integer")
        self.health = {"ok": None, "checked_at": None, "error": None}

    def __getattr__(self, key):
        try:
            return self.__dict__["config"][key]
        except KeyError:
            raise AttributeError(key) from None

    def validate(self, params):
        """Raise InvalidInput for params this provider can never accept."""
        if not isinstance(params, dict):
            raise InvalidInput("params must be an object")

    def new_id(self, task, now):
        """The id holdfast will submit under, stored before submit; None when
        the provider assigns its own."""
        return None

    def submit(self, task, now):
        """Start the job; return the provider's id for it. ProviderUnavailable
        (retry later) or ProviderRejected (permanent)."""
        raise NotImplementedError

    def poll(self, task, now):
        """Ask about `task["external_id"]`; return a Status."""
        raise NotImplementedError

    def cancel(self, task):
        """Best effort: stop the job at the provider."""

    def fetch(self, task, output):
        """Yield the bytes of one Output. ResultExpired when the link is dead."""
        if output.data is not None:
            yield output.data
            return
        raise NotImplementedError

    def describe(self):
        keys = ("concurrency", "cost", "poll_interval_s", "max_wait_s", "timeout_s", "rate_per_s")
        return {"name": self.name, "type": self.type,
                "limits": {k: self.config[k] for k in keys}, "health": dict(self.health)}

    def close(self):
        """Release connections."""


# -- demo --------------------------------------------------------------------

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


# -- registry ----------------------------------------------------------------

PROVIDER_TYPES = {"demo": DemoProvider}


def build_providers(table):
    """{name: provider} from holdfast.toml's [providers] table. `demo` is
    always there; a configured `demo` entry tunes it."""
    table = dict(table or {})
    providers = {}
    for name, conf in table.items():
        if not re.match(r"^[A-Za-z0-9_-]{1,40}$", name):
            raise ConfigError(f"provider name {name!r}: use letters, digits, '_' or '-'")
        if not isinstance(conf, dict):
            raise ConfigError(f"[providers.{name}] must be a table")
        kind = conf.get("type", "demo" if name == "demo" else None)
        cls = PROVIDER_TYPES.get(kind)
        if cls is None:
            raise ConfigError(f"provider {name}: unknown type {kind!r}; "
                              f"known: {', '.join(sorted(PROVIDER_TYPES))}")
        providers[name] = cls(name, conf)
    providers.setdefault("demo", DemoProvider("demo"))
    return providers
