"""The HTTP seam that the route modules share: the one error hook, a
request's JSON read and checked once, waitress's own errors as JSON, and the
small checks of fields and query strings.
"""

import json
import logging
import math
import re

import bottle

from errors import HoldfastError, InvalidInput, TooLarge
from store import check_json, may_nest_too_deep, too_deep

log = logging.getLogger("holdfast.app")
_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")


def error_body(status, code, message):
    bottle.response.status = status
    bottle.response.content_type = "application/json"
    return json.dumps({"error": {"code": code, "message": message}})


def json_errors(callback):
    """One error hook: holdfast's errors become their JSON; anything else a
    plain 500 without a stack trace. On the way in it refuses headers that
    are not UTF-8; on the way out it writes a route's dict as strict JSON."""
    def wrapper(*args, **kwargs):
        try:
            check_headers(bottle.request.environ)
            result = callback(*args, **kwargs)
            if isinstance(result, dict):
                bottle.response.content_type = "application/json"
                return strict_json(result)
            return result
        except bottle.HTTPResponse:
            raise
        except HoldfastError as exc:
            for name, value in exc.headers.items():
                bottle.response.set_header(name, value)
            return error_body(exc.status, exc.code, exc.message)
        except Exception:
            log.exception("unhandled error in %s %s", bottle.request.method, bottle.request.path)
            return error_body(500, "internal", "internal error")
    return wrapper


def check_headers(environ):
    """InvalidInput (invalid_header) for a request header that is not UTF-8.
    A WSGI server hands headers over as latin-1; bottle decodes them as
    UTF-8 when a route reads one and would raise UnicodeDecodeError there,
    so every header is checked once, here, whichever a route reads."""
    for key, value in environ.items():
        # Most values are ASCII: that test first, the key's only then.
        if not isinstance(value, str) or value.isascii():
            continue
        if key.startswith("HTTP_") or key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            try:
                value.encode("latin-1").decode("utf-8")
            except UnicodeError:
                name = key[5:] if key.startswith("HTTP_") else key
                raise InvalidInput(f"the {name.replace('_', '-').title()} header is not valid UTF-8",
                                   code="invalid_header") from None


def strict_json(value):
    """`value` as JSON that any parser reads. A number that is not finite
    can only be one stored before bodies were checked for them: it goes out
    as null, with a warning, rather than as `Infinity`, which is not JSON."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        log.warning("%s %s: a number that is not finite was sent as null",
                    bottle.request.method, bottle.request.path)
        return json.dumps(_finite(value), allow_nan=False)


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def read_json(max_body):
    """The request's JSON object, within `max_body` bytes."""
    environ = bottle.request.environ
    length = environ.get("CONTENT_LENGTH") or ""
    if length:
        try:
            length = int(length)
        except ValueError:
            raise InvalidInput("bad Content-Length") from None
        if length > max_body:
            raise TooLarge(f"request body is larger than {max_body} bytes")
        raw = environ["wsgi.input"].read(length) if length else b""
    else:
        raw = environ["wsgi.input"].read(max_body + 1)
        if len(raw) > max_body:
            raise TooLarge(f"request body is larger than {max_body} bytes")
    if not raw.strip():
        raise InvalidInput("request body must be a JSON object", code="invalid_json")
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_number)
    except ValueError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        # Far past MAX_JSON_DEPTH (where exactly depends on the caller's stack):
        # the same answer as a body just past it.
        raise too_deep("the request body") from None
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object", code="invalid_json")
    # json.loads takes 1e999 (as inf: _finite_number refuses it as it is
    # read) and nesting up to its recursion limit: both would be stored,
    # then break whoever encodes or parses them next.
    if may_nest_too_deep(raw):
        check_json(body, "the request body")
    # A NUL or an unpaired surrogate reaches a string of UTF-8 JSON only as
    # a \u escape, or (a surrogate) as the bytes ED A0-BF that json.loads
    # lets through: a body with neither is not walked for them.
    if b"\\u" in raw or b"\xed" in raw or json.detect_encoding(raw) != "utf-8":
        _check_strings(body)
    return body


def _finite_number(text):
    """A JSON number with a fraction or an exponent, refused when it is
    past what a float holds (1e999 would be inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise InvalidInput(f"the request body holds a number that is not finite ({text[:40]}): "
                           "numbers must be finite, within about 1e308", code="invalid_json")
    return value


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


# json.loads lets both through (as \u escapes; surrogates as raw bytes too).
# An unpaired surrogate is not Unicode: no UTF-8 encoder (SQLite's,
# psycopg's) takes it. NUL is, but PostgreSQL's text refuses it wherever a
# string is stored as itself; one rule for every field and backend is
# simpler than knowing which ones are escaped on the way.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _check_strings(body):
    """InvalidInput for any string, key or value at any depth, holding a NUL
    or an unpaired surrogate."""
    stack = [body]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            found = _UNSTORABLE.search(value)
            if found is None:
                continue
            if found.group() == "\x00":
                raise InvalidInput("strings in the request body must not contain NUL (\\u0000)")
            raise InvalidInput(f"a string in the request body holds an unpaired surrogate "
                               f"(\\u{ord(found.group()):04x}), which is not valid Unicode", code="invalid_json")


# What waitress refuses before the app sees the request, by status.
_WAITRESS_CODES = {400: "bad_request", 413: "too_large", 431: "headers_too_large", 501: "not_implemented"}


def json_error_channel(max_body):
    """A waitress channel class whose own error answers (a body past
    max_request_body_size, a malformed request) are holdfast's JSON errors,
    not waitress's text/plain page."""
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask

    class JsonErrorTask(ErrorTask):
        def execute(self):
            error = self.request.error
            code = _WAITRESS_CODES.get(error.code, "internal")
            if error.code == 413:
                message = f"request body is larger than {max_body} bytes"
            elif error.code < 500:
                message = f"{error.reason}: {error.body}"
            else:
                message = "internal error"
            body = json.dumps({"error": {"code": code, "message": message}}).encode()
            self.status = f"{error.code} {error.reason}"
            self.response_headers.append(("Content-Type", "application/json"))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class JsonErrorChannel(HTTPChannel):
        error_task_class = JsonErrorTask

    return JsonErrorChannel


def optional_key(value, what):
    if value is None:
        return None
    if not isinstance(value, str) or not _KEY.match(value):
        raise InvalidInput(f"{what} must be 1-200 printable ASCII characters without spaces")
    return value


def only_fields(body, allowed):
    unknown = set(body) - set(allowed)
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(sorted(unknown))}")


def query_number(name, default, low, high, kind=float):
    raw = bottle.request.query.get(name)
    if raw in (None, ""):
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise InvalidInput(f"{name} must be a number from {low} to {high}") from None
    if not low <= value <= high:     # NaN fails this too
        raise InvalidInput(f"{name} must be a number from {low} to {high}")
    return value
