"""Webhooks out: the sender of the outbox's deliveries (Standard Webhooks 1.0).

The store writes a delivery row in the transaction of the task change it
reports; this module sends it. Each tick claims due deliveries with a lease
(several processes on one PostgreSQL database never send one at the same
time) and hands each to a small pool of its own, so a delivery never holds
up the worker's other jobs. A receiver (scheme, host and port) has at most
`per_target` deliveries in flight per process: a slow one waits behind its
own deliveries only, the others' are claimed past it.

An attempt has one deadline (`timeout_s`, at most 15 s) for the connect, the
request and the answer's status line and headers together; a watchdog shuts
the socket of an attempt past it, so a receiver that drips bytes holds a
thread no longer. The answer's body is never read. The address is checked
at the connect itself, after resolution (DNS rebinding gets no gap), with
providers/net.py's rules, unless private addresses are allowed.

2xx is success. 410 Gone disables the endpoint (or the task's own URL).
Everything else is a failure, tried again on a schedule of about a day
(`SCHEDULE_S`, with jitter); 429 and 503 with `Retry-After` are tried again
when it says. A crash while sending leaves the lease to run out and the
delivery is sent again under the same `webhook-id`: receivers dedupe on it.
"""

import base64
import hashlib
import hmac
import http.client
import logging
import random
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from errors import HoldfastError
from providers.net import refusal

log = logging.getLogger("holdfast.webhooks")

MAX_TIMEOUT_S = 15.0
# The waits after the 1st, 2nd... failed attempt: 8 attempts over about 27 h.
SCHEDULE_S = (5, 300, 1800, 7200, 18000, 36000, 36000)
JITTER = 0.2                # each wait is +-20%, so receivers that failed together do not return together
MAX_RETRY_AFTER_S = 36000.0
CONNECT_S = 5.0


class Refused(Exception):
    """The receiver's address is one holdfast will not connect to."""


def sign(secret, msg_id, timestamp, body):
    """The `v1,<base64>` signature of one message with one secret."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def retry_after_s(value, now):
    """Seconds from a Retry-After header (seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        return min(max(0.0, parsedate_to_datetime(value).timestamp() - now), MAX_RETRY_AFTER_S)
    except (TypeError, ValueError, OverflowError):
        return None


class Deliverer:
    """Claims due deliveries and sends them in its own pool."""

    def __init__(self, store, *, owner, threads=8, per_target=2, timeout_s=MAX_TIMEOUT_S, retry_scale=1.0,
                 allow_private=False, clock=time.time, batch=50):
        self.store = store
        self.owner = owner
        self.threads = threads
        self.per_target = per_target
        self.timeout_s = min(float(timeout_s), MAX_TIMEOUT_S)
        # A sender holds a delivery this long: past one whole attempt, with
        # room for the write of its outcome.
        self.lease_s = 2 * self.timeout_s + 5.0
        self.retry_scale = retry_scale
        self.allow_private = allow_private
        self.clock = clock
        self.batch = batch
        self.pool = None
        self._busy = {}            # target -> deliveries in flight here
        self._watched = {}         # attempt key -> (deadline, socket)
        self._lock = threading.Lock()
        self._ticking = threading.Lock()
        self._again = False
        self._stop = threading.Event()
        self._watchdog = None
        self._ssl = ssl.create_default_context()

    def start(self):
        self._stop.clear()
        with self._lock:
            self._busy = {}     # what a stop() cancelled is in flight no more
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="holdfast-webhook")
        self._watchdog = threading.Thread(target=self._watch_loop, name="holdfast-webhook-watchdog", daemon=True)
        self._watchdog.start()

    def stop(self, wait=True):
        self._stop.set()
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)

    # -- claiming ----------------------------------------------------------------

    def tick(self, now=None):
        """Claim what is due and start sending it; returns how many. Never
        waits for a receiver. A second call while one runs asks it to go
        round once more instead."""
        if not self._ticking.acquire(blocking=False):
            self._again = True
            return 0
        try:
            started = 0
            while True:
                self._again = False
                n = self._claim_and_start(self.clock() if now is None else now)
                started += n
                if not self._again and n < self.batch:
                    return started
                if n == 0:
                    return started
        finally:
            self._ticking.release()

    def _claim_and_start(self, now):
        pool = self.pool
        if pool is None or self._stop.is_set():
            return 0
        with self._lock:
            room = self.threads - sum(self._busy.values())
            busy = dict(self._busy)
        if room <= 0:
            return 0
        claimed = self.store.claim_deliveries(self.owner, now=now, limit=min(room, self.batch),
                                              lease_s=self.lease_s, per_target=self.per_target, busy=busy)
        for d in claimed:
            with self._lock:
                self._busy[d["target"]] = self._busy.get(d["target"], 0) + 1
            try:
                pool.submit(self._run, d)
            except RuntimeError:
                self._release(d)        # stopping: its lease runs out and another sends it
        return len(claimed)

    def _release(self, d):
        with self._lock:
            left = self._busy.get(d["target"], 1) - 1
            if left:
                self._busy[d["target"]] = left
            else:
                self._busy.pop(d["target"], None)

    def _run(self, d):
        try:
            self.send(d)
        except HoldfastError as exc:
            log.warning("delivery %s: outcome not written (%s); its lease runs out and it is sent again",
                        d["id"], exc)
        except Exception:
            log.exception("delivery %s: unexpected error; its lease runs out and it is sent again", d["id"])
        finally:
            self._release(d)
        # A thread is free: more may be due (a backlog drains at the pool's pace).
        try:
            self.tick()
        except HoldfastError:
            pass

    # -- one attempt ----------------------------------------------------------------

    def send(self, d):
        """One attempt at a claimed delivery, and its outcome written."""
        body = d["payload"].encode()
        stamp = int(self.clock())
        headers = {"Content-Type": "application/json", "User-Agent": "holdfast-webhooks",
                   "webhook-id": d["id"], "webhook-timestamp": str(stamp),
                   "webhook-signature": " ".join(sign(s, d["id"], stamp, body) for s in d["secrets"])}
        started = time.monotonic()
        status, error, wait = None, None, None
        try:
            status, retry_after = self._post(d["url"], body, headers, d["id"])
        except Refused as exc:
            error = str(exc)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            error = _describe(exc, time.monotonic() - started, self.timeout_s)
        else:
            if status in (429, 503):
                wait = retry_after_s(retry_after, self.clock())
        took = time.monotonic() - started
        now = self.clock()
        if status is not None and 200 <= status < 300:
            outcome, next_try = "succeeded", None
        elif status == 410:
            outcome, next_try = "gone", None
        else:
            if error is None:
                error = f"the receiver answered {status}"
            outcome, next_try = self._next_try(d, now, wait)
        self.store.finish_delivery(d["id"], token=d["lease_token"], now=now, outcome=outcome, status=status,
                                   error=error, next_try_at=next_try, took_s=took)
        return outcome

    def _next_try(self, d, now, wait):
        # Sending again after a failure may deliver twice (a timeout may have
        # reached the receiver): Standard Webhooks receivers dedupe on the
        # webhook-id, which stays the same.
        if d["tries"] > len(SCHEDULE_S):
            return "failed", None
        if wait is None:
            wait = SCHEDULE_S[d["tries"] - 1] * self.retry_scale * random.uniform(1 - JITTER, 1 + JITTER)
        return "retry", now + wait

    def _post(self, url, body, headers, key):
        parts = urlsplit(url)
        https = parts.scheme == "https"
        host = parts.hostname or ""
        port = parts.port or (443 if https else 80)
        deadline = time.monotonic() + self.timeout_s
        sock = self._connect(host, port, deadline, key)
        conn = None
        try:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            if https:
                sock = self._ssl.wrap_socket(sock, server_hostname=host)
                self._watch(key, sock, deadline)
            conn = (http.client.HTTPSConnection if https else http.client.HTTPConnection)(host, port)
            conn.sock = sock
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheader("Retry-After")
        finally:
            self._unwatch(key)
            if conn is not None:
                conn.close()
            sock.close()

    def _connect(self, host, port, deadline, key):
        """A socket connected to an address the rules allow (checked here,
        after resolution: nothing resolves the name again in between)."""
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        allowed, refused = [], []
        for info in infos:
            why = None if self.allow_private else refusal(info[4][0])
            (refused if why else allowed).append((info, why))
        if not allowed:
            (info, why) = refused[0]
            raise Refused(f"refused to connect to {host}:{port}: it resolves to {info[4][0]}, {why} "
                          "(HOLDFAST_WEBHOOK_ALLOW_PRIVATE=1 allows private addresses)")
        allowed = [info for info, _ in allowed]
        last = None
        for family, kind, proto, _, addr in allowed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock = socket.socket(family, kind, proto)
            sock.settimeout(min(CONNECT_S, left))
            self._watch(key, sock, deadline)
            try:
                sock.connect(addr)
                return sock
            except OSError as exc:
                last = exc
                sock.close()
        raise last or TimeoutError("timed out connecting")

    # -- the watchdog: one deadline per attempt ------------------------------------

    def _watch(self, key, sock, deadline):
        with self._lock:
            self._watched[key] = (deadline, sock)

    def _unwatch(self, key):
        with self._lock:
            self._watched.pop(key, None)

    def _watch_loop(self):
        while not self._stop.wait(0.2):
            now = time.monotonic()
            with self._lock:
                late = [(k, s) for k, (dl, s) in self._watched.items() if dl <= now]
                for k, _ in late:
                    del self._watched[k]
            for _, sock in late:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _describe(exc, took, limit):
    if isinstance(exc, (TimeoutError, socket.timeout)) or took >= limit - 0.05:
        return f"timed out after {took:.1f}s (the limit is {limit:g}s)"
    return f"{type(exc).__name__}: {exc}"[:500]
