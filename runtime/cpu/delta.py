"""The gated delta rule (Qwen3.5 / Qwen3-Next linear attention) as a numba kernel for the CPU.

mlx-lm runs the recurrence with a Metal kernel on the GPU; elsewhere it falls back to a Python loop
of MLX ops, one step per token, each step reading and writing the whole [heads, Dv, Dk] state a few
times. For a 512-token prompt on a Qwen3.5-397B layer that loop took longer than the layer's routed
experts. Here each (batch, head) runs its whole sequence in one thread with its
[Dv, Dk] state (64 KB) in cache, in two fused passes per token.

:func:`gated_delta_update` has mlx-lm's signature and math (``mlx_lm.models.gated_delta``): it
computes beta and the decay with mlx-lm's own helpers and replaces only the recurrence.
:func:`use_cpu_delta` gives one model's linear-attention layers a class whose ``__call__`` is
mlx-lm's own code with this function in place of mlx-lm's: other models in the process (the
evaluation reference, the mlx-lm baseline of ``bench``) keep mlx-lm's recurrence.
"""

from __future__ import annotations

import logging

import mlx.core as mx
import numpy as np
from numba import njit, prange

log = logging.getLogger(__name__)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _recurrence(q, k, v, g, beta, state_in, state, mask, y):
    # q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g [B, T, Hv, Gk] (Gk 1: one decay per head, else per key
    # channel); beta [B, T, Hv]; state_in -> state [B, Hv, Dv, Dk]; mask [B, T]; y [B, T, Hv, Dv].
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    rep = Hv // Hk
    vec = g.shape[3] > 1
    for bh in prange(B * Hv):
        b, h = bh // Hv, bh % Hv
        hk = h // rep  # mlx-lm repeats each key head over consecutive value heads
        state[b, h] = state_in[b, h]  # 64 KB: the head's state then stays in cache for all T steps
        for t in range(T):
            # A masked step computes its output but leaves the state as it was (as mlx-lm's ops do).
            s_t = state[b, h] if mask[b, t] else state[b, h].copy()
            kt, qt, gt = k[b, t, hk], q[b, t, hk], g[b, t, h]
            bt = beta[b, t, h]
            # Row i of the state is all that output i needs, so each row is decayed, recalled
            # against k, corrected and read out with q while it sits in L1: one pass over the state.
            for i in range(Dv):
                acc = np.float32(0.0)
                for j in range(Dk):
                    s = s_t[i, j] * (gt[j] if vec else gt[0])
                    s_t[i, j] = s
                    acc += s * kt[j]
                d = (v[b, t, h, i] - acc) * bt
                acc = np.float32(0.0)
                for j in range(Dk):
                    s = s_t[i, j] + kt[j] * d
                    s_t[i, j] = s
                    acc += s * qt[j]
                y[b, t, h, i] = acc


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def recurrence_step(q, k, v, g, beta, state_in, state, y):
    """One token of :func:`_recurrence` (decode): q, k [Hk, Dk]; v [Hv, Dv]; g [Hv, Gk]; beta [Hv];
    state_in -> state [Hv, Dv, Dk]; y [Hv, Dv]. Each state row is read once from ``state_in``,
    decayed, corrected and read out in L1, and written once to ``state`` (the sequence kernel copies
    a head's state first, then updates it in place: twice the traffic for one step)."""
    Hk, Dk = q.shape
    Hv, Dv = v.shape
    rep = Hv // Hk
    vec = g.shape[1] > 1
    for h in prange(Hv):
        hk = h // rep
        kt, qt, gt = k[hk], q[hk], g[h]
        bt = beta[h]
        si, so = state_in[h], state[h]
        row = np.empty(Dk, np.float32)
        for i in range(Dv):
            acc = np.float32(0.0)
            for j in range(Dk):
                s = si[i, j] * (gt[j] if vec else gt[0])
                row[j] = s
                acc += s * kt[j]
            d = (v[h, i] - acc) * bt
            acc = np.float32(0.0)
            for j in range(Dk):
                s = row[j] + kt[j] * d
                so[i, j] = s
                acc += s * qt[j]
            y[h, i] = acc


def recurrence(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array, mask: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """``gated_delta_ops``'s contract: q, k [B, T, Hk, Dk], v [B, T, Hv, Dv], g [B, T, Hv] or
    [B, T, Hv, Dk], beta [B, T, Hv], state [B, Hv, Dv, Dk] -> (y [B, T, Hv, Dv] in q's dtype, state)."""
    f32 = lambda a: np.array(a.astype(mx.float32))  # noqa: E731
    B, T = q.shape[:2]
    gn = f32(g)
    gn = gn[..., None] if gn.ndim == 3 else gn
    # The state (4 MB a 397B layer) is read in place from MLX's memory and written straight into a
    # new MLX array: converting it to numpy and back cost 4x the kernel's time at decode.
    state = state.astype(mx.float32)
    new = mx.zeros(state.shape, mx.float32)
    mx.eval(state, new)
    m = np.ones((B, T), np.bool_) if mask is None else np.array(mask).astype(np.bool_).reshape(B, T)
    y = np.empty((B, T, v.shape[2], v.shape[3]), np.float32)
    _recurrence(
        f32(q),
        f32(k),
        f32(v),
        np.ascontiguousarray(gn),
        f32(beta),
        np.asarray(memoryview(state)),
        np.asarray(memoryview(new)),
        m,
        y,
    )
    return mx.array(y).astype(q.dtype), new


def gated_delta_update(
    q,
    k,
    v,
    a,
    b,
    A_log,
    dt_bias,
    state=None,
    mask=None,
    *,
    use_kernel: bool = True,
    lower_bound: float | None = None,
    allow_neg_eigval: bool = False,
):
    """mlx-lm's ``gated_delta_update`` with the recurrence on the CPU kernel."""
    from mlx_lm.models.gated_delta import compute_g, compute_lower_bound_g

    beta = mx.sigmoid(b)
    if allow_neg_eigval:
        beta = beta * 2.0
    g = compute_g(A_log, a, dt_bias) if lower_bound is None else compute_lower_bound_g(A_log, a, dt_bias, lower_bound)
    if state is None:
        state = mx.zeros((q.shape[0], v.shape[-2], v.shape[-1], q.shape[-1]), dtype=mx.float32)
    return recurrence(q, k, v, g, beta, state, mask)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _depthwise(x, w, y):
    # x [B, L, C], w [C, K], y [B, L - K + 1, C]: y[b, t, c] = sum_j x[b, t + j, c] * w[c, j]
    B, L, C = x.shape
    K = w.shape[1]
    wt = np.ascontiguousarray(w.T)  # [K, C]: the inner loop runs over contiguous channels
    for bt in prange(B * (L - K + 1)):
        b, t = bt // (L - K + 1), bt % (L - K + 1)
        for c in range(C):
            y[b, t, c] = x[b, t, c] * wt[0, c]
        for j in range(1, K):
            for c in range(C):
                y[b, t, c] += x[b, t + j, c] * wt[j, c]
