"""The ``moestream`` commands that run packs: generate, chat, calibrate, eval, eval-tools, bench and serve.

Registered on the click group of :mod:`moestream.app`; they share the runtime flags of
:mod:`moestream.runtime_options` (one ``options`` argument).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from moestream.app import cli, ctrl_c_kept, one_line_errors
from moestream.app import human as _human
from moestream.runtime_options import runtime_options


def _print_stats(s) -> None:
    click.echo(
        f"prompt: {s.prompt_tokens} tokens, {s.prompt_tps:.1f} tok/s; time to first token {s.ttft_s:.2f} s", err=True
    )
    click.echo(
        f"decode: {s.generation_tokens} tokens, {s.generation_tps:.2f} tok/s; "
        f"{_human(s.bytes_per_token)} of experts read per token ({_human(s.decode_bytes)} in all, "
        f"prefill {_human(s.prefill_bytes)}); cache hit rate {s.hit_rate:.1%}; peak RSS "
        f"{_human(s.peak_rss_bytes)}",
        err=True,
    )


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
@click.option(
    "--trace-routing",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Save every MoE layer's routing (.npz; see notebooks/routing.ipynb).",
)
@runtime_options
@one_line_errors
def generate(pack, prompt, max_tokens, temp, top_p, top_k, seed, stop, no_think, raw, stats, trace_routing, options):
    """Generate from PACK, streaming routed experts from disk."""
    from moestream.runtime import load
    from moestream.runtime.generate import generate as run

    rt = load(pack, options)
    trace = rt.trace_routing() if trace_routing else None
    try:
        with ctrl_c_kept() as check:
            for chunk in run(
                rt,
                prompt,
                max_tokens=max_tokens,
                temp=temp,
                top_p=top_p,
                top_k=top_k,
                seed=seed,
                stop=tuple(stop),
                raw=raw,
                think=not no_think,
            ):
                click.echo(chunk.text, nl=False)
                check()
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
@runtime_options
@one_line_errors
def chat(pack, max_tokens, temp, top_p, no_think, hide_think, options):
    """Multi-turn chat in the terminal (/clear forgets the conversation, /exit leaves)."""
    from moestream.runtime import load
    from moestream.runtime.generate import generate as run

    rt = load(pack, options)
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
            rendered = rt.tokenizer.apply_chat_template(
                history, add_generation_prompt=True, tokenize=False, enable_thinking=not no_think
            )
            answer, thinking = [], rendered.rstrip().endswith("<think>")
            with ctrl_c_kept() as check:
                for chunk in run(
                    rt, messages=history, max_tokens=max_tokens, temp=temp, top_p=top_p, think=not no_think
                ):
                    text = chunk.text
                    answer.append(text)
                    thinking = _echo_thinking(text, thinking, hide_think)
                    check()
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
        part, rest = (text, "") if i < 0 else (text[:i], text[i + len(tag) :])
        if part and not (thinking and hide):
            click.echo(click.style(part, dim=True) if thinking else part, nl=False)
        if i < 0:
            break
        thinking, text = not thinking, rest
    return thinking


@cli.command()
@click.argument("pack")
@click.option("--text", "text_file", required=True, type=click.File("r", encoding="utf-8"), help="Calibration text.")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Statistics file to write (safetensors).",
)
@click.option("--max-tokens", type=int, default=4096, show_default=True)
@click.option("--window", type=int, default=512, show_default=True, help="Tokens per forward pass.")
@click.option("--skip-chars", type=int, default=0, help="Start this far into the text (keep it apart from eval text).")
@click.option(
    "--matrix-bytes",
    default="1G",
    show_default=True,
    help="Budget for full E[x x^T] matrices (what GPTQ needs): per expert if all fit, else per layer.",
)
@click.option(
    "--work",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="With a checkpoint (not a pack): where to write its temporary 8-bit pack "
    "(default: next to OUTPUT; removed afterwards).",
)
@one_line_errors
def calibrate(pack, text_file, output, max_tokens, window, skip_chars, matrix_bytes, work):
    """Record per-expert and per-linear input statistics (and routing counts) on calibration text.

    PACK is a pack (preferably 8-bit) or a Hugging Face checkpoint (folder or hub id), which is first
    converted to a temporary 8-bit pack. Then `moestream convert SOURCE --calibration STATS`.
    """
    import shutil

    from moestream.layouts.errors import OptionError
    from moestream.runtime.collect_calibration import calibrate as run
    from moestream.runtime.options import parse_size

    try:
        budget = parse_size(matrix_bytes)
    except ValueError:
        raise OptionError("matrix_bytes", matrix_bytes, "expected a size such as 512M or 8G") from None
    text = text_file.read()[skip_chars:]
    if (Path(pack) / "manifest.json").is_file():
        cal = run(Path(pack), text, max_tokens=max_tokens, window=window, matrix_bytes=budget)
    else:
        from moestream.convert import convert

        tmp = work or output.parent / f".{output.name}.pack8"
        click.echo(f"{pack} is not a pack: converting it to an 8-bit pack at {tmp} first", err=True)
        # residents quantized too: their products are the ones that record statistics
        convert(pack, tmp, bits=8, resident_bits=8, force=work is None and tmp.exists(), progress=sys.stderr.isatty())
        try:
            cal = run(tmp, text, max_tokens=max_tokens, window=window, matrix_bytes=budget)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    cal.save(output)
    routed = sum(int(cal.arrays[f"experts.{i}.count"].sum()) for i in cal.layers)
    click.echo(
        f"wrote {output}: {cal.meta['tokens']} tokens, {len(cal.layers)} MoE layers ({routed} expert "
        f"routings; {cal.meta['expert_matrices']} matrices), {len(cal.linear_names)} linears "
        f"({'with' if cal.meta['linear_matrices'] else 'without'} matrices)"
    )


@cli.command(name="eval")
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--reference",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Hugging Face folder (run by mlx-lm in float32) or pack (fully resident).",
)
@click.option(
    "--reference-backend",
    type=click.Choice(["mlx", "transformers"]),
    default="mlx",
    show_default=True,
    help="What runs an HF folder reference (both unquantized, float32).",
)
@click.option("--max-tokens", type=int, default=2048, show_default=True)
@click.option("--window", type=int, default=512, show_default=True)
@click.option(
    "--decode",
    is_flag=True,
    help="Feed each window one token at a time, as generation computes (small-batch kernels; slower).",
)
@click.option("--json", "as_json", is_flag=True)
@click.option(
    "--sweep-k",
    default=None,
    help="Comma-separated K values (e.g. 2,4,6,8): one evaluation each, "
    "with expert bytes read per token, in one table.",
)
@click.option(
    "--trace-routing",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Save every MoE layer's routing over the text (.npz; see notebooks/routing.ipynb).",
)
@runtime_options
@one_line_errors
def eval_cmd(
    pack, text_file, reference, reference_backend, max_tokens, window, decode, as_json, sweep_k, trace_routing, options
):
    """Perplexity of PACK on a text; with --reference, KL(reference || pack) and top-1 agreement."""
    from moestream.layouts import Manifest, PackError
    from moestream.runtime import load
    from moestream.runtime.evaluate import evaluate, format_eval

    try:
        ks = [int(k) for k in sweep_k.split(",")] if sweep_k else [options.experts_per_token]
    except ValueError:
        raise PackError(f"--sweep-k {sweep_k!r}: expected comma-separated integers, e.g. 2,4,8") from None
    per_k = sum(x.stride for x in Manifest.load(pack).experts)
    results = []
    for k in ks:
        rt = load(pack, options.replace(experts_per_token=k))
        trace = rt.trace_routing() if trace_routing else None
        try:
            res = evaluate(
                rt,
                text_file.read_text(),
                reference=reference,
                max_tokens=max_tokens,
                window=window,
                reference_backend=reference_backend,
                decode=decode,
            )
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
            click.echo(
                f"{r['k']:>3} {r['expert_bytes_per_token'] / 1e6:>9.2f} {r['ppl']:>8.3f} "
                f"{r.get('kl_mean', float('nan')):>8.4f} {r.get('kl_p99', float('nan')):>7.3f} "
                f"{r.get('top1_agreement', float('nan')):>6.1%}"
            )


@cli.command(name="eval-tools")
@click.argument("pack", type=click.Path(path_type=Path), required=False)
@click.option(
    "--cases",
    "cases_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='JSON lines: {"id", "tools", "messages", "expected": [{"name", "arguments"}]} ([] expects no call).',
)
@click.option("--think/--no-think", default=False, show_default=True, help="Qwen3.5's thinking in the template.")
@click.option("-m", "--max-tokens", type=int, default=256, show_default=True, help="Tokens per reply.")
@click.option("--url", default=None, help="An OpenAI-compatible server to run the cases against instead of PACK.")
@click.option("--model", default=None, help="The model name sent to --url (default: the first it lists).")
@click.option("--api-key", envvar="OPENAI_API_KEY", default=None, help="Bearer key for --url [env OPENAI_API_KEY].")
@click.option("--json", "as_json", is_flag=True, help="The summary and every case's scores as JSON.")
@runtime_options
@one_line_errors
def eval_tools_cmd(pack, cases_file, think, max_tokens, url, model, api_key, as_json, options):
    """Tool-call validity of PACK (or of the server at --url) on a cases file: markup that parses, right
    function, right arguments (typed by the tool's schema), no call when none is expected."""
    from moestream.layouts.errors import OptionError
    from moestream.runtime.eval_tools import eval_tools, format_summary, load_cases

    if (pack is None) == (url is None):
        raise OptionError("url", url, "give either PACK or --url (a server to run the cases against)")
    if max_tokens < 1:
        raise OptionError("max_tokens", max_tokens, "must be at least 1")
    cases = load_cases(cases_file)
    if url is not None:
        res = eval_tools(
            cases,
            url=url,
            model=model,
            think=think,
            max_tokens=max_tokens,
            experts_per_token=options.experts_per_token,
            api_key=api_key,
        )
    else:
        from moestream.runtime import load

        with load(pack, options) as rt:
            res = eval_tools(
                cases, rt=rt, think=think, max_tokens=max_tokens, experts_per_token=options.experts_per_token
            )
    click.echo(json.dumps(res, indent=1) if as_json else format_summary(res))


@cli.command()
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--prompt-tokens", type=int, default=512, show_default=True)
@click.option("--gen-tokens", type=int, default=128, show_default=True)
@click.option(
    "--repeat",
    type=int,
    default=1,
    show_default=True,
    help="Timed runs; the best is reported (the fully resident baseline takes as many).",
)
@click.option("--no-baselines", is_flag=True, help="Skip the fully resident and mlx-lm baselines.")
@click.option(
    "--baselines",
    "which",
    default="naive,resident,mlx-lm",
    show_default=True,
    help="Which baselines to run: naive (mmap page faults), resident (every expert in RAM), mlx-lm.",
)
@click.option(
    "--read-ahead",
    type=int,
    default=0,
    show_default=True,
    help="Experts of the next layer to guess and read while a layer computes (0: off).",
)
@click.option(
    "--profile",
    is_flag=True,
    help="Then one more run that times each kind of work in a decoded token (products, attention, ...).",
)
@click.option("--json", "as_json", is_flag=True)
@runtime_options
@one_line_errors
def bench(pack, prompt_tokens, gen_tokens, repeat, no_baselines, which, read_ahead, profile, as_json, options):
    """Prefill and decode speed, against the disk and memory limits measured in the same run."""
    from moestream.layouts import PackError
    from moestream.runtime.bench import BASELINES, format_bench
    from moestream.runtime.bench import bench as run

    names = tuple(n.strip().replace("-", "_") for n in which.split(",") if n.strip())
    bad = sorted(set(names) - set(BASELINES))
    if bad:
        raise PackError(f"--baselines {which}: expected some of naive, resident, mlx-lm (not {', '.join(bad)})")
    r = run(
        pack,
        options.replace(read_ahead=read_ahead),
        prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens,
        repeat=repeat,
        baselines=() if no_baselines else names,
        profile=profile,
    )
    click.echo(json.dumps(r, indent=1) if as_json else format_bench(r))


@cli.command()
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback unless told otherwise).")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--temp", type=float, default=None, help="Default sampling temperature.")
@click.option("--max-tokens", type=int, default=None, help="Default max tokens per request.")
@click.option(
    "--api-key",
    default=None,
    envvar="MOESTREAM_API_KEY",
    help="Require 'Authorization: Bearer KEY' (401 otherwise); also from $MOESTREAM_API_KEY.",
)
@click.option(
    "--max-concurrency",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Requests admitted at once (one generates, the rest queue); more get 429 + Retry-After.",
)
@click.option(
    "--max-context",
    type=click.IntRange(min=2),
    default=None,
    help="Longest prompt accepted, in tokens [default: the model's context length].",
)
@click.option(
    "--prompt-cache-size",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="Conversation prefixes kept for reuse (KV and linear-attention state).",
)
@click.option(
    "--prompt-cache-bytes",
    default="2G",
    show_default=True,
    help="Cap on the prefix cache's memory (its entries hold KV and linear-attention state).",
)
@runtime_options
@one_line_errors
def serve(
    pack,
    host,
    port,
    temp,
    max_tokens,
    api_key,
    max_concurrency,
    max_context,
    prompt_cache_size,
    prompt_cache_bytes,
    options,
):
    """OpenAI-compatible HTTP server over a streamed pack.

    Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /stats.
    """
    from moestream.layouts import open_pack
    from moestream.runtime.model.runtime import check_kernels
    from moestream.runtime.serve.server import build_server

    open_pack(pack).close()  # a bad pack fails here, in one line, not inside the server thread
    check_kernels(options.kernels)  # likewise --kernels metal without a Metal device
    extra = (
        (["--temp", str(temp)] if temp is not None else [])
        + (["--max-tokens", str(max_tokens)] if max_tokens is not None else [])
        + ["--prompt-cache-size", str(prompt_cache_size)]
        + (["--prompt-cache-bytes", str(prompt_cache_bytes)] if prompt_cache_bytes else [])
    )
    server = build_server(
        str(pack),
        host,
        port,
        api_key=api_key,
        max_concurrency=max_concurrency,
        max_context=max_context,
        mlx_args=extra,
        options=options,
    )
    click.echo(f"serving {pack} at {server.url}/v1 (OpenAI API); Ctrl-C stops", err=True)
    server.serve_forever()


@cli.command()
@click.option(
    "--pack",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Measure this pack's decode instead of a small synthetic one.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where scratch files go (about 2 GB at most, removed afterwards) [default: a temporary folder].",
)
@click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the report to this file (markdown, or JSON with --json).",
)
@click.option("--quick", is_flag=True, help="Smaller probes (seconds, less accurate).")
@one_line_errors
def doctor(pack, workdir, as_json, output, quick):
    """What this machine is and does: platform, kernels and their self-check, disk and memory speed, a
    small cold and warm decode, and what known models would run at. Paste the report into an issue."""
    from moestream.runtime.doctor import doctor as run
    from moestream.runtime.doctor import format_doctor

    click.echo("doctor: measuring (a few minutes at most) ...", err=True)
    r = run(pack=pack, workdir=workdir, quick=quick)
    text = json.dumps(r, indent=1) if as_json else format_doctor(r)
    click.echo(text)
    if output is not None:
        output.write_text(text)
        click.echo(f"report written to {output}", err=True)
