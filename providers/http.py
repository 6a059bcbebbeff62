"""What the HTTP adapters share: one seam, a rate limit, streamed
downloads (bounded in size, time and rate, and by the address policy of
net.py), answers read with a limit.

`HttpProvider.seam()` is the one place where the client's and json's exceptions
become holdfast's: ProviderUnavailable (transient: connection refused, timeout,
a truncated or malformed answer) or ProviderRejected (a URL that can never
work). `HttpProvider.call()` adds the HTTP statuses that mean "later" (408,
429 with Retry-After, 5xx). Nothing else in the adapters catches a client
exception.

The same two places say what a failure means for a request that may have had
an effect (a submit). *Not sent*: the connection never opened (refused,
connect timeout, DNS). *Refused*: the provider answered that it did nothing
(408, 429, 503, with Retry-After). Both are plain ProviderUnavailable and may
be repeated. Anything else once the request went out (a read timeout, a reset
after sending, 500/502/504 and other 5xx, an answer that cannot be read) is
InDoubt: the job may exist, and the worker never follows it with a blind
second submit (DESIGN.md, guarantee 5).
"""

import os
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from http.client import HTTPException

from errors import (ConfigError, InDoubt, InvalidInput, ProviderRejected,
                    ProviderUnavailable, ResultExpired)

from .base import BaseProvider
from .net import AddressPolicy, AnswerTimeout, BadURL, Client, NotConnected, chunks, content_length, parse_json

MAX_RETRY_AFTER_S = 3600.0
# After an in-doubt submit, the provider is asked about its id no sooner than
# timeout_s plus this from when the request was sent: a request the client
# gave up on may still be on its way, or being handled, and a look in
# between would find nothing and submit it twice.
DOUBT_MARGIN_S = 5.0
CHUNK = 64 * 1024
# A result link answering these is dead, not down: 401/403 for a pre-signed
# URL past its expiry, 404/410 for a file that is gone.
DEAD_LINK = frozenset({401, 403, 404, 410})
# A download slower than this on average, once past the grace period, is
# dropped and tried again later: a link dripping a byte every half second
# never trips a per-read timeout and would hold a worker thread for good.
MIN_RATE = 4096            # bytes a second
RATE_GRACE_S = 5.0
CHECK_EVERY_S = 2.0        # how often a download asks the worker whether to go on
# Statuses by which a server says it did not act on the request: it gave up
# waiting for it (408), or asks to come back later (429, 503). A 500, 502 or
# 504 may come after the work was done (a gateway that lost the answer, a
# crash after the insert), so every other 5xx is in doubt.
REFUSED = frozenset({408, 429, 503})


def parse_retry_after(value, now=None):
    """Retry-After (seconds or an HTTP date) as seconds from now, or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        now = datetime.now(timezone.utc).timestamp() if now is None else now
        seconds = when.timestamp() - now
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))


def http_url(value, what):
    """`value` if it is an absolute http(s) URL; InvalidInput otherwise."""
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidInput(f"{what} is not an http(s) URL: {str(value)[:200]!r}", code="invalid_result")
    return value


class RateLimiter:
    """At most `rate` calls a second, spread evenly, for every thread of this
    process. A caller waits its turn when it is near (up to `max_wait`);
    further off, it gets ProviderUnavailable with the wait as retry_after, so
    the task is rescheduled in the store instead of holding a thread."""

    def __init__(self, rate, *, max_wait, clock=time.monotonic, sleep=time.sleep):
        self.rate = rate
        self.interval = 1.0 / rate
        self.max_wait = max_wait
        self.clock = clock
        self.sleep = sleep
        self._next = None
        self._lock = threading.Lock()

    def acquire(self):
        with self._lock:
            now = self.clock()
            at = now if self._next is None else max(now, self._next)
            wait = at - now
            if wait > self.max_wait:
                raise ProviderUnavailable(f"over the rate limit of {self.rate:g} calls/s", retry_after=wait)
            self._next = at + self.interval
        if wait > 0:
            self.sleep(wait)


class HttpProvider(BaseProvider):
    """An adapter that speaks HTTP to `url`, with an optional Bearer key read
    from the environment variable named by `api_key_env`."""

    defaults = {**BaseProvider.defaults, "url": None, "api_key_env": None,
                "allow_private_results": False,      # result links may reach private addresses
                "max_answer_bytes": 4 * 1024 * 1024}  # one API answer, read into memory
    required = ("url",)

    def __init__(self, name, config=None, env=None):
        super().__init__(name, config, env)
        try:
            url = http_url(self.config["url"], f"provider {name}: url")
        except InvalidInput as exc:
            raise ConfigError(exc.message) from None
        self.config["url"] = url.rstrip("/")
        env = os.environ if env is None else env
        if not isinstance(self.config["allow_private_results"], bool):
            raise ConfigError(f"provider {name}: allow_private_results must be true or false")
        self._integer("max_answer_bytes", minimum=1024)
        allow_private = (self.config["allow_private_results"]
                         or env.get("HOLDFAST_ALLOW_PRIVATE_RESULTS", "").lower() in ("1", "true", "yes"))
        self._policy = AddressPolicy(self.config["url"], allow_private)
        self._api_key = None
        var = self.config["api_key_env"]
        if var is not None:
            if not isinstance(var, str) or not var:
                raise ConfigError(f"provider {name}: api_key_env must name an environment variable")
            self._api_key = env.get(var)
            if not self._api_key:
                raise ConfigError(f"provider {name}: the environment variable {var} (api_key_env) is not set")
        self._local = threading.local()
        self._limiter = (RateLimiter(self.rate_per_s, max_wait=min(self.timeout_s, 5.0))
                         if self.rate_per_s else None)

    @property
    def doubt_grace_s(self):
        return self.timeout_s + DOUBT_MARGIN_S

    # How the key is sent: `Authorization: <auth_scheme> <key>` (fal.ai says "Key").
    auth_scheme = "Bearer"

    def auth_headers(self):
        """The headers that carry the key, sent only to the provider's own url."""
        return {"Authorization": f"{self.auth_scheme} {self._api_key}"} if self._api_key else {}

    def _client(self):
        # One client (and connection pool) per thread: a connection serves
        # one request at a time, and a thread never waits for another's.
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = Client(self._policy, self.max_answer_bytes)
        return client

    def _headers_for(self, url):
        # The key goes only to the provider itself, never to a result host,
        # nor with a redirect that leaves the provider's url.
        return self.auth_headers() if url == self.url or url.startswith(self.url + "/") else {}

    @contextmanager
    def seam(self, what, health=True):
        """The client's and json's errors -> holdfast's; records the provider's health."""
        try:
            yield
        except BadURL as exc:     # not http(s), no host, a bad port
            raise ProviderRejected(f"{self.name}: {what}: bad URL: {exc}", code="invalid_result") from None
        except NotConnected as exc:
            # Refused, unreachable, DNS, connect timeout: the connection
            # never opened, so not a byte of the request reached the provider.
            if exc.timed_out:
                self.stalled = self.stalled or health
                raise self._down(f"{what}: could not connect within {self.timeout_s:g}s", health) from None
            raise self._down(f"{what}: cannot connect ({_short(exc)})", health) from None
        except AnswerTimeout:
            self.stalled = self.stalled or health
            raise self._down(f"{what}: no answer within {self.timeout_s:g}s", health, doubt=True) from None
        except (HTTPException, OSError) as exc:
            # A reset or a close once the request was written (ProtocolError),
            # TLS, a body that cannot be decoded: the request may have acted.
            raise self._down(f"{what}: the connection broke ({_short(exc)})", health, doubt=True) from None
        except ValueError as exc:   # a JSON document that is not what was promised
            raise self._down(f"{what}: malformed answer ({exc})", health, doubt=True) from None

    def _down(self, message, health=True, retry_after=None, doubt=False):
        """ProviderUnavailable, or InDoubt when the request may have had its effect."""
        exc = (InDoubt if doubt else ProviderUnavailable)(f"{self.name}: {message}", retry_after=retry_after)
        if health:
            self.seen(False, exc.message)
        return exc

    def call(self, method, path, *, what, json=None, params=None, stream=False, limited=True,
             health=True):
        """One request to `path` (relative to url, or an absolute URL).
        Returns the response for any status the adapter must read itself;
        408, 429 and 503 raise ProviderUnavailable (with Retry-After), every
        other 5xx InDoubt."""
        if limited and self._limiter is not None:
            self._limiter.acquire()
        url = path if "://" in path else self.url + path
        resp = self._request(method, url, what, health, json=json, params=params, stream=stream)
        if resp.status_code in (408, 429) or resp.status_code >= 500:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            resp.close()
            raise self._down(f"{what}: HTTP {resp.status_code}", health, retry_after,
                             doubt=resp.status_code not in REFUSED)
        if health:
            self.seen(True)
        return resp

    def _request(self, method, url, what, health, **options):
        """One request through this thread's client, its errors translated:
        the key only where _headers_for allows, the provider's timeout."""
        with self.seam(what, health):
            resp = self._client().request(method, url, what=what, headers_for=self._headers_for,
                                          timeout_s=self.timeout_s, **options)
        if health:
            self.stalled = False
        return resp

    def json_of(self, resp, what):
        """The response's JSON; ProviderUnavailable when it is not JSON,
        InvalidResult when it nests too deep. (The body was read with
        max_answer_bytes by the client.)"""
        with self.seam(what):
            return parse_json(resp.content, f"{self.name}: {what}")

    def fetch(self, task, output, check=None):
        if output.data is not None:
            yield output.data
            return
        what = f"download of {output.name}"
        resp = self._request("GET", http_url(output.url, f"result {output.name}"), what, False, stream=True)
        try:
            if resp.status_code in DEAD_LINK:
                raise ResultExpired(f"{output.name}: the result link answered HTTP {resp.status_code}")
            if resp.status_code in (408, 429) or resp.status_code >= 500:
                raise self._down(f"{what}: HTTP {resp.status_code}", False,
                                 parse_retry_after(resp.headers.get("Retry-After")))
            if resp.status_code != 200:
                raise InvalidInput(f"{output.name}: the result link answered HTTP {resp.status_code}",
                                   code="invalid_result")
            length = content_length(resp.headers)
            if length is not None and length > self.max_file_bytes:
                raise InvalidInput(f"{output.name} is {length} bytes, over the limit of {self.max_file_bytes}",
                                   code="invalid_result")
            started = checked = time.monotonic()
            got = 0
            with self.seam(what, health=False):
                for chunk in chunks(resp.raw):
                    got += len(chunk)
                    yield chunk
                    at = time.monotonic()
                    if check is not None and at - checked >= CHECK_EVERY_S:
                        checked = at
                        check()     # raises at the task's deadline, or once its lease is lost
                    if at - started > RATE_GRACE_S and got < MIN_RATE * (at - started):
                        raise self._down(f"{what}: {got} bytes in {at - started:.0f}s, under the minimum "
                                         f"rate of {MIN_RATE} bytes/s", False)
        finally:
            resp.close()

    def describe(self):
        out = super().describe()
        out["limits"].update(max_answer_bytes=self.max_answer_bytes,
                             allow_private_results=self._policy.allow_private)
        return out

    def close(self):
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()


def _short(exc):
    text = str(exc)
    return text if len(text) <= 300 else text[:300] + "..."
