"""Restart recovery: what was in flight, and what was done about it.

`python app.py` runs `recover()` at start, before it binds its port, and
leaves to its worker whatever needs a provider; `python recover.py` runs it by
hand. It is safe while the server runs: it takes the same leases the worker
takes, and releases only leases that ran out or whose owner's heartbeat in
the store says it is dead.

    python recover.py [--dry-run] [--json]
    python recover.py --audit [--fix] [--sample N] [--json]   # do the store and the files agree?
    python recover.py --export FILE      # every row of every table, as JSON
    python recover.py --import FILE      # into an empty store

--dry-run and --audit without --fix open the store read-only: they migrate,
back up, truncate and create nothing (an older schema is an error instead).
"""

import argparse
import json
import logging
import os
import random
import sys
import time

from config import Config, open_everything, setup_logging
from errors import HoldfastError, NotFound
from store import TERMINAL, dead_owners, lease_owner_id

log = logging.getLogger("holdfast.recover")
EXPORT_FORMAT = "holdfast-export"


def recover(store, providers, *, now, files=None, dry_run=False, worker=None):
    """Look at everything a crash may have left behind and, unless
    `dry_run`, put it right. Returns a report (a dict).

    `worker` is a started Worker (the server's own, at start-up): then
    recovery asks no provider and so cannot keep the port closed. The
    submissions in doubt are left to that worker, which asks about each
    stored id before it submits again, and the cancels of tasks past their
    deadline run in its pool."""
    from worker import Worker
    ask_providers = worker is None
    by_status = {}
    for (_, status), n in store.task_counts().items():
        by_status[status] = by_status.get(status, 0) + n
    report = {"dry_run": dry_run, "in_flight": store.stats(now)["active"], "by_status": by_status}

    # Leases: of processes whose heartbeat says they are dead, and any that
    # ran out.
    dead = dead_owners(store.lease_holders(now=now))
    expired = store.expired_leases(now=now)
    report["dead_owners"] = dead
    report["expired_leases"] = [task_id for task_id, _ in expired]
    if not dry_run:
        report["leases_released"] = store.release_leases(dead) + store.release_expired_leases(now=now)

    # Submissions in doubt: a submit was sent (or about to be) and its answer
    # never recorded. The worker asks the provider about an id of ours before
    # anything is sent again, and fails (refunds) one it cannot ask about.
    doubtful = store.in_doubt()
    report["submissions_in_doubt"] = [t["id"] for t in doubtful]
    worker = worker or Worker(store, providers, files, owner=lease_owner_id(), clock=lambda: now)
    if not dry_run:
        reconciled = {}
        for task in doubtful if ask_providers else ():
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
        (in_use if _held(store, files.task_of(path), now, dead) else partial).append(path)
    report["partial_files"] = partial
    report["partial_files_in_use"] = in_use
    if not dry_run:
        for path in partial:
            files.discard_partial(path)

    report["changed"] = not dry_run and bool(
        report["leases_released"] or report["submissions_reconciled"] or report["failed_past_deadline"]
        or report["reservations_settled"] or partial)
    report["summary"] = summary(report)
    return report


def _held(store, task_id, now, dead):
    """True while a live worker holds the task: a lease not run out, of an
    owner whose heartbeat does not say it is dead."""
    if task_id is None:
        return False
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


def audit(store, files, *, now, fix=False, sample=None, rng=random):
    """Check that the store and the file store agree: finished tasks whose
    files are missing, of the wrong size, or whose bytes do not match their
    sha256 (every file, or a random `sample` of them, named in the report),
    finished tasks still holding reserved credits, ledger settlements that
    contradict their task's status, copies in finished tasks' folders that
    the task does not list (a stale lease's, a failed or cancelled task's),
    file folders of tasks that do not exist, and rows of the slot line's
    summary that disagree with the waiting tasks. With `fix`, repair what is
    safe: settle the stray reservations (charge or refund, once, as the
    task's status says), delete the unlisted copies and orphan folders, and
    count the slot line's rows again;
    the rest is reported for a human. Returns a report (a dict); `unfixed`
    counts what is still wrong."""
    report = {"audit": True, "fix": fix}

    missing, corrupt, checked, total = [], [], [], 0
    if files is not None:
        present = []        # (task_id, meta, path) of files there in the right size
        after = None
        while True:
            page = store.files_listed(after=after, limit=1000)
            for task_id, listed, expired in page:
                if expired:
                    continue       # retention deleted them on purpose
                lost, wrong = [], []
                for meta in listed:
                    try:
                        size = files.size_of(task_id, meta)
                    except (OSError, HoldfastError):
                        lost.append(meta["name"])
                        continue
                    if size != meta.get("size"):
                        wrong.append(meta["name"])
                    else:
                        present.append((task_id, meta))
                if lost or wrong:
                    missing.append({"task_id": task_id, "missing": lost, "wrong_size": wrong})
            if len(page) < 1000:
                break
            after = page[-1][0]
        total = len(present)
        if sample is not None and sample < total:
            present = sorted(rng.sample(present, sample), key=lambda p: (p[0], p[1]["name"]))
        for task_id, meta in present:
            checked.append(f"{task_id}/{meta['name']}")
            digest = files.sha256_of(task_id, meta)
            if digest is not None and digest != meta.get("sha256"):
                corrupt.append({"task_id": task_id, "name": meta["name"], "sha256": digest,
                                "expected": meta.get("sha256")})
        # Retention may have deleted some of them while we looked: not a problem.
        still = store.existing_task_ids({m["task_id"] for m in missing + corrupt})
        missing = [m for m in missing if m["task_id"] in still and store.files_expired_at(m["task_id"]) is None]
        corrupt = [c for c in corrupt if c["task_id"] in still and store.files_expired_at(c["task_id"]) is None]
    report["tasks_missing_files"] = missing
    report["sha256_mismatches"] = corrupt
    report["sha256_checked"] = {"files": len(checked), "of": total,
                                "sample": checked if sample is not None else None}

    stray = [t["id"] for t in store.stray_reservations()]
    report["stray_reservations"] = stray
    settled = {}
    if fix:
        settled = {task_id: store.settle_stray(task_id, now=now) for task_id in stray}
    report["reservations_settled"] = settled

    report["settlement_mismatches"] = store.settlement_mismatches()

    orphans, unlisted = [], []
    if files is not None:
        folders = files.task_ids()
        owners = store.files_of(folders)
        orphans = sorted(set(folders) - set(owners))
        for task_id in folders:
            status, listed, expired = owners.get(task_id, (None, [], False))
            if status in TERMINAL:
                entries = files.unlisted(task_id, [] if expired else listed)
                if entries:
                    unlisted.append({"task_id": task_id, "status": status, "entries": entries})
    report["orphan_files"] = orphans
    report["unlisted_files"] = unlisted
    deleted, dropped = [], []
    if fix:
        for task_id in orphans:
            files.remove_task(task_id)
            deleted.append(task_id)
        for entry in unlisted:
            # Finished tasks' lists never change again: what they do not
            # list now, nothing will serve.
            status, listed, expired = owners[entry["task_id"]]
            files.remove_unlisted(entry["task_id"], [] if expired else listed)
            dropped.append(entry["task_id"])
    report["orphans_deleted"] = deleted
    report["unlisted_deleted"] = dropped

    # The slot line's summary is derived from the tasks: counted again, it
    # loses nothing, so --fix may always rebuild it.
    drift = store.slot_line_drift()
    report["slot_line_drift"] = [{"provider": p, "user_id": u} for p, u in drift]
    report["slot_line_rebuilt"] = store.rebuild_slot_line(drift) if fix and drift else 0

    report["found"] = (len(missing) + len(corrupt) + len(stray) + len(report["settlement_mismatches"])
                       + len(orphans) + len(unlisted) + len(drift))
    report["unfixed"] = (report["found"] - len([v for v in settled.values() if v]) - len(deleted) - len(dropped)
                         - report["slot_line_rebuilt"])
    report["summary"] = audit_summary(report)
    return report


AUDIT_NAMES = 5     # ids named per kind of problem in the summary line; --json has them all


def _named(ids):
    """" (t_1, t_2 and 3 more)" for the summary, "" when there are none."""
    ids = list(ids)
    if not ids:
        return ""
    more = f" and {len(ids) - AUDIT_NAMES} more" if len(ids) > AUDIT_NAMES else ""
    return f" ({', '.join(ids[:AUDIT_NAMES])}{more})"


def audit_summary(report):
    settled = " (settled)" if report["reservations_settled"] else ""
    deleted = " (deleted)" if report["orphans_deleted"] else ""
    dropped = " (deleted)" if report["unlisted_deleted"] else ""
    checked = report["sha256_checked"]
    if checked["sample"] is None:
        scope = f"of all {checked['of']} stored file(s)"
    else:
        scope = (f"of a random sample of {checked['files']} of {checked['of']} stored file(s): "
                 + (", ".join(checked["sample"]) or "none"))
    missing, corrupt = report["tasks_missing_files"], report["sha256_mismatches"]
    mismatches, unlisted = report["settlement_mismatches"], report["unlisted_files"]
    parts = [f"{len(missing)} finished task(s) missing files{_named(m['task_id'] for m in missing)}",
             f"{len(corrupt)} file(s) whose bytes do not match their sha256"
             f"{_named(c['task_id'] + '/' + c['name'] for c in corrupt)} (checked {scope})",
             f"{len(report['stray_reservations'])} stray reservation(s){_named(report['stray_reservations'])}"
             f"{settled}",
             f"{len(mismatches)} settlement(s) contradicting their task"
             f"{_named(m['task_id'] + ' ' + m['kind'] + ' but ' + m['status'] for m in mismatches)}",
             f"{len(unlisted)} finished task(s) with files they do not list"
             f"{_named(u['task_id'] for u in unlisted)}{dropped}",
             f"{len(report['orphan_files'])} folder(s) of files without a task{_named(report['orphan_files'])}"
             f"{deleted}",
             f"{len(report['slot_line_drift'])} user(s) whose place in a provider's line disagrees with "
             f"their tasks{_named(d['provider'] + '/' + str(d['user_id']) for d in report['slot_line_drift'])}"
             f"{' (counted again)' if report['slot_line_rebuilt'] else ''}"]
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
    from store import open_files, open_store
    store = open_store(config.store, config.data, read_only=True)
    return store, build_providers(config.providers), open_files(config, create=False)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python recover.py", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="report only; change nothing")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--fix", action="store_true",
                        help="with --audit: settle stray reservations and delete orphan and unlisted files")
    parser.add_argument("--sample", type=int, metavar="N",
                        help="with --audit: check the sha256 of N random stored files (named in the "
                             "report) instead of all of them")
    move = parser.add_mutually_exclusive_group()
    move.add_argument("--export", metavar="FILE", help="write every row of every table to FILE")
    move.add_argument("--import", dest="import_", metavar="FILE", help="load FILE into an empty store")
    move.add_argument("--audit", action="store_true",
                      help="check that tasks, credits and files agree (exit 1 while problems remain)")
    args = parser.parse_args(argv)
    if args.fix and not args.audit:
        parser.error("--fix goes with --audit")
    if args.sample is not None and (not args.audit or args.sample < 1):
        parser.error("--sample N goes with --audit, and N is at least 1")
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
                report = audit(store, files, now=time.time(), fix=args.fix, sample=args.sample)
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
