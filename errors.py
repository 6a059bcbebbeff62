"""holdfast's one exception root.

Exceptions that reach HTTP carry their status and code; api/web.py's error hook
turns them into `{"error": {"code", "message"}}`. Foreign exceptions (peewee,
requests, json) are translated at their seam and never travel further.
"""


class HoldfastError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message, *, code=None, status=None, headers=None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        if status:
            self.status = status
        self.headers = headers or {}


class ConfigError(HoldfastError):
    code = "config"


class InvalidInput(HoldfastError):
    status = 400
    code = "invalid_input"


class Unauthorized(HoldfastError):
    status = 401
    code = "unauthorized"


class PaymentRequired(HoldfastError):
    status = 402
    code = "insufficient_credits"


class Forbidden(HoldfastError):
    status = 403
    code = "forbidden"


class NotFound(HoldfastError):
    status = 404
    code = "not_found"


class Conflict(HoldfastError):
    status = 409
    code = "conflict"


class StaleLease(Conflict):
    """A write carried a lease token older than the task's: someone else owns it now."""

    code = "stale_lease"


class TooLarge(HoldfastError):
    status = 413
    code = "too_large"


class TooMany(HoldfastError):
    status = 429
    code = "rate_limited"

    def __init__(self, message, *, retry_after=1, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = max(1, int(retry_after + 0.999))
        self.headers.setdefault("Retry-After", str(self.retry_after))


class StoreUnavailable(HoldfastError):
    status = 503
    code = "store_unavailable"


class ProviderUnavailable(HoldfastError):
    """Transient: the provider could not be reached or asked us to wait. Retry."""

    status = 503
    code = "provider_unavailable"

    def __init__(self, message, *, retry_after=None, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class InDoubt(ProviderUnavailable):
    """Transient, but the request may have had its effect: it was sent and
    no answer came back that says it was refused (a read timeout, a reset
    after sending, a 500/502/504, an answer that cannot be read). Retrying a
    read is fine; repeating a submit could make a second job."""

    code = "submission_in_doubt"


class ProviderRejected(HoldfastError):
    """Permanent: the provider refused or failed the job. Do not retry."""

    status = 400
    code = "provider_rejected"


class ResultExpired(ProviderRejected):
    code = "result_expired"


class InvalidResult(ProviderRejected):
    """What a provider answered or linked breaks one of holdfast's rules (an
    address it may not reach, a redirect loop, a size or nesting limit):
    asking again cannot help, so the task ends at once with invalid_result."""

    code = "invalid_result"
