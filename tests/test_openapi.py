"""GET /openapi.json: every route is described, the description hangs
together, and a schemathesis run against a real server finds no 5xx and no
answer that contradicts the description."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from api import openapi
from support import ServerProcess, require

METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def spec_path(rule):
    """Bottle's `/api/tasks/<task_id>` and `<path:path>` as OpenAPI's `{task_id}`."""
    return re.sub(r"<([A-Za-z_][A-Za-z0-9_]*)(?::[^>]*)?>", r"{\1}", rule)


def operations(spec):
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield path, method, op


def test_every_route_of_the_app_is_in_the_spec_and_nothing_else(app):
    spec = openapi.spec()
    routes = {(spec_path(r.rule), r.method.lower()) for r in app.routes}
    described = {(path, method) for path, method, _ in operations(spec)}
    missing = routes - described
    assert not missing, f"routes missing from openapi.py: {sorted(missing)}"
    assert not described - routes, f"described but not routed: {sorted(described - routes)}"
    assert len(routes) >= 20


def test_the_walk_notices_a_new_route(app):
    @app.get("/api/new-thing/<thing_id>")
    def new_thing(thing_id):
        return {}

    routes = {(spec_path(r.rule), r.method.lower()) for r in app.routes}
    described = {(path, method) for path, method, _ in operations(openapi.spec())}
    assert routes - described == {("/api/new-thing/{thing_id}", "get")}


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _resolve(spec, ref):
    assert ref.startswith("#/"), ref
    node = spec
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def test_the_spec_hangs_together():
    spec = openapi.spec()
    assert spec["openapi"].startswith("3.")
    for ref in _refs(spec):
        _resolve(spec, ref)
    error = {"$ref": "#/components/schemas/Error"}
    for path, method, op in operations(spec):
        where = f"{method.upper()} {path}"
        assert op.get("summary") and op.get("responses"), where
        codes = set(op["responses"])
        assert any(c.startswith("2") for c in codes), where
        for name in re.findall(r"{([^}]+)}", path):
            assert any(p["name"] == name and p["in"] == "path" and p["required"]
                       for p in op.get("parameters", [])), f"{where}: path parameter {name}"
        if op["security"]:
            assert "401" in codes, f"{where} needs a token, so it can answer 401"
        if "requestBody" in op:
            assert {"400", "413"} <= codes, f"{where} reads a body"
        for code, response in op["responses"].items():
            response = _resolve(spec, response["$ref"]) if "$ref" in response else response
            if code.startswith("4"):
                assert response["content"]["application/json"]["schema"] == error, f"{where} {code}"


def test_the_spec_is_served_without_a_token(client):
    res = client.get("/openapi.json", token=None)
    assert res.status == 200 and res.headers["content-type"].startswith("application/json")
    assert res.json() == json.loads(json.dumps(openapi.spec()))


def test_a_real_answer_matches_its_schema_in_the_spec(client, users):
    """A hand check of the schemas the fuzz run leans on: a task's JSON has
    exactly the fields the spec lists, and an error the Error shape."""
    spec = openapi.spec()
    res = client.post("/api/tasks", {"provider": "demo", "params": {"prompt": "x"}}, token=users["alice"])
    task = res.json()["task"]
    schema = spec["components"]["schemas"]["Task"]
    assert set(task) == set(schema["properties"]) == set(schema["required"])
    err = client.get("/api/tasks/t_" + "0" * 26, token=users["alice"]).json()
    assert set(err) == {"error"} and set(err["error"]) == {"code", "message"}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_schemathesis_finds_no_server_error_against_a_real_server(tmp_path, request, backend):
    """On both SQL engines: each refuses different strings (SQLite lone
    surrogates, PostgreSQL NUL), and neither may turn one into a 500."""
    require(importlib.util.find_spec("schemathesis") is not None,
            "needs schemathesis (pip install -r requirements-dev.txt)")
    seed = os.environ.get("HOLDFAST_FUZZ_SEED", "1")
    report_path = tmp_path / "report.json"
    env = {"HOLDFAST_SSE_MAX_S": "1", "HOLDFAST_RATE_PER_S": "10000", "HOLDFAST_MAX_ACTIVE": "100000"}
    if backend == "postgresql":
        env["HOLDFAST_STORE"] = request.getfixturevalue("pg_schema").url
    with ServerProcess(tmp_path / "data", env=env) as server:
        proc = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
             "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                         "response_schema_conformance,response_headers_conformance",
             "--max-examples", "10", "--max-time", "30", "--workers", "1", "--seed", seed,
             "--request-timeout", "30", "--header", f"Authorization: Bearer {server.tokens['admin']}",
             "--report", "json", "--report-json-path", str(report_path)],
            cwd=str(tmp_path), capture_output=True, text=True, timeout=180)
    with open(server.log_path, errors="replace") as fh:
        log = fh.read()
    output = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert report_path.exists(), output
    report = json.loads(report_path.read_text())
    assert report["failures"] == [], output
    assert report["errors"] == [], output
    assert report["operations"]["tested"] == report["operations"]["total"] >= 20, output
    assert report["test_cases"]["generated"] >= 100, output
    assert proc.returncode == 0, output
    assert "unhandled error" not in log and "Traceback" not in log, log
