"""One step of one claimed task: submit it (and what a submit in doubt
means), run a local function, poll, save the results, finish or look again
later. Worker (worker/__init__.py) decides when; these decide what.

Every step writes back with the lease token it was given, so a worker that
lost its lease changes nothing; `now` is a parameter, so tests pass a clock.
"""

import logging
import os
import time

import cpu
import metrics
from errors import (Conflict, HoldfastError, InDoubt, InvalidInput, InvalidResult, ProviderRejected,
                    ProviderUnavailable, ResultExpired, StaleLease, StoreUnavailable)
from providers import Retry, Status
from store import (POSTED_AT, SLOT_STEP, SLOT_WAIT_STEP, TERMINAL, external_id_problem, lease_dir, no_space,
                   safe_file_name)

log = logging.getLogger("holdfast.worker")

# Transient failures (provider down, a download that broke) retry on this
# schedule until the task's deadline; the sweeper ends it then.
TRANSIENT = Retry(max_attempts=10**9, intervals=(1, 2, 4, 8, 15, 30, 60))
WAITING_FOR_SLOT = SLOT_WAIT_STEP
PARKED_S = 300.0           # a task refused a slot looks again by itself; the line wakes it sooner
WAKE_EVERY_S = 1.0         # at most one wake_backoff per provider this often, per process


class _Stopped(Conflict):
    """A local function's task was cancelled, expired or taken over, or
    the worker is shutting down."""

    code = "task_stopped"


class Steps:
    """The steps, as methods of Worker (which holds the store, the providers,
    the file store, the clock and the lease bookkeeping they use)."""

    def _start(self, task, provider, now):
        if provider.runs_in_worker:
            return self._run_here(task, provider, now)
        state = task["state"] or {}
        if POSTED_AT in state:
            return self._doubtful(task, provider, now)
        if task["external_id"] is not None and not state.get("failures"):
            # An id stored without the mark of a sent submit: written by an
            # older holdfast, whose submit may have reached the provider
            # before a crash. Ask before submitting again. (A try that was
            # not sent keeps its id too, but counts failures.)
            if self._settled_by_asking(task, provider, now):
                return
        # Still `submitting` with nothing in doubt: the last try was not sent
        # or was refused, so this is the same attempt again.
        same_try = task["step"] == SLOT_STEP and task["attempts"] > 0
        attempts = task["attempts"] if same_try else task["attempts"] + 1
        state, url = self._callback_for(task, provider, state)
        # Marked as sent, and committed, before it is: a crash from here on
        # leaves a submit in doubt that the next owner will not repeat blindly.
        held = self.store.take_slot(task["id"], token=task["lease_token"], now=now, limit=provider.concurrency,
                                    wake=self.wake, seen=task, external_id=provider.new_id(task, now),
                                    attempts=attempts, step=SLOT_STEP, state={**state, POSTED_AT: now})
        if held is None:
            return self._wait_for_slot(task, provider, now)
        try:
            with self.calling(provider, "submit"):
                external_id = provider.submit(dict(held, callback_url=url) if url else held, now)
        except ProviderRejected as exc:
            return self._finish(held, now, "failed", error=(exc.code, exc.message))
        except InDoubt as exc:
            return self._in_doubt(held, provider, now, str(exc))
        except ProviderUnavailable as exc:
            # Not sent, or refused before a job existed: nothing is in doubt.
            return self._later(dict(held, state=_without(held["state"], POSTED_AT)), now, str(exc),
                               retry_after=exc.retry_after)
        except Exception as exc:
            # An adapter's bug may strike after its request went out.
            log.exception("task %s: unexpected error in submit", held["id"])
            return self._in_doubt(held, provider, now, f"internal: {exc}")
        problem = external_id_problem(external_id)
        if problem is not None:
            # A job exists under an id holdfast cannot keep, so cannot follow:
            # the provider's fault, and another submit would make another.
            self._finish(held, now, "failed", error=("invalid_result", f"{provider.name}: {problem}"))
            return self._cancel(provider, dict(held, external_id=external_id))
        try:
            self.store.update(held["id"], token=held["lease_token"], now=now, release=True, seen=held,
                              status="running", external_id=external_id, step="submitted", progress=0.0,
                              polls=0, next_poll_at=now + provider.poll_interval_s,
                              state=_without(held["state"], POSTED_AT, "failures"))
        except Conflict:
            # Cancelled or expired while submit was in flight: that cancel
            # reached the provider before the job did (or, with no id yet,
            # not at all), so the job just started runs for nobody. Stop it.
            if self.store.get_task(held["id"])["status"] in ("cancelled", "failed"):
                log.info("task %s ended while %s took it; cancelling job %s there", held["id"],
                         provider.name, external_id)
                self._cancel(provider, dict(held, external_id=external_id))
            raise
        except InvalidInput as exc:
            return self._finish(held, now, "failed", error=("invalid_result", f"{provider.name}: {exc.message}"))
        except HoldfastError as exc:
            # Not recorded: the mark of a sent submit stays, so whoever looks
            # next treats the job as in doubt rather than sending it again.
            return self._later(held, now, f"recording the submit: {exc}")
        self._answered(held, provider, now)

    def _in_doubt(self, task, provider, now, reason):
        """The submit may have made a job: never send it again blindly."""
        if provider.client_ids and task["external_id"] is not None:
            ask_at = task["state"][POSTED_AT] + provider.doubt_grace_s
            return self._later(task, now, f"{reason}; in doubt, {provider.name} is asked about "
                               f"{task['external_id']} {ask_at - now:.0f}s from now", retry_after=ask_at - now)
        if self._awaits_callback(task, provider):
            return self._await_callback(task, provider, now, reason)
        return self._no_second_job(task, provider, now, reason)

    def _doubtful(self, task, provider, now):
        """A queued task whose last submit was sent and never recorded: an
        in-doubt answer, or a crash in the middle."""
        if not (provider.client_ids and task["external_id"] is not None):
            reason = "its submit was interrupted before the answer was recorded"
            if self._awaits_callback(task, provider):
                return self._await_callback(task, provider, now, reason)
            return self._no_second_job(task, provider, now, reason)
        ask_at = task["state"][POSTED_AT] + provider.doubt_grace_s
        if now < ask_at:
            # The request may still be on its way, or being handled: a look
            # now could find nothing, and a second submit would run twice.
            return self.store.reschedule(task["id"], token=task["lease_token"], next_poll_at=ask_at,
                                         polls=task["polls"])
        if not self._settled_by_asking(task, provider, now):
            self._lost(task, provider, now, f"{provider.name} does not know {task['external_id']}, "
                                            "whose submit was in doubt")

    def _settled_by_asking(self, task, provider, now):
        """Ask the provider about the task's stored id. True when that
        settled this step (the job was found and is followed, or the
        provider did not answer and the task looks again later); False when
        the provider does not know the job."""
        try:
            status = self._ask(task, provider, now)
        except ProviderUnavailable as exc:
            self._later(task, now, str(exc), retry_after=exc.retry_after)
            return True
        if status.state == "unknown":
            return False
        self._found(task, provider, status, now)
        return True

    def _no_second_job(self, task, provider, now, reason):
        """An in-doubt submit to a provider that takes no id from us: there
        is nothing to ask about, so the task fails (refunded) rather than
        risk a second paid job, unless the provider's table accepts one."""
        if provider.on_doubt == "resubmit" and task["attempts"] < provider.retries:
            log.warning("task %s: %s; on_doubt = resubmit: submitting again (attempt %d of %d)", task["id"],
                        reason, task["attempts"] + 1, provider.retries)
            return self._resubmit(task, now, now + TRANSIENT.delay(task["attempts"]))
        message = (f"{reason}. {provider.name} may have made the job, and it takes no id from holdfast "
                   "to ask about: not submitted again, so as not to make a second one")
        if provider.on_doubt == "resubmit":
            message += f" ({task['attempts']} attempt(s) made, retries = {provider.retries})"
        self._finish(task, now, "failed", error=("submission_in_doubt", message[:2000]))

    def _found(self, task, provider, status, now, **changes):
        """The provider has the job whose submit went unrecorded: follow it.
        `changes`: more to record with that (the job's id, when a callback
        named it)."""
        log.info("task %s: found %s at %s under %s", task["id"], status.state, provider.name,
                 task["external_id"])
        self._answered(task, provider, now)
        task = self.store.update(task["id"], token=task["lease_token"], now=now, seen=task, status="running",
                                 step="recovered", next_poll_at=now,
                                 state=_without(task["state"], POSTED_AT, "failures"), **changes)
        return self._apply(task, provider, status, now)

    def _answered(self, task, provider, now):
        """The provider answered. If it had been failing, its other queued
        tasks stop waiting out their backoff: they go now, not up to a
        minute later."""
        if not provider.came_back() and not (task["state"] or {}).get("failures"):
            return
        last = self._woken.get(provider.name)
        if last is not None and time.monotonic() - last < WAKE_EVERY_S:
            return
        self._woken[provider.name] = time.monotonic()
        try:
            woken = self.store.wake_backoff(provider.name, now=now)
        except HoldfastError as exc:
            log.info("%s answers again; its waiting tasks were not woken: %s", provider.name, exc)
            return
        if woken:
            log.info("%s answers again: %d queued task(s) no longer wait out their backoff", provider.name,
                     woken)
            self.wake()

    def _wait_for_slot(self, task, provider, now):
        """Every slot is taken: park. The `slots` job wakes the task when a
        slot is free and it is first in line (store.wake_line); looking
        again by itself every poll interval cost the server a third of a
        core with 8,000 waiting (bench/parked_bench.py). PARKED_S is only
        the fallback, should no process look at the line."""
        next_at = now + max(provider.poll_interval_s, PARKED_S)
        if task["step"] != WAITING_FOR_SLOT:
            self.store.update(task["id"], token=task["lease_token"], now=now, release=True, seen=task,
                              step=WAITING_FOR_SLOT, next_poll_at=next_at)
        else:
            self.store.reschedule(task["id"], token=task["lease_token"], next_poll_at=next_at,
                                  polls=task["polls"])

    def _run_here(self, task, provider, now):
        """A local function: run it in this (pool) thread, with retries."""
        attempt = task["attempts"] + 1
        held = self.store.take_slot(task["id"], token=task["lease_token"], now=now, limit=provider.concurrency,
                                    wake=self.wake, seen=task, status="running", attempts=attempt, step="running", progress=0.0,
                                    external_id=f"local-{attempt}", next_poll_at=now)
        if held is None:
            return self._wait_for_slot(task, provider, now)
        report = self._reporter(held)
        try:
            # On every CPU the process started with, not the server's one
            # (cpu.py): the function may use many cores, and its own
            # threads keep them.
            with cpu.everywhere():
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
            if report.stopped is None and self._leaving:
                # Its lease goes back to the store as the process exits; the
                # next owner finds the run gone and starts it again.
                report.stopped = _Stopped(f"task {task['id']} stopped: this worker is shutting down")
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
        self._answered(task, provider, now)
        self._apply(task, provider, status, now)

    def _ask(self, task, provider, now):
        """provider.poll(), timed and counted. An answer over a limit (too
        big, too deep, a refused redirect) comes back the same at every
        poll: it fails the task, wherever the worker asked."""
        try:
            with self.calling(provider, "poll"):
                status = provider.poll(task, now)
        except InvalidResult as exc:
            metrics.POLLS.inc(provider.name, "error")
            return Status.failed(exc.message, code=exc.code)
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
                self.store.update(task["id"], token=token, now=now, release=True, seen=task, status=new_status,
                                  step=status.step, progress=status.progress,
                                  polls=task["polls"] + 1, next_poll_at=next_at, **_recovered(task))
        elif status.state == "succeeded":
            self._collect(task, provider, status, now)
        elif status.state == "failed":
            self._finish(task, now, "failed", error=(status.code or "provider_rejected",
                                                     status.message or "the provider failed the job"))
        else:
            self._lost(task, provider, now)

    def _lost(self, task, provider, now, what=None):
        if what is None:
            what = ("the process running it stopped" if provider.runs_in_worker
                    else f"{provider.name} no longer knows the job")
        if task["attempts"] < provider.retries:
            log.warning("task %s: %s (%s); submitting again", task["id"], what, task["external_id"])
            self._resubmit(task, now, now)
        else:
            self._finish(task, now, "failed", error=(
                "provider_lost", f"{what}, after {task['attempts']} attempt(s)"))

    def _resubmit(self, task, now, at):
        """Back to the queue for a new submit (a new attempt) at `at`."""
        state = task["state"] or {}
        changes = {"state": _without(state, POSTED_AT)} if POSTED_AT in state else {}
        self.store.update(task["id"], token=task["lease_token"], now=now, release=True, seen=task, status="queued",
                          external_id=None, step="resubmitting", progress=None, next_poll_at=at, **changes)

    def _collect(self, task, provider, status, now):
        """Save every output before the task may say succeeded.

        The files go into this lease's own folder, published by the fenced
        update that ends the task: a worker that lost its lease meanwhile
        writes only where nobody looks, and removes that folder when the
        store refuses it (see store/files.py)."""
        scope = lease_dir(task["lease_token"])
        published = False
        try:
            published = self._save_outputs(task, provider, status, now, scope)
        except StoreUnavailable:
            # The update that publishes may have committed before the store
            # failed (a PostgreSQL COMMIT in doubt): keep the folder. Whoever
            # ends the task, or retention, removes it if it was not published.
            published = None
            raise
        finally:
            if published is False:
                self.files.discard(task["id"], scope)

    def _save_outputs(self, task, provider, status, now, scope):
        """_collect's work; True once the files are published, False when
        this lease's folder is not wanted."""
        saved, lost, expired = [], status.missing, False
        names = set()
        if len(status.outputs) > provider.max_outputs:
            self._finish(task, now, "failed", error=(
                "invalid_result", f"the provider returned {len(status.outputs)} outputs, over the limit "
                                  f"of {provider.max_outputs} (max_outputs)"))
            return False
        check = self._download_check(task)
        total = [0]
        for i, output in enumerate(status.outputs):
            name = _unique(safe_file_name(output.name or f"out_{i}"), names)
            chunks = _within(provider.fetch(task, output, check), total, provider.max_task_bytes)
            try:
                saved.append(self.files.save(task["id"], name, chunks, max_bytes=provider.max_file_bytes,
                                             content_type=output.content_type, scope=scope))
                metrics.DOWNLOADS.inc(provider.name, "saved")
                metrics.DOWNLOAD_BYTES.inc(provider.name, amount=saved[-1]["size"])
            except ResultExpired as exc:
                metrics.DOWNLOADS.inc(provider.name, "expired")
                log.warning("task %s: %s", task["id"], exc)
                lost += 1
                expired = True
            except InvalidResult as exc:
                # A refused address, a redirect loop, a task over its limits:
                # the provider's answer is at fault, and the rest of it with it.
                metrics.DOWNLOADS.inc(provider.name, "invalid")
                self._finish(task, now, "failed", error=(exc.code, f"{output.name}: {exc.message}"))
                return False
            except (InvalidInput, ProviderRejected) as exc:
                metrics.DOWNLOADS.inc(provider.name, "invalid")
                log.warning("task %s: %s", task["id"], exc)
                lost += 1
            except ProviderUnavailable as exc:
                metrics.DOWNLOADS.inc(provider.name, "retry")
                self._later(task, now, f"download: {exc}", retry_after=exc.retry_after)
                return False
            except OSError as exc:
                if isinstance(exc, FileNotFoundError) and not os.path.isdir(
                        os.path.dirname(self.files.path(task["id"], name, scope))):
                    # The folder went while we wrote: the task ended (cancelled,
                    # past its deadline) and its files were removed.
                    raise Conflict(f"the task ended while {name} was being saved", code="task_finished") from None
                if not (no_space(exc) or getattr(exc, "transient", False)):
                    raise
                # A full disk: the next try is after a backoff, by which time
                # retention or an operator may have made room. So for a
                # bucket that cannot be reached (store/objects.py).
                metrics.DOWNLOADS.inc(provider.name, "retry")
                self._later(task, now, f"cannot save {name}: {exc.strerror or exc}", quiet=True)
                return False
        if saved and lost:
            self._finish(task, now, "partial", files=saved,
                         error=("result_expired" if expired else "invalid_result",
                                f"{lost} of {lost + len(saved)} outputs could not be saved"))
            return True
        elif saved:
            self._finish(task, now, "succeeded", files=saved)
            return True
        elif expired:
            self._finish(task, now, "failed", error=("result_expired",
                                                     "the result links expired before they were saved"))
        else:
            self._finish(task, now, "failed", error=("invalid_result", "the provider returned no usable output"))
        return False

    def _download_check(self, task):
        """For provider.fetch(): stop a download at the task's deadline (the
        sweeper ends the task then) or once the task is no longer this
        worker's (cancelled, expired, taken over); renews the lease while it
        runs."""
        def check():
            now = self.clock()
            if task["deadline_at"] is not None and now >= task["deadline_at"]:
                raise ProviderUnavailable("the download was stopped at the task's deadline")
            self.store.renew_lease(task["id"], token=task["lease_token"], expires_at=now + self.lease_s)
        return check

    def _finish(self, task, now, status, *, error=None, files=None, **changes):
        changes.update(status=status, step="done" if status != "failed" else "failed")
        if error is not None:
            changes["error"] = {"code": error[0], "message": error[1]}
        if files is not None:
            changes["files"] = files
            changes["progress"] = 1.0
        # The store logs the change (holdfast.tasks), once it is committed.
        done = self.store.update(task["id"], token=task["lease_token"], now=now, seen=task, **changes)
        self._told.pop(task["id"], None)
        provider = self.providers.get(task["provider"])
        if provider is not None and (task["status"] == "running" or task["step"] == SLOT_STEP):
            self.slot_freed(provider)
        self.drop_unlisted_files(done)

    def drop_unlisted_files(self, task):
        """Once a task has ended: delete the copies of its files it does not
        list (all of them when it ended without files: failed, cancelled,
        timed out). Best effort; retention's pass finishes what fails here."""
        if self.files is None or task["status"] not in TERMINAL:
            return
        try:
            self.files.remove_unlisted(task["id"], task["files"])
        except OSError as exc:
            log.warning("task %s: could not remove unlisted files: %s", task["id"], exc)

    def _later(self, task, now, reason, retry_after=None, quiet=False):
        """A transient failure: look again later; the deadline bounds it.
        `quiet`: a reason repeated from the last try (a full disk) is not
        logged again, whether or not the store could record it."""
        state = dict(task["state"] or {})
        failures = state.get("failures", 0) + 1
        repeated = quiet and reason[:500] in (state.get("last_error"), self._told.get(task["id"]))
        if quiet:
            if len(self._told) > 10_000:
                self._told.clear()     # tasks that ended elsewhere (cancelled) leave entries
            self._told[task["id"]] = reason[:500]
        state.update(failures=failures, last_error=reason[:500])
        delay = max(TRANSIENT.delay(failures), retry_after or 0)
        log.log(logging.DEBUG if repeated else logging.WARNING, "task %s: %s; next try in %.0fs",
                task["id"], reason, delay)
        try:
            self.store.reschedule(task["id"], token=task["lease_token"], next_poll_at=now + delay,
                                  polls=task["polls"], state=state)
        except HoldfastError as exc:
            log.log(logging.DEBUG if quiet else logging.INFO, "task %s: not rescheduled: %s", task["id"], exc)

    def poll_interval(self, task, provider, now):
        """The first poll after poll_interval_s, then a tenth of the task's age,
        up to max_poll_interval_s: quick jobs feel live, long ones cost little."""
        age = now - (task["started_at"] or now)
        interval = min(provider.max_poll_interval_s, max(provider.poll_interval_s, age / 10))
        # Behind on polls: old tasks wait longer, so young ones are polled on time.
        return interval * self.slow_down.stretch(task, provider, now)


def _recovered(task):
    """The state change that clears a transient-failure streak once the
    provider answers again (nothing when there was none)."""
    state = task["state"] or {}
    if not state.get("failures"):
        return {}
    return {"state": {k: v for k, v in state.items() if k != "failures"}}


def _within(chunks, total, limit):
    """`chunks`, counted into total[0] for the whole task: InvalidResult past
    `limit` (max_task_bytes), whichever file crosses it."""
    for chunk in chunks:
        total[0] += len(chunk)
        if total[0] > limit:
            raise InvalidResult(f"the task's outputs are over max_task_bytes ({limit} bytes)")
        yield chunk


def _without(state, *keys):
    return {k: v for k, v in (state or {}).items() if k not in keys}


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
