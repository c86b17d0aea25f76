"""Expert reads as decode issues them: K random experts of a layer at a time through the expert
store (one preadv each, in flight together, then the next layer), against the bench probe's
continuous stream of the same blocks. Cold (``--cache none``) or from the page cache (``os``; read
the files first, e.g. ``cat PACK/experts/*.bin > /dev/null``), checksums on and off, by thread count.

Usage: python benchmarks/read_batches.py PACK [--cache none] [-k 4] [--tokens 12] [--threads 2,4,8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from moestream.layouts import open_pack
from moestream.runtime.bench import read_bandwidth
from moestream.runtime.expert_store import ExpertStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pack")
    ap.add_argument("--cache", default="none")
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--threads", default="4")
    args = ap.parse_args()
    p = open_pack(args.pack)
    m = p.manifest
    rng = np.random.default_rng(0)
    try:
        for threads in [int(t) for t in args.threads.split(",")]:
            if args.cache == "none":
                probe = read_bandwidth(p.root, m, reads=64, threads=threads) / 1e9
                print(f"threads {threads}: bench probe (continuous, cold) {probe:.2f} GB/s")
            for verify in (True, False):
                st = ExpertStore(p, cache=args.cache, verify=verify, threads=threads)
                n, t = 0, time.perf_counter()
                for _ in range(args.tokens):
                    for layer in m.moe_layers():
                        for _ in st.fetch(layer, np.sort(rng.choice(m.num_experts, args.k, replace=False))):
                            pass
                        n += args.k
                dt = time.perf_counter() - t
                st.close()
                print(f"threads {threads}, checksums {'on' if verify else 'off'}: {n * m.experts[0].stride / dt / 1e9:.2f}"
                      f" GB/s in batches of {args.k} ({args.cache})")
    finally:
        p.close()


if __name__ == "__main__":
    main()
