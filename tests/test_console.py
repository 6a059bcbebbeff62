"""The operator console: its admin API (stats drawn from task_history and its
detail, every user's tasks by filters, bulk cancel and retry, users) and the
page itself in Chromium against a real server whose store holds a known mix
of outcomes. Screenshots go to tests/artifacts/console/."""

import json
import math
import os
import re
import secrets
import threading
import time
from datetime import datetime, timezone

import pytest
import requests

from api import create_app
from config import Config
from store import DURATION_BOUNDS_S, SqliteStore, history_day, iso, open_store, task_json
from support import CSP_WATCH, ROOT, ServerProcess, WSGIClient

ARTIFACTS = os.path.join(ROOT, "tests", "artifacts", "console")
DAY = 86400
TIMED = ("succeeded", "partial", "failed")

# provider, days ago, outcome, error code, duration (s), user. Durations are
# bucket bounds, so the percentiles the console shows are exact samples.
MIX = (
    [("demo", 2, "succeeded", None, d, "alice") for d in (5, 5, 10, 10, 20, 20, 30, 60, 120)]
    + [("demo", 2, "partial", None, 300, "bob"),
       ("demo", 2, "failed", "timeout", 600, "alice"),
       ("demo", 2, "failed", "provider_rejected", 2, "bob")]
    + [("demo", 1, "succeeded", None, d, "bob") for d in (1, 2, 5, 10, 10, 10, 20, 20, 30, 30, 60, 60, 60,
                                                          120, 120, 300, 300, 600)]
    + [("demo", 1, "failed", "timeout", 1200, "alice"), ("demo", 1, "cancelled", None, 5, "alice")]
    + [("demo", 0, "succeeded", None, d, "alice") for d in (2, 5, 5, 10, 20, 30, 60)]
    + [("demo", 0, "failed", "provider_rejected", 1, "alice")]
    + [("kie", 1, "succeeded", None, d, "bob") for d in (30, 60, 120)]
    + [("kie", 1, "failed", "result_expired", 3600, "bob"), ("kie", 1, "failed", "result_expired", 7200, "alice"),
       ("kie", 1, "failed", "submission_in_doubt", 10, "bob")]
    + [("kie", 0, "succeeded", None, 20, "bob"), ("kie", 0, "failed", "provider_unavailable", 300, "bob")]
)


def day_start(ts):
    return int(ts) - int(ts) % DAY


def seed(store, now, users, mix=MIX):
    """Write the mix of finished tasks into `store` as if they had run;
    returns [(task id, row of MIX, finish time)]."""
    now = int(now)
    out = []
    for i, (provider, ago, outcome, code, took, user) in enumerate(mix):
        # Today's tasks finished in the last minutes (before `now`); older
        # ones at noon of their day. Whole seconds: durations stay exact.
        finish = now - 60 - i if ago == 0 else day_start(now) - ago * DAY + 12 * 3600 + i
        created = finish - took
        uid = users[user]
        task, _ = store.submit(uid, provider, {"prompt": f"mix {i} {provider} {outcome}", "n": i},
                               now=created, deadline_at=created + 3 * DAY, dedupe_key=f"mix-{i}")
        if outcome == "cancelled":
            store.cancel(task["id"], uid, now=finish)
        else:
            store.update(task["id"], token=None, now=created, status="running")
            error = {"code": code, "message": f"{code} in the mix"} if code else None
            store.update(task["id"], token=None, now=finish, status=outcome, error=error)
        out.append((task["id"], (provider, ago, outcome, code, took, user), finish))
    return out


def nearest_rank(values, q):
    values = sorted(values)
    return values[max(1, math.ceil(q * len(values))) - 1]


def expected_history(seeded):
    """{provider: {day: {"rate", "p50", "p95", "failures": {code: n}, "outcomes": {..}}}}
    computed from what seed() wrote."""
    out = {}
    for _, (provider, _, outcome, code, took, _), finish in seeded:
        d = out.setdefault(provider, {}).setdefault(history_day(finish), {"outcomes": {}, "durations": [],
                                                                         "failures": {}})
        d["outcomes"][outcome] = d["outcomes"].get(outcome, 0) + 1
        if outcome in TIMED:
            d["durations"].append(took)
        if outcome == "failed":
            d["failures"][code] = d["failures"].get(code, 0) + 1
    for days in out.values():
        for d in days.values():
            done = sum(d["outcomes"].get(o, 0) for o in TIMED)
            d["rate"] = d["outcomes"].get("succeeded", 0) / done if done else None
            d["p50"] = nearest_rank(d["durations"], 0.5) if d["durations"] else None
            d["p95"] = nearest_rank(d["durations"], 0.95) if d["durations"] else None
    return out


def test_the_durations_are_bucket_bounds():
    # Otherwise the console's bucketed percentiles could not equal the samples.
    assert all(row[4] in DURATION_BOUNDS_S for row in MIX)


# -- the API, in-process ---------------------------------------------------------

class World:
    def __init__(self, tmp_path, clock, **config):
        from providers import build_providers
        from store import FileStore
        from worker import Worker
        self.store = SqliteStore(str(tmp_path / "db"))
        self.clock = clock
        self.config = Config(data=str(tmp_path), **config)
        self.providers = build_providers({"demo": {"duration_s": 1.0, "poll_interval_s": 0.5}})
        files = FileStore(str(tmp_path / "files"))
        self.worker = Worker(self.store, self.providers, files, clock=clock, owner="test:1:w")
        self.app = create_app(self.store, self.providers, self.config, worker=self.worker, files=files,
                              clock=clock)
        self.client = WSGIClient(self.app)
        admin, self.admin = self.store.create_user("root", admin=True)
        alice, self.alice = self.store.create_user("alice", credits=50)
        bob, self.bob = self.store.create_user("bob")
        self.ids = {"root": admin["id"], "alice": alice["id"], "bob": bob["id"]}

    def get(self, path, token=None, **kw):
        return self.client.get(path, token=token or self.admin, **kw)

    def post(self, path, body, token=None, **kw):
        return self.client.post(path, json_body=body, token=token or self.admin, **kw)


@pytest.fixture
def w(tmp_path, clock):
    world = World(tmp_path, clock)
    yield world
    world.store.close()


def test_stats_are_drawn_from_the_history_of_the_store(w):
    seeded = seed(w.store, w.clock(), w.ids)
    res = w.get("/api/admin/stats?days=7")
    assert res.status == 200, res
    body = res.json()
    assert body["days"][-1] == history_day(w.clock()) and len(body["days"]) == 7
    want = expected_history(seeded)
    assert set(body["history"]) == {"demo", "kie"}
    checked = 0
    for provider, days in want.items():
        series = body["history"][provider]
        for day, d in days.items():
            i = body["days"].index(day)
            assert series["success_rate"][i] == pytest.approx(d["rate"])
            assert series["p50_s"][i] == d["p50"] and series["p95_s"][i] == d["p95"]
            for code, n in d["failures"].items():
                assert series["failures"][code][i] == n
            assert sum(v[i] for v in series["failures"].values()) == d["outcomes"].get("failed", 0)
            for outcome, n in d["outcomes"].items():
                assert series["outcomes"][outcome][i] == n
            checked += 1
        # Days without tasks are gaps, not zeros.
        empty = [i for i, day in enumerate(body["days"]) if day not in days]
        assert empty and all(series["success_rate"][i] is None for i in empty)
    assert checked == 5
    counts = {(c["provider"], c["status"]): c["tasks"] for c in body["counts"]}
    assert counts[("demo", "succeeded")] == 9 + 18 + 7 and counts[("kie", "failed")] == 4
    assert body["thresholds"] == {"success_rate": {"warn": 0.9, "alert": 0.85},
                                  "poll_delay_s": {"warn": 120.0, "alert": 300.0}}
    levels = {p["name"]: (p["success_rate_today"], p["level"]) for p in body["providers"]}
    assert levels["demo"] == (pytest.approx(7 / 8), "warn")       # 87.5%: below 90, not below 85
    assert levels["kie"] == (0.5, "alert")
    live = body["live"]
    assert live["queue_depth"] == 0 and live["oldest_active"] is None and live["scheduler"] == "stopped"
    assert live["webhooks"] == {"pending": 0, "failing": 0, "failed": 0}
    assert set(live["streams"]) >= {"sse", "poll", "max"}


def test_thresholds_come_from_configuration(tmp_path, clock):
    w = World(tmp_path, clock, success_rate_warn=0.95, success_rate_alert=0.8, poll_delay_warn_s=5.0,
              poll_delay_alert_s=50.0)
    seed(w.store, clock(), w.ids)
    # A task due 10 s ago that no worker took: the poll delay warns.
    task, _ = w.store.submit(w.ids["alice"], "demo", {"prompt": "late"}, now=clock() - 10,
                             deadline_at=clock() + 3600)
    body = w.get("/api/admin/stats").json()
    assert body["thresholds"]["success_rate"] == {"warn": 0.95, "alert": 0.8}
    assert {p["name"]: p["level"] for p in body["providers"]} == {"demo": "warn", "kie": "alert"}
    assert body["live"]["poll_lag_s"] == pytest.approx(10, abs=0.5) and body["live"]["poll_lag_level"] == "warn"
    assert body["live"]["oldest_active"]["id"] == task["id"] and body["live"]["queue_depth"] == 1
    w.store.close()


def test_thresholds_that_contradict_each_other_are_refused():
    from errors import ConfigError
    with pytest.raises(ConfigError, match="SUCCESS_RATE_ALERT"):
        Config.load(env={"HOLDFAST_SUCCESS_RATE_ALERT": "0.95"}, path="/nonexistent.toml")
    with pytest.raises(ConfigError, match="POLL_DELAY_ALERT_S"):
        Config.load(env={"HOLDFAST_POLL_DELAY_WARN_S": "600"}, path="/nonexistent.toml")
    config = Config.load(env={"HOLDFAST_SUCCESS_RATE_WARN": "0.97"}, path="/nonexistent.toml")
    assert config.thresholds()["success_rate"] == {"warn": 0.97, "alert": 0.85}


def test_the_migration_fills_the_detail_from_the_tasks_kept(w):
    seed(w.store, w.clock(), w.ids)
    before = w.store.history_detail()
    assert sum(r["tasks"] for r in before) == len(MIX)
    # Back to the schema before migration 11: later ones are undone too,
    # since a store migrates from its highest version.
    w.store._exec("DROP TABLE task_history_detail")
    w.store._exec("DROP TABLE provider_health")
    w.store._exec("DELETE FROM schema_version WHERE version >= 11")
    w.store.migrate()
    assert w.store.history_detail() == before


def test_users_with_balance_reserved_limits_and_active_tasks(w):
    w.post("/api/admin/users/alice/credits", {"amount": 5})
    t1, _ = w.store.submit(w.ids["alice"], "demo", {"prompt": "a"}, now=w.clock(), deadline_at=w.clock() + 60,
                           cost=4)
    w.store.submit(w.ids["alice"], "demo", {"prompt": "b"}, now=w.clock(), deadline_at=w.clock() + 60, cost=2)
    w.store.submit(w.ids["bob"], "demo", {"prompt": "c"}, now=w.clock(), deadline_at=w.clock() + 60)
    res = w.get("/api/admin/users")
    assert res.status == 200, res
    users = {u["name"]: u for u in res.json()["users"]}
    assert list(users) == ["alice", "bob", "root"]
    assert users["alice"]["credits"] == {"balance": 55 - 6, "reserved": 6}
    assert users["alice"]["active"] == 2 and users["bob"]["active"] == 1 and users["root"]["active"] == 0
    assert users["bob"]["credits"] is None and users["root"]["admin"] is True
    assert users["bob"]["limits"] == {"max_active": 100, "rate_per_s": 10.0, "max_priority": 0}
    w.store.cancel(t1["id"], w.ids["alice"], now=w.clock())
    alice = {u["name"]: u for u in w.get("/api/admin/users").json()["users"]}["alice"]
    assert alice["credits"] == {"balance": 53, "reserved": 2} and alice["active"] == 1
    assert w.get("/api/admin/users?x=1").status == 400


ADMIN_ONLY = [("GET", "/api/admin/stats"), ("GET", "/api/admin/users"), ("GET", "/api/admin/tasks/search"),
              ("POST", "/api/admin/tasks/bulk")]


@pytest.mark.parametrize("method,path", ADMIN_ONLY)
def test_the_console_api_answers_admins_only(w, method, path):
    seed(w.store, w.clock(), w.ids, MIX[:3])
    body = {"action": "cancel", "ids": ["t_" + "0" * 26]}
    for token, status in ((w.alice, 403), ("hf_nobody", 401), ("", 401)):
        res = w.client.request(method, path, json_body=body if method == "POST" else None,
                               headers={"Idempotency-Key": "k1"}, token=token or None)
        assert res.status == status, (token, res)
        err = res.json()["error"]
        assert err["code"] in ("forbidden", "unauthorized") and "mix" not in res.body.decode()
    assert w.store.tasks_by_ids([]) == {}
    statuses = {t["status"] for t, _ in w.store.find_tasks(limit=10)[0]}
    assert statuses == {"succeeded"}        # nothing was cancelled by a refused call


def search(w, **query):
    res = w.get("/api/admin/tasks/search", query={"limit": 200, "count": 1, **query})
    assert res.status == 200, res
    body = res.json()
    assert body["total"] == len(body["tasks"])
    return {t["task"]["id"] for t in body["tasks"]}, body


def test_search_filters_every_users_tasks(w):
    seeded = seed(w.store, w.clock(), w.ids)
    rows = {tid: row for tid, row, _ in seeded}
    finish = {tid: f for tid, _, f in seeded}

    def where(pred):
        return {tid for tid, row in rows.items() if pred(row)}

    assert search(w)[0] == set(rows)
    found, body = search(w, status="failed")
    assert found == where(lambda r: r[2] == "failed")
    assert all(t["user"] in ("alice", "bob") for t in body["tasks"])
    assert search(w, status="failed,cancelled", provider="demo")[0] == \
        where(lambda r: r[2] in ("failed", "cancelled") and r[0] == "demo")
    assert search(w, user="bob")[0] == where(lambda r: r[5] == "bob")
    assert search(w, error="result_expired")[0] == where(lambda r: r[3] == "result_expired")
    assert search(w, error="timeout", user="alice", provider="demo")[0] == \
        where(lambda r: r[3] == "timeout" and r[5] == "alice")
    # The time range is on created_at: [since, until).
    today = datetime.fromtimestamp(day_start(w.clock()), timezone.utc)
    created = {tid: finish[tid] - rows[tid][4] for tid in rows}
    assert search(w, since=today.isoformat())[0] == {t for t in rows if created[t] >= today.timestamp()}
    assert search(w, until=today.strftime("%Y-%m-%d"))[0] == {t for t in rows if created[t] < today.timestamp()}
    assert search(w, since=str(today.timestamp() - DAY), until=today.isoformat().replace("+00:00", "Z"))[0] == \
        {t for t in rows if today.timestamp() - DAY <= created[t] < today.timestamp()}
    # Text: a task id, a dedupe key, or words in the params.
    some = seeded[5][0]
    assert search(w, q=some)[0] == {some}
    assert search(w, q="mix-7")[0] == {seeded[7][0]}
    assert search(w, q="kie failed")[0] == where(lambda r: r[0] == "kie" and r[2] == "failed")
    assert search(w, q="KIE FAILED")[0] == where(lambda r: r[0] == "kie" and r[2] == "failed")
    # % and _ are letters, not wildcards.
    w.store.submit(w.ids["bob"], "demo", {"prompt": "50%_off"}, now=w.clock(), deadline_at=w.clock() + 60)
    assert len(search(w, q="50%_off")[0]) == 1 and search(w, q="0%")[1]["total"] == 1
    assert search(w, q="_", status="failed")[0] == set()


def test_search_pages_newest_first(w):
    seeded = seed(w.store, w.clock(), w.ids)
    seen, before = [], None
    while True:
        query = {"limit": 7, "provider": "demo", "count": 1}
        if before:
            query["before"] = before
        body = w.get("/api/admin/tasks/search", query=query).json()
        assert body["total"] == sum(1 for _, r, _ in seeded if r[0] == "demo")
        seen += [t["task"]["id"] for t in body["tasks"]]
        before = body["next"]
        if not before:
            break
    assert seen == sorted({tid for tid, r, _ in seeded if r[0] == "demo"}, reverse=True)
    assert w.get("/api/admin/tasks/search?limit=3").json()["total"] is None


@pytest.mark.parametrize("query,word", [
    ("status=finished", "unknown status"), ("status=failed,", "unknown status"),
    ("user=nobody", "no user named"), ("since=yesterday", "ISO 8601"), ("until=1e300", "out of range"),
    ("since=2026-01-02&until=2026-01-01", "until must be after since"), ("limit=0", "limit"),
    ("limit=201", "limit"), ("limit=x", "limit"), ("before=t_123", "before"), ("count=2", "count"),
    ("error=Bad Code!", "error must be"), ("stuck=1", "unknown parameter"), ("q=" + "x" * 201, "q must be"),
    ("since=nan", "out of range"),
])
def test_bad_filters_are_400_json(w, query, word):
    res = w.get("/api/admin/tasks/search?" + query)
    assert res.status == 400, res
    assert res.headers["content-type"].startswith("application/json")
    assert word in res.json()["error"]["message"]


def retries_of(store, ids):
    rows = store._exec("SELECT retry_of, COUNT(*) FROM tasks WHERE retry_of IS NOT NULL GROUP BY retry_of").fetchall()
    counts = dict(rows)
    return {i: counts.get(i, 0) for i in ids}


def test_bulk_retry_makes_one_retry_per_task_whatever_is_sent_again(w):
    seeded = seed(w.store, w.clock(), w.ids)
    failed = sorted(tid for tid, r, _ in seeded if r[2] in ("failed", "cancelled") and r[0] == "demo")
    others = [tid for tid, r, _ in seeded if r[0] == "kie" and r[2] == "failed"]   # kie is not configured
    ids = failed + others + [seeded[0][0]]
    first = w.post("/api/admin/tasks/bulk", {"action": "retry", "ids": ids}, headers={"Idempotency-Key": "b1"})
    assert first.status == 200, first
    body = first.json()
    assert body["outcomes"] == {"retried": len(failed), "refused": len(others), "not_retryable": 1}
    assert body["replayed"] is False
    # The same click again: the same answer, nothing new.
    again = w.post("/api/admin/tasks/bulk", {"action": "retry", "ids": ids}, headers={"Idempotency-Key": "b1"})
    assert again.json()["replayed"] is True and again.json()["results"] == body["results"]
    # A new action on the same tasks: each has its retry already.
    third = w.post("/api/admin/tasks/bulk", {"action": "retry", "ids": failed}, headers={"Idempotency-Key": "b2"})
    assert third.json()["outcomes"] == {"already_retried": len(failed)}
    assert retries_of(w.store, failed) == {i: 1 for i in failed}
    assert retries_of(w.store, others) == {i: 0 for i in others}
    # Each retry is its user's, with the same params and a reservation of theirs.
    for r in body["results"]:
        if r["outcome"] == "retried":
            new, old = w.store.get_task(r["retry"]), w.store.get_task(r["id"])
            assert (new["user_id"], new["params"], new["retry_of"], new["status"]) == \
                (old["user_id"], old["params"], old["id"], "queued")
    # The key names one action: another body under it is refused.
    res = w.post("/api/admin/tasks/bulk", {"action": "cancel", "ids": ids}, headers={"Idempotency-Key": "b1"})
    assert res.status == 409 and res.json()["error"]["code"] == "idempotency_key_reused"


def test_a_bulk_retry_sent_by_many_threads_at_once_makes_one_retry_each(w):
    seeded = seed(w.store, w.clock(), w.ids)
    failed = sorted(tid for tid, r, _ in seeded if r[2] == "failed" and r[0] == "demo")
    answers, errors = [], []
    start = threading.Barrier(6)

    def click(key):
        try:
            start.wait()
            res = w.post("/api/admin/tasks/bulk", {"action": "retry", "ids": failed},
                         headers={"Idempotency-Key": key})
            answers.append(res.json())
        except Exception as exc:       # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=click, args=(k,)) for k in ("same", "same", "same", "x", "y", "z")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(answers) == 6
    assert retries_of(w.store, failed) == {i: 1 for i in failed}
    made = sum(a["outcomes"].get("retried", 0) for a in answers if not a["replayed"])
    assert made == len(failed)


def test_bulk_cancel_cancels_active_tasks_of_every_user(w):
    seed(w.store, w.clock(), w.ids, MIX[:2])
    live = [w.store.submit(w.ids[u], "demo", {"prompt": u}, now=w.clock(), deadline_at=w.clock() + 60,
                           cost=3 if u == "alice" else 0)[0]["id"] for u in ("alice", "bob", "alice")]
    done = w.store.find_tasks(statuses=["succeeded"])[0][0][0]["id"]
    res = w.post("/api/admin/tasks/bulk", {"action": "cancel", "ids": live + [done, "t_" + "7" * 26]},
                 headers={"Idempotency-Key": "c1"})
    assert res.status == 200, res
    assert res.json()["outcomes"] == {"cancelled": 3, "not_active": 1, "not_found": 1}
    assert {w.store.get_task(i)["status"] for i in live} == {"cancelled"}
    assert {w.store.get_task(i)["credits"] for i in live} == {"refunded", "none"}
    users = {u["name"]: u for u in w.get("/api/admin/users").json()["users"]}
    assert users["alice"]["credits"] == {"balance": 50, "reserved": 0}


@pytest.mark.parametrize("body,headers,word", [
    ({"action": "retry", "ids": ["t_" + "0" * 26]}, {}, "Idempotency-Key header is required"),
    ({"action": "delete", "ids": ["t_" + "0" * 26]}, {"Idempotency-Key": "k"}, "action must be"),
    ({"action": "retry", "ids": []}, {"Idempotency-Key": "k"}, "ids must be"),
    ({"action": "retry", "ids": "t_" + "0" * 26}, {"Idempotency-Key": "k"}, "ids must be"),
    ({"action": "retry", "ids": ["t_" + "0" * 26] * 1001}, {"Idempotency-Key": "k"}, "ids must be"),
    ({"action": "retry", "ids": ["nope"]}, {"Idempotency-Key": "k"}, "every id"),
    ({"action": "retry", "ids": [1]}, {"Idempotency-Key": "k"}, "every id"),
    ({"action": "retry", "ids": ["t_" + "0" * 26], "all": True}, {"Idempotency-Key": "k"}, "unknown field"),
    ({"action": "retry", "ids": ["t_" + "0" * 26]}, {"Idempotency-Key": "has space"}, "Idempotency-Key"),
])
def test_bad_bulk_requests_are_400_json(w, body, headers, word):
    res = w.post("/api/admin/tasks/bulk", body, headers=headers)
    assert res.status == 400, res
    assert word in res.json()["error"]["message"]


# -- the metrics the alert rules use ---------------------------------------------

ALERTS = os.path.join(ROOT, "docs", "alerts.yml")


def alert_rules():
    text = open(ALERTS).read()
    return re.findall(r"^\s+- alert: (\S+)\n((?:\s{8}.*\n)+)", text, re.M)


def test_the_alert_rules_use_metrics_that_metrics_exports(w):
    text = w.client.get("/metrics", token=None).body.decode()
    exported = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    rules = alert_rules()
    assert len(rules) >= 6
    used = set()
    for name, body in rules:
        expr = re.search(r"expr: (.+)", body).group(1)
        names = set(re.findall(r"\b(holdfast_[a-z_]+)\b", expr))
        assert names, name
        used |= names
    # Histogram and counter samples carry suffixes; the family is what /metrics declares.
    missing = {n for n in used if n not in exported and re.sub(r"_(bucket|sum|count)$", "", n) not in exported}
    assert not missing, missing


def test_the_alert_rules_hold_the_configured_defaults():
    defaults = Config()
    rules = dict(alert_rules())
    thresholds = {name: float(re.search(r"[<>] ?([0-9.]+)\s*$", re.search(r"expr: (.+)", body).group(1)).group(1))
                  for name, body in rules.items()
                  if name.startswith(("HoldfastTaskSuccessRate", "HoldfastPollDelay"))}
    assert thresholds == {
        "HoldfastTaskSuccessRateLow": defaults.success_rate_warn,
        "HoldfastTaskSuccessRateCritical": defaults.success_rate_alert,
        "HoldfastPollDelayHigh": defaults.poll_delay_warn_s,
        "HoldfastPollDelayCritical": defaults.poll_delay_alert_s,
    }
    assert "severity: warning" in rules["HoldfastTaskSuccessRateLow"]
    assert "severity: critical" in rules["HoldfastPollDelayCritical"]


# -- the console in Chromium ------------------------------------------------------

@pytest.fixture
def seeded_server(tmp_path):
    """A real server over a store that holds MIX, with users root (admin),
    alice (credits) and bob: (server, tokens, seeded rows)."""
    data = tmp_path / "data"
    store = open_store("sqlite", str(data))
    tokens, ids = {}, {}
    for name, kw in (("root", {"admin": True}), ("alice", {"credits": 100}), ("bob", {})):
        user, tokens[name] = store.create_user(name, token="hf_" + secrets.token_urlsafe(24), **kw)
        ids[name] = user["id"]
    seeded = seed(store, time.time(), ids)
    store.close()
    server = ServerProcess(data).start()
    try:
        yield server, tokens, seeded
    finally:
        server.stop()


@pytest.fixture
def context(browser):
    ctx = browser.new_context(viewport={"width": 1440, "height": 1000})
    ctx.set_default_timeout(20_000)
    yield ctx
    ctx.close()


def open_console(context, server, token):
    page = context.new_page()
    page.errors, page.admin_calls = [], []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("request", lambda r: page.admin_calls.append(r.url) if "/api/admin/" in r.url else None)
    page.add_init_script(CSP_WATCH)
    page.goto(server.url + "/console")
    page.fill("#token-input", token)
    page.click("#token-form button[type=submit]")
    return page


def shot(page, name):
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, name), full_page=True)


CHART_DATA = """() => Object.fromEntries(Object.entries(window.holdfastConsole.charts).map(([p, c]) =>
  [p, {success: c.success.data, duration: c.duration.data, failures: c.failures.data,
       codes: c.failures.series.slice(1).map((s) => s.label),
       drawn: [c.success, c.duration, c.failures].every((u) => u.ctx.canvas.width > 0)}]))"""


def test_an_admin_sees_charts_drawn_from_the_store(context, seeded_server):
    server, tokens, seeded = seeded_server
    page = open_console(context, server, tokens["root"])
    page.wait_for_selector("body[data-ready='1']")
    shot(page, "console-1440.png")
    charts = page.evaluate(CHART_DATA)
    stats = page.evaluate("window.holdfastConsole.stats()")
    want = expected_history(seeded)
    assert set(charts) == set(want) == {"demo", "kie"}
    compared = 0
    for provider, days in want.items():
        c = charts[provider]
        assert c["drawn"]
        xs = c["success"][0]
        assert xs == stats["day_starts"] and len(xs) == 14
        codes = c["codes"]
        assert set(codes) == {code for d in days.values() for code in d["failures"]}
        for i, x in enumerate(xs):
            day = history_day(x)
            d = days.get(day)
            if d is None:
                assert c["success"][1][i] is None and c["duration"][1][i] is None
                assert all(c["failures"][1 + k][i] == 0 for k in range(len(codes)))
                continue
            assert c["success"][1][i] == pytest.approx(d["rate"] * 100)
            assert c["duration"][1][i] == d["p50"] and c["duration"][2][i] == d["p95"]
            for k, code in enumerate(codes):
                assert c["failures"][1 + k][i] == d["failures"].get(code, 0)
            compared += 1
        # The threshold lines are the configured defaults.
        assert set(c["success"][2]) == {90} and set(c["success"][3]) == {85}
    assert compared == 5
    # Counts by status and provider, with today's level.
    demo = page.locator("#counts tr[data-provider='demo'] td").all_inner_texts()
    assert demo[:7] == ["demo", "0", "0", str(9 + 18 + 7), "1", str(2 + 1 + 1), "1"]
    assert page.get_attribute("#counts tr[data-provider='demo'] td:last-child", "class") == "level-warn"
    assert page.get_attribute("#counts tr[data-provider='kie'] td:last-child", "class") == "level-alert"
    assert page.locator("#live .card").count() >= 8
    assert page.evaluate("window.__csp") == [] and not page.errors
    page.set_viewport_size({"width": 375, "height": 800})
    page.wait_for_function("() => window.holdfastConsole.charts.demo.success.width < 375")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    shot(page, "console-375.png")


def test_filters_search_and_a_bulk_retry_clicked_twice(context, seeded_server):
    server, tokens, seeded = seeded_server
    rows = {tid: r for tid, r, _ in seeded}
    page = open_console(context, server, tokens["root"])
    page.wait_for_selector("body[data-ready='1']")

    def shown():
        page.wait_for_function("() => document.getElementById('found').textContent.length > 0")
        return set(page.eval_on_selector_all("#tasks tr[data-id]", "rs => rs.map((r) => r.dataset.id)"))

    def find():
        page.evaluate("document.getElementById('found').textContent = ''")
        page.click("#filters button[type=submit]")
        return shown()

    assert shown() == set(rows)
    page.check("#f-status input[value=failed]")
    page.select_option("#f-user", "alice")
    assert find() == {t for t, r in rows.items() if r[2] == "failed" and r[5] == "alice"}
    page.fill("#f-provider", "demo")
    page.select_option("#f-error", "timeout")
    timeouts = {t for t, r in rows.items() if r[2] == "failed" and r[5] == "alice" and r[0] == "demo"
                and r[3] == "timeout"}
    assert find() == timeouts and len(timeouts) == 2
    page.select_option("#f-error", "")
    page.uncheck("#f-status input[value=failed]")
    page.select_option("#f-user", "")
    page.fill("#f-provider", "")
    page.fill("#f-q", "mix-12")
    assert find() == {seeded[12][0]}
    page.fill("#f-q", "kie succeeded")
    assert find() == {t for t, r in rows.items() if r[0] == "kie" and r[2] == "succeeded"}
    shot(page, "console-search.png")

    # A selection: alice's failed demo tasks. Retry it, then click again.
    page.fill("#f-q", "")
    page.check("#f-status input[value=failed]")
    page.select_option("#f-user", "alice")
    page.fill("#f-provider", "demo")
    selected = find()
    assert selected == {t for t, r in rows.items() if r[2] == "failed" and r[5] == "alice" and r[0] == "demo"}
    dialogs = []

    def accept(dialog):
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    page.click("#bulk-retry")
    page.wait_for_function("() => document.getElementById('bulk-result').dataset.outcomes")
    first = page.get_attribute("#bulk-result", "data-outcomes")
    page.evaluate("delete document.getElementById('bulk-result').dataset.outcomes")
    page.click("#bulk-retry")
    page.wait_for_function("() => document.getElementById('bulk-result').dataset.outcomes")
    assert dialogs == [f"Retry {len(selected)} tasks of every user that match these filters?"] * 2
    assert first == '{"retried":%d}' % len(selected)
    assert "already done" in page.inner_text("#bulk-result")
    shot(page, "console-bulk-retry.png")
    store = open_store("sqlite", server.data_dir)
    try:
        assert retries_of(store, selected) == {t: 1 for t in selected}
        assert retries_of(store, set(rows) - selected) == {t: 0 for t in set(rows) - selected}
    finally:
        store.close()
    assert page.evaluate("window.__csp") == [] and not page.errors


def test_an_admin_grants_credits_once_even_when_clicked_twice(context, seeded_server):
    server, tokens, _ = seeded_server
    me = requests.get(server.url + "/api/me", headers={"Authorization": f"Bearer {tokens['alice']}"}, timeout=10)
    before = me.json()["credits"]["balance"]
    page = open_console(context, server, tokens["root"])
    page.wait_for_selector("body[data-ready='1']")
    grants = []
    page.on("request", lambda r: grants.append(r.url) if r.url.endswith("/users/alice/credits") else None)
    page.fill("#users tr[data-user=alice] input", "7")
    page.dblclick("#users tr[data-user=alice] button")
    page.wait_for_function("document.getElementById('grant-result').textContent.includes('balance now')")
    assert page.text_content("#grant-result") == f"alice: granted 7; balance now {before + 7}."
    page.wait_for_timeout(300)
    assert len(grants) == 1, grants
    me = requests.get(server.url + "/api/me", headers={"Authorization": f"Bearer {tokens['alice']}"}, timeout=10)
    assert me.json()["credits"]["balance"] == before + 7
    page.wait_for_function(f"document.querySelector('#users tr[data-user=alice]').textContent.includes('{before + 7}')")
    for bad in ("0", "1.5"):
        page.fill("#users tr[data-user=alice] input", bad)
        page.click("#users tr[data-user=alice] button")
    assert requests.get(server.url + "/api/me", headers={"Authorization": f"Bearer {tokens['alice']}"},
                        timeout=10).json()["credits"]["balance"] == before + 7
    shot(page, "console-grant.png")


def test_a_non_admin_gets_no_console_and_no_admin_data(context, seeded_server):
    server, tokens, _ = seeded_server
    page = open_console(context, server, tokens["alice"])
    page.wait_for_selector("#denied", state="visible")
    assert page.is_hidden("#console")
    assert page.evaluate("window.holdfastConsole.stats()") is None
    assert page.evaluate("Object.keys(window.holdfastConsole.charts).length") == 0
    page.wait_for_timeout(500)
    assert page.admin_calls == []
    assert "mix" not in page.content()
    shot(page, "console-non-admin.png")
    for path in ("/api/admin/stats", "/api/admin/users", "/api/admin/tasks/search?q=mix"):
        res = requests.get(server.url + path, headers={"Authorization": f"Bearer {tokens['alice']}"}, timeout=10)
        assert res.status_code == 403 and "mix" not in res.text


# -- the store's share, on every backend -----------------------------------------

def test_the_console_reads_on_every_backend(store, clock):
    ids = {}
    for name, kw in (("alice", {"credits": 20}), ("bob", {})):
        ids[name] = store.create_user(name, **kw)[0]["id"]
    seeded = seed(store, clock(), ids)
    rows = {tid: r for tid, r, _ in seeded}
    detail = store.history_detail()
    assert sum(r["tasks"] for r in detail) == len(MIX)
    assert sum(r["tasks"] for r in detail if r["error_code"] == "result_expired") == 2
    found, cursor, total = store.find_tasks(error_code="timeout", count=True)
    assert {t["id"] for t, _ in found} == {t for t, r in rows.items() if r[3] == "timeout"} and total == 2
    assert cursor is None and {name for _, name in found} == {"alice"}
    found, _, _ = store.find_tasks(text="KIE Failed", user_id=ids["bob"], statuses=["failed"])
    assert {t["id"] for t, _ in found} == {t for t, r in rows.items() if r[0] == "kie" and r[2] == "failed"
                                          and r[5] == "bob"}
    store.submit(ids["bob"], "demo", {"prompt": "100%_sure"}, now=clock(), deadline_at=clock() + 60, cost=0)
    store.submit(ids["alice"], "demo", {"prompt": "x"}, now=clock(), deadline_at=clock() + 60, cost=4)
    assert len(store.find_tasks(text="0%_s")[0]) == 1 and store.find_tasks(text="%")[2] is None
    # Unescaped, "mix_1" would match "mix 1 ..." (and "mix%" everything).
    assert store.find_tasks(text="0%_s", count=True)[2] == 1 and store.find_tasks(text="mix_1", count=True)[2] == 0
    assert store.find_tasks(text="mix%", count=True)[2] == 0 and store.find_tasks(text="mix 1", count=True)[2] == 11
    assert len(store.find_tasks(text="%", count=True)[0]) == 1
    users = {u["name"]: u for u in store.admin_users()}
    assert (users["alice"]["reserved"], users["alice"]["active"], users["bob"]["active"]) == (4, 1, 1)
    assert store.webhook_counts(since=0) == {"pending": 0, "failing": 0, "failed": 0}
    assert store.retried(list(rows)) == set()
    assert set(store.tasks_by_ids(list(rows)[:3] + ["t_" + "0" * 26])) == set(list(rows)[:3])


def test_stuck_tasks_are_listed_with_why(context, seeded_server):
    """The worker of a live server ends or takes a stuck task within
    seconds, so the store's answer is held still at the browser: the
    console's words for each reason are what is tested here (the API's
    reasons are tested in test_accounts.py)."""
    server, tokens, seeded = seeded_server
    store = open_store("sqlite", server.data_dir)
    try:
        task = store.get_task(seeded[0][0])
    finally:
        store.close()
    answer = {"now": iso(time.time()), "tasks": [
        {"task": task_json(task), "user": "alice", "stuck": ["past_deadline", "lease_expired"],
         "lease_owner": "host:1:abc", "lease_expires_at": iso(time.time() - 30), "next_poll_at": None}]}
    context.route("**/api/admin/tasks?stuck=1*",
                  lambda route: route.fulfill(status=200, content_type="application/json", body=json.dumps(answer)))
    page = open_console(context, server, tokens["root"])
    page.wait_for_selector(f"#stuck tr[data-id='{task['id']}']")
    reasons = page.eval_on_selector_all(f"#stuck tr[data-id='{task['id']}'] li",
                                        "ls => ls.map((l) => [l.dataset.reason, l.textContent])")
    assert [r for r, _ in reasons] == ["past_deadline", "lease_expired"]
    assert "deadline" in reasons[0][1] and "lease" in reasons[1][1]
    assert "host:1:abc" in page.inner_text(f"#stuck tr[data-id='{task['id']}']")
    assert page.is_hidden("#stuck-empty")
    shot(page, "console-stuck.png")
