"""Where holdfast's outbound requests may go, and how much they may read.

A provider is trusted with its own URL and nothing more. Result links come
from the provider's answers, so a compromised or misconfigured provider could
point them at this server's /metrics, at a loopback-only service or at a
cloud's metadata address, and holdfast would fetch that and serve it to the
task's owner. So every connection checks the address it is about to connect
to, after DNS resolution (a name that resolves to 127.0.0.1 is 127.0.0.1),
in the connection itself: a redirect hop is a new connection and is checked
the same way, and a DNS answer that changes between a check and the connect
cannot slip through, because there is no gap between the two. No proxy is
used, not even one named by the environment: a proxy would resolve and
connect out of the policy's reach.

The provider's own host and port are always allowed (a ComfyUI on the LAN);
`allow_private_results = true` in its table, or HOLDFAST_ALLOW_PRIVATE_RESULTS=1
for every provider, lifts the rule for providers whose result hosts really
live on a private network.

Answers are read in chunks with a byte limit and a total time, and parsed
with a nesting limit: a 100 MB or 100,000-deep answer is the provider's
fault, not a reason to run out of memory or stack.
"""

import ipaddress
import json
import re
import socket
import time
from itertools import accumulate
from urllib.parse import urlencode, urljoin, urlsplit

import certifi
from urllib3 import PoolManager, Timeout
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError, ReadTimeoutError
from urllib3.util.connection import create_connection

from errors import InvalidResult

CHUNK = 64 * 1024
MAX_DEPTH = 100            # a provider answer nested deeper is refused; real ones are under 10
MAX_REDIRECTS = 5
ANSWER_TIME_FACTOR = 3     # an API answer must arrive within this many read timeouts in all
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def refusal(ip):
    """Why holdfast will not connect to `ip` (a string), or None when it may."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if addr.version == 6:
        # An IPv4 address inside an IPv6 one reaches that IPv4 address.
        embedded = addr.ipv4_mapped or addr.sixtofour or (addr.teredo or (None, None))[1]
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None:
            addr = embedded
    if addr.is_loopback:
        return "a loopback address"
    if addr.is_link_local:
        return "a link-local address (cloud metadata lives there)"
    if addr.is_multicast:
        return "a multicast address"
    if addr.is_unspecified:
        return "an unspecified address"
    if addr.is_private:
        return "a private address"
    if addr.is_reserved or not addr.is_global:
        return "a reserved address"
    return None


class AddressPolicy:
    """Who a provider's connections may reach: its own host and port always;
    other hosts only at public addresses, unless `allow_private`."""

    def __init__(self, own_url, allow_private=False):
        host, port = _host_port(own_url)
        self.own = (host, port)
        self.allow_private = allow_private
        guard = {"policy": self}
        self.pool_classes = {
            "http": type("GuardedHTTPConnectionPool", (HTTPConnectionPool,), {
                "ConnectionCls": type("GuardedHTTPConnection", (_Guarded, HTTPConnection), guard)}),
            "https": type("GuardedHTTPSConnectionPool", (HTTPSConnectionPool,), {
                "ConnectionCls": type("GuardedHTTPSConnection", (_Guarded, HTTPSConnection), guard)}),
        }

    def checks(self, host, port):
        return not self.allow_private and (host.lower().rstrip("."), port) != self.own


class _Guarded:
    """A urllib3 connection that resolves its host itself and connects only
    to addresses the policy allows."""

    policy = None

    def _new_conn(self):
        if not self.policy.checks(self.host, self.port):
            return super()._new_conn()
        try:
            infos = socket.getaddrinfo(self._dns_host, self.port, 0, socket.SOCK_STREAM)
        except OSError as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        allowed, refused = [], []
        for info in infos:
            ip = info[4][0]
            why = refusal(ip)
            (refused if why else allowed).append((ip, why))
        if not allowed:
            ip, why = refused[0]
            raise InvalidResult(f"refused to connect to {self.host}:{self.port}: it resolves to {ip}, "
                                f"{why} (set allow_private_results = true for a provider whose results "
                                "live on a private network)")
        # Connect to the checked address itself, never to the name again: a
        # second resolution could answer differently (DNS rebinding). HTTPS
        # still verifies the certificate against the name (self.host).
        last = None
        for ip, _ in allowed:
            try:
                return create_connection((ip, self.port), self.timeout, source_address=self.source_address,
                                         socket_options=self.socket_options)
            except socket.timeout:
                last = ConnectTimeoutError(self, f"Connection to {self.host} ({ip}) timed out. "
                                                 f"(connect timeout={self.timeout})")
            except OSError as exc:
                last = NewConnectionError(self, f"Failed to establish a new connection to {ip}: {exc}")
        raise last


# Sent with every request; the caller adds its own (the key, a body's type).
BASE_HEADERS = {"User-Agent": "holdfast", "Accept": "*/*", "Accept-Encoding": "gzip, deflate"}
REDIRECTS = frozenset({301, 302, 303, 307, 308})


class Answer:
    """A response as the adapters read it: `status_code`, `headers` (any
    case), `content` (the whole body, read with the byte limit; None for a
    stream, whose body `chunks(answer.raw)` reads), `text`."""

    __slots__ = ("raw", "status_code", "headers", "content")

    def __init__(self, raw, content=None):
        self.raw, self.content = raw, content
        self.status_code = raw.status
        self.headers = raw.headers

    @property
    def text(self):
        return (self.content or b"").decode("utf-8", "replace")

    def close(self):
        """Done with it: a body left unread closes its connection; a body
        read to its end gave its connection back to the pool already."""
        _discard(self.raw)


class Client:
    """HTTP for one thread of one provider, on urllib3 directly: pooled
    connections that the address policy checks as they connect, answers
    read with a byte limit and a total time, redirects followed here so
    every hop is checked. (requests' per-call machinery, settings merged
    into every request, hooks, cookies, cost more CPU than the request
    itself: a poll is what holdfast does most.)

    Nothing here sends a request twice (`retries=False`): whether a failed
    one may be repeated is the caller's decision, as it depends on whether
    it was sent (providers/http.py, guarantee 5)."""

    def __init__(self, policy, max_answer_bytes):
        self.max_answer_bytes = max_answer_bytes
        # A thread uses one connection to a host at a time; two leave room
        # for a download's host being the provider's own.
        # certifi's CA certificates, as requests used: an image without a
        # system store still verifies HTTPS.
        self.pools = PoolManager(num_pools=10, maxsize=2, retries=False, ca_certs=certifi.where())
        self.pools.pool_classes_by_scheme = dict(policy.pool_classes)

    def request(self, method, url, *, what, headers_for, timeout_s, json=None, params=None, stream=False):
        """One request, following up to MAX_REDIRECTS redirects (http(s)
        only, no loop). `headers_for(url)` gives each hop's own headers, so
        a key meant for the provider never follows a redirect elsewhere.
        Returns an Answer, its body read unless `stream`."""
        if params:
            url = _with_query(url, params)
        body, content_type = None, None
        if json is not None:
            body, content_type = _json_body(json), "application/json"
        timeout = Timeout(connect=timeout_s, read=timeout_s)
        seen = set()
        for _ in range(MAX_REDIRECTS + 1):
            headers = {**BASE_HEADERS, **headers_for(url)}
            if content_type is not None:
                headers["Content-Type"] = content_type
            raw = self.pools.urlopen(method, url, body=body, headers=headers, redirect=False, retries=False,
                                     timeout=timeout, preload_content=False, decode_content=False)
            location = raw.headers.get("Location") if raw.status in REDIRECTS else None
            if location is None:
                return self._answer(raw, url, stream, timeout_s)
            _discard(raw)
            seen.add(url)
            url = urljoin(url, location)
            if urlsplit(url).scheme not in ("http", "https"):
                raise InvalidResult(f"{what}: redirected to {url[:200]!r}, not an http(s) URL")
            if url in seen:
                raise InvalidResult(f"{what}: a redirect loop (back to {url[:200]})")
            # As browsers do: a 303, and a 301 or 302 after a POST, become a
            # GET without the body; a 307 and a 308 repeat the request.
            if raw.status in (301, 302, 303) and method not in ("GET", "HEAD"):
                method, body, content_type = "GET", None, None
        raise InvalidResult(f"{what}: more than {MAX_REDIRECTS} redirects")

    def _answer(self, raw, url, stream, timeout_s):
        if stream:
            return Answer(raw)
        try:
            content = read_capped(raw, self.max_answer_bytes, within_s=ANSWER_TIME_FACTOR * timeout_s, url=url)
        except BaseException:
            _discard(raw)
            raise
        return Answer(raw, content)

    def close(self):
        self.pools.clear()


def _discard(raw):
    """Close a urllib3 response and hand its connection slot back: one not
    read to its end is closed, never reused with bytes still unread."""
    raw.close()
    raw.release_conn()


def _json_body(value):
    return json.dumps(value, allow_nan=False).encode()


def _with_query(url, params):
    """`url` with `params` (a dict; a list value repeats its key, None is
    left out) added to its query."""
    pairs = [(key, value) for key, values in params.items()
             for value in (values if isinstance(values, (list, tuple)) else [values]) if value is not None]
    if not pairs:
        return url
    url, hash_, fragment = url.partition("#")
    return url + ("&" if "?" in url else "?") + urlencode(pairs) + hash_ + fragment


def chunks(raw):
    """A urllib3 response's (decoded) body as it arrives: each chunk is
    whatever the socket had, so a caller that checks a clock between chunks
    runs even when the sender drips (a whole-buffer read would wait for
    64 KB). urllib3's errors go to the caller's seam as they are."""
    while True:
        chunk = raw.read1(CHUNK, decode_content=True)
        if not chunk:
            return
        yield chunk


def read_capped(raw, limit, within_s=None, url=""):
    """The whole body of the answer from `url`, or InvalidResult past
    `limit` bytes; ReadTimeoutError when it takes longer than `within_s` in
    all (a per-read timeout alone lets a sender dripping a byte at a time
    hold the thread forever)."""
    length = raw.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > limit:
        raise InvalidResult(f"{_where(url)}: the answer is {length} bytes, over max_answer_bytes ({limit})")
    end = None if within_s is None else time.monotonic() + within_s
    body = bytearray()
    for chunk in chunks(raw):
        body += chunk
        if len(body) > limit:
            raise InvalidResult(f"{_where(url)}: the answer is over max_answer_bytes ({limit} bytes)")
        if end is not None and time.monotonic() > end:
            where = _where(url)
            raise ReadTimeoutError(None, where, f"{where}: the answer took over {within_s:g}s")
    return bytes(body)


# A string, or an unterminated one up to the end: every quote starts a match
# that cannot fail, so the scan stays linear whatever the input.
_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.S)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


def parse_json(data, what, max_depth=MAX_DEPTH):
    """JSON text or bytes -> a value. ValueError when it is not JSON;
    InvalidResult when it nests deeper than `max_depth` (the parser would
    otherwise recurse until RecursionError)."""
    if isinstance(data, (bytes, bytearray)):
        data = bytes(data).decode(json.detect_encoding(data))   # UnicodeDecodeError is a ValueError
    depth = json_depth(data)
    if depth > max_depth:
        raise InvalidResult(f"{what}: the answer nests {depth} levels deep, over the limit of {max_depth}")
    try:
        return json.loads(data)
    except RecursionError:
        raise InvalidResult(f"{what}: the answer nests too deep to parse") from None


def json_depth(text):
    """The deepest nesting of brackets outside strings: exact for valid
    JSON, never less than the parser would recurse for invalid JSON."""
    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub("", text))
    if not brackets:
        return 0
    steps = (1 if c in "[{" else -1 for c in brackets)
    return max(accumulate(steps))


def _host_port(url):
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return (parts.hostname or "").lower().rstrip("."), port


def _where(url):
    parts = urlsplit(url or "")
    return f"{parts.hostname}{parts.path}"
