"""Quantized matrix-vector throughput on the CPU: moestream's numba kernels vs MLX's own, against the
machine's memory read bandwidth, all measured in one run.

For each width (2/3/4/8 bits, group 64) on a [rows, 4096] matrix: GB/s of weight bytes (codes plus
bf16 scales and biases) for one token, numba vs ``mx.quantized_matmul`` (float32 activations), and
GFLOP/s for a 64-token batch. The baseline is a parallel float32 sum over 1 GiB.

Usage: python benchmarks/kernel_throughput.py [--rows 8192]
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np

from moestream.runtime.bench import memory_bandwidth
from moestream.runtime.cpu_kernels import as_f32, qmm


def timed(fn, n: int = 10) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=4096)
    args = ap.parse_args()
    mem = memory_bandwidth() / 1e9
    print(f"memory read bandwidth (parallel sum over 1 GiB): {mem:.2f} GB/s")
    rng = np.random.default_rng(0)
    n, k = args.rows, args.cols
    for bits in (4, 8, 2, 3):
        w = rng.standard_normal((n, k), dtype=np.float32) * 0.02
        wq, s, b = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=64, bits=bits)
        nbytes = wq.nbytes + s.nbytes + b.nbytes
        wq_np, s32, b32 = np.array(wq), as_f32(np.array(s.view(mx.uint16))), as_f32(np.array(b.view(mx.uint16)))
        x1 = rng.standard_normal((1, k), dtype=np.float32)
        x64 = rng.standard_normal((64, k), dtype=np.float32)
        t_nb = timed(lambda: qmm(x1, wq_np, s32, b32, bits, 64))
        t_nb64 = timed(lambda: qmm(x64, wq_np, s32, b32, bits, 64), 3)
        xm, x64m = mx.array(x1), mx.array(x64)
        t_mx = timed(lambda: mx.eval(mx.quantized_matmul(xm, wq, s, b, transpose=True, group_size=64, bits=bits)), 3)
        t_mx64 = timed(lambda: mx.eval(mx.quantized_matmul(x64m, wq, s, b, transpose=True, group_size=64, bits=bits)), 1)
        print(f"{bits}-bit [{n}, {k}]: 1 token numba {nbytes / t_nb / 1e9:.2f} GB/s ({nbytes / t_nb / 1e9 / mem:.0%} "
              f"of memory bandwidth), MLX {nbytes / t_mx / 1e9:.2f} GB/s -> {t_mx / t_nb:.1f}x; 64 tokens numba "
              f"{2 * 64 * n * k / t_nb64 / 1e9:.1f} GFLOP/s, MLX {2 * 64 * n * k / t_mx64 / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
