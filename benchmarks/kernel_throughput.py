"""Quantized matrix-vector throughput on the CPU: moestream's numba kernels vs MLX's own, against the
machine's memory read bandwidth, all measured in one run.

For each width (2/3/4/8 bits, group 64) on a [rows, 4096] matrix: GB/s of weight bytes (codes plus
bf16 scales and biases) for one token: the int8-activation kernels (2, 3, 4 and 8 bits), the float32
numba kernels and ``mx.quantized_matmul`` (float32 activations); and GFLOP/s for a 64-token batch.
The baseline is numpy sums of float32 split over the compute threads (1 GiB for the header line,
512 MiB in each round below). The default matrix (128 Ki rows, 256-1024 MB) is
larger than the caches, so one token's product reads it from RAM.

On a shared machine the memory bandwidth drifts by 1.5x within a minute, so the one-token figure
comes from ``--rounds`` rounds of (memory probe, int8 product) back to back: the share printed is the
median of the rounds' own ratios, with the best kernel and probe figures beside it.

Usage: python benchmarks/kernel_throughput.py [--rows 131072] [--bits 4,8,2,3] [--rounds 7]
"""

from __future__ import annotations

from moestream.runtime.cpu.threads import prefer_passive_wait

prefer_passive_wait()  # before torch or mlx-lm load libgomp, which reads OMP_WAIT_POLICY once

import argparse
import time

import mlx.core as mx
import numba
import numpy as np

from moestream.runtime.bench import memory_bandwidth
from moestream.runtime.cpu import int8 as cpu_int8
from moestream.runtime.cpu.kernels import qmm


def timed(fn, n: int = 10) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=131072)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--bits", default="4,8,2,3", help="widths to run, comma-separated")
    ap.add_argument("--rounds", type=int, default=7, help="(probe, int8 product) rounds per width")
    args = ap.parse_args()
    mem = memory_bandwidth() / 1e9
    print(f"memory read bandwidth (numpy sums over 1 GiB, {numba.get_num_threads()} threads): {mem:.2f} GB/s")
    rng = np.random.default_rng(0)
    n, k = args.rows, args.cols
    nb = min(n, 8192)  # the 64-token batch: compute-bound, a smaller matrix will do
    for bits in [int(w) for w in args.bits.split(",")]:
        wq, s, b = mx.quantize((mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16), group_size=64, bits=bits)
        mx.eval(wq, s, b)
        nbytes = wq.nbytes + s.nbytes + b.nbytes
        wq_np, s16, b16 = np.array(wq), np.array(s.view(mx.uint16)), np.array(b.view(mx.uint16))
        x1 = rng.standard_normal((1, k), dtype=np.float32)
        x64 = rng.standard_normal((64, k), dtype=np.float32)
        t_f = timed(lambda: qmm(x1, wq_np, s16, b16, bits, 64, int8=False))  # noqa: F821 (called before the loop's del)
        t_i = None
        if cpu_int8.supported(bits, 64):
            rounds = []  # (kernel GB/s, probe GB/s), measured back to back
            for _ in range(args.rounds):
                probe = memory_bandwidth(1 << 29) / 1e9
                rounds.append((nbytes / timed(lambda: qmm(x1, wq_np, s16, b16, bits, 64, int8=True), 3) / 1e9, probe))  # noqa: F821 (called before the loop's del)
            t_i = nbytes / max(r[0] for r in rounds) / 1e9
            share = float(np.median([g / p for g, p in rounds]))
            best_probe = max(r[1] for r in rounds)
            # the int8 rounding's cost: relative RMS against the float kernel on the same product
            yf, yi = qmm(x1, wq_np, s16, b16, bits, 64, int8=False), qmm(x1, wq_np, s16, b16, bits, 64, int8=True)
            err = float(np.sqrt(np.mean((yi - yf) ** 2) / np.mean(yf**2)))
        t_nb64 = timed(lambda: qmm(x64, wq_np[:nb], s16[:nb], b16[:nb], bits, 64), 3)  # noqa: F821 (called before the loop's del)
        xm, x64m = mx.array(x1), mx.array(x64)
        t_mx = timed(lambda: mx.eval(mx.quantized_matmul(xm, wq, s, b, transpose=True, group_size=64, bits=bits)), 2)  # noqa: F821 (called before the loop's del)
        wb, sb, bb = wq[:nb], s[:nb], b[:nb]
        t_mx64 = timed(
            lambda: mx.eval(mx.quantized_matmul(x64m, wb, sb, bb, transpose=True, group_size=64, bits=bits)), 1
        )
        best = min(t for t in (t_f, t_i) if t is not None)
        i8 = (
            (
                f"int8 {share:.0%} of memory bandwidth (median of {args.rounds} rounds' ratios; "
                f"best {nbytes / t_i / 1e9:.2f} "
                f"GB/s, best probe {best_probe:.2f}; relative RMS error {err:.1e}), "
            )
            if t_i
            else ""
        )
        print(
            f"{bits}-bit [{n}, {k}], 1 token: {i8}float {nbytes / t_f / 1e9:.2f} GB/s, MLX {nbytes / t_mx / 1e9:.2f} "
            f"GB/s -> best numba {t_mx / best:.1f}x MLX; 64 tokens [{nb}, {k}]: numba "
            f"{2 * 64 * nb * k / t_nb64 / 1e9:.1f} GFLOP/s, MLX {2 * 64 * nb * k / t_mx64 / 1e9:.1f} GFLOP/s"
        )
        del wq, s, b, wq_np


if __name__ == "__main__":
    main()
