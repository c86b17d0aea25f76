"""KL against bytes: uniform widths, mixed gate/down widths and per-expert tiers on the trained fixture.

Every pack quantizes the whole model (residents 8-bit). Calibration: 8192 tokens of eval.txt from
character 200,000 on, recorded on an 8-bit pack (as benchmarks/calibration_quality.py); evaluation:
the first 2048 tokens of eval.txt, windows of 512, against the bf16 checkpoint run by mlx-lm in
float32. Columns:

- stored: bits per expert weight on disk, averaged over all experts (the class of issue 6);
- read: bits per weight of the blocks a token's routing actually reads (tiers make hot experts wider,
  so a tiered pack reads more per token than it stores);
- GB/token @397B: ``read`` applied to Qwen3.5-397B-A17B's experts (12,582,912 weights, top-10, 60
  layers), assuming its routing is as skewed as the fixture's;
- miss@15%: bits per weight read from disk per token when an LRU cache holds 15% of each layer's
  expert bytes (about what a 48 GB laptop can spare for a 209 GB pack), replaying the evaluation's
  routing: hot experts hit in the cache, so what a tiered pack reads from disk is mostly its narrow
  cold experts.

    python benchmarks/quality_per_byte.py --workdir /tmp/qpb [--plot benchmarks/kl_vs_bytes.png]
"""

from __future__ import annotations

from moestream.runtime.cpu.threads import prefer_passive_wait

prefer_passive_wait()  # before torch or mlx-lm load libgomp, which reads OMP_WAIT_POLICY once

import argparse
import json
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "trained-tiny-qwen3_5-moe"
BIG = 12_582_912 * 10 * 60  # expert weights a token reads in Qwen3.5-397B-A17B
CONFIGS = [  # label, family ("uniform" / "mixed" / "tiered"), convert options
    ("4-bit rtn", "uniform", dict(bits=4, method="rtn", resident_bits=8)),
    ("4-bit clip", "uniform", dict(bits=4, method="clip", resident_bits=8)),
    ("3-bit clip", "uniform", dict(bits=3, method="clip", resident_bits=8)),
    ("2-bit clip", "uniform", dict(bits=2, method="clip", resident_bits=8)),
    ("2-bit g128 clip", "uniform", dict(bits=2, group_size=128, method="clip", resident_bits=8)),
    ("gate/up 2 + down 3 (q2-down3)", "mixed", dict(recipe="q2-down3")),
    ("q4-tiered", "tiered", dict(recipe="q4-tiered")),
    ("q3-tiered", "tiered", dict(recipe="q3-tiered")),
    ("q2-tiered", "tiered", dict(recipe="q2-tiered")),
    ("tiers at 4.0 bits", "tiered", dict(recipe="q4-tiered", bits_per_weight=4.0)),
    ("tiers at 3.0 bits", "tiered", dict(recipe="q3-tiered", bits_per_weight=3.0)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--plot", type=Path, default=None, help="Write KL against bits read per weight here (PNG).")
    args = ap.parse_args()
    from moestream.convert import convert
    from moestream.convert.recipes import load_recipe
    from moestream.runtime import evaluate, load
    from moestream.runtime.analysis.routing import lru_miss_bytes_per_token
    from moestream.runtime.collect_calibration import calibrate

    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    text = (FIXTURE / "eval.txt").read_text()
    if not (wd / "p8" / "manifest.json").exists():
        convert(str(FIXTURE), wd / "p8", bits=8, resident_bits=8, force=True)
    if not (wd / "cal.st").exists():
        calibrate(wd / "p8", text[200_000:], max_tokens=8192).save(wd / "cal.st")
    rows = []
    print(
        f"{'pack':30} {'stored':>6} {'read':>6} {'GB/token @397B':>15} {'miss@15%':>8} "
        f"{'KL mean':>8} {'KL p99':>7} {'top-1':>6} "
        f"{'ppl':>6}"
    )
    for i, (label, family, opts) in enumerate(CONFIGS):
        out = wd / f"q{i}"
        opts = dict(opts)
        if "recipe" in opts:
            opts = {**load_recipe(opts.pop("recipe")), **opts}
        if opts.get("tier_widths"):
            opts["calibration"] = str(wd / "cal.st")
        if not (out / "manifest.json").exists():
            convert(str(FIXTURE), out, force=True, **opts)
        rt = load(out)
        try:
            trace = rt.trace_routing()
            r = evaluate(rt, text, reference=FIXTURE, max_tokens=2048, window=512)
            m = rt.pack.manifest
            x = m.expert_layer(m.moe_layers()[0])
            params = 3 * x.component("gate_proj.weight").shape[0] * x.component("down_proj.weight").shape[0]
            miss = 8 * lru_miss_bytes_per_token(trace.layers, m, 0.15) / (params * m.top_k * len(trace.layers))
        finally:
            rt.close()
        row = {
            "pack": label,
            "family": family,
            "stored_bpw": r["expert_bits_per_weight"],
            "read_bpw": r["expert_read_bits_per_weight"],
            "gb_per_token_397b": r["expert_read_bits_per_weight"] * BIG / 8e9,
            "miss15_bpw": miss,
            "kl_mean": r["kl_mean"],
            "kl_p99": r["kl_p99"],
            "top1": r["top1_agreement"],
            "ppl": r["ppl"],
            "ref_ppl": r["ref_ppl"],
        }
        rows.append(row)
        print(
            f"{label:30} {row['stored_bpw']:>6.2f} {row['read_bpw']:>6.2f} {row['gb_per_token_397b']:>15.2f} "
            f"{miss:>8.2f} "
            f"{row['kl_mean']:>8.4f} {row['kl_p99']:>7.3f} {row['top1']:>6.1%} {row['ppl']:>6.3f}",
            flush=True,
        )
    (wd / "quality_per_byte.json").write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, title in (
        (axes[0], "stored_bpw", "bits per expert weight stored"),
        (axes[1], "read_bpw", "bits per expert weight read per token"),
    ):
        for family, marker in (("uniform", "o"), ("mixed", "s"), ("tiered", "^")):
            pts = [r for r in rows if r["family"] == family]
            ax.scatter([r[key] for r in pts], [r["kl_mean"] for r in pts], marker=marker, label=family)
            for r in pts:
                ax.annotate(r["pack"], (r[key], r["kl_mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean KL vs bf16 (trained fixture)")
    axes[0].legend()
    fig.suptitle("Quality per byte: uniform widths against per-expert tiers (residents 8-bit)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
