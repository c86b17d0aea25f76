"""Routed experts of one MoE layer at batch 1 on a Metal device: moestream's two fused kernels vs
MLX's generic path (``gather_qmm`` for gate, up and down, SwiGLU, router-weighted sum), as mlx-lm's
SwitchGLU computes it, on the same slab arrays.

For each width (2/3/4/8 bits, group 64) at Qwen3.5-397B-A17B's expert shape (H 4096, I 1024, K 10
of 32 slab slots, bf16 activations and scales): microseconds per layer, GB/s of expert bytes read
(codes, scales, biases of the K experts) against the device's memory bandwidth (measured here with a
large copy), the ratio MLX / moestream, and the largest difference between the two results relative
output error of both against the same computation in float32 (MLX's, scales widened to float32),
relative to the largest output: a sanity check (tests/test_metal_device.py is the real one), which
also shows what MLX's bf16 intermediates cost (moestream keeps the intermediate in float32).

Usage (Apple silicon): python benchmarks/metal_kernels.py [--k 10] [--hidden 4096] [--intermediate 1024]
"""

from __future__ import annotations

from moestream.runtime.cpu.threads import prefer_passive_wait

prefer_passive_wait()  # before torch or mlx-lm load libgomp, which reads OMP_WAIT_POLICY once

import argparse
import sys
import time

import mlx.core as mx
import numpy as np

from moestream.metal.kernels import routed_experts, unsupported


def timed(fn, n: int) -> float:
    for _ in range(5):  # warm-up: kernel compilation, allocations
        mx.eval(fn())
    t = time.perf_counter()
    for _ in range(n):
        mx.eval(fn())  # one layer per evaluation, as in decode
    return (time.perf_counter() - t) / n


def mlx_path(x, a, idx, weights, bits, gs):
    """mlx-lm's SwitchGLU on one token, then the block's weighted sum over the experts."""
    xe = x.reshape(1, 1, 1, 1, -1)
    q = dict(transpose=True, group_size=gs, bits=bits)
    g = mx.gather_qmm(xe, a["gate_proj.weight"], a["gate_proj.scales"], a["gate_proj.biases"], rhs_indices=idx, **q)
    u = mx.gather_qmm(xe, a["up_proj.weight"], a["up_proj.scales"], a["up_proj.biases"], rhs_indices=idx, **q)
    h = (g * mx.sigmoid(g)) * u
    y = mx.gather_qmm(h, a["down_proj.weight"], a["down_proj.scales"], a["down_proj.biases"], rhs_indices=idx, **q)
    return (y.squeeze(-2) * weights[..., None].astype(y.dtype)).sum(axis=-2).reshape(-1)


def bandwidth() -> float:
    src = mx.zeros((1 << 28,), mx.float32)  # 1 GiB
    t = timed(lambda: src + 1, 10)
    return 2 * src.nbytes / t / 1e9  # read + write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    if not mx.metal.is_available():
        sys.exit(
            "metal_kernels.py: needs a Metal device (Apple silicon); on Linux the kernels are verified by "
            "emulation instead (python -m pytest tests/test_metal_emulated.py)"
        )
    h, i, k = args.hidden, args.intermediate, args.k
    mem = bandwidth()
    print(
        f"{mx.metal.device_info().get('device_name', 'Metal device')}: copy bandwidth {mem:.0f} GB/s; "
        f"H {h}, I {i}, K {k} of {args.slots} slots, bf16 activations"
    )
    rng = np.random.default_rng(0)
    for bits in (4, 2, 3, 8):
        why = unsupported(h, i, (bits, 64), (bits, 64))
        if why:
            print(f"{bits}-bit: skipped ({why})")
            continue
        a = {}
        for p, (rows, cols) in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            w = mx.random.normal((args.slots, rows, cols)).astype(mx.bfloat16) * 0.02
            a[f"{p}.weight"], a[f"{p}.scales"], a[f"{p}.biases"] = mx.quantize(w, group_size=64, bits=bits)
        mx.eval(a)
        slots = rng.choice(args.slots, k, replace=False)
        idx = mx.array(slots.astype(np.uint32))
        x = mx.random.normal((h,)).astype(mx.bfloat16)
        weights = mx.array(rng.dirichlet(np.ones(k)).astype(np.float32))
        nbytes = k * sum(v[0].nbytes for v in a.values())
        ours = lambda: routed_experts(x, a, idx, (bits, 64), (bits, 64), weights)  # noqa: E731
        theirs = lambda: mlx_path(x, a, idx.reshape(1, 1, k), weights, bits, 64)  # noqa: E731
        a32 = {n: v.astype(mx.float32) if v.dtype != mx.uint32 else v for n, v in a.items()}
        ref = mlx_path(x.astype(mx.float32), a32, idx.reshape(1, 1, k), weights, bits, 64)
        err = [(mx.abs(f().astype(mx.float32) - ref).max() / mx.abs(ref).max()).item() for f in (ours, theirs)]
        t_ours, t_mlx = timed(ours, args.iters), timed(theirs, args.iters)
        print(
            f"{bits}-bit: moestream {t_ours * 1e6:.0f} us ({nbytes / t_ours / 1e9:.0f} GB/s, "
            f"{nbytes / t_ours / 1e9 / mem:.0%} of copy bandwidth), MLX gather_qmm {t_mlx * 1e6:.0f} us "
            f"({nbytes / t_mlx / 1e9:.0f} GB/s) -> {t_mlx / t_ours:.2f}x; error vs float32: moestream {err[0]:.1e}, "
            f"MLX {err[1]:.1e}"
        )


if __name__ == "__main__":
    main()
