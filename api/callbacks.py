"""POST /api/callbacks/{provider}/{token}: a provider says a job changed.

No bearer token: the caller is the provider. What lets it in is the
per-task token of its URL (providers/callbacks.py; only its hash is
stored) and, where the provider's table names a key, the provider's own
signature. A callback is a hint, answered at once: the body is read for
the job's id and nothing else, and the worker asks the provider itself.

- A running task whose job it names: its next poll is due now.
- A task whose submit is in doubt (sent, its answer lost): the job it
  names is recorded in the task's state for the worker to check and
  adopt (worker/callbacks.py), instead of the task failing.
- Anything else (an unknown provider or task, a token that is not the
  task's current one, a task that ended, another job): 404, and nothing
  changes. A bad signature: 401.
"""

import logging

import bottle

from errors import HoldfastError, NotFound
from providers.callbacks import ADOPTED, CALLBACK_HASH, task_of, token_matches
from store import POSTED_AT, TERMINAL, lease_owner_id

from .web import read_json

log = logging.getLogger("holdfast.app")

CALLBACK_MAX_BODY = 64 * 1024     # KIE's callbacks carry a task record, not files
ADOPT_LEASE_S = 30.0              # held for one write; a crash in between frees it this soon


def callback_routes(app, store, providers, *, worker, clock):
    owner = f"{lease_owner_id()}:callbacks"

    @app.post("/api/callbacks/<provider>/<token>")
    def provider_callback(provider, token):
        now = clock()
        provider_name, provider = provider, providers.get(provider)
        task_id = task_of(token)
        if provider is None or not provider.callbacks or task_id is None:
            raise _unknown()
        job = provider.callback_job(bottle.request.headers, read_json(CALLBACK_MAX_BODY), now)
        try:
            task = store.get_task(task_id)
        except NotFound:
            raise _unknown() from None
        state = task["state"] or {}
        if (task["provider"] != provider_name or not token_matches(state.get(CALLBACK_HASH), token)
                or task["status"] in TERMINAL):
            raise _unknown()
        if task["external_id"] is None and POSTED_AT in state:
            _adopt(store, task, job, owner, now)
        elif task["external_id"] != job or not store.poll_now(task_id, now=now):
            raise _unknown()
        if worker is not None:
            worker.wake()
        return {"ok": True}


def _adopt(store, task, job, owner, now):
    """Record the job a callback named for a submit in doubt, and make the
    task due, under a lease of its own so no worker's write crosses it."""
    if (task["state"] or {}).get(ADOPTED) == job:
        store.poll_now(task["id"], now=now)     # the same callback again
        return
    held = store.claim_task(task["id"], owner, now=now, lease_s=ADOPT_LEASE_S)
    if held is None:
        # A worker holds it (its submit may still be waiting for the
        # answer): the provider sends the callback again after a 5xx.
        raise HoldfastError("the task is busy; send the callback again", status=503, code="callback_busy",
                            headers={"Retry-After": "1"})
    state = held["state"] or {}
    if held["external_id"] is not None or POSTED_AT not in state or ADOPTED in state:
        # Recorded, adopted or resubmitted meanwhile: hand it back, due now
        # only if the callback is about the job it follows.
        same = job in (held["external_id"], state.get(ADOPTED))
        store.reschedule(held["id"], token=held["lease_token"], next_poll_at=now if same else held["next_poll_at"],
                         polls=held["polls"])
        if not same:
            raise _unknown()
        return
    log.info("task %s: a callback from %s names job %s for its submit in doubt", held["id"], held["provider"], job)
    store.reschedule(held["id"], token=held["lease_token"], next_poll_at=now, polls=held["polls"],
                     state={**state, ADOPTED: job})


def _unknown():
    return NotFound("no such callback", code="callback_not_found")
