"""Swap one function inside mlx-lm's layer code for one model instance.

The CPU replacements (the gated-delta recurrence, attention through BLAS) keep mlx-lm's layer code
as it is and change only the function it calls, per model: the evaluation reference and the mlx-lm
baseline in the same process keep mlx-lm's own functions.
"""

from __future__ import annotations

import types
from typing import Callable

_CLASSES: dict[tuple[type, str], type] = {}


def rebind(cls: type, name: str, fn: Callable, prefix: str = "Cpu") -> type:
    """A subclass of ``cls`` whose ``__call__`` is ``cls``'s own code looking up the global ``name``
    as ``fn``: mlx-lm's layer code, unchanged, with one function swapped for this model only."""
    if (cls, name) not in _CLASSES:
        call = cls.__call__
        env = {**call.__globals__, name: fn}
        f = types.FunctionType(call.__code__, env, call.__name__, call.__defaults__, call.__closure__)
        f.__kwdefaults__ = call.__kwdefaults__
        _CLASSES[cls, name] = type(f"{prefix}{cls.__name__}", (cls,), {"__call__": f, "__module__": cls.__module__})
    return _CLASSES[cls, name]


def rebound(m) -> bool:
    return type(m) in _CLASSES.values()
