"""Decode kernels with int8 activations: integer dot products over 2-, 3-, 4- and 8-bit MLX-affine codes.

The float kernels in :mod:`moestream.runtime.cpu.kernels` spend ~5 vector instructions per 4-bit code (shift,
mask, int->float, load of the activation, FMA) and reach about a tenth of this machine's memory bandwidth for
one token (4 of 31-38 GB/s, ``benchmarks/kernel_throughput.py``). Here, as in llama.cpp's q4 x q8 dot
products, each activation group is quantized to int8 (scale ``max|x| / 127`` per weight group) and the codes
are multiplied as bytes: ``pmaddubsw`` multiplies 32 unsigned codes by 32 signed activations and adds pairs
into int16, ``pmaddwd`` adds pairs again into int32: two instructions per 32 codes, plus one mask or shift to
take a field out of each byte. 8-bit codes would saturate ``pmaddubsw``'s int16 (two products of 255 * 127),
so they go through ``vpdpbusd`` where the CPU has VNNI (u8 times s8 summed into int32), and otherwise as ``r =
q - 128`` in int8: ``pmaddubsw(|r|, sign(r) * xq)`` is ``r * xq`` with |pairs| <= 2 * 128 * 127, and the
quantizer's centring term adds ``128 * dx * sum(xq)`` back. Each block of groups asks for the codes
``PREFETCH`` bytes ahead (the hardware prefetchers stop at page ends; 8-bit rows ran at half speed without).
Per row and group,

    y += s_g * dx_g * sum(q * xq) + s_g * e_g + b_g * sum(x),   e_g = c * (sum(x) - dx_g * sum(xq))

with ``c`` the middle code (7.5 at 4 bits): that is ``s * sum((q - c) * xq * dx) + (b + c * s) * sum(x)``,
so the int8 rounding of the activations meets the centred codes ``q - c`` only (uncentred, the
codes' mean, not zero, would multiply the rounding error) and the bias sees exact sums.

The row loop is LLVM IR written through numba's ``intrinsic`` (:mod:`.cpu_int8_dot`) (numba has no vector types, and its
integer arithmetic widens to int64, which defeats the vectorizer). It needs AVX2 (x86-64-v3);
:func:`available` says whether this machine has it, and callers fall back to the float kernels.

Activation layout: MLX packs codes LSB-first, so byte ``B`` of a row holds inputs ``B * F + f`` for
fields ``f < F = 8 / bits``. A *unit* is ``V`` bytes of a row (32, or 16 when a group is smaller);
the activations of unit ``u`` are stored field-major, ``xq[u, f, t] = q(x[(u * V + t) * F + f])``,
so field ``f`` of a loaded byte vector meets its activations in one contiguous load. 3-bit codes
(8 in 3 bytes, across byte boundaries) decode through AVX-512 VBMI's bit-field gather to one byte per
code in natural order (one field; see ``cpu_int8_dot._SPREAD3``).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from moestream.runtime.cpu.int8_dot import BLOCK, make_dot
from moestream.runtime.cpu.int8_dot import code_fields as _fields


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


@functools.cache
def _has(feature: str) -> bool:
    import llvmlite.binding as ll

    return available() and bool(ll.get_host_cpu_features().get(feature, False))


def vnni8() -> bool:
    """8-bit codes go through ``vpdpbusd`` (AVX-512 VNNI or AVX-VNNI: unsigned codes times signed
    activations summed into int32, one instruction a unit); otherwise through the sign trick."""
    return _has("avxvnni") or (_has("avx512vnni") and _has("avx512vl"))


def code_offset(bits: int, vnni: bool | None = None) -> float:
    """What the kernel subtracts from each code before its products (the quantizer's centring term
    adds it back): 128 for 8-bit codes on the sign-trick path, which multiplies ``q - 128`` as int8.
    ``vnni``: the 8-bit path (None: this CPU's, :func:`vnni8`)."""
    return 128.0 if bits == 8 and not (vnni8() if vnni is None else vnni) else 0.0


def supported(bits: int, group: int) -> bool:
    """Widths the int8 kernels take: 2, 4 and 8 bits with at least 16 bytes of codes per group, and 3
    bits (groups of 32k) where the CPU has AVX-512 VBMI's bit-field gather (``vpmultishiftqb``)."""
    if bits == 3:
        return _has("avx512vbmi") and _has("avx512vl") and group % 32 == 0
    return available() and bits in (2, 4, 8) and group * bits // 8 >= 16 and group * bits // 8 % 16 == 0


def unit_bytes(bits: int, group: int, k: int | None = None) -> int:
    """Bytes of codes a unit's byte vector holds once decoded (3 bits: 12 bytes decode to 32 codes).
    Groups of 16 bytes share a 32-byte unit with their neighbour (the unit's int32 lanes split
    between the two groups) when rows of ``k`` inputs hold whole blocks of groups: half-width
    vectors ran at half the speed."""
    if bits == 3:
        return 32
    gb = group * bits // 8
    return 32 if gb == 16 and k is not None and k % (group * BLOCK) == 0 else min(32, gb)


def groups_per_unit(bits: int, group: int, k: int | None = None) -> int:
    return 1 if bits == 3 else max(1, unit_bytes(bits, group, k) // (group * bits // 8))


def units_per_group(bits: int, group: int, k: int | None = None) -> int:
    return max(1, group // (unit_bytes(bits, group, k) * _fields(bits)))


@njit(fastmath=True, cache=True, nogil=True)
def _quantize_rows(x, group, vbytes, fields, centre, offset, xq, dx, xg, eg):
    # Per row and group: int8 codes round(x / dx), dx = max|x| / 127, in the unit layout; exact sums;
    # the centring term c * (sum(x) - dx * sum(xq)), plus offset * dx * sum(xq) where the kernel
    # multiplies q - offset (8 bits). A unit may span two groups.
    J, K = x.shape
    per_unit = vbytes * fields
    G = K // group
    inv = np.empty(G, np.float32)
    qs = np.empty(G, np.float32)
    for j in range(J):
        for g in range(G):
            m = np.float32(0.0)
            s = np.float32(0.0)
            for i in range(g * group, (g + 1) * group):
                s += x[j, i]
                m = max(m, abs(x[j, i]))
            d = m / np.float32(127.0)
            inv[g] = np.float32(1.0) / d if m > 0 else np.float32(0.0)
            qs[g] = 0.0
            dx[j, g] = d
            xg[j, g] = s
        xr, out = x[j], xq[j]
        # A unit's codes in runs within one group each (a unit holds one group or several whole
        # ones): one scale a run, the run's codes summed once and stored contiguously (an index
        # and a group lookup per code ran at a third of the speed).
        run = min(vbytes, group // fields)
        for u in range(K // per_unit):
            base = u * per_unit
            for f in range(fields):
                o = base + f * vbytes
                for t0 in range(0, vbytes, run):
                    g = (base + t0 * fields) // group
                    sc = inv[g]
                    acc = np.float32(0.0)
                    for t in range(t0, t0 + run):
                        q = np.rint(xr[base + t * fields + f] * sc)
                        acc += q
                        out[o + t] = np.int8(q)
                    qs[g] += acc
        for g in range(G):
            eg[j, g] = centre * (xg[j, g] - dx[j, g] * qs[g]) + offset * dx[j, g] * qs[g]


@njit(fastmath=True, cache=True, nogil=True)
def _residual_rows(x, group, vbytes, fields, centre, offset, xq, dx, xg, eg):
    # Rows 2j and 2j + 1 of the outputs: x[j] quantized, then what that rounding left of it, r = x -
    # dx * xq, quantized too, its exact sums zeroed: the kernel then gives (W - M) r for that row
    # (M: each group's middle code), and the two rows add up to W x but for (W - M)(r - rhat).
    J, K = x.shape
    per_unit = vbytes * fields
    r = np.empty((1, K), np.float32)
    for j in range(J):
        a, b = 2 * j, 2 * j + 1
        _quantize_rows(
            x[j : j + 1],
            group,
            vbytes,
            fields,
            centre,
            offset,
            xq[a : a + 1],
            dx[a : a + 1],
            xg[a : a + 1],
            eg[a : a + 1],
        )
        for u in range(K // per_unit):
            base = u * per_unit
            for t in range(vbytes):
                for f in range(fields):
                    i = base + t * fields + f
                    r[0, i] = x[j, i] - np.float32(xq[a, base + f * vbytes + t]) * dx[a, i // group]
        _quantize_rows(
            r, group, vbytes, fields, centre, offset, xq[b : b + 1], dx[b : b + 1], xg[b : b + 1], eg[b : b + 1]
        )
        for g in range(K // group):
            eg[b, g] -= centre * xg[b, g]
            xg[b, g] = 0.0


def quantize_activations(x: np.ndarray, bits: int, group: int, vnni: bool | None = None) -> tuple[np.ndarray, ...]:
    """``x [J, K]`` float32 -> (int8 codes [J, K] in unit layout, then per group [J, K/group]: scales,
    exact sums, centring terms for the 8-bit path ``vnni``, as in :func:`code_offset`)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    J, K = x.shape
    xq = np.empty((J, K), np.int8)
    dx, xg, eg = (np.empty((J, K // group), np.float32) for _ in range(3))
    _quantize_rows(
        x,
        group,
        unit_bytes(bits, group, K),
        _fields(bits),
        ((1 << bits) - 1) / 2,
        code_offset(bits, vnni),
        xq,
        dx,
        xg,
        eg,
    )
    return xq, dx, xg, eg


def _make_kernels(dot1, dot2, dot4):
    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def matvec(w, xq, dx, xg, eg, s, b, groups, out):
        # out[t, n] for a [N, words] matrix; rows split over threads, tokens in blocks of 4, 2, 1.
        T, N = out.shape
        ws, ss, bs = w.strides[0], s.strides[0] // s.itemsize, b.strides[0] // b.itemsize
        o = out.reshape(-1)
        nch = min(N, 64)
        for c in prange(nch):
            for n in range(c * N // nch, (c + 1) * N // nch):
                t = 0
                while t + 4 <= T:
                    dot4(w, n * ws, xq, dx, xg, eg, s, b, n * ss, n * bs, groups, t, o, n, N)
                    t += 4
                if t + 2 <= T:
                    dot2(w, n * ws, xq, dx, xg, eg, s, b, n * ss, n * bs, groups, t, o, n, N)
                    t += 2
                if t < T:
                    dot1(w, n * ws, xq, dx, xg, eg, s, b, n * ss, n * bs, groups, t, o, n, N)

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def experts(w, xq, dx, xg, eg, s, b, groups, slots, out):
        # Row j of the activations times matrix slots[j] of a [S, N, words] stack: one launch for all K.
        J, N = out.shape
        w0, w1 = w.strides[0], w.strides[1]
        s0, s1 = s.strides[0] // s.itemsize, s.strides[1] // s.itemsize
        b0, b1 = b.strides[0] // b.itemsize, b.strides[1] // b.itemsize
        o = out.reshape(-1)
        nch = max(1, min(N, 128 // max(J, 1)))
        for c in prange(J * nch):
            j, ch = c // nch, c % nch
            e = slots[j]
            for n in range(ch * N // nch, (ch + 1) * N // nch):
                dot1(w, e * w0 + n * w1, xq, dx, xg, eg, s, b, e * s0 + n * s1, e * b0 + n * b1, groups, j, o, n, N)

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def grouped(w, xq, dx, xg, eg, s, b, groups, seg_slot, seg_start, seg_count, out):
        # Prefill: activation rows sorted by expert, segment i (rows seg_start[i] ..) times matrix
        # seg_slot[i] of the stack; one launch for every expert of a group, and within a segment
        # each row of codes meets its tokens in blocks of 4, 2, 1.
        P, N = out.shape
        S = seg_slot.shape[0]
        w0, w1 = w.strides[0], w.strides[1]
        s0, s1 = s.strides[0] // s.itemsize, s.strides[1] // s.itemsize
        b0, b1 = b.strides[0] // b.itemsize, b.strides[1] // b.itemsize
        o = out.reshape(-1)
        nch = max(1, min(N, 256 // max(S, 1)))
        for c in prange(S * nch):
            i, ch = c // nch, c % nch
            e, first, last = seg_slot[i], seg_start[i], seg_start[i] + seg_count[i]
            for n in range(ch * N // nch, (ch + 1) * N // nch):
                wo, so, bo = e * w0 + n * w1, e * s0 + n * s1, e * b0 + n * b1
                t = first
                while t + 4 <= last:
                    dot4(w, wo, xq, dx, xg, eg, s, b, so, bo, groups, t, o, n, N)
                    t += 4
                if t + 2 <= last:
                    dot2(w, wo, xq, dx, xg, eg, s, b, so, bo, groups, t, o, n, N)
                    t += 2
                if t < last:
                    dot1(w, wo, xq, dx, xg, eg, s, b, so, bo, groups, t, o, n, N)

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def experts_pair(w1, s1, b1, w2, s2, b2, xq, dx, xg, eg, groups, slots, out1, out2):
        # One activation row (row 0) times matrix slots[j] of two stacks (a decode token's gate and
        # up projections): both in one launch, the row quantized once.
        J, N = out1.shape
        o1, o2 = out1.reshape(-1), out2.reshape(-1)
        nch = max(1, min(N, 64 // max(J, 1)))
        for c in prange(2 * J * nch):
            which, r = c // (J * nch), c % (J * nch)
            j, ch = r // nch, r % nch
            e = slots[j]
            if which == 0:
                w0, wr = w1.strides[0], w1.strides[1]
                sa, sr = s1.strides[0] // s1.itemsize, s1.strides[1] // s1.itemsize
                ba, br = b1.strides[0] // b1.itemsize, b1.strides[1] // b1.itemsize
                for n in range(ch * N // nch, (ch + 1) * N // nch):
                    dot1(
                        w1,
                        e * w0 + n * wr,
                        xq,
                        dx,
                        xg,
                        eg,
                        s1,
                        b1,
                        e * sa + n * sr,
                        e * ba + n * br,
                        groups,
                        0,
                        o1,
                        j * N + n,
                        N,
                    )
            else:
                w0, wr = w2.strides[0], w2.strides[1]
                sa, sr = s2.strides[0] // s2.itemsize, s2.strides[1] // s2.itemsize
                ba, br = b2.strides[0] // b2.itemsize, b2.strides[1] // b2.itemsize
                for n in range(ch * N // nch, (ch + 1) * N // nch):
                    dot1(
                        w2,
                        e * w0 + n * wr,
                        xq,
                        dx,
                        xg,
                        eg,
                        s2,
                        b2,
                        e * sa + n * sr,
                        e * ba + n * br,
                        groups,
                        0,
                        o2,
                        j * N + n,
                        N,
                    )

    return matvec, experts, grouped, experts_pair


@functools.cache
def _kernels(bits: int, vbytes: int, gpu: int, upg: int, vnni: bool):
    """(matvec, experts, grouped) for one code width, unit size, groups per unit and units per group."""
    return _make_kernels(*(make_dot(bits, vbytes, nt, gpu, upg, vnni=vnni) for nt in (1, 2, 4)))


def _plan(bits: int, group: int, k: int):
    """The kernel family for rows of ``k`` inputs."""
    return _kernels(
        bits,
        unit_bytes(bits, group, k),
        groups_per_unit(bits, group, k),
        units_per_group(bits, group, k),
        bits == 8 and vnni8(),
    )


def _rows(a: np.ndarray) -> np.ndarray:
    """Scales/biases as the kernels read them: float16 widened to float32 (numba has no float16
    arrays); anything else as it lies, strides and all (the last axis must be contiguous)."""
    if a.dtype == np.float16:
        return a.astype(np.float32)
    return a if a.strides[-1] == a.itemsize else np.ascontiguousarray(a)


def qmv_int8(
    x: np.ndarray,
    w: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
    bits: int,
    group_size: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``x [T, in] @ dequantize(w).T`` with int8 activations (small T; see :func:`supported`).

    ``w``: uint32 codes [out, in * bits / 32]; ``scales``/``biases``: [out, in / group] as bf16 bits
    (uint16), float16 (widened here) or float32.
    """
    kern = _plan(bits, group_size, x.shape[1])
    xq, dx, xg, eg = quantize_activations(x, bits, group_size)
    dst = out if out is not None and out.flags.c_contiguous else np.empty((x.shape[0], w.shape[0]), np.float32)
    kern[0](_rows(w), xq, dx, xg, eg, _rows(scales), _rows(biases), scales.shape[-1], dst)
    if out is not None and dst is not out:
        out[...] = dst
        return out
    return dst


def qmv_int8_residual(
    x: np.ndarray, w: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int
) -> np.ndarray:
    """:func:`qmv_int8` with each row's int8 rounding quantized again and multiplied too (two rows of
    activations against each weight row, read once): the activations' error drops from ~1/254 of a
    group's largest value to ~1/65000. For routers, where a product's rounding could swap two
    near-tied experts; a quarter of the float kernel's time on a 397B router (512 x 4096, 8 bits)."""
    kern = _plan(bits, group_size, x.shape[1])
    x = np.ascontiguousarray(x, dtype=np.float32)
    T, K = x.shape
    xq = np.empty((2 * T, K), np.int8)
    dx, xg, eg = (np.empty((2 * T, K // group_size), np.float32) for _ in range(3))
    _residual_rows(
        x,
        group_size,
        unit_bytes(bits, group_size, K),
        _fields(bits),
        ((1 << bits) - 1) / 2,
        code_offset(bits),
        xq,
        dx,
        xg,
        eg,
    )
    out = np.empty((2 * T, w.shape[0]), np.float32)
    kern[0](_rows(w), xq, dx, xg, eg, _rows(scales), _rows(biases), scales.shape[-1], out)
    return out[0::2] + out[1::2]


def qmm_experts_int8(
    x: np.ndarray, w: np.ndarray, scales: np.ndarray, biases: np.ndarray, slots: np.ndarray, bits: int, group_size: int
) -> np.ndarray:
    """``out[j] = x[j] @ dequantize(w[slots[j]]).T`` for a stack ``w [S, out, in * bits / 32]`` (a slab,
    or a memory-mapped layer file's experts with its block stride)."""
    kern = _plan(bits, group_size, x.shape[1])
    xq, dx, xg, eg = quantize_activations(x, bits, group_size)
    out = np.empty((x.shape[0], w.shape[1]), np.float32)
    kern[1](
        _rows(w),
        xq,
        dx,
        xg,
        eg,
        _rows(scales),
        _rows(biases),
        scales.shape[-1],
        np.ascontiguousarray(slots, dtype=np.int64),
        out,
    )
    return out


def qmm_experts_pair_int8(
    x: np.ndarray, first: tuple, second: tuple, slots: np.ndarray, bits: int, group_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One token ``x [1, in]`` times ``dequantize(w[slots[j]]).T`` for two stacks (``first`` and
    ``second``: (w, scales, biases) of one layout, e.g. the experts' gate and up projections): the
    row quantized once, both products in one launch. Returns ([J, out], [J, out])."""
    kern = _plan(bits, group_size, x.shape[1])
    xq, dx, xg, eg = quantize_activations(x[:1], bits, group_size)
    J, N = len(slots), first[0].shape[1]
    out1, out2 = np.empty((J, N), np.float32), np.empty((J, N), np.float32)
    (w1, s1, b1), (w2, s2, b2) = first, second
    kern[3](
        _rows(w1),
        _rows(s1),
        _rows(b1),
        _rows(w2),
        _rows(s2),
        _rows(b2),
        xq,
        dx,
        xg,
        eg,
        s1.shape[-1],
        np.ascontiguousarray(slots, dtype=np.int64),
        out1,
        out2,
    )
    return out1, out2


def qmm_grouped_int8(
    x: np.ndarray,
    w: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
    seg_slot: np.ndarray,
    seg_count: np.ndarray,
    bits: int,
    group_size: int,
) -> np.ndarray:
    """Rows of ``x`` sorted by expert: the first ``seg_count[0]`` rows times ``dequantize(w[seg_slot[0]]).T``,
    the next ``seg_count[1]`` times ``w[seg_slot[1]]``, and so on (a prefill group's experts in one
    launch; each row's result is what :func:`qmv_int8` gives for it)."""
    kern = _plan(bits, group_size, x.shape[1])
    xq, dx, xg, eg = quantize_activations(x, bits, group_size)
    count = np.ascontiguousarray(seg_count, dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    out = np.empty((x.shape[0], w.shape[1]), np.float32)
    kern[2](
        _rows(w),
        xq,
        dx,
        xg,
        eg,
        _rows(scales),
        _rows(biases),
        scales.shape[-1],
        np.ascontiguousarray(seg_slot, dtype=np.int64),
        start,
        count,
        out,
    )
    return out
