"""The CPU gated-delta recurrence against mlx-lm's own (ops) implementation, on fresh random inputs."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.gated_delta import gated_delta_ops, gated_delta_update

from moestream.convert.tiny import tiny_config, write_tiny_checkpoint
from moestream.runtime.cpu import delta as cpu_delta
from moestream.runtime.model import cpu_layers


def _inputs(rng, B, T, Hk, Hv, Dk, Dv, vec):
    r = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    g = rng.uniform(0.7, 1.0, (B, T, Hv, Dk) if vec else (B, T, Hv)).astype(np.float32)
    return (
        r(B, T, Hk, Dk) * 0.2,
        r(B, T, Hk, Dk) * 0.2,
        r(B, T, Hv, Dv),
        mx.array(g),
        mx.array(rng.uniform(0, 1, (B, T, Hv)).astype(np.float32)),
        r(B, Hv, Dv, Dk) * 0.1,
    )


@pytest.mark.parametrize(
    "B,T,Hk,Hv,vec,masked",
    [(1, 37, 2, 4, False, False), (2, 9, 2, 2, True, False), (2, 12, 1, 3, False, True), (1, 1, 2, 4, True, False)],
)
def test_recurrence_matches_mlx_lm(B, T, Hk, Hv, vec, masked):
    rng = np.random.default_rng(T * 10 + Hv)
    q, k, v, g, beta, state = _inputs(rng, B, T, Hk, Hv, 32, 16, vec)
    mask = None
    if masked:  # left padding on the second sequence, as batched prompts have
        m = np.ones((B, T), bool)
        m[1, :5] = False
        mask = mx.array(m)
    y_ref, s_ref = gated_delta_ops(q, k, v, g, beta, state, mask)
    state_before = np.array(state)
    y, s = cpu_delta.recurrence(q, k, v, g, beta, state, mask)
    assert y.shape == y_ref.shape and s.shape == s_ref.shape
    np.testing.assert_allclose(np.array(y), np.array(y_ref), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(s), np.array(s_ref), rtol=1e-4, atol=1e-5)
    assert float(mx.abs(y_ref).max()) > 0.1  # not a comparison of zeros
    # The kernel reads the state in place and writes a new array: the caller's state is untouched,
    # and a second step from the same state gives the same result in a buffer of its own.
    np.testing.assert_array_equal(np.array(state), state_before)
    y2, s2 = cpu_delta.recurrence(q, k, v, g, beta, state, mask)
    np.testing.assert_array_equal(np.array(s2), np.array(s))
    assert np.asarray(memoryview(s2)).ctypes.data != np.asarray(memoryview(s)).ctypes.data


def test_update_signature_and_options_match():
    rng = np.random.default_rng(3)
    q, k, v, _, _, state = _inputs(rng, 1, 8, 2, 4, 32, 16, False)
    a, b = (
        mx.array(rng.standard_normal((1, 8, 4)).astype(np.float32)),
        mx.array(rng.standard_normal((1, 8, 4)).astype(np.float32)),
    )
    A_log, dt_bias = (
        mx.array(rng.standard_normal(4).astype(np.float32)),
        mx.array(rng.standard_normal(4).astype(np.float32)),
    )
    for kw in ({}, {"allow_neg_eigval": True}, {"lower_bound": -5.0}):
        for st in (None, state):
            y_ref, s_ref = gated_delta_update(q, k, v, a, b, A_log, dt_bias, st, None, **kw)
            y, s = cpu_delta.gated_delta_update(q, k, v, a, b, A_log, dt_bias, st, None, **kw)
            np.testing.assert_allclose(np.array(y), np.array(y_ref), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(np.array(s), np.array(s_ref), rtol=1e-4, atol=1e-5)


def test_only_the_given_model_is_switched(tmp_path):
    """The evaluation reference and mlx-lm's baseline live in the same process and keep mlx-lm's code."""
    from mlx_lm.utils import load_model

    cfg = tiny_config(
        hidden_size=64,
        num_experts=4,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        vocab_size=256,
        shared_expert_intermediate_size=32,
    )
    src = write_tiny_checkpoint(tmp_path / "src", cfg)
    from moestream.runtime.model.build import cast_floats

    ours, _ = load_model(src)
    theirs, _ = load_model(src)
    for m in (ours, theirs):  # MLX's CPU gather_mm takes float32 only
        m.update(cast_floats(m.parameters(), mx.float32))
    assert cpu_layers.use_cpu_delta(ours) >= 1
    assert cpu_layers.use_cpu_delta(ours) == 0  # idempotent
    kinds = {type(m).__name__ for _, m in theirs.named_modules()}
    assert not any(k.startswith("Cpu") for k in kinds)
    x = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    want = np.array(theirs(x))
    np.testing.assert_allclose(np.array(ours(x)), want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_depthwise_conv_matches_mlx():
    import mlx.nn as nn

    rng = np.random.default_rng(5)
    conv = nn.Conv1d(48, 48, 4, groups=48, bias=False)
    conv.weight = mx.array(rng.standard_normal((48, 4, 1)).astype(np.float32))
    x = mx.array(rng.standard_normal((2, 19, 48)).astype(np.float32))
    assert cpu_layers._is_depthwise(conv) and not cpu_layers._is_depthwise(nn.Conv1d(48, 48, 4, bias=False))
    np.testing.assert_allclose(
        np.array(cpu_layers.CpuDepthwiseConv1d(conv)(x)), np.array(conv(x)), rtol=1e-5, atol=1e-5
    )
