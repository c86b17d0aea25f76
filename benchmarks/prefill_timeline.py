"""When a cold prefill reads its experts: per MoE layer, the span of its reads and of its MoE call,
and the disk's throughput in 0.5 s windows, for one prompt chunk (after a 16-token warm-up).

Shows whether the disk idles while a layer's attention runs (``--prefill-buffer 0``: the decode
slabs, reads wait for the router) or reads through it (the prefill ring, default).

``--fresh-pages N``: also N serial ``O_DIRECT`` reads of expert blocks into never-touched page-aligned
memory, then into touched memory (why the ring keeps its pages and bench's warm-up touches them).

Usage: python benchmarks/prefill_timeline.py PACK [--prompt-tokens 512] [-k 4] [--prefill-buffer SIZE]
       [--fresh-pages 100]
"""

from __future__ import annotations

from moestream.runtime.cpu.threads import prefer_passive_wait

prefer_passive_wait()  # before torch or mlx-lm load libgomp, which reads OMP_WAIT_POLICY once

import argparse
import mmap
import os
import time

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from moestream.runtime import load
from moestream.runtime.options import parse_size


def fresh_pages(pack, n: int) -> None:
    """Serial O_DIRECT reads of n blocks into fresh, then touched, private anonymous memory."""
    rt = load(pack, tokenizer=False, cache="none", prefill_buffer=0)
    x = rt.pack.manifest.experts[0]
    rt.close()
    size = x.stride - x.stride % mmap.PAGESIZE
    fd = os.open(rt.pack.root / x.file, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, n * size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        view = memoryview(buf)
        for p, what in enumerate(("fresh pages", "touched pages")):
            t = time.perf_counter()
            for i in range(n):  # other blocks in the second pass
                os.preadv(fd, [view[i * size : (i + 1) * size]], x.expert_offset((i + p * n) % x.num_experts))
            print(f"{what}: {n * size / (time.perf_counter() - t) / 1e9:.2f} GB/s ({n} serial O_DIRECT reads)")
        view.release()
        buf.close()
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pack")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--prefill-buffer", default=None, help="ring bytes (e.g. 2G; 0: the decode slabs)")
    ap.add_argument("--fresh-pages", type=int, default=0)
    args = ap.parse_args()
    buf = None if args.prefill_buffer is None else parse_size(args.prefill_buffer)
    rt = load(args.pack, tokenizer=False, cache="none", experts_per_token=args.k, prefill_buffer=buf)
    st, events = rt.store, []
    read = st._read

    def timed_read(x, local, slab, slot):
        t = time.perf_counter()
        read(x, local, slab, slot)
        events.append(("read", x.layer, t, time.perf_counter(), x.stride))

    fetch = st.fetch

    def timed_fetch(layer, experts, overlap=None, many=False):
        t = time.perf_counter()
        yield from fetch(layer, experts, overlap, many)
        events.append(("moe", layer, t, time.perf_counter(), 0))

    st._read, st.fetch = timed_read, timed_fetch
    if st.prefill_stream is not None:
        st.prefill_stream.prefault()  # as bench's warm-up does
    vocab = int(rt.pack.manifest.config.get("vocab_size", 1000))
    rng = np.random.default_rng(0)
    try:
        with rt.prefill_logits_last():
            for tokens in (16, args.prompt_tokens):  # warm-up, then the chunk timed
                events.clear()
                cache = make_prompt_cache(rt.model)
                t0 = time.perf_counter()
                mx.eval(rt.model(mx.array(rng.integers(0, vocab, (1, tokens))), cache=cache))
                total = time.perf_counter() - t0
    finally:
        rt.close()
    reads = [e for e in events if e[0] == "read"]
    ring = f"ring of {st.prefill_stream.capacity} slots" if st.prefill_stream else "decode slabs"
    print(
        f"{args.pack}: {args.prompt_tokens} tokens, K={args.k}, {ring}: {total:.2f} s, "
        f"{sum(e[4] for e in reads) / 1e9:.2f} GB in {len(reads)} reads"
    )
    for layer in sorted({e[1] for e in events}):
        r = [e for e in reads if e[1] == layer]
        moe = [e for e in events if e[0] == "moe" and e[1] == layer]
        print(
            f"layer {layer}: reads {min(e[2] for e in r) - t0:.2f}-{max(e[3] for e in r) - t0:.2f} s, "
            f"MoE call {moe[0][2] - t0:.2f}-{moe[0][3] - t0:.2f} s"
        )
    ends = np.array([e[3] - t0 for e in reads])
    rate = np.bincount((ends // 0.5).astype(int), weights=[e[4] for e in reads]) / 1e9 / 0.5
    print("read GB/s per 0.5 s:", " ".join(f"{v:.2f}" for v in rate))
    if args.fresh_pages:
        fresh_pages(args.pack, args.fresh_pages)


if __name__ == "__main__":
    main()
