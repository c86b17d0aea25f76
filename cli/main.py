"""The ``moestream`` command line: one click group; each command calls the library function of the
same name with the same arguments. Only this module prints; errors are one line, no traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from moestream.app import cli, one_line_errors  # noqa: F401  (re-exported)
from moestream.app import human as _human


@cli.command()
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Pack folder to create.")
@click.option(
    "--bits",
    type=click.Choice(["2", "3", "4", "8", "16"]),
    default="4",
    show_default=True,
    help="Expert bits (16: unquantized passthrough).",
)
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
@click.option(
    "--method",
    type=click.Choice(["rtn", "clip", "gptq"]),
    default=None,
    help="rtn (MLX's round-to-nearest) or clip (MSE-optimal range search; the default).",
)
@click.option(
    "--down-bits",
    type=click.Choice(["2", "3", "4", "8"]),
    default=None,
    help="Bits of the experts' down_proj (default per --bits: 3 at 2, 4 at 3, 8 at 4; docs/recipes-and-quality.md).",
)
@click.option(
    "--resident-bits",
    type=click.Choice(["2", "3", "4", "8", "16"]),
    default=None,
    help="Bits of every non-expert weight (default per --bits: some kinds 8, the rest 16; router always >= 8).",
)
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default=None,
    help="Float type of scales/biases and unquantized tensors (default: the source's).",
)
@click.option("--alignment", type=int, default=16384, show_default=True, help="Expert block alignment in bytes.")
@click.option("--revision", default=None, help="Hub revision when SOURCE is a hub id.")
@click.option("--keep-mtp", is_flag=True, help="Store the multi-token-prediction head (resident).")
@click.option("-j", "--jobs", type=int, default=None, help="Worker threads (default: all cores).")
@click.option("--resume", is_flag=True, help="Continue an interrupted conversion into OUTPUT.")
@click.option("--force", is_flag=True, help="Replace an existing pack at OUTPUT.")
@click.option("--dry-run", is_flag=True, help="Print the plan (files, sizes, bytes per token); write nothing.")
@click.option(
    "--calibration",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Statistics from `moestream calibrate`: with --method gptq, GPTQ; with --method clip, a clip search "
    "weighting each column by its input's mean square; without --method, as measured best per --bits "
    "(GPTQ at 3 bits, else unused for the codes); tiered recipes take routing counts from it.",
)
@click.option(
    "--recipe",
    default=None,
    help="Bits per tensor kind, layer and expert: a preset (q4-tiered, q3-tiered, q2-tiered, q4, q3, "
    "q2-down3, q2) or a TOML file (see convert/recipes.py). Flags given explicitly win.",
)
@click.pass_context
@one_line_errors
def convert(
    ctx,
    source,
    output,
    bits,
    group_size,
    method,
    down_bits,
    resident_bits,
    dtype,
    alignment,
    revision,
    keep_mtp,
    jobs,
    resume,
    force,
    dry_run,
    calibration,
    recipe,
):
    """Convert a Hugging Face checkpoint (folder or hub id) into a pack."""
    from click.core import ParameterSource

    from moestream.convert import convert as run
    from moestream.convert.recipes import load_recipe

    opts = dict(
        bits=int(bits),
        group_size=int(group_size),
        method=method,
        down_bits=int(down_bits) if down_bits else None,
        resident_bits=int(resident_bits) if resident_bits else None,
    )
    if recipe:
        given = {k for k in opts if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
        opts = {**opts, **{k: v for k, v in load_recipe(recipe).items() if k not in given}}
    res = run(
        source,
        output,
        dtype=dtype,
        alignment=alignment,
        revision=revision,
        keep_mtp=keep_mtp,
        jobs=jobs,
        resume=resume,
        force=force,
        dry_run=dry_run,
        progress=sys.stderr.isatty(),
        calibration=str(calibration) if calibration else None,
        **opts,
    )
    if dry_run:
        s = res.summary()
        experts = (
            "MXFP4 experts passed through"
            if s["expert_mode"] == "mxfp4"
            else "per-expert widths" + f" ({s['method']})"
            if s["tiers"]
            else f"{s['bits']}-bit g{s['group_size']} ({s['method']})"
            + (f", down_proj {s['down_bits']}-bit" if s["down_bits"] != s["bits"] else "")
        )
        kinds = ", ".join(f"{k} {b}" for k, b in (s.get("resident_kinds") or {}).items())
        click.echo(
            f"plan: {s['model_type']}, {s['moe_layers']} MoE layers x {s['num_experts']} experts, "
            f"{experts}, residents {s['resident_bits']}-bit" + (f" ({kinds})" if kinds else "")
        )
        click.echo(
            f"  expert block {_human(s['expert_block_bytes'])}, stride {_human(s['expert_stride'])} "
            f"(alignment {_human(s['alignment'])})"
        )
        click.echo(
            f"  expert files {_human(s['expert_files_bytes'])}, resident {_human(s['resident_bytes'])}, "
            f"source read {_human(s['source_bytes'])}"
        )
        if s["tiers"]:
            click.echo("  experts per width: " + ", ".join(f"{w} {n}" for w, n in s["tiers"].items()))
        click.echo(
            f"  bytes read per token at top-{s['top_k']}: {_human(s['bytes_per_token'])}"
            + (" if routing were uniform" if s["tiers"] else "")
        )
        click.echo(
            f"  files: {len(s['files'])} ({s['files'][0]} ... {s['files'][-1]}); "
            f"dropped tensors: {s['dropped_tensors']}"
        )
        return
    click.echo(
        f"wrote {output}: {len(res.experts)} expert files, {_human(res.resident_bytes())} resident, "
        f"{_human(res.expert_bytes_per_token())} read per token at top-{res.top_k}"
    )


def _tier_table(m) -> list[dict] | None:
    """Experts per width over all layers, for packs whose experts do not all share one layout."""
    if len({(x.bits, x.component("gate_proj.weight").group_size) for x in m.experts}) < 2 and not m.tiered:
        return None
    rows: dict[str, dict] = {}
    for x in m.experts:
        g, d = x.component("gate_proj.weight"), x.component("down_proj.weight")
        width = f"{g.bits}g{g.group_size}" + ("" if d.bits == g.bits else f"/{d.bits}")
        r = rows.setdefault(width, {"width": width, "experts": 0, "block_bytes": x.block_bytes, "stride": x.stride})
        r["experts"] += x.num_experts
    total = sum(r["experts"] for r in rows.values())
    return [{**r, "share": r["experts"] / total} for r in sorted(rows.values(), key=lambda r: r["block_bytes"])]


@cli.command()
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@one_line_errors
def inspect(pack, as_json):
    """Print a pack's layout: files, stride, alignment, bytes per expert and per token."""
    from moestream.layouts import open_pack

    with open_pack(pack) as p:
        m = p.manifest
        x0 = m.experts[0] if m.experts else None
        info = {
            "format": m.format,
            "version": m.version,
            "model_type": m.model_type,
            "synthetic": m.synthetic,
            "alignment": m.alignment,
            "num_experts": m.num_experts,
            "top_k": m.top_k,
            "moe_layers": len(m.moe_layers()),
            "quantization": m.quantization,
            "expert_bits_per_weight": m.expert_bits_per_weight(),
            "tiers": _tier_table(m),
            "expert_block_bytes": x0.block_bytes if x0 else 0,
            "stride": x0.stride if x0 else 0,
            "stride_mod_alignment": (x0.stride % m.alignment) if x0 else 0,
            "expert_bytes_per_token": m.expert_bytes_per_token(),
            "resident_bytes": m.resident_bytes(),
            "expert_files": [
                {
                    "file": x.file,
                    "layer": x.layer,
                    "tier": x.tier,
                    "experts": x.num_experts,
                    "offset": x.offset,
                    "stride": x.stride,
                    "size": x.file_size,
                }
                for x in m.experts
            ],
            "resident_files": [{"file": f.file, "size": f.size} for f in m.resident_files],
            "components": [
                {"name": c.name, "offset": c.offset, "nbytes": c.nbytes, "shape": c.shape, "dtype": c.dtype}
                for c in (x0.components if x0 else [])
            ],
            "total_bytes": p.total_bytes(),
            "source": {k: v for k, v in m.source.items() if k != "files"},
        }
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    q = m.quantization["experts"]
    click.echo(f"{pack}: {m.format} v{m.version}, {m.model_type}{' (synthetic)' if m.synthetic else ''}")
    width = "per-expert widths" if info["tiers"] else f"{q['bits']}-bit g{q['group_size']}"
    own = m.source.get("model_experts", m.num_experts) if m.synthetic else m.num_experts
    of = f" (of the model's {own})" if own != m.num_experts else ""
    click.echo(
        f"  experts: {info['moe_layers']} layers x {m.num_experts}{of}, top-{m.top_k}, {width} "
        f"{q['method']}, scales {q['scale_dtype']}"
    )
    click.echo(
        f"  block {_human(info['expert_block_bytes'])} ({info['expert_block_bytes']} B), stride "
        f"{info['stride']} B, alignment {m.alignment} B (stride % alignment = {info['stride_mod_alignment']})"
    )
    if m.quantization.get("recipe"):
        click.echo(f"  recipe: {m.quantization['recipe']}")
    for t in info["tiers"] or []:
        click.echo(
            f"  tier {t['width']:>6}: {t['experts']:>6} experts ({t['share']:.1%}), block {_human(t['block_bytes'])}, "
            f"stride {_human(t['stride'])}"
        )
    uniform = " if routing were uniform (eval reports the routed figure)" if info["tiers"] else ""
    click.echo(
        f"  experts stored at {info['expert_bits_per_weight']:.3f} bits per weight; read per token at "
        f"top-{m.top_k}: {_human(info['expert_bytes_per_token'])}{uniform}"
    )
    click.echo(f"  resident {_human(info['resident_bytes'])}; total {_human(info['total_bytes'])}")
    click.echo("  block components" + (" (first file)" if info["tiers"] else "") + ":")
    for c in info["components"]:
        click.echo(f"    {c['name']:<20} +{c['offset']:<10} {c['nbytes']:>10} B  {c['dtype']}{c['shape']}")
    click.echo(f"  files: {len(m.experts)} expert ({m.experts[0].file} ...), {len(m.resident_files)} resident")


@cli.command()
@click.argument("pack", type=click.Path(path_type=Path))
@one_line_errors
def verify(pack):
    """Check every expert block's and resident file's checksum; non-zero exit at the first bad one."""
    from tqdm import tqdm

    from moestream.layouts import open_pack

    with open_pack(pack) as p:
        with tqdm(
            total=p.total_bytes(), unit="B", unit_scale=True, desc="verify", disable=not sys.stderr.isatty()
        ) as bar:
            p.verify(bar.update)
        n = sum(x.num_experts for x in p.manifest.experts)
    click.echo(f"{pack}: OK ({n} expert blocks, {len(p.manifest.resident_files)} resident files)")


@cli.command()
@click.argument("packs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON.")
@click.option(
    "--metric", type=click.Choice(["rel_rmse", "rmse", "snr_db", "max_abs"]), default="rel_rmse", show_default=True
)
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Write a PNG of per-layer error.")
@one_line_errors
def report(packs, as_json, metric, plot):
    """Quantization error per layer and tensor kind; several packs side by side (e.g. 2-bit vs 4-bit)."""
    from moestream.quant.report import format_comparison, label, load_report, plot_comparison

    reps = []
    for p in packs:
        r = load_report(p)
        reps.append((f"{p.name} ({label(r, p.name)})", r))
    if as_json:
        click.echo(
            json.dumps({name: {k: r[k] for k in ("meta", "per_layer", "per_kind")} for name, r in reps}, indent=1)
        )
    else:
        click.echo(format_comparison(reps, metric))
    if plot:
        plot_comparison(reps, plot)
        click.echo(f"wrote {plot}")


@cli.command()
@click.option("--like", required=True, help="config.json path or known model name (e.g. qwen3.5-397b-a17b).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path))
@click.option("--layers", type=int, default=4, show_default=True, help="How many of the model's layers to write.")
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), default="4", show_default=True)
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
@click.option("--resident-bits", type=click.Choice(["2", "3", "4", "8", "16"]), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--alignment", type=int, default=16384, show_default=True)
@click.option("-j", "--jobs", type=int, default=None)
@click.option("--force", is_flag=True, help="Replace an existing pack at OUTPUT.")
@click.option("--routing", default="uniform", show_default=True, help="uniform or zipf:S (hot experts).")
@click.option(
    "--experts",
    type=click.IntRange(min=1),
    default=None,
    help="Routed experts per MoE layer, each of the model's shapes [default: the model's own count].",
)
@one_line_errors
def synth(like, output, layers, bits, group_size, resident_bits, seed, alignment, jobs, force, routing, experts):
    """Write a pack with a real model's shapes and random contents (no download needed)."""
    from moestream.convert.synth import synth as run

    m = run(
        like,
        output,
        layers=layers,
        bits=int(bits),
        group_size=int(group_size),
        resident_bits=int(resident_bits) if resident_bits else None,
        seed=seed,
        alignment=alignment,
        jobs=jobs,
        force=force,
        progress=sys.stderr.isatty(),
        routing=routing,
        experts=experts,
    )
    own = m.source.get("model_experts", m.num_experts)
    of = f" (of the model's {own})" if own != m.num_experts else ""
    click.echo(
        f"wrote {output} (synthetic, like {like}): {len(m.experts)} MoE layers x {m.num_experts} experts{of}, "
        f"stride {_human(m.experts[0].stride)}, {_human(m.expert_bytes_per_token())} of experts per token "
        f"at top-{m.top_k}, resident {_human(m.resident_bytes())}"
    )


@cli.command()
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("demo-out"),
    show_default=True,
    help="Where the 4- and 2-bit packs go.",
)
@one_line_errors
def demo(workdir):
    """Convert the shipped small Qwen3.5-MoE at 4 and 2 bits, verify, score against the source, generate."""
    from moestream.demo import DEMO_MODEL, DEMO_PROMPT, demo_generate, run_demo
    from moestream.quant.report import format_comparison, load_report

    from .runtime_commands import _print_stats

    size = sum(f.stat().st_size for f in DEMO_MODEL.glob("*.safetensors"))
    click.echo(
        f"demo: a small Qwen3.5-MoE trained on Python's standard library ({_human(size)} of BF16 weights, "
        f"{DEMO_MODEL}); converting it at 4 and 2 bits into {workdir} ..."
    )
    res = run_demo(workdir)
    for p in res["packs"]:
        click.echo(
            f"  {p['bits']}-bit ({p['method']}) {p['pack']}: verified; stride {p['stride']} B, "
            f"{_human(p['bytes_per_token'])} of experts per token"
        )
    reps = [(f"{Path(p['pack']).name}", load_report(p["pack"])) for p in res["packs"]]
    click.echo("")
    click.echo(format_comparison(reps))
    click.echo("")
    p0 = res["packs"][0]
    click.echo(
        f"held-out Python ({p0['tokens']} tokens of demo_model/eval.txt, not trained on), each pack against "
        f"the BF16 source run by mlx-lm in float32 (perplexity {p0['ref_ppl']:.2f}):"
    )
    click.echo(f"  {'pack':<10} {'perplexity':>10} {'mean KL':>8} {'p99 KL':>7} {'top-1 agreement':>16}")
    for p in res["packs"]:
        click.echo(
            f"  {str(p['bits']) + '-bit':<10} {p['ppl']:>10.2f} {p['kl_mean']:>8.4f} {p['kl_p99']:>7.3f} "
            f"{p['top1_agreement']:>16.1%}"
        )
    click.echo("")
    for p in res["packs"]:
        click.echo(
            f"streamed generation from {p['pack']} (every routed expert read from disk, --cache none), "
            f"greedy, raw prompt {DEMO_PROMPT!r}:"
        )
        click.echo(DEMO_PROMPT, nl=False)
        text, st = demo_generate(p["pack"], on_text=lambda t: click.echo(t, nl=False))
        click.echo("" if text.endswith("\n") else "\n", nl=False)
        _print_stats(st)
        click.echo("")
    pack4 = res["packs"][0]["pack"]
    click.echo(
        f"next: moestream inspect {pack4}   |   moestream generate {pack4} --raw -p 'import os' --stats   |   "
        "moestream report " + " ".join(p["pack"] for p in res["packs"]) + " --plot error.png"
    )


# The commands that run packs (generate, chat, calibrate, eval, bench, serve) live in
# runtime_commands.py; importing it registers them on the group (it imports app, not this module).
from moestream import runtime_commands  # noqa: E402,F401


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
