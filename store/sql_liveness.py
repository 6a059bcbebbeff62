"""LivenessSql: SqlStore's heartbeat queries, whether a lease owner is alive,
and what the workers saw of the providers (provider_health).

A mixin of SqlStore, split off for size: it runs on SqlStore's seam and
helpers (_seam, _write, _exec), so every backend's overrides of those apply
here too. Every time is on the store's clock (`_store_clock`): the caller's
on a one-host file, the server's on PostgreSQL (PostgresStore overrides it).
"""

from .schema import _LEASED


class LivenessSql:
    """The workers' heartbeats (see BaseStore.heartbeat and dead_owners) and
    their reports on the providers (BaseStore.record_provider_health)."""

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

    # -- what the workers saw of the providers -----------------------------------

    _HEALTH_COLS = ("last_ok_at", "last_error_at", "last_error_code", "last_error", "consecutive_failures",
                    "updated_at")

    def record_provider_health(self, provider, *, now, ok_at=None, failures=0, error=None):
        with self._seam(), self._write():
            # The row first, so that two processes' first reports lock the
            # same row rather than race to insert it.
            self._exec("INSERT INTO provider_health (provider, consecutive_failures, updated_at) "
                       "VALUES (?, 0, ?) ON CONFLICT (provider) DO NOTHING", (provider, now))
            row = self._one("SELECT last_ok_at, last_error_at, consecutive_failures FROM provider_health "
                            "WHERE provider = ?" + self.for_update, (provider,))
            last_ok, last_error_at, streak = row
            if ok_at is not None and (last_ok is None or ok_at >= last_ok):
                last_ok, streak = ok_at, failures
            else:
                streak += failures
            sets = {"last_ok_at": last_ok, "consecutive_failures": streak, "updated_at": now}
            if error is not None and (last_error_at is None or error[2] >= last_error_at):
                sets.update(last_error_code=error[0], last_error=error[1][:1000], last_error_at=error[2])
            self._exec(f"UPDATE provider_health SET {', '.join(c + ' = ?' for c in sets)} WHERE provider = ?",
                       (*sets.values(), provider))

    def provider_health(self):
        with self._seam():
            rows = self._exec(f"SELECT provider, {', '.join(self._HEALTH_COLS)} FROM provider_health").fetchall()
        return {r[0]: dict(zip(self._HEALTH_COLS, r[1:])) for r in rows}
