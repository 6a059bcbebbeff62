"""In-process metrics, shown by GET /metrics in Prometheus' text format.

Counters and histograms live in one registry per process (like
prometheus_client's default one); the app, the worker and the store bump
them on their paths. A bump is a lock and a dict update (well under a
microsecond), so hot paths pay almost nothing. Figures that are cheaper to
read from the store at scrape time than to keep up to date (tasks by status,
open event streams) come from collectors the app passes to `render()`.

Counters start at zero when the process starts, as Prometheus expects; each
process of a shared store has its own.
"""

import bisect
import math
import re
import threading
import time
from contextlib import contextmanager

from errors import ProviderRejected, ProviderUnavailable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# Seconds, from a fast local call to a provider that makes us wait.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class _Metric:
    type = None

    def __init__(self, name, help, labels=()):
        if not _NAME.match(name) or not all(_LABEL.match(label) for label in labels):
            raise ValueError(f"bad metric or label name in {name}{labels}")
        self.name = name
        self.help = help
        self.labels = tuple(labels)
        self._lock = threading.Lock()
        self._values = {}

    def _check(self, values):
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {values}")


class Counter(_Metric):
    """A number that only goes up: `inc(*label_values, amount=1)`."""

    type = "counter"

    def inc(self, *values, amount=1):
        with self._lock:
            try:
                self._values[values] += amount
            except KeyError:
                self._check(values)
                self._values[values] = amount

    def value(self, *values):
        with self._lock:
            return self._values.get(values, 0)

    def samples(self):
        with self._lock:
            items = sorted(self._values.items())
        return [(self.name, dict(zip(self.labels, key)), value) for key, value in items]


class Histogram(_Metric):
    """Observations counted into fixed buckets: `observe(value, *label_values)`."""

    type = "histogram"

    def __init__(self, name, help, labels=(), buckets=LATENCY_BUCKETS):
        super().__init__(name, help, labels)
        if "le" in self.labels or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"{name}: buckets must be increasing and `le` is reserved")
        self.buckets = tuple(float(b) for b in buckets)

    def observe(self, value, *values):
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            row = self._values.get(values)
            if row is None:
                self._check(values)
                row = self._values[values] = [[0] * (len(self.buckets) + 1), 0.0, 0]
            row[0][i] += 1
            row[1] += value
            row[2] += 1

    def count(self, *values):
        with self._lock:
            row = self._values.get(values)
            return row[2] if row else 0

    def samples(self):
        with self._lock:
            items = sorted((key, (list(row[0]), row[1], row[2])) for key, row in self._values.items())
        out = []
        for key, (counts, total, n) in items:
            labels = dict(zip(self.labels, key))
            running = 0
            for bound, c in zip(self.buckets + (math.inf,), counts):
                running += c
                out.append((self.name + "_bucket", {**labels, "le": _number(bound)}, running))
            out.append((self.name + "_sum", labels, total))
            out.append((self.name + "_count", labels, n))
        return out


class Registry:
    def __init__(self):
        self._metrics = {}
        self._lock = threading.Lock()

    def _add(self, metric):
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} exists")
            self._metrics[metric.name] = metric
        return metric

    def counter(self, name, help, labels=()):
        return self._add(Counter(name, help, labels))

    def histogram(self, name, help, labels=(), buckets=LATENCY_BUCKETS):
        return self._add(Histogram(name, help, labels, buckets))

    def render(self, collectors=()):
        """The text format: this registry's metrics, then each collector's.
        A collector is a callable returning [(name, type, help, [(labels
        dict, value)])], called now."""
        out = []
        with self._lock:
            metrics = sorted(self._metrics.values(), key=lambda m: m.name)
        for m in metrics:
            _family(out, m.name, m.type, m.help, m.samples())
        for collect in collectors:
            for name, type_, help, samples in collect():
                _family(out, name, type_, help, [(name, labels, value) for labels, value in samples])
        return "".join(out)


def _family(out, name, type_, help, samples):
    out.append(f"# HELP {name} {_escape(help, quote=False)}\n# TYPE {name} {type_}\n")
    for sample, labels, value in samples:
        if labels:
            pairs = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            out.append(f"{sample}{{{pairs}}} {_number(value)}\n")
        else:
            out.append(f"{sample} {_number(value)}\n")


def _escape(text, quote=True):
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if quote else text


def _number(value):
    if value == math.inf:
        return "+Inf"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


# -- holdfast's metrics ---------------------------------------------------------

REGISTRY = Registry()
START_TIME = time.time()

SUBMITS = REGISTRY.counter(
    "holdfast_submits_total", "Submissions answered 2xx (new tasks and deduplicated ones), by provider.",
    ("provider",))
DEDUPE_HITS = REGISTRY.counter(
    "holdfast_dedupe_hits_total", "Submissions that returned an existing task (dedupe_key or Idempotency-Key).",
    ("provider",))
SUBMIT_REFUSALS = REGISTRY.counter(
    "holdfast_submit_refusals_total", "Submissions refused by a limit (credits, rate, queue), by error code.",
    ("code",))
POLL_LAG = REGISTRY.histogram(
    "holdfast_poll_lag_seconds", "How late a task was claimed: claim time minus its next_poll_at.",
    buckets=LAG_BUCKETS)
POLLS = REGISTRY.counter(
    "holdfast_polls_total", "Status polls of a provider, by what it answered (or error).",
    ("provider", "result"))
PROVIDER_CALL_SECONDS = REGISTRY.histogram(
    "holdfast_provider_call_seconds", "Duration of calls to a provider (submit, poll, cancel).",
    ("provider", "call"))
PROVIDER_ERRORS = REGISTRY.counter(
    "holdfast_provider_errors_total",
    "Provider calls that failed: unavailable (retried), rejected (permanent) or error (unexpected).",
    ("provider", "call", "kind"))
DOWNLOADS = REGISTRY.counter(
    "holdfast_downloads_total", "Result files: saved, expired (dead link), invalid, or retry (provider down).",
    ("provider", "outcome"))
DOWNLOAD_BYTES = REGISTRY.counter(
    "holdfast_download_bytes_total", "Bytes of result files saved.", ("provider",))
FINISHED = REGISTRY.counter(
    "holdfast_tasks_finished_total", "Tasks that reached a terminal status, by provider and status.",
    ("provider", "status"))
CHARGES = REGISTRY.counter(
    "holdfast_charges_total", "Reservations charged (a task succeeded or was partial).", ("provider",))
REFUNDS = REGISTRY.counter(
    "holdfast_refunds_total", "Reservations refunded (a task failed, timed out or was cancelled).",
    ("provider",))

RETENTION = REGISTRY.counter(
    "holdfast_retention_deleted_total",
    "What the retention job deleted: files (tasks whose files went), tasks, events, sessions.", ("what",))


@contextmanager
def provider_call(provider, call):
    """Time one call to a provider and count its failure, if any."""
    start = time.perf_counter()
    try:
        yield
    except ProviderUnavailable:
        PROVIDER_ERRORS.inc(provider, call, "unavailable")
        raise
    except ProviderRejected:
        PROVIDER_ERRORS.inc(provider, call, "rejected")
        raise
    except Exception:
        PROVIDER_ERRORS.inc(provider, call, "error")
        raise
    finally:
        PROVIDER_CALL_SECONDS.observe(time.perf_counter() - start, provider, call)


def claimed(tasks, now):
    """Record the poll lag of tasks just claimed at `now`."""
    for task in tasks:
        due = task["next_poll_at"]
        if due is not None:
            POLL_LAG.observe(max(0.0, now - due))
