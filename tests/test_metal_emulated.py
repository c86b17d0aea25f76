"""The Metal expert kernels, run here by emulation (tests/metal_emu.py: the same ``.metal`` text
compiled as C++), against MLX's ``mx.dequantize`` followed by float64 matmuls, on fresh random inputs.

Tolerances: summing n float32 terms in any order errs by at most n * u * sum|terms| (u = 2^-24;
Higham, Accuracy and Stability, 3.1); the sums of |terms| are computed in float64 from the
dequantized weights (|scale * q| <= |w| + |bias|). SwiGLU and the weighted sum propagate these bounds
to first order; a factor 2 covers the second-order terms and exp's rounding. A wrong bit layout,
group index or row offset errs by the order of the values themselves, far above these bounds.
"""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest

from moestream.metal import kernels as K

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to compile the emulated kernels")
U = 2.0 ** -24
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
    rounding = {mx.float32: U, mx.float16: 2.0 ** -11, mx.bfloat16: 2.0 ** -8}[out_dtype]
    err = np.abs(got - want)
    bound = tol + rounding * np.abs(want)
    assert np.isfinite(got).all(), "NaN in the output: an element never written, or threadgroup memory read unwritten"
    assert (err <= bound).all(), f"max err {err.max():.3g}, worst err/bound {(err / bound).max():.3g}"
    return err


# Shapes for the bit-width x group-size grid, multiples of every group size: H = 40 units of 32
# inputs (lanes 0-7 of a simdgroup take two), I = 36 units (lanes 0-3 take two); K of 5 slots.
H, I, KE, SLOTS = 1280, 1152, 3, 5
GRID = [(bits, gs) for bits in (2, 3, 4, 8) for gs in (32, 64, 128)]
SHAPES = [
    (4096, 1024, 2, (4, 64), (4, 64)),   # Qwen3.5-397B-A17B's expert shape: 4 units per lane, 17 KB staged
    (256, 128, 10, (3, 64), (3, 64)),    # its K = 10
    (128, 96, 8, (4, 64), (4, 32)),      # I = 96: the converter quantizes down at group 32
    (256, 64, 4, (2, 128), (8, 64)),     # different widths for gate/up and down
]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """One emulator, every launch signature of this module compiled in one g++ run."""
    from metal_emu import Emulator

    e = Emulator(tmp_path_factory.mktemp("metal_emu"))
    sigs = []
    gu_in = lambda xd, sd: (xd, mx.uint32, mx.uint32, sd, sd, sd, sd, mx.uint32)  # noqa: E731
    dn_in = lambda sd: (mx.float32, mx.uint32, sd, sd, mx.uint32, mx.float32)  # noqa: E731
    for bits, gs in GRID:
        for summed in (True, False):
            a, b = K.plan(H, I, KE, (bits, gs), (bits, gs), mx.float32, summed)
            sigs += [(a, gu_in(mx.float32, mx.bfloat16)), (b, dn_in(mx.bfloat16))]
    for xd, sd in ((mx.bfloat16, mx.bfloat16), (mx.float16, mx.float16), (mx.float32, mx.float32)):
        a, b = K.plan(H, I, KE, (4, 64), (4, 64), xd, True)
        sigs += [(a, gu_in(xd, sd)), (b, dn_in(sd))]
    for h, i, k, gate_up, down in SHAPES:
        for summed in (True, False):
            a, b = K.plan(h, i, k, gate_up, down, mx.float32, summed)
            sigs += [(a, gu_in(mx.float32, mx.bfloat16)), (b, dn_in(mx.bfloat16))]
    e.prepare(sigs)
    return e


@pytest.mark.parametrize("bits,gs", GRID)
def test_gate_up_swiglu(emu, bits, gs):
    rng = np.random.default_rng(100 * bits + gs)
    arrays = make_experts(rng, H, I, SLOTS, (bits, gs), (bits, gs))
    x = rng.standard_normal(H).astype(np.float32)
    slots = rng.permutation(SLOTS)[:KE]
    first, _ = K.plan(H, I, KE, (bits, gs), (bits, gs), mx.float32, True)
    a = arrays
    (hmid,) = emu.launch(first, [mx.array(x), a["gate_proj.weight"], a["up_proj.weight"], a["gate_proj.scales"],
                                 a["up_proj.scales"], a["gate_proj.biases"], a["up_proj.biases"],
                                 mx.array(slots.astype(np.uint32))])
    want, tol = ref_hidden(arrays, slots, x, (bits, gs))
    check(as_np(hmid), want, tol)


@pytest.mark.parametrize("bits,gs", GRID)
@pytest.mark.parametrize("summed", [True, False])
def test_down_weighted_sum(emu, bits, gs, summed):
    rng = np.random.default_rng(7 * bits + gs + summed)
    arrays = make_experts(rng, H, I, SLOTS, (bits, gs), (bits, gs))
    hmid = rng.standard_normal((KE, I)).astype(np.float32)  # a fresh input, not gate_up's output
    slots = rng.permutation(SLOTS)[:KE]
    weights = rng.random(KE).astype(np.float32)
    _, second = K.plan(H, I, KE, (bits, gs), (bits, gs), mx.float32, summed)
    a = arrays
    (y,) = emu.launch(second, [mx.array(hmid), a["down_proj.weight"], a["down_proj.scales"], a["down_proj.biases"],
                               mx.array(slots.astype(np.uint32)),
                               mx.array(weights if summed else np.ones(KE, np.float32))])
    ys, tols, total, total_tol = ref_down(arrays, slots, hmid.astype(np.float64), np.zeros((KE, I)), (bits, gs),
                                          weights)
    if summed:
        assert y.shape == (H,)
        check(as_np(y), total, total_tol)
    else:
        assert y.shape == (KE, H)
        check(as_np(y), ys, tols)


@pytest.mark.parametrize("x_dtype,scale_dtype", [(mx.bfloat16, mx.bfloat16), (mx.float16, mx.float16),
                                                 (mx.float32, mx.float32)])
def test_routed_experts_dtypes(emu, monkeypatch, x_dtype, scale_dtype):
    """Both dispatches through routed_experts (the runtime's entry), activations and scales in each type."""
    monkeypatch.setattr(K, "launch", emu.launch)
    rng = np.random.default_rng(11)
    arrays = make_experts(rng, H, I, SLOTS, (4, 64), (4, 64), scale_dtype)
    x = mx.array(rng.standard_normal(H).astype(np.float32)).astype(x_dtype)
    slots = rng.permutation(SLOTS)[:KE]
    weights = rng.random(KE).astype(np.float32)
    y = K.routed_experts(x, arrays, mx.array(slots.astype(np.uint32)), (4, 64), (4, 64), mx.array(weights))
    assert y.dtype == x_dtype and y.shape == (H,)
    hm, hm_tol = ref_hidden(arrays, slots, as_np(x), (4, 64))
    _, _, total, total_tol = ref_down(arrays, slots, hm, hm_tol, (4, 64), weights)
    check(as_np(y), total, total_tol, x_dtype)


@pytest.mark.parametrize("h,i,k,gate_up,down", SHAPES)
def test_shapes(emu, monkeypatch, h, i, k, gate_up, down):
    monkeypatch.setattr(K, "launch", emu.launch)
    rng = np.random.default_rng(h + i + k)
    arrays = make_experts(rng, h, i, k + 1, gate_up, down)
    x = rng.standard_normal(h).astype(np.float32)
    slots = rng.permutation(k + 1)[:k]
    weights = rng.random(k).astype(np.float32)
    hm, hm_tol = ref_hidden(arrays, slots, x, gate_up)
    ys, tols, total, total_tol = ref_down(arrays, slots, hm, hm_tol, down, weights)
    sl = mx.array(slots.astype(np.uint32))
    check(as_np(K.routed_experts(mx.array(x), arrays, sl, gate_up, down, mx.array(weights))), total, total_tol)
    check(as_np(K.routed_experts(mx.array(x), arrays, sl, gate_up, down)), ys, tols)


def test_unsupported_shapes():
    assert K.unsupported(4096, 1024, (4, 64), (4, 64)) is None
    assert K.unsupported(7168, 2048, (4, 64), (4, 64)) is None  # 29 KB of threadgroup memory
    assert "threadgroup memory" in K.unsupported(8192, 2048, (4, 64), (4, 64))
    assert "5-bit" in K.unsupported(256, 128, (5, 64), (4, 64))
    assert "group size 64 with 96" in K.unsupported(256, 96, (4, 64), (4, 64))
    with pytest.raises(ValueError, match="Metal expert kernels"):
        K.plan(256, 96, 4, (4, 64), (4, 64), mx.float32, True)


# The emulator is only worth its name if it fails broken kernels: each mutation below must be caught,
# by the emulator itself (error) or by the reference check.
MUTATIONS = {
    "barrier before the staged reads": ("common", "  }\n  threadgroup_barrier(mem_flags::mem_threadgroup);\n  for (uint u",
                                        "  }\n  for (uint u"),
    "barrier before restaging (next expert)": ("common", "  const int stride = MS_STAGE_STRIDE(N);\n  threadgroup_barrier("
                                               "mem_flags::mem_threadgroup);", "  const int stride = MS_STAGE_STRIDE(N);"),
    "3-bit chunk straddling words": ("common", "((w[1] & 0xffffu) << 8)", "((w[1] & 0xffu) << 8)"),
    "row offset of the slot": ("gate_up", "size_t(slots[k]) * I + i0", "size_t(slots[k]) * I"),
    "slot past the slab": ("down", "size_t(slots[k]) * H + row0", "size_t(slots[k] + 1) * H + row0"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_emulator_catches_broken_kernels(tmp_path, name):
    from metal_emu import Emulator

    from moestream.metal.kernels import source

    which, old, new = MUTATIONS[name]
    text = source(which)
    assert text.count(old) == 1, "the mutation no longer applies to the kernel text"
    emu = Emulator(tmp_path, sources={which: text.replace(old, new)})
    h, i, k, slots = 256, 128, 3, np.array([3, 0, 2])
    rng = np.random.default_rng(5)
    arrays = make_experts(rng, h, i, 4, (3, 64), (3, 64))
    x = rng.standard_normal(h).astype(np.float32)
    weights = rng.random(k).astype(np.float32)
    hm, hm_tol = ref_hidden(arrays, slots, x, (3, 64))
    _, _, total, total_tol = ref_down(arrays, slots, hm, hm_tol, (3, 64), weights)
    first, second = K.plan(h, i, k, (3, 64), (3, 64), mx.float32, True)
    a = arrays
    try:
        (hmid,) = emu.launch(first, [mx.array(x), a["gate_proj.weight"], a["up_proj.weight"], a["gate_proj.scales"],
                                     a["up_proj.scales"], a["gate_proj.biases"], a["up_proj.biases"],
                                     mx.array(slots.astype(np.uint32))])
        (y,) = emu.launch(second, [hmid, a["down_proj.weight"], a["down_proj.scales"], a["down_proj.biases"],
                                   mx.array(slots.astype(np.uint32)), mx.array(weights)])
    except RuntimeError as e:
        assert "emulated" in str(e)
        print(f"{name}: {e}")
        return
    with pytest.raises(AssertionError) as e:
        check(as_np(y), total, total_tol)
    print(f"{name}: {e.value}")
