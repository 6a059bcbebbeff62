"""What every adapter is: the common Status and Output, the retry policy, and
BaseProvider with its configuration checks."""

import functools
import math
import time
from dataclasses import dataclass, field

from errors import ConfigError, InvalidInput


@dataclass(frozen=True)
class Output:
    """One result file: bytes in hand, a URL to download, or (local) a path
    in `meta["path"]`."""

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
        try:
            intervals = tuple(float(i) for i in intervals)
        except (TypeError, ValueError):
            raise ConfigError("retry intervals must be numbers") from None
        if max_attempts < 1 or not intervals or min(intervals) < 0:
            raise ConfigError("retry needs max_attempts >= 1 and non-negative intervals")
        self.max_attempts = int(max_attempts)
        self.intervals = intervals

    def delay(self, attempt):
        """Seconds to wait after failed try number `attempt` (1-based)."""
        return self.intervals[min(attempt, len(self.intervals)) - 1]

    def exhausted(self, attempt):
        return attempt >= self.max_attempts


def iso_now():
    """Now in UTC, to the second. Every provider call's answer stamps it."""
    return _iso_second(int(time.time()))


@functools.lru_cache(maxsize=2)
def _iso_second(second):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))


# Names that look like a secret: holdfast.toml must name an environment
# variable instead (`api_key_env`), so the file can be shared and committed.
_SECRET_WORDS = ("key", "token", "password", "secret")


class BaseProvider:
    """What every adapter does. `task` arguments are store task dicts.

    An adapter keeps no per-task state between calls: what it must remember
    is the task's `external_id` (and, if ever needed, its `state`), so a new
    process picks up where a dead one stopped.
    """

    type = None
    # The provider accepts an id chosen by holdfast before submitting (ComfyUI's
    # prompt_id), so a crash between submit and recording it cannot run a job twice.
    client_ids = False
    # The worker runs the job itself through run() (local functions) instead
    # of submit() and poll().
    runs_in_worker = False
    # The provider can call holdfast back when a job ends (KIE's callBackUrl):
    # submit() then finds the URL in task["callback_url"], and
    # callback_job() checks what arrives there.
    callbacks = False

    # Every key a provider's table may have, with its default. Unknown keys
    # are a ConfigError: a typo must not silently mean "no limit".
    defaults = {
        "concurrency": None,        # jobs at the provider at once; None: no limit
        "max_queued": None,         # tasks waiting for it at once; past it, submissions get 429
        "cost": 0,                  # credits per task
        "poll_interval_s": 2.0,     # first poll; backs off with age ...
        "max_poll_interval_s": 30.0,  # ... up to this
        "max_wait_s": 7200.0,       # the deadline
        "timeout_s": 10.0,          # per HTTP request
        "rate_per_s": None,         # API calls a second; None: no limit
        "retries": 3,               # submits (POSTs) in all; local: runs in all
        "max_file_bytes": 100 * 1024 * 1024,
        "max_outputs": 100,         # result files of one task; more fails it invalid_result
        "max_task_bytes": 1024 * 1024 * 1024,  # all of one task's result files together
        # A submit that may have made a job (no answer, a 500...) at a
        # provider that takes no client id: "fail" ends the task
        # submission_in_doubt; "resubmit" sends it again (at least once).
        "on_doubt": "fail",
    }
    ON_DOUBT = ("fail", "resubmit")
    required = ()

    def __init__(self, name, config=None, env=None):
        config = dict(config or {})
        config.pop("type", None)
        self.name = name
        self._check_keys(config)
        self.config = {**self.defaults, **config}
        for key in ("poll_interval_s", "max_poll_interval_s", "max_wait_s", "timeout_s"):
            self._number(key, positive=True)
        if self.config["rate_per_s"] is not None:
            self._number("rate_per_s", positive=True)
        for key in ("cost", "retries", "max_file_bytes", "max_outputs", "max_task_bytes"):
            self._integer(key, minimum=1 if key != "cost" else 0)
        if self.config["concurrency"] is not None:
            self._integer("concurrency", minimum=1)
        if self.config["max_queued"] is not None:
            self._integer("max_queued", minimum=1)
        if self.config["on_doubt"] not in self.ON_DOUBT:
            raise ConfigError(f"provider {name}: on_doubt must be one of {', '.join(self.ON_DOUBT)}, "
                              f"not {self.config['on_doubt']!r}")
        if self.config["max_poll_interval_s"] < self.config["poll_interval_s"]:
            raise ConfigError(f"provider {name}: max_poll_interval_s must be at least poll_interval_s")
        self.health = {"ok": None, "checked_at": None, "error": None}
        self._back = False
        # The provider's last request went unanswered for timeout_s (a
        # connect or an answer): it holds a worker thread that long a
        # call, so the worker gives its tasks at most half the threads
        # until it answers again (Worker.process). Any answer clears it.
        self.stalled = False

    def _check_keys(self, config):
        for key in config:
            if key not in self.defaults:
                if any(word in key.lower() for word in _SECRET_WORDS) and not key.endswith("_env"):
                    raise ConfigError(f"provider {self.name}: {key} looks like a secret; secrets come from "
                                      "the environment: name the variable with api_key_env")
                raise ConfigError(f"provider {self.name}: unknown setting {key!r}; "
                                  f"known: {', '.join(sorted(self.defaults))}")
        missing = [key for key in self.required if config.get(key) in (None, "")]
        if missing:
            raise ConfigError(f"provider {self.name} ({self.type}) needs {', '.join(missing)}")

    def _number(self, key, positive=False):
        value = self.config[key]
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                or (positive and value <= 0)):
            raise ConfigError(f"provider {self.name}: {key} must be a positive number, not {value!r}")

    def _integer(self, key, minimum):
        value = self.config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"provider {self.name}: {key} must be an integer of at least {minimum}, "
                              f"not {value!r}")

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
        (nothing was made: retry later), InDoubt (a job may have been made),
        or ProviderRejected (permanent)."""
        raise NotImplementedError

    @property
    def doubt_grace_s(self):
        """How long after an in-doubt submit was sent before the provider is
        asked about its id: until then the request may still be on its way
        or being handled. Nothing travels for an adapter without a network."""
        return 0.0

    def poll(self, task, now):
        """Ask about `task["external_id"]`; return a Status. `unknown` means
        the provider does not know the job (it may be submitted again).
        ProviderUnavailable when the provider cannot answer now."""
        raise NotImplementedError

    def callback_job(self, headers, body, now):
        """(callbacks adapters) The job id a callback to holdfast names,
        once its signature checks out: Unauthorized when it does not,
        InvalidInput when the body names no job. Nothing else in the body
        is trusted."""
        raise NotImplementedError

    def run(self, task, report):
        """(runs_in_worker adapters) Do the job here; return its Outputs."""
        raise NotImplementedError

    def listen(self, on_progress, on_done):
        """Start hearing what the provider pushes (ComfyUI's socket), in a
        thread of the adapter's: `on_progress(task_id, step, progress)` and
        `on_done(task_id)` (the job ended: poll it now). Hints only, the
        poll stays the truth. True if it listens; False when the provider
        pushes nothing."""
        return False

    def unlisten(self):
        """Stop what listen() started."""

    def cancel(self, task):
        """Best effort: stop the job at the provider."""

    def fetch(self, task, output, check=None):
        """Yield the bytes of one Output. ResultExpired when the link is dead,
        ProviderUnavailable to try again later, InvalidInput (invalid_result)
        for an output that can never be saved, InvalidResult (invalid_result)
        for one the task must not have at all. `check()`, when given, is
        called every few seconds of a long download and raises to stop it
        (the task's deadline passed, its lease was lost)."""
        if output.data is not None:
            yield output.data
            return
        raise NotImplementedError

    def seen(self, ok, error=None):
        """Record the last answer (or silence) from the provider, for
        GET /api/providers. Per process, replaced whole: no lock needed."""
        if ok and self.health["ok"] is False:
            self._back = True
        self.health = {"ok": ok, "checked_at": iso_now(), "error": error}

    def came_back(self):
        """True once after the provider answered again following a failure
        (as seen by this process): the worker then stops making its other
        tasks wait out their backoff."""
        back, self._back = self._back, False
        return back

    def describe(self):
        keys = ("concurrency", "max_queued", "cost", "poll_interval_s", "max_poll_interval_s",
                "max_wait_s", "timeout_s", "rate_per_s", "retries", "max_file_bytes", "max_outputs",
                "max_task_bytes")
        return {"name": self.name, "type": self.type,
                "limits": {k: self.config[k] for k in keys}, "health": dict(self.health)}

    def close(self):
        """Release connections."""

