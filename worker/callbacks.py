"""What a provider's callback changes in a task's life: the token its
submit carries, and a submit in doubt that waits for a callback to name its
job (api/callbacks.py receives them; the store carries the word over).

Without a callback a KIE submit in doubt fails `submission_in_doubt` at
once. With callbacks on, the task waits `callback_grace_s` from the POST
for one: a callback that names a job (ADOPTED in the task's state) is
checked by asking the provider about that id, and a job it knows is
followed like any other; no second submit is ever sent meanwhile. The
grace ends as it would have begun: the task fails, refunded.
"""

import logging

from errors import ProviderUnavailable
from providers.callbacks import ADOPTED, CALLBACK_HASH, callback_url, new_token
from store import POSTED_AT

log = logging.getLogger("holdfast.worker")


class Callbacks:
    """Methods of Worker (which sets `public_url`), beside Steps."""

    public_url = None

    def _callback_for(self, task, provider, state):
        """(state with the new token's hash, callback URL) for a submit about
        to be sent; (state, None) when callbacks are off. Each submit gets a
        token of its own: a late callback about an earlier job matches none."""
        if not (self.public_url and provider.callbacks):
            return state, None
        token, digest = new_token(task["id"])
        state = {k: v for k, v in state.items() if k != ADOPTED}
        return {**state, CALLBACK_HASH: digest}, callback_url(self.public_url, provider.name, token)

    def _awaits_callback(self, task, provider):
        """A submit in doubt whose request carried a callback URL: the
        provider may yet say which job it made."""
        return provider.callbacks and CALLBACK_HASH in (task["state"] or {})

    def _await_callback(self, task, provider, now, reason):
        """Follow the job a callback named, wait for one until the grace
        period ends, or give up without a second job."""
        state = task["state"]
        if state.get(ADOPTED) is not None:
            return self._adopt(task, provider, now, state[ADOPTED])
        until = state[POSTED_AT] + provider.callback_grace_s
        if now >= until:
            return self._no_second_job(task, provider, now, f"{reason}; no callback from {provider.name} "
                                       f"named its job within {provider.callback_grace_s:g}s")
        log.info("task %s: %s; waiting %.0fs for %s's callback to name the job", task["id"], reason,
                 until - now, provider.name)
        self.store.reschedule(task["id"], token=task["lease_token"], next_poll_at=until, polls=task["polls"],
                              state=state)

    def _adopt(self, task, provider, now, job):
        """A callback named `job` for this submit in doubt: follow it once
        the provider itself says it has it (its body is not trusted)."""
        state = {k: v for k, v in task["state"].items() if k != ADOPTED}
        probe = dict(task, external_id=job, state=state)
        try:
            status = self._ask(probe, provider, now)
        except ProviderUnavailable as exc:
            return self._later(task, now, f"asking about job {job}, named by a callback: {exc}",
                               retry_after=exc.retry_after)
        if status.state == "unknown":
            log.warning("task %s: a callback named job %s, which %s does not know", task["id"], job, provider.name)
            return self._await_callback(dict(task, state=state), provider, now, "its submit was in doubt")
        log.info("task %s: adopting job %s, named by %s's callback", task["id"], job, provider.name)
        self._found(probe, provider, status, now, external_id=job)
