"""Do the quality methods carry over to a model they were not tuned on? A second trained tiny MoE.

Trains, with torch on the CPU (a few minutes), a Qwen3-MoE (``qwen3_moe``: another family and shape than the
trained fixture's Qwen3.5: 3 layers, 24 experts, top-3, no shared expert, full attention only; hidden 256 and
expert intermediate 128 as the fixture, so every width's group size divides) on Python's standard library
sources, using the fixture's byte-level BPE tokenizer, and saves it in the hub's layout with
``save_pretrained`` (bf16). Then it converts the same configurations as ``benchmarks/quality_per_byte.py`` and
prints KL against the bf16 checkpoint (mlx-lm, float32) on held-out library files, so the ordering can be
compared.

    python benchmarks/second_model.py --workdir /tmp/second [--steps 700]

Split of /usr/lib/python3.11/*.py (sorted by name): every 10th file is held out; of those, the first
half is calibration text and the second half evaluation text. Training never sees either.
"""

from __future__ import annotations

from moestream.runtime.cpu.threads import prefer_passive_wait

prefer_passive_wait()  # before torch or mlx-lm load libgomp, which reads OMP_WAIT_POLICY once

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "trained-tiny-qwen3_5-moe"
LIBRARY = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_per_byte import CONFIGS  # noqa: E402  (the same configurations, in the same order)

SHAPE = dict(
    hidden_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_experts=24,
    num_experts_per_tok=3,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
    norm_topk_prob=True,
)


def texts() -> tuple[str, str, str]:
    files = sorted(p for p in LIBRARY.glob("*.py") if p.stat().st_size > 2000)
    held = files[::10]
    train = [p for p in files if p not in held]
    read = lambda ps: "\n\n".join(p.read_text(errors="replace") for p in ps)  # noqa: E731
    return read(train), read(held[: len(held) // 2]), read(held[len(held) // 2 :])


def train(out: Path, steps: int, seq: int = 256, batch: int = 16) -> None:
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(2)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(FIXTURE / "tokenizer.json"))
    train_text, _, _ = texts()
    ids = torch.tensor(tok(train_text)["input_ids"], dtype=torch.long)
    cfg = Qwen3MoeConfig(vocab_size=len(tok), **SHAPE)
    model = Qwen3MoeForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    t0 = time.time()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,))
        x = torch.stack([ids[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURE / name, tmp / name)
    tmp.rename(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=700)
    args = ap.parse_args()
    from moestream.convert import convert
    from moestream.convert.recipes import load_recipe
    from moestream.runtime import evaluate, load
    from moestream.runtime.collect_calibration import calibrate

    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    model = wd / "model"
    if not (model / "config.json").exists():
        train(model, args.steps)
    _, cal_text, eval_text = texts()
    if not (wd / "p8" / "manifest.json").exists():
        convert(str(model), wd / "p8", bits=8, resident_bits=8, force=True)
    if not (wd / "cal.st").exists():
        calibrate(wd / "p8", cal_text, max_tokens=8192).save(wd / "cal.st")
    rows = []
    print(f"{'pack':30} {'stored':>6} {'read':>6} {'KL mean':>8} {'KL p99':>7} {'top-1':>6} {'ppl':>7} (ref ppl)")
    for i, (label, family, opts) in enumerate(CONFIGS):
        out = wd / f"q{i}"
        opts = dict(opts)
        if "recipe" in opts:
            opts = {**load_recipe(opts.pop("recipe")), **opts}
        if opts.get("tier_widths"):
            opts["calibration"] = str(wd / "cal.st")
        if not (out / "manifest.json").exists():
            convert(str(model), out, force=True, **opts)
        rt = load(out)
        try:
            # transformers runs the reference: mlx-lm cannot read transformers 5's qwen3_moe config.json as saved
            r = evaluate(rt, eval_text, reference=model, max_tokens=2048, window=512, reference_backend="transformers")
        finally:
            rt.close()
        rows.append(
            {
                "pack": label,
                "family": family,
                "stored_bpw": r["expert_bits_per_weight"],
                "read_bpw": r["expert_read_bits_per_weight"],
                "kl_mean": r["kl_mean"],
                "kl_p99": r["kl_p99"],
                "top1": r["top1_agreement"],
                "ppl": r["ppl"],
                "ref_ppl": r["ref_ppl"],
            }
        )
        row = rows[-1]
        print(
            f"{label:30} {row['stored_bpw']:>6.2f} {row['read_bpw']:>6.2f} {row['kl_mean']:>8.4f} "
            f"{row['kl_p99']:>7.3f} {row['top1']:>6.1%} {row['ppl']:>7.3f} ({row['ref_ppl']:.3f})",
            flush=True,
        )
    (wd / "second_model.json").write_text(json.dumps(rows, indent=1))
    from moestream.quant.calibration import Calibration

    cal = Calibration.load(wd / "cal.st")
    for layer in cal.layers:
        n = np.sort(cal.arrays[f"experts.{layer}.count"])[::-1]
        print(f"layer {layer}: top 25% of experts take {n[: len(n) // 4].sum() / n.sum():.0%} of the routings")


if __name__ == "__main__":
    main()
