"""Result files out of a provider's JSON output, for the adapters whose
models answer free-form JSON (Replicate, fal.ai, RunPod, the declarative
`http` adapter).

Every http(s) URL in the output becomes a file to download (fal.ai's
`{"url", "file_name", "content_type"}` objects keep their name and type);
`data:` URLs and base64 text under the keys handlers commonly use
(`image`, `images`, `audio`, ...; or worker-comfyui's `{"type": "base64",
"data", "filename"}`) are decoded here, each within max_file_bytes. An
output with no file in it is kept whole as `output.json`, so a text model's
answer is not lost.
"""

import base64
import binascii
import json
import os
import re
from urllib.parse import unquote, urlsplit

from errors import InvalidResult

from .base import Output
from .net import parse_json

# Keys under which serverless handlers commonly return base64 files.
BASE64_KEYS = frozenset({"image", "images", "image_base64", "base64", "img", "audio", "video", "data",
                         "output", "message", "file"})
_BASE64 = re.compile(r"^[A-Za-z0-9+/\r\n]+={0,2}$")
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png", "png"), (b"\xff\xd8\xff", "image/jpeg", "jpg"),
          (b"GIF8", "image/gif", "gif"), (b"RIFF", "image/webp", "webp"), (b"ID3", "audio/mpeg", "mp3"),
          (b"OggS", "audio/ogg", "ogg"), (b"fLaC", "audio/flac", "flac"))
_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif", "image/webp": "webp", "audio/mpeg": "mp3",
        "audio/wav": "wav", "audio/x-wav": "wav", "video/mp4": "mp4", "application/json": "json",
        "text/plain": "txt"}


def outputs_from(value, *, max_file_bytes, max_outputs, what="output", whole=True):
    """[Output] for `value` (parsed JSON). Collects at most max_outputs + 1
    (the worker fails a task with more). InvalidResult for an embedded file
    over max_file_bytes: it can never be saved. `whole`: an output with no
    file in it becomes output.json."""
    found = []
    _walk(value, None, found, max_file_bytes, max_outputs + 1, what)
    if whole and not found and value is not None:
        found.append(Output("output.json", data=json.dumps(value).encode(), content_type="application/json"))
    return found


def url_name(url, default):
    """The last path segment of `url`, or `default`."""
    name = os.path.basename(unquote(urlsplit(url).path)) if isinstance(url, str) else ""
    return name or default


def _walk(value, key, found, limit, most, what):
    if len(found) >= most:
        return
    if isinstance(value, str):
        _text(value, key, None, found, limit, what)
    elif isinstance(value, list):
        for item in value:
            _walk(item, key, found, limit, most, what)
    elif isinstance(value, dict):
        name = value.get("file_name") or value.get("filename") or value.get("name")
        name = name if isinstance(name, str) else None
        url = value.get("url")
        if isinstance(url, str) and url.startswith(("http://", "https://", "data:")):
            ctype = value.get("content_type") if isinstance(value.get("content_type"), str) else None
            _text(url, "url", name, found, limit, what, ctype)
            return
        if value.get("type") == "base64" and isinstance(value.get("data"), str):
            _text(value["data"], "data", name, found, limit, what)
            return
        for k, item in value.items():
            _walk(item, k, found, limit, most, what)


def _text(text, key, name, found, limit, what, content_type=None):
    default = f"out_{len(found)}"
    if text.startswith(("http://", "https://")):
        found.append(Output(name or url_name(text, default), url=text, content_type=content_type))
    elif text.startswith("data:"):
        head, sep, body = text.partition(",")
        if not sep:
            return
        ctype = head[5:].split(";")[0] or None
        data = _decode(body, limit, what) if ";base64" in head else _plain(body, limit, what)
        if data is not None:
            found.append(_named(data, name, ctype, default))
    elif key in BASE64_KEYS and len(text) >= 16 and _BASE64.match(text[:4096]):
        data = _decode(text, limit, what)
        # Bare base64 counts only when it decodes to a known file type: a
        # word that happens to be valid base64 is text, not an image.
        if data is not None and (name is not None or _sniff(data)):
            found.append(_named(data, name, None, default))


def _decode(text, limit, what):
    # 4 base64 characters carry 3 bytes: refuse before decoding a huge one.
    if len(text) * 3 // 4 > limit + 3:
        raise InvalidResult(f"{what}: an embedded file of about {len(text) * 3 // 4} bytes, over "
                            f"max_file_bytes ({limit})")
    try:
        data = base64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError):
        return None      # text that only looked like base64
    if len(data) > limit:
        raise InvalidResult(f"{what}: an embedded file of {len(data)} bytes, over max_file_bytes ({limit})")
    return data


def _plain(text, limit, what):
    data = unquote(text).encode()
    if len(data) > limit:
        raise InvalidResult(f"{what}: an embedded file of {len(data)} bytes, over max_file_bytes ({limit})")
    return data


def _sniff(data):
    for magic, ctype, _ in _MAGIC:
        if data.startswith(magic):
            return ctype
    return None


def _named(data, name, content_type, default):
    content_type = content_type or _sniff(data)
    if name is None:
        ext = _EXT.get(content_type or "", "bin")
        name = f"{default}.{ext}"
    return Output(name, data=data, content_type=content_type)


def message_of(resp, *keys):
    """The provider's own words in an error answer: the first of `keys`
    that the JSON body has, else the start of the body."""
    try:
        body = parse_json(resp.content or b"null", "error answer")
    except (ValueError, InvalidResult):
        body = None
    if isinstance(body, dict):
        for key in keys:
            value = body.get(key)
            if isinstance(value, str) and value:
                return value[:2000]
            if value not in (None, "", [], {}):
                return json.dumps(value)[:2000]
    text = (resp.content or b"").decode("utf-8", "replace").strip()
    return f"HTTP {resp.status_code}" + (f": {text[:500]}" if text else "")
