"""Per-token decode times of a pack and how much of each token waited for expert reads.

Prints every token's wall time and its wait inside the expert store's fetch (reads in flight), the
p50, and the mean of the rest (compute). ``--mlx-attention`` keeps MLX's own CPU attention, for an
A/B against moestream's BLAS attention in back-to-back runs.

Usage: python benchmarks/decode_timeline.py PACK [--cache none] [--prompt-tokens 64] [--tokens 20] [-k 4]
       [--mlx-attention]
"""

from __future__ import annotations

from moestream.runtime.cpu.threads import prefer_passive_wait

prefer_passive_wait()  # before torch or mlx-lm load libgomp, which reads OMP_WAIT_POLICY once

import argparse
import time

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

import moestream.runtime.store.expert_store as expert_store
from moestream.runtime import load
from moestream.runtime.model import cpu_layers
from moestream.runtime.model import runtime as runtime_mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pack")
    ap.add_argument("--cache", default="none")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--mlx-attention", action="store_true")
    args = ap.parse_args()
    if args.mlx_attention:
        cpu_layers.use_cpu_attention = lambda model: 0
        runtime_mod.use_cpu_attention = lambda model: 0
    waits: list[float] = []
    fetch = expert_store.ExpertStore.fetch

    def timed_fetch(self, layer, experts, overlap=None, many=False):
        it = fetch(self, layer, experts, overlap, many)
        while True:
            t = time.perf_counter()
            try:
                group = next(it)
            except StopIteration:
                return
            waits.append(time.perf_counter() - t)
            yield group

    expert_store.ExpertStore.fetch = timed_fetch
    rt = load(args.pack, cache=args.cache, experts_per_token=args.k, tokenizer=False)
    vocab = int(rt.pack.manifest.config.get("vocab_size", 1000))
    try:
        with rt.prefill_logits_last():
            cache = make_prompt_cache(rt.model)
            prompt = np.random.default_rng(0).integers(0, vocab, (1, args.prompt_tokens))
            mx.eval(rt.model(mx.array(prompt), cache=cache))
        tok, ts, ws = mx.array([[5]]), [], []
        for _ in range(args.tokens + 2):
            waits.clear()
            t = time.perf_counter()
            tok = mx.argmax(rt.model(tok, cache=cache)[:, -1], axis=-1)[:, None]
            mx.eval(tok)
            ts.append(time.perf_counter() - t)
            ws.append(sum(waits))
    finally:
        rt.close()
    ts, ws = 1e3 * np.array(ts[2:]), 1e3 * np.array(ws[2:])  # the first two: compilation, first touches
    print(
        f"pack {args.pack}, cache {args.cache}, K={args.k}, prompt {args.prompt_tokens}, "
        f"attention {'mlx' if args.mlx_attention else 'moestream (BLAS)'}"
    )
    print("token ms:", np.round(ts).astype(int).tolist())
    print("read wait ms:", np.round(ws).astype(int).tolist())
    print(
        f"p50 {np.median(ts):.1f} ms per token; mean read wait {ws.mean():.1f} ms; mean rest {(ts - ws).mean():.1f} ms"
    )


if __name__ == "__main__":
    main()
