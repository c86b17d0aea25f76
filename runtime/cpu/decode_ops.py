"""Small per-token operations of a decoder layer, for one token on the CPU (numba, one thread).

At decode each of these touches a few kilobytes; through MLX on the CPU each costs an evaluation of
its lazy graph (tens of microseconds a call, ~15 a layer), through numba about a microsecond. Each
follows the float32 math of the mlx-lm operation it stands for (named in its docstring);
``tests/test_cpu_decode.py`` checks them against it.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(fastmath=True, cache=True, nogil=True)
def rms_norm(x, w, eps, out):
    """``mx.fast.rms_norm`` over the last axis of ``x [R, D]`` (``w [D]``, or an empty ``w``: no
    weight) into ``out``."""
    R, D = x.shape
    for r in range(R):
        ss = np.float32(0.0)
        for i in range(D):
            ss += x[r, i] * x[r, i]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(D) + np.float32(eps))
        if w.shape[0]:
            for i in range(D):
                out[r, i] = x[r, i] * inv * w[i]
        else:
            for i in range(D):
                out[r, i] = x[r, i] * inv
    return out


@njit(fastmath=True, cache=True, nogil=True)
def conv_step_silu(state, x, w, new_state, out):
    """One step of the gated-delta layer's depthwise convolution and its SiLU: ``state [K-1, C]``
    (the last inputs), ``x [C]`` (this token's), ``w [C, K]``; the window's last K-1 rows to
    ``new_state``, ``silu(sum_j window[j, c] * w[c, j])`` to ``out``."""
    Km1, C = state.shape
    for c in range(C):
        acc = x[c] * w[c, Km1]
        for j in range(Km1):
            acc += state[j, c] * w[c, j]
        out[c] = acc / (np.float32(1.0) + np.exp(-acc))
    for j in range(Km1 - 1):
        for c in range(C):
            new_state[j, c] = state[j + 1, c]
    for c in range(C):
        new_state[Km1 - 1, c] = x[c]


@njit(fastmath=True, cache=True, nogil=True)
def delta_gates(a, b, a_log, dt_bias, beta, g):
    """mlx-lm's ``compute_g`` and the gate ``beta``: ``g = exp(-exp(A_log) * softplus(a + dt_bias))``,
    ``beta = sigmoid(b)`` per value head."""
    for h in range(a.shape[0]):
        z = a[h] + dt_bias[h]
        sp = max(z, np.float32(0.0)) + np.log1p(np.exp(-abs(z)))  # softplus = logaddexp(z, 0)
        g[h] = np.exp(-np.exp(a_log[h]) * sp)
        beta[h] = np.float32(1.0) / (np.float32(1.0) + np.exp(-b[h]))


@njit(fastmath=True, cache=True, nogil=True)
def gated_rms_norm(x, z, w, eps, out):
    """``Qwen3NextRMSNormGated(x, z)``: ``rms_norm(x) * w * silu(z)`` per row of ``x [R, D]``."""
    R, D = x.shape
    for r in range(R):
        ss = np.float32(0.0)
        for i in range(D):
            ss += x[r, i] * x[r, i]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(D) + np.float32(eps))
        for i in range(D):
            v = z[r, i]
            out[r, i] = v / (np.float32(1.0) + np.exp(-v)) * (x[r, i] * inv * w[i])
    return out


@njit(fastmath=True, cache=True, nogil=True)
def rope(x, dims, inv_freq, offset, out):
    """``mx.fast.rope`` (not traditional) at position ``offset`` over the first ``dims`` features of
    each row of ``x [R, D]``: pairs (i, i + dims / 2) rotate by ``offset * inv_freq[i]``."""
    R, D = x.shape
    half = dims // 2
    for i in range(half):
        t = np.float32(offset) * inv_freq[i]
        c, s = np.cos(t), np.sin(t)
        for r in range(R):
            x1, x2 = x[r, i], x[r, i + half]
            out[r, i] = x1 * c - x2 * s
            out[r, i + half] = x1 * s + x2 * c
    for r in range(R):
        for i in range(dims, D):
            out[r, i] = x[r, i]
    return out


def rope_inv_freq(dims: int, base: float, scale: float) -> np.ndarray:
    """The rotation rate of each pair, as MLX's ``fast.rope`` derives it (``scale`` folded in)."""
    return (scale * np.exp(-np.arange(dims // 2, dtype=np.float32) * (np.log(np.float32(base)) / (dims // 2)))).astype(
        np.float32
    )


@njit(fastmath=True, cache=True, nogil=True)
def softmax_top_k(logits, k, normalize, inds, scores):
    """mlx-lm's MoE routing for one token: ``softmax`` over ``logits [E]`` (float32), the ``k``
    largest (ids to ``inds``, ascending, their probabilities to ``scores``), renormalized to sum
    to one when ``normalize``."""
    E = logits.shape[0]
    m = logits[0]
    for e in range(1, E):
        m = max(m, logits[e])
    p = np.empty(E, np.float32)
    total = np.float32(0.0)
    for e in range(E):
        p[e] = np.exp(logits[e] - m)
        total += p[e]
    top = np.argsort(-p, kind="mergesort")[:k]
    top.sort()
    s = np.float32(0.0)
    for j in range(k):
        inds[j] = top[j]
        scores[j] = p[top[j]] / total
        s += scores[j]
    if normalize:
        for j in range(k):
            scores[j] /= s
