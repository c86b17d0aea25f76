"""The depth set: decode at a real model's full depth, with its figures appended to docs/benchmarks.md.

1. Qwen3.5-35B-A3B's shapes, all 40 layers (``--experts`` per layer, 64 by default: 5.5 GB), K=8:
   warm ``--cache os-map`` (expert files read into the page cache first) and the fully resident
   baseline of the same run.
2. Qwen3.5-397B-A17B's shapes, all 60 layers with 32 experts each (13.6 GB of experts), K=4: cold
   ``--cache none``, and warm ``os-map`` where the pack's files and the resident weights fit in RAM.

Each pack is made with ``moestream synth`` unless it is there, skipped when the disk lacks room for
it (with a margin), and deleted at the end (``--keep`` keeps them). The figures go to stdout and,
with the machine, the date and each command, to docs/benchmarks.md as its newest section
(``--no-append``: stdout only).

Usage: python benchmarks/depth.py [--workdir /work/packs/depth] [--gen-tokens 32] [--repeat 2] [--keep]
"""

from __future__ import annotations

from moestream.runtime.cpu.threads import prefer_passive_wait

prefer_passive_wait()  # before torch or mlx-lm load libgomp, which reads OMP_WAIT_POLICY once

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np

from moestream.convert.family import family_for
from moestream.convert.synth import load_like, reduced_config, synth
from moestream.layouts import Manifest, expert_block_layout, round_up
from moestream.runtime.bench import bench, format_bench
from moestream.runtime.store import system

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
GB = 1e9


def machine() -> str:
    """One line: CPU model, cores, RAM, kernel."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} cores, {system.ram_bytes() / 2**30:.0f} GiB, "
        f"{platform.system()} {platform.release()}, {numba.get_num_threads()} compute threads"
    )


def pack_bytes(like: str, layers: int, experts: int) -> int:
    """Bytes a 4-bit g64 synthetic pack of these shapes takes on disk (experts aligned as synth
    writes them; residents at 4 bits with bf16 scales and biases, vectors in float32)."""
    fam = family_for(reduced_config(load_like(like), layers, experts))
    total = 0
    for layer in fam.moe_layers():
        i, h = fam.expert_shape(layer)
        total += experts * round_up(expert_block_layout(h, i, 4, 64, 64, "bfloat16")[1], 16384)
    for shape, _ in fam.resident_params.values():
        n = int(np.prod(shape))
        total += n * 9 // 16 if len(shape) > 1 else 4 * n
    return total


def make(workdir: Path, name: str, like: str, layers: int, experts: int) -> Path | None:
    out = workdir / name
    cmd = f"moestream synth --like {like} -o {out} --layers {layers} --experts {experts} --bits 4"
    if (out / "manifest.json").exists():
        print(f"{name}: already there ({cmd})", flush=True)
        return out
    need = pack_bytes(like, layers, experts)
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    if need * 1.1 + 2 * GB > free:
        print(f"{name}: skipped, needs {need / GB:.1f} GB and {free / GB:.1f} GB are free", flush=True)
        return None
    print(f"{name}: {cmd} ({need / GB:.1f} GB)", flush=True)
    synth(like, out, layers=layers, bits=4, experts=experts, progress=sys.stderr.isatty())
    return out


def warm(pack: Path) -> bool:
    """Read the pack's files into the page cache; False when they and the residents would not fit."""
    m = Manifest.load(pack)
    size = sum(x.file_size for x in m.experts) + 2 * m.resident_bytes()  # residents: page cache and RSS
    if size > 0.8 * system.ram_bytes():
        return False
    for f in sorted(pack.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
    return True


def row(label: str, cmd: str, r: dict) -> dict:
    res = r.get("baselines", {}).get("resident")
    return {
        "run": label,
        "command": cmd,
        "decode_tps": r["decode_tps"],
        "p50_ms": r["token_ms_p50"],
        "roofline_fraction": r["roofline_fraction"],
        "roofline": "cold" if r["cache"] == "none" else "warm",
        "mem_gbps": r["mem_gbps"],
        "disk_gbps": r["raw_read_gbps"],
        "resident_tps": res["decode_tps"] if res else None,
        "resident_fraction": res["decode_tps"] / r["warm_roofline_tps"] if res else None,
        "prompt_tps": r["prompt_tps"],
    }


def run(pack: Path, label: str, cache: str, k: int, args, baselines=()) -> dict:
    flags = f"--cache {cache} -k {k} --prompt-tokens {args.prompt_tokens} --gen-tokens {args.gen_tokens}"
    flags += f" --repeat {args.repeat} --no-verify"
    flags += f" --baselines {','.join(baselines).replace('_', '-')}" if baselines else " --no-baselines"
    cmd = f"moestream bench {pack} {flags}"
    print(f"\n$ {cmd}", flush=True)
    r = bench(
        pack,
        cache=cache,
        experts_per_token=k,
        verify=False,
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        repeat=args.repeat,
        baselines=baselines,
    )
    print(format_bench(r), flush=True)
    return row(label, cmd, r)


def table(rows: list[dict]) -> str:
    lines = [
        "| run | decode tok/s (p50 ms) | fraction of roofline | resident baseline tok/s (fraction) "
        "| memory / disk probe GB/s | prompt tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        res = f"{r['resident_tps']:.2f} ({r['resident_fraction']:.2f})" if r["resident_tps"] else "-"
        lines.append(
            f"| {r['run']} | {r['decode_tps']:.2f} ({r['p50_ms']:.1f}) | {r['roofline_fraction']:.2f} "
            f"{r['roofline']} | {res} | {r['mem_gbps']:.1f} / {r['disk_gbps']:.2f} | {r['prompt_tps']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/work/packs/depth"))
    ap.add_argument("--experts-35b", type=int, default=64, help="experts per layer of the 35B-A3B pack")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the packs")
    ap.add_argument("--no-append", action="store_true", help="print only; leave docs/benchmarks.md")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    rows, made = [], []
    try:
        p35 = make(args.workdir, f"s35-40l-e{args.experts_35b}", "qwen3.5-35b-a3b", 40, args.experts_35b)
        if p35 is not None:
            made.append(p35)
            if warm(p35):
                rows.append(
                    run(
                        p35,
                        f"35B-A3B, 40 layers x {args.experts_35b}, K=8, warm os-map",
                        "os-map",
                        8,
                        args,
                        ("resident",),
                    )
                )
            else:
                print(f"{p35}: does not fit in RAM warm; skipped", flush=True)
        if p35 is not None and not args.keep:
            shutil.rmtree(p35)
            made.remove(p35)
        p397 = make(args.workdir, "s397-60l-e32", "qwen3.5-397b-a17b", 60, 32)
        if p397 is not None:
            made.append(p397)
            rows.append(run(p397, "397B-A17B, 60 layers x 32, K=4, cold none", "none", 4, args))
            if warm(p397):
                rows.append(run(p397, "397B-A17B, 60 layers x 32, K=4, warm os-map", "os-map", 4, args))
            else:
                print(f"{p397}: the pack and its residents do not fit in RAM: no warm run", flush=True)
    finally:
        if not args.keep:
            for p in made:
                shutil.rmtree(p, ignore_errors=True)
    if not rows:
        print("nothing ran")
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=DOC.parent)
    when = datetime.date.today().isoformat()
    text = table(rows)
    cmds = "\n".join(sorted({r["command"] for r in rows}))
    section = (
        f"\n## {when}: depth set, {machine()}\n\n"
        f"`python benchmarks/depth.py` at {commit.stdout.strip() or 'an uncommitted tree'}: synthetic packs at a "
        f"real model's full depth (`moestream synth --experts`), 4-bit g64. Fractions are of the bench's own "
        f"roofline (warm: expert and resident bytes at the memory probe's speed; cold: t_io + t_mem); the "
        f"resident baseline's is of the warm roofline.\n\n{text}\n\n```bash\n{cmds}\n```\n"
    )
    print(section)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if not args.no_append:
        # the document lists machines and dates newest first: the section goes before the first date
        doc = DOC.read_text()
        at = doc.find("\n## 20")
        doc = doc + section if at < 0 else doc[:at] + section + doc[at:]
        DOC.write_text(doc)
        print(f"added to {DOC}")


if __name__ == "__main__":
    main()
