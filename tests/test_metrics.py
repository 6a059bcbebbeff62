"""GET /metrics: valid Prometheus text, the promised families, and counters
that move with real submissions, polls, downloads, refunds and errors.

The registry is per process and other tests bump it too, so every check is
on the difference between two scrapes."""

import math
import re

import pytest

import metrics
from api import create_app
from providers import build_providers
from support import WSGIClient, free_port

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(?:,|$)')


def parse(text):
    """{family: {"type", "help", "samples": {(name, labels tuple): value}}},
    failing on anything the text format does not allow."""
    families, current = {}, None
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help = line[7:].partition(" ")
            assert name not in families, f"{name} declared twice"
            current = name
            families[name] = {"help": help, "type": None, "samples": {}}
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name == current and kind in ("counter", "gauge", "histogram"), line
            families[name]["type"] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            sample, raw, value = m.groups()
            labels = []
            if raw:
                pos = 0
                while pos < len(raw):
                    pair = _PAIR.match(raw, pos)
                    assert pair, f"bad labels in {line!r}"
                    labels.append((pair.group(1), pair.group(2)))
                    pos = pair.end()
            family = _family_of(sample, families)
            assert family == current, f"{sample} outside its family's block"
            kind = families[family]["type"]
            assert kind is not None, f"{sample} before its TYPE"
            if kind == "counter":
                assert family.endswith("_total")
            value = float(value)
            assert not math.isnan(value)
            key = (sample, tuple(sorted(labels)))
            assert key not in families[family]["samples"], f"duplicate sample {line!r}"
            families[family]["samples"][key] = value
    for name, fam in families.items():
        if fam["type"] == "histogram":
            _check_histogram(name, fam["samples"])
    return families


def _family_of(sample, families):
    if sample in families:
        return sample
    for suffix in ("_bucket", "_sum", "_count"):
        base = sample[: -len(suffix)]
        if sample.endswith(suffix) and families.get(base, {}).get("type") == "histogram":
            return base
    raise AssertionError(f"sample {sample} belongs to no declared family")


def _check_histogram(name, samples):
    series = {}
    for (sample, labels), value in samples.items():
        rest = tuple(p for p in labels if p[0] != "le")
        series.setdefault(rest, {"buckets": []})
        if sample.endswith("_bucket"):
            le = dict(labels)["le"]
            series[rest]["buckets"].append((math.inf if le == "+Inf" else float(le), value))
        else:
            series[rest][sample[len(name) + 1:]] = value
    for rest, s in series.items():
        buckets = sorted(s["buckets"])
        assert buckets and buckets[-1][0] == math.inf, f"{name}{rest}: no +Inf bucket"
        counts = [c for _, c in buckets]
        assert counts == sorted(counts), f"{name}{rest}: buckets not cumulative"
        assert counts[-1] == s["count"], f"{name}{rest}: +Inf bucket != _count"
        assert "sum" in s


def value(families, family, sample=None, **labels):
    samples = families[family]["samples"]
    return samples.get((sample or family, tuple(sorted(labels.items()))), 0.0)


def total(families, family, sample=None, **labels):
    """The sum over every series of `family` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (name, lab), v in families[family]["samples"].items()
               if name == (sample or family) and want <= set(lab))


@pytest.fixture
def paid_app(sqlite_store, config, files, clock):
    """demo costing 1 credit, and a ComfyUI provider nobody listens for."""
    from worker import Worker
    providers = build_providers({
        "demo": {"duration_s": 1.0, "poll_interval_s": 0.5, "cost": 1},
        "dead": {"type": "comfyui", "url": f"http://127.0.0.1:{free_port()}", "timeout_s": 1},
    })
    worker = Worker(sqlite_store, providers, files, clock=clock, owner="test:1:m")
    app = create_app(sqlite_store, providers, config, worker=worker, files=files, clock=clock)
    return app, worker


DEAD_TASK = {"provider": "dead", "params": {"workflow": {"1": {"class_type": "KSampler", "inputs": {}}}}}


def scrape(client):
    res = client.get("/metrics", token=None)
    assert res.status == 200, res
    assert res.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(res.body.decode())


EXPECTED = {
    "holdfast_tasks": ("gauge", {"provider", "status"}),
    "holdfast_submits_total": ("counter", {"provider"}),
    "holdfast_dedupe_hits_total": ("counter", {"provider"}),
    "holdfast_submit_refusals_total": ("counter", {"code"}),
    "holdfast_polls_total": ("counter", {"provider", "result"}),
    "holdfast_poll_lag_seconds": ("histogram", {"le"}),
    "holdfast_provider_call_seconds": ("histogram", {"provider", "call", "le"}),
    "holdfast_provider_errors_total": ("counter", {"provider", "call", "kind"}),
    "holdfast_downloads_total": ("counter", {"provider", "outcome"}),
    "holdfast_download_bytes_total": ("counter", {"provider"}),
    "holdfast_tasks_finished_total": ("counter", {"provider", "status"}),
    "holdfast_charges_total": ("counter", {"provider"}),
    "holdfast_refunds_total": ("counter", {"provider"}),
    "holdfast_event_streams": ("gauge", {"kind"}),
    "holdfast_event_streams_max": ("gauge", set()),
    "holdfast_store_up": ("gauge", set()),
    "holdfast_scheduler_up": ("gauge", set()),
    "holdfast_slow_down": ("gauge", set()),
    "holdfast_poll_behind_seconds": ("gauge", set()),
}


def test_metrics_need_no_token_and_list_every_family_with_its_type_and_labels(paid_app, sqlite_store, clock):
    app, worker = paid_app
    client = WSGIClient(app)
    user, token = sqlite_store.create_user("carol", credits=5)
    client.post("/api/tasks", {"provider": "demo", "params": {"prompt": "x"}}, token=token)
    client.post("/api/tasks", DEAD_TASK, token=token)
    worker.run_once(clock.advance(1))
    families = scrape(client)
    for name, (kind, labels) in EXPECTED.items():
        assert name in families, f"{name} missing"
        assert families[name]["type"] == kind, name
        assert families[name]["help"], name
        for sample, lab in families[name]["samples"]:
            want = labels if sample.endswith("_bucket") or kind != "histogram" else labels - {"le"}
            assert {k for k, _ in lab} == want, (sample, lab)
    assert value(families, "holdfast_store_up") == 1
    assert value(families, "holdfast_tasks", provider="demo", status="running") == 1
    assert value(families, "holdfast_tasks", provider="dead", status="queued") == 1


def test_counters_move_with_real_actions(paid_app, sqlite_store, clock):
    app, worker = paid_app
    client = WSGIClient(app)
    before = scrape(client)
    _, token = sqlite_store.create_user("carol", credits=10)
    _, broke = sqlite_store.create_user("dave", credits=0)

    first = client.post("/api/tasks", {"provider": "demo", "params": {"prompt": "x"}, "dedupe_key": "k1"},
                        token=token)
    again = client.post("/api/tasks", {"provider": "demo", "params": {"prompt": "x"}, "dedupe_key": "k1"},
                        token=token)
    assert (first.status, again.status) == (201, 200)
    doomed = client.post("/api/tasks", {"provider": "demo", "params": {"prompt": "y"}}, token=token).json()
    assert client.post(f"/api/tasks/{doomed['task']['id']}/cancel", token=token).status == 200
    assert client.post("/api/tasks", {"provider": "demo", "params": {}}, token=broke).status == 402
    client.post("/api/tasks", DEAD_TASK, token=token)

    # Claimed 3 s after it was due: the poll lag histogram must see that.
    clock.advance(3)
    task_id = first.json()["task"]["id"]
    for _ in range(20):
        worker.run_once(clock())
        if client.get(f"/api/tasks/{task_id}", token=token).json()["task"]["status"] == "succeeded":
            break
        clock.advance(0.5)
    else:
        raise AssertionError("the demo task did not finish")
    after = scrape(client)

    def delta(family, sample=None, **labels):
        return total(after, family, sample, **labels) - total(before, family, sample, **labels)

    assert delta("holdfast_submits_total", provider="demo") == 3
    assert delta("holdfast_submits_total", provider="dead") == 1
    assert delta("holdfast_dedupe_hits_total", provider="demo") == 1
    assert delta("holdfast_submit_refusals_total", code="insufficient_credits") == 1
    assert delta("holdfast_refunds_total", provider="demo") == 1
    assert delta("holdfast_charges_total", provider="demo") == 1
    assert delta("holdfast_tasks_finished_total", provider="demo", status="succeeded") == 1
    assert delta("holdfast_tasks_finished_total", provider="demo", status="cancelled") == 1
    assert delta("holdfast_downloads_total", provider="demo", outcome="saved") == 1
    assert delta("holdfast_download_bytes_total", provider="demo") > 0
    polls = delta("holdfast_polls_total", provider="demo")
    assert polls >= 2 and delta("holdfast_polls_total", provider="demo", result="succeeded") == 1
    assert delta("holdfast_provider_call_seconds", "holdfast_provider_call_seconds_count",
                 provider="demo", call="poll") == polls
    assert delta("holdfast_provider_errors_total", provider="dead", call="submit", kind="unavailable") >= 1
    # A submit that never reached the provider (connection refused) is sent
    # again as it was: there is no job to ask about.
    assert delta("holdfast_polls_total", provider="dead") == 0
    assert delta("holdfast_provider_errors_total", provider="dead", call="poll", kind="unavailable") == 0
    lag_count = delta("holdfast_poll_lag_seconds", "holdfast_poll_lag_seconds_count")
    assert lag_count >= polls + 2          # every claim: the demo task's, and the dead one's
    assert delta("holdfast_poll_lag_seconds", "holdfast_poll_lag_seconds_sum") >= 6.0  # two tasks 3 s late
    assert delta("holdfast_poll_lag_seconds", "holdfast_poll_lag_seconds_bucket", le="2") < lag_count
    assert value(after, "holdfast_tasks", provider="demo", status="succeeded") == 1
    assert value(after, "holdfast_tasks", provider="demo", status="cancelled") == 1


def test_open_streams_show_in_the_gauge(paid_app, sqlite_store):
    app, _ = paid_app
    client = WSGIClient(app)
    hub = app.config["holdfast.events"]
    assert hub.admit("sse", 1) and hub.admit("sse", 2) and hub.admit("poll", 1)
    try:
        families = scrape(client)
        assert value(families, "holdfast_event_streams", kind="sse") == 2
        assert value(families, "holdfast_event_streams", kind="poll") == 1
        assert value(families, "holdfast_event_streams_max") == hub.max_waiters
    finally:
        hub.leave("sse", 1)
        hub.leave("sse", 2)
        hub.leave("poll", 1)
    assert value(scrape(client), "holdfast_event_streams", kind="sse") == 0


def test_a_store_that_does_not_answer_is_store_up_0_not_a_500(paid_app, sqlite_store, monkeypatch):
    from errors import StoreUnavailable
    app, _ = paid_app

    def down():
        raise StoreUnavailable("disk on fire")

    monkeypatch.setattr(sqlite_store, "task_counts", down)
    families = scrape(WSGIClient(app))
    assert value(families, "holdfast_store_up") == 0
    assert families["holdfast_tasks"]["samples"] == {}


class TestRegistry:
    def test_label_values_are_escaped_and_histograms_are_cumulative(self):
        reg = metrics.Registry()
        c = reg.counter("x_total", "a help with \\ and\nnewline", ("name",))
        h = reg.histogram("lat_seconds", "latency", ("op",), buckets=(0.1, 1.0))
        c.inc('we"ird\\\nname')
        c.inc('we"ird\\\nname', amount=2)
        for v in (0.05, 0.5, 0.5, 7.0):
            h.observe(v, "get")
        fams = parse(reg.render())
        assert value(fams, "x_total", name='we\\"ird\\\\\\nname') == 3
        assert value(fams, "lat_seconds", "lat_seconds_bucket", op="get", le="0.1") == 1
        assert value(fams, "lat_seconds", "lat_seconds_bucket", op="get", le="1") == 3
        assert value(fams, "lat_seconds", "lat_seconds_bucket", op="get", le="+Inf") == 4
        assert value(fams, "lat_seconds", "lat_seconds_sum", op="get") == 8.05
        assert fams["x_total"]["help"] == "a help with \\\\ and\\nnewline"

    def test_wrong_label_counts_and_bad_names_are_refused(self):
        reg = metrics.Registry()
        c = reg.counter("y_total", "y", ("a",))
        with pytest.raises(ValueError):
            c.inc("1", "2")
        with pytest.raises(ValueError):
            reg.counter("y_total", "again")
        with pytest.raises(ValueError):
            reg.counter("bad-name", "x")


def test_counting_tasks_by_status_and_provider_reads_only_an_index(sqlite_store):
    """The scrape's GROUP BY must not scan the tasks table (1M rows: ~450 ms)."""
    plan = sqlite_store._exec("EXPLAIN QUERY PLAN SELECT status, provider, COUNT(*) FROM tasks "
                              "GROUP BY status, provider").fetchall()
    assert any("COVERING INDEX tasks_status_provider" in str(row) for row in plan), plan


def test_a_change_that_rolls_back_is_not_counted(sqlite_store, monkeypatch):
    """Counters move when the change commits: a cancel whose transaction
    fails after the task ended and the refund went in counts neither."""
    from errors import StoreUnavailable
    user = sqlite_store.create_user("carol", credits=5)[0]
    task, _ = sqlite_store.submit(user["id"], "demo", {}, now=1.0, deadline_at=100.0, cost=1)
    finished, refunds = metrics.FINISHED.value("demo", "cancelled"), metrics.REFUNDS.value("demo")
    real_note = sqlite_store._note_change

    def note_then_fail(task, old):
        real_note(task, old)
        raise StoreUnavailable("disk full")

    monkeypatch.setattr(sqlite_store, "_note_change", note_then_fail)
    with pytest.raises(StoreUnavailable):
        sqlite_store.cancel(task["id"], user["id"], now=2.0)
    assert sqlite_store.get_task(task["id"])["status"] == "queued"
    assert metrics.FINISHED.value("demo", "cancelled") == finished
    assert metrics.REFUNDS.value("demo") == refunds
    monkeypatch.undo()
    sqlite_store.cancel(task["id"], user["id"], now=3.0)
    assert metrics.FINISHED.value("demo", "cancelled") == finished + 1
    assert metrics.REFUNDS.value("demo") == refunds + 1
