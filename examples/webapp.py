"""An application of your own that uses holdfast: a Bottle app with its
own SQLite table of orders. It submits each order's image through the
Python client, receives holdfast's webhook, verifies it, and attaches the
finished result to the order exactly once, even when the same webhook
arrives twice.

    HOLDFAST_URL=http://127.0.0.1:8080 HOLDFAST_TOKEN=hf_... \\
    WEBAPP_PUBLIC_URL=http://127.0.0.1:8090 python examples/webapp.py

(holdfast refuses webhooks to 127.0.0.1 unless it runs with
HOLDFAST_WEBHOOK_ALLOW_PRIVATE=1.)
"""

import contextlib
import os
import sqlite3
import sys
import time
import uuid

import bottle

try:
    import holdfast_client
except ImportError:   # run from a checkout: the client is a file in clients/python
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "clients", "python"))
    import holdfast_client

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, task_id TEXT UNIQUE,
                                   status TEXT NOT NULL DEFAULT 'new');
CREATE TABLE IF NOT EXISTS results (id INTEGER PRIMARY KEY, order_id INTEGER NOT NULL REFERENCES orders(id),
                                    name TEXT NOT NULL, sha256 TEXT NOT NULL, url TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS webhooks_seen (webhook_id TEXT PRIMARY KEY, received_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS instance (id TEXT NOT NULL);
"""


class Orders:
    """The app's own records, in SQLite. One connection per call, so
    waitress' threads never share one."""

    def __init__(self, path):
        self.path = path
        with self.session() as db:
            db.executescript(SCHEMA)
            db.execute("BEGIN IMMEDIATE")
            if db.execute("SELECT id FROM instance").fetchone() is None:
                db.execute("INSERT INTO instance (id) VALUES (?)", (uuid.uuid4().hex,))
            # this database's name for itself: its order numbers start at 1
            # like any other's, so holdfast's dedupe keys carry it too
            self.instance = db.execute("SELECT id FROM instance").fetchone()["id"]
            db.execute("COMMIT")

    def connect(self):
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    @contextlib.contextmanager
    def session(self):
        db = self.connect()
        try:
            yield db
        finally:
            db.close()

    def create(self, prompt):
        with self.session() as db:
            return db.execute("INSERT INTO orders (prompt) VALUES (?)", (prompt,)).lastrowid

    def set_task(self, order_id, task):
        with self.session() as db:
            db.execute("UPDATE orders SET task_id = ?, status = ? WHERE id = ?", (task["id"], task["status"], order_id))

    def get(self, order_id):
        with self.session() as db:
            row = db.execute("SELECT * FROM orders WHERE id = ?", (order_id,)).fetchone()
            if row is None:
                return None
            results = db.execute("SELECT name, sha256, url FROM results WHERE order_id = ? ORDER BY id",
                                 (order_id,)).fetchall()
        return {**dict(row), "results": [dict(r) for r in results]}

    def record_webhook(self, webhook_id, task):
        """Attach a finished task's files to its order, once per webhook-id:
        the id is written in the same transaction as the results, so a
        second delivery of it (or one racing the first) changes nothing.
        Returns False for a delivery already seen."""
        db = self.connect()
        try:
            db.execute("BEGIN IMMEDIATE")   # one writer at a time: the check and the writes are one step
            try:
                db.execute("INSERT INTO webhooks_seen (webhook_id, received_at) VALUES (?, ?)", (webhook_id, time.time()))
            except sqlite3.IntegrityError:
                db.execute("ROLLBACK")
                return False
            row = db.execute("SELECT id FROM orders WHERE task_id = ?", (task["id"],)).fetchone()
            if row is not None:
                db.execute("UPDATE orders SET status = ? WHERE id = ?", (task["status"], row["id"]))
                for f in task.get("files") or []:
                    db.execute("INSERT INTO results (order_id, name, sha256, url) VALUES (?, ?, ?, ?)",
                               (row["id"], f["name"], f["sha256"], f["url"]))
            db.execute("COMMIT")
            return True
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()


def make_app(orders, client, secrets, public_url, provider="demo"):
    """The Bottle app: POST /orders {"prompt"}, GET /orders/<id>, and the
    webhook receiver at POST /holdfast/webhook."""
    app = bottle.Bottle()
    hook_url = public_url.rstrip("/") + "/holdfast/webhook"

    @app.post("/orders")
    def new_order():
        body = bottle.request.json or {}
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            bottle.response.status = 400
            return {"error": "prompt is required"}
        order_id = orders.create(prompt)
        # dedupe_key ties the task to the order: submitting this order again
        # (a retry, a double click) gets the same task back.
        task = client.submit(provider, {"prompt": prompt, "duration_s": 0.2}, dedupe_key=f"{orders.instance}-order-{order_id}",
                             webhook=hook_url, webhook_events=["finished"])
        orders.set_task(order_id, task)
        bottle.response.status = 201
        return orders.get(order_id)

    @app.get("/orders/<order_id:int>")
    def show_order(order_id):
        order = orders.get(order_id)
        if order is None:
            bottle.response.status = 404
            return {"error": "no such order"}
        return order

    @app.post("/holdfast/webhook")
    def webhook():
        body = bottle.request.body.read()
        try:
            message = holdfast_client.verify_webhook(dict(bottle.request.headers), body, secrets)
        except holdfast_client.WebhookVerificationError as exc:
            bottle.response.status = 400
            return {"error": str(exc)}
        if message.get("type") == "task.finished":
            fresh = orders.record_webhook(bottle.request.headers["webhook-id"], message["data"]["task"])
            return {"ok": True, "duplicate": not fresh}
        return {"ok": True}

    return app


def main():
    client = holdfast_client.Client(os.environ["HOLDFAST_URL"], os.environ["HOLDFAST_TOKEN"])
    public_url = os.environ.get("WEBAPP_PUBLIC_URL", "http://127.0.0.1:8090")
    port = int(os.environ.get("WEBAPP_PORT", "8090"))
    orders = Orders(os.environ.get("WEBAPP_DB", "webapp.sqlite3"))
    app = make_app(orders, client, client.webhook_secrets(), public_url)
    print(f"webapp serving on http://127.0.0.1:{port}", flush=True)
    bottle.run(app, host="127.0.0.1", port=port, server="waitress", quiet=True)


if __name__ == "__main__":
    main()
