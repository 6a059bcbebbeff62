"""The `http` provider type: any jobs API shaped like submit -> id -> status
-> result URLs, described in holdfast.toml instead of code.

    [providers.NAME]            type = "http", url, api_key_env (sent as
                                `Authorization: <auth_scheme> <key>`),
                                headers (plain), headers_env (header ->
                                variable), code_path / ok_codes /
                                message_path / refused_codes (APIs that put
                                errors in the body), unknown_codes
    [providers.NAME.submit]     method, path, body (a template), id_path
    [providers.NAME.status]     method, path, state_path, states, result_urls,
                                error_path, step_path, progress_path
    [providers.NAME.cancel]     method, path, body (optional table)

Templates: `{id}` (the job id) and `{params.a.b}` (the task's params). A
string that is one placeholder alone takes the value whole (an object stays
an object); elsewhere the value is put in as text (in a path, URL-quoted).
JSON paths are dotted (`data.taskId`), with list indices (`images[0]`) and
`[*]` for every item; a path that goes on into a string holding JSON
(KIE's resultJson) reads that JSON.

Failures read as the seam says (http.py): 408/429/503 and `refused_codes`
refuse, other 5xx are in doubt. The id is chosen by the provider, so an
in-doubt submit fails the task `submission_in_doubt` unless
`on_doubt = "resubmit"`. The whole table is checked when it is loaded.
"""

import json
import os
import re
from urllib.parse import quote

from errors import ConfigError, InDoubt, InvalidInput, InvalidResult, ProviderRejected, ProviderUnavailable

from .base import Status
from .http import HttpProvider
from .net import parse_json
from .results import outputs_from

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
STATES = ("queued", "running", "succeeded", "failed")
_PLACEHOLDER = re.compile(r"\{(id|params(?:\.[A-Za-z0-9_-]+)+)\}")
_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+|\*)\]")
_PATH = re.compile(r"^[^.\[\]]+(\[(\d+|\*)\])*(\.[^.\[\]]+(\[(\d+|\*)\])*)*$")
_SECRET_HEADER = re.compile(r"authorization|key|token|secret|password|cookie", re.I)
MAX_STEP = 200

SECTIONS = {
    "submit": {"required": ("path", "id_path"), "optional": {"method": "POST", "body": None}},
    "status": {"required": ("path", "state_path", "states", "result_urls"),
               "optional": {"method": "GET", "error_path": None, "step_path": None, "progress_path": None}},
    "cancel": {"required": ("path",), "optional": {"method": "POST", "body": None}},
}


class DeclarativeProvider(HttpProvider):
    type = "http"
    defaults = {**HttpProvider.defaults, "auth_scheme": "Bearer", "headers": None, "headers_env": None,
                "code_path": None, "ok_codes": [200], "message_path": None, "refused_codes": [408, 429, 503],
                "unknown_codes": [404], "submit": None, "status": None, "cancel": None}
    required = ("url", "submit", "status")

    def __init__(self, name, config=None, env=None):
        super().__init__(name, config, env)
        env = os.environ if env is None else env
        self._where = f"provider {name}"
        self.sections = {key: self._section(key) for key in SECTIONS if self.config[key] is not None}
        self._headers = self._check_headers(env)
        for key in ("ok_codes", "refused_codes", "unknown_codes"):
            codes = self.config[key]
            if not isinstance(codes, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
                raise ConfigError(f"{self._where}: {key} must be a list of integers")
        for key in ("code_path", "message_path"):
            self._paths(key, self.config[key])
        if not isinstance(self.config["auth_scheme"], str):
            raise ConfigError(f"{self._where}: auth_scheme must be text ('Bearer', 'Key', or '' for the bare key)")
        self.auth_scheme = self.config["auth_scheme"]

    # -- checking the table -----------------------------------------------------

    def _section(self, key):
        table, rules = self.config[key], SECTIONS[key]
        where = f"{self._where}: [{key}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table")
        unknown = set(table) - set(rules["required"]) - set(rules["optional"])
        if unknown:
            raise ConfigError(f"{where}: unknown setting {sorted(unknown)[0]!r}; known: "
                              f"{', '.join(sorted((*rules['required'], *rules['optional'])))}")
        missing = [k for k in rules["required"] if table.get(k) in (None, "")]
        if missing:
            raise ConfigError(f"{where} needs {', '.join(missing)}")
        section = {**rules["optional"], **table}
        if section["method"] not in METHODS:
            raise ConfigError(f"{where}: method must be one of {', '.join(METHODS)}, not {section['method']!r}")
        if not isinstance(section["path"], str) or not (section["path"].startswith("/") or
                                                        section["path"].startswith(("http://", "https://"))):
            raise ConfigError(f"{where}: path must start with / (it follows url)")
        self._template(where, section["path"], job=key != "submit")
        if section.get("body") is not None:
            self._template(where, section["body"], job=key != "submit")
        if key != "submit" and "{id}" not in json.dumps([section["path"], section.get("body")]):
            raise ConfigError(f"{where}: the path or body must name the job with {{id}}")
        for name in ("id_path", "state_path", "result_urls", "error_path", "step_path", "progress_path"):
            if name in section:
                self._paths(f"[{key}] {name}", section[name])
        if key == "status":
            states = section["states"]
            if not isinstance(states, dict) or not states:
                raise ConfigError(f"{where}: states must be a table from the provider's states to "
                                  f"holdfast's ({', '.join(STATES)})")
            for theirs, ours in states.items():
                if ours not in STATES:
                    raise ConfigError(f"{where}: states.{theirs} = {ours!r}: use one of {', '.join(STATES)}")
            if "succeeded" not in states.values():
                raise ConfigError(f"{where}: states must say which of the provider's states is \"succeeded\"")
        return section

    def _template(self, where, value, job):
        for text in _strings(value):
            for match in _PLACEHOLDER.finditer(text):
                if match.group(1) == "id" and not job:
                    raise ConfigError(f"{where}: {{id}} is not known before the submit")
            rest = _PLACEHOLDER.sub("", text)
            if "{" in rest or "}" in rest:
                raise ConfigError(f"{where}: {text!r}: placeholders are {{id}} and {{params.NAME}}")

    def _paths(self, what, value):
        if value is None:
            return
        for path in value if isinstance(value, list) else [value]:
            if not isinstance(path, str) or not _PATH.match(path):
                raise ConfigError(f"{self._where}: {what}: {path!r} is not a JSON path like data.items[0].url")

    def _check_headers(self, env):
        headers = {}
        plain = self.config["headers"] or {}
        if not isinstance(plain, dict) or not all(isinstance(v, str) for v in plain.values()):
            raise ConfigError(f"{self._where}: headers must be a table of text values")
        for header in plain:
            if _SECRET_HEADER.search(header):
                raise ConfigError(f"{self._where}: headers.{header} looks like a secret; secrets come from the "
                                  f"environment: put it in headers_env (header = \"VARIABLE\")")
        headers.update(plain)
        secret = self.config["headers_env"] or {}
        if not isinstance(secret, dict):
            raise ConfigError(f"{self._where}: headers_env must be a table (header = \"VARIABLE\")")
        for header, var in secret.items():
            if not isinstance(var, str) or not var:
                raise ConfigError(f"{self._where}: headers_env.{header} must name an environment variable")
            if not env.get(var):
                raise ConfigError(f"{self._where}: the environment variable {var} (headers_env.{header}) is not set")
            headers[header] = env[var]
        return headers

    def auth_headers(self):
        headers = dict(self._headers)
        if self._api_key:
            headers["Authorization"] = f"{self.auth_scheme} {self._api_key}".strip()
        return headers

    # -- the calls --------------------------------------------------------------

    def validate(self, params):
        super().validate(params)
        for key in ("submit", "cancel"):
            section = self.sections.get(key)
            if section is not None:
                _render(section["path"], params, "", quoted=True)
                _render(section["body"], params, "")

    def submit(self, task, now):
        section = self.sections["submit"]
        body = self._answer(self._send(section, task, "submit"), "submit", doubt=True)
        found = _get(body, section["id_path"])
        job_id = found[0] if found else None
        if job_id is None or job_id == "":
            # A success without the one thing it must say: the job may exist.
            raise InDoubt(f"{self.name}: submit answered without an id at {section['id_path']}")
        if isinstance(job_id, bool) or not isinstance(job_id, (str, int)):
            raise ProviderRejected(f"{self.name}: submit answered an id that is not text: {str(job_id)[:100]!r}",
                                   code="invalid_result")
        return str(job_id)

    def poll(self, task, now):
        section = self.sections["status"]
        body = self._answer(self._send(section, task, "status"), "status", unknown_ok=True)
        if body is _UNKNOWN:
            return Status.unknown()
        found = _get(body, section["state_path"])
        if not found or isinstance(found[0], (dict, list)) or found[0] is None:
            # No word on the job (KIE's `"data": null`): ask again, never take
            # it for a lost job and pay for a second one.
            raise ProviderUnavailable(f"{self.name}: status: no state at {section['state_path']}")
        state = str(found[0])
        ours = section["states"].get(state)
        step = _first_text(body, section["step_path"]) or state[:60]
        if ours == "queued":
            return Status.queued(step)
        if ours == "succeeded":
            return self._success(body, section)
        if ours == "failed":
            return Status.failed((_first_text(body, section["error_path"]) or
                                  f"{self.name} failed the job (state {state})")[:2000])
        progress = _progress(_get(body, section["progress_path"]) if section["progress_path"] else None)
        return Status.running(step, progress)

    def _success(self, body, section):
        values = []
        for path in _as_list(section["result_urls"]):
            values.extend(_get(body, path))
        outputs = outputs_from(values, max_file_bytes=self.max_file_bytes, max_outputs=self.max_outputs,
                               what=f"{self.name} result", whole=False)
        if not outputs:
            return Status.failed(f"{self.name} said the job succeeded but gave no result links at "
                                 f"{', '.join(_as_list(section['result_urls']))}", code="invalid_result")
        return Status.succeeded(outputs)

    def cancel(self, task):
        section = self.sections.get("cancel")
        if section is not None and task.get("external_id"):
            self._send(section, task, "cancel")

    def _send(self, section, task, what):
        params = task.get("params") or {}
        job_id = task.get("external_id") or ""
        path = _render(section["path"], params, job_id, quoted=True)
        body = _render(section["body"], params, job_id) if section.get("body") is not None else None
        return self.call(section["method"], path, what=what, json=body)

    def _answer(self, resp, what, doubt=False, unknown_ok=False):
        """The answer's JSON, once it says the request did what was asked;
        _UNKNOWN for a job the provider does not know (when `unknown_ok`)."""
        if resp.status_code in (401, 403):
            raise ProviderRejected(f"{self.name} refused the credentials ({what}: HTTP {resp.status_code})")
        if unknown_ok and resp.status_code in self.unknown_codes:
            return _UNKNOWN
        try:
            body = parse_json(resp.content, f"{self.name}: {what}") if resp.content else None
        except ValueError:
            if resp.status_code < 400:
                raise (InDoubt if doubt else ProviderUnavailable)(
                    f"{self.name}: {what}: the answer is not JSON") from None
            body = None
        message = _first_text(body, self.message_path)
        code = _get(body, self.code_path) if self.code_path else []
        code = code[0] if code else None
        digits = code.strip().lstrip("-") if isinstance(code, str) else ""
        if digits.isascii() and digits.isdigit():
            code = int(code)        # "200" and 200 say the same (and "²" is no number)
        if resp.status_code >= 400:
            if not unknown_ok:
                raise ProviderRejected(f"{self.name} refused {what}: "
                                       f"{message or f'HTTP {resp.status_code}'}")
            raise ProviderUnavailable(f"{self.name}: {what}: HTTP {resp.status_code} {message or ''}".strip())
        if code is not None and code not in self.ok_codes:
            if unknown_ok and code in self.unknown_codes:
                return _UNKNOWN
            text = f"{what}: {message or 'no message'} (code {code})"
            if code in self.refused_codes:
                raise self._down(text)
            if isinstance(code, int) and code >= 500:
                raise self._down(text, doubt=doubt)
            if unknown_ok:
                raise ProviderUnavailable(f"{self.name}: {text}")
            raise ProviderRejected(f"{self.name} refused {text}")
        return body


_UNKNOWN = object()


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _lookup(name, params, job_id):
    if name == "id":
        return job_id
    value = params
    for key in name.split(".")[1:]:
        if not isinstance(value, dict) or key not in value:
            raise InvalidInput(f"params.{name[len('params.'):]} is needed by this provider's request template")
        value = value[key]
    return value


def _render(template, params, job_id, quoted=False):
    """The template with its placeholders filled (see the module's docstring)."""
    if isinstance(template, dict):
        return {k: _render(v, params, job_id, quoted) for k, v in template.items()}
    if isinstance(template, list):
        return [_render(v, params, job_id, quoted) for v in template]
    if not isinstance(template, str):
        return template
    whole = _PLACEHOLDER.fullmatch(template)
    if whole and not quoted:
        return _lookup(whole.group(1), params, job_id)

    def text(match):
        value = _lookup(match.group(1), params, job_id)
        value = value if isinstance(value, str) else json.dumps(value)
        return quote(value, safe="/" if match.group(1) != "id" else "") if quoted else value
    return _PLACEHOLDER.sub(text, template)


def _get(value, path):
    """Every value at `path` in `value` (a list, empty when there is none)."""
    if path is None:
        return []
    current = [value]
    for key, index in _SEGMENT.findall(path):
        nxt = []
        for item in current:
            if isinstance(item, str) and item[:1] in ("{", "["):
                try:
                    item = parse_json(item, "a JSON string in the answer")
                except (ValueError, InvalidResult):
                    continue
            if "*" in (key, index):
                nxt.extend(item if isinstance(item, list) else item.values() if isinstance(item, dict) else ())
            elif key and isinstance(item, dict) and key in item:
                nxt.append(item[key])
            elif key.isascii() and key.isdigit() and isinstance(item, list) and int(key) < len(item):
                nxt.append(item[int(key)])
            elif index and index != "*" and isinstance(item, list) and int(index) < len(item):
                nxt.append(item[int(index)])
        current = nxt
    return [v for v in current if v is not None]


def _first_text(body, paths):
    for path in _as_list(paths):
        for value in _get(body, path):
            if value not in ("", [], {}):
                return (value if isinstance(value, str) else json.dumps(value))[:2000]
    return None


def _as_list(value):
    return [] if value is None else value if isinstance(value, list) else [value]


def _progress(found):
    try:
        value = float(found[0])
    except (TypeError, ValueError, IndexError):
        return None
    if value > 1:
        value /= 100
    return round(min(1.0, max(0.0, value)), 3)
