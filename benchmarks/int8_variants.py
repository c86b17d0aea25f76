"""The int8 row dot's variants against each other and the memory probe, interleaved in one process.

For each width (g64, one token against a [rows, 4096] matrix larger than the caches): the kernel
without software prefetch, with it (``cpu_int8_dot.PREFETCH`` bytes ahead, the default), and at
8 bits also through ``vpdpbusd`` (where the CPU has VNNI). Rounds alternate the memory probe and
every variant, so drift on a shared machine meets all of them alike; best and median GB/s printed.

Usage: python benchmarks/int8_variants.py [--rows 131072] [--rounds 10] [--bits 8,4,2,3]
"""

from __future__ import annotations

from moestream.runtime.cpu.threads import prefer_passive_wait

prefer_passive_wait()  # before torch or mlx-lm load libgomp, which reads OMP_WAIT_POLICY once

import argparse
import time

import mlx.core as mx
import numpy as np

from moestream.runtime.bench import memory_bandwidth
from moestream.runtime.cpu import int8 as cpu_int8
from moestream.runtime.cpu.int8_dot import PREFETCH, make_dot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=131072)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--bits", default="8,4,2,3")
    args = ap.parse_args()
    g, k, n = 64, 4096, args.rows
    for bits in (int(b) for b in args.bits.split(",")):
        if not cpu_int8.supported(bits, g):
            print(f"{bits}-bit: no int8 kernel on this CPU")
            continue
        wq, s, b = mx.quantize((mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16), group_size=g, bits=bits)
        w, s, b = np.array(wq), np.array(s.view(mx.uint16)), np.array(b.view(mx.uint16))
        del wq
        x = np.random.default_rng(bits).standard_normal((1, k), dtype=np.float32)
        plan = (
            cpu_int8.unit_bytes(bits, g, k),
            cpu_int8.groups_per_unit(bits, g, k),
            cpu_int8.units_per_group(bits, g, k),
        )
        variants = [("no prefetch", 0, False), (f"prefetch {PREFETCH}", PREFETCH, False)]
        if bits == 8 and cpu_int8.vnni8():
            variants.append((f"prefetch {PREFETCH} + vnni", PREFETCH, True))
        out = np.empty((1, n), np.float32)
        nbytes = w.nbytes + s.nbytes + b.nbytes
        runs = {}
        for name, pf, vnni in variants:
            kern = cpu_int8._make_kernels(
                *(make_dot(bits, *plan[:1], nt, *plan[1:], prefetch=pf, vnni=vnni) for nt in (1, 2, 4))
            )[0]
            args_ = (w, *cpu_int8.quantize_activations(x, bits, g, vnni), s, b, k // g, out)
            kern(*args_)  # compile
            runs[name] = (kern, args_, [])
        mem = []
        for _ in range(args.rounds):
            mem.append(memory_bandwidth(1 << 29) / 1e9)
            for kern, a, got in runs.values():
                t = time.perf_counter()
                kern(*a)
                got.append(nbytes / (time.perf_counter() - t) / 1e9)
        print(
            f"{bits}-bit: memory probe best {max(mem):.1f}, median {np.median(mem):.1f} GB/s; "
            + "; ".join(f"{name}: best {max(v):.1f}, median {np.median(v):.1f}" for name, (_, _, v) in runs.items()),
            flush=True,
        )
        del w, s, b


if __name__ == "__main__":
    main()
