"""holdfast's waitress server, bounded against clients that hold connections
without finishing a request.

waitress closes a channel only when it has been idle for `channel_timeout`,
so a client that sends one header line every few seconds keeps its
connection for ever, and `connection_limit` of them stop the server from
accepting anyone else (about 330 did it with the old settings). Two bounds
here end that:

- a request's headers and body must arrive within `request_timeout_s`,
  counted from the connection (for its first request) or from the first byte
  of the request; the maintenance pass closes channels past it;
- one client address holds at most `max_per_address` connections; past it a
  new connection gets a 429 and is closed at once, so one address can never
  fill `connection_limit`.
"""

import json
import logging
import resource
import threading
import time
from collections import Counter, deque

from waitress.adjustments import Adjustments
from waitress.server import MultiSocketServer, TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher, WSGITask

log = logging.getLogger("holdfast.http")

_REFUSAL = json.dumps({"error": {"code": "too_many_connections",
                                 "message": "too many open connections from this address"}}).encode()
_REFUSAL = (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(_REFUSAL), _REFUSAL))
_FD_MARGIN = 256    # database files, provider sockets, result files beside the channels
# A body this long or shorter goes out in one send with its answer's head;
# a longer one is not copied for it.
_JOIN_MAX = 64 * 1024


class QuietLoop:
    """A waitress channel (mixed in before HTTPChannel) whose main loop
    does not spin while a request's thread holds the answer.

    That thread appends its answer to the output and sends it itself; the
    main loop cannot take the output meanwhile (its handle_write tries the
    lock and returns). Said writable, the socket woke poll() again at once,
    and the loop spun dozens of turns a request, each taking the GIL from
    the threads at work: a bare request cost three times the CPU. So the
    channel is not writable then, and the thread wakes the loop itself
    when it lets go with bytes unsent, as at the end of every request.
    Past the high watermark waitress waits for the loop in its own way:
    left as it was."""

    def writable(self):
        if self.requests and self.total_outbufs_len <= self.adj.outbuf_high_watermark:
            if not self.outbuf_lock.acquire(False):
                return False
            self.outbuf_lock.release()
        return super().writable()

    head = None     # OneSend's head, waiting for the body's first bytes

    def write_soon(self, data):
        if self.head is not None and data:
            data, self.head = self.head + data, None
        sent = super().write_soon(data)
        # waitress woke the loop while still holding the output: now that
        # it is free, again, so the loop sends what is left.
        if self.total_outbufs_len and self.connected:
            self.server.pull_trigger()
        return sent


class OneSend(WSGITask):
    """A waitress task whose answer's head goes out with the first bytes of
    its body, in one send. waitress sends them apart: two system calls and
    two packets for every small answer, and a client that wakes for each.
    An answer without a body, a file, or a first chunk past _JOIN_MAX goes
    out as waitress sends it."""

    def write(self, data):
        if (self.wrote_header or not self.complete or type(data) is not bytes
                or not data or len(data) > _JOIN_MAX):
            return super().write(data)
        channel = self.channel
        channel.head = self.build_response_header()
        self.wrote_header = True
        try:
            super().write(data)
        finally:
            # Left when no body was sent (a 204, a 304), or by a failure.
            head, channel.head = channel.head, None
        if head is not None:
            channel.write_soon(head)


class _NewestFirst(deque):
    append = deque.appendleft


class Dispatcher(ThreadedTaskDispatcher):
    """waitress's pool of request threads, the idle ones woken newest first.

    waitress wakes the thread idle longest, so a steady load goes round
    every one of holdfast's threads in turn (8, and 200 more for event
    streams), each taking up a stack and objects gone cold; on one CPU
    (cpu.py) they all share its caches. Woken newest first, the few threads
    the load needs take every request and the rest stay asleep; requests
    still run in the order they came. Measured in BENCHMARKS.md's
    http_bench section."""

    def __init__(self):
        super().__init__()
        # CPython's Condition: wait() appends its waiter to _waiters, and
        # notify() wakes them from the left. tests/test_server_loop.py
        # checks that the newest idle thread is the one woken.
        self.queue_cv._waiters = _NewestFirst()


def guarded_channel(base):
    """`base` (a waitress HTTPChannel class) that remembers when its current,
    unfinished request began, gives its address's place back on close,
    keeps the main loop from spinning (QuietLoop) and sends an answer's
    head with its body (OneSend)."""

    class GuardedChannel(QuietLoop, base):
        counted_host = None
        if base.task_class is WSGITask:
            task_class = OneSend

        def __init__(self, server, sock, addr, adj, map=None):
            super().__init__(server, sock, addr, adj, map)
            # A connection that never sends anything is a request that never arrives.
            self.request_started = self.creation_time

        def received(self, data):
            before = self.request
            result = super().received(data)
            if self.request is None:
                self.request_started = None
            elif before is not None and self.request is not before:
                self.request_started = time.time()      # the next one, pipelined behind a finished one
            elif self.request_started is None:
                self.request_started = time.time()
            return result

        def del_channel(self, map=None):
            super().del_channel(map)
            # close() may come from a task thread too (a failed send), and twice.
            self.server.release(self)

    return GuardedChannel


class GuardedServer(TcpWSGIServer):
    request_timeout_s = 20.0
    max_per_address = 256

    def __init__(self, *args, **kw):
        self._hosts = Counter()
        self._hosts_lock = threading.Lock()
        self._tally = {"refused": 0, "timed_out": 0}
        self._tally_logged = time.monotonic()
        super().__init__(*args, **kw)

    def handle_accept(self):
        # Up to a batch per wake-up: each pass of the main loop asks every
        # channel whether it is readable, so one accept a pass makes a crowd
        # of refused connections cost every other client a long wait.
        for _ in range(64):
            if len(self._map) >= self.adj.connection_limit or not self._accept_one():
                return

    def _accept_one(self):
        try:
            pair = self.accept()
            if pair is None:
                return False
            conn, addr = pair
            self.set_socket_options(conn)
        except OSError:
            # As waitress does: a socket gone before it was accepted, or out
            # of descriptors (connection_limit stays below the limit for that).
            if self.adj.log_socket_errors:
                self.logger.warning("server accept() threw an exception", exc_info=True)
            return False
        addr = self.fix_addr(addr)
        host = addr[0]
        with self._hosts_lock:
            full = self._hosts[host] >= self.max_per_address
            if not full:
                self._hosts[host] += 1
        if full:
            self._refuse(conn)
            return True
        try:
            channel = self.channel_class(self, conn, addr, self.adj, map=self._map)
        except BaseException:
            with self._hosts_lock:
                self._release_host(host)
            raise
        channel.counted_host = host
        return True

    def _refuse(self, conn):
        # Accepted only to be closed: left in the backlog it would hold the
        # place of a client from another address.
        try:
            conn.setblocking(False)
            conn.send(_REFUSAL)
        except OSError:
            pass
        conn.close()
        self._tally["refused"] += 1

    def release(self, channel):
        with self._hosts_lock:
            host, channel.counted_host = channel.counted_host, None
            if host is not None:
                self._release_host(host)

    def _release_host(self, host):
        self._hosts[host] -= 1
        if self._hosts[host] <= 0:
            del self._hosts[host]

    def maintenance(self, now):
        super().maintenance(now)
        cutoff = now - self.request_timeout_s
        for channel in list(self.active_channels.values()):
            started = getattr(channel, "request_started", None)
            if started is not None and started < cutoff and not channel.will_close:
                # The main loop closes it at its next pass (writable() sees will_close).
                channel.will_close = True
                self._tally["timed_out"] += 1
        if time.monotonic() - self._tally_logged >= 60:
            self._log_tally()

    def _log_tally(self):
        refused, timed_out = self._tally["refused"], self._tally["timed_out"]
        if refused or timed_out:
            # One line a minute, however many: under attack a line each would flood the log.
            log.warning("in the last minute: %d connections refused past %d per address, "
                        "%d closed for not sending a whole request within %gs",
                        refused, self.max_per_address, timed_out, self.request_timeout_s)
        self._tally = {"refused": 0, "timed_out": 0}
        self._tally_logged = time.monotonic()


def create_server(app, *, channel_class, request_timeout_s, max_per_address, map=None, **adjustments):
    """waitress.create_server's TCP part, with GuardedServer listeners whose
    channels are `channel_class` made guarded. `connection_limit` is lowered
    to what the process's file descriptor limit allows (raised first as far
    as the hard limit lets it)."""
    adjustments["connection_limit"] = _fd_room(adjustments.get("connection_limit", 100))
    # Maintenance is where requests past their time are closed: run it often.
    adjustments.setdefault("cleanup_interval", max(1, min(30, int(request_timeout_s / 4))))
    # select() cannot watch a descriptor numbered 1024 or more.
    adjustments.setdefault("asyncore_use_poll", True)
    adj = Adjustments(**adjustments)
    map = {} if map is None else map
    dispatcher = Dispatcher()
    dispatcher.set_thread_count(adj.threads)
    channel = guarded_channel(channel_class)
    servers = []
    for sockinfo in adj.listen:
        server = GuardedServer(app, map, dispatcher=dispatcher, adj=adj, sockinfo=sockinfo)
        server.channel_class = channel
        server.request_timeout_s = request_timeout_s
        server.max_per_address = max_per_address
        servers.append(server)
    if len(servers) == 1:
        return servers[0]
    return MultiSocketServer(map, adj, [(s.effective_host, s.effective_port) for s in servers],
                             dispatcher, servers[-1].log_info)


def _fd_room(connection_limit):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connection_limit + _FD_MARGIN
    if soft != resource.RLIM_INFINITY and soft < want:
        raised = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < want:
        lowered = max(16, soft - _FD_MARGIN)
        log.warning("the open-file limit is %d: serving at most %d connections, not %d "
                    "(raise `ulimit -n` or lower HOLDFAST_MAX_CONNECTIONS)", soft, lowered, connection_limit)
        return lowered
    return connection_limit
