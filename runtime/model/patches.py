"""The one way moestream changes mlx-lm's layers: a model instance gets a subclass of its layer's class.

mlx-lm's layer code stays as it is; only the instance's class changes, so other models in the process
(the evaluation reference, the mlx-lm baseline) keep mlx-lm's behaviour. Two kinds of subclass:

- :func:`rebind`: ``__call__`` is the class's own code with one global function it calls swapped
  (the CPU gated-delta recurrence, attention through BLAS);
- :func:`hook_call`: ``__call__`` first calls the instance's hook with the layer's input, then the
  class's own code (prefill's guess of the experts at a layer's entry);
- :func:`divert_call`: ``__call__`` first offers the call to the instance's fast path, and runs the
  class's own code when that declines (the CPU decode path of :mod:`.cpu_decode`).

Each subclass is made once per (class, change) and reused. The one other change, :func:`swapped`,
replaces module attributes for the length of a ``with`` block (the server parses its options with
mlx-lm's own command-line parser, which lives inside ``mlx_lm.server.main``).
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Callable, Iterator

_CLASSES: dict[tuple, type] = {}


def _subclass(cls: type, key: tuple, name: str, call: Callable) -> type:
    if (cls, *key) not in _CLASSES:
        body = {"__call__": call, "__module__": cls.__module__, "_moestream_patch": key}
        _CLASSES[(cls, *key)] = type(name, (cls,), body)
    return _CLASSES[(cls, *key)]


def rebind(cls: type, name: str, fn: Callable, prefix: str = "Cpu") -> type:
    """A subclass of ``cls`` whose ``__call__`` is ``cls``'s own code looking up the global ``name``
    as ``fn``: mlx-lm's layer code, unchanged, with one function swapped for this model only."""
    if (cls, "rebind", name) not in _CLASSES:
        call = cls.__call__
        env = {**call.__globals__, name: fn}
        f = types.FunctionType(call.__code__, env, call.__name__, call.__defaults__, call.__closure__)
        f.__kwdefaults__ = call.__kwdefaults__
        _subclass(cls, ("rebind", name), f"{prefix}{cls.__name__}", f)
    return _CLASSES[(cls, "rebind", name)]


def hook_call(instance, attr: str, hook: Callable, prefix: str = "Hooked") -> None:
    """Make ``instance`` call ``hook(x)`` with its first argument before its class's own ``__call__``;
    the hook is kept as ``instance.<attr>`` (calling this again replaces it)."""
    cls = type(instance)
    if getattr(cls, "_moestream_patch", None) != ("hook", attr):

        def __call__(self, x, *args, **kwargs):
            getattr(self, attr)(x)
            return cls.__call__(self, x, *args, **kwargs)

        instance.__class__ = _subclass(cls, ("hook", attr), f"{prefix}{cls.__name__}", __call__)
    setattr(instance, attr, hook)


def divert_call(instance, attr: str, fast: Callable, prefix: str = "Fast") -> None:
    """Make ``instance`` try ``fast(x, *args, **kwargs)`` first: its result when it gives one, else
    (None: a case it does not take) its class's own ``__call__``. ``fast`` is kept as ``instance.<attr>``."""
    cls = type(instance)
    if getattr(cls, "_moestream_patch", None) != ("divert", attr):

        def __call__(self, x, *args, **kwargs):
            out = getattr(self, attr)(x, *args, **kwargs)
            return out if out is not None else cls.__call__(self, x, *args, **kwargs)

        instance.__class__ = _subclass(cls, ("divert", attr), f"{prefix}{cls.__name__}", __call__)
    setattr(instance, attr, fast)


def patched(m) -> bool:
    """``m``'s class is one of the subclasses made here."""
    return type(m) in _CLASSES.values()


@contextmanager
def swapped(owner: object, **attrs) -> Iterator[None]:
    """Set ``owner``'s attributes to ``attrs`` inside the block, and back afterwards."""
    old = {k: getattr(owner, k) for k in attrs}
    try:
        for k, v in attrs.items():
            setattr(owner, k, v)
        yield
    finally:
        for k, v in old.items():
            setattr(owner, k, v)
