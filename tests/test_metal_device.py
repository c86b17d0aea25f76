"""The Metal expert kernels on a real Metal device (Apple silicon), through ``mx.fast.metal_kernel``:
against ``mx.dequantize`` + float64 matmuls on fresh random inputs (bounds in tests/metal_reference.py),
and a pack streamed with the Metal kernels against the same pack on MLX's kernels.

Skipped elsewhere: on Linux the same kernel text is verified by emulation (tests/test_metal_emulated.py).
Run on a Mac with ``python -m pytest tests/test_metal_device.py``.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from metal_reference import as_np, check, make_experts, ref_down, ref_hidden

from moestream.metal import kernels as K

pytestmark = pytest.mark.skipif(
    not mx.metal.is_available(),
    reason="needs a Metal device (Apple silicon); the kernels are verified by emulation on Linux",
)
GRID = [(bits, gs) for bits in (2, 3, 4, 8) for gs in (32, 64, 128)]


def _run(h, i, k, gate_up, down, x_dtype=mx.float32, scale_dtype=mx.bfloat16, seed=0):
    rng = np.random.default_rng(seed)
    arrays = make_experts(rng, h, i, k + 2, gate_up, down, scale_dtype)
    x = mx.array(rng.standard_normal(h).astype(np.float32)).astype(x_dtype)
    slots = rng.permutation(k + 2)[:k]
    weights = rng.random(k).astype(np.float32)
    sl = mx.array(slots.astype(np.uint32))
    hm, hm_tol = ref_hidden(arrays, slots, as_np(x), gate_up)
    ys, tols, total, total_tol = ref_down(arrays, slots, hm, hm_tol, down, weights)
    y = K.routed_experts(x, arrays, sl, gate_up, down, mx.array(weights))
    assert y.shape == (h,) and y.dtype == x_dtype
    check(as_np(y), total, total_tol, x_dtype)
    per = K.routed_experts(x, arrays, sl, gate_up, down)
    assert per.shape == (k, h)
    check(as_np(per), ys, tols, x_dtype)


@pytest.mark.parametrize("bits,gs", GRID)
def test_bits_and_groups(bits, gs):
    _run(1280, 1152, 3, (bits, gs), (bits, gs), seed=bits * 1000 + gs)


@pytest.mark.parametrize(
    "x_dtype,scale_dtype", [(mx.bfloat16, mx.bfloat16), (mx.float16, mx.float16), (mx.float32, mx.float32)]
)
def test_dtypes(x_dtype, scale_dtype):
    _run(1280, 1152, 3, (4, 64), (4, 64), x_dtype, scale_dtype, seed=3)


@pytest.mark.parametrize(
    "h,i,k,gate_up,down",
    [
        (4096, 1024, 10, (4, 64), (4, 64)),  # Qwen3.5-397B-A17B at K = 10
        (4096, 1024, 10, (2, 64), (2, 64)),
        (128, 96, 8, (4, 64), (4, 32)),
        (256, 64, 4, (2, 128), (8, 64)),
    ],
)
def test_shapes(h, i, k, gate_up, down):
    _run(h, i, k, gate_up, down, seed=h + i + k)


def test_streamed_with_metal_kernels_matches_mlx(tmp_path):
    from moestream.convert import convert
    from moestream.convert.tiny import tiny_config, write_tiny_checkpoint
    from moestream.runtime import generate, load
    from moestream.runtime.model.build import load_resident_model

    cfg = tiny_config(
        hidden_size=128,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        vocab_size=512,
        shared_expert_intermediate_size=64,
    )
    src = write_tiny_checkpoint(tmp_path / "src", cfg, seed=4)
    x = mx.array(np.random.default_rng(1).integers(0, 512, (1, 6)))
    for bits in (4, 3):
        convert(str(src), tmp_path / f"p{bits}", bits=bits, alignment=4096)
        ref, p = load_resident_model(tmp_path / f"p{bits}", dtype="float32")
        p.close()
        want = [np.array(ref(x[:, j : j + 1])) for j in range(x.shape[1])]
        rt = load(tmp_path / f"p{bits}", kernels="metal", dtype="float32")
        try:
            for j in range(x.shape[1]):  # one token per call: the Metal path
                np.testing.assert_allclose(
                    np.array(rt.model(x[:, j : j + 1])), want[j], rtol=0, atol=5e-4 * np.abs(want[j]).max()
                )
            toks = [c.token for c in generate(rt, "ab", max_tokens=8, raw=True) if c.token is not None]
        finally:
            rt.close()
        rt = load(tmp_path / f"p{bits}", kernels="mlx", dtype="float32")
        try:
            assert toks == [c.token for c in generate(rt, "ab", max_tokens=8, raw=True) if c.token is not None]
        finally:
            rt.close()
