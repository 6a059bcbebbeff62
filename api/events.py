"""Live events for the HTTP layer: Server-Sent Event streams and long polls,
both read from the store's event log.

Under waitress every open stream or long poll holds a worker thread. They
share a fixed number of slots (`max_waiters`, HOLDFAST_SSE_MAX_STREAMS), and
serve() gives waitress that many threads on top of the API's own, so waiting
clients can never take the threads the API needs. Past the cap a stream is
refused (503) and a long poll answers at once.

Waiting costs one thread and no queries. One hub thread looks at the log for
everyone: at once when this process commits events (store.on_events), and
every `check_s` for events that other processes wrote. It wakes only the
waiters of users with news; those of one user then share one read of that
user's events. Writers
never wait for readers, so a slow or vanished client cannot hold up the
worker (guarantee 9).
"""

import json
import logging
import threading
import time

log = logging.getLogger("holdfast.events")

BATCH = 100            # events per read (and per long-poll answer)
SLICE_S = 1.0          # how often a waiter checks whether its client left
SHARED_READ_WAIT_S = 5.0   # a waiter waits this long for another's read, then reads itself


class EventHub:
    """Slots for waiting clients, and news of the event log for them.

    `max_waiters` slots are shared by streams and long polls, `max_per_user`
    of them at most for one user; `check_s` is how often the log is read
    for events written by other processes."""

    def __init__(self, store, *, max_waiters, max_per_user=None, check_s=0.5, clock=time.monotonic):
        self.store = store
        self.max_waiters = max_waiters
        self.max_per_user = max_per_user or max_waiters
        self.check_s = check_s
        self.clock = clock
        self._lock = threading.Lock()
        self._watches = {}          # user_id -> set of _Watch
        self._cursor = None         # every event after it is still to be announced
        self._poked = threading.Event()
        self._thread = None
        self._open = {"sse": 0, "poll": 0}
        self._by_user = {}          # user_id -> slots held
        self._announced = {}        # user_id -> newest seq announced to their waiters
        self._reads = {}            # user_id -> _Read: the last read, for that user's other waiters
        self.closed = False
        store.on_events(self._poked.set)

    def close(self):
        """End every stream and long poll now (the server is stopping: a
        waiting client must not hold up its exit) and admit no more."""
        with self._lock:
            self.closed = True
            for group in self._watches.values():
                for watch in group:
                    watch.cond.notify_all()
        self._poked.set()

    # -- slots -------------------------------------------------------------------

    def counts(self):
        """Open streams and long polls now, and the cap they share."""
        with self._lock:
            return {**self._open, "max": self.max_waiters}

    def admit(self, kind, user_id):
        """Take a slot for a stream ("sse") or a long poll ("poll"); False
        when every slot is taken, or the user holds `max_per_user` (one user
        must not starve the others)."""
        with self._lock:
            held = self._by_user.get(user_id, 0)
            if self.closed or sum(self._open.values()) >= self.max_waiters or held >= self.max_per_user:
                return False
            self._open[kind] += 1
            self._by_user[user_id] = held + 1
            return True

    def leave(self, kind, user_id):
        with self._lock:
            self._open[kind] -= 1
            held = self._by_user.pop(user_id) - 1
            if held:
                self._by_user[user_id] = held

    # -- watching ----------------------------------------------------------------

    def watch(self, user_id):
        """Start listening for the user's new events. Register before reading
        the log: an event committed after the read is then announced."""
        # An idle hub (no thread: no one watches) starts from the log's end,
        # not from where it stopped: nobody waits for what came meanwhile,
        # and the hub's first read stays small however long it slept.
        cursor = self.store.last_seq() if self._thread is None else None
        watch = _Watch(self, user_id)
        with self._lock:
            # (cursor is None only if a hub thread ran, and so set _cursor.)
            if cursor is not None and self._thread is None:
                self._cursor = max(self._cursor or 0, cursor)
            self._watches.setdefault(user_id, set()).add(watch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="holdfast-events", daemon=True)
                self._thread.start()
        return watch

    def _unwatch(self, watch):
        with self._lock:
            group = self._watches.get(watch.user_id)
            if group is not None:
                group.discard(watch)
                if not group:
                    del self._watches[watch.user_id]
                    self._announced.pop(watch.user_id, None)
                    self._reads.pop(watch.user_id, None)
        self._poked.set()   # lets an idle hub thread end now

    def _run(self):
        """The one reader of news: runs while anyone watches."""
        while True:
            self._poked.wait(self.check_s)
            self._poked.clear()
            with self._lock:
                if not self._watches:
                    self._thread = None
                    return
                cursor = self._cursor
            try:
                latest = self.store.latest_events(cursor)
            except Exception as exc:   # the store is down: streams keep their slots and wait
                log.warning("cannot read the event log (%s); trying again", exc)
                time.sleep(max(self.check_s, 1.0))
                continue
            if not latest:
                continue
            with self._lock:
                self._cursor = max(self._cursor, max(latest.values()))
                for user_id, seq in latest.items():
                    if user_id in self._watches:
                        self._announced[user_id] = max(seq, self._announced.get(user_id, 0))
                    for watch in self._watches.get(user_id, ()):
                        if seq > watch.latest:
                            watch.latest = seq
                            watch.cond.notify_all()

    def _read(self, user_id, since):
        """The user's events after `since`. One announcement wakes all of a
        user's waiters at once, mostly at the same cursor: the first reads
        the log, the others wait for its rows and take them, as long as
        nothing newer was announced before that read began (a read begun
        after an announcement holds every event it announced). A read is
        shared for `check_s` at most, so the keepalive's re-read stays a
        safety net."""
        now = self.clock()
        with self._lock:
            announced = self._announced.get(user_id, 0)
            last = self._reads.get(user_id)
            if (last is not None and last.since == since and last.announced >= announced
                    and now - last.at < self.check_s):
                mine = None
            else:
                last = mine = _Read(since, announced, now)
                if user_id in self._watches:
                    self._reads[user_id] = mine
        if mine is None:
            if last.done.wait(SHARED_READ_WAIT_S) and last.rows is not None:
                return last.rows
            return self.store.events_since(user_id, since, limit=BATCH)   # that read failed
        try:
            mine.rows = self.store.events_since(user_id, since, limit=BATCH)
            return mine.rows
        finally:
            mine.done.set()

    # -- the two ways to follow the log --------------------------------------------

    def resolve(self, user_id, since):
        """Where to start: `since` None means "from now", the user's last
        event; a cursor past the whole log (a client of an older database)
        starts from the log's end."""
        if since is None:
            return self.store.last_seq(user_id)
        return min(since, self.store.last_seq())

    def start(self, user_id, since):
        """(watch, resolved since) for a stream or a long poll. The watch is
        registered before `since` is resolved and the log read, so nothing
        falls in between; close it when done."""
        watch = self.watch(user_id)
        try:
            return watch, self.resolve(user_id, since)
        except BaseException:
            watch.close()
            raise

    def sse(self, watch, user_id, since, *, max_s, keepalive_s, retry_ms, disconnected=lambda: False):
        """The text of one Server-Sent Events stream, chunk by chunk: the
        user's events after `since` (`id:` is the event's seq), keepalive
        comments, ending after `max_s`. It opens with a `ready` event whose id
        is the starting cursor, so a client that reconnects resumes from
        there even if no event came meanwhile."""
        start = self.clock()
        deadline = start + max_s
        yield (f"retry: {retry_ms}\nid: {since}\nevent: ready\n"
               f"data: {json.dumps({'next': since})}\n\n")
        last_write = start
        while True:
            mark = watch.latest   # taken before the read: later news shows as latest > mark
            rows = self._read(user_id, since)
            now = self.clock()
            if rows:
                since = rows[-1][0]
                last_write = now
                yield "".join(f"id: {seq}\ndata: {text}\n\n" for seq, text in rows)
                if now >= deadline:
                    return
                if len(rows) == BATCH:
                    continue
            # Wait for news. A keepalive also re-reads the log: a safety net
            # for an announcement that could have been missed.
            while watch.latest <= mark:
                if now >= deadline or disconnected() or self.closed:
                    return
                if now - last_write >= keepalive_s:
                    last_write = now
                    yield ": keepalive\n\n"
                    break
                watch.wait(mark, min(SLICE_S, deadline - now, keepalive_s - (now - last_write)))
                now = self.clock()

    def poll(self, watch, user_id, since, *, wait_s, disconnected=lambda: False):
        """(rows, next) for a long poll: the user's events after `since`,
        waiting up to `wait_s` for the first one."""
        deadline = self.clock() + wait_s
        while True:
            mark = watch.latest
            rows = self._read(user_id, since)
            if rows:
                return rows, rows[-1][0]
            while watch.latest <= mark:
                now = self.clock()
                if now >= deadline or disconnected() or self.closed:
                    return [], since
                watch.wait(mark, min(SLICE_S, deadline - now))


class _Read:
    """One read of a user's log: after `since`, begun at `at` once
    everything up to `announced` had been announced; `rows` when `done`
    (None if it failed)."""

    __slots__ = ("since", "announced", "at", "rows", "done")

    def __init__(self, since, announced, at):
        self.since, self.announced, self.at = since, announced, at
        self.rows = None
        self.done = threading.Event()


class _Watch:
    """One waiter's view of the hub: the newest seq announced for its user."""

    def __init__(self, hub, user_id):
        self.hub = hub
        self.user_id = user_id
        self.latest = 0
        self.cond = threading.Condition(hub._lock)

    def wait(self, mark, timeout):
        """True once an event after seq `mark` is announced; False after
        `timeout` seconds without one."""
        if timeout <= 0:
            return self.latest > mark
        with self.cond:
            return self.cond.wait_for(lambda: self.latest > mark or self.hub.closed, timeout)

    def close(self):
        self.hub._unwatch(self)
