"""Graceful slow-down: what the worker does when it cannot poll as often as
its tasks ask.

When the longest-due poll is more than SLOW_AFTER poll intervals late, the
worker claims submissions and young tasks first (the store's `fresh_first`
claim) and stretches the polls of old running tasks: they are the least
likely to be just about to finish, and a poll of theirs put off costs a
little latency, not a failure. It goes back to normal once the lag is under
one interval again. Deadlines are the sweeper's and still hold. One log line
when the mode starts and one when it ends; /healthz and /metrics show it.
"""

import logging
import threading

from store import iso

log = logging.getLogger("holdfast.worker")

SLOW_AFTER = 3.0      # poll intervals late: slow down
RECOVERED = 1.0       # poll intervals late, or less: back to normal
FRESH_POLLS = 10      # a running task younger than this many poll intervals is not stretched
MAX_STRETCH = 8.0     # an old task's poll interval grows at most this many times


class SlowDown:
    """The mode, one per worker. `interval_s`: the poll interval lag is
    measured in (the shortest of the configured providers')."""

    def __init__(self, interval_s):
        self.interval_s = interval_s
        self.active = False
        self.since = None
        self.lag_s = 0.0
        self._checked_at = None
        self._lock = threading.Lock()

    def after_claim(self, store, tasks, full, now, every_s):
        """Note how late polls are after a claim of `tasks` (`full`: it
        took as many as it asked for). A normal claim takes the longest due
        first, so its first task tells; a fresh-first one does not, and the
        store is asked (at most every `every_s`)."""
        if not self.active or not full:
            due = [t["next_poll_at"] for t in tasks if t["next_poll_at"] is not None]
            lag = max(0.0, now - min(due)) if due else 0.0
        else:
            if self._checked_at is not None and now - self._checked_at < every_s:
                return
            self._checked_at = now
            lag = store.poll_lag(now=now)
        self.observe(lag, now)

    def observe(self, lag_s, now):
        """Enter or leave the mode for a measured lag; log each change once."""
        with self._lock:
            self.lag_s = lag_s
            if not self.active and lag_s > SLOW_AFTER * self.interval_s:
                self.active, self.since = True, now
                log.warning("polls are %.1f s behind (over %g poll intervals): slowing down, submissions "
                            "and young tasks first, old tasks' polls stretched up to %gx", lag_s, SLOW_AFTER,
                            MAX_STRETCH)
            elif self.active and lag_s <= RECOVERED * self.interval_s:
                log.warning("polls caught up (%.2f s behind) after %.0f s of slow-down: back to normal",
                            lag_s, now - self.since)
                self.active, self.since = False, None

    def stretch(self, task, provider, now):
        """How many times its normal interval a running task's next poll
        waits: 1 unless the mode is on and the task is old."""
        if not self.active or task["status"] != "running":
            return 1.0
        age = now - (task["started_at"] or task["created_at"])
        fresh = FRESH_POLLS * provider.poll_interval_s
        return 1.0 if age <= fresh else min(MAX_STRETCH, age / fresh)

    def describe(self):
        """For /healthz."""
        return {"active": self.active, "since": iso(self.since), "poll_lag_s": round(self.lag_s, 3)}
