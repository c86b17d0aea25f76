"""Wall time per stage of a streamed prefill and decode, timed around the kernels (no profiler, so
the figures are what a run spends; nested stages overlap: a layer's MoE call contains its shared
expert's linears).

``--direct-ab``: instead, cold decode (``--cache none``) alternated with and without ``O_DIRECT``
reads (buffered reads dropped after use), p50 per token each time.

Usage: python benchmarks/stage_timing.py PACK [--cache os-map] [-k 4] [--prompt-tokens 512] [--tokens 30]
   or: python benchmarks/stage_timing.py PACK --direct-ab [--repeat 3] [--tokens 24]
(for a warm run read the expert files first: ``cat PACK/experts/*.bin > /dev/null``)
"""

from __future__ import annotations

from moestream.runtime.cpu.threads import prefer_passive_wait

prefer_passive_wait()  # before torch or mlx-lm load libgomp, which reads OMP_WAIT_POLICY once

import argparse
import collections
import time

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from moestream.runtime import load
from moestream.runtime.cpu import attention as cpu_attention
from moestream.runtime.cpu import delta as cpu_delta
from moestream.runtime.cpu import int8 as cpu_int8
from moestream.runtime.cpu import kernels as cpu_kernels
from moestream.runtime.model import cpu_layers, streamed
from moestream.runtime.store import expert_store

SPENT: collections.Counter = collections.Counter()
CALLS: collections.Counter = collections.Counter()
STAGES = [
    (cpu_int8, "qmv_int8", "resident int8 products"),
    (cpu_int8, "qmm_experts_int8", "decode experts (int8)"),
    (cpu_int8, "qmm_grouped_int8", "prefill experts (int8, grouped)"),
    (cpu_kernels, "_qmm_blas", "BLAS products"),
    (cpu_kernels, "_qmm_pow2", "float products (8-bit router)"),
    (cpu_int8, "quantize_activations", "int8 quantizer"),
    (cpu_delta, "recurrence", "gated-delta recurrence"),
    (cpu_attention, "sdpa", "attention"),
    (expert_store.ExpertStore, "_page_cache_hits", "os-map: mincore + first-use checksums"),
    (cpu_layers.CpuQuantizedLinear, "__call__", "all resident linears (with glue)"),
    (streamed.StreamedSwitchGLU, "__call__", "all MoE calls (with reads)"),
]


def _timed(owner, name: str, label: str) -> None:
    f = getattr(owner, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            SPENT[label] += time.perf_counter() - t
            CALLS[label] += 1

    setattr(owner, name, wrapper)


def _decode_p50(rt, tokens: int, rng, vocab: int) -> tuple[float, list[float]]:
    cache = make_prompt_cache(rt.model)
    with rt.prefill_logits_last():
        mx.eval(rt.model(mx.array(rng.integers(0, vocab, (1, 16))), cache=cache))
    for _ in range(4):  # warm-up: first calls of each shape
        mx.eval(rt.model(mx.array([[int(rng.integers(vocab))]]), cache=cache))
    SPENT.clear()
    CALLS.clear()
    ts = []
    for _ in range(tokens):
        t = time.perf_counter()
        mx.eval(rt.model(mx.array([[int(rng.integers(vocab))]]), cache=cache))
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts)), ts


def direct_ab(pack: str, k: int, tokens: int, repeat: int) -> None:
    orig = expert_store.ExpertStore.__init__
    for r in range(repeat):
        for direct in (True, False):

            def init(self, *a, _direct=direct, **kw):
                kw["cpu_only"] = kw.get("cpu_only", False) and _direct  # cpu_only is what allows O_DIRECT
                orig(self, *a, **kw)

            expert_store.ExpertStore.__init__ = init
            rt = load(pack, cache="none", experts_per_token=k, tokenizer=False)
            try:
                used = rt.store.direct_io  # else buffered reads
                p50, _ = _decode_p50(
                    rt, tokens, np.random.default_rng(r), int(rt.pack.manifest.config.get("vocab_size", 1000))
                )
            finally:
                rt.close()
                expert_store.ExpertStore.__init__ = orig
            print(f"run {r + 1}: {'O_DIRECT' if used else 'buffered'} cold decode p50 {p50:.1f} ms", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pack")
    ap.add_argument("--cache", default="os-map")
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--direct-ab", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.direct_ab:
        direct_ab(args.pack, args.k, args.tokens, args.repeat)
        return
    for owner, name, label in STAGES:
        _timed(owner, name, label)
    rt = load(args.pack, cache=args.cache, experts_per_token=args.k, tokenizer=False)
    rng = np.random.default_rng(0)
    vocab = int(rt.pack.manifest.config.get("vocab_size", 1000))
    try:
        with rt.prefill_logits_last():
            mx.eval(rt.model(mx.array(rng.integers(0, vocab, (1, 16))), cache=make_prompt_cache(rt.model)))
            SPENT.clear()
            CALLS.clear()
            t = time.perf_counter()
            mx.eval(
                rt.model(mx.array(rng.integers(0, vocab, (1, args.prompt_tokens))), cache=make_prompt_cache(rt.model))
            )
            total = time.perf_counter() - t
        print(f"prefill of {args.prompt_tokens} tokens (cache {args.cache}): {total:.2f} s")
        for label, sec in SPENT.most_common():
            print(f"  {label:<40} {sec:7.2f} s ({CALLS[label]} calls)")
        p50, ts = _decode_p50(rt, args.tokens, rng, vocab)
        print(f"decode (cache {args.cache}, K={args.k}): p50 {p50:.1f} ms, mean {1e3 * np.mean(ts):.1f} ms per token")
        for label, sec in SPENT.most_common():
            print(f"  {label:<40} {1e3 * sec / args.tokens:7.1f} ms per token")
    finally:
        rt.close()


if __name__ == "__main__":
    main()
