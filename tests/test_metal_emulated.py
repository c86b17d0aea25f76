"""The Metal expert kernels, run here by emulation (tests/metal_emu.py: the same ``.metal`` text
compiled as C++), against MLX's ``mx.dequantize`` followed by float64 matmuls, on fresh random inputs,
within float32 accumulation bounds (tests/metal_reference.py); and broken kernels must be caught.
"""

from __future__ import annotations

import shutil
import sys

import mlx.core as mx
import numpy as np
import pytest
from metal_reference import as_np, check, make_experts, ref_down, ref_hidden

from moestream.metal import kernels as K

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or shutil.which("g++") is None, reason="the Metal emulator needs Linux and g++"
)
# Shapes for the bit-width x group-size grid, multiples of every group size: H = 40 units of 32
# inputs (lanes 0-7 of a simdgroup take two), I = 36 units (lanes 0-3 take two); K of 5 slots.
H, I, KE, SLOTS = 1280, 1152, 3, 5
GRID = [(bits, gs) for bits in (2, 3, 4, 8) for gs in (32, 64, 128)]
SHAPES = [
    (4096, 1024, 2, (4, 64), (4, 64)),  # Qwen3.5-397B-A17B's expert shape: 4 units per lane, 17 KB staged
    (256, 128, 10, (3, 64), (3, 64)),  # its K = 10
    (128, 96, 8, (4, 64), (4, 32)),  # I = 96: the converter quantizes down at group 32
    (256, 64, 4, (2, 128), (8, 64)),  # different widths for gate/up and down
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
    (hmid,) = emu.launch(
        first,
        [
            mx.array(x),
            a["gate_proj.weight"],
            a["up_proj.weight"],
            a["gate_proj.scales"],
            a["up_proj.scales"],
            a["gate_proj.biases"],
            a["up_proj.biases"],
            mx.array(slots.astype(np.uint32)),
        ],
    )
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
    (y,) = emu.launch(
        second,
        [
            mx.array(hmid),
            a["down_proj.weight"],
            a["down_proj.scales"],
            a["down_proj.biases"],
            mx.array(slots.astype(np.uint32)),
            mx.array(weights if summed else np.ones(KE, np.float32)),
        ],
    )
    ys, tols, total, total_tol = ref_down(
        arrays, slots, hmid.astype(np.float64), np.zeros((KE, I)), (bits, gs), weights
    )
    if summed:
        assert y.shape == (H,)
        check(as_np(y), total, total_tol)
    else:
        assert y.shape == (KE, H)
        check(as_np(y), ys, tols)


@pytest.mark.parametrize(
    "x_dtype,scale_dtype", [(mx.bfloat16, mx.bfloat16), (mx.float16, mx.float16), (mx.float32, mx.float32)]
)
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


# The emulator is only worth its name if it fails broken kernels: each mutation below must be caught,
# by the emulator itself (error) or by the reference check.
MUTATIONS = {
    "barrier before the staged reads": (
        "common",
        "  }\n  threadgroup_barrier(mem_flags::mem_threadgroup);\n  for (uint u",
        "  }\n  for (uint u",
    ),
    "barrier before restaging (next expert)": (
        "common",
        "  const int stride = MS_STAGE_STRIDE(N);\n  threadgroup_barrier(mem_flags::mem_threadgroup);",
        "  const int stride = MS_STAGE_STRIDE(N);",
    ),
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
        (hmid,) = emu.launch(
            first,
            [
                mx.array(x),
                a["gate_proj.weight"],
                a["up_proj.weight"],
                a["gate_proj.scales"],
                a["up_proj.scales"],
                a["gate_proj.biases"],
                a["up_proj.biases"],
                mx.array(slots.astype(np.uint32)),
            ],
        )
        (y,) = emu.launch(
            second,
            [
                hmid,
                a["down_proj.weight"],
                a["down_proj.scales"],
                a["down_proj.biases"],
                mx.array(slots.astype(np.uint32)),
                mx.array(weights),
            ],
        )
    except RuntimeError as e:
        assert "emulated" in str(e)
        print(f"{name}: {e}")
        return
    with pytest.raises(AssertionError) as e:
        check(as_np(y), total, total_tol)
    print(f"{name}: {e.value}")
