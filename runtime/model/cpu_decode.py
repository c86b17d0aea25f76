"""The CPU decode path: one token through a Qwen3.5 / Qwen3-Next decoder layer in numpy.

With MLX on the CPU, a decoded token's layer is a few milliseconds of memory-bound products and, on
mlx-lm's code, ~15 MLX evaluations besides (every conversion of an MLX array to numpy for a numba
kernel evaluates the lazy graph before it: the norms, rope, gates, the router's softmax and top-k),
each tens of microseconds of scheduling for a few kilobytes of work. At 40-60 layers that cost more
than the products. Here a layer's token stays in numpy from its input to its output: the same
quantized kernels (:class:`~.cpu_layers.CpuQuantizedLinear`, shared products), the same expert
streaming (:meth:`~.streamed.StreamedSwitchGLU.decode_numpy`), the small operations as numba loops
(:mod:`moestream.runtime.cpu.decode_ops`), one MLX array made at the layer's end, and the router's
choice read on the host with no MLX evaluation at all.

The layer keeps mlx-lm's caches as mlx-lm's code leaves them: the linear-attention state as a new MLX
array each step (never written in place: a prompt cache's deep copy shares its buffer), the KV cache
through its own ``update_and_fetch``. Anything this path does not take (several tokens, a mask,
batched caches, another cache type, another dtype, calibration recorders) goes to mlx-lm's code:
:func:`use_cpu_decode` diverts each layer's call (:func:`~.patches.divert_call`), the fast path
declines with None. ``MOESTREAM_CPU_DECODE=0`` turns it off; ``tests/test_cpu_decode.py`` checks it
against mlx-lm's code with the same kernels.
"""

from __future__ import annotations

import logging
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moestream.runtime.cpu import decode_ops as ops
from moestream.runtime.cpu.delta import recurrence_step
from moestream.runtime.cpu.kernels import silu_mul
from moestream.runtime.model.cpu_layers import CpuDepthwiseConv1d, CpuQuantizedLinear
from moestream.runtime.model.patches import divert_call
from moestream.runtime.model.profile import region, to_numpy
from moestream.runtime.model.streamed import EarlySharedExpert, StreamedSwitchGLU

log = logging.getLogger(__name__)

ENABLED = os.environ.get("MOESTREAM_CPU_DECODE", "1") != "0"
_NO_WEIGHT = np.zeros(0, np.float32)


def _f32(a: mx.array) -> np.ndarray:
    """A small parameter as a contiguous float32 numpy copy (bound once)."""
    return np.ascontiguousarray(np.array(a.astype(mx.float32)), dtype=np.float32)


def _view(a: mx.array) -> np.ndarray:
    """An MLX array's memory as numpy (no copy; evaluated first if it is not yet)."""
    mx.eval(a)
    return np.asarray(memoryview(a))


def _products(lins: list, xs: np.ndarray) -> list[np.ndarray]:
    """Each linear's output for ``xs [1, in]``: members of one shared product (``shared_input``)
    computed by one call of their concatenated matrix, sliced; unquantized linears (a router kept
    in float) through BLAS."""
    out: list = [None] * len(lins)
    done: dict[int, np.ndarray] = {}
    for i, lin in enumerate(lins):
        if not isinstance(lin, CpuQuantizedLinear):
            with region("products"):
                out[i] = xs @ _view(lin.weight).T
        elif lin.shared is not None:
            group, r0, r1 = lin.shared.module
            if id(group) not in done:
                done[id(group)] = group.fused.numpy(xs)
            out[i] = done[id(group)][:, r0:r1]
        else:
            out[i] = lin.numpy(xs)
    return out


def _is_cpu_linear(m) -> bool:
    """A linear this path computes: a CPU quantized one, or an unquantized float32 one, without bias."""
    if isinstance(m, CpuQuantizedLinear):
        return "bias" not in m.inner
    return type(m) is nn.Linear and "bias" not in m and m.weight.dtype == mx.float32


def _norm(m) -> bool:
    return type(m) is nn.RMSNorm


class _Mlp:
    """A plain SwiGLU MLP (Qwen3-Next's dense layers, the MoE blocks' shared expert)."""

    def __init__(self, mlp):
        self.gate, self.up, self.down = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    @staticmethod
    def takes(mlp) -> bool:
        return all(_is_cpu_linear(getattr(mlp, p, None)) for p in ("gate_proj", "up_proj", "down_proj"))

    def linears(self) -> list:
        return [self.gate, self.up, self.down]

    def __call__(self, xs: np.ndarray) -> np.ndarray:
        g, u = _products([self.gate, self.up], xs)
        with region("products"):
            mid = silu_mul(np.ascontiguousarray(g), u)
        return _products([self.down], mid)[0]


class _Moe:
    """Qwen3-Next's sparse MoE block: router, top-k, streamed experts, gated shared expert."""

    def __init__(self, block):
        self.block = block
        self.switch: StreamedSwitchGLU = block.switch_mlp
        self.shared = _Mlp(block.shared_expert.inner)

    @staticmethod
    def takes(block) -> bool:
        from mlx_lm.models.qwen3_next import Qwen3NextSparseMoeBlock

        return (
            type(block) is Qwen3NextSparseMoeBlock
            and _is_cpu_linear(block.gate)
            and _is_cpu_linear(block.shared_expert_gate)
            and isinstance(block.switch_mlp, StreamedSwitchGLU)
            and block.switch_mlp.numpy_decode
            and isinstance(block.shared_expert, EarlySharedExpert)
            and _Mlp.takes(block.shared_expert.inner)
        )

    def linears(self) -> list:
        return [self.block.gate, self.block.shared_expert_gate, *self.shared.linears()]

    def ready(self) -> bool:
        return self.switch.recorder is None

    def __call__(self, xs: np.ndarray) -> np.ndarray:
        b = self.block
        logits, sg = _products([b.gate, b.shared_expert_gate], xs)
        k = b.top_k
        with region("routing"):
            inds = np.empty(k, np.int64)
            scores = np.empty(k, np.float32)
            ops.softmax_top_k(np.ascontiguousarray(logits[0]), k, bool(b.norm_topk_prob), inds, scores)
        shared = []
        ys = self.switch.decode_numpy(xs, inds, [lambda: shared.append(self.shared(xs))])
        if not shared:
            shared.append(self.shared(xs))
        g = np.float32(1.0) / (np.float32(1.0) + np.exp(-sg[0, 0]))
        return scores @ ys + g * shared[0][0]


class _CopyWatch:
    """Kept on a gated-delta cache: copying the cache (``copy.copy``, ``copy.deepcopy``, as mlx-lm's
    prompt cache does) marks the original's watch, and the copy gets a fresh one."""

    def __init__(self):
        self.copied = False

    def __copy__(self):
        self.copied = True
        return _CopyWatch()

    def __deepcopy__(self, memo):
        self.copied = True
        return _CopyWatch()


class _GatedDelta:
    """Qwen3.5's (``in_proj_qkv``/``z``/``b``/``a``) or Qwen3-Next's (``in_proj_qkvz``/``ba``, heads
    interleaved) gated-delta layer, one token."""

    def __init__(self, m):
        self.m = m
        self.next = hasattr(m, "in_proj_qkvz")
        self.projs = (
            [m.in_proj_qkvz, m.in_proj_ba] if self.next else [m.in_proj_qkv, m.in_proj_z, m.in_proj_b, m.in_proj_a]
        )
        self._bound = False
        self._out = None  # the state this layer wrote last (see _state_out)
        self._spare = None  # the one it replaced, also written by this layer

    def _state_out(self, cache, state: mx.array) -> mx.array:
        """The array this token's state is written into. A fresh zeroed one for every layer and token
        costs more than the recurrence itself, so two are used in turn. MLX arrays are immutable to
        everyone else and share buffers freely (a copied cache shares them), so a buffer is reused
        only when it is provably this layer's alone: the cache was not copied since this layer last
        wrote to it (its :class:`_CopyWatch`), it still holds, as the very object, the state this
        layer wrote last, and the buffer to reuse is the one that state replaced."""
        watch = getattr(cache, "_moestream_watch", None)
        ours = state is self._out and watch is not None and not watch.copied
        out = self._spare if ours and self._spare is not None and self._spare.shape == state.shape else None
        if out is None:
            out = mx.zeros(state.shape, mx.float32)
        if not ours:
            cache._moestream_watch = _CopyWatch()
        self._spare = state if ours else None
        self._out = out
        return out

    @staticmethod
    def takes(m) -> bool:
        names = (
            ("in_proj_qkvz", "in_proj_ba")
            if hasattr(m, "in_proj_qkvz")
            else ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
        )
        return (
            all(_is_cpu_linear(getattr(m, n, None)) for n in names)
            and _is_cpu_linear(getattr(m, "out_proj", None))
            and isinstance(getattr(m, "conv1d", None), CpuDepthwiseConv1d)
            and type(getattr(m, "norm", None)).__name__ == "Qwen3NextRMSNormGated"
            and getattr(m, "sharding_group", None) is None
        )

    def linears(self) -> list:
        return [*self.projs, self.m.out_proj]

    def _bind(self) -> None:
        m = self.m
        self.conv_w = _f32(m.conv1d.inner.weight[..., 0])  # [C, K]
        self.norm_w = _f32(m.norm.weight)
        self.a_log = _f32(m.A_log)
        self.dt_bias = _f32(m.dt_bias)
        self._bound = True

    def ready(self, cache) -> bool:
        return (
            cache is not None
            and cache[0] is not None
            and cache[1] is not None
            and getattr(cache, "lengths", None) is None
            and getattr(cache, "left_padding", None) is None
        )

    def _split(self, xs: np.ndarray):
        """(q, k, v [rows of heads], z [Hv, Dv], b, a [Hv]) from the input projections."""
        m = self.m
        nk, dk, nv, dv = m.num_k_heads, m.head_k_dim, m.num_v_heads, m.head_v_dim
        if not self.next:
            qkv, z, b, a = _products(self.projs, xs)
            return qkv[0], z[0].reshape(nv, dv), b[0], a[0]
        qkvz, ba = _products(self.projs, xs)
        r = nv // nk
        qkvz = qkvz[0].reshape(nk, -1)
        q, k = qkvz[:, :dk], qkvz[:, dk : 2 * dk]
        v, z = qkvz[:, 2 * dk : 2 * dk + r * dv], qkvz[:, 2 * dk + r * dv :]
        ba = ba[0].reshape(nk, -1)
        qkv = np.concatenate([q.reshape(-1), k.reshape(-1), v.reshape(-1)])
        return qkv, np.ascontiguousarray(z).reshape(nv, dv), ba[:, :r].reshape(-1), ba[:, r:].reshape(-1)

    def __call__(self, xs: np.ndarray, cache) -> np.ndarray:
        m = self.m
        if not self._bound:
            self._bind()
        nk, dk, nv, dv = m.num_k_heads, m.head_k_dim, m.num_v_heads, m.head_v_dim
        qkv, z, b, a = self._split(xs)
        with region("gated_delta"):
            conv_state = _view(cache[0])[0]  # [K-1, C]
            new_conv = np.empty_like(conv_state)
            conv = np.empty(qkv.shape[0], np.float32)
            ops.conv_step_silu(conv_state, np.ascontiguousarray(qkv), self.conv_w, new_conv, conv)
            kd = nk * dk
            q = np.empty((nk, dk), np.float32)
            k = np.empty((nk, dk), np.float32)
            inv = dk**-0.5
            eps = 1e-6 * inv * inv  # mlx-lm's normalize_qk: the l2 eps as an rms_norm eps
            ops.rms_norm(conv[:kd].reshape(nk, dk), _NO_WEIGHT, eps, q)
            ops.rms_norm(conv[kd : 2 * kd].reshape(nk, dk), _NO_WEIGHT, eps, k)
            q *= np.float32(inv * inv)
            k *= np.float32(inv)
            v = conv[2 * kd :].reshape(nv, dv)
            beta = np.empty(nv, np.float32)
            g = np.empty(nv, np.float32)
            ops.delta_gates(np.ascontiguousarray(a), np.ascontiguousarray(b), self.a_log, self.dt_bias, beta, g)
            state = cache[1]
            new = self._state_out(cache, state)
            y = np.empty((nv, dv), np.float32)
            recurrence_step(
                q,
                k,
                np.ascontiguousarray(v),
                g.reshape(nv, 1),
                beta,
                _view(state if state.dtype == mx.float32 else state.astype(mx.float32))[0],
                _view(new)[0],
                y,
            )
            cache[0] = mx.array(new_conv[None])
            cache[1] = new
            cache.advance(1)
            out = ops.gated_rms_norm(y, z, self.norm_w, m.norm.eps, np.empty((nv, dv), np.float32))
        return _products([m.out_proj], out.reshape(1, -1))[0]


class _Attention:
    """Qwen3-Next's (and Qwen3.5's) gated full attention, one token, with mlx-lm's KV cache."""

    def __init__(self, m):
        self.m = m
        self._bound = False

    @staticmethod
    def takes(m) -> bool:
        return (
            type(m).__name__.endswith("Qwen3NextAttention")
            and all(_is_cpu_linear(getattr(m, p, None)) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and _norm(getattr(m, "q_norm", None))
            and _norm(getattr(m, "k_norm", None))
            and type(getattr(m, "rope", None)) is nn.RoPE
            and not m.rope.traditional
        )

    def linears(self) -> list:
        m = self.m
        return [m.q_proj, m.k_proj, m.v_proj, m.o_proj]

    def _bind(self) -> None:
        m = self.m
        self.q_w, self.k_w = _f32(m.q_norm.weight), _f32(m.k_norm.weight)
        self.inv_freq = ops.rope_inv_freq(m.rope.dims, m.rope.base, m.rope.scale)
        self._bound = True

    @staticmethod
    def ready(cache) -> bool:
        from mlx_lm.models.cache import KVCache

        return type(cache) is KVCache and cache.keys is not None

    def __call__(self, xs: np.ndarray, cache) -> np.ndarray:
        m = self.m
        if not self._bound:
            self._bind()
        hq, hk, d = m.num_attention_heads, m.num_key_value_heads, m.head_dim
        qo, ko, vo = _products([m.q_proj, m.k_proj, m.v_proj], xs)
        with region("attention"):
            qg = qo[0].reshape(hq, 2 * d)
            q = ops.rms_norm(qg[:, :d], self.q_w, m.q_norm.eps, np.empty((hq, d), np.float32))
            k = ops.rms_norm(ko[0].reshape(hk, d), self.k_w, m.k_norm.eps, np.empty((hk, d), np.float32))
            off = cache.offset
            q = ops.rope(q, m.rope.dims, self.inv_freq, off, np.empty_like(q))
            k = ops.rope(k, m.rope.dims, self.inv_freq, off, np.empty_like(k))
            keys, values = cache.update_and_fetch(
                mx.array(k.reshape(1, hk, 1, d)), mx.array(np.ascontiguousarray(vo[0]).reshape(1, hk, 1, d))
            )
            K, V = _view(keys)[0], _view(values)[0]  # [Hk, L, D]
            g = hq // hk
            s = (q.reshape(hk, g, d) * np.float32(m.scale)) @ K.transpose(0, 2, 1)  # [Hk, g, L]
            s -= s.max(-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(-1, keepdims=True)
            o = (s @ V).reshape(-1)  # [Hq * D]
            gate = qg[:, d:].reshape(-1)
            o *= np.float32(1.0) / (np.float32(1.0) + np.exp(-gate))
        return _products([m.o_proj], o[None])[0]


class DecodeLayer:
    """The fast path of one decoder layer; called as the layer is (``x, mask, cache``), it returns
    the layer's output, or None for a call it does not take."""

    def __init__(self, layer):
        self.layer = layer
        self.hidden = layer.input_layernorm.weight.shape[0]
        self.mixer = _GatedDelta(layer.linear_attn) if layer.is_linear else _Attention(layer.self_attn)
        mlp = layer.mlp
        self.mlp = _Moe(mlp) if _Moe.takes(mlp) else _Mlp(mlp)
        self._linears = [*self.mixer.linears(), *self.mlp.linears()]
        self.enabled = True
        self._norms = None

    @staticmethod
    def takes(layer) -> bool:
        if not (
            _norm(getattr(layer, "input_layernorm", None)) and _norm(getattr(layer, "post_attention_layernorm", None))
        ):
            return False
        if not hasattr(layer, "is_linear"):
            return False
        mixer = layer.linear_attn if layer.is_linear else getattr(layer, "self_attn", None)
        ok = _GatedDelta.takes(mixer) if layer.is_linear else mixer is not None and _Attention.takes(mixer)
        return ok and (_Moe.takes(layer.mlp) or _Mlp.takes(layer.mlp))

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array | None:
        if not self.enabled or mask is not None or x.shape != (1, 1, self.hidden) or x.dtype != mx.float32:
            return None
        if not (self.mixer.ready(cache) and (not isinstance(self.mlp, _Moe) or self.mlp.ready())):
            return None
        if any(getattr(lin, "recorder", None) is not None for lin in self._linears):
            return None
        lay = self.layer
        if self._norms is None:
            self._norms = (_f32(lay.input_layernorm.weight), _f32(lay.post_attention_layernorm.weight))
        w_in, w_post = self._norms
        xs = to_numpy(x).reshape(1, -1)
        xn = ops.rms_norm(xs, w_in, lay.input_layernorm.eps, np.empty_like(xs))
        h = xs + self.mixer(xn, cache)
        hn = ops.rms_norm(h, w_post, lay.post_attention_layernorm.eps, np.empty_like(h))
        return mx.array((h + self.mlp(hn)).reshape(1, 1, -1))


def use_cpu_decode(model: nn.Module) -> int:
    """Give each decoder layer of ``model`` that this path takes (Qwen3.5 / Qwen3-Next layers on the
    CPU kernels) its :class:`DecodeLayer`. Returns how many; none when ``MOESTREAM_CPU_DECODE=0``."""
    if not ENABLED:
        return 0
    n = 0
    for layer in model.layers:
        if DecodeLayer.takes(layer):
            divert_call(layer, "_cpu_decode", DecodeLayer(layer))
            n += 1
    log.info("CPU decode path: %d of %d layers", n, len(model.layers))
    return n


def set_cpu_decode(model: nn.Module, on: bool) -> None:
    """Turn the decode path of ``model``'s layers on or off (A/B measurements, tests)."""
    for layer in model.layers:
        fast = getattr(layer, "_cpu_decode", None)
        if isinstance(fast, DecodeLayer):
            fast.enabled = on
