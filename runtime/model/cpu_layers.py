"""mlx-lm modules swapped for moestream's numba CPU kernels, per model instance.

Quantized linears become :class:`CpuQuantizedLinear`; gated-delta layers and attention layers keep
mlx-lm's own ``__call__`` code with one function swapped (:func:`moestream.runtime.model.patches.rebind`),
so other models in the process (the evaluation reference, the mlx-lm baseline) keep mlx-lm's.
"""

from __future__ import annotations

import logging

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import base

from moestream.runtime.cpu.attention import sdpa
from moestream.runtime.cpu.delta import _depthwise, gated_delta_update
from moestream.runtime.model.hidden import Hidden
from moestream.runtime.model.patches import patched, rebind
from moestream.runtime.model.profile import evaluated, region, to_numpy

log = logging.getLogger(__name__)


class CpuQuantizedLinear(nn.Module):
    """A quantized linear computed by the numba kernel (same weights, same result up to rounding)."""

    def __init__(self, lin: nn.QuantizedLinear):
        super().__init__()
        self.inner = lin  # keeps the parameters in the tree
        self.bind()
        self._bias = Hidden(np.array(lin["bias"].astype(mx.float32)) if "bias" in lin else None)
        # For the output head: during prefill only the last position's logits are used, and unlike
        # MLX's lazy graph this eager kernel would compute them all (see Runtime.prefill_logits_last).
        self.last_only = False
        self.int8 = None  # int8 activations where the width allows (routers: "residual", see use_cpu_kernels)
        self.recorder = None  # calibration: called with this linear's inputs [tokens, in]
        self.shared = None  # (SharedInput, first row, end row): one product with its siblings (shared_input.py)

    def bind(self) -> None:
        """numpy views of the weights as they lie (after a change to ``inner``'s arrays)."""
        from moestream.runtime.cpu.kernels import as_f32
        from moestream.runtime.store.hugepages import back_with_huge_pages

        lin = self.inner
        w = lin["weight"]
        self._w = Hidden(np.asarray(memoryview(w)).view(np.uint32).reshape(w.shape))
        # bf16 scales stay as stored (raw uint16): every decode kernel reads them in place, and
        # widening to float32 would add 11% to the bytes a 4-bit g64 matrix-vector product reads.
        # Prefill (BLAS) widens per call. float16 (numba has no float16 arrays) is widened once here.
        keep = lambda a: _np_float(a) if a.dtype == mx.bfloat16 else as_f32(_np_float(a))
        self._s = Hidden(keep(lin["scales"]))
        self._b = Hidden(keep(lin["biases"]))
        for a in (self._w.module, self._s.module, self._b.module):
            back_with_huge_pages(a)  # views of MLX's memory: the kernels stream it once a token

    def numpy(self, xs: np.ndarray) -> np.ndarray:
        """The product for numpy rows ``xs [T, in]`` (float32) -> ``[T, out]``: the decode fast path's
        entry (no MLX array on either side; the shared product is not consulted)."""
        from moestream.runtime.cpu.kernels import qmm

        lin = self.inner
        with region("products"):
            y = qmm(xs, self._w.module, self._s.module, self._b.module, lin.bits, lin.group_size, int8=self.int8)
        if self._bias.module is not None:
            y += self._bias.module
        return y

    def __call__(self, x: mx.array) -> mx.array:
        from moestream.runtime.cpu.kernels import qmm

        if self.shared is not None and self.recorder is None:
            group, r0, r1 = self.shared.module
            return group.output(r0, r1, x)
        lin = self.inner
        if self.last_only and x.ndim >= 2 and x.shape[-2] > 1:
            x = x[..., -1:, :]
        shape = x.shape
        xs = to_numpy(x).reshape(-1, shape[-1])
        if self.recorder is not None:
            self.recorder(xs)
        with region("products"):
            y = qmm(xs, self._w.module, self._s.module, self._b.module, lin.bits, lin.group_size, int8=self.int8)
        if self._bias.module is not None:
            y += self._bias.module
        return mx.array(y.reshape(*shape[:-1], y.shape[-1]))


def _np_float(a: mx.array) -> np.ndarray:
    """Scales/biases as numpy views of the MLX arrays (no copy): bf16 as raw uint16 bits (numpy has no bf16)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    mx.eval(a)
    return np.asarray(memoryview(a))


ROUTERS = ("gate", "shared_expert_gate", "router")  # mlx-lm's names for MoE routers and gates


def _cpu_linear(m) -> bool:
    return isinstance(m, nn.QuantizedLinear) and getattr(m, "mode", "affine") == "affine" and m.bits in (2, 3, 4, 8)


def _cpu_linears(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(path, parent, attribute, linear) of each affine quantized linear (2/3/4/8 bits) held directly
    as an attribute (not in a list or dict): the ones :func:`use_cpu_kernels` swaps."""
    out = []
    for name, m in model.named_modules():
        for key, child in m.children().items():
            if _cpu_linear(child):
                out.append((f"{name}.{key}" if name else key, m, key, child))
    return out


def cpu_linear_paths(model: nn.Module) -> list[str]:
    """Parameter paths of the linears :func:`use_cpu_kernels` swaps."""
    return [path for path, *_ in _cpu_linears(model)]


def use_cpu_kernels(model: nn.Module) -> int:
    """Swap every affine quantized linear (2/3/4/8 bits) for :class:`CpuQuantizedLinear`. Returns the count."""
    from moestream.runtime.store import hugepages

    before = hugepages.ADVISED.copy()
    found = _cpu_linears(model)
    for _, m, key, child in found:
        lin = CpuQuantizedLinear(child)
        if key in ROUTERS:
            # int8 rounding of a router's input (~1/254 of a group's largest value) could swap
            # near-tied experts: the rounding is quantized and multiplied too (~1/65000, below what
            # int8 products upstream already move the router's input by); float32 without int8.
            lin.int8 = "residual"
        setattr(m, key, lin)
    log.info(
        "CPU linears: %.2f GB moved onto huge pages in %.2f s",
        (hugepages.ADVISED["bytes"] - before["bytes"]) / 1e9,
        hugepages.ADVISED["seconds"] - before["seconds"],
    )
    return len(found)


class CpuDepthwiseConv1d(nn.Module):
    """mlx-lm's depthwise ``nn.Conv1d`` (no padding, no bias, as the gated-delta layers use it) as a
    numba loop: MLX's CPU convolution took ~0.4 s for one 397B layer's 512-token prefill."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        self.inner = conv  # keeps the parameters in the tree

    def __call__(self, x: mx.array) -> mx.array:
        w = self.inner.weight  # [C, K, 1]
        xs = to_numpy(x)
        with region("gated_delta"):
            y = np.empty((xs.shape[0], xs.shape[1] - w.shape[1] + 1, xs.shape[2]), np.float32)
            _depthwise(xs, np.array(w.astype(mx.float32))[..., 0], y)
        return mx.array(y).astype(x.dtype)


def _is_depthwise(m) -> bool:
    return (
        isinstance(m, nn.Conv1d)
        and "bias" not in m
        and m.weight.shape[-1] == 1
        and getattr(m, "groups", 1) == m.weight.shape[0]
        and getattr(m, "padding", 0) == 0
        and getattr(m, "stride", 1) == 1
        and getattr(m, "dilation", 1) == 1
    )


def _gated_delta(q, k, v, a, b, A_log, dt_bias, state=None, mask=None, **kw):
    """:func:`gated_delta_update`, its time marked for profiling (its inputs' MLX work apart)."""
    evaluated(q, k, v, a, b, *(x for x in (state, mask) if x is not None))
    with region("gated_delta"):
        return gated_delta_update(q, k, v, a, b, A_log, dt_bias, state, mask, **kw)


def _sdpa(queries, keys, values, cache, scale, mask, sinks=None):
    """:func:`sdpa`, its time marked for profiling (its inputs' MLX work apart)."""
    evaluated(queries, keys, values, *(x for x in (mask,) if isinstance(x, mx.array)))
    with region("attention"):
        return sdpa(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)


def use_cpu_delta(model) -> int:
    """Switch ``model``'s gated-delta layers to the CPU recurrence (and their depthwise convolution to
    :class:`CpuDepthwiseConv1d`). Returns how many layers were switched."""
    n = 0
    for _, m in model.named_modules():
        code = getattr(getattr(type(m), "__call__", None), "__code__", None)
        if patched(m) or code is None or "gated_delta_update" not in code.co_names:
            continue
        m.__class__ = rebind(type(m), "gated_delta_update", _gated_delta)
        if _is_depthwise(getattr(m, "conv1d", None)):
            m.conv1d = CpuDepthwiseConv1d(m.conv1d)
        n += 1
    return n


def use_cpu_attention(model) -> int:
    """Switch ``model``'s attention layers (those whose ``__call__`` calls mlx-lm's
    ``scaled_dot_product_attention``) to :func:`sdpa`. Returns how many were switched."""
    n = 0
    for _, m in model.named_modules():
        call = getattr(type(m), "__call__", None)
        code = getattr(call, "__code__", None)
        if (
            patched(m)
            or code is None
            or "scaled_dot_product_attention" not in code.co_names
            or call.__globals__.get("scaled_dot_product_attention") is not base.scaled_dot_product_attention
        ):
            continue
        m.__class__ = rebind(type(m), "scaled_dot_product_attention", _sdpa)
        n += 1
    return n
