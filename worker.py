"""When things happen: dispatch, poll, download, sweep.

Nothing here sleeps on a task's behalf. Each task's next look (`next_poll_at`),
its lease and its attempt count live in the store, so a restart loses no
schedule: a scheduler tick claims the tasks that are due, works on each outside
any transaction, and writes back with the lease token it was given. Every
function takes `now`; tests pass a clock instead of sleeping.

A task's life with a provider:

    queued --take_slot--> queued, "submitting" --submit--> running --poll...--> download --> succeeded
      |  no slot: wait     (id stored first)                   |
      +<------ the provider lost the job: again, up to `retries` -------+

`attempts` counts submissions, stored with the id before submit (or, local,
function starts). A submit that failed transiently, or whose job the provider
does not know, is tried again under the same attempt number, with backoff,
until the deadline; the sweeper ends the task then.
"""

import logging
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from concurrent.futures import ThreadPoolExecutor

from apscheduler.executors.pool import ThreadPoolExecutor as SchedulerPool
from apscheduler.schedulers.background import BackgroundScheduler

import metrics
from errors import (Conflict, HoldfastError, InvalidInput, ProviderRejected,
                    ProviderUnavailable, ResultExpired, StaleLease)
from providers import Retry, Status
from store import SLOT_STEP, dead_owners, lease_owner_id, process_identity, safe_file_name

log = logging.getLogger("holdfast.worker")

# Transient failures (provider down, a download that broke) retry on this
# schedule until the task's deadline; the sweeper ends it then.
TRANSIENT = Retry(max_attempts=10**9, intervals=(1, 2, 4, 8, 15, 30, 60))
WAITING_FOR_SLOT = "waiting for a slot"
EVENTS_KEEP_S = 86400.0    # the event log is for live views and reconnects, not history
CLEANUP_BATCH = 500        # rows per retention transaction: writers never wait long


class _Stopped(Conflict):
    """A local function's task was cancelled, expired or taken over."""

    code = "task_stopped"


class Worker:
    def __init__(self, store, providers, files, *, owner=None, lease_s=60.0, batch=50,
                 threads=4, tick_s=0.5, sweep_s=5.0, clock=time.time, keep_files_h=72.0,
                 keep_tasks_d=30.0, keep_events_s=EVENTS_KEEP_S, cleanup_s=300.0):
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
        self.scheduler = None
        self.pool = None
        self._inflight = 0
        self._backlog = False
        self._held = {}    # task id -> lease token, while a step works on it
        self._lock = threading.Lock()
        self._identity = None
        self.last_tick = None

    # -- running in the background -------------------------------------------

    def start(self):
        # Alive in the store before the first claim: a lease whose owner has
        # no heartbeat is never released early, but one whose heartbeat ran
        # out is, so beat before holding anything.
        self.beat()
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="holdfast-task")
        self.scheduler = BackgroundScheduler(
            executors={"default": SchedulerPool(2)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None})
        self.scheduler.add_job(self._safe(self.dispatch), "interval", seconds=self.tick_s,
                               id="dispatch")
        self.scheduler.add_job(self._safe(self.sweep), "interval", seconds=self.sweep_s, id="sweep")
        self.scheduler.add_job(self._safe(self.cleanup), "interval", seconds=self.cleanup_s, id="cleanup")
        self.scheduler.add_job(self._safe(self.renew), "interval", seconds=max(self.lease_s / 3, 0.1),
                               id="renew")
        # Three beats per lease: one slow or failed write does not make
        # this process look dead to the others.
        self.scheduler.add_job(self._safe(self.beat), "interval", seconds=max(self.lease_s / 3, 0.1),
                               id="heartbeat")
        self.scheduler.start()

    def stop(self, wait=True):
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=wait)
            self.scheduler = None
        if self.pool is not None:
            self.pool.shutdown(wait=wait, cancel_futures=not wait)
            self.pool = None
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

    def alive(self):
        return self.scheduler is not None and self.scheduler.running

    def wake(self):
        """Look for due tasks now rather than at the next tick."""
        scheduler = self.scheduler
        if scheduler is not None and scheduler.running:
            try:
                scheduler.wakeup()
            except Exception:   # shutting down: the next start will find the task
                pass
            job = scheduler.get_job("dispatch")
            if job is not None:
                job.modify(next_run_time=_utcnow())

    def _safe(self, fn):
        def run():
            try:
                fn()
            except Exception:
                log.exception("%s failed; the next tick tries again", fn.__name__)
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
            room = self.threads * 2 - self._inflight
        if room <= 0 or pool is None:
            return 0
        tasks = self.store.claim(self.owner, now=now, limit=min(room, self.batch), lease_s=self.lease_s)
        # A full claim means more may be due: the pool asks for the next
        # batch as it drains, not half a second later at the next tick.
        self._backlog = len(tasks) == min(room, self.batch)
        metrics.claimed(tasks, now)
        for n, task in enumerate(tasks):
            with self._lock:
                self._inflight += 1
                # Renewed from the claim on: a task may wait in the pool's
                # queue behind long local functions.
                self._held[task["id"]] = task["lease_token"]
            try:
                pool.submit(self._run_pooled, task)
            except RuntimeError:
                # The pool shut down under this tick: the process is stopping.
                # The rest keep their leases, which recovery releases at the
                # next start on this host, or which expire for another.
                with self._lock:
                    self._inflight -= 1
                    self._held.pop(task["id"], None)
                log.info("worker stopping: %d claimed task(s) left to their leases", len(tasks) - n)
                return n
        return len(tasks)

    def _run_pooled(self, task):
        try:
            self.process(task, self.clock())
        finally:
            with self._lock:
                self._inflight -= 1
                if self._held.get(task["id"]) == task["lease_token"]:
                    del self._held[task["id"]]
                refill = self._backlog and self._inflight <= self.threads
            if refill:
                self.wake()

    def renew(self, now=None):
        """Extend the leases of tasks a step is still working on (a long
        download, a local function), so no other worker takes them over."""
        now = self.clock() if now is None else now
        with self._lock:
            held = list(self._held.items())
        for task_id, token in held:
            try:
                self.store.renew_lease(task_id, token=token, expires_at=now + self.lease_s)
            except HoldfastError as exc:
                log.info("task %s: lease not renewed: %s", task_id, exc)

    @contextmanager
    def _holding(self, task):
        with self._lock:
            self._held[task["id"]] = task["lease_token"]
        try:
            yield
        finally:
            with self._lock:
                if self._held.get(task["id"]) == task["lease_token"]:
                    del self._held[task["id"]]

    # -- one step, in the caller's thread (tests call these) --------------------

    def run_once(self, now=None):
        """Claim what is due at `now` and process it here. Returns how many."""
        now = self.clock() if now is None else now
        self.last_tick = now
        tasks = self.store.claim(self.owner, now=now, limit=self.batch, lease_s=self.lease_s)
        metrics.claimed(tasks, now)
        for task in tasks:
            self.process(task, now)
        return len(tasks)

    def process(self, task, now):
        """Move one claimed task one step. Survives any error of its own."""
        provider = self.providers.get(task["provider"])
        try:
            with self._holding(task):
                if provider is None:
                    self._finish(task, now, "failed", error=("internal", f"provider {task['provider']!r} "
                                                             "is not configured"))
                elif task["status"] == "queued":
                    self._start(task, provider, now)
                else:
                    self._poll(task, provider, now)
        except (StaleLease, Conflict) as exc:
            # Cancelled, finished or taken over meanwhile: its new owner decides.
            log.info("task %s: %s", task["id"], exc)
        except Exception as exc:
            log.exception("task %s: unexpected error; retrying later", task["id"])
            self._later(task, now, f"internal: {exc}")

    # -- the steps ---------------------------------------------------------------

    def _start(self, task, provider, now):
        if task["external_id"] is not None and not provider.runs_in_worker:
            # An earlier attempt stored its id and may have reached the
            # provider before a crash: ask before submitting again.
            try:
                status = self._ask(task, provider, now)
            except ProviderUnavailable as exc:
                return self._later(task, now, str(exc), retry_after=exc.retry_after)
            if status.state != "unknown":
                log.info("task %s: found %s at the provider after a restart", task["id"], status.state)
                task = self.store.update(task["id"], token=task["lease_token"], now=now, status="running",
                                         step="recovered", next_poll_at=now)
                return self._apply(task, provider, status, now)
        if provider.runs_in_worker:
            return self._run_here(task, provider, now)
        # Still `submitting`: the last try never got an answer and the
        # provider does not know the job, so this is the same attempt again.
        same_try = task["step"] == SLOT_STEP and task["attempts"] > 0
        attempts = task["attempts"] if same_try else task["attempts"] + 1
        held = self.store.take_slot(task["id"], token=task["lease_token"], now=now, limit=provider.concurrency,
                                    external_id=provider.new_id(task, now), attempts=attempts, step=SLOT_STEP)
        if held is None:
            return self._wait_for_slot(task, provider, now)
        try:
            with metrics.provider_call(provider.name, "submit"):
                external_id = provider.submit(held, now)
        except ProviderRejected as exc:
            return self._finish(held, now, "failed", error=(exc.code, exc.message))
        except ProviderUnavailable as exc:
            return self._later(held, now, str(exc), retry_after=exc.retry_after)
        try:
            self.store.update(held["id"], token=held["lease_token"], now=now, release=True,
                              status="running", external_id=external_id, step="submitted", progress=0.0,
                              polls=0, next_poll_at=now + provider.poll_interval_s, **_recovered(held))
        except Conflict:
            # Cancelled or expired while submit was in flight: that cancel
            # reached the provider before the job did (or, with no id yet,
            # not at all), so the job just started runs for nobody. Stop it.
            if self.store.get_task(held["id"])["status"] in ("cancelled", "failed"):
                log.info("task %s ended while %s took it; cancelling job %s there", held["id"],
                         provider.name, external_id)
                self._cancel(provider, dict(held, external_id=external_id))
            raise

    def _wait_for_slot(self, task, provider, now):
        """Every slot is taken: look again when a running task may have ended."""
        next_at = now + provider.poll_interval_s
        if task["step"] != WAITING_FOR_SLOT:
            self.store.update(task["id"], token=task["lease_token"], now=now, release=True,
                              step=WAITING_FOR_SLOT, next_poll_at=next_at)
        else:
            self.store.reschedule(task["id"], token=task["lease_token"], next_poll_at=next_at,
                                  polls=task["polls"])

    def _run_here(self, task, provider, now):
        """A local function: run it in this (pool) thread, with retries."""
        attempt = task["attempts"] + 1
        held = self.store.take_slot(task["id"], token=task["lease_token"], now=now, limit=provider.concurrency,
                                    status="running", attempts=attempt, step="running", progress=0.0,
                                    external_id=f"local-{attempt}", next_poll_at=now)
        if held is None:
            return self._wait_for_slot(task, provider, now)
        report = self._reporter(held)
        try:
            outputs = provider.run(held, report)
        except Exception as exc:
            if report.stopped is not None:
                raise report.stopped from None
            # The function took real time; `now` may be a test's fixed clock.
            now = max(now, self.clock())
            if isinstance(exc, ProviderRejected):
                return self._finish(held, now, "failed", error=(exc.code, exc.message))
            message = f"{type(exc).__name__}: {exc}"[:1000]
            if provider.retry.exhausted(attempt):
                log.warning("task %s: %s failed (attempt %d of %d): %s", held["id"], provider.name,
                            attempt, provider.retry.max_attempts, message)
                return self._finish(held, now, "failed", error=(
                    "provider_rejected", f"{message} (attempt {attempt} of {provider.retry.max_attempts})"))
            delay = provider.retry.delay(attempt)
            log.warning("task %s: %s raised on attempt %d; again in %gs: %s", held["id"], provider.name,
                        attempt, delay, message, exc_info=True)
            state = dict(held["state"] or {}, last_error=message)
            return self.store.update(held["id"], token=held["lease_token"], now=now, release=True,
                                     status="queued", step=f"retrying (attempt {attempt} failed)",
                                     progress=None, external_id=None, next_poll_at=now + delay, state=state)
        if report.stopped is not None:
            raise report.stopped
        self._collect(held, provider, Status.succeeded(outputs), max(now, self.clock()))

    def _reporter(self, task):
        """report(step=, progress=) for a local function: writes through the
        store with the lease token (which renews the lease); raises once the
        task was cancelled or taken over, so the function stops."""
        last = {"step": "running", "progress": 0.0, "at": 0.0}

        def report(step=None, progress=None):
            if report.stopped is not None:
                raise report.stopped
            if progress is not None:
                try:
                    progress = round(min(1.0, max(0.0, float(progress))), 3)
                except (TypeError, ValueError):
                    raise InvalidInput("report(progress=) takes a number from 0 to 1") from None
            step = last["step"] if step is None else str(step)[:200]
            now = max(task["updated_at"], self.clock())
            # A step change always shows; progress alone at most 5 times a second.
            if step == last["step"] and (progress == last["progress"] or time.monotonic() - last["at"] < 0.2):
                return
            try:
                self.store.update(task["id"], token=task["lease_token"], now=now, step=step,
                                  progress=progress, lease_expires_at=now + self.lease_s)
            except (StaleLease, Conflict) as exc:
                report.stopped = _Stopped(f"task {task['id']} stopped: {exc}")
                raise report.stopped from None
            last.update(step=step, progress=progress, at=time.monotonic())

        report.stopped = None
        return report

    def _poll(self, task, provider, now):
        try:
            status = self._ask(task, provider, now)
        except ProviderUnavailable as exc:
            return self._later(task, now, str(exc), retry_after=exc.retry_after)
        self._apply(task, provider, status, now)

    def _ask(self, task, provider, now):
        """provider.poll(), timed and counted."""
        try:
            with metrics.provider_call(provider.name, "poll"):
                status = provider.poll(task, now)
        except Exception:
            metrics.POLLS.inc(provider.name, "error")
            raise
        metrics.POLLS.inc(provider.name, status.state)
        return status

    def _apply(self, task, provider, status, now):
        token = task["lease_token"]
        if status.state in ("queued", "running"):
            next_at = now + self.poll_interval(task, provider, now)
            new_status = "running"
            if (task["status"], task["step"], task["progress"]) == (new_status, status.step, status.progress):
                self.store.reschedule(task["id"], token=token, next_poll_at=next_at,
                                      polls=task["polls"] + 1, **_recovered(task))
            else:
                self.store.update(task["id"], token=token, now=now, release=True, status=new_status,
                                  step=status.step, progress=status.progress,
                                  polls=task["polls"] + 1, next_poll_at=next_at, **_recovered(task))
        elif status.state == "succeeded":
            self._collect(task, provider, status, now)
        elif status.state == "failed":
            self._finish(task, now, "failed", error=(status.code or "provider_rejected",
                                                     status.message or "the provider failed the job"))
        else:
            self._lost(task, provider, now)

    def _lost(self, task, provider, now):
        if task["attempts"] < provider.retries:
            log.warning("task %s: %s no longer knows %s; submitting again", task["id"], provider.name,
                        task["external_id"])
            self.store.update(task["id"], token=task["lease_token"], now=now, release=True,
                              status="queued", external_id=None, step="resubmitting",
                              progress=None, next_poll_at=now)
        else:
            what = ("the process running it stopped" if provider.runs_in_worker
                    else f"{provider.name} no longer knows the job")
            self._finish(task, now, "failed", error=(
                "provider_lost", f"{what}, after {task['attempts']} attempt(s)"))

    def _collect(self, task, provider, status, now):
        """Save every output before the task may say succeeded."""
        saved, lost, expired = [], status.missing, False
        names = set()
        for i, output in enumerate(status.outputs):
            name = _unique(safe_file_name(output.name or f"out_{i}"), names)
            try:
                saved.append(self.files.save(task["id"], name, provider.fetch(task, output),
                                             max_bytes=provider.max_file_bytes,
                                             content_type=output.content_type))
                metrics.DOWNLOADS.inc(provider.name, "saved")
                metrics.DOWNLOAD_BYTES.inc(provider.name, amount=saved[-1]["size"])
            except ResultExpired as exc:
                metrics.DOWNLOADS.inc(provider.name, "expired")
                log.warning("task %s: %s", task["id"], exc)
                lost += 1
                expired = True
            except (InvalidInput, ProviderRejected) as exc:
                metrics.DOWNLOADS.inc(provider.name, "invalid")
                log.warning("task %s: %s", task["id"], exc)
                lost += 1
            except ProviderUnavailable as exc:
                metrics.DOWNLOADS.inc(provider.name, "retry")
                return self._later(task, now, f"download: {exc}", retry_after=exc.retry_after)
        if saved and lost:
            self._finish(task, now, "partial", files=saved,
                         error=("result_expired" if expired else "invalid_result",
                                f"{lost} of {lost + len(saved)} outputs could not be saved"))
        elif saved:
            self._finish(task, now, "succeeded", files=saved)
        elif expired:
            self._finish(task, now, "failed", error=("result_expired",
                                                     "the result links expired before they were saved"))
        else:
            self._finish(task, now, "failed", error=("invalid_result", "the provider returned no usable output"))

    def _finish(self, task, now, status, *, error=None, files=None, **changes):
        changes.update(status=status, step="done" if status != "failed" else "failed")
        if error is not None:
            changes["error"] = {"code": error[0], "message": error[1]}
        if files is not None:
            changes["files"] = files
            changes["progress"] = 1.0
        # The store logs the change (holdfast.tasks), once it is committed.
        self.store.update(task["id"], token=task["lease_token"], now=now, **changes)

    def _later(self, task, now, reason, retry_after=None):
        """A transient failure: look again later; the deadline bounds it."""
        state = dict(task["state"] or {})
        failures = state.get("failures", 0) + 1
        state.update(failures=failures, last_error=reason[:500])
        delay = max(TRANSIENT.delay(failures), retry_after or 0)
        log.warning("task %s: %s; next try in %.0fs", task["id"], reason, delay)
        try:
            self.store.reschedule(task["id"], token=task["lease_token"], next_poll_at=now + delay,
                                  polls=task["polls"], state=state)
        except HoldfastError as exc:
            log.info("task %s: not rescheduled: %s", task["id"], exc)

    def poll_interval(self, task, provider, now):
        """The first poll after poll_interval_s, then a tenth of the task's age,
        up to max_poll_interval_s: quick jobs feel live, long ones cost little."""
        age = now - (task["started_at"] or now)
        return min(provider.max_poll_interval_s, max(provider.poll_interval_s, age / 10))

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
        done = {"files": 0, "tasks": 0, "events": 0, "sessions": 0}
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
            log.info("retention: deleted %(files)d task(s)' files, %(tasks)d finished task(s), "
                     "%(events)d event(s), %(sessions)d expired session(s)", done)
        return done

    def cancel_at_provider(self, task):
        """Best effort, never in a request's or a transaction's way."""
        provider = self.providers.get(task["provider"])
        if provider is None or not task.get("external_id"):
            return
        if self.pool is not None:
            self.pool.submit(self._cancel, provider, task)
        else:
            self._cancel(provider, task)

    def _cancel(self, provider, task):
        try:
            with metrics.provider_call(provider.name, "cancel"):
                provider.cancel(task)
        except Exception as exc:
            log.warning("task %s: cancel at %s failed: %s", task["id"], provider.name, exc)


def _recovered(task):
    """The state change that clears a transient-failure streak once the
    provider answers again (nothing when there was none)."""
    state = task["state"] or {}
    if not state.get("failures"):
        return {}
    return {"state": {k: v for k, v in state.items() if k != "failures"}}


def _unique(name, taken):
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    candidate, n = name, 1
    while candidate in taken:
        candidate = f"{stem}_{n}.{ext}" if dot else f"{stem}_{n}"
        n += 1
    taken.add(candidate)
    return candidate


def _utcnow():
    return datetime.now(timezone.utc)
