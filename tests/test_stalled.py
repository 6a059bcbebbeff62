"""A provider that stops answering holds a worker thread for its timeout_s
at every call. With a backlog of its tasks it would hold every thread, and
another provider's tasks would wait behind them: the worker gives a
stalled provider at most half its threads until it answers again. On a real
worker with its threads, against a real socket that accepts and never
answers, and the fake KIE."""

import socket
import threading
import time

from providers import build_providers
from store import TERMINAL
from support import wait_for
from tests.fakes.kie import FakeKIE
from worker import Worker

KEY_ENV = {"KIE_TEST_KEY": "test-key"}


class Silent:
    """Accepts connections and never answers; counts them. With `answer`
    set, answers each new one with it instead (a KIE createTask's JSON)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=200)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = []
        self.answer = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self):
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)
            if self.answer is not None:
                threading.Thread(target=self._answer, args=(conn, self.answer), daemon=True).start()

    @staticmethod
    def _answer(conn, body):
        conn.settimeout(5)
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(65536)
        length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), b"0"))
        rest = len(head) - head.index(b"\r\n\r\n") - 4
        while rest < length:
            rest += len(conn.recv(65536))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        for conn in self.accepted:
            conn.close()
        self.sock.close()


def test_a_stalled_provider_gets_one_step_at_a_time_and_the_others_run(sqlite_store, files):
    """80 tasks for a provider that never answers (timeout_s 1), then 3
    for one that does: those 3 finish within a few seconds, while the
    silent one is asked on 2 threads at most. Without the limit, its 80 held
    all 4 threads for 20 s, and the silent server saw every one of them."""
    with Silent() as silent, FakeKIE(job_seconds=0.1) as kie:
        providers = build_providers({
            "silent": {"type": "kie", "url": silent.url, "api_key_env": "KIE_TEST_KEY", "timeout_s": 1,
                       "poll_interval_s": 0.1},
            "kie": {"type": "kie", "url": kie.url, "api_key_env": "KIE_TEST_KEY", "timeout_s": 5,
                    "poll_interval_s": 0.05, "max_poll_interval_s": 0.1}}, env=KEY_ENV)
        worker = Worker(sqlite_store, providers, files, threads=4, tick_s=0.05)
        user = sqlite_store.create_user("u", max_active=1000)[0]
        now = time.time()
        stuck = [sqlite_store.submit(user["id"], "silent", {"model": "m", "input": {"i": i}}, now=now,
                                     deadline_at=now + 600)[0]["id"] for i in range(80)]
        worker.start()
        try:
            # The first claim hands it up to 4 threads; once the first call
            # times out, it is stalled.
            wait_for(lambda: providers["silent"].stalled, 10, "the silent provider to stall")
            started = time.time()
            others = [sqlite_store.submit(user["id"], "kie", {"model": "m", "input": {"i": i}}, now=started,
                                          deadline_at=started + 600)[0]["id"] for i in range(3)]
            done = wait_for(lambda: (ts := [sqlite_store.get_task(i) for i in others])
                            and all(t["status"] in TERMINAL for t in ts) and ts, 30, "the other provider's tasks")
            took = time.time() - started
            asked = len(silent.accepted)
            left = sum(sqlite_store.get_task(i)["status"] not in TERMINAL for i in stuck)
            print(f"other provider done in {took:.2f} s; the silent one asked {asked} times; {left} left")
        finally:
            worker.stop(wait=False)
    assert [t["status"] for t in done] == ["succeeded"] * 3
    assert len(kie.created) == 3
    # A thread comes free within one timeout_s of the stall; then the
    # three take a few polls.
    assert took < 6.0, f"the other provider's tasks took {took:.1f} s"
    # Up to 4 at once before the stall, then 2 at a time, each for 1 s.
    assert asked <= 4 + 2 * (took + 1) + 2, f"the silent provider was asked {asked} times in {took:.1f} s"
    assert left >= 70, f"only {left} of the silent provider's tasks still wait"


def test_a_stalled_provider_is_one_that_did_not_answer_and_any_answer_clears_it():
    with Silent() as silent:
        providers = build_providers({"p": {"type": "kie", "url": silent.url, "api_key_env": "KIE_TEST_KEY",
                                           "timeout_s": 0.5}}, env=KEY_ENV)
        p = providers["p"]
        assert p.stalled is False
        task = {"id": "t1", "provider": "p", "params": {"model": "m", "input": {}}, "external_id": None,
                "state": {}, "attempts": 1}
        try:
            p.submit(task, time.time())
        except Exception as exc:
            assert "no answer within" in str(exc), exc
        else:
            raise AssertionError("a silent provider answered")
        assert p.stalled is True
        silent.answer = b'{"code": 200, "msg": "success", "data": {"taskId": "job-1"}}'
        assert p.submit(task, time.time()) == "job-1"
        assert p.stalled is False and len(silent.accepted) == 2


def test_a_claim_passes_over_the_providers_it_is_told_to_skip(store):
    now = time.time()
    user = store.create_user("u")[0]
    # a's the longest due, then b's, then c's.
    ids = {p: [store.submit(user["id"], p, {}, now=now + n + i * 0.01, deadline_at=now + 600)[0]["id"]
               for i in range(3)] for n, p in enumerate(("a", "b", "c"))}
    for fresh_first in (False, True):
        got = store.claim("w", now=now + 3, limit=10, lease_s=-1.0, fresh_first=fresh_first, skip=("a", "c"))
        assert sorted(t["id"] for t in got) == sorted(ids["b"]), fresh_first
    # Passed over, they stay due: the next claim without a skip takes them.
    got = store.claim("w", now=now + 3, limit=10, lease_s=60)
    assert sorted(t["id"] for t in got) == sorted(ids["a"] + ids["b"] + ids["c"])
    # The claim a releasing write makes skips them too.
    store.claim_on_release("w2", lease_s=60, clock=lambda: now + 70, skip=("a",))
    first = next(t for t in got if t["id"] == ids["a"][0])
    store.reschedule(first["id"], token=first["lease_token"], next_poll_at=now + 2, polls=0)
    rode = store.claimed_on_release()
    assert len(rode) == 1 and rode[0]["id"] == ids["b"][0], rode
