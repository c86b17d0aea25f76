"""Scaled dot-product attention for MLX on the CPU, through numpy's BLAS.

MLX's CPU ``mx.fast.scaled_dot_product_attention`` (and its CPU matmul) is slow: for a 512-token
prefill of a Qwen3.5-397B full-attention layer (32 query heads of 256, 2 KV heads), and for a decoded
token's attention over 512 cached positions, BLAS was over 8x faster (``benchmarks/attention_cpu.py``;
figures in docs/benchmarks.md). :func:`sdpa` has mlx-lm's
``scaled_dot_product_attention`` signature and does the same float32 math with ``np.matmul``
(grouped-query heads folded into the rows, so each KV head is one GEMM), in query blocks that bound
the score matrix's memory. Quantized KV caches and attention sinks (gpt-oss) go to mlx-lm's own.

:func:`use_cpu_attention` gives one model's attention layers a class whose ``__call__`` is mlx-lm's own code
with :func:`sdpa` in place of mlx-lm's function (see :func:`moestream.runtime.model.patches.rebind`), so other
models in the process (references, baselines) keep mlx-lm's.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models import base

SCORE_BYTES = 64 << 20  # per query block: the [heads, rows, keys] float32 scores


def sdpa(queries: mx.array, keys: mx.array, values: mx.array, cache, scale: float, mask, sinks=None) -> mx.array:
    """mlx-lm's ``scaled_dot_product_attention`` (queries [B, Hq, Lq, D], keys/values [B, Hk, Lk, D])."""
    if hasattr(cache, "bits") or sinks is not None:
        return base.scaled_dot_product_attention(
            queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks
        )
    B, Hq, Lq, D = queries.shape
    Hk, Lk, Dv = keys.shape[1], keys.shape[2], values.shape[-1]
    g = Hq // Hk
    q = np.array(queries.astype(mx.float32)).reshape(B, Hk, g, Lq, D) * np.float32(scale)
    k = np.array(keys.astype(mx.float32))
    v = np.array(values.astype(mx.float32))
    add = None
    if isinstance(mask, mx.array):  # boolean (True: attend) or additive, broadcast to [B, Hq, Lq, Lk]
        m = np.array(mask if mask.dtype == mx.bool_ else mask.astype(mx.float32))
        m = np.broadcast_to(m, (B, Hq, Lq, Lk)).reshape(B, Hk, g, Lq, Lk)
        add = np.where(m, np.float32(0), np.float32(-np.inf)) if m.dtype == np.bool_ else m
    elif mask is not None and mask != "causal":
        raise ValueError(f"attention mask {mask!r}: expected None, 'causal' or an array")
    out = np.empty((B, Hk, g, Lq, Dv), np.float32)
    rows = max(1, SCORE_BYTES // (4 * g * Lk))
    for b in range(B):
        for h in range(Hk):
            for r0 in range(0, Lq, rows):
                r1 = min(Lq, r0 + rows)
                s = q[b, h, :, r0:r1] @ k[b, h].T  # [g, rows, Lk]
                if mask == "causal":  # query i sits at position Lk - Lq + i
                    pos = np.arange(r0, r1)[:, None] + (Lk - Lq)
                    s = np.where(np.arange(Lk)[None, :] <= pos, s, np.float32(-np.inf))
                elif add is not None:
                    s += add[b, h, :, r0:r1]
                s -= s.max(-1, keepdims=True)
                np.exp(s, out=s)
                s /= s.sum(-1, keepdims=True)
                out[b, h, :, r0:r1] = s @ v[b, h]
    return mx.array(out.reshape(B, Hq, Lq, Dv)).astype(queries.dtype)
