"""CPU attention at Qwen3.5-397B's full-attention shape (32 query heads of 256, 2 KV heads):
MLX's ``mx.fast.scaled_dot_product_attention`` against moestream's BLAS ``sdpa``, for a 512-token
causal prefill and for one decoded token over 512 cached positions; the largest difference too.

Usage: python benchmarks/attention_cpu.py [--tokens 512]
"""

from __future__ import annotations

from moestream.runtime.cpu.threads import prefer_passive_wait

prefer_passive_wait()  # before torch or mlx-lm load libgomp, which reads OMP_WAIT_POLICY once

import argparse
import time

import mlx.core as mx
import numpy as np

from moestream.runtime.cpu.attention import sdpa


def timed(fn, n: int = 3) -> tuple[float, np.ndarray]:
    out = np.array(fn())
    t = time.perf_counter()
    for _ in range(n):
        out = np.array(fn())
    return (time.perf_counter() - t) / n, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    L, scale = args.tokens, 256**-0.5
    q, k, v = mx.random.normal((1, 32, L, 256)), mx.random.normal((1, 2, L, 256)), mx.random.normal((1, 2, L, 256))
    mx.eval(q, k, v)
    for name, qq, mask in (("prefill", q, "causal"), ("decode", q[:, :, -1:], None)):
        t_mx, want = timed(lambda: mx.fast.scaled_dot_product_attention(qq, k, v, scale=scale, mask=mask), 1)
        t_np, got = timed(lambda: sdpa(qq, k, v, cache=None, scale=scale, mask=mask))
        print(
            f"{name} ({qq.shape[2]} queries x {L} keys): MLX {1e3 * t_mx:.1f} ms, moestream {1e3 * t_np:.1f} ms "
            f"-> {t_mx / t_np:.1f}x; max |difference| {np.abs(got - want).max():.1e}"
        )


if __name__ == "__main__":
    main()
