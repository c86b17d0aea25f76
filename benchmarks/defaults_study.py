"""What `moestream convert --bits B` does with no other flag: chosen here, by measurement, for the best KL per
byte a token reads.

For each expert width B (2, 3, 4, 8) and each trained model (the fixture; the second model of
``benchmarks/second_model.py``; the shipped demo model), it converts and evaluates (mean KL against the bf16
checkpoint in float32, the first 2048 tokens of held-out text, windows of 512):

- the base: experts B-bit clip, every resident at 16 bits (bf16);
- each resident kind (attention, linear attention, shared expert, router, embeddings, output head) alone
  lowered to 8 bits and to B bits (the router never below 8);
- the experts' down projections at each wider width (3, 4, 8), and all experts one width up (B=8: bf16);
- the base with rtn experts instead of clip.

Bytes a token reads are, as everywhere in moestream (``inspect``, ``bench``, ``convert --dry-run``), the
routed experts' blocks streamed from disk, here at Qwen3.5-397B-A17B's shapes (convert/sizes.py). Resident
weights are not streamed: they cost RAM, which the summary reports.

The rule, with relative KL ``dKL / KL(base)`` averaged over the models that have the tensors concerned:

- a resident kind takes the narrowest width whose relative KL rise stays within VISIBLE (2%), else 16:
  narrower residents buy RAM, never read bytes, so they may cost no visible quality;
- the down projections: on each model the experts' next width prices a read byte,
  ``lam = (KL(B) - KL(next)) / KL(B) / (GB(next) - GB(B))``; down at width D scores
  ``dKL / KL(base) + lam * dGB`` and the lowest score below 0 is taken (a better trade than the next width);
- the method with the lower relative KL.

The kinds are taken as independent, so the chosen combination is converted and measured too ("chosen"
rows). The chosen options are ``convert/defaults.py``'s table; a test checks that the two agree.

    python benchmarks/defaults_study.py --workdir /tmp/defaults [--models fixture,second,demo] [--bits 4,2,8,3]

Resumable: every measured row is kept in WORKDIR/rows.json. ``--record`` writes the summary and the rows to
benchmarks/defaults_study.json; the tables are printed as markdown.
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIXTURE = ROOT.parent / "shared" / "fixtures" / "trained-tiny-qwen3_5-moe"
DEMO = ROOT / "cli" / "demo_model"
LIKE = "qwen3.5-397b-a17b"
RECORD = HERE / "defaults_study.json"
KINDS = ("attention", "linear_attention", "shared_expert", "router", "embedding", "lm_head")
NEXT = {2: 3, 3: 4, 4: 8, 8: 16}
VISIBLE = 0.02  # a resident width whose mean relative KL rise stays within this costs no visible quality


def models(names: list[str], workdir: Path) -> dict[str, dict]:
    """name -> {path, text, backend}: the checkpoint, its held-out text and what runs its reference."""
    out = {}
    for name in names:
        if name == "fixture":
            if not FIXTURE.exists():
                sys.exit(f"{FIXTURE}: the shared fixture is absent")
            text = (FIXTURE / "eval.txt").read_text()
            out[name] = {
                "path": FIXTURE,
                "text": text,
                "backend": "mlx",
                "cal_text": text[200_000:],
                "cal_tokens": 8192,
            }
        elif name == "demo":
            text = (DEMO / "eval.txt").read_text()  # 40 KB: the first 2048 tokens are about 7 KB of it
            out[name] = {"path": DEMO, "text": text, "backend": "mlx", "cal_text": text[16_000:], "cal_tokens": 6144}
        elif name == "second":
            sys.path.insert(0, str(HERE))
            import second_model

            model = workdir / "second" / "model"
            if not (model / "config.json").exists():
                second_model.train(model, 600)
            # transformers runs the reference: mlx-lm cannot read transformers 5's qwen3_moe config.json as saved
            _, cal_text, eval_text = second_model.texts()
            out[name] = {
                "path": model,
                "text": eval_text,
                "backend": "transformers",
                "cal_text": cal_text,
                "cal_tokens": 8192,
            }
        else:
            sys.exit(f"--models: unknown model {name!r} (fixture, second, demo)")
    return out


def configs(bits: int, kinds: list[str]) -> list[tuple[str, dict]]:
    """(label, convert options) of the study at expert width ``bits``."""
    base = {"bits": bits, "method": "clip", "resident_bits": 16}
    out = [("base", base)]
    for kind in kinds:
        for level in sorted({8, max(bits, 8 if kind == "router" else bits)}):
            if level < 16:
                out.append((f"{kind}@{level}", {**base, "resident_kinds": {kind: level}}))
    for down in (3, 4, 8):
        if down > bits:
            out.append((f"down@{down}", {**base, "down_bits": down}))
    out.append((f"experts@{NEXT[bits]}", {**base, "bits": NEXT[bits]}))
    out.append(("rtn", {**base, "method": "rtn"}))
    return out


def gb_per_token(opts: dict) -> float:
    """Bytes a token reads at Qwen3.5-397B-A17B's shapes, in GB: its routed experts' blocks."""
    from moestream.convert.sizes import model_sizes

    s = model_sizes(
        LIKE,
        opts["bits"],
        opts.get("resident_bits"),
        down_bits=opts.get("down_bits"),
        resident_kinds=opts.get("resident_kinds"),
    )
    return s["expert_bytes_per_token"] / 1e9


def resident_gb(opts: dict) -> float:
    from moestream.convert.sizes import model_sizes

    s = model_sizes(LIKE, opts["bits"], opts.get("resident_bits"), resident_kinds=opts.get("resident_kinds"))
    return s["resident_bytes"] / 1e9


class CachedReference:
    """The reference's logits, computed once per window and kept (every pack is scored on the same windows)."""

    def __init__(self, path: Path, backend: str):
        from moestream.runtime.evaluate import load_reference

        self.name, self._ref, self._cache = str(path), load_reference(path, backend), {}

    def __call__(self, x):
        key = tuple(x.tolist()[0])
        if key not in self._cache:
            self._cache[key] = self._ref(x)
        return self._cache[key]

    def __str__(self) -> str:
        return self.name


def measure(model: dict, ref: CachedReference, out: Path, opts: dict) -> dict:
    from moestream.convert import convert
    from moestream.runtime import load
    from moestream.runtime.evaluate import evaluate

    if not (out / "manifest.json").exists():
        convert(str(model["path"]), out, force=True, **opts)
    t0 = time.time()
    rt = load(out)
    try:
        r = evaluate(rt, model["text"], reference=ref, max_tokens=2048, window=512)
    finally:
        rt.close()
    shutil.rmtree(out, ignore_errors=True)  # packs are small but many
    return {
        "kl_mean": r["kl_mean"],
        "kl_p99": r["kl_p99"],
        "top1": r["top1_agreement"],
        "ppl": r["ppl"],
        "ref_ppl": r["ref_ppl"],
        "read_bpw": r["expert_read_bits_per_weight"],
        "seconds": round(time.time() - t0, 1),
    }


def model_kinds(path: Path) -> list[str]:
    """The resident kinds this model has quantizable tensors of."""
    from moestream.convert.family import family_for
    from moestream.convert.plan import tensor_kind
    from moestream.convert.synth import load_like

    fam = family_for(load_like(str(path / "config.json")), str(path))
    have = {tensor_kind(t) for t in fam.quantizable}
    return [k for k in KINDS if k in have]


def choose(rows: list[dict], bits: int) -> dict:
    """The rule of the module docstring, over every model measured at ``bits``."""
    by = {}
    for r in rows:
        if r["bits"] == bits:
            by.setdefault(r["model"], {})[r["label"]] = r
    lam, rel, scores = {}, {}, {}
    for m, labels in by.items():
        base, up = labels.get("base"), labels.get(f"experts@{NEXT[bits]}")
        if base is None or up is None:
            continue
        gb = {label: gb_per_token(r["options"]) for label, r in labels.items()}
        lam[m] = (base["kl_mean"] - up["kl_mean"]) / base["kl_mean"] / (gb[f"experts@{NEXT[bits]}"] - gb["base"])
        for label, r in labels.items():
            if label in ("base", "chosen", f"experts@{NEXT[bits]}"):
                continue
            rel.setdefault(label, {})[m] = d = (r["kl_mean"] - base["kl_mean"]) / base["kl_mean"]
            scores.setdefault(label, {})[m] = d + lam[m] * (gb[label] - gb["base"])
    mean_rel = {label: sum(v.values()) / len(v) for label, v in rel.items()}
    mean_score = {label: sum(v.values()) / len(v) for label, v in scores.items()}
    kinds = {}
    for kind in KINDS:
        widths = sorted(int(label.split("@")[1]) for label in mean_rel if label.startswith(kind + "@"))
        if widths:
            kinds[kind] = next((w for w in widths if mean_rel[f"{kind}@{w}"] <= VISIBLE), 16)
    downs = {bits: 0.0, **{int(k.split("@")[1]): v for k, v in mean_score.items() if k.startswith("down@")}}
    down = min(downs, key=lambda lv: (downs[lv], lv))
    return {
        "bits": bits,
        "method": "rtn" if mean_rel.get("rtn", 0.0) < 0 else "clip",
        "down_bits": down if down != bits else None,
        "resident_kinds": kinds,
        "lambda_per_gb": lam,
        "relative_kl": {label: round(v, 4) for label, v in sorted(mean_rel.items())},
        "down_scores": {label: round(v, 4) for label, v in sorted(mean_score.items()) if label.startswith("down@")},
    }


def calibration_file(name: str, model: dict, wd: Path) -> Path:
    """``moestream calibrate``'s statistics for a model, recorded once on an 8-bit pack (residents at 8,
    whose products record their inputs) from text apart from the evaluation's."""
    from moestream.convert import convert
    from moestream.runtime.collect_calibration import calibrate

    out = wd / f"cal-{name}.st"
    if not out.exists():
        convert(str(model["path"]), wd / "cal8", bits=8, resident_bits=8, force=True)
        calibrate(wd / "cal8", model["cal_text"], max_tokens=model["cal_tokens"]).save(out)
        shutil.rmtree(wd / "cal8", ignore_errors=True)
    return out


def choose_calibrated(rows: list[dict], bits: int) -> dict:
    """How ``--calibration`` quantizes at ``bits``: the method whose relative KL against the same pack
    without calibration is lowest in the worst model, if it is worse on none; else none (the calibration
    then serves the per-expert tiers only)."""
    base = {r["model"]: r["kl_mean"] for r in rows if r["bits"] == bits and r["label"] == "chosen"}
    rel: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["bits"] == bits and r["label"].startswith("calibrated:") and r["model"] in base:
            rel.setdefault(r["label"].split(":")[1], {})[r["model"]] = r["kl_mean"] / base[r["model"]] - 1
    worst = {m: max(v.values()) for m, v in rel.items()}
    best = min(worst, key=worst.get) if worst else None
    return {
        "method": best if best is not None and worst[best] <= 0 else None,
        "relative_kl": {m: {k: round(x, 4) for k, x in v.items()} for m, v in rel.items()},
    }


def chosen_options(choice: dict) -> dict:
    """convert options of a choice: residents at 16 unless a kind is lowered (its lowest chosen width)."""
    lowered = {k: v for k, v in choice["resident_kinds"].items() if v < 16}
    opts = {"bits": choice["bits"], "method": choice["method"], "resident_bits": 16}
    if lowered:
        opts["resident_kinds"] = lowered
    if choice["down_bits"]:
        opts["down_bits"] = choice["down_bits"]
    return opts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--models", default="fixture,second")
    ap.add_argument("--bits", default="4,2,8,3")
    ap.add_argument("--record", action="store_true", help=f"write the summary to {RECORD.relative_to(ROOT)}")
    args = ap.parse_args()
    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    rows_file = wd / "rows.json"
    rows = json.loads(rows_file.read_text()) if rows_file.exists() else []
    done = {(r["model"], r["bits"], r["label"]) for r in rows}
    widths = [int(b) for b in args.bits.split(",")]
    ms = models(args.models.split(","), wd)
    for name, model in ms.items():
        ref = CachedReference(model["path"], model["backend"])
        kinds = model_kinds(model["path"])
        for bits in widths:
            for label, opts in configs(bits, kinds):
                if (name, bits, label) in done:
                    continue
                r = measure(model, ref, wd / "pack", opts)
                rows.append({"model": name, "bits": bits, "label": label, "options": opts, **r})
                rows_file.write_text(json.dumps(rows, indent=1))
                print(
                    f"{name:8} {bits} {label:22} KL {r['kl_mean']:.5f} top-1 {r['top1']:.4f} ({r['seconds']} s)",
                    flush=True,
                )
    summary = {"models": list(ms), "choices": {}}
    for bits in widths:
        choice = choose(rows, bits)
        opts = chosen_options(choice)
        for name, model in ms.items():
            key = (name, bits, "chosen")
            old = next((r for r in rows if (r["model"], r["bits"], r["label"]) == key), None)
            if old is None or old["options"] != opts:
                rows = [r for r in rows if (r["model"], r["bits"], r["label"]) != key]
                r = measure(model, CachedReference(model["path"], model["backend"]), wd / "pack", opts)
                rows.append(
                    {
                        "model": name,
                        "bits": bits,
                        "label": "chosen",
                        "options": opts,
                        **r,
                    }
                )
                rows_file.write_text(json.dumps(rows, indent=1))
        choice["options"] = opts
        choice["gb_token"] = gb_per_token(opts)
        choice["resident_gb"] = resident_gb(opts)
        choice["measured"] = {
            r["model"]: {k: r[k] for k in ("kl_mean", "kl_p99", "top1", "ppl", "ref_ppl")}
            for r in rows
            if r["bits"] == bits and r["label"] == "chosen"
        }
        if bits < 8:  # with --calibration: each way of using it, against the same options without
            for name, model in ms.items():
                cal = calibration_file(name, model, wd)
                for method in ("gptq", "clip"):
                    key, copts = (
                        (name, bits, f"calibrated:{method}"),
                        {**opts, "method": method, "calibration": str(cal)},
                    )
                    old = next((r for r in rows if (r["model"], r["bits"], r["label"]) == key), None)
                    if old is None or old["options"] != copts:
                        rows = [r for r in rows if (r["model"], r["bits"], r["label"]) != key]
                        r = measure(model, CachedReference(model["path"], model["backend"]), wd / "pack", copts)
                        rows.append({"model": name, "bits": bits, "label": key[2], "options": copts, **r})
                        rows_file.write_text(json.dumps(rows, indent=1))
            choice["calibrated"] = choose_calibrated(rows, bits)
        summary["choices"][str(bits)] = choice
    print_tables(rows, summary)
    if args.record:
        RECORD.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
        print(f"wrote {RECORD}")


def print_tables(rows: list[dict], summary: dict) -> None:
    ms = summary["models"]
    for bits, choice in summary["choices"].items():
        lam = ", ".join(f"{m} {v:.3f}" for m, v in choice["lambda_per_gb"].items())
        print(f"\n### --bits {bits} (lambda per read GB: {lam})\n")
        head = " | ".join(f"{m} KL | {m} top-1" for m in ms)
        print(f"| option | read GB/token @397B | resident GB @397B | {head} | rel. KL | down score |")
        print("|---|---|---|" + "---|---|" * len(ms) + "---|---|")
        labels = []
        for r in rows:
            if str(r["bits"]) == bits and r["label"] not in labels:
                labels.append(r["label"])
        for label in labels:
            cells, opts = [], None
            for m in ms:
                r = next((r for r in rows if (r["model"], str(r["bits"]), r["label"]) == (m, bits, label)), None)
                cells += [f"{r['kl_mean']:.4f}", f"{r['top1']:.1%}"] if r else ["", ""]
                opts = r["options"] if r else opts
            rel = choice["relative_kl"].get(label, "")
            rel = f"{rel:+.1%}" if rel != "" else ""
            score = choice["down_scores"].get(label, "")
            print(
                f"| {label} | {gb_per_token(opts):.2f} | {resident_gb(opts):.1f} | "
                + " | ".join(cells)
                + f" | {rel} | {score} |"
            )
        print(f"\nchosen: {json.dumps(choice['options'])}; resident RAM @397B {choice['resident_gb']:.1f} GB")
        if "calibrated" in choice:
            c = choice["calibrated"]
            print(f"with --calibration: {c['method'] or 'no change'} (KL against the chosen pack: {c['relative_kl']})")


if __name__ == "__main__":
    main()
