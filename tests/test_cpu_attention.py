"""The numpy attention against MLX's own ``mx.fast.scaled_dot_product_attention`` on fresh random
inputs: grouped-query heads, causal masks with and without a cache offset, boolean and additive
masks, query blocks; and the model switch that leaves other models on mlx-lm's function."""

import mlx.core as mx
import numpy as np
import pytest

from moestream.runtime.cpu import attention as cpu_attention
from moestream.runtime.cpu.attention import sdpa
from moestream.runtime.model import cpu_layers
from moestream.runtime.model.patches import patched as rebound


def _qkv(rng, B, Hq, Hk, Lq, Lk, D):
    f = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32))
    return f(B, Hq, Lq, D), f(B, Hk, Lk, D), f(B, Hk, Lk, D)


@pytest.mark.parametrize("B,Hq,Hk,Lq,Lk,D", [(1, 8, 2, 37, 37, 32), (2, 4, 4, 5, 29, 16), (1, 6, 1, 1, 40, 64)])
@pytest.mark.parametrize("mask", [None, "causal", "bool", "additive"])
def test_sdpa_matches_mlx(B, Hq, Hk, Lq, Lk, D, mask, monkeypatch):
    rng = np.random.default_rng(Lq * 100 + Lk + D)
    q, k, v = _qkv(rng, B, Hq, Hk, Lq, Lk, D)
    m = mask
    if mask == "bool":
        m = mx.array(rng.random((Lq, Lk)) < 0.7) | mx.array(np.eye(Lq, Lk, Lk - Lq, dtype=bool))
    elif mask == "additive":
        m = mx.array(rng.standard_normal((B, 1, Lq, Lk)).astype(np.float32))
    monkeypatch.setattr(cpu_attention, "SCORE_BYTES", 4096)  # several query blocks
    got = np.array(sdpa(q, k, v, cache=None, scale=D**-0.5, mask=m))
    want = np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask=m))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_sinks_go_to_mlx_lm():
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, 1, 4, 2, 6, 6, 16)
    sinks = mx.array(rng.standard_normal(4).astype(np.float32))
    got = np.array(sdpa(q, k, v, cache=None, scale=0.25, mask="causal", sinks=sinks))
    want = np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal", sinks=sinks))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_switch_is_per_model():
    from mlx_lm.models import qwen3_next

    args = qwen3_next.ModelArgs(
        model_type="qwen3_next",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=64,
        rms_norm_eps=1e-6,
        linear_num_value_heads=2,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        shared_expert_intermediate_size=32,
        moe_intermediate_size=32,
        mlp_only_layers=[],
        full_attention_interval=2,
        rope_theta=10000.0,
        partial_rotary_factor=0.5,
        max_position_embeddings=128,
    )
    a, b = qwen3_next.Model(args), qwen3_next.Model(args)
    b.update(a.parameters())
    assert cpu_layers.use_cpu_attention(a) == 1 and cpu_layers.use_cpu_attention(a) == 0
    assert not any(rebound(m) for _, m in b.named_modules())
    x = mx.array(np.random.default_rng(0).integers(0, 64, (1, 9)))
    np.testing.assert_allclose(np.array(a(x)), np.array(b(x)), rtol=0, atol=1e-4)
