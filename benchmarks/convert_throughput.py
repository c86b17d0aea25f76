"""Converter throughput and peak memory on a generated checkpoint with a > 2 GB fused expert tensor.

Generates (once) a Qwen3.5-MoE checkpoint in the hub's BF16 layout with the real 397B expert shapes
(hidden 4096, expert intermediate 1024) and enough experts that one layer's fused ``gate_up_proj``
exceeds 2 GB, then runs ``moestream convert`` in a child process and reports, from the same run:

- converter throughput in M params/s and source GB/s;
- the raw read speed of the same source files (a plain sequential read, page cache as it is), so the
  converter's figure comes with its distance to the disk;
- the single-thread speed of the rtn kernel on one expert matrix, times the worker count;
- the child's peak RSS against the bound "1 GiB + a few experts' source bytes per worker".

Usage: python benchmarks/convert_throughput.py [--experts 128] [--bits 4] [--jobs 2] [--workdir DIR]
"""

from __future__ import annotations

from moestream.runtime.cpu.threads import prefer_passive_wait

prefer_passive_wait()  # before torch or mlx-lm load libgomp, which reads OMP_WAIT_POLICY once

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_source(folder: Path, experts: int, layers: int) -> Path:
    from moestream.convert.tiny import tiny_config, write_tiny_checkpoint

    if (folder / "config.json").exists():
        return folder
    cfg = tiny_config(
        hidden_size=4096,
        moe_intermediate_size=1024,
        shared_expert_intermediate_size=1024,
        num_experts=experts,
        num_experts_per_tok=10,
        num_hidden_layers=layers,
        full_attention_interval=layers,
        num_attention_heads=32,
        num_key_value_heads=2,
        head_dim=256,
        linear_num_key_heads=16,
        linear_num_value_heads=64,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        vocab_size=8192,
    )
    t = time.perf_counter()
    write_tiny_checkpoint(folder, cfg, max_shard_bytes=4 << 30)
    print(f"generated {folder} in {time.perf_counter() - t:.1f} s", flush=True)
    return folder


def raw_read_gbps(folder: Path) -> float:
    files = sorted(folder.glob("*.safetensors"))
    total, t = 0, time.perf_counter()
    buf = bytearray(64 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return total / (time.perf_counter() - t) / 1e9


def kernel_mparams(bits: int) -> float:
    from moestream.quant import quantize_with_error

    w = np.random.default_rng(0).standard_normal((1024, 4096), dtype=np.float32)
    quantize_with_error(w, bits, 64, "bfloat16", "rtn")  # compile
    t = time.perf_counter()
    for _ in range(3):
        quantize_with_error(w, bits, 64, "bfloat16", "rtn")
    return 3 * w.size / (time.perf_counter() - t) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--workdir", type=Path, default=Path("bench-out"))
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and pack")
    args = ap.parse_args()

    src = make_source(args.workdir / "source", args.experts, args.layers)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    from moestream.layouts import SafetensorsReader

    biggest, params = 0, 0
    for shard in sorted(set(index["weight_map"].values())):
        with SafetensorsReader(src / shard) as r:
            for t in r.tensors.values():
                biggest = max(biggest, t.nbytes)
                params += t.nbytes // 2
    gbps = raw_read_gbps(src)
    kern = kernel_mparams(args.bits)
    out = args.workdir / "pack"
    shutil.rmtree(out, ignore_errors=True)
    cli_args = ["convert", str(src), "-o", str(out), "--bits", str(args.bits), "--jobs", str(args.jobs)]
    # The child reports its own VmHWM: ru_maxrss would include this process's footprint (fork + exec).
    child = (
        "import sys\nfrom moestream.main import cli\ntry:\n    cli(sys.argv[1:], standalone_mode=False)\n"
        "finally:\n    print('VmHWM', next(l.split()[1] for l in open('/proc/self/status') "
        "if l.startswith('VmHWM')), file=sys.stderr)"
    )
    cmd = [sys.executable, "-c", child, *cli_args]
    t = time.perf_counter()
    r = subprocess.run(cmd, check=True, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t
    peak = int(next(l.split()[1] for l in r.stderr.splitlines() if l.startswith("VmHWM"))) * 1024
    expert_src = 12_582_912 * 2
    bound = (1 << 30) + 4 * args.jobs * expert_src
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        f"command: moestream {' '.join(cli_args)}",
        f"source: {params / 1e9:.2f} B params, {src_bytes / 1e9:.2f} GB bf16; largest tensor (fused gate_up_proj) "
        f"{biggest / 1e9:.2f} GB",
        f"convert: {dt:.1f} s wall (incl. start-up) -> {params / dt / 1e6:.0f} M params/s, "
        f"{src_bytes / dt / 1e9:.2f} GB/s of source",
        f"baseline raw read of the same files: {gbps:.2f} GB/s -> converter at {src_bytes / dt / 1e9 / gbps:.2f}x "
        f"of raw read",
        f"baseline rtn kernel, 1 thread, [1024,4096]: {kern:.0f} M params/s -> converter at "
        f"{params / dt / 1e6 / (kern * args.jobs):.2f}x of {args.jobs} x kernel",
        f"peak RSS of the conversion: {peak / 2**20:.0f} MiB (bound 1 GiB + 4 experts' source bytes per worker = "
        f"{bound / 2**20:.0f} MiB; largest tensor is {biggest / peak:.1f}x the peak RSS)",
    ]
    print("\n".join(lines))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
