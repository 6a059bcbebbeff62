"""SchemaSql: SqlStore's schema versions, migrations, and the export and
import that move everything between stores.

A mixin of SqlStore, split off for size: it runs on SqlStore's seam and
helpers (_seam, _write, _exec, _one, _lock), and backends override its hooks
(_backup_before_migrating, _migrate, _after_import).
"""

import logging
import time

from peewee import BooleanField

from errors import Conflict, InvalidInput, StoreUnavailable

from .schema import DATA_MODELS, MIGRATIONS

log = logging.getLogger("holdfast.store")


class SchemaSql:
    """Migrations and export/import: SqlStore's share."""

    def migrate(self):
        with self._seam():
            self.db.connect(reuse_if_open=True)
            current = self.schema_version() if self.db.table_exists("schema_version") else 0
            if current and any(version > current for version, _ in MIGRATIONS):
                self._backup_before_migrating(current)
            try:
                self._migrate()
            except Exception as exc:
                # Each migration runs in the one transaction that records it,
                # so a failure leaves the old schema and data as they were.
                raise StoreUnavailable(f"migrating the schema from version {current} failed "
                                       f"({exc}); the database is unchanged", code="migration_failed") from exc

    def _backup_before_migrating(self, current):
        """Backends that can copy themselves do so here."""

    def _require_current_schema(self):
        """For a store opened only to look (read_only): migrating would
        change it, so an older schema is an error instead."""
        latest = max(version for version, _ in MIGRATIONS)
        with self._seam():
            self.db.connect(reuse_if_open=True)
            current = (self.schema_version() or 0) if self.db.table_exists("schema_version") else 0
        if current < latest:
            self.close()
            raise StoreUnavailable(f"schema version {current}, this code needs {latest}",
                                   code="schema_outdated")

    def _migrate(self, upto=None):
        """Apply the pending migrations (up to `upto`); return how many."""
        applied = 0
        with self._write():
            self._lock("migrate")
            if not self.db.table_exists("schema_version"):
                current = 0
            else:
                current = self._one("SELECT MAX(version) FROM schema_version")[0] or 0
            for version, step in MIGRATIONS:
                if version > current and (upto is None or version <= upto):
                    log.info("migrating schema to version %d", version)
                    step(self.db)
                    self._exec("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                               (version, time.time()))
                    applied += 1
        return applied

    # moving everything between stores

    def export_rows(self, models=DATA_MODELS):
        """{table: [row dicts]} of every data table (`models`; the schema's
        own and the processes' heartbeats are not data), in primary-key
        order; the same form on every backend. One read transaction, so one
        snapshot: a write committed meanwhile is in every table or in none."""
        out = {}
        with self._seam(), self._snapshot():
            for model in models:
                cols = [f.column_name for f in model._meta.sorted_fields]
                order = ", ".join(f.column_name for f in model._meta.get_primary_keys())
                rows = self._exec(f"SELECT {', '.join(cols)} FROM {model._meta.table_name} "
                                  f"ORDER BY {order}").fetchall()
                bools = {f.column_name for f in model._meta.sorted_fields if isinstance(f, BooleanField)}
                out[model._meta.table_name] = [
                    {c: (bool(v) if c in bools and v is not None else v) for c, v in zip(cols, r)}
                    for r in rows]
        return out

    def import_rows(self, tables):
        """Load `export_rows()` output into this store, which must be empty."""
        with self._seam():
            if self._one("SELECT COUNT(*) FROM users")[0] or self._one("SELECT COUNT(*) FROM tasks")[0]:
                raise Conflict("the target store is not empty", code="store_not_empty")
            with self._write():
                self._insert_rows(tables)

    def _insert_rows(self, tables, models=DATA_MODELS):
        known = {m._meta.table_name: m for m in models}
        unknown = set(tables) - set(known)
        if unknown:
            raise InvalidInput(f"unknown tables in the data: {sorted(unknown)}")
        for model in models:
            fields = model._meta.sorted_fields
            cols = [f.column_name for f in fields]
            # Data exported before a column existed takes the column's default.
            defaults = [f.default if f.default is not None and not callable(f.default) else None
                        for f in fields]
            sql = (f"INSERT INTO {model._meta.table_name} ({', '.join(cols)}) "
                   f"VALUES ({', '.join('?' * len(cols))})")
            for row in tables.get(model._meta.table_name, []):
                self._exec(sql, [row.get(c, d) for c, d in zip(cols, defaults)])
        self._after_import()

    def _after_import(self):
        """Backends with sequences move them past the imported ids."""

    def schema_version(self):
        with self._seam():
            return self._one("SELECT MAX(version) FROM schema_version")[0]
