"""Where a decode token's resident products go: every int8-activation product of a resident linear
(``cpu_int8.qmv_int8``; not the routers' float products nor the experts), timed per weight shape
(calls per token, ms per token, bytes, GB/s), over a few decoded tokens of a pack.

Usage: python benchmarks/resident_products.py PACK [--cache os-map] [-k 4] [--tokens 20]
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
from moestream.runtime.cpu import int8 as cpu_int8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pack")
    ap.add_argument("--cache", default="os-map")
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=20)
    args = ap.parse_args()
    spent, calls, size = collections.Counter(), collections.Counter(), {}
    inner = cpu_int8.qmv_int8

    def timed(x, w, scales, biases, bits, group_size, *a, **kw):
        t = time.perf_counter()
        try:
            return inner(x, w, scales, biases, bits, group_size, *a, **kw)
        finally:
            key = (tuple(w.shape), str(scales.dtype), bits, group_size)
            spent[key] += time.perf_counter() - t
            calls[key] += 1
            size[key] = w.nbytes + scales.nbytes + biases.nbytes

    cpu_int8.qmv_int8 = timed
    rt = load(args.pack, cache=args.cache, experts_per_token=args.k, tokenizer=False)
    try:
        rng = np.random.default_rng(0)
        vocab = int(rt.pack.manifest.config.get("vocab_size", 1000))
        cache = make_prompt_cache(rt.model)
        with rt.prefill_logits_last():
            mx.eval(rt.model(mx.array(rng.integers(0, vocab, (1, 16))), cache=cache))
        for _ in range(4):  # warm-up
            mx.eval(rt.model(mx.array([[int(rng.integers(vocab))]]), cache=cache))
        spent.clear()
        calls.clear()
        t0 = time.perf_counter()
        for _ in range(args.tokens):
            mx.eval(rt.model(mx.array([[int(rng.integers(vocab))]]), cache=cache))
        per = 1e3 / args.tokens
        print(f"{args.pack}, cache {args.cache}, K={args.k}: {(time.perf_counter() - t0) * per:.1f} ms per token")
        total = 0.0
        for key in sorted(spent, key=lambda q: -spent[q]):
            total += spent[key] * per
            print(
                f"  {key[0]} {key[1]} scales, {key[2]}-bit g{key[3]}: {calls[key] / args.tokens:.0f} a token, "
                f"{spent[key] * per:.2f} ms, {size[key] * calls[key] / args.tokens / 1e6:.1f} MB, "
                f"{size[key] * calls[key] / spent[key] / 1e9:.1f} GB/s"
            )
        print(f"  resident products: {total:.1f} ms per token")
    finally:
        rt.close()


if __name__ == "__main__":
    main()
