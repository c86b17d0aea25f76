"""``moestream bench``: decode and prefill speed of a pack, against limits measured in the same run.

Figures (after a warm-up): prompt tok/s, decode tok/s (mean, per-token p50/p99), time to first token,
expert bytes per token, achieved read GB/s, cache hit rate, peak RSS; and the roofline:

- ``t_io``: expert bytes per token / the raw read bandwidth of the same files, same read size, same
  thread count, cold (a probe that drops the page cache of the blocks it reads first); this and the
  memory probe run before and after the runs, and their means are used;
- ``t_mem``: resident bytes touched per token / the memory read bandwidth (numpy sums over the compute threads);
- cold runs are compared with ``1 / (t_io + t_mem)``; warm runs (experts in RAM or page cache) with
  ``1 / ((expert + resident bytes) / memory bandwidth)``.

Baselines in the same run, as ratios: the same pack with every expert held in RAM (our own
no-streaming speed), mlx-lm's model on the same weights with MLX's own kernels, and (on the CPU
path) the naive streaming of llama.cpp: the expert files mmap'd and read by page faults.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path

import mlx.core as mx
import numba
import numpy as np

from moestream.layouts import Manifest
from moestream.runtime import bench_parallel
from moestream.runtime.generate import peak_rss
from moestream.runtime.options import RuntimeOptions
from moestream.runtime.store import system

log = logging.getLogger(__name__)


def memory_bandwidth(nbytes: int = 1 << 30, threads: int | None = None) -> float:
    """Read bandwidth of RAM in bytes/s: numpy sums of ``nbytes`` of float32 split over ``threads``
    (numba's compute threads by default) in parallel, best of 3. numpy's reduction is vectorized and
    releases the GIL; a scalar accumulation loop (this probe before) is bound by the latency of its
    adds, not by memory, and read 4-5x low on an AMD EPYC (7-9 against 28-38 GB/s)."""
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or numba.get_num_threads()
    a = np.ones(nbytes // 4, np.float32)
    parts = np.array_split(a, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda p: p[:1024].sum(), parts))  # start the threads
        for _ in range(3):
            t = time.perf_counter()
            total = sum(pool.map(lambda p: float(p.sum()), parts))
            best = max(best, a.nbytes / (time.perf_counter() - t))
    if abs(total - a.size) > 1e-3 * a.size:  # the sums must have read every element
        raise RuntimeError(f"memory probe summed {total}, not {a.size}")
    return best


def read_bandwidth(pack: Path, m: Manifest, reads: int, threads: int, seed: int = 0, direct: bool = False) -> float:
    """Cold read bandwidth in bytes/s: ``reads`` random expert blocks, one ``preadv`` of ``stride`` each,
    ``threads`` at a time, after dropping those blocks from the page cache; ``direct``: with
    ``O_DIRECT`` into page-aligned buffers, as the store reads for ``--cache none`` on the CPU."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(seed)
    picks = []  # (expert file, block position): every block of every file (tiers too) equally likely
    for _ in range(reads):
        x = m.experts[rng.integers(len(m.experts))]
        picks.append((x, int(rng.integers(x.num_experts))))
    fds = {x.file: os.open(pack / x.file, os.O_RDONLY) for x in m.experts}
    # as the store reads cold: O_DIRECT (Linux), else buffered reads dropped from the cache before
    # and after, or (macOS) reads that bypass the cache (F_NOCACHE)
    dfds = {x.file: system.open_direct(pack / x.file) for x in m.experts} if direct else {}
    dfds = dfds if dfds and None not in dfds.values() else {x.file: fds[x.file] for x in m.experts}
    for fd in fds.values():
        system.bypass_cache(fd)
    try:
        for x, e in picks:
            system.drop_cached(fds[x.file], x.expert_offset(e), x.stride)
        bufs = [mmap.mmap(-1, max(x.stride for x in m.experts)) for _ in range(threads)]  # page-aligned

        def one(i: int) -> int:
            x, e = picks[i]
            return system.preadv(dfds[x.file], [memoryview(bufs[i % threads])[: x.stride]], x.expert_offset(e))

        with ThreadPoolExecutor(threads) as pool:
            t = time.perf_counter()
            total = sum(pool.map(one, range(reads), chunksize=1))
            dt = time.perf_counter() - t
        for x, e in picks:
            system.drop_cached(fds[x.file], x.expert_offset(e), x.stride)
    finally:
        for fd in {*fds.values(), *dfds.values()}:
            os.close(fd)
    return total / dt


def resident_bytes_per_token(m: Manifest) -> int:
    """Resident bytes read per decoded token: everything but the embedding table (one row of it)."""
    total = 0
    for name, t in m.resident_tensors.items():
        n = int(np.prod(t.shape))
        size = n * 4 if t.dtype == "float32" else n * 2
        if t.bits < 16:
            size = n * t.bits // 8 + 2 * 2 * (n // t.group_size)
        total += size // t.shape[0] if "embed_tokens" in name else size
    return total


def decode_run(
    model, store, prompt_tokens: int, gen_tokens: int, vocab: int, seed: int = 0, rt=None, profile=None
) -> dict:
    """Prefill a random prompt, then greedy-decode; per-token times and bytes. ``profile``: a
    :class:`~moestream.runtime.model.profile.Profile` (active) that times each decoded token."""
    from contextlib import nullcontext

    with rt.prefill_logits_last() if rt is not None else nullcontext():
        return _decode_run(model, store, prompt_tokens, gen_tokens, vocab, seed, profile)


def _decode_run(model, store, prompt_tokens: int, gen_tokens: int, vocab: int, seed: int = 0, profile=None) -> dict:
    from mlx_lm.models.cache import make_prompt_cache

    rng = np.random.default_rng(seed)
    prompt = mx.array(rng.integers(0, vocab, (1, prompt_tokens)))
    cache = make_prompt_cache(model)
    b0 = store.stats.bytes_read if store else 0
    h0, m0 = (store.stats.hits, store.stats.misses) if store else (0, 0)
    ring = store.prefill_stream if store else None
    g0 = (ring.guessed, ring.guess_hits, store.stats.wasted) if ring else (0, 0, 0)
    t = time.perf_counter()
    logits = None
    for i in range(0, prompt_tokens, 512):  # prefill in chunks: each chunk reads its experts once
        logits = model(prompt[:, i : i + 512], cache=cache)
        mx.eval(logits, [c.state for c in cache])
    tok = mx.argmax(logits[:, -1], axis=-1)[:, None]
    mx.eval(tok)
    ttft = time.perf_counter() - t
    g1 = (ring.guessed, ring.guess_hits, store.stats.wasted) if ring else (0, 0, 0)
    b1 = store.stats.bytes_read if store else 0
    a1, ah1, m1 = (store.stats.ahead, store.stats.ahead_hits, store.stats.misses) if store else (0, 0, 0)
    p1 = store.stats.page_hits if store else 0
    times = []
    for _ in range(gen_tokens):
        t0 = time.perf_counter()
        if profile is not None:
            profile.start_token()
        logits = model(tok, cache=cache)
        tok = mx.argmax(logits[:, -1], axis=-1)[:, None]
        mx.eval(tok)
        if profile is not None:
            profile.stop_token()
        times.append(time.perf_counter() - t0)
    b2 = store.stats.bytes_read if store else 0
    total = sum(times)
    n = (store.stats.hits - h0 + store.stats.misses - m0) if store else 0
    return {
        "prompt_tokens": prompt_tokens,
        "prompt_tps": prompt_tokens / ttft,
        "ttft_s": ttft,
        "gen_tokens": gen_tokens,
        "decode_tps": gen_tokens / total,
        "token_ms_p50": 1e3 * float(np.percentile(times, 50)),
        "token_ms_p99": 1e3 * float(np.percentile(times, 99)),
        "prefill_bytes": b1 - b0,
        "bytes_per_token": (b2 - b1) / gen_tokens,
        "read_gbps": (b2 - b1) / total / 1e9,
        "hit_rate": (store.stats.hits - h0) / n if n else 0.0,
        "read_ahead_per_token": (store.stats.ahead - a1) / gen_tokens if store else 0.0,
        "page_hits_per_token": (store.stats.page_hits - p1) / gen_tokens if store else 0.0,
        "read_ahead_hit_rate": ((store.stats.ahead_hits - ah1) / max(1, store.stats.misses - m1)) if store else 0.0,
        "prefill_ring_slots": ring.capacity if ring else 0,
        "prefill_guessed": g1[0] - g0[0],
        "prefill_guess_hits": g1[1] - g0[1],
        "prefill_wasted_reads": g1[2] - g0[2],
    }


def bench(
    pack: str | Path,
    options: RuntimeOptions | None = None,
    *,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    repeat: int = 1,
    baselines: bool | tuple[str, ...] = True,
    profile: bool = False,
    **changes,
) -> dict:
    """Run the benchmark; returns every figure (the CLI prints them).

    ``options`` (and ``changes`` to it, as in :func:`~moestream.runtime.load`) say how the pack runs;
    the baselines take its kernels and K (``verify`` applies to this run; the resident baseline checks
    its blocks before timing; ``baselines``: True for all of :data:`BASELINES`, or some of them by
    name). ``profile``: after the timed runs, one more run of as many decoded
    tokens with :mod:`~moestream.runtime.model.profile` active: ``out["profile"]`` has milliseconds
    per token per kind of work, their sum, and the timed runs' mean token time to compare it with
    (the profile's own cost is what separates them)."""
    from moestream.runtime.model.runtime import load

    opts = (options or RuntimeOptions()).replace(**changes)
    cache, experts_per_token, kernels, verify = opts.cache, opts.experts_per_token, opts.kernels, opts.verify
    pack = Path(pack)
    m = Manifest.load(pack)
    k = experts_per_token or m.top_k
    vocab = int(m.config.get("vocab_size", 1000))
    rt = load(pack, opts, tokenizer=False)
    nthreads = rt.store._pool._max_workers
    out: dict = {
        "pack": str(pack),
        "cache": cache,
        "k": k,
        "threads": nthreads,
        "synthetic": m.synthetic,
        "layers": len(m.moe_layers()),
        "experts": m.num_experts,  # per MoE layer; a synthetic pack may hold fewer than its model
        "model_experts": int(m.source.get("model_experts", m.num_experts)) if m.synthetic else m.num_experts,
        "verify": verify,
        "repeat": repeat,
        "numba_threads": numba.get_num_threads(),
        "cpu_kernels": rt.cpu_kernels,
        "kernels": kernels,
    }
    expert_bytes = m.expert_bytes_per_token(k)  # tiered packs: as if routing were uniform
    res_bytes = resident_bytes_per_token(m)
    reads = max(64, 4 * k * len(m.moe_layers()))
    # The limits are probed before and after the runs and averaged: on a shared machine they drift
    # within minutes (both are reported).
    direct = rt.store.direct_io  # the probe reads as the run does
    out["direct_io"] = direct
    mem0, raw0 = memory_bandwidth() / 1e9, read_bandwidth(pack, m, reads=reads, threads=nthreads, direct=direct) / 1e9
    try:
        if rt.store.prefill_stream is not None:
            rt.store.prefill_stream.prefault()  # allocate: a user's second prompt finds it so too
        decode_run(rt.model, rt.store, 16, 4, vocab, seed=99, rt=rt)  # warm-up: compile, allocate
        par = bench_parallel.start(rt)  # under mlx.launch: every rank's reads (bench_parallel.py)
        runs = [decode_run(rt.model, rt.store, prompt_tokens, gen_tokens, vocab, seed=r, rt=rt) for r in range(repeat)]
        par = bench_parallel.finish(rt, par, pack, reads, nthreads, direct)
        if profile:
            out["profile"] = _profile_run(rt, prompt_tokens, gen_tokens, vocab, runs)
    finally:
        rt.close()
    mem1, raw1 = (
        memory_bandwidth() / 1e9,
        read_bandwidth(pack, m, reads=reads, threads=nthreads, seed=1, direct=direct) / 1e9,
    )
    out.update(
        mem_gbps=(mem0 + mem1) / 2,
        raw_read_gbps=(raw0 + raw1) / 2,
        mem_gbps_probes=[mem0, mem1],
        raw_read_gbps_probes=[raw0, raw1],
    )
    best = max(runs, key=lambda r: r["decode_tps"])
    out.update(best)
    out["peak_rss_bytes"] = peak_rss()
    if m.tiered and best["hit_rate"] == 0.0:
        # A tiered pack's blocks differ in size: the routing decides what a token reads, so the
        # roofline uses the bytes this run's decode read per token.
        expert_bytes = best["bytes_per_token"]
    t_io = expert_bytes / (out["raw_read_gbps"] * 1e9)
    t_mem = res_bytes / (out["mem_gbps"] * 1e9)
    out.update(
        expert_bytes_per_token=expert_bytes,
        resident_bytes_per_token=res_bytes,
        t_io_ms=1e3 * t_io,
        t_mem_ms=1e3 * t_mem,
        cold_roofline_tps=1 / (t_io + t_mem),
        warm_roofline_tps=out["mem_gbps"] * 1e9 / (expert_bytes + res_bytes),
    )
    out["roofline_fraction"] = out["decode_tps"] / (
        out["cold_roofline_tps"]
        if best["hit_rate"] < 0.5 and cache not in ("os", "os-map")
        else out["warm_roofline_tps"]
    )
    out["cold_roofline_fraction"] = out["decode_tps"] * (t_io + t_mem)
    bench_parallel.roofline(out, par)
    which = BASELINES if baselines is True else tuple(baselines or ())
    unknown = set(which) - set(BASELINES)
    if unknown:
        raise ValueError(f"baselines {sorted(unknown)}: expected some of {', '.join(BASELINES)}")
    if which:
        out["baselines"] = _baselines(pack, m, prompt_tokens, gen_tokens, experts_per_token, vocab, out, which)
    return out


def _profile_run(rt, prompt_tokens: int, gen_tokens: int, vocab: int, runs: list[dict]) -> dict:
    """One decode run with the profile active; its kinds against the timed runs' mean token time."""
    from moestream.runtime.model.profile import KINDS, profiling

    with profiling() as prof:
        r = decode_run(rt.model, rt.store, prompt_tokens, gen_tokens, vocab, seed=0, rt=rt, profile=prof)
    ms = prof.ms_per_token()
    token_ms = float(np.mean([1e3 / x["decode_tps"] for x in runs]))
    total = sum(ms.values())
    return {
        "ms_per_token": {k: ms[k] for k in KINDS},
        "sum_ms": total,
        "token_ms": token_ms,  # the timed runs' mean, without the profile
        "profiled_token_ms": 1e3 / r["decode_tps"],
        "sum_vs_token": total / token_ms,
        "layers": len(rt.pack.manifest.moe_layers()),
    }


def format_profile(p: dict) -> str:
    """The profile as a table: ms per token per kind, share, and per MoE layer."""
    from moestream.runtime.model.profile import LABELS

    lines = [f"profile of a decoded token ({p['layers']} MoE layers): ms per token, share, ms per layer"]
    for k, v in p["ms_per_token"].items():
        lines.append(f"  {LABELS[k]:<32} {v:8.2f}  {v / p['sum_ms']:6.1%}  {v / max(1, p['layers']):6.3f}")
    lines.append(
        f"  {'sum':<32} {p['sum_ms']:8.2f}  against {p['token_ms']:.2f} ms a token unprofiled "
        f"({p['sum_vs_token']:.2f}x)"
    )
    return "\n".join(lines)


BASELINES = ("naive", "resident", "mlx_lm")  # naive mmap streaming, every expert in RAM, mlx-lm's own kernels


def _baselines(pack, m, prompt_tokens, gen_tokens, experts_per_token, vocab, out, which=BASELINES) -> dict:
    from moestream.runtime.model.build import load_resident_model

    base = {}
    if out.get("cpu_kernels") and "naive" in which:
        # Cold runs compare with mmap whose pages are dropped after use (a model beyond RAM); others
        # with plain mmap, where the page cache keeps what it can.
        policy = "mmap-none" if out["cache"] == "none" else "mmap"
        base[f"naive_{policy.replace('-', '_')}"] = _mmap_baseline(
            pack, m, prompt_tokens, gen_tokens, experts_per_token, vocab, policy
        )
    if not {"resident", "mlx_lm"} & set(which):
        return base
    all_experts = sum(x.file_size for x in m.experts)
    ram = system.ram_bytes()
    if all_experts > ram // 3:
        log.warning("experts (%d bytes) do not fit comfortably in RAM: resident baselines skipped", all_experts)
        return base
    gc.collect()
    if "resident" in which:
        base["resident"] = _resident_baseline(pack, m, prompt_tokens, gen_tokens, experts_per_token, vocab, out)
        gc.collect()
    if "mlx_lm" not in which:
        return base
    # mlx-lm's own model and kernels on the same weights (all in RAM).
    model, p = load_resident_model(pack, dtype="float32")
    p.close()
    if experts_per_token:
        from moestream.runtime.model.blocks import moe_blocks, set_experts_per_token

        for mlp in moe_blocks(model).values():
            set_experts_per_token(mlp, experts_per_token)
    decode_run(model, None, 16, 2, vocab, seed=7)
    base["mlx_lm"] = decode_run(model, None, prompt_tokens, max(8, gen_tokens // 4), vocab, seed=0)
    del model
    gc.collect()
    return base


def _resident_baseline(pack, m, prompt_tokens, gen_tokens, experts_per_token, vocab, out) -> dict:
    """Our own runtime with every expert in RAM (an LRU cache that holds them all), warmed up first."""
    from moestream.runtime.model.runtime import load

    all_experts = sum(x.file_size for x in m.experts)
    rt = load(
        pack,
        cache=f"lru:{all_experts + (1 << 20)}",
        experts_per_token=experts_per_token,
        tokenizer=False,
        kernels=out["kernels"],
        expert_parallel=False,  # the baselines are one process
    )
    try:
        rt.store.prefetch_all()
        decode_run(rt.model, rt.store, prompt_tokens, 8, vocab, seed=7, rt=rt)
        # the best of as many runs as the run itself had (--repeat): on a noisy machine a single
        # baseline run against the best of several would flatter the ratio
        r = max(
            (
                decode_run(rt.model, rt.store, prompt_tokens, gen_tokens, vocab, seed=i, rt=rt)
                for i in range(out.get("repeat", 1))
            ),
            key=lambda x: x["decode_tps"],
        )
    finally:
        rt.close()
    return r


def _mmap_baseline(pack, m, prompt_tokens, gen_tokens, experts_per_token, vocab, policy: str = "mmap") -> dict:
    """The naive streaming baseline: expert files mmap'd, page faults load what the kernels touch.

    Starts cold (the files dropped from the page cache); the kernel's readahead and page cache
    work as they do for llama.cpp's mmap'd weights.
    """
    from moestream.runtime.model.runtime import load

    gc.collect()
    rt = load(pack, cache=policy, experts_per_token=experts_per_token, tokenizer=False, expert_parallel=False)
    try:
        rt.store.drop_page_cache()
        return decode_run(rt.model, rt.store, prompt_tokens, max(8, gen_tokens // 2), vocab, seed=0, rt=rt)
    finally:
        rt.close()


def format_bench(r: dict) -> str:
    experts = r.get("experts")
    of = f" of the model's {r['model_experts']}" if experts and r.get("model_experts", experts) != experts else ""
    shape = f"{r['layers']} MoE layers x {experts} experts{of}, " if experts else ""
    lines = [
        f"pack {r['pack']} ({'synthetic, ' if r['synthetic'] else ''}{shape}K={r['k']}, cache {r['cache']}, "
        f"{'' if r.get('verify', True) else 'checksums off, '}{'O_DIRECT reads, ' if r.get('direct_io') else ''}"
        f"{r['threads']} reader threads, {r['numba_threads']} compute threads)",
        f"prompt: {r['prompt_tokens']} tokens at {r['prompt_tps']:.2f} tok/s (time to first token {r['ttft_s']:.2f} s)",
        f"decode: {r['decode_tps']:.3f} tok/s (per token p50 {r['token_ms_p50']:.1f} ms, "
        f"p99 {r['token_ms_p99']:.1f} ms); "
        f"{r['bytes_per_token'] / 1e6:.1f} MB of experts read per token, {r['read_gbps']:.2f} GB/s; "
        f"hit rate {r['hit_rate']:.1%}; peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB",
        f"limits measured now (before, after): raw cold read {r['raw_read_gbps']:.2f} GB/s "
        f"({', '.join(f'{v:.2f}' for v in r.get('raw_read_gbps_probes', []))}), memory read {r['mem_gbps']:.2f} GB/s "
        f"({', '.join(f'{v:.2f}' for v in r.get('mem_gbps_probes', []))})",
        f"roofline: t_io {r['t_io_ms']:.1f} ms (experts {r['expert_bytes_per_token'] / 1e6:.1f} MB) + t_mem "
        f"{r['t_mem_ms']:.1f} ms (resident {r['resident_bytes_per_token'] / 1e6:.1f} MB) -> cold limit "
        f"{r['cold_roofline_tps']:.2f} tok/s, warm limit {r['warm_roofline_tps']:.2f} tok/s",
        f"decode / cold roofline: {r['cold_roofline_fraction']:.2f}; decode / roofline for this run: "
        f"{r['roofline_fraction']:.2f}",
    ]
    if r.get("page_hits_per_token"):
        lines.insert(3, f"page cache: {r['page_hits_per_token']:.1f} experts per token computed in place (os-map)")
    if r.get("read_ahead_per_token"):
        lines.insert(
            3,
            f"read-ahead: {r['read_ahead_per_token']:.1f} experts guessed per token, "
            f"{r['read_ahead_hit_rate']:.1%} of routed experts already read or in flight when routed",
        )
    if r.get("prefill_guessed"):
        lines.insert(
            2,
            f"prefill ring ({r['prefill_ring_slots']} slots): {r['prefill_guessed']} experts guessed at "
            f"layer entries, {r['prefill_guess_hits'] / r['prefill_guessed']:.1%} of them routed; "
            f"{r['prefill_wasted_reads']} wrong guesses read",
        )
    for name, b in r.get("baselines", {}).items():
        lines.append(
            f"baseline {name}: decode {b['decode_tps']:.3f} tok/s, prompt {b['prompt_tps']:.2f} tok/s -> "
            f"this run is {r['decode_tps'] / b['decode_tps']:.2f}x its decode, "
            f"{r['prompt_tps'] / b['prompt_tps']:.2f}x its prefill"
        )
    lines += bench_parallel.format_lines(r)
    lines.append(f"prefill / decode speed: {r['prompt_tps'] / r['decode_tps']:.1f}x")
    if r.get("profile"):
        lines.append(format_profile(r["profile"]))
    return "\n".join(lines)
