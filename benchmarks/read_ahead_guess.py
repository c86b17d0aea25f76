"""How often read-ahead's guess is right: layer L+1's router applied to layer L's MoE input, top-k,
against the experts layer L+1 then routes to, per pair of MoE layers (decode, one token at a time).

With ``--text`` the tokens come from a file through the pack's tokenizer (a trained model's real
routing); otherwise random tokens, every eighth fed and the rest greedy.

Usage: python benchmarks/read_ahead_guess.py PACK [-k 4] [--tokens 200] [--text FILE]
"""

from __future__ import annotations

from moestream.runtime.cpu.threads import prefer_passive_wait

prefer_passive_wait()  # before torch or mlx-lm load libgomp, which reads OMP_WAIT_POLICY once

import argparse

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from moestream.runtime import load
from moestream.runtime.model.blocks import moe_blocks
from moestream.runtime.model.streamed import StreamedSwitchGLU, router_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pack")
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--text", default=None)
    args = ap.parse_args()
    inputs: dict[int, list] = {}
    chosen: dict[int, list] = {}
    call = StreamedSwitchGLU.__call__

    def recording(self, x, indices):
        inputs.setdefault(self._layer, []).append(np.array(x.astype(mx.float32)).reshape(-1, x.shape[-1]))
        chosen.setdefault(self._layer, []).append(np.array(indices).reshape(-1, indices.shape[-1]))
        return call(self, x, indices)

    StreamedSwitchGLU.__call__ = recording
    rt = load(args.pack, cache="os", experts_per_token=args.k, tokenizer=args.text is not None)
    try:
        vocab = int(rt.pack.manifest.config.get("vocab_size", 1000))
        toks = rt.tokenizer.encode(open(args.text).read()[:20000])[: args.tokens] if args.text else None
        rng = np.random.default_rng(0)
        cache = make_prompt_cache(rt.model)
        tok = mx.array([[1]])
        for i in range(args.tokens):
            fed = toks[i] if toks else (int(rng.integers(vocab)) if i % 8 == 0 else None)
            tok = mx.array([[fed]]) if fed is not None else tok
            logits = rt.model(tok, cache=cache)
            if fed is None:
                tok = mx.argmax(logits[:, -1], -1)[:, None]
            mx.eval(logits, tok)
        blocks = moe_blocks(rt.model)
        layers = sorted(blocks)
        for a, b in zip(layers, layers[1:]):
            router = router_of(blocks[b])
            if router is None:
                print(f"layer {b}: its router is not a plain linear (no read-ahead)")
                continue
            g = np.array(router(mx.array(np.concatenate(inputs[a]))).astype(mx.float32))
            truth = np.concatenate(chosen[b])
            for width in (args.k, 2 * args.k):
                guess = np.argsort(-g, axis=-1)[:, :width]
                hit = np.mean([len(set(p) & set(c)) / args.k for p, c in zip(guess, truth)])
                print(
                    f"layers {a}->{b}: guessing {width} experts finds {hit:.0%} of the {args.k} routed "
                    f"(random: {width / g.shape[1]:.1%})"
                )
    finally:
        rt.close()


if __name__ == "__main__":
    main()
