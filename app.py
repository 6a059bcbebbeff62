"""`python app.py`: the entry point and its commands.

With no command it serves: the port bound first, then the worker and
recovery, and the HTTP API (api/) under waitress with api/server.py's
bounds. `users add` and `credits` manage accounts from the shell, and
`webhooks` a user's default webhook endpoints and signing secrets.
The wiring (Config, logging, opening the store and providers) is config.py's.
"""

import argparse
import errno
import logging
import os
import re
import signal
import sys
import time

import cpu
from api import create_app
from api.web import json_error_channel
from config import Config, flush_logs, open_everything, setup_logging, stop_logging
from errors import ConfigError, Conflict, HoldfastError, NotFound

log = logging.getLogger("holdfast.app")


def say(text):
    """One line on stdout, in one write. print() writes the text and its
    newline apart when stdout is unbuffered, and the logging thread's lines
    (on stderr, often the same file) could land between them: a token line
    must stay a line of its own."""
    sys.stdout.write(f"{text}\n")


# -- commands ------------------------------------------------------------------

def first_run_users(store, config):
    """On a new data directory: an admin and a demo user, tokens printed once."""
    if store.count_users():
        return
    try:
        _, admin_token = store.create_user("admin", admin=True, token=config.admin_token)
        _, demo_token = store.create_user("demo")
    except Conflict:
        return      # another process sharing the store made them a moment ago
    say("New data directory: created two users. Their tokens are shown only now:")
    if not config.admin_token:
        say(f"  admin  {admin_token}")
    else:
        say("  admin  (HOLDFAST_ADMIN_TOKEN)")
    say(f"  demo   {demo_token}")
    sys.stdout.flush()


class _Later:
    """The WSGI app, given to the server before it exists: the port is bound
    first, and no request is read before server.run() anyway."""

    app = None

    def __call__(self, environ, start_response):
        return self.app(environ, start_response)


def listen(config, app):
    """Bind the port (waitress under api/server.py's bounds). ConfigError
    when it cannot be bound: one line, before anything is written."""
    from api.server import create_server
    try:
        return create_server(
            app, host=config.host, port=config.port, threads=config.threads + config.sse_max_streams,
            connection_limit=config.max_connections,
            # Slow and greedy clients: see api/server.py.
            request_timeout_s=config.request_timeout_s,
            max_per_address=config.max_connections_per_address,
            channel_class=json_error_channel(config.max_body),
            # waitress buffers a body (to a file past 512 KiB) before
            # the app runs; past this it answers 413 itself. The margin
            # is for chunked framing: read_json holds the exact limit.
            max_request_body_size=config.max_body * 2 + 65536,
            channel_timeout=60, ident="holdfast",
            # Event streams and long polls hold a thread each: they get
            # sse_max_streams threads of their own on top of the API's.
            # The lookahead keeps reading their sockets, so a client
            # that leaves frees its thread at once.
            channel_request_lookahead=1)
    except OSError as exc:
        why = (exc.strerror or str(exc)).lower()
        if exc.errno == errno.EADDRINUSE:
            why = "the port is already in use (another holdfast? set HOLDFAST_PORT)"
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {why}") from None
    except ValueError as exc:        # waitress: a host it cannot resolve
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {exc}") from None


def resumed_line(by_status):
    """Start-up's one line about the tasks it took up again."""
    queued, running = by_status.get("queued", 0), by_status.get("running", 0)
    if not queued + running:
        return "started: no unfinished tasks to resume"
    return f"started: resumed {queued + running} task(s): {queued} queued, {running} running"


def serve(config):
    from recover import recover
    from worker import Worker
    setup_logging(config.log)
    # The port first: a port in use stops here, before any migration, data
    # directory, user or token.
    later = _Later()
    server = listen(config, later)
    try:
        # Before the store, the worker and waitress start threads: they
        # inherit the one CPU (cpu.py).
        confined = cpu.confine(config.cpu)
        store, providers, files = open_everything(config)
    except BaseException:
        server.close()
        raise
    if confined is not None:
        log.info(cpu.describe(confined))
    worker = Worker(store, providers, files, threads=config.worker_threads, lease_s=config.lease_s,
                    keep_files_h=config.keep_files_h, keep_tasks_d=config.keep_tasks_d,
                    public_url=config.public_url, webhooks=config.webhook_settings())
    signalled = []
    try:
        first_run_users(store, config)
        app = later.app = create_app(store, providers, config, worker=worker, files=files)

        def stop(*_):
            if signalled:
                return          # a second signal must not cut the shutdown short
            signalled.append(True)
            app.config["holdfast.events"].close()   # open streams must not hold up the exit
            sys.exit(0)         # out of server.run(), into the finally below

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        # The port is bound (connections wait in its backlog) before the
        # worker starts, and recovery hands that worker whatever needs a
        # provider (asking about submissions in doubt, cancelling tasks past
        # their deadline): a hundred submissions hanging at a provider would
        # otherwise keep /healthz silent for a hundred timeouts. What
        # recovery does here touches only the store and the disk.
        worker.start()
        report = recover(store, providers, now=time.time(), files=files, worker=worker)
        if report["changed"] or report["submissions_in_doubt"]:
            log.info("recovery: %s; the worker asks the providers about the submissions in doubt",
                     report["summary"])
        log.info(resumed_line(report["by_status"]))
        # Announced only once the port is bound, so "serving" is true when read.
        say(f"holdfast serving on http://{config.host}:{config.port}/ (store: {store.name})")
        sys.stdout.flush()
        server.run()
    except SystemExit:
        if not signalled:
            raise
    finally:
        worker.shutdown()
        store.close()
        log.info("stopped: %s", "on a signal" if signalled else "the server ended")
    # The interpreter would join every pool thread at exit, and one may be
    # in a local function that never reports or a call that has not timed
    # out yet. Its lease is handed back, so the process leaves without it.
    stop_logging()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _webhook_commands(sub):
    hooks = sub.add_parser("webhooks", help="a user's default webhook endpoints and signing secrets")
    acts = hooks.add_subparsers(dest="action", required=True)
    add = acts.add_parser("add", help="add an endpoint; prints its secret (shown only now)")
    add.add_argument("name")
    add.add_argument("url")
    add.add_argument("--events", default="finished", help="comma-separated: created,running,progress,finished")
    acts.add_parser("list", help="the user's endpoints").add_argument("name")
    for action, what in (("rotate", "a new secret for an endpoint (the old one signs too for a while)"),
                         ("remove", "remove an endpoint"), ("enable", "enable an endpoint again (after a 410)")):
        one = acts.add_parser(action, help=what)
        one.add_argument("name")
        one.add_argument("endpoint_id", type=int)
    secret = acts.add_parser("secret", help="the secret that signs the user's tasks' own webhook URLs")
    secret.add_argument("name")
    secret.add_argument("--rotate", action="store_true", help="make a new one (the old one signs for a while)")


def webhooks_command(store, config, args):
    """`python app.py webhooks ...`: the admin API's endpoint calls, from the shell."""
    from api.webhooks import check_webhook_url
    from store import webhook_events
    user = _user(store, args.name)
    now = time.time()
    if args.action == "add":
        url = check_webhook_url(args.url, config.webhooks_private_ok)
        endpoint, secret = store.add_webhook_endpoint(user["id"], url, webhook_events(args.events.split(",")),
                                                      now=now)
        say(f"endpoint {endpoint['id']}: {url} ({','.join(endpoint['events'])})")
        say(secret)
    elif args.action == "list":
        for e in store.webhook_endpoints(user["id"]):
            state = f"disabled: {e['disabled_reason']}" if e["disabled_at"] else "enabled"
            say(f"{e['id']}\t{e['url']}\t{','.join(e['events'])}\t{state}")
    elif args.action == "rotate":
        say(store.rotate_webhook_secret(user["id"], args.endpoint_id, now=now,
                                          overlap_s=config.webhook_secret_overlap_s))
    elif args.action == "remove":
        store.remove_webhook_endpoint(user["id"], args.endpoint_id, now=now)
    elif args.action == "enable":
        store.set_webhook_endpoint_enabled(user["id"], args.endpoint_id, True, now=now)
    elif args.rotate:
        say(store.rotate_webhook_secret(user["id"], now=now, overlap_s=config.webhook_secret_overlap_s))
    else:
        for s in store.task_webhook_secrets(user["id"], now=now):
            say(s["secret"])
    return 0


def _help_epilog():
    width = max(len(name) for name, _ in Config.variables())
    lines = [f"  {name:<{width}}  {'(none)' if default is None else default}" for name, default in Config.variables()]
    return ("With no command, `python app.py` serves: the HTTP API, the page and the\n"
            "worker, on HOLDFAST_HOST:HOLDFAST_PORT, until SIGTERM or Ctrl-C. The\n"
            "commands above never serve: each does its one thing and exits.\n\n"
            "Environment variables (over holdfast.toml's [server] table; README.md\n"
            "says what each one does), with their defaults:\n" + "\n".join(lines))


def _user(store, name):
    """store.user_by_name, with the name in its NotFound."""
    try:
        return store.user_by_name(name)
    except NotFound:
        raise NotFound(f"no user named {name!r}", code="user_not_found") from None


def users_add(store, args):
    user, token = store.create_user(args.name, admin=args.admin, credits=args.credits,
                                    max_active=args.max_active, rate_per_s=args.rate,
                                    max_priority=args.max_priority)
    what = ["admin" if user["is_admin"] else "user",
            "no credit limit" if user["credit_balance"] is None else f"balance {user['credit_balance']}"]
    say(f"created {user['name']} ({', '.join(what)}); its token, shown only now:")
    say(f"token: {token}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python app.py", description="holdfast: durable AI-generation jobs",
                                     epilog=_help_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", title="commands (none of them serves)")
    users = sub.add_parser("users", help="manage users").add_subparsers(dest="action", required=True)
    add = users.add_parser("add", help="create a user and print its token")
    add.add_argument("name")
    add.add_argument("--credits", type=int, default=None, help="starting balance (default: no limit)")
    add.add_argument("--admin", action="store_true")
    add.add_argument("--max-active", type=int, default=None,
                     help="active tasks at once (default: the server's)")
    add.add_argument("--rate", type=float, default=None,
                     help="submissions per second (default: the server's)")
    add.add_argument("--max-priority", type=int, default=None,
                     help="the highest task priority the user may give (default: 0)")
    grant = sub.add_parser("credits", help="grant credits to a user (-N takes them away)")
    grant.add_argument("name")
    grant.add_argument("amount", help="+N or -N")
    _webhook_commands(sub)
    args = parser.parse_args(argv)
    if args.command == "credits" and not re.match(r"^[+-]?[0-9]{1,13}$", args.amount):
        parser.error(f"amount must be an integer like +10 or -3, not {args.amount!r}")
    try:
        config = Config.load()
        if args.command is None:
            return serve(config)
        setup_logging(config.log)
        store, _, _ = open_everything(config)
        try:
            if args.command == "webhooks":
                return webhooks_command(store, config, args)
            if args.command == "credits":
                user = store.grant(_user(store, args.name)["id"], int(args.amount), now=time.time())
                say(f"{user['name']}: balance {user['credit_balance']}")
            else:
                users_add(store, args)
        finally:
            store.close()
        return 0
    except HoldfastError as exc:
        flush_logs()        # the lines logged before it come first
        print(f"holdfast: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
