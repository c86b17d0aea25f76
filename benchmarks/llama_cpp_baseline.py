"""llama.cpp on the same synthetic shapes: a GGUF like a synthetic pack, decoded by llama-cpp-python
next to moestream on the pack, in the same run.

The GGUF has the pack's model shapes (``qwen35moe``: the same layers, experts, head and embedding)
in Q4_0, which stores 4.5 bits per weight like MLX's 4-bit g64 with bf16 scale and bias: one expert
is 7,077,888 bytes in both. Its codes are random, as the pack's are (speed does not depend on them).
llama.cpp's modes, each from a cold page cache:

- ``mmap``: the GGUF memory-mapped, page faults load what the kernels touch (weight repacking off,
  so nothing is copied into RAM at load);
- (llama.cpp's ``lazy_mode`` reads marked tensors on demand, but this version marks only some
  architectures' per-layer embeddings, not qwen35moe's experts, so it is not a separate mode here);
- moestream: ``decode_run`` on the pack with ``--cache os`` (the page cache keeps what it can).

llama.cpp maps with MAP_POPULATE, so on a machine whose RAM holds the file it reads all of it at load
and decodes from RAM. ``--memory-limit SIZE`` runs each mode in a memory cgroup of that size (Linux,
cgroup v1 memory controller, root), whose page cache cannot hold the experts: a machine with that
much RAM, where both must stream.

Optional: needs ``pip install llama-cpp-python gguf`` (built here from source, 0.3.36).
Usage: ``python benchmarks/llama_cpp_baseline.py PACK [--gguf FILE] [-k 4] [--prompt-tokens 16]
[--memory-limit 6G]``.
"""

from __future__ import annotations

from moestream.runtime.cpu.threads import prefer_passive_wait

prefer_passive_wait()  # before torch or mlx-lm load libgomp, which reads OMP_WAIT_POLICY once

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

Q4_0_BLOCK, Q4_0_BYTES = 32, 18  # 32 weights: an f16 scale and 16 bytes of codes


def _q4_0(rng, rows: int, cols: int, std: float = 0.02) -> np.ndarray:
    """Random Q4_0 rows: codes uniform, scales as a N(0, std) group's absmax / 8 would give."""
    blocks = rng.integers(0, 256, (rows * cols // Q4_0_BLOCK, Q4_0_BYTES), dtype=np.uint8)
    d = (rng.uniform(0.7, 1.3, len(blocks)) * std * 2.5 / 8).astype(np.float16)
    blocks[:, :2] = d.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // Q4_0_BLOCK * Q4_0_BYTES)


def write_gguf(path: Path, cfg: dict, layers: int, k: int, seed: int = 0) -> None:
    import gguf

    t = cfg.get("text_config", cfg)
    h, e, i, v = t["hidden_size"], t["num_experts"], t["moe_intermediate_size"], t["vocab_size"]
    hd, nh, nkv = t["head_dim"], t["num_attention_heads"], t["num_key_value_heads"]
    dk, nk, dv, nv = (
        t["linear_key_head_dim"],
        t["linear_num_key_heads"],
        t["linear_value_head_dim"],
        t["linear_num_value_heads"],
    )
    shexp, interval = t["shared_expert_intermediate_size"], t.get("full_attention_interval", 4)
    rope = t.get("rope_parameters", {})
    w = gguf.GGUFWriter(str(path) + ".part", "qwen35moe")
    w.add_context_length(4096)
    w.add_embedding_length(h)
    w.add_block_count(layers)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_freq_base(float(rope.get("rope_theta", 1e7)))
    w.add_rope_dimension_count(int(hd * rope.get("partial_rotary_factor", 0.25)))
    w.add_rope_dimension_sections(list(rope.get("mrope_section", [11, 11, 10])) + [0])
    w.add_layer_norm_rms_eps(t["rms_norm_eps"])
    w.add_expert_count(e)
    w.add_expert_used_count(k)
    w.add_expert_feed_forward_length(i)
    w.add_expert_shared_feed_forward_length(shexp)
    w.add_ssm_conv_kernel(t["linear_conv_kernel_dim"])
    w.add_ssm_state_size(dk)
    w.add_ssm_group_count(nk)
    w.add_ssm_time_step_rank(nv)
    w.add_ssm_inner_size(dv * nv)
    w.add_full_attention_interval(interval)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_tokenizer_model("none")  # token ids only; llama.cpp adds vocab_size dummy tokens
    w.add_vocab_size(v)
    rng = np.random.default_rng(seed)
    Q4, F32 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.F32
    tensors = []  # (name, numpy shape [outer..., inner], type, maker)

    def mat(name, *shape):
        tensors.append((name, shape, Q4, lambda: _q4_0(rng, int(np.prod(shape[:-1])), shape[-1])))

    def vec(name, *shape, fill=None):
        tensors.append(
            (
                name,
                shape,
                F32,
                lambda: (
                    np.full(shape, fill, np.float32)
                    if fill is not None
                    else (rng.standard_normal(shape) * 0.1).astype(np.float32)
                ),
            )
        )

    mat("token_embd.weight", v, h)
    for b in range(layers):
        p = f"blk.{b}."
        vec(p + "attn_norm.weight", h, fill=1.0)
        vec(p + "post_attention_norm.weight", h, fill=1.0)
        if (b + 1) % interval:  # gated delta net
            kd, vd = dk * nk, dv * nv
            mat(p + "attn_qkv.weight", 2 * kd + vd, h)
            mat(p + "attn_gate.weight", vd, h)
            vec(p + "ssm_conv1d.weight", 2 * kd + vd, t["linear_conv_kernel_dim"])
            vec(p + "ssm_dt.bias", nv, fill=1.0)
            vec(p + "ssm_a", nv, fill=-1.0)
            vec(p + "ssm_beta.weight", nv, h)
            vec(p + "ssm_alpha.weight", nv, h)
            vec(p + "ssm_norm.weight", dv, fill=1.0)
            mat(p + "ssm_out.weight", h, vd)
        else:  # gated attention
            mat(p + "attn_q.weight", 2 * hd * nh, h)
            mat(p + "attn_k.weight", hd * nkv, h)
            mat(p + "attn_v.weight", hd * nkv, h)
            mat(p + "attn_output.weight", h, hd * nh)
            vec(p + "attn_q_norm.weight", hd, fill=1.0)
            vec(p + "attn_k_norm.weight", hd, fill=1.0)
        vec(p + "ffn_gate_inp.weight", e, h)
        mat(p + "ffn_gate_exps.weight", e, i, h)
        mat(p + "ffn_up_exps.weight", e, i, h)
        mat(p + "ffn_down_exps.weight", e, h, i)
        vec(p + "ffn_gate_inp_shexp.weight", h)
        mat(p + "ffn_gate_shexp.weight", shexp, h)
        mat(p + "ffn_up_shexp.weight", shexp, h)
        mat(p + "ffn_down_shexp.weight", h, shexp)
    vec("output_norm.weight", h, fill=1.0)
    mat("output.weight", v, h)
    for name, shape, kind, _ in tensors:  # logical shapes (numpy order); gguf-py reverses them
        n = int(np.prod(shape))
        w.add_tensor_info(
            name, shape, np.dtype(np.float32), n * Q4_0_BYTES // Q4_0_BLOCK if kind == Q4 else 4 * n, raw_dtype=kind
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, kind, make in tensors:
        w.write_tensor_data(make())
    w.close()
    os.replace(str(path) + ".part", path)


def _disk_bytes() -> int:
    """Bytes this process has made the storage layer read (page faults and readahead included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def _quiet(L) -> None:
    @ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
    def sink(level, text, user):
        pass

    _quiet.keep = sink  # the callback must outlive every call into llama.cpp
    L.llama_log_set(sink, None)


def _drop(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def run_llama_cpp(gguf_path: Path, prompt: list[int], feed: list[int], mode: str, threads: int) -> dict:
    """Prefill ``prompt``, then decode one token at a time, fed ``feed`` (random ids: greedy decoding
    of random weights repeats one token, so every step would route alike and read nothing new)."""
    import llama_cpp as L

    _quiet(L)
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.load_mode = 1  # LLAMA_LOAD_MODE_MMAP
    mp.use_extra_bufts = False  # no repacking: it would copy every weight into RAM at load
    mp.lazy_mode = 0  # LLAMA_LAZY_MODE_OFF
    t0 = time.perf_counter()
    model = L.llama_model_load_from_file(str(gguf_path).encode(), mp)
    if not model:
        raise RuntimeError(f"{gguf_path}: llama.cpp could not load it")
    cp = L.llama_context_default_params()
    gen = len(feed)
    cp.n_ctx = len(prompt) + gen + 16
    cp.n_batch = cp.n_ubatch = max(32, len(prompt))
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    load_s = time.perf_counter() - t0
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))

    def step(tokens: list[int]) -> int:
        arr = (L.llama_token * len(tokens))(*tokens)
        if L.llama_decode(ctx, L.llama_batch_get_one(arr, len(tokens))) != 0:
            raise RuntimeError("llama_decode failed")
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        if not np.isfinite(logits).all():  # NaNs would make routing degenerate (and reads warm)
            raise RuntimeError("llama.cpp produced non-finite logits on the synthetic weights")
        return int(logits.argmax())

    t = time.perf_counter()
    step(prompt)
    ttft = time.perf_counter() - t
    times, toks = [], []
    d0 = _disk_bytes()
    for tok in feed:
        t = time.perf_counter()
        toks.append(step([tok]))
        times.append(time.perf_counter() - t)
    disk = _disk_bytes() - d0
    L.llama_free(ctx)
    L.llama_model_free(model)
    return {
        "load_s": load_s,
        "prompt_tps": len(prompt) / ttft,
        "decode_tps": gen / sum(times),
        "token_ms_p50": 1e3 * float(np.median(times)),
        "disk_per_token": disk / gen,
    }


def run_moestream(pack: Path, prompt: list[int], feed: list[int], k: int, cache: str) -> dict:
    """The same token feed through moestream's runtime on the pack."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from moestream.runtime import load

    t0 = time.perf_counter()
    rt = load(pack, cache=cache, experts_per_token=k, tokenizer=False)
    load_s = time.perf_counter() - t0
    try:
        cache_ = make_prompt_cache(rt.model)
        t = time.perf_counter()
        with rt.prefill_logits_last():
            mx.eval(rt.model(mx.array([prompt]), cache=cache_))
        ttft = time.perf_counter() - t
        times, d0 = [], _disk_bytes()
        for tok in feed:
            t = time.perf_counter()
            mx.eval(mx.argmax(rt.model(mx.array([[tok]]), cache=cache_)[:, -1], axis=-1))
            times.append(time.perf_counter() - t)
        return {
            "load_s": load_s,
            "prompt_tps": len(prompt) / ttft,
            "decode_tps": len(feed) / sum(times),
            "token_ms_p50": 1e3 * float(np.median(times)),
            "disk_per_token": (_disk_bytes() - d0) / len(feed),
        }
    finally:
        rt.close()


CGROUPS = Path("/sys/fs/cgroup/memory")


def _in_cgroup(limit: int, argv: list[str]) -> dict:
    """Run this script's ``--child`` in a fresh memory cgroup of ``limit`` bytes; its JSON result."""
    group = CGROUPS / f"moestream-bench-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
    except OSError as e:
        raise SystemExit(
            f"--memory-limit: cannot make a memory cgroup under {CGROUPS} ({e.strerror}); "
            "needs root and the cgroup v1 memory controller"
        )
    try:
        out = subprocess.run(
            [sys.executable, __file__, *argv, "--cgroup", str(group)], check=True, capture_output=True, text=True
        ).stdout
        return json.loads(out.strip().splitlines()[-1])
    finally:
        for _ in range(50):  # the child's page cache is still charged for a moment
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pack", type=Path)
    ap.add_argument("--gguf", type=Path, help="default: PACK.q4_0.gguf (written if absent)")
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument(
        "--modes",
        default="mmap,moestream",
        help="comma-separated: mmap (llama.cpp), moestream or moestream:CACHE (default cache os)",
    )
    ap.add_argument(
        "--warm",
        action="store_true",
        help="read the GGUF and the pack into the page cache first instead of dropping them",
    )
    ap.add_argument("--memory-limit", help="run each mode in a memory cgroup of SIZE (e.g. 6G)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--cgroup", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from moestream.layouts import Manifest

    m = Manifest.load(args.pack)
    gg = args.gguf or args.pack.with_suffix(".q4_0.gguf")
    if not gg.exists():
        t = time.perf_counter()
        write_gguf(gg, m.config, len(m.moe_layers()), args.k)
        print(f"wrote {gg} ({gg.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
    ids = (
        np.random.default_rng(0)
        .integers(0, int(m.config.get("vocab_size", 1000)), args.prompt_tokens + args.gen_tokens)
        .tolist()
    )
    prompt, feed = ids[: args.prompt_tokens], ids[args.prompt_tokens :]
    pack_files = [args.pack / x.file for x in m.experts]
    if args.child:
        (Path(args.cgroup) / "cgroup.procs").write_text(str(os.getpid()))
        print(json.dumps(_run_mode(args, args.child, gg, prompt, feed)))
        return
    limit = None
    if args.memory_limit:
        from moestream.runtime.options import parse_size

        limit = parse_size(args.memory_limit)
    print(
        f"K={args.k}, prompt {args.prompt_tokens} tokens, {args.gen_tokens} decoded, {args.threads} threads, "
        f"each run from a {'warm' if args.warm else 'cold'} page cache"
        + (f", in a memory cgroup of {limit / 2**30:.1f} GiB" if limit else "")
    )
    for mode in args.modes.split(","):
        if args.warm:
            for f in [gg] if mode == "mmap" else pack_files:
                with open(f, "rb") as fh:
                    while fh.read(64 << 20):
                        pass
        else:
            _drop([gg, *pack_files])
        if limit:
            r = _in_cgroup(
                limit,
                [
                    str(args.pack),
                    "--gguf",
                    str(gg),
                    "-k",
                    str(args.k),
                    "--prompt-tokens",
                    str(args.prompt_tokens),
                    "--gen-tokens",
                    str(args.gen_tokens),
                    "--threads",
                    str(args.threads),
                    "--child",
                    mode,
                ],
            )
        else:
            r = _run_mode(args, mode, gg, prompt, feed)
        name = (
            f"moestream (--cache {mode.partition(':')[2] or 'os'})"
            if mode.startswith("moestream")
            else f"llama.cpp {mode}"
        ) + f" (load {r['load_s']:.1f} s)"
        print(
            f"{name}: prompt {r['prompt_tps']:.2f} tok/s, decode {r['decode_tps']:.3f} tok/s "
            f"(p50 {r['token_ms_p50']:.1f} ms), {r['disk_per_token'] / 1e6:.1f} MB read from the disk per "
            f"decoded token",
            flush=True,
        )


def _run_mode(args, mode: str, gg: Path, prompt: list[int], feed: list[int]) -> dict:
    if mode.startswith("moestream"):
        return run_moestream(args.pack, prompt, feed, args.k, mode.partition(":")[2] or "os")
    return run_llama_cpp(gg, prompt, feed, mode, args.threads)


if __name__ == "__main__":
    main()
