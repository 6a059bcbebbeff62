"""Restart recovery: what was in flight, and what was done about it.

`python app.py` runs `recover()` at start; `python recover.py` runs it by
hand. It is safe while the server runs: it takes the same leases the worker
takes, and releases only leases that ran out or whose process is gone.

    python recover.py [--dry-run] [--json]
    python recover.py --audit [--fix] [--json]   # do the store and the files agree?
    python recover.py --export FILE      # every row of every table, as JSON
    python recover.py --import FILE      # into an empty store

--dry-run and --audit without --fix open the store read-only: they migrate,
back up, truncate and create nothing (an older schema is an error instead).
"""

import argparse
import json
import logging
import os
import sys
import time

from config import Config, open_everything, setup_logging
from errors import HoldfastError, NotFound
from store import lease_owner_id, owner_is_dead

log = logging.getLogger("holdfast.recover")
EXPORT_FORMAT = "holdfast-export"


def recover(store, providers, *, now, files=None, dry_run=False):
    """Look at everything a crash may have left behind and, unless
    `dry_run`, put it right. Returns a report (a dict)."""
    from worker import Worker
    by_status = {}
    for (_, status), n in store.task_counts().items():
        by_status[status] = by_status.get(status, 0) + n
    report = {"dry_run": dry_run, "in_flight": store.stats(now)["active"], "by_status": by_status}

    # Leases: of dead local processes, and any that ran out.
    dead = [owner for owner in store.lease_owners() if owner_is_dead(owner)]
    expired = store.expired_leases(now=now)
    report["dead_owners"] = dead
    report["expired_leases"] = [task_id for task_id, _ in expired]
    if not dry_run:
        report["leases_released"] = store.release_leases(dead) + store.release_expired_leases(now=now)

    # Submissions in doubt: ask the provider before anything is sent again.
    doubtful = store.in_doubt()
    report["submissions_in_doubt"] = [t["id"] for t in doubtful]
    worker = Worker(store, providers, files, owner=lease_owner_id(), clock=lambda: now)
    if not dry_run:
        reconciled = {}
        for task in doubtful:
            held = store.claim_task(task["id"], worker.owner, now=now, lease_s=worker.lease_s)
            if held is None:
                continue      # a live worker has it
            worker.process(held, now)
            reconciled[task["id"]] = store.get_task(task["id"])["status"]
        report["submissions_reconciled"] = reconciled

    # Deadlines.
    overdue = store.overdue(now=now, limit=10_000)
    report["past_deadline"] = [t["id"] for t in overdue]
    if not dry_run:
        report["failed_past_deadline"] = worker.sweep(now)

    # Credits still reserved by finished tasks.
    stray = store.stray_reservations()
    report["stray_reservations"] = [t["id"] for t in stray]
    if not dry_run:
        report["reservations_settled"] = {t["id"]: store.settle_stray(t["id"], now=now) for t in stray}

    # Downloads a crash cut short: the temporary file goes; the task, still
    # running, downloads again at its next poll. A task that a live worker
    # holds may be downloading this moment (recover runs beside the
    # server): its files stay.
    partial, in_use = [], []
    for path in files.partial_files() if files is not None else ():
        (in_use if _held(store, os.path.basename(os.path.dirname(path)), now, dead) else partial).append(path)
    report["partial_files"] = partial
    report["partial_files_in_use"] = in_use
    if not dry_run:
        for path in partial:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass        # its download finished (renamed it) after we looked

    report["changed"] = not dry_run and bool(
        report["leases_released"] or report["submissions_reconciled"] or report["failed_past_deadline"]
        or report["reservations_settled"] or partial)
    report["summary"] = summary(report)
    return report


def _held(store, task_id, now, dead):
    """True while a live worker holds the task: a lease not run out, of an
    owner that is not a dead local process."""
    try:
        task = store.get_task(task_id)
    except NotFound:
        return False
    return (task["lease_owner"] is not None and task["lease_owner"] not in dead
            and (task["lease_expires_at"] or 0) >= now)


def summary(report):
    verb = "would fix" if report["dry_run"] else "fixed"
    parts = [f"{report['in_flight']} task(s) in flight",
             f"{len(report['dead_owners'])} dead worker(s)",
             f"{len(report['expired_leases'])} expired lease(s)",
             f"{len(report['submissions_in_doubt'])} submission(s) in doubt",
             f"{len(report['past_deadline'])} task(s) past deadline",
             f"{len(report['stray_reservations'])} stray reservation(s)",
             f"{len(report['partial_files'])} half-written file(s)"]
    return "; ".join(parts) + f" ({verb} what was found)"


def audit(store, files, *, now, fix=False):
    """Check that the store and the file store agree: finished tasks whose
    files are missing (or of the wrong size), finished tasks still holding
    reserved credits, ledger settlements that contradict their task's
    status, and file folders of tasks that do not exist. With `fix`, repair
    what is safe: settle the stray reservations (charge or refund, once, as
    the task's status says) and delete the orphan folders; the rest is
    reported for a human. Returns a report (a dict); `unfixed` counts what
    is still wrong."""
    report = {"audit": True, "fix": fix}

    missing = []
    if files is not None:
        after = None
        while True:
            page = store.files_listed(after=after, limit=1000)
            for task_id, listed, expired in page:
                if expired:
                    continue       # retention deleted them on purpose
                lost, wrong = [], []
                for meta in listed:
                    try:
                        size = os.path.getsize(files.path(task_id, meta["name"]))
                    except (OSError, HoldfastError):
                        lost.append(meta["name"])
                        continue
                    if size != meta.get("size"):
                        wrong.append(meta["name"])
                if lost or wrong:
                    missing.append({"task_id": task_id, "missing": lost, "wrong_size": wrong})
            if len(page) < 1000:
                break
            after = page[-1][0]
        # Retention may have deleted some of them while we looked: not a problem.
        present = store.existing_task_ids([m["task_id"] for m in missing])
        missing = [m for m in missing if m["task_id"] in present and store.files_expired_at(m["task_id"]) is None]
    report["tasks_missing_files"] = missing

    stray = [t["id"] for t in store.stray_reservations()]
    report["stray_reservations"] = stray
    settled = {}
    if fix:
        settled = {task_id: store.settle_stray(task_id, now=now) for task_id in stray}
    report["reservations_settled"] = settled

    report["settlement_mismatches"] = store.settlement_mismatches()

    orphans = []
    if files is not None:
        folders = files.task_ids()
        orphans = sorted(set(folders) - store.existing_task_ids(folders))
    report["orphan_files"] = orphans
    deleted = []
    if fix:
        for task_id in orphans:
            files.remove_task(task_id)
            deleted.append(task_id)
    report["orphans_deleted"] = deleted

    report["found"] = len(missing) + len(stray) + len(report["settlement_mismatches"]) + len(orphans)
    report["unfixed"] = report["found"] - len([v for v in settled.values() if v]) - len(deleted)
    report["summary"] = audit_summary(report)
    return report


def audit_summary(report):
    settled = " (settled)" if report["reservations_settled"] else ""
    deleted = " (deleted)" if report["orphans_deleted"] else ""
    parts = [f"{len(report['tasks_missing_files'])} finished task(s) missing files",
             f"{len(report['stray_reservations'])} stray reservation(s){settled}",
             f"{len(report['settlement_mismatches'])} settlement(s) contradicting their task",
             f"{len(report['orphan_files'])} folder(s) of files without a task{deleted}"]
    verdict = "consistent" if not report["found"] else (
        "all fixed" if not report["unfixed"] else f"{report['unfixed']} problem(s) left for a human")
    return "audit: " + "; ".join(parts) + f" -> {verdict}"


def export_data(store, path):
    data = {"format": EXPORT_FORMAT, "schema_version": store.schema_version(), "tables": store.export_rows()}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)
    return {table: len(rows) for table, rows in data["tables"].items()}


def import_data(store, path):
    from errors import InvalidInput
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise InvalidInput(f"{path} is not a holdfast export")
    if data.get("schema_version") != store.schema_version():
        raise InvalidInput(f"{path} has schema version {data.get('schema_version')}; "
                           f"this store has {store.schema_version()}")
    store.import_rows(data["tables"])
    return {table: len(rows) for table, rows in data["tables"].items()}


def open_to_look(config):
    """What config.open_everything opens, for a run that changes nothing
    (--dry-run, --audit without --fix): the store read-only (no migration,
    no backup, a torn JSON journal tail left in place), no folder made."""
    from providers import build_providers
    from store import FileStore, open_store
    store = open_store(config.store, config.data, read_only=True)
    return store, build_providers(config.providers), FileStore(os.path.join(config.data, "files"), create=False)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python recover.py", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="report only; change nothing")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--fix", action="store_true",
                        help="with --audit: settle stray reservations and delete orphan files")
    move = parser.add_mutually_exclusive_group()
    move.add_argument("--export", metavar="FILE", help="write every row of every table to FILE")
    move.add_argument("--import", dest="import_", metavar="FILE", help="load FILE into an empty store")
    move.add_argument("--audit", action="store_true",
                      help="check that tasks, credits and files agree (exit 1 while problems remain)")
    args = parser.parse_args(argv)
    if args.fix and not args.audit:
        parser.error("--fix goes with --audit")
    if args.audit and args.dry_run:
        parser.error("--audit changes nothing unless --fix is given; drop --dry-run")
    try:
        config = Config.load()
        setup_logging(config.log)
        logging.getLogger().setLevel(logging.WARNING)
        looking = args.dry_run or (args.audit and not args.fix)
        store, providers, files = open_to_look(config) if looking else open_everything(config)
        try:
            if args.export:
                report = {"exported": export_data(store, args.export), "file": args.export}
                report["summary"] = f"exported {report['exported']} to {args.export}"
            elif args.import_:
                report = {"imported": import_data(store, args.import_), "file": args.import_}
                report["summary"] = f"imported {report['imported']} from {args.import_}"
            elif args.audit:
                report = audit(store, files, now=time.time(), fix=args.fix)
            else:
                report = recover(store, providers, now=time.time(), files=files, dry_run=args.dry_run)
        finally:
            store.close()
    except HoldfastError as exc:
        hint = ""
        if exc.code == "schema_outdated":
            hint = (": run recover.py --audit --fix" if args.audit else ": run recover.py without --dry-run") \
                + ", or start the server, to migrate"
        print(f"recover: {exc.message}{hint}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else report["summary"])
    return 1 if report.get("unfixed") else 0


if __name__ == "__main__":
    sys.exit(main())
