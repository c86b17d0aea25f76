"""The ``moestream`` command line: one click group; each command calls the library function of the
same name with the same arguments. Only this module prints; errors are one line, no traceback."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from moestream.layouts.errors import MoestreamError


def one_line_errors(fn):
    """Turn user-facing errors (and OS errors) into ``error: ...`` on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except MoestreamError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"error: {where}{e.strerror or e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="moestream")
def cli(verbose: int) -> None:
    """moestream: run Mixture-of-Experts models larger than RAM by streaming experts from SSD."""
    level = logging.WARNING if not verbose else logging.INFO if verbose == 1 else logging.DEBUG
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # e.g. "sequence longer than model_max_length"
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@cli.command()
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Pack folder to create.")
@click.option("--bits", type=click.Choice(["2", "3", "4", "8", "16"]), default="4", show_default=True,
              help="Expert bits (16: unquantized passthrough).")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
@click.option("--method", type=click.Choice(["rtn", "clip", "gptq"]), default=None,
              help="rtn (MLX's round-to-nearest) or clip (MSE-optimal range search). Default: rtn at 4 bits, clip otherwise.")
@click.option("--resident-bits", type=click.Choice(["2", "3", "4", "8", "16"]), default=None,
              help="Bits of non-expert weights (default: as --bits; router always >= 8).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Float type of scales/biases and unquantized tensors (default: the source's).")
@click.option("--alignment", type=int, default=16384, show_default=True, help="Expert block alignment in bytes.")
@click.option("--revision", default=None, help="Hub revision when SOURCE is a hub id.")
@click.option("--keep-mtp", is_flag=True, help="Store the multi-token-prediction head (resident).")
@click.option("-j", "--jobs", type=int, default=None, help="Worker threads (default: all cores).")
@click.option("--resume", is_flag=True, help="Continue an interrupted conversion into OUTPUT.")
@click.option("--force", is_flag=True, help="Replace an existing pack at OUTPUT.")
@click.option("--dry-run", is_flag=True, help="Print the plan (files, sizes, bytes per token); write nothing.")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Statistics from `moestream calibrate`: clip weights each column by its input's mean square.")
@one_line_errors
def convert(source, output, bits, group_size, method, resident_bits, dtype, alignment, revision, keep_mtp, jobs,
            resume, force, dry_run, calibration):
    """Convert a Hugging Face checkpoint (folder or hub id) into a pack."""
    from moestream.convert import convert as run

    res = run(source, output, bits=int(bits), group_size=int(group_size), method=method,
              resident_bits=int(resident_bits) if resident_bits else None, dtype=dtype, alignment=alignment,
              revision=revision, keep_mtp=keep_mtp, jobs=jobs, resume=resume, force=force, dry_run=dry_run,
              progress=sys.stderr.isatty(), calibration=str(calibration) if calibration else None)
    if dry_run:
        s = res.summary()
        click.echo(f"plan: {s['model_type']}, {s['moe_layers']} MoE layers x {s['num_experts']} experts, "
                   f"{s['bits']}-bit g{s['group_size']} ({s['method']}), residents {s['resident_bits']}-bit")
        click.echo(f"  expert block {_human(s['expert_block_bytes'])}, stride {_human(s['expert_stride'])} "
                   f"(alignment {_human(s['alignment'])})")
        click.echo(f"  expert files {_human(s['expert_files_bytes'])}, resident {_human(s['resident_bytes'])}, "
                   f"source read {_human(s['source_bytes'])}")
        click.echo(f"  bytes read per token at top-{s['top_k']}: {_human(s['bytes_per_token'])}")
        click.echo(f"  files: {len(s['files'])} ({s['files'][0]} ... {s['files'][-1]}); "
                   f"dropped tensors: {s['dropped_tensors']}")
        return
    click.echo(f"wrote {output}: {len(res.experts)} expert files, {_human(res.resident_bytes())} resident, "
               f"{_human(res.expert_bytes_per_token())} read per token at top-{res.top_k}")


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
            "format": m.format, "version": m.version, "model_type": m.model_type, "synthetic": m.synthetic,
            "alignment": m.alignment, "num_experts": m.num_experts, "top_k": m.top_k,
            "moe_layers": len(m.experts), "quantization": m.quantization,
            "expert_block_bytes": x0.block_bytes if x0 else 0, "stride": x0.stride if x0 else 0,
            "stride_mod_alignment": (x0.stride % m.alignment) if x0 else 0,
            "expert_bytes_per_token": m.expert_bytes_per_token(),
            "resident_bytes": m.resident_bytes(),
            "expert_files": [{"file": x.file, "layer": x.layer, "offset": x.offset, "stride": x.stride,
                              "size": x.file_size} for x in m.experts],
            "resident_files": [{"file": f.file, "size": f.size} for f in m.resident_files],
            "components": [{"name": c.name, "offset": c.offset, "nbytes": c.nbytes, "shape": c.shape,
                            "dtype": c.dtype} for c in (x0.components if x0 else [])],
            "total_bytes": p.total_bytes(), "source": {k: v for k, v in m.source.items() if k != "files"},
        }
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    q = m.quantization["experts"]
    click.echo(f"{pack}: {m.format} v{m.version}, {m.model_type}{' (synthetic)' if m.synthetic else ''}")
    click.echo(f"  experts: {info['moe_layers']} layers x {m.num_experts}, top-{m.top_k}, {q['bits']}-bit "
               f"g{q['group_size']} {q['method']}, scales {q['scale_dtype']}")
    click.echo(f"  block {_human(info['expert_block_bytes'])} ({info['expert_block_bytes']} B), stride "
               f"{info['stride']} B, alignment {m.alignment} B (stride % alignment = {info['stride_mod_alignment']})")
    click.echo(f"  read per token at top-{m.top_k}: {_human(info['expert_bytes_per_token'])}; "
               f"resident {_human(info['resident_bytes'])}; total {_human(info['total_bytes'])}")
    click.echo("  block components:")
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
        with tqdm(total=p.total_bytes(), unit="B", unit_scale=True, desc="verify",
                  disable=not sys.stderr.isatty()) as bar:
            p.verify(bar.update)
        n = sum(x.num_experts for x in p.manifest.experts)
    click.echo(f"{pack}: OK ({n} expert blocks, {len(p.manifest.resident_files)} resident files)")


@cli.command()
@click.argument("packs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON.")
@click.option("--metric", type=click.Choice(["rel_rmse", "rmse", "snr_db", "max_abs"]), default="rel_rmse",
              show_default=True)
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
        click.echo(json.dumps({name: {k: r[k] for k in ("meta", "per_layer", "per_kind")} for name, r in reps},
                              indent=1))
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
@one_line_errors
def synth(like, output, layers, bits, group_size, resident_bits, seed, alignment, jobs, force, routing):
    """Write a pack with a real model's shapes and random contents (no download needed)."""
    from moestream.convert.synth import synth as run

    m = run(like, output, layers=layers, bits=int(bits), group_size=int(group_size),
            resident_bits=int(resident_bits) if resident_bits else None, seed=seed, alignment=alignment, jobs=jobs,
            force=force, progress=sys.stderr.isatty(), routing=routing)
    click.echo(f"wrote {output} (synthetic, like {like}): {len(m.experts)} MoE layers x {m.num_experts} experts, "
               f"stride {_human(m.experts[0].stride)}, {_human(m.expert_bytes_per_token())} of experts per token "
               f"at top-{m.top_k}, resident {_human(m.resident_bytes())}")


@cli.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True,
              help="Where the tiny checkpoint and its packs go.")
@one_line_errors
def demo(workdir):
    """Build a tiny Qwen3.5-MoE checkpoint, convert it at 4 and 2 bits, verify, compare with the source."""
    from moestream.demo import demo_generate, run_demo
    from moestream.quant.report import format_comparison, load_report

    click.echo(f"demo: building a tiny random Qwen3.5-MoE checkpoint in {workdir}/checkpoint ...")
    res = run_demo(workdir)
    for p in res["packs"]:
        click.echo(f"  {p['bits']}-bit ({p['method']}) {p['pack']}: verified; stride {p['stride']} B, "
                   f"{_human(p['bytes_per_token'])} of experts per token; vs unquantized source in float32: "
                   f"mean KL {p['kl_mean']:.4f}, p99 KL {p['kl_p99']:.3f}, top-1 agreement {p['top1']:.1%}")
    reps = [(f"{Path(p['pack']).name}", load_report(p["pack"])) for p in res["packs"]]
    click.echo("")
    click.echo(format_comparison(reps))
    click.echo("  (a random model's logits are nearly flat, so its top-1 flips easily; KL is the figure to read)")
    click.echo("")
    pack4 = res["packs"][0]["pack"]
    click.echo(f"streamed generation from {pack4} (every routed expert read from disk, --cache none):")
    text, st = demo_generate(pack4)
    click.echo(f"  output (random weights, so random text): {text[:120]!r}")
    _print_stats(st)
    click.echo("")
    click.echo(f"next: moestream inspect {pack4}   |   moestream generate {pack4} -p 'Hi' --stats   |   moestream report "
               + " ".join(p["pack"] for p in res["packs"]) + " --plot error.png")


def _runtime_options(fn):
    for opt in reversed([
        click.option("--experts-per-token", "-k", "experts_per_token", type=int, default=None,
                     help="Override the model's top-k (fewer experts read per token)."),
        click.option("--cache", default="os", show_default=True, help="os | none | lru:SIZE (e.g. lru:8G) | mmap | mmap-none (naive page-fault baselines; -none drops pages after use)."),
        click.option("--threads", type=int, default=None, help="Reader threads."),
        click.option("--no-verify", is_flag=True, help="Skip the per-read checksum of expert blocks."),
        click.option("--kernels", type=click.Choice(["auto", "metal", "mlx"]), default="auto", show_default=True,
                     help="Expert kernels: auto (Metal's on Apple silicon, numba's on the CPU), metal, or mlx "
                          "(MLX's built-in quantized ops)."),
    ]):
        fn = opt(fn)
    return fn


def _print_stats(s) -> None:
    click.echo(f"prompt: {s.prompt_tokens} tokens, {s.prompt_tps:.1f} tok/s; time to first token {s.ttft_s:.2f} s",
               err=True)
    click.echo(f"decode: {s.generation_tokens} tokens, {s.generation_tps:.2f} tok/s; "
               f"{_human(s.bytes_per_token)} of experts read per token ({_human(s.decode_bytes)} in all, "
               f"prefill {_human(s.prefill_bytes)}); cache hit rate {s.hit_rate:.1%}; peak RSS "
               f"{_human(s.peak_rss_bytes)}", err=True)


@cli.command()
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", required=True, help="The user message (or raw text with --raw).")
@click.option("-m", "--max-tokens", type=int, default=256, show_default=True)
@click.option("--temp", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=float, default=0.0)
@click.option("--top-k", type=int, default=0)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--no-think", is_flag=True, help="Turn Qwen3.5's thinking off.")
@click.option("--raw", is_flag=True, help="No chat template: continue the prompt text.")
@click.option("--stats", is_flag=True, help="Print speed, bytes read per token, cache hit rate, peak RSS.")
@click.option("--trace-routing", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Save every MoE layer's routing (.npz; see notebooks/routing.ipynb).")
@_runtime_options
@one_line_errors
def generate(pack, prompt, max_tokens, temp, top_p, top_k, seed, stop, no_think, raw, stats, trace_routing,
             experts_per_token, cache, threads, no_verify, kernels):
    """Generate from PACK, streaming routed experts from disk."""
    from moestream.runtime import generate as run
    from moestream.runtime import load

    rt = load(pack, cache=cache, experts_per_token=experts_per_token, threads=threads, verify=not no_verify,
              kernels=kernels)
    trace = rt.trace_routing() if trace_routing else None
    try:
        for chunk in run(rt, prompt, max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, seed=seed,
                         stop=tuple(stop), raw=raw, think=not no_think):
            click.echo(chunk.text, nl=False)
        click.echo("")
        if stats:
            _print_stats(chunk.stats)
    finally:
        rt.close()
    if trace is not None:
        trace.save(trace_routing)
        click.echo(f"routing trace: {trace_routing}", err=True)


@cli.command()
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("-m", "--max-tokens", type=int, default=1024, show_default=True)
@click.option("--temp", type=float, default=0.7, show_default=True)
@click.option("--top-p", type=float, default=0.8, show_default=True)
@click.option("--no-think", is_flag=True, help="Turn thinking off.")
@click.option("--hide-think", is_flag=True, help="Do not show the thinking, only the answer.")
@_runtime_options
@one_line_errors
def chat(pack, max_tokens, temp, top_p, no_think, hide_think, experts_per_token, cache, threads, no_verify, kernels):
    """Multi-turn chat in the terminal (/clear forgets the conversation, /exit leaves)."""
    from moestream.runtime import generate as run
    from moestream.runtime import load

    rt = load(pack, cache=cache, experts_per_token=experts_per_token, threads=threads, verify=not no_verify,
              kernels=kernels)
    history: list[dict] = []
    try:
        while True:
            try:
                line = click.prompt(">>", prompt_suffix=" ", default="", show_default=False)
            except (EOFError, click.exceptions.Abort):
                break
            if line.strip() in ("/exit", "/quit"):
                break
            if line.strip() == "/clear":
                history.clear()
                click.echo("(conversation cleared)")
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            # Qwen3.5's template opens "<think>" in the prompt when thinking is on: output starts inside it.
            rendered = rt.tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False,
                                                        enable_thinking=not no_think)
            answer, thinking = [], rendered.rstrip().endswith("<think>")
            for chunk in run(rt, messages=history, max_tokens=max_tokens, temp=temp, top_p=top_p,
                             think=not no_think):
                text = chunk.text
                answer.append(text)
                thinking = _echo_thinking(text, thinking, hide_think)
            click.echo("")
            reply = "".join(answer)
            history.append({"role": "assistant", "content": reply.split("</think>")[-1].strip()})
    finally:
        rt.close()


def _echo_thinking(text: str, thinking: bool, hide: bool) -> bool:
    """Print ``text``, dimming (or hiding) what lies between <think> and </think>."""
    while text:
        tag = "</think>" if thinking else "<think>"
        i = text.find(tag)
        part, rest = (text, "") if i < 0 else (text[:i], text[i + len(tag):])
        if part and not (thinking and hide):
            click.echo(click.style(part, dim=True) if thinking else part, nl=False)
        if i < 0:
            break
        thinking, text = not thinking, rest
    return thinking


@cli.command()
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--text", "text_file", required=True, type=click.File("r", encoding="utf-8"), help="Calibration text.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Statistics file to write (safetensors).")
@click.option("--max-tokens", type=int, default=4096, show_default=True)
@click.option("--window", type=int, default=512, show_default=True, help="Tokens per forward pass.")
@click.option("--skip-chars", type=int, default=0, help="Start this far into the text (keep it apart from eval text).")
@click.option("--matrix-bytes", default="1G", show_default=True,
              help="Budget for full E[x x^T] matrices (what GPTQ needs): per expert if all fit, else per layer.")
@one_line_errors
def calibrate(pack, text_file, output, max_tokens, window, skip_chars, matrix_bytes):
    """Record per-expert and per-linear input statistics (and routing counts) on calibration text.

    Run it on an 8-bit pack of the model, then `moestream convert SOURCE --calibration STATS`.
    """
    from moestream.runtime.calibrate import calibrate as run

    from moestream.runtime.expert_store import parse_cache

    budget = parse_cache(f"lru:{matrix_bytes}")[1]  # the same SIZE syntax as --cache lru:SIZE
    cal = run(pack, text_file.read()[skip_chars:], max_tokens=max_tokens, window=window, matrix_bytes=budget)
    cal.save(output)
    routed = sum(int(cal.arrays[f"experts.{i}.count"].sum()) for i in cal.layers)
    click.echo(f"wrote {output}: {cal.meta['tokens']} tokens, {len(cal.layers)} MoE layers ({routed} expert "
               f"routings; {cal.meta['expert_matrices']} matrices), {len(cal.linear_names)} linears "
               f"({'with' if cal.meta['linear_matrices'] else 'without'} matrices)")


@cli.command(name="eval")
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--reference", type=click.Path(exists=True, path_type=Path), default=None,
              help="Hugging Face folder (run by mlx-lm in float32) or pack (fully resident).")
@click.option("--reference-backend", type=click.Choice(["mlx", "transformers"]), default="mlx", show_default=True,
              help="What runs an HF folder reference (both unquantized, float32).")
@click.option("--max-tokens", type=int, default=2048, show_default=True)
@click.option("--window", type=int, default=512, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--sweep-k", default=None, help="Comma-separated K values (e.g. 2,4,6,8): one evaluation each, "
                                              "with expert bytes read per token, in one table.")
@click.option("--trace-routing", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Save every MoE layer's routing over the text (.npz; see notebooks/routing.ipynb).")
@_runtime_options
@one_line_errors
def eval_cmd(pack, text_file, reference, reference_backend, max_tokens, window, as_json, sweep_k, trace_routing,
             experts_per_token, cache, threads, no_verify, kernels):
    """Perplexity of PACK on a text; with --reference, KL(reference || pack) and top-1 agreement."""
    from moestream.layouts import Manifest, PackError
    from moestream.runtime import evaluate, load
    from moestream.runtime.evaluate import format_eval

    try:
        ks = [int(k) for k in sweep_k.split(",")] if sweep_k else [experts_per_token]
    except ValueError:
        raise PackError(f"--sweep-k {sweep_k!r}: expected comma-separated integers, e.g. 2,4,8") from None
    per_k = sum(x.stride for x in Manifest.load(pack).experts)
    results = []
    for k in ks:
        rt = load(pack, cache=cache, experts_per_token=k, threads=threads, verify=not no_verify, kernels=kernels)
        trace = rt.trace_routing() if trace_routing else None
        try:
            res = evaluate(rt, text_file.read_text(), reference=reference, max_tokens=max_tokens, window=window,
                           reference_backend=reference_backend)
        finally:
            rt.close()
        if trace is not None:  # with --sweep-k, the last K's
            trace.save(trace_routing)
        k = k or rt.pack.manifest.top_k
        results.append({"k": k, "expert_bytes_per_token": k * per_k, **res})
    if not sweep_k:
        click.echo(json.dumps(results[0], indent=1) if as_json else format_eval(results[0]))
    elif as_json:
        click.echo(json.dumps(results, indent=1))
    else:
        click.echo(f"{'K':>3} {'MB/token':>9} {'ppl':>8} {'KL mean':>8} {'KL p99':>7} {'top-1':>6}")
        for r in results:
            click.echo(f"{r['k']:>3} {r['expert_bytes_per_token'] / 1e6:>9.2f} {r['ppl']:>8.3f} "
                       f"{r.get('kl_mean', float('nan')):>8.4f} {r.get('kl_p99', float('nan')):>7.3f} "
                       f"{r.get('top1_agreement', float('nan')):>6.1%}")


@cli.command()
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--prompt-tokens", type=int, default=512, show_default=True)
@click.option("--gen-tokens", type=int, default=128, show_default=True)
@click.option("--repeat", type=int, default=1, show_default=True)
@click.option("--no-baselines", is_flag=True, help="Skip the fully resident and mlx-lm baselines.")
@click.option("--json", "as_json", is_flag=True)
@_runtime_options
@one_line_errors
def bench(pack, prompt_tokens, gen_tokens, repeat, no_baselines, as_json, experts_per_token, cache, threads,
          no_verify, kernels):
    """Prefill and decode speed, against the disk and memory limits measured in the same run."""
    from moestream.runtime.bench import bench as run
    from moestream.runtime.bench import format_bench

    r = run(pack, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, cache=cache,
            experts_per_token=experts_per_token, repeat=repeat, threads=threads, baselines=not no_baselines,
            kernels=kernels)
    click.echo(json.dumps(r, indent=1) if as_json else format_bench(r))


@cli.command()
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback unless told otherwise).")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--temp", type=float, default=None, help="Default sampling temperature.")
@click.option("--max-tokens", type=int, default=None, help="Default max tokens per request.")
@click.option("--api-key", default=None, envvar="MOESTREAM_API_KEY",
              help="Require 'Authorization: Bearer KEY' (401 otherwise); also from $MOESTREAM_API_KEY.")
@click.option("--max-concurrency", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests admitted at once (one generates, the rest queue); more get 429 + Retry-After.")
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help="Longest prompt accepted, in tokens [default: the model's context length].")
@click.option("--prompt-cache-size", type=click.IntRange(min=0), default=10, show_default=True,
              help="Conversation prefixes kept for reuse (KV and linear-attention state).")
@click.option("--prompt-cache-bytes", default="2G", show_default=True,
              help="Cap on the prefix cache's memory (its entries hold KV and linear-attention state).")
@_runtime_options
@one_line_errors
def serve(pack, host, port, temp, max_tokens, api_key, max_concurrency, max_context, prompt_cache_size,
          prompt_cache_bytes, experts_per_token, cache, threads, no_verify, kernels):
    """OpenAI-compatible HTTP server over a streamed pack.

    Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /stats.
    """
    from moestream.layouts import open_pack
    from moestream.runtime.model import check_kernels
    from moestream.runtime.server import build_server

    open_pack(pack).close()  # a bad pack fails here, in one line, not inside the server thread
    check_kernels(kernels)  # likewise --kernels metal without a Metal device
    extra = (["--temp", str(temp)] if temp is not None else []) + \
            (["--max-tokens", str(max_tokens)] if max_tokens is not None else []) + \
            ["--prompt-cache-size", str(prompt_cache_size)] + \
            (["--prompt-cache-bytes", str(prompt_cache_bytes)] if prompt_cache_bytes else [])
    server = build_server(str(pack), host, port, api_key=api_key, max_concurrency=max_concurrency,
                          max_context=max_context, mlx_args=extra, cache=cache,
                          experts_per_token=experts_per_token, threads=threads, verify=not no_verify,
                          kernels=kernels)
    click.echo(f"serving {pack} at {server.url}/v1 (OpenAI API); Ctrl-C stops", err=True)
    server.serve_forever()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
