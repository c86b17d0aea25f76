"""``moestream doctor``: what this machine is and what it would do with the models people run.

One report a user pastes into an issue (markdown, or JSON): the platform, chip, RAM, MLX and its
device, which kernels run and whether they passed their self-check against MLX's own ops, the disk's
cold read speed at a 397B expert's read size (with the platform's cache bypass), memory bandwidth, a
small synthetic pack's cold and warm decode against the roofline, and for each known model the bytes
a token reads at 4 and 2 bits and the tok/s the measured limits allow. Bounded: a few minutes on a
slow machine, at most about 2 GB of scratch disk, removed afterwards.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from moestream.runtime.options import RuntimeOptions
from moestream.runtime.store import system

log = logging.getLogger(__name__)

KNOWN = [  # (row label, known config name, group size of 4-bit experts as converted; 2-bit: 64)
    ("Qwen3.5-397B-A17B", "qwen3.5-397b-a17b", 64),
    ("Qwen3.5-122B-A10B", "qwen3.5-122b-a10b", 64),
    ("Qwen3.5-35B-A3B", "qwen3.5-35b-a3b", 64),
    ("Qwen3-30B-A3B", "qwen3-30b-a3b", 64),
    ("DeepSeek-V3", "deepseek-v3", 64),
    ("Kimi K2 (K2.5's text model)", "kimi-k2.5", 32),  # its INT4 release passes through at group 32
]


def stride_397b() -> int:
    """Bytes one Qwen3.5-397B-A17B expert occupies at 4 bits, g64 (one read of the store)."""
    from moestream.layouts import expert_block_layout, round_up

    return round_up(expert_block_layout(4096, 1024, 4, 64, 64, "bfloat16")[1], 16384)


def _chip() -> str:
    try:
        if system.is_macos():
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
            return out.stdout.strip() or platform.processor()
        if sys.platform.startswith("linux"):
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import mlx.core as mx

    from moestream import metal

    return {
        "platform": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python": platform.python_version(),
        "chip": _chip(),
        "cores": system.cpu_count(),
        "ram_bytes": system.ram_bytes(),
        "mlx": getattr(mx, "__version__", "?"),
        "mlx_device": str(mx.default_device()),
        "metal": metal.available(),
    }


def kernel_check() -> dict:
    """Which kernels ``--kernels auto`` runs here, and their check against MLX's own ops at a 397B
    layer's shapes (4- and 2-bit)."""
    import mlx.core as mx

    from moestream import metal

    out = {"kernels": "metal" if metal.available() else "numba", "checks": []}
    h, i = 4096, 1024
    for bits in (4, 2):
        if metal.available():
            from moestream.metal.selfcheck import check

            why = check(h, i, (bits, 64), (bits, 64), mx.float32)
            out["checks"].append({"what": f"Metal experts {bits}-bit g64", "ok": why is None, "detail": why or ""})
        else:
            from moestream.runtime.cpu.kernels import qmm

            rng = np.random.default_rng(bits)
            w = mx.array(rng.standard_normal((i, h)).astype(np.float32) * 0.05)
            qw, s, b = mx.quantize(w, group_size=64, bits=bits)
            x = rng.standard_normal((1, h)).astype(np.float32)
            want = np.array(mx.quantized_matmul(mx.array(x), qw, s, b, transpose=True, group_size=64, bits=bits))
            got = qmm(x, np.array(qw), np.array(s), np.array(b), bits, 64)
            err = float(np.abs(got - want).max() / np.abs(want).max())
            # int8 activations round the input: ~1e-2 of the largest output is their expected error
            out["checks"].append({"what": f"numba product {bits}-bit g64", "ok": err < 3e-2, "detail": f"{err:.1e}"})
    return out


def disk_read(folder: Path, total: int = 512 << 20, stride: int | None = None, threads: int = 4) -> dict:
    """Cold random reads of ``stride`` bytes (a 397B expert) from a scratch file of ``total`` bytes,
    written and read with the platform's cache bypass (O_DIRECT or dropped pages on Linux, F_NOCACHE on
    macOS); the file is removed afterwards."""
    import mmap

    stride = stride or stride_397b()
    n = max(8, total // stride)
    path = folder / "doctor-read-probe.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        system.bypass_cache(fd)
        block = np.random.default_rng(0).integers(0, 256, stride, dtype=np.uint8).tobytes()
        for _ in range(n):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        rfd, direct = system.open_uncached(path)
        dropped = direct or system.drop_cached(rfd) or system.is_macos()
        order = np.random.default_rng(1).permutation(n)
        bufs = [mmap.mmap(-1, stride) for _ in range(threads)]  # page-aligned, as O_DIRECT needs

        def one(j: int) -> int:
            return system.preadv(rfd, [bufs[j % threads]], int(order[j]) * stride)

        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            got = sum(pool.map(one, range(n)))
        dt = time.perf_counter() - t
        os.close(rfd)
    finally:
        path.unlink(missing_ok=True)
    return {
        "read_bytes": stride,
        "reads": n,
        "threads": threads,
        "gbps": got / dt / 1e9,
        "direct_io": direct,
        "cache_bypassed": bool(dropped),
    }


def decode(
    folder: Path,
    like: str = "qwen3.5-397b-a17b",
    layers: int = 2,
    experts: int = 16,
    k: int = 4,
    prompt_tokens: int = 16,
    gen_tokens: int = 8,
    pack: Path | None = None,
) -> dict:
    """Cold (``--cache none``) and warm (``os-map`` on the CPU, ``os`` on Metal; after a first pass)
    decode of ``pack``, or of a small
    synthetic pack with ``like``'s shapes written into ``folder`` (removed afterwards)."""
    from moestream.convert.synth import synth
    from moestream.runtime.bench import bench

    made = None
    if pack is None:
        made = pack = folder / "doctor-pack"
        synth(like, pack, layers=layers, experts=experts, bits=4, force=True)
    try:
        runs = {}
        from moestream import metal

        # warm: page-cache hits computed in place where the numba kernels run (the fastest warm policy)
        warm = "os" if metal.available() else "os-map"
        for name, cache in (("cold", "none"), ("warm", warm)):
            opts = RuntimeOptions(cache=cache, experts_per_token=k)
            if name == "warm":  # a first pass puts every expert in the page cache
                from moestream.layouts import Manifest

                for x in Manifest.load(pack).experts:
                    with open(Path(pack) / x.file, "rb") as f:
                        while f.read(8 << 20):
                            pass
            r = bench(pack, opts, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, baselines=False)
            runs[name] = {
                key: r[key]
                for key in (
                    "decode_tps",
                    "prompt_tps",
                    "roofline_fraction",
                    "cold_roofline_fraction",
                    "cold_roofline_tps",
                    "warm_roofline_tps",
                    "raw_read_gbps",
                    "mem_gbps",
                    "bytes_per_token",
                    "hit_rate",
                )
            }
        return {
            "pack": str(pack),
            "synthetic": made is not None,
            "warm_cache": warm,
            "like": like if made else None,
            "k": k,
            "layers": layers if made else None,
            "experts": experts if made else None,
            **runs,
        }
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def known_models(disk_gbps: float, mem_gbps: float) -> list[dict]:
    """Bytes a token reads for each known model at its own K, 4 and 2 bits, and the tok/s the measured
    limits allow: cold (every expert from disk, then the resident weights) and warm (all in RAM)."""
    from moestream.convert.sizes import model_sizes

    rows = []
    for label, name, group in KNOWN:
        for bits in (4, 2):
            try:
                s = model_sizes(name, bits, group_size=group if bits == 4 else 64)
            except Exception as e:  # a family this build cannot plan (logged, row marked)
                log.info("%s: %s", name, e)
                rows.append({"model": label, "bits": bits, "error": str(e).splitlines()[0]})
                continue
            e, r = s["expert_bytes_per_token"], s["resident_bytes_per_token"]
            rows.append(
                {
                    "model": label,
                    "bits": bits,
                    "k": s["top_k"],
                    "expert_bytes_per_token": e,
                    "resident_bytes_per_token": r,
                    "pack_bytes": s["expert_bytes"] + s["resident_bytes"],
                    "cold_tps": 1 / (e / (disk_gbps * 1e9) + r / (mem_gbps * 1e9)),
                    "warm_tps": mem_gbps * 1e9 / (e + r),
                }
            )
    return rows


def doctor(pack: str | Path | None = None, workdir: str | Path | None = None, quick: bool = False) -> dict:
    """Run every check; returns the report as a dict (:func:`format_doctor` renders it).

    Args:
        pack: measure this pack's decode instead of a synthetic one.
        workdir: where scratch files go (default: a temporary folder; about 2 GB at most).
        quick: smaller probes (for tests: a 35B-A3B-shaped pack of 8 experts, 64 MB of disk reads).
    """
    from moestream.runtime.bench import memory_bandwidth

    t0 = time.perf_counter()
    report: dict = {"machine": machine()}
    report["kernels"] = kernel_check()
    base = Path(workdir) if workdir else None
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="moestream-doctor-", dir=base) as tmp:
        folder = Path(tmp)
        report["disk"] = disk_read(folder, total=(64 << 20) if quick else (512 << 20))
        report["memory_gbps"] = memory_bandwidth((256 << 20) if quick else (1 << 30)) / 1e9
        small = {"like": "qwen3.5-35b-a3b", "experts": 8, "k": 4} if quick else {}
        report["decode"] = decode(folder, pack=Path(pack) if pack else None, **small)
    report["known_models"] = known_models(report["disk"]["gbps"], report["memory_gbps"])
    report["seconds"] = time.perf_counter() - t0
    return report


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def format_doctor(r: dict) -> str:
    """The report as markdown."""
    m, k, d = r["machine"], r["kernels"], r["disk"]
    lines = [
        "# moestream doctor",
        "",
        "| | |",
        "|---|---|",
        f"| platform | {m['platform']}, Python {m['python']} |",
        f"| chip | {m['chip']}, {m['cores']} cores |",
        f"| RAM | {m['ram_bytes'] / 2**30:.1f} GiB |",
        f"| MLX | {m['mlx']}, device {m['mlx_device']}, Metal {'yes' if m['metal'] else 'no'} |",
        f"| kernels (auto) | {k['kernels']} |",
    ]
    for c in k["checks"]:
        lines.append(f"| check: {c['what']} | {'pass' if c['ok'] else 'FAIL'} {c['detail']} |")
    bypass = "O_DIRECT" if d["direct_io"] else "F_NOCACHE" if m["platform"].startswith("Darwin") else "pages dropped"
    lines += [
        f"| disk, cold {d['read_bytes'] / 2**20:.1f} MiB reads x{d['threads']} | {d['gbps']:.2f} GB/s ({bypass}) |",
        f"| memory | {r['memory_gbps']:.1f} GB/s |",
        "",
    ]
    dec = r["decode"]
    what = (
        f"synthetic {dec['like']}-shaped pack, {dec['layers']} layers x {dec['experts']} experts"
        if dec["synthetic"]
        else dec["pack"]
    )
    lines += [
        f"## Decode ({what}, K={dec['k']})",
        "",
        "| | tok/s | of the roofline | MB read from disk per token |",
        "|---|---|---|---|",
    ]
    for name in ("cold", "warm"):
        x = dec[name]
        name = f"warm ({dec.get('warm_cache', 'os')})" if name == "warm" else "cold (none)"
        frac = x["cold_roofline_fraction"] if name.startswith("cold") else x["roofline_fraction"]
        lines.append(f"| {name} | {x['decode_tps']:.2f} | {frac:.2f} | {x['bytes_per_token'] / 1e6:.1f} |")
    lines += [
        "",
        "## Known models on this machine (from the measured disk and memory speeds)",
        "",
        "| model | bits | K | expert bytes / token | resident bytes / token | pack | cold tok/s | warm tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["known_models"]:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['bits']} | | not plannable here: {row['error']} | | | | |")
            continue
        lines.append(
            f"| {row['model']} | {row['bits']} | {row['k']} | {_gb(row['expert_bytes_per_token'])} | "
            f"{_gb(row['resident_bytes_per_token'])} | {_gb(row['pack_bytes'])} | {row['cold_tps']:.2f} | "
            f"{row['warm_tps']:.2f} |"
        )
    lines += [
        "",
        "Cold: every routed expert read from disk, then the resident weights from RAM (serial);",
        "warm: everything in RAM. Real decode reaches a fraction of these (see the decode table).",
        f"Report made in {r['seconds']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"
