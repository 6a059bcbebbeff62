"""Clients that connect and never finish a request cannot hold the server:
a real `python app.py`, half-open connections from another loopback
address (127.0.0.2) dripping header lines, and /healthz from 127.0.0.1."""

import resource
import socket
import time

import pytest
import requests

from support import ServerProcess

ATTACKER = "127.0.0.2"


def half_open(port, host=ATTACKER):
    """A connection that starts a request and never ends its headers."""
    sock = socket.socket()
    sock.bind((host, 0))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return sock


def drip(sock):
    """One more header line; False once the server has closed it."""
    try:
        sock.sendall(b"X-Drip: 1\r\n")
        return True
    except OSError:
        return False


def closed_by_server(sock, timeout):
    """True when the server closes the connection within `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except socket.timeout:
        return False
    except OSError:
        return True


def healthz_seconds(server):
    t0 = time.perf_counter()
    res = requests.get(server.url + "/healthz", timeout=5)
    assert res.status_code == 200, res.text
    return time.perf_counter() - t0


@pytest.fixture
def many_fds():
    """1,000 client sockets here, 1,000 channels in the server (which inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < 2500:
        pytest.skip(f"needs about 2,500 file descriptors; the hard limit is {hard}")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_request_dripped_slower_than_the_request_timeout_is_closed(tmp_path):
    with ServerProcess(tmp_path, env={"HOLDFAST_REQUEST_TIMEOUT_S": "2"}) as server:
        dripping = half_open(server.port)
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        body = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        body.sendall(b"POST /api/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        try:
            # A header line every 0.5 s keeps waitress's idle timeout (60 s) away
            # for ever; the request timeout counts from the request's start.
            t0 = time.monotonic()
            while time.monotonic() - t0 < 15 and drip(dripping):
                try:
                    body.send(b" ")
                except OSError:
                    pass        # closed already: it started after `dripping` but shares its pass
                time.sleep(0.5)
            held = time.monotonic() - t0
            assert held < 15, "a dripping client held its connection for 15 s"
            assert held > 1.5, f"closed after {held:.1f}s, before the 2 s timeout"
            assert closed_by_server(body, 5), "a dripped body was not cut off"
            assert closed_by_server(silent, 5), "a connection that never sent a request stayed open"
            # An ordinary request on a fresh connection still works.
            assert healthz_seconds(server) < 1
        finally:
            for s in (dripping, silent, body):
                s.close()


def test_past_the_per_address_cap_a_connection_is_refused_at_once_and_others_still_connect(tmp_path):
    with ServerProcess(tmp_path, env={"HOLDFAST_MAX_CONNECTIONS_PER_ADDRESS": "5"}) as server:
        held = [half_open(server.port) for _ in range(5)]
        extra = socket.socket()
        extra.bind((ATTACKER, 0))
        extra.settimeout(5)
        try:
            extra.connect(("127.0.0.1", server.port))
            reply = b""
            try:
                while chunk := extra.recv(4096):
                    reply += chunk
            except ConnectionResetError:
                pass
            # Closed, with an answer that says why when the client reads it in time.
            assert reply == b"" or reply.startswith(b"HTTP/1.1 429"), reply
            assert all(drip(s) for s in held), "the cap closed connections it had already let in"
            # Another address is not counted against this one's cap.
            assert healthz_seconds(server) < 1
        finally:
            extra.close()
            for s in held:
                s.close()
        # Once they close, the address may connect again.
        deadline = time.time() + 10
        while True:
            again = half_open(server.port)
            try:
                if not closed_by_server(again, 0.5):
                    break
            finally:
                again.close()
            assert time.time() < deadline, "the address stayed refused after its connections closed"


def test_a_thousand_half_open_connections_from_one_address_leave_healthz_answering_within_1s(
        tmp_path, many_fds):
    n = 1000
    with ServerProcess(tmp_path) as server:
        baseline = sorted(healthz_seconds(server) for _ in range(5))
        socks = []
        try:
            for _ in range(n):
                try:
                    socks.append(half_open(server.port))
                except OSError:
                    # Refused (or reset while the backlog was full): the attacker
                    # keeps trying below.
                    pass
            timings = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                # A slowloris client keeps a header line going on each
                # connection and opens a new one for each that was closed.
                alive = [s for s in socks if drip(s)]
                for s in socks:
                    if s not in alive:
                        s.close()
                socks = alive
                while len(socks) < n:
                    try:
                        socks.append(half_open(server.port))
                    except OSError:
                        break
                for _ in range(3):
                    try:
                        timings.append(healthz_seconds(server))
                    except requests.RequestException as exc:
                        timings.append(float("inf"))
                        print(f"healthz failed: {exc}")
                    time.sleep(0.3)
            timings.sort()
            print(f"healthz with {n} half-open connections from {ATTACKER}: "
                  f"baseline median {baseline[2] * 1000:.1f} ms; "
                  f"median {timings[len(timings) // 2] * 1000:.1f} ms, max {timings[-1] * 1000:.1f} ms "
                  f"over {len(timings)} requests; {len(socks)} attacker sockets open at the end")
            assert timings[-1] < 1.0, f"slowest /healthz took {timings[-1]:.3f}s"
        finally:
            for s in socks:
                s.close()
