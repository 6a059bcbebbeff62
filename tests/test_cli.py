"""`python app.py` from the shell: every start-up mistake is one line on
stderr and exit code 2, before anything is written (no data directory, no
database, no user, no token); --help says what serves and lists every
variable; the commands label what they print; start-up says what it
resumed and shutdown that it stopped."""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest
import requests

from config import Config
from store import SqliteStore
from support import ROOT, ServerProcess, free_port, wait_for

APP = os.path.join(ROOT, "app.py")


def run_app(cwd, *args, wrap=(), **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HOLDFAST_")}
    clean.update({"HOLDFAST_HOST": "127.0.0.1", "PYTHONDONTWRITEBYTECODE": "1", **env})
    return subprocess.run([*wrap, sys.executable, APP, *args], cwd=str(cwd), env=clean, capture_output=True,
                          text=True, timeout=60)


def one_line(proc):
    """The one line a mistake prints, checked for its form."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == "", "nothing announced, no token printed"
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("holdfast: ")
    return lines[0]


def tree(path):
    """Every path under `path`, for "nothing was written"."""
    return sorted(os.path.join(d, n) for d, dirs, names in os.walk(path) for n in dirs + names)


# -- the port ---------------------------------------------------------------------

@pytest.fixture
def held_port():
    """A port another program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_port_in_use_stops_the_server_before_it_makes_its_data_directory(tmp_path, held_port):
    data = tmp_path / "data"
    proc = run_app(tmp_path, HOLDFAST_DATA=str(data), HOLDFAST_PORT=str(held_port))
    line = one_line(proc)
    assert line == (f"holdfast: cannot listen on 127.0.0.1:{held_port}: the port is already in use "
                    "(another holdfast? set HOLDFAST_PORT)")
    assert not data.exists()


def test_a_port_in_use_stops_the_server_before_migrations_users_and_tokens(tmp_path, held_port):
    """An empty data directory stays empty: no database, so no admin and
    demo users and no tokens; an existing store is not migrated or added to."""
    data = tmp_path / "data"
    data.mkdir()
    one_line(run_app(tmp_path, HOLDFAST_DATA=str(data), HOLDFAST_PORT=str(held_port)))
    assert tree(data) == []
    added = run_app(tmp_path, "users", "add", "carol", HOLDFAST_DATA=str(data))
    assert added.returncode == 0, added.stderr
    before = tree(data)
    with open(data / "holdfast.db", "rb") as fh:
        db = fh.read()
    one_line(run_app(tmp_path, HOLDFAST_DATA=str(data), HOLDFAST_PORT=str(held_port)))
    assert tree(data) == before
    with open(data / "holdfast.db", "rb") as fh:
        assert fh.read() == db, "no first-run users, no migration"
    store = SqliteStore(str(data / "holdfast.db"))
    try:
        assert store.count_users() == 1
    finally:
        store.close()


@pytest.mark.parametrize("env, expected", [
    ({"HOLDFAST_PORT": "99999"}, "holdfast: HOLDFAST_PORT must be from 1 to 65535, not 99999"),
    ({"HOLDFAST_PORT": "http"}, "holdfast: HOLDFAST_PORT: 'http' is not a valid int"),
    ({"HOLDFAST_HOST": "10.255.255.1"}, "holdfast: cannot listen on 10.255.255.1:{port}: cannot assign requested address"),
])
def test_an_address_the_server_cannot_listen_on_is_one_line(tmp_path, env, expected):
    port = free_port()
    data = tmp_path / "data"
    line = one_line(run_app(tmp_path, **{"HOLDFAST_DATA": str(data), "HOLDFAST_PORT": str(port), **env}))
    assert line == expected.format(port=port)
    assert not data.exists()


# -- the data directory -------------------------------------------------------------

def test_a_data_directory_that_is_a_file_is_named(tmp_path):
    path = tmp_path / "data"
    path.write_text("not a directory")
    line = one_line(run_app(tmp_path, HOLDFAST_DATA=str(path), HOLDFAST_PORT=str(free_port())))
    assert line == f"holdfast: data directory {path} is a file, not a directory (HOLDFAST_DATA)"
    assert path.read_text() == "not a directory"


def test_a_data_directory_under_a_file_is_named_with_the_cause(tmp_path):
    (tmp_path / "afile").write_text("x")
    path = tmp_path / "afile" / "data"
    line = one_line(run_app(tmp_path, HOLDFAST_DATA=str(path), HOLDFAST_PORT=str(free_port())))
    assert line == f"holdfast: cannot make the data directory {path}: not a directory (HOLDFAST_DATA)"
    assert tree(tmp_path) == [str(tmp_path / "afile")]


def _as_nobody():
    """As root, permissions do not stop writes: the server runs as nobody."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a directory without write permission stops no write")
    return (setpriv, "--reuid=65534", "--regid=65534", "--clear-groups")


def test_a_data_directory_without_write_permission_is_named_with_the_cause(tmp_path):
    # Out of pytest's private tmp_path, which nobody may not enter.
    top = tempfile.mkdtemp(prefix="holdfast-cli-")
    try:
        os.chmod(top, 0o755)
        path = os.path.join(top, "data")
        os.mkdir(path, 0o555)
        os.chmod(path, 0o555)
        line = one_line(run_app(top, wrap=_as_nobody(), HOLDFAST_DATA=path, HOLDFAST_PORT=str(free_port())))
        assert line == f"holdfast: cannot write in the data directory {path}: permission denied (HOLDFAST_DATA)"
        assert tree(path) == []
    finally:
        os.chmod(os.path.join(top, "data"), 0o755)
        shutil.rmtree(top)


def test_a_read_only_data_directory_is_named_with_the_cause(tmp_path):
    """A read-only file system (here a read-only bind mount, in a mount
    namespace of the server's own), which stops root too."""
    path = tmp_path / "data"
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root (the permission case covers non-root)")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0"', str(path)],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {probe.stderr.strip()}")
    wrap = ("unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && shift && exec "$@"', str(path), "-")
    line = one_line(run_app(tmp_path, wrap=wrap, HOLDFAST_DATA=str(path), HOLDFAST_PORT=str(free_port())))
    assert line == f"holdfast: cannot write in the data directory {path}: read-only file system (HOLDFAST_DATA)"
    assert tree(path) == []


# -- the configuration file ---------------------------------------------------------

def test_an_unknown_server_setting_is_named_like_a_providers(tmp_path):
    config = tmp_path / "holdfast.toml"
    config.write_text("[server]\nprot = 8080\n")
    data = tmp_path / "data"
    line = one_line(run_app(tmp_path, HOLDFAST_CONFIG=str(config), HOLDFAST_DATA=str(data)))
    assert line.startswith(f"holdfast: {config}: [server] has an unknown setting 'prot'; known: host, port, ")
    assert not data.exists()


# -- help and commands --------------------------------------------------------------

def _variables_the_code_reads():
    """HOLDFAST_* names in the program's own source (not tests or benchmarks)."""
    names = set()
    for top in ("app.py", "config.py", "recover.py", "metrics.py", "errors.py", "api", "store", "worker",
                "providers"):
        path = os.path.join(ROOT, top)
        paths = [path] if path.endswith(".py") else [
            os.path.join(d, n) for d, _, ns in os.walk(path) for n in ns if n.endswith(".py")]
        for p in paths:
            with open(p, encoding="utf-8") as fh:
                names.update(re.findall(r"HOLDFAST_[A-Z0-9_]*[A-Z0-9]", fh.read()))
    return names


def test_help_says_what_serves_and_lists_every_variable(tmp_path):
    proc = run_app(tmp_path, "--help")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    text = proc.stdout
    assert "With no command, `python app.py` serves" in text
    assert "commands (none of them serves)" in text and "never serve" in text
    listed = dict(re.findall(r"^  (HOLDFAST_[A-Z0-9_]+) +(.+)$", text, re.M))
    assert listed["HOLDFAST_PORT"] == "8080" and listed["HOLDFAST_ADMIN_TOKEN"] == "(none)"
    assert set(listed) == {name for name, _ in Config.variables()}
    missing = _variables_the_code_reads() - set(listed)
    assert not missing, f"read by the code but not in --help: {sorted(missing)}"
    assert not (tmp_path / "data").exists()


def test_help_lists_a_new_setting_by_itself(monkeypatch):
    """The list is made from Config's fields: a new one cannot be left out."""
    import dataclasses

    import app
    Grown = dataclasses.make_dataclass("Grown", [("shiny_new_s", float, dataclasses.field(default=1.5))],
                                       bases=(Config,))
    monkeypatch.setattr(app, "Config", Grown)
    assert "  HOLDFAST_SHINY_NEW_S" in app._help_epilog() and " 1.5" in app._help_epilog()


def test_the_readme_describes_every_variable():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    missing = [name for name, _ in Config.variables() if f"`{name}`" not in readme]
    assert not missing, f"not in README.md's table: {missing}"


def test_users_add_labels_what_it_prints(tmp_path):
    plain = run_app(tmp_path, "users", "add", "carol", "--credits", "5", HOLDFAST_DATA=str(tmp_path))
    boss = run_app(tmp_path, "users", "add", "boss", "--admin", HOLDFAST_DATA=str(tmp_path))
    assert plain.returncode == 0 and boss.returncode == 0, plain.stderr + boss.stderr
    assert plain.stdout.splitlines()[0] == "created carol (user, balance 5); its token, shown only now:"
    assert boss.stdout.splitlines()[0] == "created boss (admin, no credit limit); its token, shown only now:"
    tokens = []
    for out in (plain.stdout, boss.stdout):
        assert len(out.splitlines()) == 2
        label, token = out.splitlines()[1].split(" ")
        assert label == "token:" and token.startswith("hf_")
        tokens.append(token)
    store = SqliteStore(str(tmp_path / "holdfast.db"))
    try:
        assert store.user_by_token(tokens[0])["name"] == "carol"
        assert store.user_by_token(tokens[1])["is_admin"]
    finally:
        store.close()


@pytest.mark.parametrize("args", [("credits", "nobody", "+5"), ("webhooks", "list", "nobody"),
                                  ("webhooks", "secret", "nobody")])
def test_a_command_for_a_missing_user_names_it(tmp_path, args):
    assert run_app(tmp_path, "users", "add", "carol", HOLDFAST_DATA=str(tmp_path)).returncode == 0
    proc = run_app(tmp_path, *args, HOLDFAST_DATA=str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == "holdfast: no user named 'nobody'"


# -- start-up and shutdown ------------------------------------------------------------

LIFE = re.compile(r"INFO holdfast\.app: (started: .*|stopped: .*)$", re.M)


def _store_counts(data):
    store = SqliteStore(str(data / "holdfast.db"))
    try:
        counts = {}
        for (_, status), n in store.task_counts().items():
            counts[status] = counts.get(status, 0) + n
        return counts.get("queued", 0), counts.get("running", 0)
    finally:
        store.close()


def test_start_up_says_what_it_resumed_and_shutdown_that_it_stopped(tmp_path):
    config = tmp_path / "holdfast.toml"
    # One slot: of three long tasks one runs and two wait.
    config.write_text('[providers.slow]\ntype = "demo"\nconcurrency = 1\n')
    server = ServerProcess(tmp_path, env={"HOLDFAST_CONFIG": str(config)}).start()
    try:
        token = server.tokens["admin"]
        for i in range(3):
            res = requests.post(server.url + "/api/tasks", headers={"Authorization": f"Bearer {token}"},
                                json={"provider": "slow", "params": {"prompt": str(i), "duration_s": 600}},
                                timeout=10)
            assert res.status_code == 201, res.text
        wait_for(lambda: _store_counts(tmp_path)[1] == 1, what="one task running")
    finally:
        server.stop()
    first = LIFE.findall(server.read_log())
    assert first == ["started: no unfinished tasks to resume", "stopped: on a signal"], server.read_log()
    queued, running = _store_counts(tmp_path)
    assert (queued, running) == (2, 1)
    again = ServerProcess(tmp_path, env={"HOLDFAST_CONFIG": str(config)}, port=server.port).start()
    again.stop()
    log = again.read_log()
    assert LIFE.findall(log) == first + ["started: resumed 3 task(s): 2 queued, 1 running", "stopped: on a signal"]
    assert "maximum number of running instances" not in log


def test_a_line_for_stdout_is_one_write_so_no_log_line_lands_inside_it(monkeypatch):
    # Log lines are written by a thread of their own, to stderr, which is
    # often the same file; print() on an unbuffered stdout writes the text
    # and its newline apart, and a log line could fall between them.
    import app

    class Writes:
        def __init__(self):
            self.calls = []

        def write(self, text):
            self.calls.append(text)

    out = Writes()
    monkeypatch.setattr(sys, "stdout", out)
    app.say("token: hf_abc")
    assert out.calls == ["token: hf_abc\n"]
