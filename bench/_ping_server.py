"""A bare Bottle app answering GET /ping, served by holdfast's own serve():
the same waitress settings (threads, connection limit, lookahead), the same
start-up and an idle worker, so the only difference from holdfast is the app.

    HOLDFAST_DATA=... HOLDFAST_PORT=... python bench/_ping_server.py
"""

import sys

import bottle

from _common import ROOT  # noqa: F401  (puts the repository on sys.path)

import app


class _NoStreams:
    def close(self):
        pass


def bare_app(store, providers, config, **_):
    ping = bottle.Bottle()

    @ping.get("/ping")
    def pong():
        return {"ok": True}

    # serve()'s SIGTERM handler closes the app's event hub.
    ping.config["holdfast.events"] = _NoStreams()
    return ping


if __name__ == "__main__":
    app.create_app = bare_app
    sys.exit(app.main([]))
