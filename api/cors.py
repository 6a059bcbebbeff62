"""Calls from the user's own frontend on another origin (HOLDFAST_CORS_ORIGINS).

A browser lets a page on https://app.example.com read holdfast's answers only
when holdfast names that origin in Access-Control-Allow-Origin, and sends a
request with an Authorization or Idempotency-Key header only after a
preflight OPTIONS that holdfast approves. With no origins configured nothing
here runs and the API serves its own origin alone, as before.

Only /api/ is opened, and no cookies are involved (every call carries its
bearer token, the event stream its ?token=), so Allow-Credentials is never
sent and an origin listed here gains nothing a stolen token would not give.
An origin not listed gets answers without these headers: the browser keeps
them from the page.
"""

ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE"
ALLOW_HEADERS = "Authorization, Content-Type, Idempotency-Key, Last-Event-ID"
# Headers a cross-origin page may read: a 429's wait, a file's type, size and name.
EXPOSE_HEADERS = "Retry-After, Content-Length, Content-Disposition, Location"
PREFLIGHT_MAX_AGE_S = 600


def with_cors(wsgi, origins):
    """`wsgi` answering the `origins` (a set of "scheme://host[:port]", or
    {"*"} for any) across origins on /api/; `wsgi` itself when there are none."""
    if not origins:
        return wsgi
    any_origin = "*" in origins

    def app(environ, start_response):
        origin = environ.get("HTTP_ORIGIN")
        if (not origin or not environ.get("PATH_INFO", "").startswith("/api/")
                or not (any_origin or origin in origins)):
            return wsgi(environ, start_response)
        allow = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        if environ.get("REQUEST_METHOD") == "OPTIONS" and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ:
            start_response("204 No Content", allow + [
                ("Access-Control-Allow-Methods", ALLOW_METHODS),
                ("Access-Control-Allow-Headers", ALLOW_HEADERS),
                ("Access-Control-Max-Age", str(PREFLIGHT_MAX_AGE_S)),
                ("Content-Length", "0")])
            return [b""]

        def start(status, headers, exc_info=None):
            kept = [(k, v) for k, v in headers if k.lower() != "vary"]
            vary = ", ".join(v for k, v in headers if k.lower() == "vary")
            allow[1] = ("Vary", f"{vary}, Origin" if vary else "Origin")
            return start_response(status, kept + allow + [("Access-Control-Expose-Headers", EXPOSE_HEADERS)],
                                  exc_info)
        return wsgi(environ, start)
    return app
