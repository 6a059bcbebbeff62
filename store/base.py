"""The Store interface: what every backend does, documented once.

BaseStore states each method's arguments, return value and errors, and what a
backend can do (`multi_process`, `multi_host`) as class attributes. The
contract suite in tests/test_store.py holds every backend to it.
"""


class BaseStore:
    """What every backend does. Tasks are plain dicts with TASK_COLUMNS as keys
    (params, files, error and state already decoded); `task_json` makes the
    public form.

    Every method that changes a task bumps its `version` and writes its event
    row in the same transaction. Errors are holdfast's own (errors.py).
    """

    name = "base"
    multi_process = False   # several processes may share the store
    multi_host = False      # several hosts may share the store

    def close(self):
        """Release connections and files."""

    def health(self):
        """Raise StoreUnavailable when the store cannot answer, when the disk
        it keeps its files on is full, or while writes fail: from a failed
        write until one commits again (a small probe write, at most every
        few seconds, finds that out on an idle server)."""
        raise NotImplementedError

    # users
    def create_user(self, name, *, admin=False, credits=None, token=None, now=None,
                    max_active=None, rate_per_s=None, max_priority=None):
        """Create a user; return (user dict, token). The token (a new random
        one unless given) is shown only here: the store keeps its hash.
        `credits` (None: no credit limit) starts the balance with a `grant`
        ledger row; `max_active` and `rate_per_s` (None: the server's
        defaults) are the user's own limits; `max_priority` (None: 0) the
        highest priority the user may give a task. Conflict if the name is
        taken, InvalidInput for a bad name or limit."""
        raise NotImplementedError

    def set_max_priority(self, name, max_priority):
        """Set the highest priority the user may give a task (None: 0).
        Returns the user; NotFound (user_not_found), InvalidInput."""
        raise NotImplementedError

    def user_by_token(self, token):
        """The user dict whose token this is, or None."""
        raise NotImplementedError

    def user_by_name(self, name):
        """The user dict with this name; NotFound otherwise."""
        raise NotImplementedError

    def count_users(self):
        raise NotImplementedError

    def reserved_credits(self, user_id):
        """Credits held by the user's tasks that have not ended."""
        raise NotImplementedError

    # tasks
    def submit(self, user_id, provider, params, *, now, deadline_at, cost=0,
               dedupe_key=None, retry_of=None, max_active=None, max_queued=None, admit=None, webhook=None,
               priority=0):
        """Create a queued task (`priority`: an integer within
        +-MAX_PRIORITY, InvalidInput otherwise; the caller holds it to the
        user's max_priority), or find the user's live task with this
        dedupe_key. Returns (task, deduplicated). Reserves `cost` credits from a
        user with a balance (PaymentRequired when too low), refuses a user at
        `max_active` active tasks (TooMany, code too_many_active) and a
        provider with `max_queued` queued tasks (TooMany, code queue_full), all
        in one transaction: a refusal creates and reserves nothing. A
        deduplicated answer is never refused. `admit()` (quick, in memory; the
        caller's rate limit) runs last, only when a task is about to be
        created, and at most once: what it raises refuses the task the same
        way. With `retry_of` (the id of the user's failed or cancelled task
        this one retries), a live retry of that task (one not failed or
        cancelled) is found and returned the same way, (task, True), so
        concurrent retries of one task make one task and reserve once; a
        unique index on retry_of over live tasks backs this up. `webhook`
        ({"url", "events"}, checked by the caller) is the task's own webhook
        URL, stored with it (see the webhooks section below)."""
        raise NotImplementedError

    def get_task(self, task_id, user_id=None):
        """The task; NotFound when missing or owned by another user."""
        raise NotImplementedError

    def list_tasks(self, user_id, *, statuses=None, limit=50, before=None, retry_of=None):
        """(tasks newest first, cursor for the next page or None); with
        `retry_of` (a task id), only the user's tasks that retry that task."""
        raise NotImplementedError

    def claim(self, owner, *, now, limit, lease_s, statuses=("queued", "running"), fresh_first=False, skip=()):
        """Lease up to `limit` due tasks (next_poll_at <= now, no live lease)
        to `owner`, the longest due first; with `fresh_first` (the worker's
        slow-down), a running task's turn is put off by its age, so
        submissions and young tasks go first. Tasks of the providers named
        in `skip` are passed over and stay due. Each claim increments the
        task's lease_token; the returned tasks carry the new token, which
        every later write must present."""
        raise NotImplementedError

    def claim_on_release(self, owner, *, lease_s, clock, fresh_first=False, skip=()):
        """Ask that the next write of this thread that lets a lease go
        (update() with `release` or ending the task, reschedule()) also
        lease one due task to `owner`, as claim() would at clock(), in the
        same transaction: a worker thread about to be free takes its next
        task without a write of its own. Once: the ask is used up by that
        write, or dropped by claimed_on_release()."""
        raise NotImplementedError

    def claimed_on_release(self):
        """What claim_on_release()'s write leased once it committed, [] or
        [task]; None when no such write committed (then claim()). Drops
        the ask."""
        raise NotImplementedError

    def poll_lag(self, *, now):
        """How late (seconds) the longest-due unleased active task is at
        `now`; 0 when none is due."""
        raise NotImplementedError

    def update(self, task_id, *, token, now, release=False, seen=None, **changes):
        """Apply `changes` to a task held with lease `token` (None: no lease
        check, for users and admins). Checks the transition table; settles
        credits when the task ends; `release` drops the lease. `seen`: the
        task as this lease last had it from the store (claim, take_slot,
        update); while the row still has its version, the change is made
        without reading the row again, otherwise to the row as it is. Only
        the columns the change moves are written. `files`
        entries with a `dir` (the lease folder they were written in) must
        name this token's folder (ValueError otherwise): files are fenced
        like rows. StaleLease when the token is old, Conflict for an illegal
        transition, NotFound; InvalidInput (code invalid_result) for an
        `external_id` that external_id_problem() refuses, on every backend."""
        raise NotImplementedError

    def reschedule(self, task_id, *, token, next_poll_at, polls, state=None):
        """Set when to look at a held task next and drop the lease. Nothing a
        user sees changes, so no version bump and no event. StaleLease."""
        raise NotImplementedError

    # -- provider slots and long steps (the worker's) --------------------------

    def take_slot(self, task_id, *, token, now, limit, wake=None, seen=None, **changes):
        """Apply `changes` (as update(), `seen` too, lease kept) to a task held with
        lease `token` only if its provider has room: fewer than `limit` of
        the provider's other tasks hold a slot (None: no limit), or this task
        holds one already. A task holds a slot while it is running, or queued
        with step SLOT_STEP. The count and the change happen in one write
        transaction, serialized per provider, so the limit holds across
        threads and processes. Returns the changed task, or None (nothing
        changed) when every slot is taken.

        Scarce slots are shared fairly: with more tasks waiting than slots
        free, a free slot goes only to a task among the first in line (see
        SqlStore._next_in_line: the user holding fewest of the provider's
        slots first, then higher priority, then the one waiting longest),
        and a task refused for that makes those first in line due at once
        (then `wake`, if given, is called once that is committed, so a
        worker takes them without waiting for its next tick). With slots to
        spare every task gets one. StaleLease, Conflict, NotFound."""
        raise NotImplementedError

    def wake_line(self, provider, *, limit, now):
        """Make due now those first in line for `provider`'s slots that a
        refusal parked (see take_slot), as many as there are slots free
        under `limit`; with `limit` None, every parked task of `provider`.
        Returns how many it woke. Reads the slots held and the line, and
        writes only when a task first in line is parked: a look at a
        provider whose slots are all taken costs one short read, however
        many tasks wait. The worker looks every tick, so a task refused a
        slot can park for long without a slot given back meanwhile going
        unused."""
        raise NotImplementedError

    def renew_lease(self, task_id, *, token, expires_at):
        """Move the expiry of a lease still held with `token` to
        `expires_at` (a long download, a local function). No version bump,
        no event. StaleLease when the task is no longer held with it."""
        raise NotImplementedError

    def cancel(self, task_id, user_id, *, now):
        """Cancel a user's active task (credits refunded). Conflict if terminal."""
        raise NotImplementedError

    def overdue(self, *, now, limit):
        """Active tasks whose deadline_at has passed."""
        raise NotImplementedError

    def expire(self, task_id, *, now, error):
        """Fail an active task past its deadline, whoever holds it (refunded).
        Conflict if it ended meanwhile."""
        raise NotImplementedError

    def lease_owners(self):
        """The owners holding leases now."""
        raise NotImplementedError

    def release_leases(self, owners):
        """Drop every lease these owners hold; return how many."""
        raise NotImplementedError

    # -- liveness: heartbeats on the store's clock ------------------------------
    #
    # Whether a lease owner is alive is read from its heartbeat row, never
    # from a PID. Every time here is on the store's clock: a backend shared
    # by several hosts (PostgreSQL) takes it in SQL and ignores `now`, so
    # hosts whose clocks disagree still agree on who is dead; the others
    # take the caller's `now`, the one clock of their one host.

    def heartbeat(self, owner, *, now, lease_s, identity):
        """Record that `owner` is alive: create or renew its row, stamped
        on the store's clock. `lease_s`: how long after this beat the owner
        counts as dead if no other beat came. `identity`: the process's
        {host, pid, boot_id, pid_ns, started} (process_identity()). Rows of
        owners dead for over an hour are deleted on the way."""
        raise NotImplementedError

    def end_heartbeat(self, owner):
        """Delete `owner`'s row (a clean shutdown); True if it was there."""
        raise NotImplementedError

    def lease_holders(self, *, now):
        """[{"owner", "heartbeat"}] for every owner holding leases now;
        "heartbeat" is None for an owner without a row, or its row as a dict
        (host, pid, boot_id, pid_ns, started, lease_s, beat_at) with "stale":
        True once beat_at + lease_s has passed on the store's clock.
        dead_owners() decides from this."""
        raise NotImplementedError

    def record_provider_health(self, provider, *, now, ok_at=None, failures=0, error=None):
        """Add what one worker saw of `provider` since its last report:
        `ok_at`, when the provider last answered (None: not once), then
        `failures` calls that failed after that answer (or, without one, in
        all), the last of them `error` = (code, message, at). An answer newer
        than the stored one restarts the count of consecutive failures at
        `failures`; otherwise they are added to it. The newest error stays."""
        raise NotImplementedError

    def provider_health(self):
        """{provider: {last_ok_at, last_error_at, last_error_code,
        last_error, consecutive_failures, updated_at}} of every provider a
        worker reported on."""
        raise NotImplementedError

    # recovery

    def expired_leases(self, *, now):
        """[(task_id, owner)] of leases that ran out before `now`."""
        raise NotImplementedError

    def release_expired_leases(self, *, now):
        """Drop the leases that ran out before `now`; return how many."""
        raise NotImplementedError

    def claim_task(self, task_id, owner, *, now, lease_s):
        """Lease one active task whatever its schedule, or None when someone
        else holds a live lease on it."""
        raise NotImplementedError

    def in_doubt(self, *, limit=1000):
        """Queued tasks whose submit may have reached the provider: those
        that stored a provider id, and those whose `state` holds POSTED_AT
        (the worker marks a submit as sent before sending it), oldest id
        first."""
        raise NotImplementedError

    def wake_backoff(self, provider, *, now):
        """Make due at `now` the queued tasks of `provider` that wait out a
        transient-failure backoff (their `state` counts `failures`), for when
        the provider answers again. Leased tasks, tasks due already and
        tasks whose submit is in doubt (POSTED_AT, which wait out a grace
        period instead) keep their schedule. No version bump, no event.
        Returns how many became due."""
        raise NotImplementedError

    def poll_now(self, task_id, *, now):
        """Make an active (queued or running) task's next look due at `now`,
        leased or not (a worker holding it sets its own next look when its
        step ends): a provider said the job changed. No version bump, no
        event. True when the task is active; False, changing nothing, when it
        ended or does not exist."""
        raise NotImplementedError

    def note_progress(self, task_id, *, step, progress, now):
        """Set a running task's `step` and `progress` from outside any lease
        (ComfyUI's live progress), bumping its version and writing its
        `updated` event in one transaction, as update() does. False, and
        nothing written, when the task is not running, does not exist, or
        already says exactly that."""
        raise NotImplementedError

    def stray_reservations(self):
        """Finished tasks whose credits are still `reserved`."""
        raise NotImplementedError

    def settle_stray(self, task_id, *, now):
        """Charge or refund a finished task still holding its reservation.
        Returns the new credits state, or None when it was already settled."""
        raise NotImplementedError

    # events
    # The three reads below never return an event while a lower seq could
    # still commit (a backend whose writers commit out of seq order holds
    # the later ones back), so a reader that moves its cursor to the last
    # seq it got never skips one.

    def events_since(self, user_id, since, limit=100):
        """[(seq, event JSON text)] for the user's events after `since`."""
        raise NotImplementedError

    def task_timeline(self, user_id, task_id, *, limit=500):
        """(events, truncated): the newest `limit` events of the user's task,
        oldest first, each {"seq", "type", "at" (epoch seconds), "task" (the
        task's public JSON as that event wrote it)}; `truncated` when older
        ones were left out. An empty list for a task the user does not own:
        the caller answers NotFound from get_task()."""
        raise NotImplementedError

    def last_seq(self, user_id=None):
        """The highest seq readable now (of the user's events, or of all);
        0 for none."""
        raise NotImplementedError

    def latest_events(self, since):
        """{user_id: highest seq} over every user's events after `since`:
        whose streams have news, in one query for all of them."""
        raise NotImplementedError

    _event_listeners = ()

    def on_events(self, callback):
        """Call `callback()` in the writing thread after each commit that
        added events (quick, must not raise). Only this process's writes are
        heard: readers also poll latest_events() for other processes'."""
        self._event_listeners = (*self._event_listeners, callback)

    # operations
    def stats(self, now):
        """{"queue_depth", "active", "oldest_active_s"}: queued tasks, queued
        and running ones, and the age of the oldest of those (0 if none).
        Reads active tasks only (for GET /healthz); task_counts() counts
        every task."""
        raise NotImplementedError

    def task_counts(self):
        """{(provider, status): how many tasks}, every user's, in one
        GROUP BY (for GET /metrics)."""
        raise NotImplementedError

    # -- accounts: credits, admin queries, conversation sessions --------------
    #
    # The ledger has one row per credit movement: `reserve` (submit), then one
    # `charge` (succeeded/partial) or `refund` (failed/cancelled) per task,
    # both unique per task; `grant` rows are an admin's or the initial
    # balance (task_id '', or 'grant:' and the grant's Idempotency-Key, unique
    # per user). So balance = grants - reserves + refunds, always.

    def grant(self, user_id, amount, *, now, key=None):
        """Add `amount` credits (negative: take them away) to a user who has a
        credit limit, with a `grant` ledger row, in one transaction. Returns
        the user. With a `key` (an Idempotency-Key), a grant already made
        with it to this user is not made again: the user is returned as now,
        or Conflict idempotency_key_reused when that grant's amount differs.
        NotFound (user_not_found); Conflict no_credit_limit for a user
        without a balance, balance_too_low when it would go below zero,
        balance_too_high past MAX_CREDITS; InvalidInput for a bad amount."""
        raise NotImplementedError

    def ledger(self, *, user_id=None, task_id=None):
        """Ledger rows, oldest first, as dicts with id, user_id, task_id,
        kind, amount, created_at; filtered by user and/or task."""
        raise NotImplementedError

    def active_count(self, user_id):
        """How many queued or running tasks the user has."""
        raise NotImplementedError

    def admin_tasks(self, *, now, stuck=False, grace_s=60.0, limit=100):
        """Active tasks of every user, oldest first, as [(task, user name,
        reasons)]. `reasons` lists what looks wrong (see `stuck_reasons`):
        past_deadline, lease_expired, poll_overdue. With `stuck`, only tasks
        with at least one reason."""
        raise NotImplementedError

    def get_session(self, user_id, key, *, now):
        """The user's live session `key` as a dict with key, messages, data,
        updated_at, expires_at. NotFound (session_not_found) when missing,
        expired, or only another user's; InvalidInput for a bad key."""
        raise NotImplementedError

    def put_session(self, user_id, key, *, messages, data, now, ttl_s, max_sessions=None):
        """Replace the session (creating it): the newest MAX_SESSION_MESSAGES
        of `messages`, `data` (a JSON value or None); it expires `ttl_s` after
        `now`. Conflict (too_many_sessions) when creating it would give the
        user more than `max_sessions` live sessions. Returns the session."""
        raise NotImplementedError

    def append_messages(self, user_id, key, messages, *, now, ttl_s, max_sessions=None):
        """Append to the session (an expired one starts empty, a missing one
        is created), keep the newest MAX_SESSION_MESSAGES, expire `ttl_s`
        after `now`; atomic against concurrent appends. Returns (session,
        how many old messages were dropped). Conflict as put_session."""
        raise NotImplementedError

    def delete_session(self, user_id, key, *, now):
        """Delete the session; True if a live one was there."""
        raise NotImplementedError

    def purge_sessions(self, *, now):
        """Delete every expired session; return how many."""
        raise NotImplementedError

    # -- retention ---------------------------------------------------------------
    #
    # The worker's cleanup job: result files go after HOLDFAST_KEEP_FILES_H
    # (the task keeps its metadata and a FileExpiry mark), finished tasks and
    # their events after HOLDFAST_KEEP_TASKS_D (ledger rows stay), every event
    # after a day. task_history keeps the numbers.

    def tasks_with_old_files(self, *, before, limit):
        """Ids of finished tasks that ended before `before`, list files, and
        whose files are not yet marked expired; oldest first."""
        raise NotImplementedError

    def mark_files_expired(self, task_ids, *, now):
        """Record that these tasks' files were deleted (no version bump, no
        event: nothing in the task JSON changes). Returns how many were new."""
        raise NotImplementedError

    def files_expired_at(self, task_id):
        """When retention deleted the task's files, or None."""
        raise NotImplementedError

    def finished_before(self, *, before, limit):
        """Ids of finished tasks that ended before `before`, oldest first."""
        raise NotImplementedError

    def delete_finished(self, task_ids, *, before):
        """Delete these tasks (those still finished before `before`), their
        events and expiry marks, in one transaction; the ledger keeps its
        rows. The newest event of all is never deleted, so event seqs are
        never reused. Returns (tasks deleted, events deleted)."""
        raise NotImplementedError

    def purge_events(self, *, before):
        """Delete events created before `before` (but never the newest);
        return how many."""
        raise NotImplementedError

    def history(self, *, since_day=None, provider=None):
        """task_history rows (dicts: provider, day, outcome, tasks, total_s,
        max_s), by day, provider and outcome; `since_day` (YYYY-MM-DD) and
        `provider` filter."""
        raise NotImplementedError

    # -- the operator console (GET /api/admin/*) ---------------------------------

    def history_detail(self, *, since_day=None, provider=None):
        """task_history_detail rows (dicts: provider, day, outcome,
        error_code ('' for none), bucket (an index in DURATION_BOUNDS_S),
        tasks), filtered as history()."""
        raise NotImplementedError

    def find_tasks(self, *, statuses=None, provider=None, user_id=None, error_code=None, since=None,
                   until=None, text=None, limit=50, before=None, count=False):
        """Every user's tasks, newest first: ([(task, user name)], cursor of
        the next page or None, how many match in all (with `count`, else
        None)). Each filter given narrows: statuses, provider, user_id,
        error_code (the task's error.code), created_at in [since, until),
        `text` (the task id, the dedupe key, or a substring of the params'
        JSON, case-insensitive); `before` is a task id cursor."""
        raise NotImplementedError

    def tasks_by_ids(self, task_ids):
        """{task_id: task} of those ids that are tasks, any user's."""
        raise NotImplementedError

    def retried(self, task_ids):
        """The subset of `task_ids` that some task retries (retry_of)."""
        raise NotImplementedError

    def admin_users(self):
        """Every user, by name, as the user dict plus "reserved" (credits
        held by unfinished tasks) and "active" (queued and running tasks)."""
        raise NotImplementedError

    def webhook_counts(self, *, since):
        """{"pending", "failing" (pending after at least one failed try),
        "failed" (given up since `since`)} webhook deliveries."""
        raise NotImplementedError

    # -- the consistency audit (recover.py --audit) ------------------------------

    def files_listed(self, *, after=None, limit=1000):
        """[(task_id, files, expired)] of succeeded and partial tasks that list
        result files, in id order after task id `after` (page by the last
        id); `expired` is True once retention deleted the files."""
        raise NotImplementedError

    def files_of(self, task_ids):
        """{task_id: (status, files, expired)} for those of `task_ids` that
        are tasks in the store, whatever their status: who a folder in the
        file store belongs to, and which of its copies the task lists.
        `expired` is True once retention deleted the task's files."""
        raise NotImplementedError

    def settlement_mismatches(self):
        """Ledger settlements that contradict their task's status: charges
        on failed or cancelled tasks, refunds on succeeded or partial ones.
        [dicts: task_id, user_id, status, kind, amount], by task id."""
        raise NotImplementedError

    def slot_line_drift(self):
        """[(provider, user id)] whose row in the slot line's summary
        (store/slot_line.py) disagrees with their waiting tasks, read in one
        snapshot: what its triggers should have kept and did not (a hand
        edit, a restore that skipped them). Sorted."""
        raise NotImplementedError

    def rebuild_slot_line(self, keys):
        """Count the slot line's rows of `keys` ((provider, user id)) again
        from the tasks (a row with nothing waiting goes); returns how many
        keys it counted."""
        raise NotImplementedError

    def existing_task_ids(self, task_ids):
        """The subset of `task_ids` that are tasks in the store."""
        raise NotImplementedError

    # webhooks out
    #
    # Every change of a task that a receiver asked for (`created`, `running`:
    # a change into running, `progress`: a running task's step or progress,
    # `finished`: a terminal status) writes one delivery row per receiver in
    # the transaction of the change: the task's own URL (submit's `webhook`)
    # and each of the user's enabled default endpoints. A delivery is a dict:
    # id (its `webhook-id`), user_id, task_id, endpoint_id (None: the task's
    # URL), url, target (scheme://host:port), type (`task.<event>`), payload
    # (the body, fixed when written), state (pending, succeeded, failed,
    # cancelled), attempts, tries (of this round), last_status, last_error,
    # log ([{at, status, error, took_ms}], the latest 20), next_try_at and
    # the lease (lease_owner, lease_expires_at, lease_token). A `progress`
    # delivery not tried yet takes the newer state instead of a new row; a
    # new one is due no sooner than a second after the last one was written.

    def add_webhook_endpoint(self, user_id, url, events=None, *, now):
        """A default endpoint (events default ["finished"]) and its first
        secret: (endpoint dict, secret). The secret is shown only here.
        Conflict (too_many_endpoints) past MAX_ENDPOINTS per user."""
        raise NotImplementedError

    def webhook_endpoints(self, user_id):
        """The user's endpoints: [{id, user_id, url, events, created_at,
        disabled_at, disabled_reason}], oldest first."""
        raise NotImplementedError

    def webhook_endpoint(self, user_id, endpoint_id):
        """One of the user's endpoints; NotFound otherwise."""
        raise NotImplementedError

    def remove_webhook_endpoint(self, user_id, endpoint_id, *, now):
        """Remove an endpoint and its secrets; its pending deliveries are
        cancelled. NotFound if it is not the user's."""
        raise NotImplementedError

    def set_webhook_endpoint_enabled(self, user_id, endpoint_id, enabled, *, now, reason=None):
        """Enable or disable an endpoint (disabling cancels its pending
        deliveries); the endpoint. NotFound if it is not the user's."""
        raise NotImplementedError

    def rotate_webhook_secret(self, user_id, endpoint_id=None, *, now, overlap_s):
        """A new secret for the endpoint (None: the user's task secret); the
        live ones keep signing until `now + overlap_s`. Returns the secret."""
        raise NotImplementedError

    def webhook_secrets(self, user_id, endpoint_id=None, *, now):
        """The live secrets [{secret, expires_at}], oldest first."""
        raise NotImplementedError

    def task_webhook_secrets(self, user_id, *, now):
        """The live secrets of the user's tasks' own URLs, one made if none."""
        raise NotImplementedError

    def task_webhook(self, task_id):
        """The task's own {"url", "events", "disabled_at"}, or None."""
        raise NotImplementedError

    def claim_deliveries(self, owner, *, now, limit, lease_s, per_target, busy=None):
        """Lease up to `limit` pending deliveries due at `now` (oldest due
        first), at most `per_target` per receiver counting `busy` ({target:
        deliveries this process has in flight}). Each comes with `secrets`,
        the live secrets that sign it; attempts and tries are counted at the
        claim. A delivery is held by one owner at a time, across processes;
        once its lease runs out another may take it (a crash mid-send sends
        it again, under the same id)."""
        raise NotImplementedError

    def finish_delivery(self, delivery_id, *, token, now, outcome, status=None, error=None,
                        next_try_at=None, took_s=None):
        """Record an attempt: outcome succeeded, retry (pending again at
        next_try_at), failed (given up) or gone (410: the endpoint, or the
        task's URL, is disabled and its pending deliveries cancelled).
        False, changing nothing, when `token` is no longer the lease's."""
        raise NotImplementedError

    def deliveries(self, user_id, task_id=None, *, limit=200):
        """The user's newest `limit` deliveries (of one task), oldest first."""
        raise NotImplementedError

    def get_delivery(self, user_id, delivery_id):
        """One of the user's deliveries; NotFound otherwise."""
        raise NotImplementedError

    def retry_delivery(self, user_id, delivery_id, *, now):
        """Send a delivery again now, in a new round of tries. NotFound if it
        is not the user's; Conflict while it is being sent
        (delivery_in_flight) or its endpoint is disabled (endpoint_disabled)."""
        raise NotImplementedError
