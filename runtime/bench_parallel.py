"""``bench`` under ``mlx.launch``: each rank's expert reads, their sum, and the roofline for N disks.

Rank 0's store counts its own reads only; the other ranks' counters come with every layer's all_sum
(:class:`~moestream.runtime.model.expert_parallel.Share`). The disk probe runs on every rank at once,
each on its own disk: on one machine the ranks share one disk, and the probe shows it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def start(rt) -> dict | None:
    """Before the timed runs: the ranks' counters so far (None outside a group)."""
    return rt.parallel.figures() if rt.parallel is not None else None


def finish(rt, before: dict | None, pack: Path, reads: int, threads: int, direct: bool) -> dict | None:
    """After the timed runs: each rank's expert bytes per decoded token since :func:`start`, and the
    cold read bandwidth of every rank's disk with all ranks reading at once."""
    if before is None:
        return None
    now = rt.parallel.figures()
    tokens = max(1, now["decode_tokens"] - before["decode_tokens"])
    per_rank = [(a - b) / tokens for a, b in zip(now["decode_bytes"], before["decode_bytes"])]
    # bench's own probe, on every rank at once (each reads other blocks: on one disk they would share
    # the page cache otherwise)
    m = rt.pack.manifest
    args = [(Path(pack), m, reads, threads, 2 + r, direct) for r in range(now["ranks"])]
    probes = [b / 1e9 for b in rt.parallel.group.every_rank("moestream.runtime.bench", "read_bandwidth", args)]
    # each rank's peak RSS: the other ranks hold slabs, not the resident weights
    rss = rt.parallel.group.every_rank("moestream.runtime.generate", "peak_rss", [()] * now["ranks"])
    return {
        "ranks": now["ranks"],
        "hosts": now["hosts"],
        "bytes_per_token": per_rank,
        "read_gbps_at_once": probes,
        "peak_rss_bytes": rss,
    }


def roofline(out: dict, par: dict | None) -> None:
    """``out["expert_parallel"]``: the ranks' figures and the decode limits for N disks. Each layer waits
    for its slowest rank, which reads ceil(K/N) of the K experts; t_mem stays (rank 0 computes the rest)."""
    if par is None:
        return
    n, k = par["ranks"], out["k"]
    share = math.ceil(k / n) / k
    t_io_n = out["t_io_ms"] * share / 1e3
    t_mem = out["t_mem_ms"] / 1e3
    at_once = min(par["read_gbps_at_once"])
    t_io_shared = out["expert_bytes_per_token"] * share / (at_once * 1e9)
    total = sum(par["bytes_per_token"])
    out["expert_parallel"] = {
        **par,
        "all_bytes_per_token": total,
        "all_read_gbps": total * out["decode_tps"] / 1e9,
        "share_per_layer": share,
        "n_disk_t_io_ms": 1e3 * t_io_n,
        "n_disk_roofline_tps": 1 / (t_io_n + t_mem),
        "measured_disks_roofline_tps": 1 / (t_io_shared + t_mem),
        "decode_vs_n_disk_roofline": out["decode_tps"] * (t_io_n + t_mem),
    }


def format_lines(r: dict) -> list[str]:
    p = r.get("expert_parallel")
    if not p:
        return []
    by_rank = ", ".join(f"{i} ({h}) {b / 1e6:.2f} MB" for i, (h, b) in enumerate(zip(p["hosts"], p["bytes_per_token"])))
    disks = ", ".join(f"{g:.2f}" for g in p["read_gbps_at_once"])
    rss = ", ".join(f"{b / 2**20:.0f}" for b in p.get("peak_rss_bytes", []))
    return [
        f"expert parallel over {p['ranks']} ranks: experts read per decoded token by rank {by_rank}; all ranks "
        f"{p['all_bytes_per_token'] / 1e6:.2f} MB per token, {p['all_read_gbps']:.2f} GB/s together "
        "(the decode line above counts rank 0's reads only)",
        f"cold read with every rank reading at once: {disks} GB/s (rank 0, 1, ...); "
        f"{float(np.sum(p['read_gbps_at_once'])):.2f} GB/s together; peak RSS by rank {rss} MiB",
        f"roofline over {p['ranks']} disks: the slowest rank reads {p['share_per_layer']:.0%} of a layer's experts, "
        f"t_io {p['n_disk_t_io_ms']:.1f} ms -> {p['n_disk_roofline_tps']:.2f} tok/s with {p['ranks']} disks as fast "
        f"as rank 0's alone; {p['measured_disks_roofline_tps']:.2f} tok/s with the disks as measured at once; "
        f"decode / roofline over {p['ranks']} disks: {p['decode_vs_n_disk_roofline']:.2f}",
    ]
