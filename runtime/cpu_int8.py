"""Decode kernels with int8 activations: integer dot products over 2- and 4-bit MLX-affine codes.

The float kernels in :mod:`moestream.runtime.cpu_kernels` spend ~5 vector instructions per 4-bit
code (shift, mask, int->float, load of the activation, FMA) and reach about 40% of this machine's
memory bandwidth for one token. Here, as in llama.cpp's q4 x q8 dot products, each activation group
is quantized to int8 (scale ``max|x| / 127`` per weight group) and the codes are multiplied as bytes:
``pmaddubsw`` multiplies 32 unsigned codes by 32 signed activations and adds pairs into int16,
``pmaddwd`` adds pairs again into int32: two instructions per 32 codes, plus one mask or shift to
take a field out of each byte. Per row and group,

    y += s_g * dx_g * sum(q * xq) + s_g * e_g + b_g * sum(x),   e_g = c * (sum(x) - dx_g * sum(xq))

with ``c`` the middle code (7.5 at 4 bits): that is ``s * sum((q - c) * xq * dx) + (b + c * s) * sum(x)``,
so the int8 rounding of the activations meets the centred codes ``q - c`` only (uncentred, the
codes' mean would multiply the rounding error, measured 2.7x larger) and the bias sees exact sums.

The row loop is LLVM IR written through numba's ``intrinsic`` (numba has no vector types, and its
integer arithmetic widens to int64, which defeats the vectorizer). It needs AVX2 (x86-64-v3);
:func:`available` says whether this machine has it, and callers fall back to the float kernels.

Activation layout: MLX packs codes LSB-first, so byte ``B`` of a row holds inputs ``B * F + f`` for
fields ``f < F = 8 / bits``. A *unit* is ``V`` bytes of a row (32, or 16 when a group is smaller);
the activations of unit ``u`` are stored field-major, ``xq[u, f, t] = q(x[(u * V + t) * F + f])``,
so field ``f`` of a loaded byte vector meets its activations in one contiguous load.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

I8, I16, I32, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


@functools.cache
def available() -> bool:
    """This CPU runs the int8 kernels (x86-64 with AVX2)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    import llvmlite.binding as ll

    try:
        return bool(ll.get_host_cpu_features().get("avx2", False))
    except Exception:  # unknown host: the float kernels are always right
        return False


def supported(bits: int, group: int) -> bool:
    """Widths the int8 kernels take: 2 and 4 bits, with at least 16 bytes of codes per group."""
    return available() and bits in (2, 4) and group * bits // 8 >= 16 and group * bits // 8 % 16 == 0


def unit_bytes(bits: int, group: int) -> int:
    return min(32, group * bits // 8)


def _splat(builder, vty, value):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(I32, vty.count), [0] * vty.count))


def _load_float(builder, ptr, index, dtype):
    """Element ``index`` of a scale/bias row as float32: bf16 (raw uint16) or float32."""
    v = builder.load(builder.gep(ptr, [index]))
    if dtype == types.uint16:  # bf16 bits -> the upper half of a float32
        return builder.bitcast(builder.shl(builder.zext(v, I32), ir.Constant(I32, 16)), F32)
    return v


def _make_row_dot(bits: int, vbytes: int):
    """``row_dot(w, w_off, xq, dx, s, b, s_off, b_off, xg, eg, groups, units_per_group) -> float32``.

    One row: ``w``'s codes from byte ``w_off`` of its buffer (any layout: offsets come from the
    caller's strides, so memory-mapped expert files with a block stride work as slabs do); ``xq``:
    int8 activations in unit layout; ``dx``, ``xg``, ``eg``: float32 per group (activation scale,
    exact activation sum, the centring term ``e_g``); ``s``, ``b``: the weights' scales and biases,
    the row's first at elements ``s_off`` and ``b_off``.
    """
    fields = 8 // bits
    vi8 = ir.VectorType(I8, vbytes)
    vi16 = ir.VectorType(I16, vbytes // 2)
    vi32 = ir.VectorType(I32, vbytes // 4)
    vf32 = ir.VectorType(F32, vbytes // 4)
    if vbytes == 32:
        maddubs, madd = "llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"
    else:
        maddubs, madd = "llvm.x86.ssse3.pmadd.ub.sw.128", "llvm.x86.sse2.pmadd.wd"

    @intrinsic
    def row_dot(typingctx, w, w_off, xq, dx, s, b, s_off, b_off, xg, eg, groups, upg):
        sig = types.float32(w, w_off, xq, dx, s, b, s_off, b_off, xg, eg, groups, upg)

        def codegen(context, builder, signature, args):
            aw, _, axq, adx, a_s, a_b, _, _, axg, aeg, _, _ = signature.args
            w_, w_off_, xq_, dx_, s_, b_, s_off_, b_off_, xg_, eg_, groups_, upg_ = args
            wp = builder.bitcast(context.make_array(aw)(context, builder, w_).data, I8.as_pointer())
            xp = context.make_array(axq)(context, builder, xq_).data
            dxp = context.make_array(adx)(context, builder, dx_).data
            sp = builder.gep(context.make_array(a_s)(context, builder, s_).data, [s_off_])
            bp = builder.gep(context.make_array(a_b)(context, builder, b_).data, [b_off_])
            xgp = context.make_array(axg)(context, builder, xg_).data
            egp = context.make_array(aeg)(context, builder, eg_).data
            wp = builder.gep(wp, [w_off_])
            mod = builder.module
            f_maddubs = cgutils.get_or_insert_function(mod, ir.FunctionType(vi16, [vi8, vi8]), maddubs)
            f_madd = cgutils.get_or_insert_function(mod, ir.FunctionType(vi32, [vi16, vi16]), madd)
            ones = ir.Constant(vi16, [1] * (vbytes // 2))
            mask = ir.Constant(vi8, [(1 << bits) - 1] * vbytes)
            acc = cgutils.alloca_once_value(builder, ir.Constant(vf32, [0.0] * (vbytes // 4)))
            ysb = cgutils.alloca_once_value(builder, ir.Constant(F32, 0.0))
            with cgutils.for_range(builder, groups_) as gl:
                g = gl.index
                isum = cgutils.alloca_once_value(builder, ir.Constant(vi32, [0] * (vbytes // 4)))
                with cgutils.for_range(builder, upg_) as ul:
                    u = builder.add(builder.mul(g, upg_), ul.index)
                    wv = builder.load(builder.bitcast(builder.gep(wp, [builder.mul(u, ir.Constant(u.type, vbytes))]),
                                                      vi8.as_pointer()), align=1)
                    xbase = builder.mul(u, ir.Constant(u.type, vbytes * fields))
                    p = None
                    for f in range(fields):
                        code = wv if f == 0 else builder.lshr(wv, ir.Constant(vi8, [bits * f] * vbytes))
                        if f < fields - 1:
                            code = builder.and_(code, mask)
                        xv = builder.load(builder.bitcast(
                            builder.gep(xp, [builder.add(xbase, ir.Constant(u.type, f * vbytes))]), vi8.as_pointer()),
                            align=1)
                        prod = builder.call(f_maddubs, [code, xv])  # |.| <= 2 * 15 * 127 per int16 lane
                        p = prod if p is None else builder.add(p, prod)
                    builder.store(builder.add(builder.load(isum), builder.call(f_madd, [p, ones])), isum)
                sg = _load_float(builder, sp, g, a_s.dtype)
                scale = builder.fmul(sg, builder.load(builder.gep(dxp, [g])))
                fv = builder.sitofp(builder.load(isum), vf32)
                builder.store(builder.fadd(builder.load(acc), builder.fmul(fv, _splat(builder, vf32, scale),
                                                                           flags=("fast",)), flags=("fast",)), acc)
                bterm = builder.fmul(_load_float(builder, bp, g, a_b.dtype), builder.load(builder.gep(xgp, [g])))
                sterm = builder.fmul(sg, builder.load(builder.gep(egp, [g])))
                builder.store(builder.fadd(builder.load(ysb), builder.fadd(bterm, sterm)), ysb)
            vec = builder.load(acc)
            total = builder.load(ysb)
            for i in range(vbytes // 4):
                total = builder.fadd(total, builder.extract_element(vec, ir.Constant(I32, i)))
            return total

        return sig, codegen

    return row_dot


_DOT = {(bits, v): _make_row_dot(bits, v) for bits in (2, 4) for v in (16, 32)}
_dot2_16, _dot2_32, _dot4_16, _dot4_32 = _DOT[2, 16], _DOT[2, 32], _DOT[4, 16], _DOT[4, 32]


@njit(fastmath=True, cache=True, nogil=True)
def _quantize_rows(x, group, vbytes, fields, centre, xq, dx, xg, eg):
    # Per row and group: int8 codes round(x / dx), dx = max|x| / 127, in the unit layout; exact sums;
    # the centring term c * (sum(x) - dx * sum(xq)).
    J, K = x.shape
    per_unit = vbytes * fields
    for j in range(J):
        for g in range(K // group):
            m = np.float32(0.0)
            s = np.float32(0.0)
            for i in range(g * group, (g + 1) * group):
                v = x[j, i]
                s += v
                m = max(m, abs(v))
            d = m / np.float32(127.0)
            inv = np.float32(1.0) / d if m > 0 else np.float32(0.0)
            dx[j, g] = d
            xg[j, g] = s
            qs = np.float32(0.0)
            for i in range(g * group, (g + 1) * group):
                u, r = i // per_unit, i % per_unit
                t, f = r // fields, r % fields
                q = np.rint(x[j, i] * inv)
                qs += q
                xq[j, u * per_unit + f * vbytes + t] = np.int8(q)
            eg[j, g] = centre * (s - d * qs)


def quantize_activations(x: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, ...]:
    """``x [J, K]`` float32 -> (int8 codes [J, K] in unit layout, then per group [J, K/group]: scales,
    exact sums, centring terms)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    J, K = x.shape
    xq = np.empty((J, K), np.int8)
    dx, xg, eg = (np.empty((J, K // group), np.float32) for _ in range(3))
    _quantize_rows(x, group, unit_bytes(bits, group), 8 // bits, ((1 << bits) - 1) / 2, xq, dx, xg, eg)
    return xq, dx, xg, eg


def _make_kernels(dot):
    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def matvec(w, xq, dx, xg, eg, s, b, groups, upg, out):
        # out[t, n] for a [N, words] matrix; rows split over threads. Offsets from strides (bytes).
        T = xq.shape[0]
        N = out.shape[1]
        ws, ss, bs = w.strides[0], s.strides[0] // s.itemsize, b.strides[0] // b.itemsize
        nch = min(N, 64)
        for c in prange(nch):
            for n in range(c * N // nch, (c + 1) * N // nch):
                for t in range(T):
                    out[t, n] = dot(w, n * ws, xq[t], dx[t], s, b, n * ss, n * bs, xg[t], eg[t], groups, upg)

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def experts(w, xq, dx, xg, eg, s, b, groups, upg, slots, out):
        # Row j of the activations times matrix slots[j] of a [S, N, words] stack: one launch for all K.
        J = xq.shape[0]
        N = out.shape[1]
        w0, w1 = w.strides[0], w.strides[1]
        s0, s1 = s.strides[0] // s.itemsize, s.strides[1] // s.itemsize
        b0, b1 = b.strides[0] // b.itemsize, b.strides[1] // b.itemsize
        nch = max(1, min(N, 128 // max(J, 1)))
        for c in prange(J * nch):
            j, ch = c // nch, c % nch
            e = slots[j]
            for n in range(ch * N // nch, (ch + 1) * N // nch):
                out[j, n] = dot(w, e * w0 + n * w1, xq[j], dx[j], s, b, e * s0 + n * s1, e * b0 + n * b1, xg[j], eg[j],
                                groups, upg)

    return matvec, experts


_KERNELS = {key: _make_kernels(dot) for key, dot in _DOT.items()}


def _rows(a: np.ndarray) -> np.ndarray:
    """Scales/biases as the kernels read them: float16 widened to float32 (numba has no float16
    arrays); anything else as it lies, strides and all (the last axis must be contiguous)."""
    if a.dtype == np.float16:
        return a.astype(np.float32)
    return a if a.strides[-1] == a.itemsize else np.ascontiguousarray(a)


def qmv_int8(x: np.ndarray, w: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int,
             out: np.ndarray | None = None) -> np.ndarray:
    """``x [T, in] @ dequantize(w).T`` with int8 activations (small T; see :func:`supported`).

    ``w``: uint32 codes [out, in * bits / 32]; ``scales``/``biases``: [out, in / group] as bf16 bits
    (uint16), float16 (widened here) or float32.
    """
    v = unit_bytes(bits, group_size)
    xq, dx, xg, eg = quantize_activations(x, bits, group_size)
    out = np.empty((x.shape[0], w.shape[0]), np.float32) if out is None else out
    _KERNELS[bits, v][0](_rows(w), xq, dx, xg, eg, _rows(scales), _rows(biases), scales.shape[-1],
                         group_size * bits // 8 // v, out)
    return out


def qmm_experts_int8(x: np.ndarray, w: np.ndarray, scales: np.ndarray, biases: np.ndarray, slots: np.ndarray,
                     bits: int, group_size: int) -> np.ndarray:
    """``out[j] = x[j] @ dequantize(w[slots[j]]).T`` for a stack ``w [S, out, in * bits / 32]`` (a slab,
    or a memory-mapped layer file's experts with its block stride)."""
    v = unit_bytes(bits, group_size)
    xq, dx, xg, eg = quantize_activations(x, bits, group_size)
    out = np.empty((x.shape[0], w.shape[1]), np.float32)
    _KERNELS[bits, v][1](_rows(w), xq, dx, xg, eg, _rows(scales), _rows(biases), scales.shape[-1],
                         group_size * bits // 8 // v, np.ascontiguousarray(slots, dtype=np.int64), out)
    return out
