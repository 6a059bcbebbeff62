"""What providers push, as hints to the worker: ComfyUI's socket reports a
job's progress, which goes into its task, and says when a job ended, which
makes that task's poll due at once. The provider's own answers, polled as
always, still decide how a task ends; a hint that is lost only means the
poll comes at its usual time.

These writes come from the providers' threads, outside any lease: the store
takes them only for a task that is still running (note_progress) or has
not ended (poll_now), whoever holds it.
"""

import logging

from errors import HoldfastError

log = logging.getLogger("holdfast.worker")


class Hints:
    """Starts and stops the providers that push (provider.listen), and
    turns what they say into store writes and wake-ups."""

    def __init__(self, store, providers, *, wake, clock):
        self.store = store
        self.providers = providers
        self.wake = wake
        self.clock = clock
        self._listening = []

    def start(self):
        for provider in self.providers.values():
            if provider.listen(self.progress, self.done):
                self._listening.append(provider)

    def stop(self):
        listening, self._listening = self._listening, []
        for provider in listening:
            try:
                provider.unlisten()
            except Exception:
                log.exception("%s: could not stop listening", provider.name)

    def progress(self, task_id, step, progress):
        try:
            self.store.note_progress(task_id, step=step, progress=progress, now=self.clock())
        except HoldfastError as exc:
            log.debug("task %s: progress not noted: %s", task_id, exc)

    def done(self, task_id):
        try:
            due = self.store.poll_now(task_id, now=self.clock())
        except HoldfastError as exc:
            log.debug("task %s: not polled at once: %s", task_id, exc)
            return
        if due:
            self.wake()
