"""The numba CPU kernels against MLX's own dequantize followed by a float64 matmul, on fresh random
inputs; and the runtime with the kernels on against the fully resident MLX model."""

import mlx.core as mx
import numpy as np
import pytest

from moestream.runtime.cpu.kernels import as_f32, qmm, silu_mul


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_qmm_matches_mlx_dequantize(bits, group, tokens):
    rng = np.random.default_rng(bits * 1000 + group * 10 + tokens)
    n, k = int(rng.integers(8, 80)), 256 + 128 * int(rng.integers(0, 3))
    w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.01, 2)
    wq, s, b = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=group, bits=bits)
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    # Reference: MLX's dequantize with the stored scales widened to float32, then float64 matmul.
    deq = np.array(mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=group, bits=bits))
    want = x.astype(np.float64) @ deq.astype(np.float64).T
    got = qmm(
        x,
        np.array(wq),
        as_f32(np.array(s.view(mx.uint16))),
        as_f32(np.array(b.view(mx.uint16))),
        bits,
        group,
        int8=False,
    )
    assert got.shape == (tokens, n)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    # bf16 scales passed as stored (raw uint16), as the expert slabs hold them
    raw = qmm(x, np.array(wq), np.array(s.view(mx.uint16)), np.array(b.view(mx.uint16)), bits, group, int8=False)
    np.testing.assert_allclose(raw, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_scales_in_float32_and_float16():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    for dt in (mx.float32, mx.float16):
        wq, s, b = mx.quantize(mx.array(w).astype(dt), group_size=64, bits=4)
        deq = np.array(mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=64, bits=4))
        got = qmm(x, np.array(wq), as_f32(np.array(s)), as_f32(np.array(b)), 4, 64, int8=False)
        np.testing.assert_allclose(got, x.astype(np.float64) @ deq.T.astype(np.float64), atol=1e-4)


def test_silu_mul():
    rng = np.random.default_rng(1)
    g, u = rng.standard_normal((3, 50)).astype(np.float32), rng.standard_normal((3, 50)).astype(np.float32)
    want = g.astype(np.float64) / (1 + np.exp(-g.astype(np.float64))) * u
    np.testing.assert_allclose(silu_mul(g.copy(), u), want, rtol=1e-5, atol=1e-6)


def test_runtime_with_cpu_kernels_matches_resident(tmp_path, monkeypatch):
    """The float kernels (int8 activations off: their own test is in test_cpu_int8.py)."""
    from moestream.convert import convert
    from moestream.convert.tiny import tiny_config, write_tiny_checkpoint
    from moestream.runtime import generate, load
    from moestream.runtime.cpu import kernels as cpu_kernels
    from moestream.runtime.model.build import load_resident_model
    from moestream.runtime.model.cpu_layers import CpuQuantizedLinear

    monkeypatch.setattr(cpu_kernels, "INT8_ACTIVATIONS", False)
    src = write_tiny_checkpoint(
        tmp_path / "src",
        tiny_config(
            hidden_size=128,
            num_experts=8,
            moe_intermediate_size=64,
            num_hidden_layers=2,
            vocab_size=512,
            shared_expert_intermediate_size=64,
        ),
    )
    for bits in (4, 2):
        convert(str(src), tmp_path / f"p{bits}", bits=bits)
        ref, p = load_resident_model(tmp_path / f"p{bits}", dtype="float32")
        p.close()
        x = mx.array(np.random.default_rng(2).integers(0, 512, (1, 20)))
        want = np.array(ref(x))
        rt = load(tmp_path / f"p{bits}", kernels="numba")
        try:
            lins = [m for _, m in rt.model.named_modules() if isinstance(m, CpuQuantizedLinear)]
            assert lins
            # bf16 scales and biases stay as stored (raw uint16), not cast to float32 with the rest
            assert {m._s.module.dtype for m in lins} == {m._b.module.dtype for m in lins} == {np.dtype(np.uint16)}
            got = np.array(rt.model(x))
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
            toks = [c.token for c in generate(rt, "ab", max_tokens=8, raw=True) if c.token is not None]
        finally:
            rt.close()
        rt = load(tmp_path / f"p{bits}", kernels="mlx")
        try:
            assert toks == [c.token for c in generate(rt, "ab", max_tokens=8, raw=True) if c.token is not None]
        finally:
            rt.close()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qmm_experts_matches_mlx_dequantize(bits):
    """Each row against its own expert's matrix, as MLX dequantizes it (fresh random weights and slots)."""
    from moestream.runtime.cpu.kernels import qmm_experts

    rng = np.random.default_rng(40 + bits)
    S, n, k = 5, 48, 256
    w = rng.standard_normal((S, n, k)).astype(np.float32)
    q = [mx.quantize(mx.array(w[e]).astype(mx.bfloat16), group_size=64, bits=bits) for e in range(S)]
    codes = np.stack([np.array(a) for a, _, _ in q])
    sc = np.stack([np.array(s.view(mx.uint16)) for _, s, _ in q])
    bi = np.stack([np.array(b.view(mx.uint16)) for _, _, b in q])
    slots = np.array([3, 0, 4, 3])
    x = rng.standard_normal((len(slots), k)).astype(np.float32)
    got = qmm_experts(x, codes, sc, bi, slots, bits, 64, int8=False)
    for j, e in enumerate(slots):
        _, s, b = q[e]
        deq = np.array(
            mx.dequantize(mx.array(codes[e]), s.astype(mx.float32), b.astype(mx.float32), group_size=64, bits=bits)
        )
        want = x[j].astype(np.float64) @ deq.astype(np.float64).T
        np.testing.assert_allclose(got[j], want, rtol=0, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("bits", [3, 4])
def test_cpu_linear_float_path_with_bf16_scales(bits):
    """A CPU linear on the float kernel (int8 off, as routers run) with bf16 scales as stored (raw
    uint16, read in place at 3 bits too): equal to MLX's own quantized product."""
    import mlx.nn as nn

    from moestream.runtime.model.cpu_layers import CpuQuantizedLinear

    rng = np.random.default_rng(bits)
    lin = nn.QuantizedLinear.from_linear(nn.Linear(256, 96, bias=False), group_size=64, bits=bits)
    lin.weight = mx.array(rng.integers(0, 2**32, lin.weight.shape, dtype=np.uint32))
    lin.scales = (mx.array(rng.uniform(0.01, 0.02, lin.scales.shape).astype(np.float32))).astype(mx.bfloat16)
    lin.biases = (mx.array(rng.uniform(-0.1, 0.1, lin.biases.shape).astype(np.float32))).astype(mx.bfloat16)
    x = mx.array(rng.standard_normal((1, 256)).astype(np.float32))
    w = mx.dequantize(lin.weight, lin.scales.astype(mx.float32), lin.biases.astype(mx.float32), 64, bits)
    want = np.array(x, np.float64) @ np.array(w, np.float64).T
    cpu = CpuQuantizedLinear(lin)
    cpu.int8 = False
    assert cpu._s.module.dtype == np.uint16
    np.testing.assert_allclose(np.array(cpu(x)), want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert cpu._s.module.dtype == cpu._b.module.dtype == np.uint16  # nothing widened on the way
