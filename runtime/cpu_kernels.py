"""CPU kernels for MLX-affine quantized weights (numba): the compute path when MLX runs on the CPU.

MLX's CPU quantized matmul is slow (measured ~1 GB/s of weights with float32 activations), so on the
CPU the runtime multiplies with these kernels instead, straight from the weight bytes where they
lie (expert slabs or resident arrays, viewed through numpy without copying).

``qmm(x, w, scales, biases, bits, group_size)`` computes ``x @ dequant(w).T`` for x [T, in]:
per output row and group, ``sum_j q_j x_j * scale + bias * sum_j x_j``, so the bias costs one
multiply per group. Rows are split over threads (``prange``). Codes are MLX's: LSB-first bit fields
of uint32 words (for 3 bits, of the byte stream).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

_BF16 = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)  # bf16 bits -> float32


def as_f32(a: np.ndarray) -> np.ndarray:
    """Scales/biases to float32: bf16 (raw uint16) via a lookup table, float16/float32 by cast."""
    if a.dtype == np.uint16:
        return _BF16[a]
    return np.ascontiguousarray(a, dtype=np.float32)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _qmm_pow2(x, xg, w, s, b, bits, group, out):
    T, K = x.shape
    N = w.shape[0]
    G = K // group
    per = 32 // bits
    mask = (1 << bits) - 1
    wpg = group // per  # words per group
    for n in prange(N):
        for t in range(T):
            acc = np.float32(0.0)
            for g in range(G):
                part = np.float32(0.0)
                w0 = g * wpg
                x0 = g * group
                for i in range(wpg):
                    word = w[n, w0 + i]
                    xo = x0 + i * per
                    for k in range(per):
                        part += np.float32((word >> (bits * k)) & mask) * x[t, xo + k]
                acc += s[n, g] * part + b[n, g] * xg[t, g]
            out[t, n] = acc


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _qmm_4(x, xg, w, s, b, group, out):
    # The common case, unrolled: 8 nibbles per word.
    T, K = x.shape
    N = w.shape[0]
    G = K // group
    wpg = group // 8
    for n in prange(N):
        for t in range(T):
            acc = np.float32(0.0)
            for g in range(G):
                part = np.float32(0.0)
                for i in range(wpg):
                    word = w[n, g * wpg + i]
                    xo = g * group + i * 8
                    part += (np.float32(word & 15) * x[t, xo] + np.float32((word >> 4) & 15) * x[t, xo + 1]
                             + np.float32((word >> 8) & 15) * x[t, xo + 2]
                             + np.float32((word >> 12) & 15) * x[t, xo + 3]
                             + np.float32((word >> 16) & 15) * x[t, xo + 4]
                             + np.float32((word >> 20) & 15) * x[t, xo + 5]
                             + np.float32((word >> 24) & 15) * x[t, xo + 6]
                             + np.float32((word >> 28) & 15) * x[t, xo + 7])
                acc += s[n, g] * part + b[n, g] * xg[t, g]
            out[t, n] = acc


@njit(fastmath=True, cache=True, nogil=True)
def _row_acc(wr, xk, acc, bits, per, mask):
    # acc[i] = sum_k code(word i, field k) * xk[k, i]. A function of its own: LLVM vectorizes these
    # loops here (8 floats per AVX2 op), which it did not inside the parallel loop body.
    W = wr.shape[0]
    x0 = xk[0]
    for i in range(W):
        acc[i] = np.float32(wr[i] & mask) * x0[i]
    for k in range(1, per):
        sh = np.int32(bits * k)
        xr = xk[k]
        for i in range(W):
            acc[i] += np.float32((wr[i] >> sh) & mask) * xr[i]


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _qmv_pow2(xk, xg, w, s, b, bits, group, out):
    # One token: decode and multiply-accumulate in the same pass (no row buffer). w is viewed as
    # int32: signed int -> float converts in one SIMD instruction; the mask drops shifted-in sign bits.
    _, per, W = xk.shape
    N = w.shape[0]
    G = s.shape[1]
    wpg = group // per
    mask = np.int32((1 << bits) - 1)
    nchunks = min(N, 256)
    for c in prange(nchunks):
        acc = np.empty(W, np.float32)
        for n in range(c * N // nchunks, (c + 1) * N // nchunks):
            _row_acc(w[n], xk[0], acc, bits, per, mask)
            y = np.float32(0.0)
            for g in range(G):
                part = np.float32(0.0)
                for i in range(g * wpg, (g + 1) * wpg):
                    part += acc[i]
                y += s[n, g] * part + b[n, g] * xg[0, g]
            out[0, n] = y


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _qmm_3(x, xg, w8, s, b, group, out):
    # 3-bit: 8 codes in 3 bytes, LSB-first across the byte stream of each row.
    T, K = x.shape
    N = w8.shape[0]
    G = K // group
    for n in prange(N):
        for t in range(T):
            acc = np.float32(0.0)
            for g in range(G):
                part = np.float32(0.0)
                for i in range(group // 8):
                    j = (g * group) // 8 + i
                    v = np.uint32(w8[n, 3 * j]) | (np.uint32(w8[n, 3 * j + 1]) << 8) | (np.uint32(w8[n, 3 * j + 2]) << 16)
                    xo = g * group + i * 8
                    for k in range(8):
                        part += np.float32((v >> (3 * k)) & 7) * x[t, xo + k]
                acc += s[n, g] * part + b[n, g] * xg[t, g]
            out[t, n] = acc


@njit(fastmath=True, cache=True, nogil=True)
def _group_sums(x, group):
    T, K = x.shape
    G = K // group
    out = np.zeros((T, G), np.float32)
    for t in range(T):
        for g in range(G):
            acc = np.float32(0.0)
            for j in range(g * group, (g + 1) * group):
                acc += x[t, j]
            out[t, g] = acc
    return out


def qmm(x: np.ndarray, w: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int,
        out: np.ndarray | None = None) -> np.ndarray:
    """``x [T, in] @ dequantize(w).T -> [T, out]`` in float32.

    Args:
        x: float32 activations [T, in] (C-contiguous).
        w: uint32 codes [out, in * bits / 32] (MLX layout).
        scales, biases: [out, in / group_size], float32 (see :func:`as_f32` for bf16).
        bits: 2, 3, 4 or 8. group_size: 32, 64 or 128.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    T, K = x.shape
    N = w.shape[0]
    out = np.empty((T, N), np.float32) if out is None else out
    xg = _group_sums(x, group_size)
    if bits == 4:
        _qmm_4(x, xg, w, scales, biases, group_size, out)
    elif bits == 3:
        _qmm_3(x, xg, w.view(np.uint8).reshape(N, -1), scales, biases, group_size, out)
    else:
        _qmm_pow2(x, xg, w, scales, biases, bits, group_size, out)
    return out


@njit(fastmath=True, cache=True, nogil=True)
def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """SwiGLU: silu(gate) * up, in place into ``gate``."""
    g = gate.reshape(-1)
    u = up.reshape(-1)
    for i in range(g.size):
        v = g[i]
        g[i] = v / (np.float32(1.0) + np.exp(-v)) * u[i]
    return gate


def set_threads(n: int | None) -> None:
    if n:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
