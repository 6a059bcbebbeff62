"""HealthLog: what this worker's calls to each provider came to, written
to the store for GET /api/providers in every process.

A call that got an answer (a refusal is an answer too) counts as the
provider answering; one that could not reach it, got no answer, or got a
408/429/5xx counts as a failure, with its code and message. Writes are few:
at once when a provider turns from answering to failing or back (five a
second at most, for one that flaps), and otherwise at most once a second
per provider (the worker's `health` job writes what is left), so a busy
worker's polls add no write each.
"""

import logging
import threading
import time
from contextlib import contextmanager

from errors import HoldfastError, ProviderRejected, ProviderUnavailable

log = logging.getLogger("holdfast.worker")

WRITE_EVERY_S = 1.0    # at most, per provider, while its state holds
FLIP_EVERY_S = 0.2     # at most, per provider, while it flaps between answering and failing


class HealthLog:
    def __init__(self, store):
        self.store = store
        self._lock = threading.Lock()
        self._news = {}       # provider -> {"ok_at", "failures", "error"} not yet written
        self._state = {}      # provider -> True (answering) / False (failing), as last written
        self._written = {}    # provider -> time.monotonic() of its last write
        self._told = None     # the store error last logged

    @contextmanager
    def call(self, provider, clock):
        """Around one call to `provider` (a name): its outcome noted."""
        try:
            yield
        except ProviderRejected:
            self.note(provider, clock(), ok=True)
            raise
        except ProviderUnavailable as exc:
            self.note(provider, clock(), ok=False, error=("provider_unavailable", exc.message))
            raise
        except Exception as exc:
            message = exc.message if isinstance(exc, HoldfastError) else f"{type(exc).__name__}: {exc}"
            self.note(provider, clock(), ok=False, error=("internal", message))
            raise
        self.note(provider, clock(), ok=True)

    def note(self, provider, now, *, ok, error=None):
        with self._lock:
            news = self._news.setdefault(provider, {"ok_at": None, "failures": 0, "error": None})
            if ok:
                news.update(ok_at=now, failures=0)
            else:
                news["failures"] += 1
                news["error"] = (*error, now)
            since = time.monotonic() - self._written.get(provider, float("-inf"))
            due = since >= WRITE_EVERY_S or (self._state.get(provider) is not ok and since >= FLIP_EVERY_S)
        if due:
            self.write(provider)

    def write(self, provider=None):
        """Write what is noted (of `provider`, or of every provider)."""
        with self._lock:
            names = [provider] if provider is not None else list(self._news)
            batch = {name: self._news.pop(name) for name in names if name in self._news}
            for name, news in batch.items():
                self._written[name] = time.monotonic()
                self._state[name] = news["failures"] == 0
        for name, news in batch.items():
            now = news["error"][2] if news["failures"] else news["ok_at"]
            try:
                self.store.record_provider_health(name, now=now, ok_at=news["ok_at"], failures=news["failures"],
                                                  error=news["error"])
            except HoldfastError as exc:
                # Health is for people to read: a store that cannot take it
                # now must not cost the task its step. One line per change.
                if self._told != exc.message:
                    log.warning("provider health not recorded: %s", exc.message)
                self._told = exc.message
                with self._lock:
                    self._state.pop(name, None)     # try again at the next call
