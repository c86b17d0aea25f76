"""One product per shared input, on and off: two runtimes of the same pack in one process, one with
:func:`moestream.runtime.model.shared_input.share_inputs` and one without, decoding in alternated rounds
(p50 of each round's tokens; the median over rounds is printed), so the machine's drift hits both.

Usage: python benchmarks/shared_input_ab.py PACK [--cache none] [-k 4] [--rounds 6] [--tokens 10]
"""

from __future__ import annotations

from moestream.runtime.cpu.threads import prefer_passive_wait

prefer_passive_wait()  # before torch or mlx-lm load libgomp, which reads OMP_WAIT_POLICY once

import argparse
import time

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

import moestream.runtime.model.runtime as model_mod
from moestream.runtime import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pack")
    ap.add_argument("--cache", default="none")
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=10)
    args = ap.parse_args()
    real = model_mod.share_inputs
    runtimes = {}
    try:
        for name, share in (("shared", real), ("alone", lambda model: 0)):
            model_mod.share_inputs = share
            runtimes[name] = load(args.pack, cache=args.cache, experts_per_token=args.k, tokenizer=False)
    finally:
        model_mod.share_inputs = real
    try:
        rng = np.random.default_rng(0)
        vocab = int(runtimes["shared"].pack.manifest.config.get("vocab_size", 1000))
        caches = {}
        for name, rt in runtimes.items():
            caches[name] = make_prompt_cache(rt.model)
            with rt.prefill_logits_last():
                mx.eval(rt.model(mx.array(rng.integers(0, vocab, (1, 16))), cache=caches[name]))
            for _ in range(4):  # warm-up
                mx.eval(rt.model(mx.array([[int(rng.integers(vocab))]]), cache=caches[name]))
        p50 = {name: [] for name in runtimes}
        for _ in range(args.rounds):
            for name, rt in runtimes.items():
                ts = []
                for _ in range(args.tokens):
                    t = time.perf_counter()
                    mx.eval(rt.model(mx.array([[int(rng.integers(vocab))]]), cache=caches[name]))
                    ts.append(time.perf_counter() - t)
                p50[name].append(1e3 * float(np.median(ts)))
        print(f"{args.pack}, cache {args.cache}, K={args.k}: p50 ms a token per round")
        for name, v in p50.items():
            print(f"  {name}: " + " ".join(f"{x:.1f}" for x in v) + f"; median {np.median(v):.1f}")
    finally:
        for rt in runtimes.values():
            rt.close()


if __name__ == "__main__":
    main()
