"""waitress's main loop under holdfast's channel (api/server.py): it does not
spin while a request's thread holds the answer, an answer's head goes out
with its body, the newest idle request thread takes the next request, and
answers of every size still go out whole. A real server in a thread of
this process, on 127.0.0.1."""

import http.client
import socket
import threading
import time
from collections import Counter

import pytest
from waitress import wasyncore
from waitress.channel import HTTPChannel

from api.server import create_server

BIG = 40 * 1024 * 1024      # past waitress's 16 MiB high watermark


def app(environ, start_response):
    if environ["PATH_INFO"] == "/big":
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(BIG))])
        return (bytes([n % 251]) * (1 << 20) for n in range(BIG >> 20))
    if environ["PATH_INFO"] == "/who":
        body = str(threading.get_ident()).encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    if environ["PATH_INFO"] == "/empty":
        start_response("204 No Content", [])
        return []
    if environ["PATH_INFO"] == "/unchanged":     # a body waitress must leave out
        start_response("304 Not Modified", [("ETag", '"1"')])
        return [b"left out"]
    body = environ["PATH_INFO"].encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


@pytest.fixture
def server():
    """The server running, how many turns its main loop made (`turns`), and
    the sizes of the sends its channels tried (`sends`)."""
    srv = create_server(app, host="127.0.0.1", port=0, threads=8, channel_class=HTTPChannel,
                        request_timeout_s=20, max_per_address=100)
    sends = []

    class Counted(srv.channel_class):
        def send(self, data, do_close=True):
            # Counted before it is sent: a client that has read an answer
            # finds its send counted.
            sends.append(len(data))
            return super().send(data, do_close)
    srv.channel_class = Counted
    srv.sends = sends
    turns = [0]
    readable = srv.readable

    def counted():      # the listener is asked once per turn of the loop
        turns[0] += 1
        return readable()
    srv.readable = counted
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    srv.turns = turns
    yield srv
    srv.task_dispatcher.shutdown()
    wasyncore.close_all(srv._map, ignore_all=True)
    thread.join(5)      # the loop sees its map empty at its next turn (1 s at most)
    assert not thread.is_alive()


def test_the_loop_turns_a_few_times_per_request_not_dozens(server):
    clients = 4
    per_client = 250
    bodies = [[] for _ in range(clients)]

    def client(n):
        conn = http.client.HTTPConnection("127.0.0.1", server.effective_port, timeout=10)
        for i in range(per_client):
            conn.request("GET", f"/{n}/{i}")
            res = conn.getresponse()
            bodies[n].append(res.read())
        conn.close()

    before = server.turns[0]
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    turns = server.turns[0] - before
    for n in range(clients):
        assert bodies[n] == [f"/{n}/{i}".encode() for i in range(per_client)]
    # A request needs a turn to be read and one to learn it is done; the
    # loop spun 20 to 100 turns a request before (a bare request cost
    # three times its CPU).
    assert turns < 6 * clients * per_client, turns


def test_an_answer_goes_out_in_one_send_head_and_body(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.effective_port, timeout=10)
    try:
        conn.request("GET", "/x")
        conn.getresponse().read()       # the connection is up and warm
        before = len(server.sends)
        for i in range(50):
            conn.request("GET", f"/one/{i}")
            res = conn.getresponse()
            assert (res.status, res.getheader("Content-Length"), res.read()) == (200, str(len(f"/one/{i}")),
                                                                               f"/one/{i}".encode())
        # waitress sent the head and then the body: two sends an answer.
        assert len(server.sends) - before == 50, server.sends[before:]
        before = len(server.sends)
        conn.request("GET", "/unchanged")       # a body left out: the head alone
        res = conn.getresponse()
        assert (res.status, res.getheader("ETag"), res.read()) == (304, '"1"', b"")
        conn.request("GET", "/empty")           # no body: the head alone
        res = conn.getresponse()
        assert (res.status, res.read()) == (204, b"")
        conn.request("GET", "/after")           # the connection still speaks HTTP
        assert conn.getresponse().read() == b"/after"
        assert len(server.sends) - before == 3, server.sends[before:]
    finally:
        conn.close()


def test_the_newest_idle_request_thread_takes_the_next_request(server):
    pool = server.task_dispatcher

    def all_idle():
        deadline = time.monotonic() + 10
        while pool.active_count:        # a thread counts itself idle as it begins to wait
            assert time.monotonic() < deadline, "a request thread never went back to wait"
            time.sleep(0.001)

    conn = http.client.HTTPConnection("127.0.0.1", server.effective_port, timeout=10)
    try:
        served = []
        for _ in range(40):
            all_idle()      # so the thread that answered the last request is the newest idle one
            conn.request("GET", "/who")
            served.append(conn.getresponse().read())
    finally:
        conn.close()
    # waitress woke the thread idle longest: forty requests went round all
    # eight threads, five each.
    assert len(set(served)) == 1, Counter(served)


def test_a_channel_whose_output_a_request_holds_is_not_writable(server):
    a, b = socket.socketpair()
    try:
        channel = server.channel_class(server, a, ("127.0.0.1", 1), server.adj, map={})
        channel.requests = ["a request in service"]
        channel.write_soon(b"x" * 10)       # sent at once: nothing left
        assert channel.total_outbufs_len == 0 and not channel.writable()
        channel.total_outbufs_len = 10      # as if a send had left bytes
        held, release = threading.Event(), threading.Event()

        def hold():
            with channel.outbuf_lock:
                held.set()
                release.wait(10)
        holder = threading.Thread(target=hold)
        holder.start()
        assert held.wait(10)
        assert not channel.writable()       # the loop could not take the output anyway
        release.set()
        holder.join(10)
        assert channel.writable()           # now it can: left to the loop
        channel.total_outbufs_len = 0
    finally:
        channel.close()
        b.close()


def test_bytes_a_request_leaves_unsent_wake_the_loop_once_the_output_is_free(server):
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    wakes = []
    try:
        channel = server.channel_class(server, a, ("127.0.0.1", 1), server.adj, map={})
        channel.requests = ["a request in service"]
        pull = server.pull_trigger
        server.pull_trigger = lambda: (wakes.append(channel.outbuf_lock._is_owned()), pull())
        channel.write_soon(b"y" * (1 << 20))    # far more than the socket takes while b reads nothing
        assert channel.total_outbufs_len > 0
        # waitress wakes the loop while it holds the output, when the loop
        # cannot take it; holdfast's channel wakes it again once it let go.
        assert wakes and wakes[-1] is False, wakes
    finally:
        server.pull_trigger = pull
        channel.close()
        b.close()


def test_an_answer_past_the_high_watermark_reaches_a_slow_reader_whole(server):
    sock = socket.create_connection(("127.0.0.1", server.effective_port), timeout=10)
    try:
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        time.sleep(1.0)         # the answer piles up in the server's output past the watermark
        data = bytearray()
        deadline = time.monotonic() + 60
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        head, _, rest = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        data += rest
        while len(data) < BIG:
            assert time.monotonic() < deadline, f"{len(data)} of {BIG} bytes after 60 s"
            chunk = sock.recv(1 << 20)
            assert chunk, f"closed after {len(data)} of {BIG} bytes"
            data += chunk
        assert len(data) == BIG
        assert all(data[n << 20] == n % 251 and data[((n + 1) << 20) - 1] == n % 251 for n in range(BIG >> 20))
    finally:
        sock.close()
