"""Affine group quantization in MLX's layout, by numba kernels.

A weight matrix [rows, cols] is cut into groups of ``group_size`` consecutive values along each
row; every group stores unsigned ``bits``-bit codes q and one (scale, bias) pair, and
dequantizes as ``q * scale + bias``. Codes are packed LSB-first into one little-endian
bitstream per row, which for 2/4/8 bits is MLX's uint32 words and for 3 bits MLX's 3-byte
packs of 8 values; scales and biases are stored in float32, float16 or bfloat16. The output can
therefore be handed to ``mx.quantized_matmul`` / ``mx.gather_qmm`` unchanged.

Two ways to choose (scale, bias) per group:

- ``"rtn"``: MLX's own round-to-nearest rule (``mlx/backend/cpu/quantized.cpp``), reproduced
  operation for operation in float32, so the bytes equal ``mx.quantize`` on the CPU.
- ``"clip"``: a per-group search for the lowest squared error: a grid of shrunken [min, max]
  ranges, then a few alternating least-squares refits of (scale, bias) given the codes. Every
  candidate is scored with scale and bias rounded to the storage dtype, as they will be used.
  MLX's rtn choice is one of the candidates, so a group never gets worse than rtn.

The kernels also accumulate error statistics (see ``errors.ErrorStats``) in the same pass.
They are single-threaded, release the GIL and allocate nothing per group, so a converter can
run one per thread on different tensors.
"""

from __future__ import annotations

import logging

import numpy as np
from numba import njit

from .dtypes import bf16_to_f32
from .errors import ErrorStats

__all__ = [
    "SCALE_DTYPES",
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "METHODS",
    "dequantize",
    "quantize",
    "quantize_with_error",
]

log = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "clip")
# Storage dtype name -> code the kernels branch on.
SCALE_DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}

# "clip" search: each end of the group's [min, max] range moves inwards by one of these
# fractions of rtn's step (max - min) / (2**bits - 1), all pairs tried; the best pair is then
# refined by up to _CLIP_REFITS alternating least-squares refits. Measured on trained experts:
# about one step of shrink is where the gains stop, for every bit width.
_CLIP_GRID = np.linspace(0.0, 1.0, 8).astype(np.float32)
_CLIP_REFITS = 4


# --------------------------------------------------------------------------- scalar helpers


@njit(inline="always")
def _round_bf16(x):
    """float32 -> the float32 value of the nearest bfloat16 (ties to even), MLX's NaN rule."""
    if x != x:
        return np.float32(np.nan)
    u = np.uint64(np.float32(x).view(np.uint32))
    u = (u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))) & np.uint64(0xFFFF0000)
    return np.uint32(u).view(np.float32)


@njit(inline="always")
def _round_f16(x):
    """float32 -> the float32 value of the nearest float16 (ties to even, overflow to inf)."""
    ax = abs(np.float32(x))
    if ax != ax:
        return np.float32(np.nan)
    if ax >= np.float32(65520.0):
        r = np.float32(np.inf)
    elif ax < np.float32(6.103515625e-05):
        # Subnormal float16: a fixed quantum of 2**-24; the scalings by powers of 2 are exact.
        r = np.rint(ax * np.float32(16777216.0)) * np.float32(5.960464477539063e-08)
    else:
        u = np.uint64(np.float32(ax).view(np.uint32))
        u = (u + np.uint64(0xFFF) + ((u >> np.uint64(13)) & np.uint64(1))) & np.uint64(0xFFFFE000)
        r = np.uint32(u).view(np.float32)
    return r if x >= np.float32(0.0) else -r


@njit(inline="always")
def _round_to(x, sdt):
    if sdt == 2:
        return _round_bf16(x)
    if sdt == 1:
        return _round_f16(x)
    return np.float32(x)


@njit(inline="always")
def _pack_group(codes, group_size, bits, wq, row, word0):
    """Append one group's codes to the row's LSB-first bitstream (groups end on word edges)."""
    acc = np.uint64(0)
    nb = np.uint64(0)
    ubits = np.uint64(bits)
    widx = word0
    for j in range(group_size):
        acc |= np.uint64(codes[j]) << nb
        nb += ubits
        if nb >= np.uint64(32):
            wq[row, widx] = np.uint32(acc & np.uint64(0xFFFFFFFF))
            widx += 1
            acc >>= np.uint64(32)
            nb -= np.uint64(32)


@njit(inline="always")
def _codes_and_error(w, row, off, group_size, scale, bias, s_r, b_r, n_bins, codes):
    """Codes from (scale, bias) as MLX computes them; error sums from the stored (s_r, b_r).

    Returns (sum w, sum w^2, sum err^2, max |err|) of the group, in float64.
    """
    zero = np.float32(0.0)
    gw = 0.0
    gw2 = 0.0
    ge2 = 0.0
    gmax = 0.0
    for j in range(group_size):
        x = w[row, off + j]
        q = np.rint((x - bias) / scale)
        q = min(max(q, zero), n_bins)
        codes[j] = np.uint8(q)
        # The dequantized value is float32 (as MLX computes it); its error is taken exactly.
        xd = np.float64(x)
        d = np.float64(q * s_r + b_r) - xd
        gw += xd
        gw2 += xd * xd
        ge2 += d * d
        ad = abs(d)
        if ad > gmax:
            gmax = ad
    return gw, gw2, ge2, gmax


@njit(inline="always")
def _mlx_scale_bias(w, row, off, group_size, n_bins):
    """MLX's CPU rule for one group (quantized.cpp), every step in float32."""
    eps = np.float32(1e-7)
    w_min = np.float32(np.inf)
    w_max = -w_min
    for j in range(group_size):
        x = w[row, off + j]
        w_max = x if w_max < x else w_max  # std::max / std::min argument order
        w_min = x if x < w_min else w_min
    mask = abs(w_min) > abs(w_max)
    scale = (w_max - w_min) / n_bins
    scale = eps if scale < eps else scale
    scale = scale if mask else -scale
    edge = w_min if mask else w_max
    q0 = np.rint(edge / scale)
    bias = np.float32(0.0)
    if q0 != np.float32(0.0):
        scale = edge / q0
        bias = edge
    return scale, bias, w_min, w_max


# --------------------------------------------------------------------------- kernels


@njit(nogil=True, cache=True)
def _rtn_kernel(w, bits, group_size, sdt, wq, scales, biases):
    rows, cols = w.shape
    n_groups = cols // group_size
    n_bins = np.float32((1 << bits) - 1)
    words = group_size * bits // 32
    codes = np.empty(group_size, dtype=np.uint8)
    sw = 0.0
    sw2 = 0.0
    se2 = 0.0
    smax = 0.0
    for r in range(rows):
        for g in range(n_groups):
            off = g * group_size
            scale, bias, _, _ = _mlx_scale_bias(w, r, off, group_size, n_bins)
            s_r = _round_to(scale, sdt)
            b_r = _round_to(bias, sdt)
            gw, gw2, ge2, gmax = _codes_and_error(w, r, off, group_size, scale, bias, s_r, b_r, n_bins, codes)
            _pack_group(codes, group_size, bits, wq, r, g * words)
            scales[r, g] = s_r
            biases[r, g] = b_r
            sw += gw
            sw2 += gw2
            se2 += ge2
            if gmax > smax:
                smax = gmax
    return sw, sw2, se2, smax


@njit(inline="always")
def _usable(s):
    """A scale the search can divide by: non-zero and finite (either sign works)."""
    return s != np.float32(0.0) and abs(s) < np.float32(np.inf)


@njit(inline="always")
def _refit_pass(w, row, off, group_size, s, b, n_bins, sdt, imp):
    """One pass under (s, b), s != 0: the importance-weighted squared error, and the weighted
    least-squares (scale, bias) for the codes that (s, b) assigns, rounded to the storage dtype
    ((0, 0) if degenerate). With unit importance every sum is the plain one, bit for bit."""
    zero = np.float32(0.0)
    inv = np.float32(1.0) / s
    e = np.float32(0.0)
    sv = np.float32(0.0)
    sq = np.float32(0.0)
    sqq = np.float32(0.0)
    sx = np.float32(0.0)
    sqx = np.float32(0.0)
    for j in range(group_size):
        x = w[row, off + j]
        v = imp[off + j]
        q = min(max(np.rint((x - b) * inv), zero), n_bins)
        d = q * s + b - x
        e += v * (d * d)
        sv += v
        sq += v * q
        sqq += v * (q * q)
        sx += v * x
        sqx += v * (q * x)
    n = np.float64(sv)
    det = n * np.float64(sqq) - np.float64(sq) * np.float64(sq)
    if det <= 0.0:
        return e, np.float32(0.0), np.float32(0.0)
    ns = (n * np.float64(sqx) - np.float64(sq) * np.float64(sx)) / det
    nb = (np.float64(sx) - ns * np.float64(sq)) / n
    return e, _round_to(np.float32(ns), sdt), _round_to(np.float32(nb), sdt)


@njit(nogil=True, cache=True)
def _clip_kernel(w, bits, group_size, sdt, wq, scales, biases, grid, refits, imp):
    rows, cols = w.shape
    n_groups = cols // group_size
    n_bins = np.float32((1 << bits) - 1)
    words = group_size * bits // 32
    zero = np.float32(0.0)
    one = np.float32(1.0)
    inf = np.float32(np.inf)
    codes = np.empty(group_size, dtype=np.uint8)
    # Candidate table, reused by every group: slot 0 is rtn's choice, then the grid's pairs.
    # Like MLX, the bias sits on the end of larger magnitude (scale < 0 when that is the top):
    # that end is the one held exactly once the bias is rounded.
    n_cand = 1 + grid.shape[0] * grid.shape[0]
    c_s = np.empty(n_cand, dtype=np.float32)
    c_b = np.empty(n_cand, dtype=np.float32)
    c_inv = np.empty(n_cand, dtype=np.float32)
    c_err = np.empty(n_cand, dtype=np.float32)
    sw = 0.0
    sw2 = 0.0
    se2 = 0.0
    smax = 0.0
    for r in range(rows):
        for g in range(n_groups):
            off = g * group_size
            m_scale, m_bias, lo, hi = _mlx_scale_bias(w, r, off, group_size, n_bins)
            step = (hi - lo) / n_bins
            c_s[0] = _round_to(m_scale, sdt)
            c_b[0] = _round_to(m_bias, sdt)
            k = 1
            low_anchor = abs(lo) > abs(hi)
            for a in range(grid.shape[0]):
                c_lo = lo + step * grid[a]
                for c in range(grid.shape[0]):
                    c_hi = hi - step * grid[c]
                    if low_anchor:
                        c_s[k] = _round_to((c_hi - c_lo) / n_bins, sdt)
                        c_b[k] = _round_to(c_lo, sdt)
                    else:
                        c_s[k] = _round_to((c_lo - c_hi) / n_bins, sdt)
                        c_b[k] = _round_to(c_hi, sdt)
                    k += 1
            for k in range(n_cand):
                ok = _usable(c_s[k])
                c_inv[k] = one / c_s[k] if ok else zero
                c_err[k] = zero if ok else inf
            # Score all candidates together: the inner loop runs across candidates with no
            # loop-carried sum, so it vectorizes without reassociating float adds.
            for j in range(group_size):
                x = w[r, off + j]
                v = imp[off + j]
                for k in range(n_cand):
                    q = min(max(np.rint((x - c_b[k]) * c_inv[k]), zero), n_bins)
                    d = q * c_s[k] + c_b[k] - x
                    c_err[k] += v * (d * d)
            best = 0
            for k in range(1, n_cand):
                if c_err[k] < c_err[best]:
                    best = k
            best_s = c_s[best]
            best_b = c_b[best]
            if _usable(best_s) and refits > 0:
                # Alternate: codes given (scale, bias), then least-squares (scale, bias) given
                # the codes; keep going while the stored-dtype error drops.
                best_e, ns, nb = _refit_pass(w, r, off, group_size, best_s, best_b, n_bins, sdt, imp)
                for _ in range(refits):
                    if not _usable(ns):
                        break
                    e, ns2, nb2 = _refit_pass(w, r, off, group_size, ns, nb, n_bins, sdt, imp)
                    if not e < best_e:
                        break
                    best_e = e
                    best_s = ns
                    best_b = nb
                    ns = ns2
                    nb = nb2
            if _usable(best_s):
                # Codes from the stored values themselves: rint((x - b_r) / s_r).
                gw, gw2, ge2, gmax = _codes_and_error(
                    w, r, off, group_size, best_s, best_b, best_s, best_b, n_bins, codes
                )
            else:
                # Degenerate group (a scale that underflows the dtype): keep rtn's choice,
                # with MLX's codes.
                gw, gw2, ge2, gmax = _codes_and_error(
                    w, r, off, group_size, m_scale, m_bias, best_s, best_b, n_bins, codes
                )
            _pack_group(codes, group_size, bits, wq, r, g * words)
            scales[r, g] = best_s
            biases[r, g] = best_b
            sw += gw
            sw2 += gw2
            se2 += ge2
            if gmax > smax:
                smax = gmax
    return sw, sw2, se2, smax


@njit(nogil=True, cache=True)
def _dequant_kernel(wq, scales, biases, bits, group_size, out):
    rows, cols = out.shape
    n_groups = cols // group_size
    words = group_size * bits // 32
    mask = np.uint64((1 << bits) - 1)
    ubits = np.uint64(bits)
    for r in range(rows):
        for g in range(n_groups):
            s = scales[r, g]
            b = biases[r, g]
            acc = np.uint64(0)
            nb = np.uint64(0)
            widx = g * words
            for j in range(group_size):
                if nb < ubits:
                    acc |= np.uint64(wq[r, widx]) << nb
                    widx += 1
                    nb += np.uint64(32)
                q = np.float32(acc & mask)
                acc >>= ubits
                nb -= ubits
                out[r, g * group_size + j] = q * s + b


# --------------------------------------------------------------------------- public API


def _check(w: np.ndarray, bits: int, group_size: int, scale_dtype: str, method: str) -> np.ndarray:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {tuple(SCALE_DTYPES)}, got {scale_dtype!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [rows, cols], got shape {w.shape}")
    if w.shape[1] % group_size:
        raise ValueError(f"weight of shape {w.shape}: cols {w.shape[1]} is not a multiple of group_size {group_size}")
    if w.dtype != np.float32 or not w.flags.c_contiguous:
        log.debug("copying %s %s weight to C-contiguous float32", w.shape, w.dtype)
        w = np.ascontiguousarray(w, dtype=np.float32)
    return w


def _to_storage(x: np.ndarray, scale_dtype: str) -> np.ndarray:
    """Kernels hand back float32 values already rounded to the dtype: convert exactly."""
    if scale_dtype == "float32":
        return x
    if scale_dtype == "float16":
        return x.astype(np.float16)
    return (x.view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def _from_storage(x: np.ndarray, scale_dtype: str) -> np.ndarray:
    if scale_dtype == "bfloat16":
        x = np.asarray(x)
        if x.dtype != np.uint16:
            raise TypeError(f"bfloat16 scales/biases must be uint16 bits, got {x.dtype}")
        return bf16_to_f32(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def quantize_with_error(
    w: np.ndarray,
    bits: int,
    group_size: int,
    scale_dtype: str = "bfloat16",
    method: str = "rtn",
    importance: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, ErrorStats]:
    """Quantize like ``quantize`` and also return the error of the dequantized result.

    The error is measured in the same pass, with scales and biases as stored (rounded to
    ``scale_dtype``) and the dequantized value computed in float32 as ``q * scale + bias``.

    Args:
        w: [rows, cols] float32 weights (other dtypes/layouts are copied to that first).
        bits: code width, one of SUPPORTED_BITS.
        group_size: values per (scale, bias) pair along a row, one of SUPPORTED_GROUP_SIZES.
        scale_dtype: "float32", "float16" or "bfloat16".
        method: "rtn" (byte-identical to MLX) or "clip" (lower-error search).
        importance: optional [cols] weights, e.g. the mean square of each input channel over
            calibration text (imatrix-style): ``clip`` then minimises sum_j imp_j * err_j^2 per
            group, the diagonal approximation of the layer's output error. ``clip`` only.

    Returns:
        (wq, scales, biases, stats): wq uint32 [rows, cols*bits//32]; scales and biases
        [rows, cols//group_size] as float32, float16, or uint16 bfloat16 bits; ErrorStats.
    """
    w = _check(w, bits, group_size, scale_dtype, method)
    rows, cols = w.shape
    wq = np.empty((rows, cols * bits // 32), dtype=np.uint32)
    scales = np.empty((rows, cols // group_size), dtype=np.float32)
    biases = np.empty_like(scales)
    sdt = SCALE_DTYPES[scale_dtype]
    imp = _importance(importance, cols, method)
    if method == "rtn":
        sw, sw2, se2, smax = _rtn_kernel(w, bits, group_size, sdt, wq, scales, biases)
    else:
        sw, sw2, se2, smax = _clip_kernel(w, bits, group_size, sdt, wq, scales, biases, _CLIP_GRID, _CLIP_REFITS, imp)
    stats = ErrorStats(count=w.size, sum_w=sw, sum_w2=sw2, sum_err2=se2, max_abs_err=smax)
    return wq, _to_storage(scales, scale_dtype), _to_storage(biases, scale_dtype), stats


def _importance(importance: np.ndarray | None, cols: int, method: str) -> np.ndarray:
    """Per-column weights for the clip search: ones without calibration (the plain objective, bit
    for bit); else scaled to mean 1, with a floor so that no column is ignored entirely."""
    if importance is None:
        return np.ones(cols, np.float32)
    if method != "clip":
        raise ValueError(f"importance weights need method 'clip', got {method!r}")
    imp = np.asarray(importance, np.float64).reshape(-1)
    if imp.shape != (cols,) or not np.all(np.isfinite(imp)) or np.any(imp < 0):
        raise ValueError(f"importance must be {cols} finite non-negative values, got shape {imp.shape}")
    mean = imp.mean()
    if mean <= 0:
        return np.ones(cols, np.float32)
    imp = imp / mean
    return np.maximum(imp, 1e-3).astype(np.float32)


def quantize(
    w: np.ndarray,
    bits: int,
    group_size: int,
    scale_dtype: str = "bfloat16",
    method: str = "rtn",
    importance: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine group quantization in MLX's layout.

    With method "rtn" and ``w`` exactly representable in ``scale_dtype``, the result is
    byte-identical to ``mx.quantize(mx.array(w).astype(scale_dtype), group_size, bits)`` on
    MLX's CPU backend.

    Args:
        w: [rows, cols] float32 weights; cols must be a multiple of group_size.
        bits: code width, one of SUPPORTED_BITS.
        group_size: one of SUPPORTED_GROUP_SIZES.
        scale_dtype: "float32", "float16" or "bfloat16".
        method: "rtn" or "clip".
        importance: per-column weights for "clip" (see :func:`quantize_with_error`).

    Returns:
        (wq, scales, biases): wq uint32 [rows, cols*bits//32] (the LSB-first bitstream of each
        row); scales and biases [rows, cols//group_size] as float32, float16, or uint16
        bfloat16 bits.

    Example:
        >>> wq, s, b = quantize(np.ones((2, 64), np.float32), 4, 64)
        >>> wq.shape, s.shape, s.dtype
        ((2, 8), (2, 1), dtype('uint16'))
    """
    wq, scales, biases, _ = quantize_with_error(w, bits, group_size, scale_dtype, method, importance)
    return wq, scales, biases


def dequantize(
    wq: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
    bits: int,
    group_size: int,
    scale_dtype: str = "bfloat16",
) -> np.ndarray:
    """Inverse of ``quantize``: q * scale + bias in float32.

    Args:
        wq: uint32 [rows, cols*bits//32] packed codes.
        scales: [rows, cols//group_size] in ``scale_dtype`` (uint16 bits for bfloat16).
        biases: like scales.
        bits: code width.
        group_size: values per group.
        scale_dtype: "float32", "float16" or "bfloat16".

    Returns:
        float32 [rows, cols]; equals ``mx.dequantize`` given the same scales as float32.
    """
    if bits not in SUPPORTED_BITS or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"unsupported bits={bits} / group_size={group_size}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {tuple(SCALE_DTYPES)}, got {scale_dtype!r}")
    wq = np.ascontiguousarray(wq, dtype=np.uint32)
    s = _from_storage(scales, scale_dtype)
    b = _from_storage(biases, scale_dtype)
    rows = wq.shape[0]
    cols = s.shape[1] * group_size
    if wq.ndim != 2 or wq.shape[1] * 32 != cols * bits or s.shape != (rows, cols // group_size) or b.shape != s.shape:
        raise ValueError(
            f"inconsistent shapes: wq {wq.shape}, scales {s.shape}, biases {b.shape} "
            f"for bits={bits}, group_size={group_size}"
        )
    out = np.empty((rows, cols), dtype=np.float32)
    _dequant_kernel(wq, s, b, bits, group_size, out)
    return out
