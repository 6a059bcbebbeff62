"""Where holdfast's outbound requests may go, and how much they may read.

A provider is trusted with its own URL and nothing more. Result links come
from the provider's answers, so a compromised or misconfigured provider could
point them at this server's /metrics, at a loopback-only service or at a
cloud's metadata address, and holdfast would fetch that and serve it to the
task's owner. So every connection checks the address it is about to connect
to, after DNS resolution (a name that resolves to 127.0.0.1 is 127.0.0.1),
in the connection itself: a redirect hop is a new connection and is checked
the same way, and a DNS answer that changes between a check and the connect
cannot slip through, because there is no gap between the two.

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

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (ConnectTimeoutError, DecodeError, NameResolutionError, NewConnectionError,
                                ProtocolError, ReadTimeoutError, SSLError)
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


class GuardedAdapter(HTTPAdapter):
    """requests' adapter with the address policy on every connection, and
    answers (responses not asked for as streams) read with a byte limit and
    a total time."""

    def __init__(self, policy, max_answer_bytes, **kwargs):
        self.policy = policy
        self.max_answer_bytes = max_answer_bytes
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(self.policy.pool_classes)

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        # A proxy resolves and connects on its own, out of the policy's
        # reach; sessions here set trust_env = False, so this is a guard.
        raise InvalidResult(f"refused to send a request through the proxy {proxy}")

    def send(self, request, stream=False, timeout=None, **kwargs):
        resp = super().send(request, stream=True, timeout=timeout, **kwargs)
        if stream:
            return resp
        read_timeout = timeout[1] if isinstance(timeout, tuple) else timeout
        within = ANSWER_TIME_FACTOR * read_timeout if read_timeout else None
        try:
            resp._content = read_capped(resp, self.max_answer_bytes, within_s=within)
        except BaseException:
            resp.close()
            raise
        resp._content_consumed = True
        return resp


class _Session(requests.Session):
    def resolve_redirects(self, *args, **kwargs):
        # A redirect loop answers the same at every try: the provider's
        # fault, not a reason to try again until the deadline.
        try:
            yield from super().resolve_redirects(*args, **kwargs)
        except requests.TooManyRedirects as exc:
            raise InvalidResult(f"more than {self.max_redirects} redirects ({exc.request.url})") from None


def session_for(policy, max_answer_bytes):
    session = _Session()
    # Environment proxies would connect for us, out of the policy's reach.
    session.trust_env = False
    session.max_redirects = MAX_REDIRECTS
    adapter = GuardedAdapter(policy, max_answer_bytes)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def chunks(resp):
    """The response's (decoded) body as it arrives: each chunk is whatever
    the socket had, so a caller that checks a clock between chunks runs even
    when the sender drips (a whole-buffer read would wait for 64 KB).
    urllib3's errors become requests' ones, as iter_content does."""
    raw = resp.raw
    while True:
        try:
            chunk = raw.read1(CHUNK, decode_content=True)
        except ProtocolError as exc:
            raise requests.exceptions.ChunkedEncodingError(exc) from None
        except DecodeError as exc:
            raise requests.exceptions.ContentDecodingError(exc) from None
        except ReadTimeoutError as exc:
            raise requests.exceptions.ConnectionError(exc) from None
        except SSLError as exc:
            raise requests.exceptions.SSLError(exc) from None
        if not chunk:
            return
        yield chunk


def read_capped(resp, limit, within_s=None):
    """The whole body, or InvalidResult past `limit` bytes; ReadTimeout when
    it takes longer than `within_s` in all (a per-read timeout alone lets a
    sender dripping a byte at a time hold the thread forever)."""
    length = resp.headers.get("Content-Length", "")
    where = _where(resp)
    if length.isdigit() and int(length) > limit:
        raise InvalidResult(f"{where}: the answer is {length} bytes, over max_answer_bytes ({limit})")
    end = None if within_s is None else time.monotonic() + within_s
    body = bytearray()
    for chunk in chunks(resp):
        body += chunk
        if len(body) > limit:
            raise InvalidResult(f"{where}: the answer is over max_answer_bytes ({limit} bytes)")
        if end is not None and time.monotonic() > end:
            raise requests.exceptions.ReadTimeout(f"{where}: the answer took over {within_s:g}s")
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
    parts = requests.utils.urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return (parts.hostname or "").lower().rstrip("."), port


def _where(resp):
    parts = requests.utils.urlparse(resp.url or "")
    return f"{parts.hostname}{parts.path}"
