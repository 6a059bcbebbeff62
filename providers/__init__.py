"""Provider adapters and their registry.

Each adapter turns its provider's answers into one small common `Status`:
queued, running(step, progress), succeeded(outputs), failed(code, message) or
unknown. Adapters hold no task state of their own between calls: what they need
to remember goes into the task (`external_id`, `state`), so a restart loses
nothing.

    base.py     Status, Output, Retry, BaseProvider (the interface)
    http.py     the requests seam, rate limit and downloads HTTP adapters share
    net.py      where outbound requests may go, and bounded reads of answers
    demo.py     built in, no network
    comfyui.py  a ComfyUI server
    comfyui_ws.py  ComfyUI's WebSocket: live progress, an early word that a job ended
    kie.py      a KIE-style jobs API
    callbacks.py  the per-task token of a provider's callback URL, kept hashed
    local.py    a Python function run in the worker pool
    replicate.py  Replicate's predictions
    fal.py      fal.ai's queue API
    runpod.py   RunPod serverless endpoints
    declarative.py  `http`: any jobs API described in holdfast.toml
    results.py  result files out of a provider's JSON output (URLs, base64)
"""

import os
import re

from errors import ConfigError

from .base import BaseProvider, Output, Retry, Status
from .comfyui import ComfyUIProvider
from .declarative import DeclarativeProvider
from .demo import DemoProvider, demo_png, encode_png
from .fal import FalProvider
from .http import HttpProvider, RateLimiter, parse_retry_after
from .kie import KIEProvider
from .local import LocalProvider
from .replicate import ReplicateProvider
from .runpod import RunPodProvider

__all__ = ["BaseProvider", "ComfyUIProvider", "DeclarativeProvider", "DemoProvider", "FalProvider",
           "HttpProvider", "KIEProvider", "LocalProvider", "Output", "PROVIDER_TYPES", "RateLimiter",
           "ReplicateProvider", "Retry", "RunPodProvider", "Status", "build_providers", "demo_png",
           "encode_png", "parse_retry_after"]

PROVIDER_TYPES = {
    "demo": DemoProvider,
    "comfyui": ComfyUIProvider,
    "kie": KIEProvider,
    "local": LocalProvider,
    "replicate": ReplicateProvider,
    "fal": FalProvider,
    "runpod": RunPodProvider,
    "http": DeclarativeProvider,
}


def build_providers(table, env=None):
    """{name: provider} from holdfast.toml's [providers] table; secrets are
    read from `env` (default os.environ). `demo` is always there; a
    configured `demo` entry tunes it. ConfigError names what is wrong."""
    env = os.environ if env is None else env
    table = dict(table or {})
    providers = {}
    for name, conf in table.items():
        if not re.match(r"^[A-Za-z0-9_-]{1,40}$", name):
            raise ConfigError(f"provider name {name!r}: use 1-40 letters, digits, '_' or '-'")
        if not isinstance(conf, dict):
            raise ConfigError(f"[providers.{name}] must be a table")
        kind = conf.get("type", "demo" if name == "demo" else None)
        cls = PROVIDER_TYPES.get(kind)
        if cls is None:
            raise ConfigError(f"provider {name}: unknown type {kind!r}; "
                              f"known: {', '.join(sorted(PROVIDER_TYPES))}")
        providers[name] = cls(name, conf, env)
    providers.setdefault("demo", DemoProvider("demo"))
    return providers
