"""Does the memory under a resident weight matter? One decode product of an output-head-sized matrix
([248320, 4096] at 4 bits g64, bf16 scales: 572 MB) from three places, rounds interleaved:

- numpy's own allocation (numpy asks the kernel for transparent huge pages on large arrays),
- an MLX allocation, as ``mx.load`` gives the runtime its resident weights (4 KB pages),
- the same kind of MLX allocation after :func:`moestream.runtime.store.hugepages.back_with_huge_pages`.

Usage: python benchmarks/huge_pages.py [--rows 248320] [--rounds 5]
"""

from __future__ import annotations

from moestream.runtime.cpu.threads import prefer_passive_wait

prefer_passive_wait()  # before torch or mlx-lm load libgomp, which reads OMP_WAIT_POLICY once

import argparse
import time

import mlx.core as mx
import numpy as np

from moestream.runtime.cpu import int8 as cpu_int8
from moestream.runtime.store.hugepages import back_with_huge_pages


def _best(f, n: int = 5) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=248320)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n, k = args.rows, 4096

    def matrix():
        return (
            rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32),
            rng.integers(0x3C00, 0x3D00, (n, k // 64)).astype(np.uint16),
            rng.integers(0x3C00, 0x3D00, (n, k // 64)).astype(np.uint16),
        )

    def in_mlx(arrays):
        held = [mx.array(a) for a in arrays]
        mx.eval(*held)
        return [np.asarray(memoryview(a)) for a in held]

    plain = matrix()
    small = in_mlx(matrix())  # the views keep their MLX arrays alive
    huge = in_mlx(matrix())
    advised = sum(back_with_huge_pages(a) for a in huge)
    x = rng.standard_normal((1, k)).astype(np.float32)
    nbytes = sum(a.nbytes for a in plain)
    print(f"[{n}, {k}] 4-bit g64, {nbytes / 1e6:.0f} MB; {advised / 1e6:.0f} MB advised onto huge pages")
    for arrays in (plain, small, huge):
        cpu_int8.qmv_int8(x, *arrays, 4, 64)  # compile / warm
    for r in range(args.rounds):
        cells = []
        for name, arrays in (("numpy", plain), ("MLX, 4 KB pages", small), ("MLX, huge pages", huge)):
            t = _best(lambda a=arrays: cpu_int8.qmv_int8(x, *a, 4, 64))
            cells.append(f"{name} {t * 1e3:.2f} ms ({nbytes / t / 1e9:.1f} GB/s)")
        print(f"round {r + 1}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
