"""Where a streamed token's time goes: cProfile of prefill and decode on a pack, grouped by stage.

Stages: quantized kernels (``runtime/cpu/kernels.py``), waiting for expert reads (thread locks),
MLX evaluation plus array conversions (``numpy.array`` on MLX arrays forces MLX to compute what
precedes it: attention, gated-delta, norms), and widening bf16 scales.

Usage: python benchmarks/profile_decode.py PACK [-k 4] [--cache none] [--prompt-tokens 512] [--tokens 5]
   or: python benchmarks/profile_decode.py --synth qwen3.5-397b-a17b --layers 2 [...]
"""

from __future__ import annotations

from moestream.runtime.cpu.threads import prefer_passive_wait

prefer_passive_wait()  # before torch or mlx-lm load libgomp, which reads OMP_WAIT_POLICY once

import argparse
import cProfile
import pstats
import shutil
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from moestream.convert.synth import synth
from moestream.runtime import load

STAGES = {
    "quantized kernels": ("cpu_kernels.py", "cpu_int8.py"),
    "waiting for expert reads": ("acquire",),
    "MLX evaluation + conversions": ("numpy.array",),
    "widening bf16 scales": ("as_f32",),
}


def by_stage(prof: cProfile.Profile) -> dict[str, float]:
    st = pstats.Stats(prof)
    out = {k: 0.0 for k in STAGES}
    for (file, _, name), (_, _, tottime, _, _) in st.stats.items():
        for stage, keys in STAGES.items():
            if any(k in file or k in name for k in keys):
                out[stage] += tottime
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pack", nargs="?", type=Path)
    ap.add_argument("--synth", default=None, help="make a synthetic pack like this model first")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--cache", default="none")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path("bench-out"))
    args = ap.parse_args()
    pack = args.pack
    if args.synth:
        pack = args.workdir / "profile-pack"
        synth(args.synth, pack, layers=args.layers, force=True)
    rt = load(pack, cache=args.cache, experts_per_token=args.k, tokenizer=False)
    vocab = int(rt.pack.manifest.config.get("vocab_size", 1000))
    rng = np.random.default_rng(0)
    try:
        with rt.prefill_logits_last():
            mx.eval(rt.model(mx.array(rng.integers(0, vocab, (1, 16))), cache=make_prompt_cache(rt.model)))
            cache = make_prompt_cache(rt.model)
            prof = cProfile.Profile()
            t = time.perf_counter()
            prof.enable()
            mx.eval(rt.model(mx.array(rng.integers(0, vocab, (1, args.prompt_tokens))), cache=cache))
            prof.disable()
            total = time.perf_counter() - t
        print(f"prefill of {args.prompt_tokens} tokens: {total:.2f} s")
        for stage, sec in by_stage(prof).items():
            print(f"  {stage:<30} {sec:6.2f} s")
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        for i in range(args.tokens):
            mx.eval(rt.model(mx.array([[int(rng.integers(vocab))]]), cache=cache))
        prof.disable()
        per = (time.perf_counter() - t) / args.tokens
        print(f"decode: {1e3 * per:.0f} ms per token (K={args.k}, cache {args.cache})")
        for stage, sec in by_stage(prof).items():
            print(f"  {stage:<30} {1e3 * sec / args.tokens:6.0f} ms per token")
    finally:
        rt.close()
        if args.synth:
            shutil.rmtree(pack, ignore_errors=True)


if __name__ == "__main__":
    main()
