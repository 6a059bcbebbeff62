"""Configuration and wiring: `Config` (holdfast.toml and HOLDFAST_* variables),
the logging set-up, and opening the store, the providers and the file store.

`python app.py` and `python recover.py` both start here, so neither imports
the other.
"""

import atexit
import collections
import json
import logging
import os
import threading
import tempfile
import tomllib
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit

import cpu
from errors import ConfigError


# -- configuration -------------------------------------------------------------

@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    data: str = "./data"
    store: str = "sqlite"
    threads: int = 8
    admin_token: str = None
    max_body: int = 1024 * 1024
    sse_max_s: float = 60.0
    sse_max_streams: int = 200     # open event streams and long polls, on top of `threads`
    sse_max_per_user: int = 20     # of those, how many one user may hold
    sse_keepalive_s: float = 10.0
    session_ttl_s: float = 7200.0
    keep_files_h: float = 72.0
    keep_tasks_d: float = 30.0
    log: str = "text"
    worker_threads: int = 4
    cpu: str = "auto"              # the server's threads on one CPU (auto: the one it starts on), a number, or all
    max_active: int = 100          # per user, unless the user row says otherwise
    lease_s: float = 60.0          # how long a worker holds a task before others may take it
    rate_per_s: float = 10.0       # submissions per second per user, unless the user row says otherwise
    rate_burst_s: float = 3.0      # a user's bucket holds rate_per_s * rate_burst_s submissions (>= 1)
    max_sessions: int = 100        # live conversation sessions per user
    max_connections: int = 1000    # open HTTP connections in all (waitress's connection_limit)
    max_connections_per_address: int = 256   # of those, from one client address
    request_timeout_s: float = 20.0   # to send a request's headers and body
    public_url: str = None         # how providers reach this server: set, KIE submits carry a callBackUrl
    cors_origins: str = None       # other origins whose pages may call /api/ (comma-separated, or *): api/cors.py
    files: str = "local"           # or s3://bucket/prefix (store/objects.py)
    s3_endpoint: str = None        # e.g. http://127.0.0.1:9000 for MinIO; AWS S3 when unset
    s3_addressing: str = "auto"    # path, virtual, or auto (boto3 picks)
    s3_presign: int = 1            # 1: downloads redirect to a presigned link; 0: holdfast streams them
    s3_presign_s: float = 300.0    # how long such a link works
    webhook_allow_private: str = "0"  # 1: webhooks may reach loopback, private and link-local addresses
    webhook_timeout_s: float = 15.0   # one delivery attempt in all (at most 15)
    webhook_retry_scale: float = 1.0  # multiplies the retry schedule (tests shorten it)
    webhook_threads: int = 8          # deliveries in flight per process
    webhook_per_endpoint: int = 2     # of those, to one receiver (scheme, host, port)
    webhook_secret_overlap_s: float = 86400.0   # a rotated secret keeps signing this long
    # The operator console's colours (and docs/alerts.yml's rules): a
    # provider's success rate below these warns / alerts, and so does a poll
    # later than these.
    success_rate_warn: float = 0.90
    success_rate_alert: float = 0.85
    poll_delay_warn_s: float = 120.0
    poll_delay_alert_s: float = 300.0
    providers: dict = field(default_factory=dict)

    SECRET = ("admin_token",)

    @classmethod
    def load(cls, env=None, path=None):
        """holdfast.toml's [server] table, then HOLDFAST_* variables over it.
        Secrets come from the environment only."""
        env = os.environ if env is None else env
        path = path or env.get("HOLDFAST_CONFIG", "holdfast.toml")
        table = {}
        if os.path.exists(path):
            try:
                with open(path, "rb") as fh:
                    table = tomllib.load(fh)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"{path}: {exc}") from exc
        elif "HOLDFAST_CONFIG" in env:
            raise ConfigError(f"HOLDFAST_CONFIG names {path}, which does not exist")
        config = cls(providers=table.get("providers", {}))
        server = table.get("server", {})
        if not isinstance(server, dict):
            raise ConfigError(f"{path}: [server] must be a table")
        known = [f.name for f in fields(cls) if f.name != "providers"]
        for key in server:
            if key not in known:
                raise ConfigError(f"{path}: [server] has an unknown setting {key!r}; known: {', '.join(known)}")
        for f in fields(cls):
            if f.name == "providers":
                continue
            if f.name in server:
                if f.name in cls.SECRET:
                    raise ConfigError(f"{f.name} is a secret: set HOLDFAST_{f.name.upper()} instead")
                config._set(f, server[f.name], f"[server] {f.name}")
            var = "HOLDFAST_" + f.name.upper()
            if env.get(var) not in (None, ""):
                config._set(f, env[var], var)
        if not 1 <= config.port <= 65535:
            raise ConfigError(f"HOLDFAST_PORT must be from 1 to 65535, not {config.port}")
        config.cpu = cpu.check(config.cpu)
        if config.log not in ("text", "json"):
            raise ConfigError("HOLDFAST_LOG must be text or json")
        if config.public_url is not None:
            config.public_url = _public_url(config.public_url)
        if config.cors_origins is not None:
            config.cors_origins = _origins(config.cors_origins)
        from store.objects import parse_files_url
        parse_files_url(config.files)
        if config.s3_addressing not in ("auto", "path", "virtual"):
            raise ConfigError("HOLDFAST_S3_ADDRESSING must be auto, path or virtual")
        if config.s3_presign not in (0, 1):
            raise ConfigError("HOLDFAST_S3_PRESIGN must be 0 or 1")
        if not config.success_rate_alert <= config.success_rate_warn <= 1:
            raise ConfigError("HOLDFAST_SUCCESS_RATE_ALERT must be at most HOLDFAST_SUCCESS_RATE_WARN, "
                              "and that at most 1")
        if config.poll_delay_alert_s < config.poll_delay_warn_s:
            raise ConfigError("HOLDFAST_POLL_DELAY_ALERT_S must be at least HOLDFAST_POLL_DELAY_WARN_S")
        return config

    def _set(self, f, value, where):
        kind = type(getattr(self, f.name)) if getattr(self, f.name) is not None else str
        try:
            if kind is int:
                value = int(value)
            elif kind is float:
                value = float(value)
            else:
                value = str(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {value!r} is not a valid {kind.__name__}") from None
        if kind in (int, float) and value <= 0 and f.name not in ("port", "s3_presign"):
            raise ConfigError(f"{where} must be positive")
        setattr(self, f.name, value)

    @classmethod
    def variables(cls):
        """[(name, default)] of every HOLDFAST_* variable, for `--help`:
        one per field, and the few read elsewhere (EXTRA_VARIABLES)."""
        out = [(f"HOLDFAST_{f.name.upper()}", f.default) for f in fields(cls) if f.name != "providers"]
        return out + list(EXTRA_VARIABLES.items())

    @property
    def webhooks_private_ok(self):
        return self.webhook_allow_private.strip().lower() in ("1", "true", "yes")

    def thresholds(self):
        """The console's warning and alert levels."""
        return {"success_rate": {"warn": self.success_rate_warn, "alert": self.success_rate_alert},
                "poll_delay_s": {"warn": self.poll_delay_warn_s, "alert": self.poll_delay_alert_s}}

    def webhook_settings(self):
        """The Deliverer's settings (worker/deliver.py)."""
        return {"threads": self.webhook_threads, "per_target": self.webhook_per_endpoint,
                "timeout_s": self.webhook_timeout_s, "retry_scale": self.webhook_retry_scale,
                "allow_private": self.webhooks_private_ok}


# Variables that are not fields of Config: where the file is, and one the
# provider adapters read (providers/http.py).
EXTRA_VARIABLES = {"HOLDFAST_CONFIG": "holdfast.toml", "HOLDFAST_ALLOW_PRIVATE_RESULTS": "0"}


def _public_url(value):
    """HOLDFAST_PUBLIC_URL without its trailing slash: an http(s) URL with a
    host and nothing after the path, since callback paths are appended."""
    try:
        parts = urlsplit(value)
        parts.port       # raises for a port that is not a number
    except ValueError:
        parts = None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query
            or parts.fragment or any(c.isspace() for c in value)):
        raise ConfigError(f"HOLDFAST_PUBLIC_URL must be an http(s) URL like https://holdfast.example.com, "
                          f"not {value[:200]!r}")
    return value.rstrip("/")


def _origins(value):
    """HOLDFAST_CORS_ORIGINS as the browser writes an Origin header
    (scheme://host[:port], lower case, no slash), comma-separated; or *."""
    out = []
    for item in (part.strip() for part in value.split(",")):
        if item == "*":
            out.append(item)
            continue
        try:
            parts = urlsplit(item)
            port = parts.port
        except ValueError:
            parts = None
        if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
                or parts.path not in ("", "/") or parts.query or parts.fragment or parts.username
                or any(c.isspace() for c in item)):
            raise ConfigError(f"HOLDFAST_CORS_ORIGINS must list origins like https://app.example.com "
                              f"(or be *), not {item[:200]!r}")
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        out.append(f"{parts.scheme}://{host}" + (f":{port}" if port is not None else ""))
    return ",".join(dict.fromkeys(out))


# -- wiring --------------------------------------------------------------------

# How long the logging thread waits, once an INFO line came, for more to
# write with it: one wake-up and one write for all the lines of that time.
# A warning or an error is written at once. A kill -9 loses at most this
# much of INFO lines (and what a line written just then could not save).
LOG_BATCH_S = 0.02


class _Handoff(logging.Handler):
    """The root handler: a record is left for the logging thread, which
    formats and writes it. A task's state change is logged from the thread
    that made it, request or worker, and each of those waited on the stream
    handler's lock for a write to stderr, which all of them share. INFO
    lines are written in batches, so that a busy server wakes that thread
    and writes to stderr once per LOG_BATCH_S, not once per line (a wake-up
    a line cost about as much as making and writing the line)."""

    def __init__(self, out):
        super().__init__()
        self.out = out                  # the StreamHandler: its formatter, its stream
        self._records = collections.deque()
        self._wake = threading.Event()
        self._hurry = threading.Event()     # a warning or an error waits: no batch
        self._stopping = threading.Event()
        self._writing = threading.Lock()    # lines leave in the order they came
        self._thread = threading.Thread(target=self._run, name="holdfast-log", daemon=True)
        self._thread.start()

    def emit(self, record):
        # The text as it is now; the exception, if any, stays for the formatter.
        try:
            record.msg, record.args = record.getMessage(), None
        except Exception:
            self.handleError(record)
            return
        self._records.append(record)
        if record.levelno >= logging.WARNING:
            self._hurry.set()
        if not self._wake.is_set():        # set is dearer than a look, and once is enough
            self._wake.set()

    def _run(self):
        while True:
            self._wake.wait()
            self._hurry.wait(LOG_BATCH_S)
            stopping = self._stopping.is_set()
            # Cleared before the records are taken: one that comes after
            # wakes the thread again.
            self._wake.clear()
            self._hurry.clear()
            self.flush()
            if stopping:
                return

    def flush(self):
        """Write what is waiting, now, in this thread."""
        out = self.out
        with self._writing:
            lines, record = [], None
            while self._records:
                record = self._records.popleft()
                try:
                    lines.append(out.format(record) + out.terminator)
                except Exception:
                    out.handleError(record)
            if lines:
                with out.lock:
                    try:
                        out.stream.write("".join(lines))
                        out.flush()
                    except Exception:
                        out.handleError(record)

    def stop(self):
        """Write what is left, and end the thread."""
        self._stopping.set()
        self._hurry.set()
        self._wake.set()
        self._thread.join()
        self.flush()        # what came after the thread's last look


_listener = None


def setup_logging(kind):
    """Log to stderr as text or JSON lines, written by a thread of their own."""
    global _listener
    stop_logging()
    handler = logging.StreamHandler()
    if kind == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _listener = _Handoff(handler)
    root = logging.getLogger()
    root.handlers[:] = [_listener]
    root.setLevel(logging.INFO)
    # Neither format writes the process, thread or task names, nor the file
    # and line a record came from; each record would otherwise look them up
    # as it is made (a getpid call, a walk up the stack). logging's own
    # documentation names these switches for this.
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    logging._srcfile = None
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def log_output():
    """The handler that writes log lines (for tests), or None."""
    return _listener.out if _listener is not None else None


def flush_logs():
    """Write the lines logged so far before going on: before a line of
    one's own on stderr (a start-up error), so it comes after them."""
    if _listener is not None:
        _listener.flush()


def stop_logging():
    """Write what is queued, and end the writing thread: before os._exit,
    which skips atexit."""
    global _listener
    listener, _listener = _listener, None
    if listener is not None:
        listener.stop()


atexit.register(stop_logging)


class _JsonFormatter(logging.Formatter):
    def format(self, record):
        out = {"ts": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        out.update(getattr(record, "fields", None) or {})   # e.g. a task state change's task_id, user_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def open_everything(config):
    """(store, providers, files) as config says."""
    from providers import build_providers
    from store import open_files, open_store
    check_data_dir(config.data)
    files = open_files(config)      # first: a bucket set up wrong stops us before any migration
    store = open_store(config.store, config.data)
    providers = build_providers(config.providers)
    return store, providers, files


def check_data_dir(path):
    """Make the data directory if it is missing, and make sure this process
    can write in it: ConfigError naming the path and the cause otherwise
    (a file in the way, a read-only file system, no permission), before any
    store or file is opened."""
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"data directory {path} is a file, not a directory (HOLDFAST_DATA)") from None
    except OSError as exc:
        raise ConfigError(f"cannot make the data directory {path}: {_cause(exc)} (HOLDFAST_DATA)") from None
    if not os.path.isdir(path):
        raise ConfigError(f"data directory {path} is not a directory (HOLDFAST_DATA)")
    # access() says yes to root on a directory it cannot write (a read-only
    # mount answers EROFS only to a real write): try one.
    try:
        fd, probe = tempfile.mkstemp(prefix=".holdfast-write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"cannot write in the data directory {path}: {_cause(exc)} (HOLDFAST_DATA)") from None


def _cause(exc):
    """"permission denied", "read-only file system"..."""
    return (exc.strerror or str(exc)).lower()
