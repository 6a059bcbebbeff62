"""Restart recovery: what was in flight, and what was done about it.

`python app.py` runs `recover()` at start; `python recover.py` runs it by hand
(safe while the server runs: it only touches leases whose owner is dead).
"""

import argparse
import json
import sys
import time

from errors import HoldfastError
from store import owner_is_dead


def recover(store, providers, *, now, dry_run=False):
    """Release the leases of dead local processes so their tasks are taken
    over at once instead of when the lease runs out. Returns a report."""
    stats = store.stats(now)
    dead = [owner for owner in store.lease_owners() if owner_is_dead(owner)]
    released = 0 if dry_run else store.release_leases(dead)
    report = {
        "in_flight": stats["active"],
        "by_status": stats["by_status"],
        "dead_owners": dead,
        "leases_released": released,
        "dry_run": dry_run,
    }
    report["changed"] = bool(released)
    report["summary"] = (f"{stats['active']} tasks in flight; {len(dead)} dead worker(s); "
                         f"{released} lease(s) released")
    return report


def main(argv=None):
    from app import Config, open_everything
    parser = argparse.ArgumentParser(prog="python recover.py", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="report only; change nothing")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        config = Config.load()
        store, providers, _ = open_everything(config)
        try:
            report = recover(store, providers, now=time.time(), dry_run=args.dry_run)
        finally:
            store.close()
    except HoldfastError as exc:
        print(f"recover: {exc.message}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else report["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
