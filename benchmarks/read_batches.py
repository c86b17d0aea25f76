"""Expert reads as decode issues them: K random experts of a layer at a time through the expert
store (one preadv each, in flight together, then the next layer), against the bench probe's
continuous stream of the same blocks. Cold (``--cache none``) or from the page cache (``os``; read
the files first, e.g. ``cat PACK/experts/*.bin > /dev/null``), checksums on and off, by thread count.

``--raw``: the same batches without the store, cold: buffered ``preadv`` or ``O_DIRECT`` into
page-aligned buffers, each read whole or split into pieces over more threads, and page faults through
a mapping (what llama.cpp's reads are).

Usage: python benchmarks/read_batches.py PACK [--cache none] [-k 4] [--tokens 12] [--threads 2,4,8] [--raw]
"""

from __future__ import annotations

from moestream.runtime.cpu.threads import prefer_passive_wait

prefer_passive_wait()  # before torch or mlx-lm load libgomp, which reads OMP_WAIT_POLICY once

import argparse
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from moestream.layouts import open_pack
from moestream.runtime.bench import read_bandwidth
from moestream.runtime.store.expert_store import ExpertStore


def raw_batches(root, m, k: int, batches: int, rng) -> None:
    x = m.experts[0]
    stride = x.stride
    files = [root / e.file for e in m.experts]
    fds = {"buffered": [os.open(f, os.O_RDONLY) for f in files]}
    try:
        fds["O_DIRECT"] = [os.open(f, os.O_RDONLY | os.O_DIRECT) for f in files]
    except OSError as e:
        print(f"O_DIRECT: not on this filesystem ({e.strerror})")
    bufs = [mmap.mmap(-1, stride) for _ in range(k)]  # page-aligned, as O_DIRECT needs
    maps = [mmap.mmap(fd, 0, access=mmap.ACCESS_READ) for fd in fds["buffered"]]

    def drop():
        for fd in fds["buffered"]:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def timed(job, jobs, threads):
        drop()
        ts = []
        with ThreadPoolExecutor(threads) as ex:
            for _ in range(batches):
                picks = [(int(rng.integers(len(files))), int(rng.integers(x.num_experts))) for _ in range(k)]
                t = time.perf_counter()
                list(ex.map(job, jobs(picks)))
                ts.append(time.perf_counter() - t)
                time.sleep(0.03)  # a layer's compute between batches
        return k * stride / float(np.median(ts)) / 1e9

    for kind, fd in fds.items():
        for split, threads in ((1, k), (2, 2 * k), (4, 4 * k), (16, 16 * k)):
            part = stride // split
            jobs = lambda picks: [
                (fd[f], memoryview(bufs[i])[s * part : (s + 1) * part], x.expert_offset(e) + s * part)
                for i, (f, e) in enumerate(picks)
                for s in range(split)
            ]
            gbps = timed(lambda j: os.preadv(j[0], [j[1]], j[2]), jobs, threads)
            print(f"raw {kind}, each read in {split} piece(s), {threads} threads: {gbps:.2f} GB/s in batches of {k}")
    # page faults: two threads touch one page in every 4 KiB of each half of each expert
    jobs = lambda picks: [(f, x.expert_offset(e) + h * (stride // 2)) for f, e in picks for h in (0, 1)]
    touch = lambda j: int(np.frombuffer(maps[j[0]], np.uint8, count=stride // 2, offset=j[1])[::4096].sum())
    print(
        f"raw page faults through a mapping, 2 threads per expert: {timed(touch, jobs, 2 * k):.2f} GB/s "
        f"in batches of {k}"
    )
    for mm in maps:
        mm.close()
    for v in fds.values():
        for fd in v:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pack")
    ap.add_argument("--cache", default="none")
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--threads", default="4")
    ap.add_argument("--raw", action="store_true", help="also time the raw read variants (cold)")
    args = ap.parse_args()
    p = open_pack(args.pack)
    m = p.manifest
    rng = np.random.default_rng(0)
    try:
        if args.raw:
            raw_batches(p.root, m, args.k, 4 * args.tokens, rng)
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
                print(
                    f"threads {threads}, checksums {'on' if verify else 'off'}: "
                    f"{n * m.experts[0].stride / dt / 1e9:.2f}"
                    f" GB/s in batches of {args.k} ({args.cache})"
                )
    finally:
        p.close()


if __name__ == "__main__":
    main()
