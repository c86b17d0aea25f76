"""Where a decoded token's time goes: wall-clock time per kind of work, for ``bench --profile``.

The CPU replacements of mlx-lm's modules and the streamed expert layer mark their work with
:func:`region` (a no-op unless a :class:`Profile` is active). Time is *exclusive*: a region nested
in another (the shared expert's products run while the store's reads are in flight) is charged to
the inner kind only, so the kinds of one token add up to its wall time. What no region covers
(mlx-lm's Python code, MLX building its graph) is ``other``.

MLX evaluates lazily: converting an MLX array to numpy computes everything pending before it
(norms, rope, the router's softmax and top-k, ...). While profiling, each conversion first
evaluates its input under ``mlx_eval``, so that work is not charged to the kernel that follows.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import mlx.core as mx
import numpy as np

# The kinds, in the order they are reported.
KINDS = (
    "products",  # quantized matrix products: resident linears and routed experts (int8 activations too)
    "attention",  # full attention over the KV cache
    "gated_delta",  # linear attention's recurrence and its depthwise convolution
    "routing",  # the router's top-k and its host read-back
    "store",  # expert fetch: page-cache residency, reads, checksums
    "mlx_eval",  # MLX computing its lazy graph (norms, rope, elementwise ops) before a conversion
    "other",  # Python, MLX graph building, conversions between MLX and numpy
)
LABELS = {
    "products": "quantized products",
    "attention": "attention",
    "gated_delta": "gated delta",
    "routing": "routing and its host read-back",
    "store": "store fetch and checks",
    "mlx_eval": "MLX graph evaluation",
    "other": "everything else",
}

ACTIVE: Profile | None = None


class Profile:
    """Exclusive wall-clock seconds per kind, accumulated over the tokens run between
    :meth:`start_token` and :meth:`stop_token`."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(KINDS, 0.0)
        self.tokens = 0
        self._stack: list[str] = []
        self._last = 0.0

    def _switch(self, now: float) -> None:
        self.seconds[self._stack[-1]] += now - self._last
        self._last = now

    def start_token(self) -> None:
        self._stack = ["other"]
        self._last = time.perf_counter()

    def stop_token(self) -> None:
        self._switch(time.perf_counter())
        self._stack = []
        self.tokens += 1

    def enter(self, kind: str) -> None:
        if self._stack:
            self._switch(time.perf_counter())
            self._stack.append(kind)

    def exit(self) -> None:
        if len(self._stack) > 1:
            self._switch(time.perf_counter())
            self._stack.pop()

    def ms_per_token(self) -> dict[str, float]:
        n = max(1, self.tokens)
        return {k: 1e3 * v / n for k, v in self.seconds.items()}


class _Region:
    __slots__ = ("kind",)

    def __init__(self, kind: str):
        self.kind = kind

    def __enter__(self) -> None:
        if ACTIVE is not None:
            ACTIVE.enter(self.kind)

    def __exit__(self, *exc) -> None:
        if ACTIVE is not None:
            ACTIVE.exit()


_REGIONS = {k: _Region(k) for k in KINDS}


def region(kind: str) -> _Region:
    """``with region("products"): ...``: charge the block's time to ``kind`` while profiling."""
    return _REGIONS[kind]


def to_numpy(x: mx.array) -> np.ndarray:
    """``x`` as a float32 numpy array (a copy). While profiling, MLX's pending work on ``x`` is
    charged to ``mlx_eval`` first."""
    if ACTIVE is not None:
        with _REGIONS["mlx_eval"]:
            mx.eval(x)
    return np.array(x if x.dtype == mx.float32 else x.astype(mx.float32))  # no graph node when float32


def evaluated(*xs) -> None:
    """While profiling, evaluate ``xs`` under ``mlx_eval`` (before a kernel that converts them)."""
    if ACTIVE is not None:
        with _REGIONS["mlx_eval"]:
            mx.eval(*xs)


@contextmanager
def profiling() -> Iterator[Profile]:
    """Make a new :class:`Profile` the active one inside the block."""
    global ACTIVE
    prev, ACTIVE = ACTIVE, Profile()
    try:
        yield ACTIVE
    finally:
        ACTIVE = prev
