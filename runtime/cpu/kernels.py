"""CPU kernels for MLX-affine quantized weights (numba): the compute path when MLX runs on the CPU.

MLX's CPU quantized matmul runs far below memory bandwidth (``benchmarks/kernel_throughput.py``
compares them), so on the CPU the runtime multiplies with these kernels instead, straight from the weight
bytes where they lie (expert slabs or resident arrays, viewed through numpy without copying).

``qmm(x, w, scales, biases, bits, group_size)`` computes ``x @ dequant(w).T`` for x [T, in]: per
output row and group, ``scale * sum_j q_j x_j + bias * sum_j x_j``. Codes of word ``i`` at field
``k`` belong to input ``i * per + k`` (MLX packs LSB-first), so with the activations permuted to
``xk[k, i] = x[i * per + k]`` every inner loop runs over contiguous ``i`` and vectorizes. The word
loop is written once per code width so shifts and trip counts are constants, and decodes each word's
fields in one expression so the sum stays in registers. Rows are split over threads (``prange``).
``benchmarks/kernel_throughput.py`` measures them against MLX's kernel and the memory bandwidth.
"""

from __future__ import annotations

import os

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from moestream.runtime.cpu import int8 as cpu_int8

# Small batches (decode) of the widths in INT8_WIDTHS multiply int8-quantized activations with integer dot
# products (:mod:`moestream.runtime.cpu.int8`, several times the float kernels' speed; routers excepted);
# MOESTREAM_INT8=0 keeps every product in float32. The widths are chosen by measured error
# (benchmarks/int8_by_width.py): at 8 bits int8 rounding is as large as the weights' own and visibly raises
# decode KL, so there single matrices take the residual product (int8 twice, ~1/65000 of a group's largest
# value) and expert stacks float32 activations, unless a caller asks for int8 (int8=True).
INT8_ACTIVATIONS = os.environ.get("MOESTREAM_INT8", "1") != "0"
INT8_WIDTHS = (2, 3, 4)


def _use_int8(int8: bool | str | None, T: int, bits: int, group_size: int) -> bool:
    if int8 is None:
        int8 = INT8_ACTIVATIONS and bits in INT8_WIDTHS
    return int8 and T < BLAS_MIN_TOKENS and cpu_int8.supported(bits, group_size)


_BF16 = (np.arange(65536, dtype=np.uint32) << 16).view(np.float32)  # bf16 bits -> float32


def _val(a, i, lut):
    """a[i] as float32; bf16 (raw uint16) through ``lut``. Compiled per dtype (see the overload)."""


@overload(_val)
def _val_impl(a, i, lut):
    # The small-batch kernel reads bf16 scales where they lie (expert slabs) instead of widening
    # whole arrays first: that widening cost ~6% of a prefill.
    if a.dtype == types.uint16:
        return lambda a, i, lut: lut[a[i]]
    return lambda a, i, lut: a[i]


def as_f32(a: np.ndarray) -> np.ndarray:
    """Scales/biases to float32: bf16 (raw uint16) via a lookup table, float16/float32 by cast."""
    if a.dtype == np.uint16:
        return _BF16[a]
    return np.ascontiguousarray(a, dtype=np.float32)


# acc[i] = sum_k code(word i, field k) * xk[k, i], one word's fields in one expression so the sum
# stays in registers (a loop over k stores and reloads acc once per field, measured slower). w is
# int32: signed int -> float is one SIMD instruction, unsigned is not; the mask drops the sign bits
# an arithmetic shift brings in.
@njit(fastmath=True, cache=True, nogil=True)
def _row4(wr, xk, acc):
    x0, x1, x2, x3, x4, x5, x6, x7 = xk[0], xk[1], xk[2], xk[3], xk[4], xk[5], xk[6], xk[7]
    for i in range(wr.shape[0]):
        v = wr[i]
        acc[i] = (
            np.float32(v & 15) * x0[i]
            + np.float32((v >> 4) & 15) * x1[i]
            + np.float32((v >> 8) & 15) * x2[i]
            + np.float32((v >> 12) & 15) * x3[i]
            + np.float32((v >> 16) & 15) * x4[i]
            + np.float32((v >> 20) & 15) * x5[i]
            + np.float32((v >> 24) & 15) * x6[i]
            + np.float32((v >> 28) & 15) * x7[i]
        )


@njit(fastmath=True, cache=True, nogil=True)
def _row8(wr, xk, acc):
    x0, x1, x2, x3 = xk[0], xk[1], xk[2], xk[3]
    for i in range(wr.shape[0]):
        v = wr[i]
        acc[i] = (
            np.float32(v & 255) * x0[i]
            + np.float32((v >> 8) & 255) * x1[i]
            + np.float32((v >> 16) & 255) * x2[i]
            + np.float32((v >> 24) & 255) * x3[i]
        )


@njit(fastmath=True, cache=True, nogil=True)
def _row2(wr, xk, acc):
    # Two half-words of 8 fields each.
    for i in range(wr.shape[0]):
        v = wr[i]
        a = np.float32(0.0)
        for k in range(16):
            a += np.float32((v >> (2 * k)) & 3) * xk[k, i]
        acc[i] = a


@njit(fastmath=True, cache=True, nogil=True)
def _finish(acc, s, b, xg, wpg, lut):
    y = np.float32(0.0)
    for g in range(s.shape[0]):
        part = np.float32(0.0)
        for i in range(g * wpg, (g + 1) * wpg):
            part += acc[i]
        y += _val(s, g, lut) * part + _val(b, g, lut) * xg[g]
    return y


def _qmm_pow2_body(xk, xg, w, s, b, bits, group, out, lut):
    T, per, W = xk.shape
    N = w.shape[0]
    wpg = group // per
    nchunks = min(N, 64)
    for c in prange(nchunks):
        acc = np.empty(W, np.float32)
        for n in range(c * N // nchunks, (c + 1) * N // nchunks):
            for t in range(T):  # for prefill batches the row stays in L1 across tokens
                if bits == 4:
                    _row4(w[n], xk[t], acc)
                elif bits == 2:
                    _row2(w[n], xk[t], acc)
                else:
                    _row8(w[n], xk[t], acc)
                out[t, n] = _finish(acc, s[n], b[n], xg[t], wpg, lut)


_qmm_pow2 = njit(parallel=True, fastmath=True, cache=True, nogil=True)(_qmm_pow2_body)
# A router's few rows (64-512 x the hidden size, 8 bits: 0.1-2 MB) take a few microseconds, about
# what waking the OpenMP workers for a parallel region costs: below SERIAL_BYTES one thread does it.
_qmm_pow2_serial = njit(fastmath=True, cache=True, nogil=True)(_qmm_pow2_body)
SERIAL_BYTES = 256 << 10


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _qmm_3(x, xg, w8, s, b, group, out, lut):
    # 3-bit: 8 codes in 3 bytes, LSB-first across the byte stream of each row; scales and biases
    # read where they lie (bf16 as raw uint16 through ``lut``), as the other widths' kernels do.
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
                    v = (
                        np.uint32(w8[n, 3 * j])
                        | (np.uint32(w8[n, 3 * j + 1]) << 8)
                        | (np.uint32(w8[n, 3 * j + 2]) << 16)
                    )
                    xo = g * group + i * 8
                    for k in range(8):
                        part += np.float32((v >> (3 * k)) & 7) * x[t, xo + k]
                acc += _val(s[n], g, lut) * part + _val(b[n], g, lut) * xg[t, g]
            out[t, n] = acc


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _dequant_rows(w, s, b, bits, group, r0, out):
    # out[j, :] = dequantized row r0 + j, in natural column order (for a BLAS matmul).
    per = 32 // bits
    mask = (1 << bits) - 1
    for j in prange(out.shape[0]):
        n = r0 + j
        for i in range(w.shape[1]):
            v = w[n, i]
            g = (i * per) // group
            sc, bi = s[n, g], b[n, g]
            for k in range(per):
                out[j, i * per + k] = np.float32((v >> (bits * k)) & mask) * sc + bi


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _dequant_rows3(w8, s, b, group, r0, out):
    for j in prange(out.shape[0]):
        n = r0 + j
        for q in range(w8.shape[1] // 3):
            v = np.uint32(w8[n, 3 * q]) | (np.uint32(w8[n, 3 * q + 1]) << 8) | (np.uint32(w8[n, 3 * q + 2]) << 16)
            for k in range(8):
                c = q * 8 + k
                out[j, c] = np.float32((v >> (3 * k)) & 7) * s[n, c // group] + b[n, c // group]


BLAS_MIN_TOKENS = 32  # from here on, dequantizing a block of rows and calling BLAS beats the fused kernel
BLAS_ROWS = 512


def _qmm_blas(x, w, scales, biases, bits, group_size, out):
    """Prefill batches: dequantize BLAS_ROWS rows at a time to float32 and multiply with BLAS
    (see benchmarks/RESULTS.md for the figures)."""
    N = w.shape[0]
    K = x.shape[1]
    buf = np.empty((min(BLAS_ROWS, N), K), np.float32)
    w8 = w.view(np.uint8).reshape(N, -1) if bits == 3 else None
    for r0 in range(0, N, BLAS_ROWS):
        r1 = min(N, r0 + BLAS_ROWS)
        blk = buf[: r1 - r0]
        if bits == 3:
            _dequant_rows3(w8, scales, biases, group_size, r0, blk)
        else:
            _dequant_rows(w.view(np.int32), scales, biases, bits, group_size, r0, blk)
        np.matmul(x, blk.T, out=out[:, r0:r1])
    return out


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


def qmm(
    x: np.ndarray,
    w: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
    bits: int,
    group_size: int,
    out: np.ndarray | None = None,
    int8: bool | str | None = None,
) -> np.ndarray:
    """``x [T, in] @ dequantize(w).T -> [T, out]`` in float32.

    Args:
        x: float32 activations [T, in].
        w: uint32 codes [out, in * bits / 32] (MLX layout).
        scales, biases: [out, in / group_size], float32, float16 or bf16 as raw uint16.
        bits: 2, 3, 4 or 8. group_size: 32, 64 or 128.
        out: optional [T, out] float32 result buffer.
        int8: int8 activations for small batches where the width allows (None: ``INT8_ACTIVATIONS``);
            ``"residual"``: the same with each row's rounding multiplied too
            (:func:`cpu_int8.qmv_int8_residual`, for routers), float32 where int8 is off.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    T, K = x.shape
    N = w.shape[0]
    if int8 is None and INT8_ACTIVATIONS and bits not in INT8_WIDTHS:
        int8 = "residual"  # int8's rounding would be visible at this width (INT8_WIDTHS); the residual's is not
    if int8 == "residual":  # any width: its error is far below int8's (8 bits included)
        if _use_int8(INT8_ACTIVATIONS, T, bits, group_size):
            y = cpu_int8.qmv_int8_residual(x, w, scales, biases, bits, group_size)
            if out is None:
                return y
            out[...] = y
            return out
        int8 = False
    if _use_int8(int8, T, bits, group_size):
        return cpu_int8.qmv_int8(x, w, scales, biases, bits, group_size, out)
    out = np.empty((T, N), np.float32) if out is None else out
    if T >= BLAS_MIN_TOKENS or scales.dtype == np.float16:
        scales, biases = as_f32(scales), as_f32(biases)
    if T >= BLAS_MIN_TOKENS:
        return _qmm_blas(x, w, scales, biases, bits, group_size, out)
    xg = _group_sums(x, group_size)
    if bits == 3:
        _qmm_3(x, xg, w.view(np.uint8).reshape(N, -1), scales, biases, group_size, out, _BF16)
    else:
        per = 32 // bits
        xk = np.ascontiguousarray(x.reshape(T, K // per, per).transpose(0, 2, 1))
        kern = _qmm_pow2_serial if T * w.nbytes < SERIAL_BYTES else _qmm_pow2
        kern(xk, xg, w.view(np.int32), scales, biases, bits, group_size, out, _BF16)
    return out


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _experts_pow2(xk, xg, w, s, b, slots, bits, group, out, lut):
    # Row j of x times expert slots[j]'s matrix: one parallel region over (j, row chunk), so a decode
    # step's K experts share one launch instead of one per expert.
    J, per, W = xk.shape
    N = w.shape[1]
    wpg = group // per
    nch = max(1, min(N, 128 // max(J, 1)))
    for c in prange(J * nch):
        j, ch = c // nch, c % nch
        e = slots[j]
        acc = np.empty(W, np.float32)
        for n in range(ch * N // nch, (ch + 1) * N // nch):
            if bits == 4:
                _row4(w[e, n], xk[j], acc)
            elif bits == 2:
                _row2(w[e, n], xk[j], acc)
            else:
                _row8(w[e, n], xk[j], acc)
            out[j, n] = _finish(acc, s[e, n], b[e, n], xg[j], wpg, lut)


def qmm_experts(
    x: np.ndarray,
    w: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
    slots: np.ndarray,
    bits: int,
    group_size: int,
    int8: bool | None = None,
) -> np.ndarray:
    """``out[j] = x[j] @ dequantize(w[slots[j]]).T`` for a stack of experts' weights (a slab).

    Args:
        x: float32 [J, in], one input row per (token, expert) pair.
        w: uint32 codes [S, out, in * bits / 32]; scales, biases [S, out, in / group_size] (bf16 as
            raw uint16, float16 or float32).
        slots: int [J], which of the S matrices row j uses.
        bits: 2, 3, 4 or 8 (float kernels for 3 bits: :func:`qmm` per row).
        int8: as for :func:`qmm`.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if _use_int8(int8, 1, bits, group_size):
        return cpu_int8.qmm_experts_int8(x, w, scales, biases, slots, bits, group_size)
    J, K = x.shape
    out = np.empty((J, w.shape[1]), np.float32)
    if bits == 3 or scales.dtype == np.float16:
        for j in range(J):
            qmm(
                x[j : j + 1],
                w[slots[j]],
                scales[slots[j]],
                biases[slots[j]],
                bits,
                group_size,
                out[j : j + 1],
                int8=False,
            )
        return out
    per = 32 // bits
    xk = np.ascontiguousarray(x.reshape(J, K // per, per).transpose(0, 2, 1))
    _experts_pow2(
        xk,
        _group_sums(x, group_size),
        w.view(np.int32),
        scales,
        biases,
        np.ascontiguousarray(slots, dtype=np.int64),
        bits,
        group_size,
        out,
        _BF16,
    )
    return out


def qmm_experts_pair(
    x: np.ndarray, first: tuple, second: tuple, slots: np.ndarray, bits: int, group_size: int, int8: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One token's ``x [1, in]`` through two stacks of one layout, ``first`` and ``second`` ((w, scales,
    biases) each, as :func:`qmm_experts` takes them): ``([J, out], [J, out])`` for the matrices
    ``slots``. With int8 activations one launch quantizes the row once for both (a decode token's
    expert gate and up projections); otherwise two :func:`qmm_experts` calls."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if _use_int8(int8, 1, bits, group_size):
        return cpu_int8.qmm_experts_pair_int8(x, first, second, slots, bits, group_size)
    xr = np.repeat(x[:1], len(slots), axis=0)
    return (
        qmm_experts(xr, *first, slots, bits, group_size, int8=False),
        qmm_experts(xr, *second, slots, bits, group_size, int8=False),
    )


def qmm_grouped(
    x: np.ndarray,
    w: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
    slots: np.ndarray,
    counts: np.ndarray,
    bits: int,
    group_size: int,
    int8: bool | None = None,
) -> np.ndarray:
    """Rows of ``x`` sorted by expert: ``counts[i]`` consecutive rows times ``dequantize(w[slots[i]]).T``.

    A prefill group's routed experts see a few tokens each (about T * k / E); with int8 activations
    they all go through one launch (:func:`cpu_int8.qmm_grouped_int8`), otherwise each segment
    through :func:`qmm` (BLAS once a segment reaches ``BLAS_MIN_TOKENS``).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    counts = np.asarray(counts, dtype=np.int64)
    if len(counts) and _use_int8(int8, int(counts.max()), bits, group_size):
        return cpu_int8.qmm_grouped_int8(x, w, scales, biases, slots, counts, bits, group_size)
    out = np.empty((x.shape[0], w.shape[1]), np.float32)
    r = 0
    for slot, c in zip(np.asarray(slots).tolist(), counts.tolist()):
        qmm(x[r : r + c], w[slot], scales[slot], biases[slot], bits, group_size, out[r : r + c], int8=int8)
        r += c
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


@njit(fastmath=True, cache=True, nogil=True)
def swiglu_oai(gate: np.ndarray, up: np.ndarray, alpha: float, limit: float) -> np.ndarray:
    """gpt-oss's clamped SwiGLU, in place into ``gate``: gate clipped from above, up to [-limit,
    limit], ``(up + 1) * gate * sigmoid(alpha * gate)`` (mlx-lm's ``swiglu_oai``)."""
    g = gate.reshape(-1)
    u = up.reshape(-1)
    a, lim = np.float32(alpha), np.float32(limit)
    for i in range(g.size):
        v = min(g[i], lim)
        w = min(max(u[i], -lim), lim)
        g[i] = (w + np.float32(1.0)) * (v / (np.float32(1.0) + np.exp(-a * v)))
    return gate


# MXFP4 (MLX's mode="mxfp4", the gpt-oss hub format): 8 FP4 E2M1 codes per uint32, LSB-first, and
# one E8M0 scale byte 2^(s - 127) per 32 inputs.
_FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
_E8M0 = np.append(np.exp2(np.arange(255) - 127.0), np.nan).astype(np.float32)  # 0xFF encodes NaN


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _qmm_mxfp4(x, w, s, lut, e8m0, out):
    T, K = x.shape
    N = w.shape[0]
    for n in prange(N):
        for t in range(T):
            acc = np.float32(0.0)
            for g in range(K // 32):
                part = np.float32(0.0)
                for i in range(4):
                    v = w[n, g * 4 + i]
                    xo = g * 32 + i * 8
                    for k in range(8):
                        part += lut[(v >> (4 * k)) & 15] * x[t, xo + k]
                acc += e8m0[s[n, g]] * part
            out[t, n] = acc


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _dequant_rows_mxfp4(w, s, lut, e8m0, r0, out):
    for j in prange(out.shape[0]):
        n = r0 + j
        for i in range(w.shape[1]):
            v = w[n, i]
            sc = e8m0[s[n, i // 4]]
            for k in range(8):
                out[j, i * 8 + k] = lut[(v >> (4 * k)) & 15] * sc


def qmm_mxfp4(x: np.ndarray, w: np.ndarray, scales: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``x [T, in] @ dequantize(w).T -> [T, out]`` in float32 for MXFP4 weights.

    Args:
        x: float32 activations [T, in].
        w: uint32 codes [out, in / 8] (MLX's mxfp4 layout). scales: uint8 E8M0 [out, in / 32].
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    T = x.shape[0]
    N = w.shape[0]
    out = np.empty((T, N), np.float32) if out is None else out
    w = w.view(np.uint32)
    if T < BLAS_MIN_TOKENS:
        _qmm_mxfp4(x, w, scales, _FP4, _E8M0, out)
        return out
    buf = np.empty((min(BLAS_ROWS, N), x.shape[1]), np.float32)
    for r0 in range(0, N, BLAS_ROWS):
        r1 = min(N, r0 + BLAS_ROWS)
        _dequant_rows_mxfp4(w, scales, _FP4, _E8M0, r0, buf[: r1 - r0])
        np.matmul(x, buf[: r1 - r0].T, out=out[:, r0:r1])
    return out
