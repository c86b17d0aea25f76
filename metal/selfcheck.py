"""The Metal expert kernels checked against MLX's own quantized ops before they compute anything.

Nothing of the Metal path has run on Apple silicon yet (docs/metal.md), so on first use per (bits,
group size, hidden size, intermediate size, dtype) the two kernels run on random inputs of that shape
and their per-expert outputs are compared with MLX's ``quantized_matmul`` path on the same quantized
weights. A kernel that fails to build, raises, or differs by more than float32 accumulation can
explain (:data:`TOLERANCE` of the largest output) fails the check; the caller then falls back to
MLX's ops (``--kernels auto``, one warning) or stops (``--kernels metal``, one line).
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np

from moestream.metal import kernels

TOLERANCE = 2e-3  # of max |output|: float32 sums in another order, and the activations' rounding
EXPERTS = 3  # routed in the check: a slot order that is not 0..K-1 (the third slot of four)


def _reference(x: mx.array, a: dict, slots: list[int], gate_up: tuple[int, int], down: tuple[int, int]) -> mx.array:
    """MLX's ops on the same slabs: gate, up, SwiGLU and down of each routed expert, [K, H] float32."""
    outs = []
    xf = x.astype(mx.float32).reshape(1, -1)
    for s in slots:

        def mm(v, p, q):
            w, sc, b = (a[f"{p}.{n}"][s] for n in ("weight", "scales", "biases"))
            return mx.quantized_matmul(v, w, sc, b, transpose=True, group_size=q[1], bits=q[0])

        g, u = mm(xf, "gate_proj", gate_up), mm(xf, "up_proj", gate_up)
        mid = g * mx.sigmoid(g) * u
        outs.append(mm(mid, "down_proj", down)[0])
    return mx.stack(outs)


@functools.lru_cache(maxsize=None)
def check(h: int, i: int, gate_up: tuple[int, int], down: tuple[int, int], dtype: mx.Dtype = mx.float32) -> str | None:
    """None when the kernels compute what MLX's ops compute at these shapes; else why not (one line).
    Cached: each shape is checked once per process."""
    rng = np.random.default_rng(h * 31 + i)
    slots = [2, 0, 3]
    n = max(slots) + 1
    a = {}
    for p, rows, cols, q in (("gate_proj", i, h, gate_up), ("up_proj", i, h, gate_up), ("down_proj", h, i, down)):
        w = mx.array(rng.standard_normal((n, rows, cols)).astype(np.float32) * 0.05).astype(mx.bfloat16)
        qw, sc, b = mx.quantize(w, group_size=q[1], bits=q[0])
        a[f"{p}.weight"], a[f"{p}.scales"], a[f"{p}.biases"] = qw, sc, b
    x = mx.array(rng.standard_normal(h).astype(np.float32)).astype(dtype)
    try:
        got = kernels.routed_experts(x, a, mx.array(np.array(slots, np.uint32)), gate_up, down)
        got = np.array(got.astype(mx.float32))
    except Exception as e:  # a compile error, a launch refused: the kernel cannot be used
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"failed to build or run ({first})"
    want = np.array(_reference(x, a, slots, gate_up, down))
    if got.shape != want.shape or not np.all(np.isfinite(got)):
        return f"returned {got.shape} with non-finite values" if got.shape == want.shape else f"shape {got.shape}"
    err = float(np.abs(got - want).max())
    bound = TOLERANCE * float(np.abs(want).max())
    if err > bound:
        return f"differs from MLX's quantized_matmul by {err:.3g} (bound {bound:.3g})"
    return None
