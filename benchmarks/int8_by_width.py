"""Which widths' decode products may take int8 activations: measured, per width, on trained models.

On the CPU, decode products of quantized weights can quantize their activations to int8 per group (several
times the float kernels' speed). That rounding (~6e-3 relative per product) is small next to 2- to 4-bit
weights' own error and not next to 8-bit weights'. For each width W (2, 3, 4, 8) and model, a pack with every
quantized tensor at W (clip; routers at 8 with their residual products as always) is scored token by token
(``evaluate(decode=True)``: the small-batch kernels generation runs) against the bf16 checkpoint in float32
in three modes: ``int8`` (W's products take int8 activations), ``wider`` (W left out of INT8_WIDTHS: single
matrices take the residual product, int8 twice, and expert stacks float32 activations) and ``float``
(MOESTREAM_INT8=0). A width keeps int8 where int8 raises mean KL by less than 5% of the float figure on every
model; ``runtime/cpu/kernels.py``'s ``INT8_WIDTHS`` is that set.

    python benchmarks/int8_by_width.py --workdir /tmp/int8w [--models fixture,demo] [--tokens 1024]
"""

from __future__ import annotations

from moestream.runtime.cpu.threads import prefer_passive_wait

prefer_passive_wait()

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURE = HERE.parents[1] / "shared" / "fixtures" / "trained-tiny-qwen3_5-moe"
MODELS = {"fixture": FIXTURE, "demo": HERE.parent / "cli" / "demo_model"}
VISIBLE = 0.05  # a rise of mean KL above this share of the float figure is visible


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--models", default="fixture,demo")
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    from moestream.convert import convert
    from moestream.runtime import load
    from moestream.runtime.cpu import int8 as cpu_int8
    from moestream.runtime.cpu import kernels
    from moestream.runtime.evaluate import evaluate, load_reference

    args.workdir.mkdir(parents=True, exist_ok=True)
    out_file = args.workdir / "int8_by_width.json"
    rows = json.loads(out_file.read_text()) if out_file.exists() else []
    done = {(r["model"], r["bits"], r["int8"]) for r in rows}
    for name in args.models.split(","):
        path = MODELS[name]
        text = (path / "eval.txt").read_text()
        ref = None
        for bits in [int(b) for b in args.bits.split(",")]:
            if not cpu_int8.supported(bits, 64):
                print(f"{name} {bits}-bit: no int8 kernel on this CPU; skipped")
                continue
            pack = args.workdir / f"{name}-{bits}"
            for int8 in ("int8", "wider", "float"):
                if (name, bits, int8) in done:
                    continue
                if not (pack / "manifest.json").exists():
                    convert(str(path), pack, bits=bits, resident_bits=bits, method="clip", force=True)
                ref = ref or load_reference(path)
                kernels.INT8_ACTIVATIONS = int8 != "float"
                kernels.INT8_WIDTHS = (bits,) if int8 == "int8" else ()
                with load(pack) as rt:
                    r = evaluate(rt, text, reference=ref, max_tokens=args.tokens, decode=True)
                rows.append(
                    {"model": name, "bits": bits, "int8": int8, "kl_mean": r["kl_mean"], "top1": r["top1_agreement"]}
                )
                out_file.write_text(json.dumps(rows, indent=1))
                print(
                    f"{name} {bits}-bit int8={int8}: KL {r['kl_mean']:.5f}, top-1 {r['top1_agreement']:.2%}", flush=True
                )
    print("\n| model | width | KL float | KL wider | KL int8 | int8 rise | top-1 float / wider / int8 |")
    print("|---|---|---|---|---|---|---|")
    keep = {}
    for r in rows:
        if r["int8"] != "int8":
            continue
        f, w = (
            next(x for x in rows if (x["model"], x["bits"], x["int8"]) == (r["model"], r["bits"], m))
            for m in ("float", "wider")
        )
        rise = r["kl_mean"] / f["kl_mean"] - 1
        keep[r["bits"]] = keep.get(r["bits"], True) and rise < VISIBLE
        print(
            f"| {r['model']} | {r['bits']} | {f['kl_mean']:.5f} | {w['kl_mean']:.5f} | {r['kl_mean']:.5f} | "
            f"{rise:+.1%} | "
            f"{f['top1']:.2%} / {w['top1']:.2%} / {r['top1']:.2%} |"
        )
    print(f"\nINT8_WIDTHS = {tuple(sorted(b for b, ok in keep.items() if ok))}")


if __name__ == "__main__":
    main()
