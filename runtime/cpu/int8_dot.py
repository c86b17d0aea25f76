"""The row dot product of :mod:`moestream.runtime.cpu.int8`, written as LLVM IR through numba's
``intrinsic``: one weight row of 2/3/4/8-bit codes against ``nt`` tokens' int8 activations (the
layout and the arithmetic are described there)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import _Intrinsic

I8, I16, I32, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_SOURCE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
BLOCK = 8  # groups whose scale and bias work is done as one vector
PREFETCH = 2048  # bytes of codes ahead that each block asks for (see make_dot)


def code_fields(bits: int) -> int:
    """Codes per byte as the kernels see them (3 bits: one, after the bit-field gather)."""
    return 1 if bits == 3 else 8 // bits


# 3 bits: 8 codes in each 3 bytes, LSB-first. A unit is 12 bytes (32 codes): each 3-byte chunk is
# spread into a qword, and vpmultishiftqb takes byte k of qword q from bits 3k.. of it, so after the
# mask byte i holds code i: the activations stay in natural order (one field).
_SPREAD3 = [3 * (i // 8) + min(i % 8, 2) for i in range(32)]
_SHIFT3 = [3 * (i % 8) for i in range(32)]


def _splat(builder, vty, value):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(
        v, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(I32, vty.count), [0] * vty.count)
    )


def _load_float(builder, ptr, index, dtype):
    """Element ``index`` of a scale/bias row as float32: bf16 (raw uint16) or float32."""
    v = builder.load(builder.gep(ptr, [index]))
    if dtype == types.uint16:  # bf16 bits -> the upper half of a float32
        return builder.bitcast(builder.shl(builder.zext(v, I32), ir.Constant(I32, 16)), F32)
    return v


def _load_floats(builder, ptr, index, dtype, n: int = BLOCK):
    """Elements ``index .. index + n - 1`` of a scale/bias/activation row as a float32 vector."""
    at = builder.gep(ptr, [index])
    if dtype == types.uint16:
        v = builder.load(builder.bitcast(at, ir.VectorType(ir.IntType(16), n).as_pointer()), align=2)
        wide = builder.shl(builder.zext(v, ir.VectorType(I32, n)), ir.Constant(ir.VectorType(I32, n), [16] * n))
        return builder.bitcast(wide, ir.VectorType(F32, n))
    return builder.load(builder.bitcast(at, ir.VectorType(F32, n).as_pointer()), align=4)


def _hsum(builder, vec, lanes: int, total):
    for i in range(lanes):
        total = builder.fadd(total, builder.extract_element(vec, ir.Constant(I32, i)), flags=("fast",))
    return total


def make_dot(
    bits: int, vbytes: int, nt: int, gpu: int = 1, units: int = 1, prefetch: int = PREFETCH, vnni: bool = False
):
    """``dot(w, w_off, xq, dx, xg, eg, s, b, s_off, b_off, groups, t0, out, out_off, out_step)``:
    one weight row against tokens ``t0 .. t0 + nt - 1``, results to ``out[out_off + t * out_step]``.

    ``w``: the codes, the row from byte ``w_off`` of its buffer (any layout: offsets come from the
    caller's strides, so memory-mapped expert files with a block stride work as slabs do). ``xq``
    [T, K]: int8 activations in unit layout; ``dx``, ``xg``, ``eg`` [T, groups]: float32 per group
    (activation scale, exact activation sum, the centring term ``e_g``). ``s``, ``b``: the weights'
    scales and biases, the row's first at elements ``s_off`` and ``b_off``. With ``nt`` tokens each
    byte vector of codes is loaded and split into fields once and meets ``nt`` activation vectors
    (prefill: a routed expert sees a few tokens at a time).

    Groups go in blocks of ``BLOCK``: the block's scales, biases and activation terms are loaded as
    vectors, the bias terms summed by vector FMAs, and each group's integer sums meet one lane of
    ``s * dx``. Per group that leaves the integer products, a convert and one FMA (the scalar
    per-group epilogue had as many instructions as the products). Groups past the last whole block
    take the scalar epilogue. With ``gpu`` groups to a unit (16-byte groups in 32-byte units: the
    caller guarantees whole blocks), lane ``l`` of a unit's sums belongs to its group
    ``l * gpu // lanes``. ``units`` per group is compiled in: a loop of unknown count around
    each group's units cost 3-bit rows 40% of their speed.

    ``prefetch``: each block asks for the cache lines that many bytes ahead of it. Rows are read
    in order, but the hardware prefetchers stop at page ends, and in this VM each new page is a
    TLB walk too: 8-bit rows (a page each) ran at half speed without, the others 5-15% slower.
    ``vnni`` (8 bits only, where the CPU has it): ``vpdpbusd`` instead of the sign trick (the
    quantizer's ``code_offset`` must agree).
    """
    fields = code_fields(bits)
    wbytes = 12 if bits == 3 else vbytes  # bytes of codes a unit loads
    lanes = vbytes // 4
    vi8 = ir.VectorType(I8, vbytes)
    vi16 = ir.VectorType(I16, vbytes // 2)
    vi32 = ir.VectorType(I32, lanes)
    vf32 = ir.VectorType(F32, lanes)
    vblk = ir.VectorType(F32, BLOCK)
    if vbytes == 32:
        maddubs, madd, psign = "llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd", "llvm.x86.avx2.psign.b"
    else:
        maddubs, madd, psign = "llvm.x86.ssse3.pmadd.ub.sw.128", "llvm.x86.sse2.pmadd.wd", "llvm.x86.ssse3.psign.b.128"

    def dot(typingctx, w, w_off, xq, dx, xg, eg, s, b, s_off, b_off, groups, t0, out, out_off, out_step):
        sig = types.void(w, w_off, xq, dx, xg, eg, s, b, s_off, b_off, groups, t0, out, out_off, out_step)

        def codegen(context, builder, signature, args):
            aw, _, axq, adx, axg, aeg, a_s, a_b = signature.args[:8]
            (w_, w_off_, xq_, dx_, xg_, eg_, s_, b_, s_off_, b_off_, groups_, t0_, out_, out_off_, out_step_) = args
            upg_ = ir.Constant(groups_.type, units)
            data = lambda ty, v: context.make_array(ty)(context, builder, v)
            K = builder.extract_value(data(axq, xq_).shape, 1)
            wp = builder.gep(builder.bitcast(data(aw, w_).data, I8.as_pointer()), [w_off_])
            sp = builder.gep(data(a_s, s_).data, [s_off_])
            bp = builder.gep(data(a_b, b_).data, [b_off_])
            # token t's rows of the activation arrays
            rows = [builder.add(t0_, ir.Constant(t0_.type, t)) for t in range(nt)]
            xps = [builder.gep(data(axq, xq_).data, [builder.mul(r, K)]) for r in rows]
            per_group = [
                [builder.gep(data(a, v).data, [builder.mul(r, groups_)]) for r in rows]
                for a, v in ((adx, dx_), (axg, xg_), (aeg, eg_))
            ]
            mod = builder.module
            f_maddubs = cgutils.get_or_insert_function(mod, ir.FunctionType(vi16, [vi8, vi8]), maddubs)
            f_madd = cgutils.get_or_insert_function(mod, ir.FunctionType(vi32, [vi16, vi16]), madd)
            ones = ir.Constant(vi16, [1] * (vbytes // 2))
            if bits == 8 and vnni:
                f_dpbusd = cgutils.get_or_insert_function(
                    mod, ir.FunctionType(vi32, [vi32, vi32, vi32]), f"llvm.x86.avx512.vpdpbusd.{vbytes * 8}"
                )
            elif bits == 8:
                f_abs = cgutils.get_or_insert_function(
                    mod, ir.FunctionType(vi8, [vi8, ir.IntType(1)]), f"llvm.abs.v{vbytes}i8"
                )
                f_sign = cgutils.get_or_insert_function(mod, ir.FunctionType(vi8, [vi8, vi8]), psign)
            f_pf = cgutils.get_or_insert_function(
                mod, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]), "llvm.prefetch.p0i8"
            )
            mask = ir.Constant(vi8, [(1 << bits) - 1] * vbytes)
            if bits == 3:
                f_shift = cgutils.get_or_insert_function(
                    mod, ir.FunctionType(vi8, [vi8, vi8]), "llvm.x86.avx512.pmultishift.qb.256"
                )
                f_mload = cgutils.get_or_insert_function(
                    mod,
                    ir.FunctionType(vi8, [vi8.as_pointer(), I32, ir.VectorType(ir.IntType(1), 32), vi8]),
                    "llvm.masked.load.v32i8.p0v32i8",
                )
            accs = [cgutils.alloca_once_value(builder, ir.Constant(vf32, [0.0] * lanes)) for _ in range(nt)]
            sides = [cgutils.alloca_once_value(builder, ir.Constant(vblk, [0.0] * BLOCK)) for _ in range(nt)]
            ysbs = [cgutils.alloca_once_value(builder, ir.Constant(F32, 0.0)) for _ in range(nt)]
            isums = [cgutils.alloca_once_value(builder, ir.Constant(vi32, [0] * lanes)) for _ in range(nt)]
            # A group's pmaddubsw pairs summed in int16 before one pmaddwd, where they cannot overflow
            # (3 bits g64: 2 units, 2 * 7 * 127 each): one pmaddwd and add fewer per unit.
            short = bits != 8 and 2 * ((1 << bits) - 1) * 127 * fields * units <= 32767
            zeros16 = ir.Constant(vi16, [0] * (vbytes // 2))
            isums16 = [cgutils.alloca_once_value(builder, zeros16) for _ in range(nt)] if short else []

            def integer_sums(first, count):
                """Units ``first ..`` (``count`` <= ``units``) against each token's int8 activations:
                int32 lane sums."""
                for t in range(nt):
                    builder.store(ir.Constant(vi32, [0] * lanes), isums[t])
                    if short:
                        builder.store(zeros16, isums16[t])
                with cgutils.for_range(builder, count) as ul:
                    u = builder.add(first, ul.index)
                    at = builder.gep(wp, [builder.mul(u, ir.Constant(u.type, wbytes))])
                    if bits == 3:  # a masked load of exactly 12 bytes: one instruction, no read past a buffer's end
                        v12 = builder.call(
                            f_mload,
                            [
                                builder.bitcast(at, vi8.as_pointer()),
                                ir.Constant(I32, 1),
                                ir.Constant(ir.VectorType(ir.IntType(1), 32), [1] * 12 + [0] * 20),
                                ir.Constant(vi8, [0] * 32),
                            ],
                        )
                        spread = builder.shuffle_vector(
                            v12, ir.Constant(vi8, ir.Undefined), ir.Constant(ir.VectorType(I32, 32), _SPREAD3)
                        )
                        codes = [builder.and_(builder.call(f_shift, [ir.Constant(vi8, _SHIFT3), spread]), mask)]
                    elif bits == 8 and vnni:
                        wv = builder.load(builder.bitcast(at, vi32.as_pointer()), align=1)
                    elif bits == 8:  # r = q - 128 as int8; pmaddubsw(|r|, sign(r) * xq) = r * xq
                        wv = builder.load(builder.bitcast(at, vi8.as_pointer()), align=1)
                        codes = [builder.xor(wv, ir.Constant(vi8, [-128] * vbytes))]
                        codes.append(builder.call(f_abs, [codes[0], ir.Constant(ir.IntType(1), 0)]))
                    else:
                        wv = builder.load(builder.bitcast(at, vi8.as_pointer()), align=1)
                        codes = []
                        for f in range(fields):
                            code = wv if f == 0 else builder.lshr(wv, ir.Constant(vi8, [bits * f] * vbytes))
                            codes.append(builder.and_(code, mask) if f < fields - 1 else code)
                    xbase = builder.mul(u, ir.Constant(u.type, vbytes * fields))
                    for t in range(nt):
                        acc = builder.load(isums[t])
                        if bits == 8 and vnni:
                            xv = builder.load(builder.bitcast(builder.gep(xps[t], [xbase]), vi32.as_pointer()), align=1)
                            builder.store(builder.call(f_dpbusd, [acc, wv, xv]), isums[t])  # u8 * s8, exact
                            continue
                        if bits == 8:  # |products| <= 2 * 128 * 127: no saturation
                            xv = builder.load(builder.bitcast(builder.gep(xps[t], [xbase]), vi8.as_pointer()), align=1)
                            prod = builder.call(f_maddubs, [codes[1], builder.call(f_sign, [xv, codes[0]])])
                            builder.store(builder.add(acc, builder.call(f_madd, [prod, ones])), isums[t])
                            continue
                        p = None
                        for f in range(fields):
                            xv = builder.load(
                                builder.bitcast(
                                    builder.gep(xps[t], [builder.add(xbase, ir.Constant(u.type, f * vbytes))]),
                                    vi8.as_pointer(),
                                ),
                                align=1,
                            )
                            prod = builder.call(f_maddubs, [codes[f], xv])  # |.| <= 2 * 15 * 127 per int16 lane
                            p = prod if p is None else builder.add(p, prod)
                        if short:
                            builder.store(builder.add(builder.load(isums16[t]), p), isums16[t])
                        else:
                            builder.store(builder.add(acc, builder.call(f_madd, [p, ones])), isums[t])
                if short:
                    for t in range(nt):
                        builder.store(builder.call(f_madd, [builder.load(isums16[t]), ones]), isums[t])
                return [builder.sitofp(builder.load(isums[t]), vf32) for t in range(nt)]

            def fma_acc(t, fv, scale):
                term = builder.fmul(fv, scale, flags=("fast",))
                builder.store(builder.fadd(builder.load(accs[t]), term, flags=("fast",)), accs[t])

            nblk = builder.udiv(groups_, ir.Constant(groups_.type, BLOCK))
            with cgutils.for_range(builder, nblk) as bl:
                g0 = builder.mul(bl.index, ir.Constant(groups_.type, BLOCK))
                if prefetch:
                    blk_bytes = BLOCK * units * wbytes // gpu
                    base = builder.gep(wp, [builder.mul(bl.index, ir.Constant(g0.type, blk_bytes))])
                    for line in range(0, blk_bytes, 64):
                        builder.call(
                            f_pf,
                            [
                                builder.gep(base, [ir.Constant(I32, prefetch + line)]),
                                ir.Constant(I32, 0),
                                ir.Constant(I32, 3),
                                ir.Constant(I32, 1),
                            ],
                        )
                sv, bv = _load_floats(builder, sp, g0, a_s.dtype), _load_floats(builder, bp, g0, a_b.dtype)
                sdx = []
                for t in range(nt):
                    dxv, xgv, egv = (_load_floats(builder, a[t], g0, types.float32) for a in per_group)
                    side = builder.fadd(
                        builder.fmul(bv, xgv, flags=("fast",)), builder.fmul(sv, egv, flags=("fast",)), flags=("fast",)
                    )
                    builder.store(builder.fadd(builder.load(sides[t]), side, flags=("fast",)), sides[t])
                    sdx.append(builder.fmul(sv, dxv, flags=("fast",)))
                for j in range(BLOCK // gpu):
                    if gpu == 1:
                        fvs = integer_sums(builder.mul(builder.add(g0, ir.Constant(g0.type, j)), upg_), upg_)
                    else:
                        u = builder.add(builder.udiv(g0, ir.Constant(g0.type, gpu)), ir.Constant(g0.type, j))
                        fvs = integer_sums(u, ir.Constant(g0.type, 1))
                    which = [j * gpu + l * gpu // lanes for l in range(lanes)]
                    for t in range(nt):
                        lane = builder.shuffle_vector(
                            sdx[t], ir.Constant(vblk, ir.Undefined), ir.Constant(ir.VectorType(I32, lanes), which)
                        )
                        fma_acc(t, fvs[t], lane)
            with cgutils.for_range_slice(
                builder, builder.mul(nblk, ir.Constant(groups_.type, BLOCK)), groups_, ir.Constant(groups_.type, 1)
            ) as (g, _):
                fvs = integer_sums(builder.mul(g, upg_), upg_)
                sg = _load_float(builder, sp, g, a_s.dtype)
                bg = _load_float(builder, bp, g, a_b.dtype)
                for t in range(nt):
                    dxt, xgt, egt = (builder.load(builder.gep(a[t], [g])) for a in per_group)
                    fma_acc(t, fvs[t], _splat(builder, vf32, builder.fmul(sg, dxt)))
                    side = builder.fadd(builder.fmul(bg, xgt), builder.fmul(sg, egt))
                    builder.store(builder.fadd(builder.load(ysbs[t]), side), ysbs[t])
            op = data(signature.args[12], out_).data
            for t in range(nt):
                total = _hsum(builder, builder.load(accs[t]), lanes, builder.load(ysbs[t]))
                total = _hsum(builder, builder.load(sides[t]), BLOCK, total)
                where = builder.add(out_off_, builder.mul(builder.add(t0_, ir.Constant(t0_.type, t)), out_step_))
                builder.store(total, builder.gep(op, [where]))
            return context.get_dummy_value()

        return sig, codegen

    return _Dot(dot, (bits, vbytes, nt, gpu, units, prefetch, vnni))


class _Dot(_Intrinsic):
    """The row dot product as a numba intrinsic that pickles as its parameters and this file's hash.

    numba's cache key for the kernels hashes their closure (the three dots) pickled; a plain
    intrinsic pickles its definition, whose state changes once compiled, so the key never matched:
    every process compiled each width again (2-3 s) and added another entry to the cache."""

    def __init__(self, defn, params: tuple):
        super().__init__("dot", defn)
        self._register()
        self.params = params

    def __reduce__(self):
        return _rebuild, (_SOURCE, self.params)


def _rebuild(source: str, params: tuple) -> _Dot:
    if source != _SOURCE:
        raise RuntimeError("cpu_int8_dot changed since this kernel was pickled")
    return make_dot(*params)
