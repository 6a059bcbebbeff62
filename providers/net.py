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

import functools
import http.client
import ipaddress
import json
import re
import select
import socket
import ssl
import time
import zlib
from collections import OrderedDict
from itertools import accumulate
from urllib.parse import quote, urlencode, urljoin, urlsplit

import certifi

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

    def checks(self, host, port):
        return not self.allow_private and (host.lower().rstrip("."), port) != self.own

    def connect(self, host, port, timeout):
        """A socket connected to `host`:`port`, at an address the policy
        allows: resolved here and connected to by address, never by name
        again (a second resolution could answer differently: DNS
        rebinding). NotConnected when no connection opened; InvalidResult
        when the policy refuses every address."""
        if not self.checks(host, port):
            try:
                return socket.create_connection((host, port), timeout)
            except OSError as exc:
                raise NotConnected(host, port, exc) from None
        try:
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except OSError as exc:
            raise NotConnected(host, port, exc) from None
        allowed, refused = [], []
        for info in infos:
            ip = info[4][0]
            why = refusal(ip)
            (refused if why else allowed).append((info, why))
        if not allowed:
            (info, why) = refused[0]
            raise InvalidResult(f"refused to connect to {host}:{port}: it resolves to {info[4][0]}, "
                                f"{why} (set allow_private_results = true for a provider whose results "
                                "live on a private network)")
        last = None
        for (family, kind, proto, _, addr), _ in allowed:
            sock = socket.socket(family, kind, proto)
            sock.settimeout(timeout)
            try:
                sock.connect(addr)
                return sock
            except OSError as exc:
                sock.close()
                last = NotConnected(host, port, exc, addr[0])
        raise last


class NotConnected(Exception):
    """The connection never opened (refused, unreachable, DNS, connect
    timeout): not a byte of the request went out."""

    def __init__(self, host, port, cause, ip=None):
        self.timed_out = isinstance(cause, TimeoutError)
        at = f"{host}:{port}" + (f" ({ip})" if ip else "")
        super().__init__(f"{at}: {'connect timed out' if self.timed_out else cause}")


class AnswerTimeout(Exception):
    """The request went out and no answer came in time."""


class BadURL(Exception):
    """A URL no request can be made to: not http(s), no host, a bad port."""


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
    """HTTP for one thread of one provider, on http.client: a keep-alive
    connection per host, opened through the address policy, answers read
    with a byte limit and a total time, redirects followed here so every
    hop is checked. (A general client's per-call machinery, urllib3's
    pool manager and URL normalising, or requests' settings merged into
    every request, cost more CPU than the request itself: a poll is what
    holdfast does most.)

    Nothing here sends a request twice: whether a failed one may be
    repeated is the caller's decision, as it depends on whether it was
    sent (providers/http.py, guarantee 5). Errors: NotConnected (not
    sent), AnswerTimeout, OSError and http.client.HTTPException (sent,
    the answer is missing or broken), BadURL, InvalidResult."""

    MAX_HOSTS = 10          # hosts with an idle connection kept; the least recently used goes first

    def __init__(self, policy, max_answer_bytes):
        self.policy = policy
        self.max_answer_bytes = max_answer_bytes
        self._idle = OrderedDict()      # (scheme, host, port) -> an idle keep-alive connection

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
        seen = set()
        for _ in range(MAX_REDIRECTS + 1):
            headers = {**BASE_HEADERS, **headers_for(url)}
            if content_type is not None:
                headers["Content-Type"] = content_type
            raw = self._send(method, url, body, headers, timeout_s)
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

    def _send(self, method, url, body, headers, timeout_s):
        key, target = _target(url)
        conn = self._idle.pop(key, None)
        if conn is not None and _dropped(conn):
            conn.close()
            conn = None
        if conn is None:
            conn = _Connection(self.policy, key, timeout_s)
        elif conn.timeout != timeout_s:
            # Only when it changes: each settimeout is a system call, and
            # a handover of the GIL, on every request.
            conn.sock.settimeout(timeout_s)
            conn.timeout = timeout_s
        try:
            conn.request(method, target, body=body, headers=headers)
            resp = conn.getresponse()
        except TimeoutError:
            conn.close()
            raise AnswerTimeout(f"{_where(url)}: no answer within {timeout_s:g}s") from None
        except BaseException:
            conn.close()
            raise
        return Response(self, key, conn, resp)

    def _answer(self, raw, url, stream, timeout_s):
        if stream:
            return Answer(raw)
        try:
            content = read_capped(raw, self.max_answer_bytes, within_s=ANSWER_TIME_FACTOR * timeout_s, url=url)
        finally:
            _discard(raw)       # read to its end, its connection waits for the next request; else closed
        return Answer(raw, content)

    def _keep(self, key, conn):
        old = self._idle.pop(key, None)
        if old is not None:
            old.close()
        self._idle[key] = conn
        while len(self._idle) > self.MAX_HOSTS:
            self._idle.popitem(last=False)[1].close()

    def close(self):
        while self._idle:
            self._idle.popitem()[1].close()


@functools.lru_cache(maxsize=1)
def _tls_context():
    """HTTPS is verified against the name in the URL, not the address
    connected to, with certifi's CA certificates (a system without a
    store of its own still verifies)."""
    return ssl.create_default_context(cafile=certifi.where())


# An answer's header section, as http.client bounds it.
MAX_HEADER_LINE = 65536
MAX_HEADERS = 100


class Headers:
    """An answer's header fields: `get(name, default)` in any case, the
    first of a field sent twice (as http.client's message gives it),
    `get_all(name)`, `items()` as sent."""

    __slots__ = ("_fields", "_first")

    def __init__(self, fields):
        self._fields = fields
        self._first = {}
        for name, value in fields:
            self._first.setdefault(name.lower(), value)

    def get(self, name, default=None):
        return self._first.get(name.lower(), default)

    def get_all(self, name, failobj=None):     # http.client's getheader()
        name = name.lower()
        return [v for n, v in self._fields if n.lower() == name] or failobj

    def items(self):                            # http.client's getheaders()
        return list(self._fields)


def content_length(headers):
    """An answer's Content-Length as a number, or None when it has none
    that is one ("-5", "12abc", and "\u00b2", a digit to str.isdigit())."""
    length = headers.get("Content-Length") or ""
    return int(length) if length.isascii() and length.isdigit() else None


def _read_header_fields(fp):
    """The header fields up to the blank line, within MAX_HEADERS lines of
    MAX_HEADER_LINE bytes. A line that starts with a space or tab continues
    the field before it (obsolete folding); a line with no colon is skipped."""
    fields = []
    for _ in range(MAX_HEADERS + 1):
        line = fp.readline(MAX_HEADER_LINE + 1)
        if len(line) > MAX_HEADER_LINE:
            raise http.client.LineTooLong("header line")
        if line in (b"\r\n", b"\n", b""):
            return fields
        text = line.decode("iso-8859-1").rstrip("\r\n")
        if text[0] in " \t":
            if fields:
                name, value = fields[-1]
                fields[-1] = (name, value + " " + text.strip(" \t"))
            continue
        name, colon, value = text.partition(":")
        if colon:
            fields.append((name, value.strip(" \t")))
    raise http.client.HTTPException(f"got more than {MAX_HEADERS} headers")


class _Answer(http.client.HTTPResponse):
    """http.client's response, its header section read into Headers: the
    standard library parses it as an e-mail message, which cost more CPU
    than the rest of a small answer's reading (a poll's answer)."""

    def begin(self):
        if self.headers is not None:
            return
        while True:     # past any 100 Continue
            version, status, reason = self._read_status()
            if status != http.client.CONTINUE:
                break
            _read_header_fields(self.fp)
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = Headers(_read_header_fields(self.fp))
        self.chunked = (self.headers.get("transfer-encoding") or "").lower() == "chunked"
        self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None if self.chunked else content_length(self.headers)
        if status in (http.client.NO_CONTENT, http.client.NOT_MODIFIED) or 100 <= status < 200 \
                or self._method == "HEAD":
            self.length = 0
        # Neither chunked nor of a known length: the body ends when the
        # server closes the connection.
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True


class _Connection(http.client.HTTPConnection):
    """http.client's connection (HTTPS too), opened through the policy."""

    response_class = _Answer

    def __init__(self, policy, key, timeout_s):
        scheme, host, port = key
        super().__init__(host, port, timeout=timeout_s)
        self.policy, self.https = policy, scheme == "https"

    def connect(self):
        sock = self.policy.connect(self.host, self.port, self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.https:
            try:
                sock = _tls_context().wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
        self.sock = sock

    def _send_output(self, message_body=None, encode_chunked=False):
        # A body in bytes goes out with the head, in one send: http.client
        # sends them apart, two system calls (each a handover of the GIL,
        # and a poll before it, the socket having a timeout) and two packets.
        if isinstance(message_body, bytes) and not encode_chunked:
            self._buffer.extend((b"", message_body))
            message = b"\r\n".join(self._buffer)
            del self._buffer[:]
            return self.send(message)
        return super()._send_output(message_body, encode_chunked)


def _target(url):
    """((scheme, host, port), the request target) of an http(s) URL; BadURL
    for any other. The target's characters outside URL syntax are
    percent-encoded, as a browser sends them."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise BadURL(f"{url[:200]!r}: {exc}") from None
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise BadURL(f"{url[:200]!r} is not an http(s) URL with a host")
    path, query = parts.path or "/", parts.query
    target = f"{path}?{query}" if query else path
    if not _TARGET_AS_SENT.match(target):
        path, query = quote(path, safe=_PATH_SAFE), quote(query, safe=_PATH_SAFE + "?")
        target = f"{path}?{query}" if query else path
    return (parts.scheme, host, port or (443 if parts.scheme == "https" else 80)), target


# What quote() leaves as it is, in a path (and, with "?", a query): a
# target made of these alone is sent as written, without quoting it.
_PATH_SAFE = "/%!$&'()*+,;=:@~"
_TARGET_AS_SENT = re.compile(r"[A-Za-z0-9_.\-/%!$&'()*+,;=:@~?]*\Z")


def _dropped(conn):
    """Whether an idle keep-alive connection was closed by its server (it
    reads as ready: an end of file, or bytes nobody asked for)."""
    if conn.sock is None:
        return True
    poller = select.poll()      # not select(): it fails on descriptors past 1023
    try:
        poller.register(conn.sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class Response:
    """An answer being read: `status`, `headers` (any case), `read1(n)`
    of its decoded body. Closed by _discard: a body read to its end gives
    its connection back for the next request; any other closes it."""

    def __init__(self, client, key, conn, resp):
        self.client, self.key, self.conn, self.resp = client, key, conn, resp
        self.status, self.headers = resp.status, resp.headers
        encoding = (resp.headers.get("Content-Encoding") or "").strip().lower()
        # gzip and deflate (asked for in BASE_HEADERS); wbits 32+ reads
        # either header, zlib's or gzip's.
        self.decoder = zlib.decompressobj(32 + zlib.MAX_WBITS) if encoding in ("gzip", "deflate") else None
        self.ended = self.flushed = self.fed = self.closed = False

    def read1(self, n=CHUNK):
        """Up to about n bytes of the decoded body, as they arrive; b"" at
        its end only. A decoded chunk never passes n bytes, however
        compressed the answer (a small gzip can hold gigabytes)."""
        decoder = self.decoder
        while True:
            if decoder is not None and decoder.unconsumed_tail:
                out = decoder.decompress(decoder.unconsumed_tail, n)
            elif self.ended:
                if decoder is None or self.flushed or not self.fed:
                    return b""
                self.flushed = True
                if not decoder.eof:
                    raise ValueError("the compressed answer ends before its end")
                return decoder.flush()
            else:
                try:
                    data = self.resp.read1(n) if self.resp.length != 0 else b""
                except TimeoutError:
                    raise AnswerTimeout(f"the answer stopped for over {self.conn.timeout:g}s") from None
                if not data:
                    if self.resp.length:    # the connection ended before the bytes it promised
                        raise http.client.IncompleteRead(b"", self.resp.length)
                    self.resp.read()        # http.client marks a body read to its end as such only here
                    self.ended = True
                    continue
                if decoder is None:
                    return data
                self.fed = True
                try:
                    out = decoder.decompress(data, n)
                except zlib.error as exc:
                    raise ValueError(f"the compressed answer cannot be read: {exc}") from None
            if out:
                return out

    def close(self):
        if self.closed:
            return
        self.closed = True
        if self.ended and self.resp.isclosed() and not self.resp.will_close and self.conn.sock is not None:
            self.client._keep(self.key, self.conn)
        else:
            self.resp.close()
            self.conn.close()


def _discard(raw):
    """Done with an answer: one read to its end gives its connection back,
    one not read to its end is closed, never reused with bytes unread."""
    raw.close()


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
    """A Response's (decoded) body as it arrives: each chunk is whatever
    the socket had, so a caller that checks a clock between chunks runs
    even when the sender drips (a whole-buffer read would wait for 64 KB).
    Errors go to the caller's seam as they are."""
    while True:
        chunk = raw.read1(CHUNK)
        if not chunk:
            return
        yield chunk


def read_capped(raw, limit, within_s=None, url=""):
    """The whole body of the answer from `url`, or InvalidResult past
    `limit` bytes; AnswerTimeout when it takes longer than `within_s` in
    all (a per-read timeout alone lets a sender dripping a byte at a time
    hold the thread forever)."""
    length = content_length(raw.headers)
    if length is not None and length > limit:
        raise InvalidResult(f"{_where(url)}: the answer is {length} bytes, over max_answer_bytes ({limit})")
    end = None if within_s is None else time.monotonic() + within_s
    body = bytearray()
    for chunk in chunks(raw):
        body += chunk
        if len(body) > limit:
            raise InvalidResult(f"{_where(url)}: the answer is over max_answer_bytes ({limit} bytes)")
        if end is not None and time.monotonic() > end:
            where = _where(url)
            raise AnswerTimeout(f"{where}: the answer took over {within_s:g}s")
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
    # No deeper than it has brackets that open: most answers are passed
    # without scanning them for strings.
    if data.count("{") + data.count("[") > max_depth:
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
