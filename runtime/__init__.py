"""Runtime: load a pack on MLX and run it, reading only the routed experts from disk.

- :func:`load` (a pack and a :class:`RuntimeOptions`) -> :class:`Runtime` (mlx-lm model with streamed
  experts, tokenizer, expert store; a context manager)
- :func:`generate` streams text with statistics; :func:`evaluate` scores perplexity and KL
- :func:`~moestream.runtime.model.build.load_resident_model`: the same pack with every expert in RAM

The names are imported on first use, so importing a submodule (``moestream.runtime.options``) does
not load MLX, mlx-lm and numba.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load": "moestream.runtime.model.runtime",
    "Runtime": "moestream.runtime.model.runtime",
    "RuntimeOptions": "moestream.runtime.options",
    "OptionError": "moestream.runtime.options",
    "generate": "moestream.runtime.generate",
    "GenerationStats": "moestream.runtime.generate",
    "evaluate": "moestream.runtime.evaluate",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
