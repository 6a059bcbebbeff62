"""Provider callbacks: the per-task token a provider's callback URL carries,
and where the task keeps what a callback needs.

A token is `<task id>.<random>`: the id lets the route find the task, the
random part (32 bytes from `secrets`) is what makes it unguessable. The task
keeps only its SHA-256 (in its `state`, under CALLBACK_HASH), so a copy of
the database is no key to anyone's callback URL. A new submit gets a new
token, so a callback about an earlier attempt's job matches nothing.

A callback is a hint, never a result: the worker asks the provider itself.
"""

import hashlib
import hmac
import re
import secrets
from urllib.parse import quote

CALLBACK_HASH = "callback_hash"   # state: SHA-256 (hex) of the task's current token
ADOPTED = "adopted_job"           # state: the job a callback named for a submit in doubt
_TOKEN = re.compile(r"^(t_[A-Za-z0-9]{1,64})\.([A-Za-z0-9_-]{32,128})$")


def new_token(task_id):
    """(token, its hash): the token goes into the callback URL, the hash
    into the task's state."""
    token = f"{task_id}.{secrets.token_urlsafe(32)}"
    return token, token_hash(token)


def token_hash(token):
    return hashlib.sha256(token.encode()).hexdigest()


def task_of(token):
    """The task id a well-formed token names, or None."""
    m = _TOKEN.match(token or "")
    return m.group(1) if m else None


def token_matches(stored_hash, token):
    """Whether `token` is the one whose hash the task keeps, compared in
    constant time."""
    if not isinstance(stored_hash, str):
        return False
    return hmac.compare_digest(stored_hash.encode(), token_hash(token).encode())


def callback_url(public_url, provider, token):
    """`{public}/api/callbacks/{provider}/{token}`."""
    return f"{public_url.rstrip('/')}/api/callbacks/{quote(provider, safe='')}/{token}"
