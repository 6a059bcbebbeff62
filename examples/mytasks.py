"""The local function behind the README's `[providers.thumbs]` example
(`function = "mytasks:make_thumbnail"`): put this folder on the server's
PYTHONPATH, e.g. `PYTHONPATH=examples python app.py`.

params: {"width": 1..512, "height": 1..512, "color": [r, g, b]}; it returns
one PNG of that size and colour, drawn with the standard library only.
"""

import struct
import zlib

MAX_SIDE = 512


def make_thumbnail(params, report):
    """f(params, report) -> {"thumb.png": bytes}; report() raises once the
    task is cancelled, so a cancel stops it between rows."""
    width, height = _side(params, "width"), _side(params, "height")
    color = params.get("color", [200, 80, 40])
    if not (isinstance(color, list) and len(color) == 3
            and all(isinstance(c, int) and 0 <= c <= 255 for c in color)):
        raise ValueError("params.color must be [r, g, b], each 0..255")
    report(step="drawing", progress=0.1)
    row = b"\x00" + bytes(color) * width
    rows = []
    for y in range(height):
        rows.append(row)
        if y and y % 128 == 0:
            report(step="drawing", progress=0.1 + 0.8 * y / height)
    report(step="encoding", progress=0.9)
    return {"thumb.png": _png(width, height, b"".join(rows))}


def _side(params, name):
    value = params.get(name, 64)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SIDE:
        raise ValueError(f"params.{name} must be a whole number from 1 to {MAX_SIDE}")
    return value


def _png(width, height, raw):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
