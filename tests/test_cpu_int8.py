"""The int8-activation decode kernels against MLX's dequantize and an independent numpy model of the
activation rounding, on fresh random inputs."""

import mlx.core as mx
import numpy as np
import pytest

from moestream.runtime.cpu import int8 as cpu_int8
from moestream.runtime.cpu.kernels import qmm, qmm_experts

pytestmark = pytest.mark.skipif(not cpu_int8.available(), reason="int8 kernels need an x86-64 CPU with AVX2")


def _quantized(rng, shape, bits, group, dtype=mx.bfloat16):
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 2)
    wq, s, b = mx.quantize(mx.array(w).astype(dtype), group_size=group, bits=bits)
    deq = np.array(mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=group, bits=bits))
    raw = (lambda a: np.array(a.view(mx.uint16))) if dtype == mx.bfloat16 else np.array
    return (
        np.array(wq),
        raw(s),
        raw(b),
        deq.astype(np.float64),
        np.array(s.astype(mx.float32)).astype(np.float64),
        np.array(b.astype(mx.float32)).astype(np.float64),
    )


def _reference(x, deq, s, b, bits, group):
    """What the kernel computes, written independently: activations rounded to int8 per group
    (scale max|x| / 127), codes centred on (2^bits - 1) / 2 before they meet the rounding."""
    T, K = x.shape
    xg = x.astype(np.float64).reshape(T, K // group, group)
    dx = np.abs(xg).max(-1, keepdims=True) / 127
    xhat = (np.rint(xg / np.where(dx > 0, dx, 1)) * dx).reshape(T, K)
    mid = np.repeat(b + (2**bits - 1) / 2 * s, group, axis=1)  # [N, K]: the middle code's value
    want = xhat @ deq.T + (x - xhat) @ mid.T
    # the rounding error is dx/2 at most per input and meets centred weights |deq - mid|
    bound = (np.repeat(dx.reshape(T, -1), group, axis=1) / 2) @ np.abs(deq - mid).T
    return want, bound


def _need(bits, group):
    if not cpu_int8.supported(bits, group):
        pytest.skip(f"no int8 kernel for {bits}-bit g{group} on this CPU (3 bits need AVX-512 VBMI)")


@pytest.mark.parametrize(
    "bits,group",
    [(4, 64), (4, 32), (4, 128), (2, 64), (2, 128), (3, 32), (3, 64), (3, 128), (8, 32), (8, 64), (8, 128)],
)
@pytest.mark.parametrize("tokens", [1, 7])  # 7: token blocks of 4, 2 and 1
def test_int8_matvec_matches_rounded_reference(bits, group, tokens):
    _need(bits, group)
    rng = np.random.default_rng(bits * 100 + group + tokens)
    n, k = int(rng.integers(8, 90)), 256 * int(rng.integers(1, 4))
    wq, s, b, deq, s64, b64 = _quantized(rng, (n, k), bits, group)
    x = (rng.standard_normal((tokens, k)) * rng.uniform(0.1, 3)).astype(np.float32)
    x[:, rng.integers(0, k)] *= 30  # an outlier channel, as real residual streams have
    got = qmm(x, wq, s, b, bits, group, int8=True)
    want, bound = _reference(x, deq, s64, b64, bits, group)
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-5 * np.abs(want).max())
    exact = x.astype(np.float64) @ deq.T
    assert np.all(np.abs(got - exact) <= bound + 3e-5 * np.abs(exact).max())
    # and the rounding costs ~1% of the product here (the outlier's group loses the most)
    assert np.sqrt(np.mean((got - exact) ** 2) / np.mean(exact**2)) < 0.03


@pytest.mark.parametrize("bits,group", [(2, 64), (4, 32)])
@pytest.mark.parametrize("k", [1024, 640])  # 1024: 16-byte groups paired in 32-byte units; 640: not (10 groups)
def test_int8_paired_and_tail_groups(bits, group, k):
    _need(bits, group)
    assert cpu_int8.groups_per_unit(bits, group, k) == (2 if k % (group * cpu_int8.BLOCK) == 0 else 1)
    rng = np.random.default_rng(bits * 1000 + k)
    wq, s, b, deq, s64, b64 = _quantized(rng, (40, k), bits, group)
    x = (rng.standard_normal((5, k)) * 2).astype(np.float32)
    x[:, 3] *= 30
    want, _ = _reference(x, deq, s64, b64, bits, group)
    np.testing.assert_allclose(qmm(x, wq, s, b, bits, group, int8=True), want, rtol=0, atol=3e-5 * np.abs(want).max())


@pytest.mark.parametrize("dtype", [mx.float16, mx.float32])
def test_int8_with_float16_and_float32_scales(dtype):
    rng = np.random.default_rng(7)
    wq, s, b, deq, s64, b64 = _quantized(rng, (24, 512), 4, 64, dtype)
    x = rng.standard_normal((1, 512)).astype(np.float32)
    want, _ = _reference(x, deq, s64, b64, 4, 64)
    np.testing.assert_allclose(qmm(x, wq, s, b, 4, 64, int8=True), want, rtol=0, atol=3e-5 * np.abs(want).max())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int8_experts_match_each_experts_matrix(bits):
    _need(bits, 64)
    rng = np.random.default_rng(60 + bits)
    S, n, k = 6, 40, 512
    q = [_quantized(rng, (n, k), bits, 64) for _ in range(S)]
    codes, sc, bi = (np.stack([e[i] for e in q]) for i in range(3))
    slots = np.array([5, 1, 1, 3])
    x = rng.standard_normal((len(slots), k)).astype(np.float32)
    got = qmm_experts(x, codes, sc, bi, slots, bits, 64, int8=True)
    # the same experts as strided views with padding between them, as a memory-mapped layer file
    # holds them (block stride > expert size): computed in place, not copied
    pad = lambda a: np.concatenate([a, np.zeros((S, 3, *a.shape[2:]), a.dtype)], axis=1)[:, :n]
    strided = qmm_experts(x, pad(codes), pad(sc), pad(bi), slots, bits, 64, int8=True)
    # Strided and contiguous arrays are two numba specializations: their float epilogues may round
    # an ulp apart (fastmath; seen once in a full run), so not bit for bit. A stride bug gives garbage.
    np.testing.assert_allclose(strided, got, rtol=0, atol=1e-6 * np.abs(got).max())
    for j, e in enumerate(slots):
        want, _ = _reference(x[j : j + 1], q[e][3], q[e][4], q[e][5], bits, 64)
        np.testing.assert_allclose(got[j], want[0], rtol=0, atol=3e-5 * np.abs(want).max())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int8_expert_pairs_match_each_stack_alone(bits):
    """qmm_experts_pair: one token through two stacks (gate and up) in one launch, its row quantized
    once, equal to each stack's own qmm_experts call (slabs and strided, mapped-like views)."""
    from moestream.runtime.cpu.kernels import qmm_experts_pair

    _need(bits, 64)
    rng = np.random.default_rng(70 + bits)
    S, n, k = 5, 48, 512
    stacks = []
    for _ in range(2):
        q = [_quantized(rng, (n, k), bits, 64) for _ in range(S)]
        stacks.append(tuple(np.stack([e[i] for e in q]) for i in range(3)))
    slots = np.array([4, 0, 2])
    x = rng.standard_normal((1, k)).astype(np.float32)
    first, second = qmm_experts_pair(x, stacks[0], stacks[1], slots, bits, 64, int8=True)
    xr = np.repeat(x, len(slots), axis=0)
    for got, st in ((first, stacks[0]), (second, stacks[1])):
        want = qmm_experts(xr, *st, slots, bits, 64, int8=True)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
    pad = lambda a: np.concatenate([a, np.zeros((S, 3, *a.shape[2:]), a.dtype)], axis=1)[:, :n]
    strided = qmm_experts_pair(x, tuple(map(pad, stacks[0])), tuple(map(pad, stacks[1])), slots, bits, 64, int8=True)
    for got, want in zip(strided, (first, second)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
    floats = qmm_experts_pair(x, stacks[0], stacks[1], slots, bits, 64, int8=False)  # two float launches
    for got, st in zip(floats, stacks):
        want = qmm_experts(xr, *st, slots, bits, 64, int8=False)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 64), (4, 128), (2, 64), (3, 64)])
def test_residual_int8_rounds_as_its_model_says(bits, group):
    """int8="residual" (routers): each row is quantized, then what its rounding left is quantized and
    multiplied too, with its exact sums zeroed. The error is (W - M)(r - rhat) for the residual r:
    bounded by half its int8 step, ~1/127 of the one-pass error."""
    _need(bits, group)
    rng = np.random.default_rng(80 + bits)
    n, k = 96, 1024
    wq, s, b, deq, sf, bf = _quantized(rng, (n, k), bits, group)
    x = rng.standard_normal((3, k)).astype(np.float32)
    got = qmm(x, wq, s, b, bits, group, int8="residual")
    xg = x.astype(np.float64).reshape(3, k // group, group)
    d1 = np.abs(xg).max(-1, keepdims=True) / 127
    r = xg - np.rint(xg / d1) * d1
    d2 = (np.abs(r).max(-1, keepdims=True) / 127).reshape(3, -1)
    mid = np.repeat(bf + (2**bits - 1) / 2 * sf, group, axis=1)
    bound = (np.repeat(d2, group, axis=1) / 2) @ np.abs(deq - mid).T
    exact = x.astype(np.float64) @ deq.T
    err = np.abs(got - exact)
    assert np.all(err <= 1.01 * bound + 1e-5 * np.abs(exact).max()), (err / np.maximum(bound, 1e-12)).max()
    one_pass = np.abs(qmm(x, wq, s, b, bits, group, int8=True) - exact).max()
    assert err.max() < one_pass / 20


def test_routers_take_the_residual_products():
    import mlx.nn as nn

    from moestream.runtime.model.cpu_layers import ROUTERS, CpuQuantizedLinear, use_cpu_kernels

    m = nn.Module()
    m.gate = nn.QuantizedLinear(256, 16, bias=False, group_size=64, bits=8)
    m.up_proj = nn.QuantizedLinear(256, 64, bias=False, group_size=64, bits=4)
    use_cpu_kernels(m)
    assert isinstance(m.gate, CpuQuantizedLinear) and "gate" in ROUTERS
    assert m.gate.int8 == "residual" and m.up_proj.int8 is None


@pytest.mark.parametrize("vnni", [False, True])
def test_8bit_sign_trick_and_vnni_paths(vnni, monkeypatch):
    """8-bit codes go through ``vpdpbusd`` where the CPU has VNNI and the sign trick elsewhere: both
    against the rounded reference here (matvec with token blocks, experts, grouped prefill)."""
    if vnni and not cpu_int8.vnni8():
        pytest.skip("this CPU has no VNNI")
    monkeypatch.setattr(cpu_int8, "vnni8", lambda: vnni)
    assert cpu_int8.code_offset(8) == (0.0 if vnni else 128.0)
    rng = np.random.default_rng(800 + vnni)
    for group in (32, 64, 128):
        wq, s, b, deq, s64, b64 = _quantized(rng, (37, 1024), 8, group)
        x = (rng.standard_normal((7, 1024)) * 2).astype(np.float32)
        x[:, 5] *= 30
        want, _ = _reference(x, deq, s64, b64, 8, group)
        tol = 3e-5 * np.abs(want).max()
        np.testing.assert_allclose(qmm(x, wq, s, b, 8, group, int8=True), want, rtol=0, atol=tol)
        stack = [np.stack([a, a[::-1]]) for a in (wq, s, b)]
        got = cpu_int8.qmm_experts_int8(x[:2], *stack, np.array([1, 0]), 8, group)
        np.testing.assert_allclose(got[1], want[1], rtol=0, atol=tol)
        got = cpu_int8.qmm_grouped_int8(x, *stack, np.array([0, 1]), np.array([5, 2]), 8, group)
        np.testing.assert_allclose(got[:5], want[:5], rtol=0, atol=tol)
        flipped, _ = _reference(x[5:], deq[::-1], s64[::-1], b64[::-1], 8, group)
        np.testing.assert_allclose(got[5:], flipped, rtol=0, atol=tol)


def test_widths_without_int8_kernels_stay_exact():
    """2-bit g32 (8 bytes a group), and 3 bits on a CPU without VBMI, keep the float kernels even
    when int8 is asked for."""
    rng = np.random.default_rng(3)
    widths = [(2, 32)] + ([] if cpu_int8.supported(3, 64) else [(3, 64)])
    for bits, group in widths:
        assert not cpu_int8.supported(bits, group)
        wq, s, b, deq, _, _ = _quantized(rng, (16, 256), bits, group)
        x = rng.standard_normal((1, 256)).astype(np.float32)
        want = x.astype(np.float64) @ deq.T
        np.testing.assert_allclose(
            qmm(x, wq, s, b, bits, group, int8=True), want, rtol=0, atol=2e-5 * np.abs(want).max()
        )


def test_decode_with_int8_kernels_stays_close_to_the_resident_model(tmp_path, monkeypatch):
    """Token-by-token decode through the streamed pack (int8 activations in every 2/4-bit product)
    against mlx-lm's resident model on the same weights with MLX's float kernels."""
    from mlx_lm.models.cache import make_prompt_cache

    from moestream.convert import convert
    from moestream.convert.tiny import tiny_config, write_tiny_checkpoint
    from moestream.runtime import load
    from moestream.runtime.cpu import kernels as cpu_kernels
    from moestream.runtime.model.build import load_resident_model

    monkeypatch.setattr(cpu_kernels, "INT8_ACTIVATIONS", True)
    src = write_tiny_checkpoint(
        tmp_path / "src",
        tiny_config(
            hidden_size=256,
            num_experts=8,
            moe_intermediate_size=128,
            num_hidden_layers=2,
            vocab_size=512,
            shared_expert_intermediate_size=128,
        ),
    )
    convert(str(src), tmp_path / "p4", bits=4)
    ref, p = load_resident_model(tmp_path / "p4", dtype="float32")
    p.close()
    x = mx.array(np.random.default_rng(4).integers(0, 512, (1, 12)))
    want = np.array(ref(x)).astype(np.float64)[0]
    rt = load(tmp_path / "p4", kernels="numba")
    try:
        cache = make_prompt_cache(rt.model)
        got = np.concatenate([np.array(rt.model(x[:, i : i + 1], cache=cache))[0] for i in range(x.shape[1])])
    finally:
        rt.close()
    rel = np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2))
    logp = lambda a: a - np.log(np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True)) - a.max(-1, keepdims=True)
    kl = (np.exp(logp(want)) * (logp(want) - logp(got))).sum(-1)
    assert 1e-4 < rel < 0.02, rel  # the float kernels agree to ~1e-6: above 1e-4, the int8 path ran
    assert kl.max() < 1e-3, kl


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_grouped_prefill_rows_match_each_experts_product(bits):
    """A prefill group's experts in one launch: each segment of rows gives what qmv_int8 gives for it
    with that expert's matrix (to a few ulp), and stays within the rounding bound of the exact product."""
    from moestream.runtime.cpu.int8 import qmm_grouped_int8, qmv_int8
    from moestream.runtime.cpu.kernels import qmm_grouped

    _need(bits, 64)
    rng = np.random.default_rng(70 + bits)
    S, n, k = 6, 40, 512
    q = [_quantized(rng, (n, k), bits, 64) for _ in range(S)]
    codes, sc, bi = (np.stack([e[i] for e in q]) for i in range(3))
    slots, counts = np.array([4, 0, 2, 5]), np.array([7, 1, 4, 2])  # blocks of 4, 2, 1 within segments
    x = rng.standard_normal((counts.sum(), k)).astype(np.float32)
    got = qmm_grouped_int8(x, codes, sc, bi, slots, counts, bits, 64)
    np.testing.assert_allclose(
        qmm_grouped(x, codes, sc, bi, slots, counts, bits, 64, int8=True), got, rtol=0, atol=1e-6 * np.abs(got).max()
    )
    r = 0
    for e, c in zip(slots, counts):
        # the same integer sums; the float epilogue may round differently between a kernel compiled
        # in this process and one loaded from numba's cache (fastmath), so to a few ulp
        np.testing.assert_allclose(
            got[r : r + c],
            qmv_int8(x[r : r + c], codes[e], sc[e], bi[e], bits, 64),
            rtol=0,
            atol=1e-6 * np.abs(got).max(),
        )
        want, bound = _reference(x[r : r + c], q[e][3], q[e][4], q[e][5], bits, 64)
        np.testing.assert_allclose(got[r : r + c], want, rtol=0, atol=3e-5 * np.abs(want).max())
        exact = x[r : r + c].astype(np.float64) @ q[e][3].T
        assert np.all(np.abs(got[r : r + c] - exact) <= bound + 3e-5 * np.abs(exact).max())
        r += c
    # the float path (int8 off) computes each segment exactly, up to float32 rounding
    flt = qmm_grouped(x, codes, sc, bi, slots, counts, bits, 64, int8=False)
    r = 0
    for e, c in zip(slots, counts):
        exact = x[r : r + c].astype(np.float64) @ q[e][3].T
        np.testing.assert_allclose(flt[r : r + c], exact, rtol=0, atol=2e-5 * np.abs(exact).max())
        r += c


def test_kernels_come_from_numba_cache_in_a_second_process(tmp_path):
    """A second process loads the compiled kernels instead of compiling them again (numba's cache key
    hashes the pickled intrinsics: with per-process ids every run compiled and added an entry)."""
    import os
    import subprocess
    import sys

    code = """
import numpy as np
from moestream.runtime.cpu import int8 as cpu_int8
k, g = 512, 64
kern = cpu_int8._plan(4, g, k)
w, s = np.zeros((8, k // 8), np.uint32), np.zeros((8, k // g), np.uint16)
x = cpu_int8.quantize_activations(np.ones((1, k), np.float32), 4, g)
kern[0](w, *x, s, s, k // g, np.empty((1, 8), np.float32))
print(sum(kern[0].stats.cache_hits.values()), sum(kern[0].stats.cache_misses.values()))
"""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    first, second = (tuple(map(int, r.stdout.split())) for r in runs)
    assert first == (0, 1) and second == (1, 0), (first, second)
