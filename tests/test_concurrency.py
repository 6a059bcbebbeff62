"""Dedupe and claims under real threads and real processes on one SQLite file."""

import collections
import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from store import SqliteStore
from support import ServerProcess, api


def _hammer(store, user_id, key, barrier):
    barrier.wait()
    now = time.time()
    task, dedup = store.submit(user_id, "demo", {"prompt": "same"}, now=now, deadline_at=now + 60,
                               dedupe_key=key)
    return task["id"], dedup


def test_50_threads_with_one_dedupe_key_make_one_task(sqlite_store):
    user = sqlite_store.create_user("alice")[0]
    barrier = threading.Barrier(50)
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda _: _hammer(sqlite_store, user["id"], "order-1", barrier), range(50)))
    ids = {task_id for task_id, _ in results}
    assert len(ids) == 1
    assert sorted(dedup for _, dedup in results) == [False] + [True] * 49
    assert len(sqlite_store.list_tasks(user["id"])[0]) == 1


def _process_submitter(path, user_id, barrier, rounds, queue):
    """Runs in a separate process: its own connection, its own interpreter.
    Each round waits for all four, then races a key none has used."""
    store = SqliteStore(path)
    answers, errors = [], []
    for i in range(rounds):
        try:
            barrier.wait(60)
            now = time.time()
            task, dedup = store.submit(user_id, "demo", {"i": i}, now=now, deadline_at=now + 60,
                                       dedupe_key=f"shared-{i}")
            answers.append((f"shared-{i}", task["id"], dedup))
            store.submit(user_id, "demo", {"i": i}, now=now, deadline_at=now + 60)
        except Exception as exc:   # reported to the parent, which fails the test
            errors.append(repr(exc))
    store.close()
    queue.put((answers, errors))


def test_4_processes_racing_a_fresh_dedupe_key_each_round_make_one_task_per_key_and_never_lock(tmp_path):
    path = str(tmp_path / "shared.db")
    store = SqliteStore(path)
    user = store.create_user("alice")[0]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    barrier = ctx.Barrier(4)
    rounds = 100
    procs = [ctx.Process(target=_process_submitter, args=(path, user["id"], barrier, rounds, queue))
             for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    errors = [e for _, e in results for e in e]
    assert errors == [], "no 'database is locked' or any other error"
    by_key = collections.defaultdict(list)
    for answers, _ in results:
        for key, task_id, dedup in answers:
            by_key[key].append((task_id, dedup))
    assert len(by_key) == rounds
    for key, got in by_key.items():
        assert len(got) == 4 and len({task_id for task_id, _ in got}) == 1, (key, got)
        assert sorted(dedup for _, dedup in got) == [False, True, True, True], (key, got)
    tasks, cursor = [], None
    while True:
        page, cursor = store.list_tasks(user["id"], limit=200, before=cursor)
        tasks += page
        if cursor is None:
            break
    assert len(tasks) == 4 * rounds + rounds      # 4 x 100 unkeyed, one per key
    keyed = collections.Counter(t["dedupe_key"] for t in tasks if t["dedupe_key"] is not None)
    assert keyed == {key: 1 for key in by_key}
    assert {t["id"] for t in tasks if t["dedupe_key"]} == {got[0][0] for got in by_key.values()}
    store.close()


def test_concurrent_claims_never_hand_a_task_to_two_workers(sqlite_store):
    user = sqlite_store.create_user("alice")[0]
    now = time.time()
    for _ in range(200):
        sqlite_store.submit(user["id"], "demo", {}, now=now, deadline_at=now + 60)
    claimed = collections.Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def claimer(n):
        barrier.wait()
        while True:
            batch = sqlite_store.claim(f"w{n}", now=now + 1, limit=7, lease_s=60)
            if not batch:
                return
            with lock:
                claimed.update(t["id"] for t in batch)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(claimed) == 200 and set(claimed.values()) == {1}


def test_50_http_clients_with_one_key_get_one_201(tmp_path):
    with ServerProcess(tmp_path) as server:
        barrier = threading.Barrier(50)

        def post(_):
            session = api(server, server.tokens["demo"])
            barrier.wait()
            res = session.post(server.url + "/api/tasks", timeout=30,
                               json={"provider": "demo", "params": {"prompt": "fox"}, "dedupe_key": "click"})
            return res.status_code, res.json()["task"]["id"], res.json()["deduplicated"]

        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(post, range(50)))
        statuses = collections.Counter(s for s, _, _ in results)
        assert statuses == {201: 1, 200: 49}
        assert len({task_id for _, task_id, _ in results}) == 1
        assert sum(1 for _, _, d in results if d) == 49
        listed = requests.get(server.url + "/api/tasks", timeout=10,
                              headers={"Authorization": f"Bearer {server.tokens['demo']}"}).json()
        assert len(listed["tasks"]) == 1


def test_three_concurrent_retries_of_a_failed_task_make_one_task_and_reserve_once(tmp_path):
    (tmp_path / "holdfast.toml").write_text("[providers.demo]\ncost = 1\nduration_s = 0.2\n")
    with ServerProcess(tmp_path, env={"HOLDFAST_CONFIG": str(tmp_path / "holdfast.toml")}) as server:
        res = api(server, server.tokens["admin"]).post(server.url + "/api/admin/users", timeout=10,
                                                       json={"name": "payer", "credits": 5})
        token = res.json()["token"]
        session = api(server, token)
        failed = session.post(server.url + "/api/tasks", timeout=10,
                              json={"provider": "demo", "params": {"fail": True}}).json()["task"]["id"]
        deadline = time.time() + 60
        while session.get(f"{server.url}/api/tasks/{failed}", timeout=10).json()["task"]["status"] != "failed":
            assert time.time() < deadline, "the failing task never failed"
            time.sleep(0.1)
        barrier = threading.Barrier(3)

        def retry(_):
            own = api(server, token)       # one connection each: three tabs
            barrier.wait()
            res = own.post(f"{server.url}/api/tasks/{failed}/retry", timeout=30)
            return res.status_code, res.json()["task"]["id"], res.json()["deduplicated"]

        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(retry, range(3)))
        assert collections.Counter(s for s, _, _ in results) == {201: 1, 200: 2}, results
        assert len({task_id for _, task_id, _ in results}) == 1
        assert sorted(d for _, _, d in results) == [False, True, True]
        tasks = session.get(server.url + "/api/tasks", timeout=10).json()["tasks"]
        assert len(tasks) == 2
    store = SqliteStore(str(tmp_path / "holdfast.db"))
    try:
        payer = store.user_by_name("payer")
        assert [r["kind"] for r in store.ledger(user_id=payer["id"]) if r["kind"] == "reserve"] == ["reserve"] * 2
    finally:
        store.close()
