"""Accounts: credits reserved on submit, charged once, refunded exactly once;
limits that refuse without creating or reserving anything; the admin API; the
CLI. Driven in-process with a test clock; the crash tests use real threads,
fresh store objects over the same file, and a process killed mid-refund."""

import collections
import os
import random
import subprocess
import sys
import threading

import peewee
import pytest

import api
from api import create_app
from config import Config
from errors import Conflict
from providers import build_providers
from store import MAX_CREDITS, FileStore, SqliteStore
from support import ROOT, WSGIClient
from worker import Worker

COST = 3
DEMO = {"cost": COST, "duration_s": 1.0, "poll_interval_s": 1.0, "max_poll_interval_s": 5.0, "max_wait_s": 30}


class World:
    """A store, the demo provider (costing credits), a worker and the app,
    all on one test clock."""

    def __init__(self, tmp_path, clock, demo=None, **config):
        self.clock = clock
        self.store = SqliteStore(str(tmp_path / "holdfast.db"))
        self.providers = build_providers({"demo": {**DEMO, **(demo or {})}})
        self.files = FileStore(str(tmp_path / "files"))
        self.config = Config(data=str(tmp_path), max_body=64 * 1024, **{"rate_per_s": 1000.0, **config})
        self.worker = Worker(self.store, self.providers, self.files, clock=clock, owner="test:1:w", batch=1000)
        self.app = create_app(self.store, self.providers, self.config, worker=self.worker, files=self.files,
                              clock=clock)
        self.client = WSGIClient(self.app)

    def user(self, name, **kw):
        return self.store.create_user(name, **kw)

    def submit(self, token, params=None, **body):
        return self.client.post("/api/tasks", {"provider": "demo", "params": params or {"prompt": "fox"}, **body},
                                token=token)

    def snapshot(self):
        """Everything a refused request must leave as it was."""
        rows = self.store.export_rows()
        return {"tasks": rows["tasks"], "ledger": rows["ledger"], "users": rows["users"],
                "events": self.store.last_seq()}


@pytest.fixture
def world(tmp_path, clock):
    made = []

    def make(**kw):
        made.append(World(tmp_path / f"w{len(made)}", clock, **kw))
        return made[-1]
    yield make
    for w in made:
        w.store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request, tmp_path):
    """A function opening a new store object over one shared database each
    time it is called: what a second process, or a restart, would see."""
    if request.param == "postgresql":
        from store import PostgresStore
        url = request.getfixturevalue("pg_schema").url
        opened = []

        def open_pg():
            opened.append(PostgresStore(url))
            return opened[-1]
        yield open_pg
        for s in opened:
            s.close()
    else:
        yield lambda: SqliteStore(str(tmp_path / "holdfast.db"))


def settle_rows(store, task_id):
    return [r for r in store.ledger(task_id=task_id) if r["kind"] in ("charge", "refund")]


def assert_ledger_balances(store, user):
    """balance = grants - reserves + refunds, whatever happened."""
    rows = store.ledger(user_id=user["id"])
    total = sum(r["amount"] * {"grant": 1, "reserve": -1, "refund": 1, "charge": 0}[r["kind"]] for r in rows)
    assert store.user_by_name(user["name"])["credit_balance"] == total


# -- the ledger --------------------------------------------------------------------

class TestLedger:
    def test_200_random_tasks_end_with_start_minus_cost_times_succeeded(self, world, clock):
        seed = int(os.environ.get("HOLDFAST_SEED", random.randrange(1 << 30)))
        rng = random.Random(seed)
        why = f"(seed {seed}; rerun with HOLDFAST_SEED={seed})"
        w = world()
        start = 1000
        user, token = w.user("payer", credits=start, max_active=1000)
        kinds = ["success", "failure", "cancel", "timeout"] * 5 + [
            rng.choice(["success", "failure", "cancel", "timeout"]) for _ in range(180)]
        rng.shuffle(kinds)
        plan, cancel_at = {}, {}
        while kinds or w.store.active_count(user["id"]):
            count = rng.randint(0, 25)
            batch, kinds = kinds[:count], kinds[count:]
            for kind in batch:
                params = {"prompt": kind, "duration_s": rng.uniform(0.5, 4.0)}
                if kind == "failure":
                    params["fail"] = True
                elif kind == "cancel":
                    params["duration_s"] = 25.0
                elif kind == "timeout":
                    params["duration_s"] = 100.0       # past the 30 s deadline
                res = w.submit(token, params)
                assert res.status == 201, res
                task = res.json()["task"]
                assert task["cost"] == COST and task["credits"] == "reserved"
                plan[task["id"]] = kind
                if kind == "cancel":
                    cancel_at[task["id"]] = clock() + rng.uniform(0, 12)
            w.worker.run_once(clock())
            for task_id, when in list(cancel_at.items()):
                if clock() >= when:
                    res = w.client.post(f"/api/tasks/{task_id}/cancel", token=token)
                    assert res.status == 200 and res.json()["task"]["credits"] == "refunded", res
                    del cancel_at[task_id]
            w.worker.sweep(clock())
            clock.advance(rng.uniform(0.3, 1.5))
            assert clock() < 1_800_000_000 + 200, f"{why} tasks never ended"

        assert len(plan) == 200
        expected = {"success": ("succeeded", None), "failure": ("failed", "provider_rejected"),
                    "cancel": ("cancelled", None), "timeout": ("failed", "timeout")}
        succeeded = 0
        for task_id, kind in plan.items():
            task = w.client.get(f"/api/tasks/{task_id}", token=token).json()["task"]
            status, code = expected[kind]
            assert (task["status"], (task["error"] or {}).get("code")) == (status, code), f"{why} {kind}: {task}"
            assert task["credits"] == ("charged" if status == "succeeded" else "refunded"), f"{why} {task}"
            kinds_seen = collections.Counter(r["kind"] for r in w.store.ledger(task_id=task_id))
            settle = "charge" if status == "succeeded" else "refund"
            assert kinds_seen == {"reserve": 1, settle: 1}, f"{why} {task_id}: {kinds_seen}"
            assert all(r["amount"] == COST for r in w.store.ledger(task_id=task_id))
            succeeded += status == "succeeded"
        assert 0 < succeeded < 200, why
        assert w.store.user_by_name("payer")["credit_balance"] == start - COST * succeeded, why
        me = w.client.get("/api/me", token=token).json()
        assert me["credits"] == {"balance": start - COST * succeeded, "reserved": 0}
        assert_ledger_balances(w.store, user)

    def test_a_refund_raced_by_cancel_expire_and_worker_from_three_threads_applies_once(self, opener):
        # Two store objects over one database: two sets of connections, as two processes would have.
        a, b = opener(), opener()
        try:
            start, cost = 10_000, 7
            user = a.create_user("payer", credits=start)[0]
            winners = collections.Counter()
            for i in range(40):
                now = 1000.0 + i
                task, _ = a.submit(user["id"], "demo", {}, now=now, deadline_at=now + 5, cost=cost)
                held = a.claim("worker", now=now, limit=1, lease_s=60)[0]
                a.update(task["id"], token=held["lease_token"], now=now, status="running")
                later = now + 10                                      # past the deadline
                ending = {"status": "succeeded"} if i % 2 else {
                    "status": "failed", "error": {"code": "provider_rejected", "message": "no"}}
                barrier = threading.Barrier(3)
                won, errors = [], []

                def attempt(name, fn):
                    barrier.wait()
                    try:
                        fn()
                        won.append(name)
                    except Conflict:
                        pass
                    except Exception as exc:      # reported below: the test fails
                        errors.append(repr(exc))

                racers = [
                    ("cancel", lambda: a.cancel(task["id"], user["id"], now=later)),
                    ("expire", lambda: b.expire(task["id"], now=later,
                                                error={"code": "timeout", "message": "late"})),
                    ("worker", lambda: a.update(task["id"], token=held["lease_token"], now=later, **ending)),
                ]
                threads = [threading.Thread(target=attempt, args=r) for r in racers]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(30)
                assert errors == [] and len(won) == 1, (errors, won)
                winners[won[0]] += 1
                final = a.get_task(task["id"])
                settles = settle_rows(a, task["id"])
                assert len(settles) == 1
                assert settles[0]["kind"] == ("charge" if final["status"] == "succeeded" else "refund")
                assert final["credits"] == ("charged" if final["status"] == "succeeded" else "refunded")
                assert [t for _, t in a.task_events(task["id"])].count("finished") == 1
            charged = sum(1 for r in a.ledger(user_id=user["id"]) if r["kind"] == "charge")
            assert a.user_by_name("payer")["credit_balance"] == start - cost * charged
            assert a.reserved_credits(user["id"]) == 0
            assert_ledger_balances(a, user)
        finally:
            a.close()
            b.close()

    def test_a_settle_raced_and_repeated_on_fresh_store_objects_applies_once(self, opener):
        store = opener()
        user = store.create_user("payer", credits=50)[0]
        ids = []
        for i in range(10):
            task, _ = store.submit(user["id"], "demo", {}, now=1.0 + i, deadline_at=99.0, cost=5)
            ids.append(task["id"])
        # A crash between ending a task and settling it (as an older version,
        # or a backend without transactions, could leave it): ended, still reserved.
        with store._seam(), store._write():
            store._exec("UPDATE tasks SET status = 'failed' WHERE user_id = ?", (user["id"],))
        store.close()
        probe = opener()
        assert probe.user_by_name("payer")["credit_balance"] == 0
        probe.close()
        for round_no in range(3):                 # the first races, then repeats after "restarts"
            stores = [opener() for _ in range(2)]
            barrier = threading.Barrier(2)
            errors = []

            def settle(s):
                barrier.wait()
                try:
                    for task_id in ids:
                        s.settle_stray(task_id, now=100.0)
                except Exception as exc:          # reported below: the test fails
                    errors.append(repr(exc))

            threads = [threading.Thread(target=settle, args=(s,)) for s in stores]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert errors == []
            for s in stores:
                s.close()
        store = opener()
        try:
            for task_id in ids:
                assert [r["kind"] for r in settle_rows(store, task_id)] == ["refund"]
                assert store.get_task(task_id)["credits"] == "refunded"
            assert store.user_by_name("payer")["credit_balance"] == 50
            assert_ledger_balances(store, user)
        finally:
            store.close()

    def test_a_process_killed_mid_refund_applies_it_once_after_restart(self, tmp_path):
        path = str(tmp_path / "holdfast.db")
        store = SqliteStore(path)
        user = store.create_user("payer", credits=20)[0]
        task, _ = store.submit(user["id"], "demo", {}, now=1.0, deadline_at=99.0, cost=8)
        store.close()
        # The child writes the refund and the new balance, then dies before
        # the commit: the moment a crash can hurt most.
        child = (
            "import os, sys\n"
            f"sys.path.insert(0, {ROOT!r})\n"
            "from store import SqliteStore\n"
            f"store = SqliteStore({path!r})\n"
            "store._event = lambda *a: os._exit(9)\n"
            f"store.cancel({task['id']!r}, {user['id']}, now=2.0)\n"
            "os._exit(0)\n")
        proc = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60)
        assert proc.returncode == 9, proc.stderr.decode()
        store = SqliteStore(path)
        try:
            assert store.get_task(task["id"])["credits"] == "reserved"
            assert [r["kind"] for r in store.ledger(task_id=task["id"])] == ["reserve"]
            assert store.user_by_name("payer")["credit_balance"] == 12
            store.cancel(task["id"], user["id"], now=3.0)
            for retry in (lambda: store.cancel(task["id"], user["id"], now=4.0),
                          lambda: store.expire(task["id"], now=500.0, error={"code": "timeout", "message": "x"})):
                with pytest.raises(Conflict):
                    retry()
            assert store.settle_stray(task["id"], now=5.0) is None
            assert [r["kind"] for r in store.ledger(task_id=task["id"])] == ["reserve", "refund"]
            assert store.user_by_name("payer")["credit_balance"] == 20
        finally:
            store.close()


# -- refusals create and reserve nothing ------------------------------------------

class TestRefusals:
    def test_402_creates_nothing_and_reserves_nothing(self, world):
        w = world()
        _, token = w.user("payer", credits=5)
        assert w.submit(token).status == 201
        before = w.snapshot()
        for _ in range(3):
            res = w.submit(token, {"prompt": "another"})
            assert res.status == 402, res
            err = res.json()["error"]
            assert err["code"] == "insufficient_credits" and "costs 3" in err["message"] and "balance is 2" in err[
                "message"]
        assert w.snapshot() == before

    def test_429_at_max_active_creates_nothing_and_reserves_nothing(self, world):
        w = world()
        user, token = w.user("payer", credits=100, max_active=2)
        first = w.submit(token).json()["task"]["id"]
        assert w.submit(token).status == 201
        before = w.snapshot()
        res = w.submit(token)
        assert res.status == 429 and res.json()["error"]["code"] == "too_many_active"
        assert int(res.headers["retry-after"]) >= 1
        assert w.snapshot() == before
        w.client.post(f"/api/tasks/{first}/cancel", token=token)
        assert w.submit(token).status == 201

    def test_the_server_default_max_active_applies_to_users_without_their_own(self, world):
        w = world(max_active=1)
        _, token = w.user("payer")
        assert w.submit(token).status == 201
        assert w.submit(token).status == 429

    def test_429_past_the_rate_creates_nothing_and_refills_with_time(self, world, clock):
        w = world(rate_per_s=1.0, rate_burst_s=3.0)
        _, token = w.user("payer", credits=100)
        _, fast = w.user("fast", rate_per_s=100.0)
        first = [w.submit(token, dedupe_key=f"k{i}") for i in range(3)]
        assert [r.status for r in first] == [201, 201, 201]
        before = w.snapshot()
        res = w.submit(token, dedupe_key="k3")
        assert res.status == 429 and res.json()["error"]["code"] == "rate_limited"
        assert res.headers["retry-after"] == "1"
        # A repeat of an accepted submission is an answer, not a new task: never refused.
        again = w.submit(token, dedupe_key="k0")
        assert again.status == 200 and again.json()["deduplicated"] is True
        assert w.snapshot() == before
        # Another user's bucket is their own, at their own rate.
        assert all(w.submit(fast).status == 201 for _ in range(10))
        clock.advance(0.5)
        assert w.submit(token).status == 429
        clock.advance(0.5)
        assert w.submit(token).status == 201
        assert w.submit(token).status == 429

    def test_a_refused_submission_spends_no_rate(self, world):
        w = world(rate_per_s=1.0, rate_burst_s=1.0)
        user, token = w.user("payer", credits=0)
        for _ in range(5):
            assert w.submit(token).status == 402
        w.store.grant(user["id"], COST, now=0)
        assert w.submit(token).status == 201

    def test_a_submission_the_store_runs_twice_takes_one_rate_token(self, world):
        w = world(rate_per_s=1.0, rate_burst_s=1.0)       # a bucket of one
        user, token = w.user("payer", credits=100)
        real, attempts = w.store._submit, []

        def lose_the_first_race(*args):
            attempts.append(args[8])
            result = real(*args)               # reserves, admits, inserts...
            if len(attempts) == 1:
                # ...then the dedupe index refuses the row, as when another
                # PostgreSQL transaction took the key first; submit rolls
                # back and runs its transaction again.
                raise peewee.IntegrityError('duplicate key value violates unique constraint "tasks_dedupe"')
            return result

        w.store._submit = lose_the_first_race
        res = w.submit(token, dedupe_key="k")
        assert res.status == 201, res
        assert attempts == ["k", "k"]
        assert [t["id"] for t in w.store.list_tasks(user["id"])[0]] == [res.json()["task"]["id"]]
        assert [r["kind"] for r in w.store.ledger(user_id=user["id"])] == ["grant", "reserve"]
        assert w.submit(token, dedupe_key="k2").status == 429       # the one token went to "k"

    def test_429_when_the_providers_queue_is_full_for_everyone(self, world, clock):
        w = world(demo={"max_queued": 2})
        _, alice = w.user("alice", credits=100)
        _, bob = w.user("bob")
        assert w.submit(alice).status == 201 and w.submit(bob).status == 201
        before = w.snapshot()
        for token in (alice, bob):
            res = w.submit(token)
            assert res.status == 429 and res.json()["error"]["code"] == "queue_full"
            assert int(res.headers["retry-after"]) >= 1
        assert w.snapshot() == before
        w.worker.run_once(clock())           # both start: the queue empties
        assert w.submit(alice).status == 201
        limits = w.client.get("/api/providers", token=alice).json()["providers"][0]["limits"]
        assert limits["max_queued"] == 2

    def test_a_bad_max_queued_is_a_config_error(self):
        from errors import ConfigError
        for bad in (0, -1, "3", 1.5, True):
            with pytest.raises(ConfigError):
                build_providers({"demo": {"max_queued": bad}})


# -- the admin API -----------------------------------------------------------------

ADMIN_ROUTES = [("POST", "/api/admin/users", {"name": "mallory", "admin": True}),
                ("POST", "/api/admin/users/alice/credits", {"amount": 1000}),
                ("GET", "/api/admin/tasks?stuck=1", None)]


class TestAdmin:
    @pytest.fixture
    def w(self, world):
        w = world()
        w.admin = w.user("root", admin=True)[1]
        w.alice_user, w.alice = w.user("alice", credits=10)
        return w

    @pytest.mark.parametrize("method,path,body", ADMIN_ROUTES)
    def test_admin_routes_refuse_missing_tokens_401_and_others_403(self, w, method, path, body):
        before = w.snapshot()
        for token, status, code in ((None, 401, "unauthorized"), ("hf_nobody_at_all_xx", 401, "unauthorized"),
                                    (w.alice, 403, "forbidden")):
            res = w.client.request(method, path, json_body=body, token=token)
            assert res.status == status and res.json()["error"]["code"] == code, res
        assert w.snapshot() == before
        assert w.client.request(method, path, json_body=body, token=w.admin).status in (200, 201)

    def test_admin_creates_users_and_shows_the_token_once(self, w):
        res = w.client.post("/api/admin/users", {"name": "carol", "credits": 25, "max_active": 3,
                                                 "rate_per_s": 2.5}, token=w.admin)
        assert res.status == 201 and res.headers["cache-control"] == "no-store"
        body = res.json()
        assert body["user"] == {"name": "carol", "admin": False, "credits": {"balance": 25, "reserved": 0},
                                "max_active": 3, "rate_per_s": 2.5, "max_priority": 0,
                                "created_at": body["user"]["created_at"]}
        token = body["token"]
        me = w.client.get("/api/me", token=token).json()
        assert me["user"] == {"name": "carol", "admin": False}
        assert me["limits"]["max_active"] == 3 and me["limits"]["rate_per_s"] == 2.5
        assert token not in str(w.store.export_rows())
        assert [(r["kind"], r["amount"]) for r in w.store.ledger(user_id=w.store.user_by_name("carol")["id"])] == [
            ("grant", 25)]
        again = w.client.post("/api/admin/users", {"name": "carol"}, token=w.admin)
        assert again.status == 409 and again.json()["error"]["code"] == "user_exists"
        admin = w.client.post("/api/admin/users", {"name": "boss", "admin": True}, token=w.admin).json()
        assert admin["user"]["credits"] is None
        assert w.client.get("/api/admin/tasks", token=admin["token"]).status == 200

    def test_grants_add_take_and_never_go_below_zero(self, w):
        url = "/api/admin/users/alice/credits"
        res = w.client.post(url, {"amount": 5}, token=w.admin)
        assert res.status == 200 and res.json()["user"]["credits"] == {"balance": 15, "reserved": 0}
        assert w.submit(w.alice).status == 201                  # reserves 3: balance 12
        res = w.client.post(url, {"amount": -12}, token=w.admin)
        assert res.status == 200 and res.json()["user"]["credits"] == {"balance": 0, "reserved": 3}
        before = w.snapshot()
        low = w.client.post(url, {"amount": -1}, token=w.admin)
        assert low.status == 409 and low.json()["error"]["code"] == "balance_too_low"
        assert w.snapshot() == before
        assert w.client.post(url, {"amount": MAX_CREDITS}, token=w.admin).status == 200
        high = w.client.post(url, {"amount": 1}, token=w.admin)
        assert high.status == 409 and high.json()["error"]["code"] == "balance_too_high"
        assert w.client.post(url, {"amount": -(MAX_CREDITS - 1)}, token=w.admin).status == 200
        assert w.store.user_by_name("alice")["credit_balance"] == 1
        grants = [r["amount"] for r in w.store.ledger(user_id=w.alice_user["id"]) if r["kind"] == "grant"]
        assert grants == [10, 5, -12, MAX_CREDITS, -(MAX_CREDITS - 1)]
        assert_ledger_balances(w.store, w.alice_user)
        unlimited = w.client.post("/api/admin/users/root/credits", {"amount": 5}, token=w.admin)
        assert unlimited.status == 409 and unlimited.json()["error"]["code"] == "no_credit_limit"
        missing = w.client.post("/api/admin/users/nobody/credits", {"amount": 5}, token=w.admin)
        assert missing.status == 404 and missing.json()["error"]["code"] == "user_not_found"

    def test_a_grant_sent_again_with_its_key_is_made_once(self, w):
        url = "/api/admin/users/alice/credits"
        for _ in range(3):
            res = w.client.post(url, {"amount": 5}, token=w.admin, headers={"Idempotency-Key": "g-1"})
            assert res.status == 200 and res.json()["user"]["credits"]["balance"] == 15, res
        other = w.client.post(url, {"amount": 6}, token=w.admin, headers={"Idempotency-Key": "g-1"})
        assert other.status == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
        assert w.client.post(url, {"amount": 5}, token=w.admin, headers={"Idempotency-Key": "g-2"}).status == 200
        assert w.client.post(url, {"amount": 5}, token=w.admin).status == 200     # no key: each one counts
        assert w.client.post(url, {"amount": 5}, token=w.admin).status == 200
        carol = w.user("carol", credits=1)[0]
        assert w.client.post("/api/admin/users/carol/credits", {"amount": 5}, token=w.admin,
                             headers={"Idempotency-Key": "g-1"}).status == 200    # a key is per user
        assert [r["amount"] for r in w.store.ledger(user_id=w.alice_user["id"]) if r["kind"] == "grant"] == [
            10, 5, 5, 5, 5]
        assert w.store.user_by_name("alice")["credit_balance"] == 30
        assert w.store.user_by_name("carol")["credit_balance"] == 6 and carol
        assert_ledger_balances(w.store, w.alice_user)
        before = w.snapshot()
        for key in ("", "a b", "x" * 201, "é"):
            bad = w.client.post(url, {"amount": 5}, token=w.admin, headers={"Idempotency-Key": key})
            assert bad.status == 400 and bad.json()["error"]["code"] in ("invalid_input", "invalid_header"), key
        assert w.snapshot() == before

    def test_grants_from_many_threads_all_count(self, w):
        threads = [threading.Thread(target=lambda: [w.store.grant(w.alice_user["id"], 1, now=0)
                                                    for _ in range(25)]) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert w.store.user_by_name("alice")["credit_balance"] == 110
        assert_ledger_balances(w.store, w.alice_user)

    BAD = [
        ("/api/admin/users", b"", 400, "invalid_json"),
        ("/api/admin/users", b"[1]", 400, "invalid_json"),
        ("/api/admin/users", b"{}", 400, "invalid_input"),
        ("/api/admin/users", b'{"name": 5}', 400, "invalid_input"),
        ("/api/admin/users", b'{"name": "bad name!"}', 400, "invalid_input"),
        ("/api/admin/users", b'{"name": "' + b"x" * 65 + b'"}', 400, "invalid_input"),
        ("/api/admin/users", b'{"name": "x", "credits": -1}', 400, "invalid_input"),
        ("/api/admin/users", b'{"name": "x", "credits": 1.5}', 400, "invalid_input"),
        ("/api/admin/users", b'{"name": "x", "credits": true}', 400, "invalid_input"),
        ("/api/admin/users", b'{"name": "x", "credits": 100000000000000000000000}', 400, "invalid_input"),
        ("/api/admin/users", b'{"name": "x", "admin": "yes"}', 400, "invalid_input"),
        ("/api/admin/users", b'{"name": ["x"]}', 400, "invalid_input"),
        ("/api/admin/users", b'{"name": "x", "credits": [1]}', 400, "invalid_input"),
        ("/api/admin/users", b'{"name": "x", "max_active": {"n": 1}}', 400, "invalid_input"),
        ("/api/admin/users", b'{"name": "x", "max_active": 0}', 400, "invalid_input"),
        ("/api/admin/users", b'{"name": "x", "rate_per_s": 0}', 400, "invalid_input"),
        ("/api/admin/users", b'{"name": "x", "rate_per_s": "fast"}', 400, "invalid_input"),
        ("/api/admin/users", b'{"name": "x", "rate_per_s": 1e308}', 400, "invalid_input"),
        ("/api/admin/users", b'{"name": "x", "rate_per_s": NaN}', 400, "invalid_json"),
        ("/api/admin/users", b'{"name": "x", "token": "mine-mine-mine-mine"}', 400, "invalid_input"),
        ("/api/admin/users", b'{"name": "alice"}', 409, "user_exists"),
        ("/api/admin/users", b'{"name": "x\\ud800"}', 400, "invalid_json"),
        ("/api/admin/users", b'{"name": "x", "\\udc00": 1}', 400, "invalid_json"),
        ("/api/admin/users", b'{"name": "x\\u0000"}', 400, "invalid_input"),
        ("/api/admin/users/alice/credits", b'{"amount": 5, "\\ud800": 1}', 400, "invalid_json"),
        ("/api/admin/users/alice/credits", b"{}", 400, "invalid_input"),
        ("/api/admin/users/alice/credits", b'{"amount": 0}', 400, "invalid_input"),
        ("/api/admin/users/alice/credits", b'{"amount": "5"}', 400, "invalid_input"),
        ("/api/admin/users/alice/credits", b'{"amount": 1.5}', 400, "invalid_input"),
        ("/api/admin/users/alice/credits", b'{"amount": true}', 400, "invalid_input"),
        ("/api/admin/users/alice/credits", b'{"amount": [5]}', 400, "invalid_input"),
        ("/api/admin/users/alice/credits", b'{"amount": null}', 400, "invalid_input"),
        ("/api/admin/users/alice/credits", b'{"amount": 100000000000000000000000}', 400, "invalid_input"),
        ("/api/admin/users/alice/credits", b'{"amount": 5, "note": "x"}', 400, "invalid_input"),
        ("/api/admin/users/alice/credits", b'{"amount": -11}', 409, "balance_too_low"),
        ("/api/admin/users/no%20body/credits", b'{"amount": 5}', 404, "user_not_found"),
    ]

    @pytest.mark.parametrize("path,body,status,code", BAD, ids=[f"{b[0][11:]} {b[1][:40]!r}" for b in BAD])
    def test_bad_admin_input_is_a_4xx_json_error_and_changes_nothing(self, w, path, body, status, code):
        before = w.snapshot()
        res = w.client.request("POST", path, data=body, token=w.admin)
        assert res.status == status, res
        assert res.headers["content-type"].startswith("application/json")
        assert res.json()["error"]["code"] == code and res.json()["error"]["message"]
        assert w.snapshot() == before

    @pytest.mark.parametrize("query", ["stuck=2", "stuck=yes", "limit=0", "limit=501", "limit=x", "grace_s=-1",
                                       "grace_s=nan", "grace_s=1e99", "user=alice"])
    def test_bad_admin_task_queries_are_400(self, w, query):
        res = w.client.get(f"/api/admin/tasks?{query}", token=w.admin)
        assert res.status == 400 and res.json()["error"]["code"] == "invalid_input", res

    def test_stuck_tasks_are_listed_across_users_with_their_reasons(self, w, clock):
        s, now = w.store, clock()
        alice, bob = w.alice_user, w.user("bob")[0]

        def task(user, created, deadline):
            return s.submit(user["id"], "demo", {}, now=created, deadline_at=deadline)[0]["id"]

        late = task(alice, now - 50, now - 1)                     # past its deadline, not swept
        orphan = task(bob, now - 40, now + 900)
        assert s.claim_task(orphan, "gone:1:x", now=now - 40, lease_s=30)   # its worker vanished
        forgotten = task(alice, now - 30, now + 900)              # due 30 s ago, nobody looked
        fresh = task(bob, now - 5, now + 900)
        held = task(alice, now - 2, now + 900)
        assert s.claim_task(held, "alive:1:x", now=now - 1, lease_s=60)
        ended = task(bob, now - 60, now - 10)
        s.cancel(ended, bob["id"], now=now - 9)

        res = w.client.get("/api/admin/tasks?stuck=1&grace_s=20", token=w.admin)
        assert res.status == 200
        got = [(t["task"]["id"], t["user"], t["stuck"]) for t in res.json()["tasks"]]
        assert got == [(late, "alice", ["past_deadline", "poll_overdue"]), (orphan, "bob", ["lease_expired"]),
                       (forgotten, "alice", ["poll_overdue"])]
        everything = w.client.get("/api/admin/tasks", token=w.admin).json()["tasks"]
        assert [t["task"]["id"] for t in everything] == [late, orphan, forgotten, fresh, held]
        held_row = everything[-1]
        assert held_row["stuck"] == [] and held_row["lease_owner"] == "alive:1:x"
        loose = w.client.get("/api/admin/tasks?stuck=1&grace_s=1", token=w.admin).json()["tasks"]
        assert fresh in [t["task"]["id"] for t in loose] and held not in [t["task"]["id"] for t in loose]
        assert len(w.client.get("/api/admin/tasks?limit=2", token=w.admin).json()["tasks"]) == 2


# -- /api/me -----------------------------------------------------------------------

def test_me_shows_balance_reserved_limits_and_usage(world):
    w = world(rate_burst_s=2.0)
    _, token = w.user("payer", credits=10, max_active=5, rate_per_s=2.0)
    assert w.submit(token).status == 201
    me = w.client.get("/api/me", token=token).json()
    assert me["user"] == {"name": "payer", "admin": False}
    assert me["credits"] == {"balance": 7, "reserved": 3}
    limits = me["limits"]
    assert (limits["max_active"], limits["rate_per_s"], limits["burst"]) == (5, 2.0, 4.0)
    assert limits["session_messages"] == 40 and limits["session_ttl_s"] == w.config.session_ttl_s
    assert me["usage"] == {"active": 1}
    _, plain = w.user("plain")
    me = w.client.get("/api/me", token=plain).json()
    assert me["credits"] is None and me["limits"]["max_active"] == w.config.max_active
    assert me["limits"]["rate_per_s"] == w.config.rate_per_s



def test_credits_is_a_settlement_state_on_a_task_and_amounts_on_a_user(world):
    """One word, two shapes, each described: a task's `credits` is a string
    (what became of its cost), a user's is {balance, reserved} or null.
    Every answer is checked against its OpenAPI schema."""
    import jsonschema

    from api import openapi
    spec = openapi.spec()

    def check(value, schema):
        jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{schema}",
                                         "components": spec["components"]}).validate(value)

    w = world()
    _, token = w.user("payer", credits=10)
    _, admin = w.user("boss", admin=True)
    task = w.submit(token).json()["task"]
    me = w.client.get("/api/me", token=token).json()
    check(task, "Task")
    check(me, "Me")
    assert task["credits"] == "reserved" and task["cost"] == COST
    assert me["credits"] == {"balance": 10 - COST, "reserved": COST}
    for _ in range(10):
        w.worker.run_once(w.clock.advance(1.0))
    done = w.client.get(f"/api/tasks/{task['id']}", token=token).json()["task"]
    check(done, "Task")
    assert (done["status"], done["credits"]) == ("succeeded", "charged")
    assert w.client.get("/api/me", token=token).json()["credits"] == {"balance": 10 - COST, "reserved": 0}
    granted = w.client.post("/api/admin/users/payer/credits", {"amount": 5}, token=admin).json()
    check(granted["user"], "User")
    assert granted["user"]["credits"] == {"balance": 15 - COST, "reserved": 0}
    no_limit = w.client.get("/api/me", token=admin).json()
    check(no_limit, "Me")
    assert no_limit["credits"] is None
    # Each shape refuses the other's value.
    with pytest.raises(jsonschema.ValidationError):
        check({**done, "credits": {"balance": 1, "reserved": 0}}, "Task")
    with pytest.raises(jsonschema.ValidationError):
        check({**me, "credits": "charged"}, "Me")
    # And each says what it is, pointing at the other.
    task_credits = spec["components"]["schemas"]["Task"]["properties"]["credits"]["description"]
    amounts = spec["components"]["schemas"]["Credits"]["description"]
    assert "settlement state" in task_credits and "GET /api/me" in task_credits
    assert "Not the `credits` of a task" in amounts
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    assert "`credits` has a shape for each of its two meanings" in readme


def test_a_tokens_user_is_looked_up_once_a_second_and_the_balance_shown_is_never_stale(world, monkeypatch):
    """Every request names its user by token; a busy client's requests
    reuse one lookup for a second, unknown tokens are asked each time (a
    new user works at once), and /api/me reads the balance itself."""
    monkeypatch.setattr(api, "USER_TTL_S", 3600.0)   # a slow machine may take a second over these
    w = world()
    _, token = w.user("payer", credits=10)
    lookups = []
    real = w.store.user_by_token
    w.store.user_by_token = lambda t: lookups.append(t) or real(t)
    assert w.submit(token).status == 201
    for _ in range(20):
        assert w.client.get("/api/tasks", token=token).status == 200
    assert len(lookups) == 1
    assert w.client.get("/api/me", token=token).json()["credits"] == {"balance": 7, "reserved": 3}
    assert w.submit(token, {"prompt": "again"}).status == 201
    assert w.client.get("/api/me", token=token).json()["credits"] == {"balance": 4, "reserved": 6}
    for _ in range(3):
        assert w.client.get("/api/tasks", token="hf_not_a_token").status == 401
    _, late = w.user("late")
    assert w.client.get("/api/tasks", token=late).status == 200
    assert len(lookups) == 1 + 3 + 1


# -- the CLI -----------------------------------------------------------------------

def run_cli(data_dir, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOLDFAST_")}
    env["HOLDFAST_DATA"] = str(data_dir)
    return subprocess.run([sys.executable, os.path.join(ROOT, "app.py"), *args], cwd=str(data_dir), env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_adds_users_and_grants_credits(tmp_path):
    added = run_cli(tmp_path, "users", "add", "carol", "--credits", "5", "--max-active", "2")
    assert added.returncode == 0, added.stderr
    assert added.stdout.splitlines()[0] == "created carol (user, balance 5); its token, shown only now:"
    label, token = added.stdout.strip().splitlines()[-1].split()
    assert label == "token:" and token.startswith("hf_")
    plus = run_cli(tmp_path, "credits", "carol", "+10")
    assert plus.returncode == 0 and plus.stdout.strip() == "carol: balance 15", plus.stderr
    minus = run_cli(tmp_path, "credits", "carol", "-3")
    assert minus.returncode == 0 and minus.stdout.strip() == "carol: balance 12", minus.stderr
    for args, message in ((("credits", "carol", "-13"), "negative"), (("credits", "nobody", "+1"), "no user named 'nobody'"),
                          (("credits", "carol", "ten"), "integer"), (("credits", "carol", "0"), "non-zero")):
        res = run_cli(tmp_path, *args)
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)
    store = SqliteStore(str(tmp_path / "holdfast.db"))
    try:
        carol = store.user_by_token(token)
        assert carol["name"] == "carol" and carol["credit_balance"] == 12 and carol["max_active"] == 2
        assert [r["amount"] for r in store.ledger(user_id=carol["id"])] == [5, 10, -3]
    finally:
        store.close()


def test_cli_adds_an_admin_whose_token_opens_the_admin_api(tmp_path, clock):
    boss = run_cli(tmp_path, "users", "add", "boss", "--admin")
    plain = run_cli(tmp_path, "users", "add", "plain")
    assert boss.returncode == 0 and plain.returncode == 0, (boss.stderr, plain.stderr)
    boss_token, plain_token = boss.stdout.split()[-1], plain.stdout.split()[-1]
    store = SqliteStore(str(tmp_path / "holdfast.db"))
    try:
        app = create_app(store, build_providers({"demo": DEMO}), Config(data=str(tmp_path)), clock=clock)
        client = WSGIClient(app)
        for method, path, body in ADMIN_ROUTES:
            path = path.replace("alice", "plain")
            res = client.request(method, path, json_body=body, token=plain_token)
            assert res.status == 403 and res.json()["error"]["code"] == "forbidden", (path, res)
        assert client.get("/api/admin/tasks", token=boss_token).status == 200
        made = client.post("/api/admin/users", {"name": "carol", "credits": 5}, token=boss_token)
        assert made.status == 201, made
        assert client.post("/api/admin/users/carol/credits", {"amount": 2}, token=boss_token).status == 200
        assert store.user_by_name("carol")["credit_balance"] == 7
        assert store.user_by_token(boss_token)["is_admin"] and not store.user_by_token(plain_token)["is_admin"]
    finally:
        store.close()


def test_a_postgresql_store_without_its_driver_says_what_to_install(tmp_path):
    """psycopg is installed only by those who use PostgreSQL: without it,
    a clear message and exit 2, not a driver traceback."""
    blocker = tmp_path / "blocker"
    (blocker / "psycopg").mkdir(parents=True)
    (blocker / "psycopg" / "__init__.py").write_text('raise ImportError("psycopg is not installed here")\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOLDFAST_")}
    env.update(HOLDFAST_DATA=str(tmp_path), PYTHONPATH=str(blocker),
               HOLDFAST_STORE="postgresql://nobody@127.0.0.1:1/none")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "app.py"), "users", "add", "carol"],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert 'pip install "psycopg[binary]' in res.stderr and "Traceback" not in res.stderr, res.stderr
