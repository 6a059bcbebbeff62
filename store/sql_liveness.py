"""LivenessSql: SqlStore's heartbeat queries, whether a lease owner is alive.

A mixin of SqlStore, split off for size: it runs on SqlStore's seam and
helpers (_seam, _write, _exec), so every backend's overrides of those apply
here too. Every time is on the store's clock (`_store_clock`): the caller's
on a one-host file, the server's on PostgreSQL (PostgresStore overrides it).
"""

from .schema import _LEASED


class LivenessSql:
    """The workers' heartbeats (see BaseStore.heartbeat and dead_owners)."""

    # Rows of owners dead this long go: the sweeper has long released their leases.
    HEARTBEAT_KEEP_S = 3600.0

    def _store_clock(self, now):
        """The store's clock in SQL: (fragment, params). One host's file: the
        caller's time; PostgresStore overrides it with the server's."""
        return "?", [now]

    def heartbeat(self, owner, *, now, lease_s, identity):
        clock, at = self._store_clock(now)
        with self._seam(), self._write():
            self._exec(
                "INSERT INTO heartbeats (owner, host, pid, boot_id, pid_ns, started, lease_s, beat_at, "
                f"created_at) VALUES (?, ?, ?, ?, ?, ?, ?, {clock}, {clock}) ON CONFLICT (owner) DO UPDATE "
                "SET beat_at = excluded.beat_at, lease_s = excluded.lease_s",
                [owner, identity["host"], identity["pid"], identity["boot_id"], identity["pid_ns"],
                 identity["started"], float(lease_s), *at, *at])
            self._exec(f"DELETE FROM heartbeats WHERE beat_at + lease_s < {clock} - ?",
                       [*at, self.HEARTBEAT_KEEP_S])

    def end_heartbeat(self, owner):
        with self._seam(), self._write():
            return self._exec("DELETE FROM heartbeats WHERE owner = ?", (owner,)).rowcount == 1

    def lease_holders(self, *, now):
        clock, at = self._store_clock(now)
        with self._seam():
            rows = self._exec(
                "SELECT o.lease_owner, h.host, h.pid, h.boot_id, h.pid_ns, h.started, h.lease_s, h.beat_at, "
                f"CASE WHEN h.beat_at + h.lease_s < {clock} THEN 1 ELSE 0 END "
                f"FROM (SELECT DISTINCT lease_owner FROM tasks WHERE {_LEASED}) o "
                "LEFT JOIN heartbeats h ON h.owner = o.lease_owner ORDER BY o.lease_owner", at).fetchall()
        keys = ("host", "pid", "boot_id", "pid_ns", "started", "lease_s", "beat_at")
        return [{"owner": r[0],
                 "heartbeat": None if r[1] is None else dict(zip(keys, r[1:8]), stale=bool(r[8]))}
                for r in rows]
