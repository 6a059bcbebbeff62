import os
import re
import secrets
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from api import create_app  # noqa: E402
from config import Config  # noqa: E402
from providers import build_providers  # noqa: E402
from store import FileStore, JsonStore, PostgresStore, SqliteStore  # noqa: E402
from support import WSGIClient, require  # noqa: E402
from worker import Worker  # noqa: E402


class Clock:
    """A clock tests move by hand: time is a parameter, never a sleep."""

    def __init__(self, start=1_800_000_000.0):
        self.now = start

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds
        return self.now


@pytest.fixture
def clock():
    return Clock()


def _sqlite(tmp_path):
    return SqliteStore(str(tmp_path / "holdfast.db"))


def _json(tmp_path):
    return JsonStore(str(tmp_path / "json"))


def pg_url():
    """HOLDFAST_TEST_PG, or a skip that says how to run these tests."""
    url = os.environ.get("HOLDFAST_TEST_PG")
    require(url, "needs PostgreSQL: set HOLDFAST_TEST_PG=postgresql://user@host:port/db")
    return url


class PgSchema:
    """A schema of its own for one test, dropped afterwards, so tests share
    one database without seeing each other."""

    def __init__(self):
        import psycopg
        self.base = pg_url()
        self.name = "hf_" + secrets.token_hex(6)
        try:
            self.admin = psycopg.connect(self.base, autocommit=True, connect_timeout=5)
        except psycopg.OperationalError as exc:
            require(False, f"needs PostgreSQL at HOLDFAST_TEST_PG: {exc}")
        self.admin.execute(f"CREATE SCHEMA {self.name}")
        sep = "&" if "?" in self.base else "?"
        self.url = f"{self.base}{sep}options=-csearch_path%3D{self.name}"

    def drop(self):
        self.admin.execute(f"DROP SCHEMA IF EXISTS {self.name} CASCADE")
        self.admin.close()


STORE_FACTORIES = {"sqlite": _sqlite, "json": _json, "postgresql": None}


@pytest.fixture
def pg_schema():
    schema = PgSchema()
    yield schema
    schema.drop()


@pytest.fixture(params=sorted(STORE_FACTORIES))
def store(request, tmp_path):
    """Every backend the contract suite runs against."""
    if request.param == "postgresql":
        schema = request.getfixturevalue("pg_schema")
        s = PostgresStore(schema.url)
    else:
        s = STORE_FACTORIES[request.param](tmp_path)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path):
    s = _sqlite(tmp_path)
    yield s
    s.close()


@pytest.fixture
def providers():
    return build_providers({"demo": {"duration_s": 2.0, "poll_interval_s": 0.5}})


@pytest.fixture
def files(tmp_path):
    return FileStore(str(tmp_path / "files"))


@pytest.fixture
def config(tmp_path):
    return Config(data=str(tmp_path), max_body=64 * 1024)


@pytest.fixture
def worker(sqlite_store, providers, files, clock):
    return Worker(sqlite_store, providers, files, clock=clock, owner="test:1:w")


@pytest.fixture
def app(sqlite_store, providers, config, worker, files, clock):
    return create_app(sqlite_store, providers, config, worker=worker, files=files, clock=clock)


@pytest.fixture
def client(app):
    return WSGIClient(app)


@pytest.fixture
def users(sqlite_store):
    """Two ordinary users, alice and bob: {name: token}."""
    return {name: sqlite_store.create_user(name)[1] for name in ("alice", "bob")}


@pytest.fixture(scope="session")
def moto_server():
    """One moto S3 server for the whole run (tests/test_objects.py)."""
    from support import MotoServer, moto_available
    require(moto_available(), "needs moto[server] and boto3: pip install -r requirements-dev.txt")
    server = MotoServer().start()
    yield server
    server.stop()


# -- a real browser (tests/test_browser.py, tests/test_browser_module.py) --------

try:
    from playwright.sync_api import sync_playwright
except ImportError:      # pragma: no cover - depends on the machine
    sync_playwright = None

CHROMIUM = os.environ.get("HOLDFAST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


_FUNCTION = re.compile(r"^\s*(async\s+)?(function\b|\(?[\w$,\s]*\)?\s*=>)")


def _predicates_as_functions():
    """wait_for_function("x === 1") is evaluated by Playwright with eval() at
    every poll, which the page's Content-Security-Policy (no 'unsafe-eval')
    refuses after the first, synchronous one; `() => (x === 1)` is evaluated
    once, through DevTools, and the function is called at each poll."""
    from playwright.sync_api import Frame, Page
    for cls in (Page, Frame):
        original = cls.wait_for_function
        if getattr(original, "as_function", False):
            continue

        def wait_for_function(self, expression, *args, _original=original, **kwargs):
            if not _FUNCTION.match(expression):
                expression = f"() => ({expression})"
            return _original(self, expression, *args, **kwargs)

        wait_for_function.as_function = True
        cls.wait_for_function = wait_for_function


@pytest.fixture(scope="module")
def browser():
    require(sync_playwright is not None, "playwright for Python is not installed")
    require(os.path.exists(CHROMIUM), f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    _predicates_as_functions()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()
