"""Local functions: `function = "module:function"`, called in the worker pool
as f(params, report). `report(step=..., progress=...)` updates the task; the
function returns its result files: bytes, a path, a {name: bytes or path}
dict, or a list of bytes, paths and (name, bytes or path) pairs.

A run lives only as long as the process running it. A running local task that
another worker can claim (its lease ran out) was left by a dead process: poll
says `unknown`, and the worker runs it again or ends it `provider_lost`.
"""

import importlib
import os

from errors import ConfigError, InvalidInput, ProviderRejected

from .base import BaseProvider, Output, Retry, Status

_MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF8", ".gif"),
          (b"RIFF", ".webp"), (b"%PDF", ".pdf"))
CHUNK = 64 * 1024


class LocalProvider(BaseProvider):
    type = "local"
    runs_in_worker = True
    defaults = {**BaseProvider.defaults, "function": None, "retry_intervals": [1, 2, 4, 8, 16, 30],
                "poll_interval_s": 1.0}
    required = ("function",)

    def __init__(self, name, config=None, env=None):
        super().__init__(name, config, env)
        self.function = load_function(self.config["function"], name)
        if not isinstance(self.config["retry_intervals"], (list, tuple)):
            raise ConfigError(f"provider {name}: retry_intervals must be a list of seconds")
        try:
            self.retry = Retry(self.retries, self.config["retry_intervals"])
        except ConfigError as exc:
            raise ConfigError(f"provider {name}: {exc.message}") from None

    def run(self, task, report):
        return self.outputs(self.function(dict(task["params"]), report))

    def poll(self, task, now):
        return Status.unknown()

    def outputs(self, result):
        """The function's return value as Outputs; ProviderRejected when it
        is not something holdfast can store."""
        if result is None:
            return []
        if isinstance(result, dict):
            items = list(result.items())
        elif isinstance(result, (bytes, bytearray, str, os.PathLike, tuple)):
            items = [result]
        elif isinstance(result, list):
            items = result
        else:
            raise ProviderRejected(f"{self.function_name} returned {type(result).__name__}; "
                                   "expected bytes, a path, or a list or dict of them")
        outputs = []
        for i, item in enumerate(items):
            name = None
            if isinstance(item, tuple):
                if len(item) != 2 or not isinstance(item[0], str):
                    raise ProviderRejected(f"{self.function_name}: a tuple result must be (name, bytes or path)")
                name, item = item
            if isinstance(item, (bytes, bytearray)):
                outputs.append(Output(name or f"out_{i}{_extension(item)}", data=bytes(item)))
            elif isinstance(item, (str, os.PathLike)):
                path = os.path.abspath(os.fspath(item))
                outputs.append(Output(name or os.path.basename(path), meta={"path": path}))
            else:
                raise ProviderRejected(f"{self.function_name} returned a {type(item).__name__} "
                                       "among its results; expected bytes or a path")
        return outputs

    @property
    def function_name(self):
        return self.config["function"]

    def fetch(self, task, output, check=None):
        if output.data is not None:
            yield output.data
            return
        try:
            with open(output.meta["path"], "rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk
        except OSError as exc:
            raise InvalidInput(f"{output.name}: cannot read {output.meta['path']}: {exc.strerror}",
                               code="invalid_result") from None

    def describe(self):
        out = super().describe()
        out["function"] = self.function_name
        return out


def load_function(spec, provider_name):
    """`module:function` (or `module:object.attribute`) -> the callable."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigError(f"provider {provider_name}: function must be 'module:function', not {spec!r}")
    module_name, attr = spec.split(":")
    try:
        target = importlib.import_module(module_name)
    except Exception as exc:   # any import-time error of someone else's module
        raise ConfigError(f"provider {provider_name}: cannot import {module_name}: {exc}") from None
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ConfigError(f"provider {provider_name}: {module_name} has no {attr}")
    if not callable(target):
        raise ConfigError(f"provider {provider_name}: {spec} is not callable")
    return target


def _extension(data):
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    return ".bin"
