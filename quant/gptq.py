"""GPTQ in MLX's affine group layout: quantize column by column, pushing each column's error onto
the columns not yet quantized, weighted by the inverse of the input second-moment matrix.

For a linear ``y = W x`` with inputs of second moment ``H = E[x x^T]``, the expected output error of a
row is ``(w - q)^T H (w - q)``; GPTQ (Frantar et al., 2022) minimises it greedily, one column at a
time, using the Cholesky factor of ``H^-1``. Groups are static (column order): when a group starts,
its scale and bias are chosen by the clip search on the group's *updated* weights (weighted by the
diagonal of ``H``), then its columns are rounded with them. The result dequantizes with
``mx.dequantize`` like any other pack tensor.
"""

from __future__ import annotations

import numpy as np

from .affine import _from_storage, _to_storage, quantize
from .errors import ErrorStats


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes [rows, cols] -> MLX's uint32 words: an LSB-first bitstream per row."""
    rows, cols = codes.shape
    if (cols * bits) % 32:
        raise ValueError(f"{cols} codes of {bits} bits do not fill whole 32-bit words")
    bitplanes = (codes.astype(np.uint32)[..., None] >> np.arange(bits, dtype=np.uint32)) & 1
    packed = np.packbits(bitplanes.reshape(rows, cols * bits).astype(np.uint8), axis=1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32).reshape(rows, cols * bits // 32)


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; dead inputs get a unit diagonal."""
    h = np.array(h, np.float64)
    dead = np.diag(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1.0
    mean = np.mean(np.diag(h))
    h[np.diag_indices_from(h)] += damp * (mean if mean > 0 else 1.0)
    for _ in range(6):  # a badly conditioned H: more damping until the factorisations succeed
        try:
            hinv = np.linalg.inv(np.linalg.cholesky(h))
            return np.linalg.cholesky(hinv.T @ hinv).T
        except np.linalg.LinAlgError:
            h[np.diag_indices_from(h)] += damp * 10 * (mean if mean > 0 else 1.0)
    raise ValueError("GPTQ: the input second-moment matrix is not positive definite even after damping")


def gptq_quantize(
    w: np.ndarray,
    h: np.ndarray,
    bits: int,
    group_size: int,
    scale_dtype: str = "bfloat16",
    damp: float = 0.01,
    block: int = 128,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, ErrorStats]:
    """GPTQ-quantize ``w`` [rows, cols] given ``h`` [cols, cols] = E[x x^T] of its inputs.

    Returns (wq, scales, biases, stats) as :func:`~moestream.quant.quantize_with_error` does; the
    stats compare the dequantized result with ``w`` itself (not with the output error).
    """
    w0 = np.ascontiguousarray(w, np.float32)
    rows, cols = w0.shape
    if h.shape != (cols, cols):
        raise ValueError(f"GPTQ: second moments of shape {h.shape} for a weight with {cols} columns")
    if cols % group_size or block % group_size:
        raise ValueError(f"GPTQ: {cols} columns, block {block}: not multiples of group_size {group_size}")
    u = _inverse_cholesky(h, damp)
    diag_h = np.maximum(np.diag(h), 0)
    n_bins = (1 << bits) - 1
    work = w0.astype(np.float64)
    codes = np.zeros((rows, cols), np.uint8)
    scales = np.zeros((rows, cols // group_size), np.float32)
    biases = np.zeros_like(scales)
    sdt = scale_dtype
    for b0 in range(0, cols, block):
        b1 = min(cols, b0 + block)
        err = np.zeros((rows, b1 - b0))
        for j in range(b0, b1):
            if j % group_size == 0:
                g = j // group_size
                grp = np.ascontiguousarray(work[:, j : j + group_size], np.float32)
                imp = diag_h[j : j + group_size]
                _, s, b = quantize(grp, bits, group_size, sdt, "clip", importance=imp if imp.sum() > 0 else None)
                scales[:, g] = _from_storage(s, sdt)[:, 0]
                biases[:, g] = _from_storage(b, sdt)[:, 0]
            g = j // group_size
            s, b = scales[:, g], biases[:, g]
            safe = np.where(s == 0, 1.0, s)
            q = np.clip(np.rint((work[:, j] - b) / safe), 0, n_bins)
            q = np.where(s == 0, 0, q)
            codes[:, j] = q
            deq = (q.astype(np.float32) * s + b).astype(np.float64)  # as MLX dequantizes, in float32
            e = (work[:, j] - deq) / u[j, j]
            err[:, j - b0] = e
            work[:, j + 1 : b1] -= np.outer(e, u[j, j + 1 : b1])
        work[:, b1:] -= err @ u[b0:b1, b1:]  # the block's errors, pushed onto the later columns at once
    wq = pack_codes(codes, bits)
    deq = codes.astype(np.float32) * np.repeat(scales, group_size, 1) + np.repeat(biases, group_size, 1)
    d = deq.astype(np.float64) - w0
    stats = ErrorStats(
        count=w0.size,
        sum_w=float(w0.sum(dtype=np.float64)),
        sum_w2=float(np.square(w0, dtype=np.float64).sum()),
        sum_err2=float((d * d).sum()),
        max_abs_err=float(np.abs(d).max()),
    )
    return wq, _to_storage(scales, sdt), _to_storage(biases, sdt), stats
