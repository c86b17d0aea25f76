"""The CPU decode path (runtime/model/cpu_decode.py): each small operation against the mlx-lm
operation it stands for, whole decoded tokens against mlx-lm's layer code with the same kernels,
the cases it hands back to mlx-lm, and caches never written in place."""

import copy

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from moestream.runtime.cpu import decode_ops as ops
from moestream.runtime.cpu import kernels as cpu_kernels


def _close(got, want, bound=2e-6):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert err < bound, err


# -- the small operations ----------------------------------------------------------------------------
def test_rms_norm_and_gated_norm_match_mlx():
    from mlx_lm.models.qwen3_next import Qwen3NextRMSNormGated

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 96)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, 96).astype(np.float32)
    _close(ops.rms_norm(x, w, 1e-6, np.empty_like(x)), mx.fast.rms_norm(mx.array(x), mx.array(w), 1e-6))
    _close(ops.rms_norm(x, np.zeros(0, np.float32), 1e-3, np.empty_like(x)), mx.fast.rms_norm(mx.array(x), None, 1e-3))
    z = rng.standard_normal((6, 96)).astype(np.float32)
    norm = Qwen3NextRMSNormGated(96, eps=1e-6)
    norm.weight = mx.array(w)
    _close(ops.gated_rms_norm(x, z, w, 1e-6, np.empty_like(x)), norm(mx.array(x), mx.array(z)))


def test_conv_step_matches_the_layers_convolution():
    rng = np.random.default_rng(1)
    C, K = 40, 4
    state = rng.standard_normal((K - 1, C)).astype(np.float32)
    x = rng.standard_normal(C).astype(np.float32)
    w = rng.standard_normal((C, K)).astype(np.float32)
    conv = nn.Conv1d(C, C, K, groups=C, bias=False)
    conv.weight = mx.array(w[..., None])
    window = mx.array(np.concatenate([state, x[None]])[None])
    new, out = np.empty_like(state), np.empty(C, np.float32)
    ops.conv_step_silu(state, x, w, new, out)
    _close(out, nn.silu(conv(window))[0, 0])
    assert np.array_equal(new, np.concatenate([state[1:], x[None]]))


def test_delta_gates_match_mlx_lm():
    from mlx_lm.models.gated_delta import compute_g

    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal(16).astype(np.float32) * 4 for _ in range(2))
    a_log = np.log(rng.uniform(1, 16, 16)).astype(np.float32)
    dt = rng.uniform(0, 2, 16).astype(np.float32)
    beta, g = np.empty(16, np.float32), np.empty(16, np.float32)
    ops.delta_gates(a, b, a_log, dt, beta, g)
    _close(g, compute_g(mx.array(a_log), mx.array(a), mx.array(dt)))
    _close(beta, mx.sigmoid(mx.array(b)))


@pytest.mark.parametrize("gk", [1, 32])
def test_recurrence_step_is_the_sequence_kernel_at_one_token(gk):
    """The one-token recurrence (state rows read once, written once) against the sequence kernel."""
    from moestream.runtime.cpu.delta import _recurrence, recurrence_step

    rng = np.random.default_rng(gk)
    hk, hv, dk, dv = 2, 6, 32, 24
    q, k = (rng.standard_normal((hk, dk)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((hv, dv)).astype(np.float32)
    g = rng.uniform(0.5, 1, (hv, gk)).astype(np.float32)
    beta = rng.uniform(0, 1, hv).astype(np.float32)
    s0 = rng.standard_normal((hv, dv, dk)).astype(np.float32)
    want_s, want_y = np.empty((1, *s0.shape), np.float32), np.empty((1, 1, hv, dv), np.float32)
    _recurrence(q[None, None], k[None, None], v[None, None], g[None, None], beta[None, None], s0[None], want_s,
                np.ones((1, 1), np.bool_), want_y)  # fmt: skip
    got_s, got_y = np.empty_like(s0), np.empty((hv, dv), np.float32)
    recurrence_step(q, k, v, g, beta, s0, got_s, got_y)
    _close(got_s, want_s[0])
    _close(got_y, want_y[0, 0])


@pytest.mark.parametrize("offset", [0, 1, 37, 1000, 70000])
def test_rope_matches_mlx(offset):
    rng = np.random.default_rng(offset)
    x = rng.standard_normal((3, 32)).astype(np.float32)
    rope = nn.RoPE(16, traditional=False, base=1e7)
    want = rope(mx.array(x[None, :, None, :]), offset=offset)[0, :, 0]
    inv = ops.rope_inv_freq(16, 1e7, 1.0)
    _close(ops.rope(x, 16, inv, offset, np.empty_like(x)), want, 2e-5 if offset > 10000 else 2e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_routing_matches_mlx_lm(normalize):
    rng = np.random.default_rng(3)
    logits = rng.standard_normal(64).astype(np.float32) * 3
    gates = mx.softmax(mx.array(logits), axis=-1, precise=True)
    want = np.sort(np.array(mx.argpartition(gates, kth=-8, axis=-1)[-8:]))
    scores = np.array(mx.take_along_axis(gates, mx.array(want), axis=-1))
    if normalize:
        scores = scores / scores.sum()
    inds, got = np.empty(8, np.int64), np.empty(8, np.float32)
    ops.softmax_top_k(logits, 8, normalize, inds, got)
    assert np.array_equal(inds, want)
    _close(got, scores)


# -- whole tokens --------------------------------------------------------------------------------
CONFIG = dict(
    hidden_size=128,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    num_hidden_layers=4,
    vocab_size=512,
    shared_expert_intermediate_size=64,
)


@pytest.fixture(scope="module", params=[4, None], ids=["q4-residents", "default-residents"])
def pack(tmp_path_factory, request):
    """Quantized residents (numba products, shared products) and the converter's default ones."""
    from moestream.convert import convert
    from moestream.convert.tiny import tiny_config, write_tiny_checkpoint

    d = tmp_path_factory.mktemp("decode")
    src = write_tiny_checkpoint(d / "src", tiny_config(**CONFIG), seed=11)
    convert(str(src), d / "p4", bits=4, resident_bits=request.param, alignment=4096)
    return d / "p4"


def _decode(rt, on: bool, prompt: int = 250, steps: int = 12, cache=None):
    """Logits of ``steps`` decoded tokens (fixed token feed) after a ``prompt``-token prefill; the
    KV cache grows past mlx-lm's 256-slot step on the way."""
    from moestream.runtime.model.cpu_decode import set_cpu_decode

    set_cpu_decode(rt.model, on)
    cache = make_prompt_cache(rt.model) if cache is None else cache
    ids = np.random.default_rng(0).integers(0, rt.pack.manifest.config["vocab_size"], prompt + steps)
    mx.eval(rt.model(mx.array(ids[None, :prompt]), cache=cache))
    out = []
    for i in range(steps):
        out.append(np.array(rt.model(mx.array(ids[None, prompt + i : prompt + i + 1]), cache=cache)[0, -1]))
    return np.array(out)


def _fast_calls(rt):
    from moestream.runtime.model.cpu_decode import DecodeLayer

    calls = []
    for layer in rt.model.layers:
        fast = layer._cpu_decode
        assert isinstance(fast, DecodeLayer)
        real = fast.__class__.__call__
        fast.__class__ = type(
            "Counting",
            (DecodeLayer,),
            {"__call__": lambda s, *a, _r=real, **k: calls.append(_r(s, *a, **k)) or calls[-1]},
        )
    return calls


@pytest.mark.parametrize("cache", ["os", "none", "os-map", "lru:64M"])
def test_decoded_tokens_match_mlx_lm_code(pack, cache, monkeypatch):
    """Float32 activations: the decode path and mlx-lm's layer code on the same kernels agree to
    rounding over a dozen tokens (gated-delta state and KV cache carried across them)."""
    from moestream.runtime import load

    monkeypatch.setattr(cpu_kernels, "INT8_ACTIVATIONS", False)
    rt = load(pack, cache=cache, kernels="numba", tokenizer=False)
    try:
        calls = _fast_calls(rt)
        want = _decode(rt, False)
        assert calls == [None] * len(calls)  # declined while off
        got = _decode(rt, True)
        assert sum(c is not None for c in calls) == 12 * 4  # every layer of every decoded token
    finally:
        rt.close()
    _close(got, want, 1e-5)


def test_int8_activations_close_to_mlx_lm_code(pack):
    """With int8 activations each product rounds its input, so a tiny difference upstream can move
    a rounding: the paths agree to the int8 error, not to float rounding."""
    from moestream.runtime import load

    with load(pack, cache="os", kernels="numba", tokenizer=False) as rt:
        want = _decode(rt, False, steps=4)
        got = _decode(rt, True, steps=4)
    _close(got, want, 3e-2)


def test_caches_are_not_written_in_place(pack):
    """A prompt cache's deep copy shares MLX buffers with the live cache (the server keeps such
    copies): decoding on one must leave the other's state as it was."""
    from moestream.runtime import load

    with load(pack, cache="os", kernels="numba", tokenizer=False) as rt:
        cache = make_prompt_cache(rt.model)
        _decode(rt, True, prompt=20, steps=2, cache=cache)
        snap = copy.deepcopy(cache)
        before = [_arrays(c.state) for c in snap]
        assert sum(len(b) for b in before) >= 2 * len(snap)  # each layer's state: KV or conv + recurrent
        for i in range(4):  # the decode path reuses state buffers from its third token on
            mx.eval(rt.model(mx.array([[i + 5]]), cache=cache))
        after = [_arrays(c.state) for c in snap]
    for b, a in zip(before, after):
        for x, y in zip(b, a):
            assert np.array_equal(x, y)


def _arrays(state) -> list[np.ndarray]:
    """A cache's state as numpy copies (ArraysCache's state nests its arrays in a list)."""
    if isinstance(state, mx.array):
        return [np.array(state)]
    if isinstance(state, (list, tuple)):
        return [a for s in state for a in _arrays(s)]
    return []


def test_hands_other_calls_to_mlx_lm(pack, monkeypatch):
    """Several tokens (prefill), and the path turned off by its variable, run mlx-lm's code."""
    from moestream.runtime import load
    from moestream.runtime.model import cpu_decode

    with load(pack, cache="os", kernels="numba", tokenizer=False) as rt:
        calls = _fast_calls(rt)
        cache = make_prompt_cache(rt.model)
        mx.eval(rt.model(mx.array([[1, 2, 3]]), cache=cache))
        assert calls and all(c is None for c in calls)
    monkeypatch.setattr(cpu_decode, "ENABLED", False)
    with load(pack, cache="os", kernels="numba", tokenizer=False) as rt:
        assert not any(hasattr(layer, "_cpu_decode") for layer in rt.model.layers)
    with load(pack, cache="os", kernels="mlx", tokenizer=False) as rt:  # MLX's kernels: not this path
        assert not any(hasattr(layer, "_cpu_decode") for layer in rt.model.layers)


def test_qwen3_next_layers_match_mlx_lm_code(tmp_path, monkeypatch):
    """Qwen3-Next's interleaved gated-delta projections (in_proj_qkvz, in_proj_ba)."""
    families = pytest.importorskip("families", reason="needs the test extras: torch, transformers")
    from moestream.convert import convert
    from moestream.runtime import load

    src = families.save_family(tmp_path, "qwen3_next")
    convert(str(src), tmp_path / "p4", bits=4, alignment=4096)
    monkeypatch.setattr(cpu_kernels, "INT8_ACTIVATIONS", False)
    with load(tmp_path / "p4", cache="os", kernels="numba", tokenizer=False) as rt:
        calls = _fast_calls(rt)
        want = _decode(rt, False, prompt=30, steps=4)
        got = _decode(rt, True, prompt=30, steps=4)
        assert sum(c is not None for c in calls) == 4 * len(rt.model.layers)
    _close(got, want, 1e-5)
