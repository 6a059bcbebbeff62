"""When things happen: dispatch, poll, download, sweep.

    __init__.py  Worker: the scheduler's jobs (dispatch, slots, renew,
                 heartbeat, sweep, cleanup), the pool, leases, shutdown;
                 start here
    steps.py     Steps: one step of one claimed task (submit, run, poll,
                 save the results, finish, look again later)
    callbacks.py Callbacks: a submit's callback token; a submit in doubt that
                 waits for a provider's callback to name its job
    live.py      Hints: what providers push (ComfyUI's progress, a job's
                 end) into the store, and the poll it makes due at once
    deliver.py   Deliverer: sends the webhooks outbox's deliveries in a
                 pool of its own (the `deliver` job claims them)
    slowdown.py  SlowDown: behind on polls, young tasks first and old
                 tasks' polls stretched, until it catches up
    health.py    ProviderHealth: each provider's last answer and last
                 failure as the workers saw them, kept in the store

Nothing here sleeps on a task's behalf. Each task's next look (`next_poll_at`),
its lease and its attempt count live in the store, so a restart loses no
schedule: a scheduler tick claims the tasks that are due, works on each outside
any transaction, and writes back with the lease token it was given. While a
backlog lasts, the write that ends a step claims the next task for the
thread it frees (store.claim_on_release), and the thread goes on with it.
Every function takes `now`; tests pass a clock instead of sleeping.

A task's life with a provider:

    queued --take_slot--> queued, "submitting" --submit--> running --poll...--> download --> succeeded
      |  no slot: park     (id stored first)                   |
      +<------ the provider lost the job: again, up to `retries` -------+

A task refused because every slot is taken parks: it looks again only after
PARKED_S. The `slots` job wakes those first in line instead, every tick
and as soon as a step here ends a task that held one (store.wake_line), so
tasks waiting behind a busy GPU cost nothing while they wait, however many
there are, and a slot given back by any process is taken within a tick.

`attempts` counts submissions (or, local, function starts), stored before
the request together with its id and the time it is sent (POSTED_AT in the
task's state). A submit that was not sent, or that the provider refused
before any job existed (429, 503), is tried again under the same attempt
number, with backoff, until the deadline; the sweeper ends the task then.

A submit in doubt (no answer, a reset, a 500: DESIGN.md guarantee 5), or
one a crash interrupted, is never sent again blindly. With an id of our
choosing (ComfyUI) the provider is asked about it once the request can no
longer be on its way (`doubt_grace_s` after it was sent), and only a job it
does not know is submitted again, as a new attempt up to `retries`. Without
one (KIE) the task fails `submission_in_doubt`, refunded, unless the
provider says `on_doubt = "resubmit"`; with callbacks on, first it waits
`callback_grace_s` for a callback to name its job (callbacks.py).
"""

import functools
import logging
import threading
import time
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor

from apscheduler.executors.pool import ThreadPoolExecutor as SchedulerPool
from apscheduler.schedulers.background import BackgroundScheduler

import metrics
from errors import Conflict, HoldfastError, StaleLease, StoreUnavailable
from store import TERMINAL, dead_owners, lease_owner_id, process_identity

from .callbacks import Callbacks
from .live import Hints
from .deliver import Deliverer
from .health import HealthLog
from .slowdown import SlowDown
from .steps import Steps

log = logging.getLogger("holdfast.worker")

EVENTS_KEEP_S = 86400.0    # the event log is for live views and reconnects, not history
STOP_GRACE_S = 2.0         # at shutdown, how long running steps may take to end
CLEANUP_BATCH = 500        # rows per retention transaction: writers never wait long
SKIP_THREADS = 3           # scheduler turns of a job that find it still running, at once


def _one_at_a_time(fn):
    """fn for a scheduler job: a turn that comes while the last one still
    runs returns at once (the next turn comes soon enough)."""
    running = threading.Lock()

    def turn():
        if not running.acquire(blocking=False):
            return
        try:
            fn()
        finally:
            running.release()
    return turn


class Worker(Steps, Callbacks):
    """Claims due tasks and moves each one step (steps.py); sweeps deadlines
    and dead workers' leases; keeps retention. One per process."""

    def __init__(self, store, providers, files, *, owner=None, lease_s=60.0, batch=50,
                 threads=4, tick_s=0.5, sweep_s=5.0, clock=time.time, keep_files_h=72.0,
                 keep_tasks_d=30.0, keep_events_s=EVENTS_KEEP_S, cleanup_s=300.0, public_url=None,
                 webhooks=None):
        self.store = store
        self.providers = providers
        self.files = files
        self.owner = owner or lease_owner_id()
        self.lease_s = lease_s
        self.batch = batch
        self.threads = threads
        self.tick_s = tick_s
        self.sweep_s = sweep_s
        self.clock = clock
        self.keep_files_s = keep_files_h * 3600.0
        self.keep_tasks_s = keep_tasks_d * 86400.0
        self.keep_events_s = keep_events_s
        self.cleanup_s = cleanup_s
        self.public_url = public_url      # set: submits carry a callback URL (worker/callbacks.py)
        self.scheduler = None
        self.pool = None
        self._inflight = 0     # pool jobs submitted and not ended, and dispatch's reservation
        self._waiting = 0      # pool jobs other than steps, submitted and not yet started
        self._backlog = False
        self._held = {}    # task id -> lease token, while a step works on it
        self._calling = {}     # provider name -> steps of its tasks running here now
        self._told = {}    # task id or job name -> the repeating failure last logged for it
        self._woken = {}   # provider name -> time.monotonic() of its last wake_backoff
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stopping = False    # claim nothing more
        self._leaving = False     # the process is exiting: local functions stop at their next report()
        self._identity = None
        self._wakeup = threading.Event()
        self._freed = False       # a step here ended a task holding a slot: look at the line first
        self._unparked = False    # tasks parked for a provider that has no limit now were woken
        self._waker = None
        self._dispatch = self._safe(self.dispatch)   # the tick's, the wake thread's and a pool thread's
        self._slots = self._safe(self.wake_slots)     # the tick's and the wake thread's
        self._refilling = threading.local()
        self.last_tick = None
        self.hints = Hints(store, providers, wake=self.wake, clock=clock)
        self.health = HealthLog(store)     # what calls to the providers came to (GET /api/providers)
        # Webhooks out: Deliverer's settings (config.webhook_settings).
        self.deliverer = Deliverer(store, owner=self.owner, clock=clock, **(webhooks or {}))
        shortest = min((p.poll_interval_s for p in providers.values()), default=2.0)
        self.slow_down = SlowDown(max(tick_s, shortest))

    # -- running in the background -------------------------------------------

    def start(self):
        with self._lock:
            self._stopping = self._leaving = False
        # Alive in the store before the first claim: a lease whose owner has
        # no heartbeat is never released early, but one whose heartbeat ran
        # out is, so beat before holding anything.
        self.beat()
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="holdfast-task")
        beat_s = max(self.lease_s / 3, 0.1)
        jobs = {"dispatch": (self._dispatch, self.tick_s),
                "slots": (self._slots, self.tick_s),
                "sweep": (self._safe(self.sweep), self.sweep_s),
                "deliver": (self._safe(self.deliverer.tick), min(self.tick_s, 0.25)),
                "cleanup": (self._safe(self.cleanup), self.cleanup_s),
                "renew": (self._safe(self.renew), beat_s),
                # Three beats per lease: one slow or failed write does not
                # make this process look dead to the others.
                "heartbeat": (self._safe(self.beat), beat_s),
                "health": (self._safe(self.health.write), 1.0)}
        # A job still running at its next turn (a write waiting for the lock,
        # a long retention pass) skips that turn in _one_at_a_time, quietly:
        # APScheduler's own max_instances would log "maximum number of
        # running instances reached" for each. A thread per job, and a few
        # for the turns that skip, so no job waits behind another.
        self.scheduler = BackgroundScheduler(
            executors={"default": SchedulerPool(len(jobs) + SKIP_THREADS)},
            job_defaults={"coalesce": True, "max_instances": SKIP_THREADS, "misfire_grace_time": None})
        for name, (fn, every) in jobs.items():
            self.scheduler.add_job(_one_at_a_time(fn), "interval", seconds=every, id=name, name=name)
        self.deliverer.start()
        self.scheduler.start()
        self.hints.start()
        self._wakeup.clear()
        self._waker = threading.Thread(target=self._wake_loop, name="holdfast-wake", daemon=True)
        self._waker.start()

    def _wake_loop(self):
        """Dispatch whenever wake() asks (a submit, a freed pool thread with
        a backlog). Asking APScheduler instead (wakeup() and modify() of the
        dispatch job) cost a fifth of the worker's CPU under load, and a
        tick still running made it log "maximum number of running
        instances reached"; its interval job stays for what falls due."""
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            if self._stopping:
                return
            if self._freed:
                self._freed = False
                self._slots(wake=False)
            self._dispatch()

    def stop(self, wait=True):
        """Claim nothing more; with `wait`, let every running step end first."""
        with self._lock:
            self._stopping = True
        self.hints.stop()
        self._wakeup.set()
        if self._waker is not None:
            if wait:
                self._waker.join()
            self._waker = None
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=wait)
            self.scheduler = None
        if self.pool is not None:
            self.pool.shutdown(wait=wait, cancel_futures=not wait)
            self.pool = None
        self.deliverer.stop(wait=wait)
        self.health.write()
        # Without a row, this owner's leases are left to run out, never
        # released early: a pool thread may still be finishing one.
        try:
            self.store.end_heartbeat(self.owner)
        except HoldfastError as exc:
            log.warning("could not remove this worker's heartbeat: %s", exc)

    def beat(self, now=None):
        """Tell the other processes, through the store, that this one is alive."""
        now = self.clock() if now is None else now
        if self._identity is None:
            self._identity = process_identity()
        self.store.heartbeat(self.owner, now=now, lease_s=self.lease_s, identity=self._identity)

    def shutdown(self, grace_s=STOP_GRACE_S):
        """Leave quickly (SIGTERM): claim nothing more, stop local functions
        at their next report(), give running steps `grace_s` to end, then
        give up every lease this process still holds, so the next owner takes
        those tasks at once instead of when the leases run out. Threads still
        in a step are not waited for: the caller exits without them, and
        their stale writes are refused once another worker claims the task.
        Returns how many steps were still running."""
        with self._lock:
            self._leaving = True
        self.stop(wait=False)
        deadline = time.monotonic() + grace_s
        with self._idle:
            while self._inflight > 0 and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            running = self._inflight
        try:
            released = self.store.release_leases([self.owner])
        except HoldfastError as exc:
            log.warning("leases not released (they run out in %gs instead): %s", self.lease_s, exc)
            released = 0
        log.info("worker stopped: %d step(s) still running, %d lease(s) handed back", running, released)
        return running

    @contextmanager
    def calling(self, provider, call):
        """Around one call to a provider: timed and counted (metrics), and
        its outcome noted for the provider's health."""
        with metrics.provider_call(provider.name, call), self.health.call(provider.name, self.clock):
            yield

    def alive(self):
        return self.scheduler is not None and self.scheduler.running

    def wake(self):
        """Look for due tasks now rather than at the next tick. Wakes
        that come while a dispatch runs make one more, not one each."""
        if self._waker is not None and not self._wakeup.is_set():
            self._wakeup.set()

    def slot_freed(self, provider):
        """A step here ended a task holding one of `provider`'s slots: the
        wake thread looks at the line before it next dispatches."""
        if provider.concurrency is not None:
            self._freed = True
            self.wake()

    def wake_slots(self, now=None, wake=True):
        """Wake the parked tasks first in line for each provider's free
        slots (store.wake_line); the first time, every parked task of a
        provider that has no limit now. Returns how many; `wake`: dispatch
        at once when there are any."""
        now = self.clock() if now is None else now
        woken = 0
        for name, provider in self.providers.items():
            if provider.concurrency is not None or not self._unparked:
                woken += self.store.wake_line(name, limit=provider.concurrency, now=now)
        self._unparked = True
        if woken and wake:
            self.wake()
        return woken

    def _safe(self, fn):
        def run(*args, **kwargs):
            try:
                fn(*args, **kwargs)
            except StoreUnavailable as exc:
                # A full disk fails every tick: one line when it starts.
                if self._told.get(fn.__name__) != exc.message:
                    log.warning("%s: %s; trying again every tick", fn.__name__, exc.message)
                self._told[fn.__name__] = exc.message
            except Exception:
                log.exception("%s failed; the next tick tries again", fn.__name__)
            else:
                if self._told.pop(fn.__name__, None) is not None:
                    log.info("%s works again", fn.__name__)
        run.__name__ = fn.__name__
        return run

    def dispatch(self, now=None):
        """Claim due tasks and hand them to the pool (the scheduler's tick)."""
        now = self.clock() if now is None else now
        self.last_tick = now
        # stop() may run in another thread at any point of this tick: hold
        # on to the pool it may take away, and claim nothing once it is gone.
        pool = self.pool
        with self._lock:
            # Only what a free thread starts now: a task claimed to wait in
            # the pool's queue would keep its lease, renewed or not, from
            # every other worker for as long as the steps before it take.
            room = min(self.threads - self._inflight, self.batch)
            if room <= 0 or pool is None or self._stopping:
                return 0
            # Reserved while the claim runs, so a cancel handed to the pool
            # meanwhile cannot make a claimed task wait for a thread.
            self._inflight += room
        tasks = []
        try:
            tasks = self.store.claim(self.owner, now=now, limit=room, lease_s=self.lease_s,
                                     fresh_first=self.slow_down.active, skip=self._stalled())
        finally:
            with self._idle:
                self._inflight -= room - len(tasks)
                self._idle.notify_all()
        # A full claim means more may be due: the pool asks for the next
        # batch as it drains, not half a second later at the next tick.
        self._backlog = len(tasks) == room
        self.slow_down.after_claim(self.store, tasks, self._backlog, now, self.tick_s)
        metrics.claimed(tasks, now)
        for n, task in enumerate(tasks):
            try:
                self._pooled(pool, self._run_pooled, task, reserved=True)
            except RuntimeError:
                # The pool shut down under this tick: the process is stopping.
                # The rest keep their leases until shutdown() hands them
                # back, recovery releases them, or they run out.
                with self._idle:
                    self._inflight -= len(tasks) - n
                    self._idle.notify_all()
                log.info("worker stopping: %d claimed task(s) left to their leases", len(tasks) - n)
                return n
        return len(tasks)

    def _pooled(self, pool, fn, *args, reserved=False):
        """Run fn in the pool, counted in _inflight until it ends or is
        cancelled (`reserved`: dispatch counted it already). RuntimeError
        once the pool is shut down."""
        if not reserved:
            # Not a step dispatch reserved a thread for (a cancel): it waits
            # in the pool's queue, and no thread goes on to a next task
            # (_run_pooled) until one has taken it.
            with self._lock:
                self._inflight += 1
                self._waiting += 1
            fn = functools.partial(self._started, fn)
        try:
            future = pool.submit(fn, *args)
        except RuntimeError:
            if not reserved:
                with self._idle:
                    self._inflight -= 1
                    self._waiting -= 1
                    self._idle.notify_all()
            raise
        future.add_done_callback(self._pool_job_done)

    def _started(self, fn, *args):
        with self._lock:
            self._waiting -= 1
        return fn(*args)

    def _pool_job_done(self, future):
        with self._idle:
            self._inflight -= 1
            self._idle.notify_all()
            refill = self._backlog and not self._stopping
        if refill:
            # Here, in the pool thread just freed: handing the claim to
            # another thread cost a wake-up per step (15% of the CPU under
            # load, py-spy --gil), and this thread would wait for it anyway.
            # A step that ended before its callback was added calls this
            # inside a dispatch: that one goes to the wake thread instead.
            if getattr(self._refilling, "on", False):
                return self.wake()
            self._refilling.on = True
            try:
                self._dispatch()
            finally:
                self._refilling.on = False

    def _run_pooled(self, task):
        # While there is a backlog, the write that ends a step (lets its
        # lease go) also claims this thread's next task, which runs here at
        # once: claimed for a thread that is free now, it waits in no queue
        # (see dispatch), and costs no write of its own. Two of the worker's
        # five writes a job under load were such claims, each a turn at the
        # write lock and a wait for its COMMIT, most of them a context switch.
        while task is not None:
            ride = self._backlog and not self._stopping and not self._waiting
            if ride:
                self.store.claim_on_release(self.owner, lease_s=self.lease_s, clock=self.clock,
                                            fresh_first=self.slow_down.active, skip=self._stalled())
            try:
                # The step's own clock: the task may have been claimed a moment ago.
                self.process(task, self.clock())
            finally:
                # A step that raised past process() (it survives its own
                # errors) leaves what its write claimed to that lease.
                got = self.store.claimed_on_release() if ride else None
            task = self._rode(got)

    def _rode(self, got):
        """The task a step's last write claimed for its thread, noted as
        dispatch notes a claim; None when it took none or no write asked
        (then _pool_job_done refills as it did)."""
        if got is None:
            return None
        if got and self._stopping:
            # As dispatch does when the pool goes: the task keeps its lease
            # until shutdown() hands it back, recovery releases it, or it
            # runs out.
            log.info("worker stopping: task %s, claimed as a step ended, left to its lease", got[0]["id"])
            return None
        now = self.clock()
        if got:
            self._backlog = True
        # Nothing due: the thread ends here, and _pool_job_done still
        # refills, which claims what a submit made due meanwhile (its wake
        # found every thread busy) and tells the backlog is over.
        self.slow_down.after_claim(self.store, got, bool(got), now, self.tick_s)
        metrics.claimed(got, now)
        return got[0] if got else None

    def renew(self, now=None):
        """Extend the leases of tasks a step is working on (a long download,
        a local function), so no other worker takes them over. Only those:
        _holding() adds a task when its step starts and removes it when the
        step ends."""
        now = self.clock() if now is None else now
        with self._lock:
            held = list(self._held.items())
        for task_id, token in held:
            try:
                self.store.renew_lease(task_id, token=token, expires_at=now + self.lease_s)
            except HoldfastError as exc:
                log.info("task %s: lease not renewed: %s", task_id, exc)

    @contextmanager
    def _holding(self, task, provider):
        """While a step works on `task`: its lease renewed, and its
        provider's steps here counted. Yields False, holding nothing, when
        the provider is stalled and has its share of steps here already
        (process); in the same two turns at the lock as the lease's."""
        name = task["provider"]
        with self._lock:
            admitted = (provider is None or not provider.stalled
                        or self._calling.get(name, 0) < self._stalled_steps)
            if admitted:
                self._held[task["id"]] = task["lease_token"]
                self._calling[name] = self._calling.get(name, 0) + 1
        if not admitted:
            yield False
            return
        try:
            yield True
        finally:
            with self._lock:
                self._calling[name] -= 1
                if self._held.get(task["id"]) == task["lease_token"]:
                    del self._held[task["id"]]

    # -- one step, in the caller's thread (tests call these) --------------------

    def run_once(self, now=None):
        """Claim what is due at `now` and process it here. Returns how many."""
        now = self.clock() if now is None else now
        self.last_tick = now
        self.wake_slots(now, wake=False)
        tasks = self.store.claim(self.owner, now=now, limit=self.batch, lease_s=self.lease_s)
        metrics.claimed(tasks, now)
        for task in tasks:
            self.process(task, now)
        return len(tasks)

    def _stalled(self):
        """The providers whose last request went unanswered (stalled) that
        have as many steps running here as they may: claims pass over
        their tasks."""
        return tuple(name for name, provider in self.providers.items()
                     if provider.stalled and self._calling.get(name, 0) >= self._stalled_steps)

    @property
    def _stalled_steps(self):
        # Half the threads, not one: a stalled provider's step may be a
        # long download that says nothing of its API, and another step is
        # then still free to ask the API whether it answers again.
        return max(1, self.threads // 2)

    def process(self, task, now):
        """Move one claimed task one step. Survives any error of its own.

        A provider that stalls (its last request unanswered for its
        timeout_s) gets at most half the threads here until it answers
        again: every step of its tasks would hold a thread that long, and
        its backlog would take every thread from the other providers'
        tasks (40 tasks of a provider that never answers, timeout_s 5, 4
        threads: another provider's task waited 50 s). Claims pass over its
        tasks meanwhile (_stalled), and one claimed before it stalled is
        handed back as it was, still due."""
        provider = self.providers.get(task["provider"])
        try:
            with self._holding(task, provider) as admitted:
                if not admitted:
                    self._hand_back(task)
                elif provider is None:
                    self._finish(task, now, "failed", error=("internal", f"provider {task['provider']!r} "
                                                             "is not configured"))
                elif task["status"] == "queued":
                    self._start(task, provider, now)
                else:
                    self._poll(task, provider, now)
        except (StaleLease, Conflict) as exc:
            # Cancelled, finished or taken over meanwhile: its new owner decides.
            log.info("task %s: %s", task["id"], exc)
        except StoreUnavailable as exc:
            # A full disk or a store that went away: one line, not a
            # traceback per task and tick; the task is looked at again.
            self._later(task, now, f"store unavailable: {exc.message}", quiet=True)
        except Exception as exc:
            log.exception("task %s: unexpected error; retrying later", task["id"])
            self._later(task, now, f"internal: {exc}")

    def _hand_back(self, task):
        """Let a claimed task's lease go, its schedule as it was."""
        try:
            self.store.reschedule(task["id"], token=task["lease_token"], next_poll_at=task["next_poll_at"],
                                  polls=task["polls"])
        except HoldfastError as exc:
            log.info("task %s: not handed back: %s", task["id"], exc)

    # -- deadlines ---------------------------------------------------------------

    def sweep(self, now=None):
        """Fail the tasks past their deadline; cancel them at the provider."""
        now = self.clock() if now is None else now
        # A process whose heartbeat ran out (or, on this kernel and in this
        # PID namespace, that is gone) leaves leases nobody renews: free its
        # tasks now rather than when the leases run out. Never from a PID
        # alone: a container with the same host name has other PIDs.
        dead = dead_owners(self.store.lease_holders(now=now), me=self.owner)
        if dead:
            log.warning("releasing the tasks of dead worker(s) %s", ", ".join(dead))
            self.store.release_leases(dead)
        ended = 0
        for task in self.store.overdue(now=now, limit=200):
            # Still queued in a streak of transient failures: the provider
            # never took it, which says more than "timeout".
            never_accepted = task["status"] == "queued" and (task["state"] or {}).get("failures")
            code = "provider_unavailable" if never_accepted else "timeout"
            message = ("the provider could not be reached before the deadline" if never_accepted
                       else "the task passed its deadline")
            try:
                ended_task = self.store.expire(task["id"], now=now, error={"code": code, "message": message})
            except Conflict:
                continue
            ended += 1
            self.drop_unlisted_files(ended_task)
            self.cancel_at_provider(ended_task)
        return ended

    # -- retention ---------------------------------------------------------------

    def cleanup(self, now=None):
        """Retention: delete result files after keep_files_h (the task keeps
        its metadata), finished tasks and their events after keep_tasks_d
        (the ledger and task_history keep their rows), events after a day,
        expired conversation sessions. Files go before the rows that name
        them, so a crash between the two leaves nothing a later run cannot
        finish. Returns what was deleted."""
        now = self.clock() if now is None else now
        done = {"files": 0, "copies": 0, "tasks": 0, "events": 0, "sessions": 0}
        if self.files is not None:
            done["copies"] = self.drop_stray_copies()
        while self.files is not None:
            ids = self.store.tasks_with_old_files(before=now - self.keep_files_s, limit=CLEANUP_BATCH)
            for task_id in ids:
                self.files.remove_task(task_id)
            done["files"] += self.store.mark_files_expired(ids, now=now)
            if len(ids) < CLEANUP_BATCH:
                break
        while True:
            before = now - self.keep_tasks_s
            ids = self.store.finished_before(before=before, limit=CLEANUP_BATCH)
            if self.files is not None:
                for task_id in ids:
                    self.files.remove_task(task_id)
            tasks, events = self.store.delete_finished(ids, before=before)
            done["tasks"] += tasks
            done["events"] += events
            if len(ids) < CLEANUP_BATCH or not tasks:
                break
        done["events"] += self.store.purge_events(before=now - self.keep_events_s)
        done["sessions"] += self.store.purge_sessions(now=now)
        for what, n in done.items():
            if n:
                metrics.RETENTION.inc(what, amount=n)
        if any(done.values()):
            log.info("retention: deleted %(files)d task(s)' files, %(copies)d unlisted copies, "
                     "%(tasks)d finished task(s), %(events)d event(s), %(sessions)d expired session(s)", done)
        return done

    def drop_stray_copies(self):
        """Delete what the folders of finished tasks hold that the tasks do
        not list: a lease's copy that was never published, the files of a
        task that ended without them (failed, cancelled, timed out), what
        was left after retention expired them. Active tasks' folders are
        being written; folders of tasks the store does not know are left
        to `recover.py --audit --fix` (a restored backup would lose them).
        Returns how many copies went."""
        removed = 0
        ids = self.files.task_ids()
        for i in range(0, len(ids), CLEANUP_BATCH):
            for task_id, (status, listed, expired) in self.store.files_of(ids[i:i + CLEANUP_BATCH]).items():
                if status not in TERMINAL:
                    continue
                try:
                    removed += len(self.files.remove_unlisted(task_id, [] if expired else listed))
                except OSError as exc:
                    log.warning("task %s: could not remove unlisted files: %s", task_id, exc)
        return removed

    def cancel_at_provider(self, task):
        """Best effort, never in a request's or a transaction's way."""
        provider = self.providers.get(task["provider"])
        if provider is None or not task.get("external_id"):
            return
        pool = self.pool
        if pool is not None:
            try:
                return self._pooled(pool, self._cancel, provider, task)
            except RuntimeError:
                pass        # shutting down: cancel here rather than not at all
        self._cancel(provider, task)

    def _cancel(self, provider, task):
        try:
            with self.calling(provider, "cancel"):
                provider.cancel(task)
        except Exception as exc:
            log.warning("task %s: cancel at %s failed: %s", task["id"], provider.name, exc)

