"""KL and perplexity of packs made with and without calibration, on the trained fixture.

Calibration text: ../shared/fixtures/trained-tiny-qwen3_5-moe/eval.txt from character 200,000 on
(8192 tokens), recorded on an 8-bit pack; evaluation: the first 2048 tokens of the same file
(windows of 512), against the bf16 checkpoint run by mlx-lm in float32. A held-out check of the
output error itself (sum over experts of (W - Q)^T H (W - Q), H from another slice of the text)
is printed too, since KL and the layer-wise objective need not move together.

    python benchmarks/calibration_quality.py --workdir /tmp/calq
"""

from __future__ import annotations

from moestream.runtime.cpu.threads import prefer_passive_wait

prefer_passive_wait()  # before torch or mlx-lm load libgomp, which reads OMP_WAIT_POLICY once

import argparse
import json
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "trained-tiny-qwen3_5-moe"
CONFIGS = [  # name, convert options
    ("4-bit clip, residents 8", dict(bits=4, method="clip", resident_bits=8)),
    ("4-bit gptq, residents 8", dict(bits=4, method="gptq", resident_bits=8, calibration=True)),
    ("3-bit clip, residents 8", dict(bits=3, method="clip", resident_bits=8)),
    ("3-bit gptq, residents 8", dict(bits=3, method="gptq", resident_bits=8, calibration=True)),
    ("2-bit clip, residents 8", dict(bits=2, method="clip", resident_bits=8)),
    ("2-bit gptq, residents 8", dict(bits=2, method="gptq", resident_bits=8, calibration=True)),
    ("all 4-bit clip", dict(bits=4, method="clip")),
    ("all 4-bit gptq", dict(bits=4, method="gptq", calibration=True)),
    # importance-weighted clip: the calibration's diagonal only (imatrix-style)
    ("4-bit wclip, residents 8", dict(bits=4, method="clip", resident_bits=8, calibration=True)),
    ("3-bit wclip, residents 8", dict(bits=3, method="clip", resident_bits=8, calibration=True)),
    ("2-bit wclip, residents 8", dict(bits=2, method="clip", resident_bits=8, calibration=True)),
]


def held_out_error(cal, held, bits: int) -> dict[str, float]:
    """Sum over layers and experts of the gate projection's output error on held-out inputs."""
    import mlx.core as mx
    from safetensors import safe_open

    from moestream.quant import quantize
    from moestream.quant.gptq import gptq_quantize

    idx = json.loads((FIXTURE / "model.safetensors.index.json").read_text())["weight_map"]
    out = {"clip": 0.0, "gptq": 0.0}
    bf = lambda a: mx.array(a).view(mx.bfloat16).astype(mx.float32)  # noqa: E731
    for layer in cal.layers:
        name = f"model.language_model.layers.{layer}.mlp.experts.gate_up_proj"
        with safe_open(str(FIXTURE / idx[name]), "pt") as f:  # bf16: numpy cannot hold it, torch can
            gu = f.get_tensor(name).float().numpy()
        inter = gu.shape[1] // 2
        for e in range(gu.shape[0]):
            h = held.arrays[f"experts.{layer}.gate_up_cov"][e]
            w = np.ascontiguousarray(gu[e, :inter])
            for method, (wq, s, b) in {
                "clip": quantize(w, bits, 64, method="clip"),
                "gptq": gptq_quantize(w, cal.expert_hessian(layer, e, "gate_proj"), bits, 64)[:3],
            }.items():
                q = np.array(mx.dequantize(mx.array(wq), bf(s), bf(b), group_size=64, bits=bits))
                d = (w - q).astype(np.float64)
                out[method] += float(np.einsum("ij,jk,ik->", d, h, d))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    args = ap.parse_args()
    from moestream.convert import convert
    from moestream.quant.calibration import Calibration
    from moestream.runtime import evaluate, load
    from moestream.runtime.collect_calibration import calibrate

    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    text = (FIXTURE / "eval.txt").read_text()
    if not (wd / "p8").exists():
        convert(str(FIXTURE), wd / "p8", bits=8, resident_bits=8)
    if not (wd / "cal.st").exists():
        calibrate(wd / "p8", text[200_000:], max_tokens=8192).save(wd / "cal.st")
    if not (wd / "held.st").exists():
        calibrate(wd / "p8", text[100_000:200_000], max_tokens=4096).save(wd / "held.st")
    cal, held = Calibration.load(wd / "cal.st"), Calibration.load(wd / "held.st")
    for layer in cal.layers:
        n = cal.arrays[f"experts.{layer}.count"]
        print(
            f"layer {layer}: routings per expert min {n.min():.0f}, median {np.median(n):.0f}, max {n.max():.0f} "
            f"of {n.sum():.0f}"
        )
    for bits in (2, 4):
        e = held_out_error(cal, held, bits)
        print(
            f"held-out output error of expert gate projections, {bits}-bit: clip {e['clip']:.1f}, "
            f"gptq {e['gptq']:.1f} ({e['gptq'] / e['clip']:.3f}x)"
        )
    print(f"{'pack':28} {'KL mean':>8} {'KL p99':>7} {'top-1':>6} {'ppl':>7} (reference ppl)")
    for i, (label, opts) in enumerate(CONFIGS):
        out = wd / f"c{i}"
        if opts.pop("calibration", False):
            opts["calibration"] = str(wd / "cal.st")
        if not (out / "manifest.json").exists():
            convert(str(FIXTURE), out, force=True, **opts)
        rt = load(out)
        try:
            r = evaluate(rt, text, reference=FIXTURE, max_tokens=2048, window=512)
        finally:
            rt.close()
        print(
            f"{label:28} {r['kl_mean']:>8.4f} {r['kl_p99']:>7.3f} {r['top1_agreement']:>6.1%} {r['ppl']:>7.3f} "
            f"({r['ref_ppl']:.3f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
