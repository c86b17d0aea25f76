"""How close ``--method clip`` gets to the best any quantizer in MLX's affine layout can do.

For 2-bit groups the exact optimum is computable: the best codes are a split of the group's sorted
values into 4 runs, and for each split least squares gives the best (scale, bias). This script tries
every split of every group of a sample of the trained fixture's experts (float32 scales, so the bound
is not limited by bf16 rounding) and prints relative RMSE (RMSE / std) for rtn, clip and the optimum.

Usage: python benchmarks/clip_bound.py [--experts 4] [--fixture ../shared/fixtures/trained-tiny-qwen3_5-moe]
"""

from __future__ import annotations

from moestream.runtime.cpu.threads import prefer_passive_wait

prefer_passive_wait()  # before torch or mlx-lm load libgomp, which reads OMP_WAIT_POLICY once

import argparse
from pathlib import Path

import numba
import numpy as np


@numba.njit(cache=True)
def optimal_2bit_sse(w: np.ndarray, g: int) -> float:
    """Sum over groups of the minimum squared error of 4-level affine quantization."""
    tot = 0.0
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], g):
            v = np.sort(w[r, c0 : c0 + g].astype(np.float64))
            p = np.zeros(g + 1)
            p2 = np.zeros(g + 1)
            for i in range(g):
                p[i + 1] = p[i] + v[i]
                p2[i + 1] = p2[i] + v[i] * v[i]
            best = 1e300
            for a in range(g + 1):
                for b in range(a, g + 1):
                    for c in range(b, g + 1):
                        n1, n2, n3 = b - a, c - b, g - c
                        sq, sqq = n1 + 2 * n2 + 3 * n3, n1 + 4 * n2 + 9 * n3
                        sqv = (p[b] - p[a]) + 2 * (p[c] - p[b]) + 3 * (p[g] - p[c])
                        sv, svv = p[g], p2[g]
                        det = g * sqq - sq * sq
                        if det == 0:
                            sse = svv - sv * sv / g
                        else:
                            s = (g * sqv - sq * sv) / det
                            bb = (sv - s * sq) / g
                            sse = svv + s * s * sqq + g * bb * bb - 2 * s * sqv - 2 * bb * sv + 2 * s * bb * sq
                        best = min(best, sse)
            tot += best
    return tot


def main() -> None:
    from moestream.layouts import SafetensorsReader
    from moestream.quant import decode_to_f32, quantize_with_error

    default = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "trained-tiny-qwen3_5-moe"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", type=Path, default=default)
    ap.add_argument("--experts", type=int, default=4, help="experts sampled per fused tensor")
    args = ap.parse_args()
    mats = []
    for shard in sorted(args.fixture.glob("*.safetensors")):
        with SafetensorsReader(shard) as r:
            for name, t in r.tensors.items():
                if ".mlp.experts." in name:
                    raw = r.read_rows(name, 0, args.experts)
                    mats.append(decode_to_f32(raw, t.dtype, raw.shape).reshape(-1, t.shape[-1]))
    rtn = clip = None
    opt, n, s1, s2 = 0.0, 0, 0.0, 0.0
    for w in mats:
        w = np.ascontiguousarray(w)
        *_, a = quantize_with_error(w, 2, 64, "float32", "rtn")
        *_, b = quantize_with_error(w, 2, 64, "float32", "clip")
        rtn = a if rtn is None else rtn.merge(a)
        clip = b if clip is None else clip.merge(b)
        opt += optimal_2bit_sse(w, 64)
        n, s1, s2 = n + w.size, s1 + float(w.sum(dtype=np.float64)), s2 + float((w.astype(np.float64) ** 2).sum())
    std = np.sqrt(s2 / n - (s1 / n) ** 2)
    o = np.sqrt(opt / n) / std
    print(f"2-bit g64, {n / 1e6:.2f} M expert params ({len(mats)} tensors x {args.experts} experts), float32 scales")
    print(f"relative RMSE: rtn {rtn.rel_rmse:.4f}  clip {clip.rel_rmse:.4f}  exact optimum {o:.4f}")
    print(
        f"cut vs rtn: clip {1 - clip.rel_rmse / rtn.rel_rmse:.1%}, optimum {1 - o / rtn.rel_rmse:.1%}; "
        f"clip is within {clip.rel_rmse / o - 1:.2%} of the optimum"
    )


if __name__ == "__main__":
    main()
