"""Reference and error bounds for the Metal expert kernels: ``mx.dequantize`` followed by float64
matmuls, on random experts quantized by ``mx.quantize``. Shared by the emulated and the device tests.

Tolerances: summing n float32 terms in any order errs by at most n * u * sum|terms| (u = 2^-24;
Higham, Accuracy and Stability, 3.1); the sums of |terms| are computed in float64 from the
dequantized weights (|scale * q| <= |w| + |bias|). SwiGLU and the weighted sum propagate these bounds
to first order; a factor 2 covers the second-order terms and exp's rounding. A wrong bit layout,
group index or row offset errs by the order of the values themselves, far above these bounds.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

U = 2.0**-24
PROJS = ("gate_proj", "up_proj", "down_proj")


def make_experts(rng, h, i, slots, gate_up, down, scale_dtype=mx.bfloat16):
    """Random slab arrays {proj.weight/scales/biases} [slots, rows, ...] quantized by mx.quantize."""
    arrays = {}
    for p, (rows, cols), (bits, gs) in zip(PROJS, ((i, h), (i, h), (h, i)), (gate_up, gate_up, down)):
        w = rng.standard_normal((slots, rows, cols)).astype(np.float32) * rng.uniform(0.02, 0.2)
        wq, s, b = mx.quantize(mx.array(w).astype(scale_dtype), group_size=gs, bits=bits)
        arrays.update({f"{p}.weight": wq, f"{p}.scales": s, f"{p}.biases": b})
    return arrays


def dequantized(arrays, p, slot, bits, gs):
    """(w, |w| + 2 |bias|) in float64: the reference weights and the bound on |terms| per weight."""
    s = arrays[f"{p}.scales"][slot].astype(mx.float32)
    b = arrays[f"{p}.biases"][slot].astype(mx.float32)
    w = np.array(mx.dequantize(arrays[f"{p}.weight"][slot], s, b, group_size=gs, bits=bits)).astype(np.float64)
    return w, np.abs(w) + 2 * np.repeat(np.abs(np.array(b).astype(np.float64)), gs, axis=1)


def ref_hidden(arrays, slots, x, gate_up):
    """hmid [K, I] and its error bound."""
    x = np.asarray(x, np.float64)
    h = x.size
    out, tol = [], []
    for slot in slots:
        wg, ag = dequantized(arrays, "gate_proj", slot, *gate_up)
        wu, au = dequantized(arrays, "up_proj", slot, *gate_up)
        g, u = wg @ x, wu @ x
        dg, du = (h + 2) * U * (ag @ np.abs(x)), (h + 2) * U * (au @ np.abs(x))
        sg = g / (1 + np.exp(-g))
        out.append(sg * u)
        tol.append(2 * (1.1 * dg * np.abs(u) + np.abs(sg) * du + 8 * U * np.abs(sg * u)))
    return np.array(out), np.array(tol)


def ref_down(arrays, slots, hmid, hmid_tol, down, weights):
    """Per expert [K, H] outputs, the weighted sum [H], and their error bounds."""
    ys, tols = [], []
    for k, slot in enumerate(slots):
        wd, ad = dequantized(arrays, "down_proj", slot, *down)
        ys.append(wd @ hmid[k])
        tols.append(2 * (np.abs(wd) @ hmid_tol[k] + (hmid.shape[1] + 2) * U * (ad @ np.abs(hmid[k]))))
    ys, tols = np.array(ys), np.array(tols)
    w = np.asarray(weights, np.float64)
    total = w @ ys
    total_tol = np.abs(w) @ tols + 2 * (len(w) + 1) * U * (np.abs(w) @ np.abs(ys))
    return ys, tols, total, total_tol


def as_np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def check(got, want, tol, out_dtype=mx.float32):
    """|got - want| <= tol, plus the output's own rounding (bf16 keeps 8 bits, fp16 11)."""
    rounding = {mx.float32: U, mx.float16: 2.0**-11, mx.bfloat16: 2.0**-8}[out_dtype]
    err = np.abs(got - want)
    bound = tol + rounding * np.abs(want)
    assert np.isfinite(got).all(), "NaN in the output: an element never written, or threadgroup memory read unwritten"
    assert (err <= bound).all(), f"max err {err.max():.3g}, worst err/bound {(err / bound).max():.3g}"
    return err
