"""Decode speed against K (experts per token) and against the LRU cache size, cold vs warm, on a
synthetic pack; writes a PNG and prints the figures.

Usage: python benchmarks/decode_sweep.py [--like qwen3.5-397b-a17b] [--layers 2] [--routing zipf:1.0]
       [--out benchmarks/decode_sweep.png] [--workdir bench-out]
"""

from __future__ import annotations

from moestream.runtime.cpu.threads import prefer_passive_wait

prefer_passive_wait()  # before torch or mlx-lm load libgomp, which reads OMP_WAIT_POLICY once

import argparse
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moestream.convert.synth import synth  # noqa: E402
from moestream.runtime.bench import bench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--like", default="qwen3.5-397b-a17b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--routing", default="zipf:1.0")
    ap.add_argument("--gen-tokens", type=int, default=12)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/decode_sweep.png"))
    ap.add_argument("--workdir", type=Path, default=Path("bench-out"))
    args = ap.parse_args()
    pack = args.workdir / "sweep-pack"
    m = synth(args.like, pack, layers=args.layers, routing=args.routing, force=True)
    expert_bytes = sum(x.file_size for x in m.experts)
    run = dict(prompt_tokens=16, gen_tokens=args.gen_tokens, baselines=False)
    ks = [1, 2, 4, m.top_k]
    by_k = {c: [bench(pack, cache=c, experts_per_token=k, **run)["decode_tps"] for k in ks] for c in ("none", "os")}
    sizes = [expert_bytes // 16, expert_bytes // 8, expert_bytes // 4, expert_bytes // 2, expert_bytes]
    by_size = [bench(pack, cache=f"lru:{s}", experts_per_token=4, **run) for s in sizes]
    for c in by_k:
        print(f"cache {c}: " + ", ".join(f"K={k} {t:.2f} tok/s" for k, t in zip(ks, by_k[c])))
    for s, r in zip(sizes, by_size):
        print(
            f"lru {s / 2**30:.2f} GiB ({s / expert_bytes:.0%} of experts), K=4: {r['decode_tps']:.2f} tok/s, "
            f"hit rate {r['hit_rate']:.0%}"
        )
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for c, label in (("none", "cold (--cache none)"), ("os", "page cache (--cache os)")):
        a.plot(ks, by_k[c], marker="o", label=label)
    a.set(xlabel="experts per token (K)", ylabel="decode tok/s", title=f"{args.like}, {args.layers} layer(s)")
    a.legend()
    b.plot([s / expert_bytes for s in sizes], [r["decode_tps"] for r in by_size], marker="o", label="decode tok/s")
    b2 = b.twinx()
    b2.plot([s / expert_bytes for s in sizes], [r["hit_rate"] for r in by_size], "g--", marker="x", label="hit rate")
    b.set(xlabel="LRU cache / all expert bytes", ylabel="decode tok/s (K=4)", title=f"routing {args.routing}")
    b2.set_ylabel("hit rate")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    shutil.rmtree(pack, ignore_errors=True)


if __name__ == "__main__":
    main()
