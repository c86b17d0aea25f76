"""Train the small Qwen3.5-MoE that ``moestream demo`` ships (``cli/demo_model/``).

The corpus is the running Python's own standard library (``*.py`` under ``sysconfig``'s stdlib),
so the model trains offline anywhere; files are split into train and held-out by a hash of their
path, and ``eval.txt`` is cut from held-out files only. A byte-level BPE tokenizer is trained on
the training files with ``tokenizers``, then transformers' ``Qwen3_5MoeForCausalLM`` (gated-delta
and gated-attention layers, routed experts plus a shared expert) is trained from scratch and saved
in the hub's BF16 layout (``model.language_model.*``, fused 3-D experts), the layout the converter
reads. Made for a GPU (a few minutes on one); runs on a CPU too, slowly.

    python3 scripts/train_demo_model.py --out cli/demo_model --minutes 3.5 --steps 5000

The chat template and its LICENSE are copied from ``--template-dir`` (default: the shipped
``cli/demo_model``, which holds the Apache-2.0 Qwen3.5 template).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import sysconfig
import time
import zlib
from pathlib import Path

log = logging.getLogger("train_demo_model")

# The Qwen chat specials at ids 0-8, as in convert/tiny.py and the trained test fixture.
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]
EOT, IM_END = 0, 2

# hidden 128, 4 layers (3 Gated DeltaNet + 1 gated attention, as Qwen3.5 interleaves them), 16 experts
# top-4 of intermediate 64 plus a shared expert: ~2.8M parameters, ~5.6 MB in bf16. Head and expert
# widths are multiples of 64 so every quantization group size the converter offers divides them.
TEXT_CONFIG = {
    "model_type": "qwen3_5_moe_text",
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    "full_attention_interval": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 32,
    "linear_conv_kernel_dim": 4,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
    "vocab_size": 3072,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
    "attn_output_gate": True,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "router_aux_loss_coef": 0.001,
    "output_router_logits": False,
    "bos_token_id": None,
    "eos_token_id": IM_END,
    "pad_token_id": None,
    "partial_rotary_factor": 0.25,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000000,
        "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10],
        "mrope_interleaved": True,
    },
}


def corpus_files(root: Path, max_bytes: int = 256_000) -> list[Path]:
    """The stdlib's ``.py`` files, sorted; generated data tables (big files) and site-packages left out."""
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")) or "/site-packages/" in rel:
            continue
        try:
            if p.is_file() and 0 < p.stat().st_size <= max_bytes:
                out.append(p)
        except OSError:
            continue
    return out


def held_out(rel: str, every: int) -> bool:
    """A fixed 1-in-``every`` choice of files by path hash: the same split on every machine."""
    return zlib.crc32(rel.encode()) % every == 0


def read_corpus(root: Path, every: int, eval_bytes: int, limit: int | None) -> tuple[list[str], str, int]:
    """(training documents, eval text, held-out file count). Eval text: whole held-out files outside
    test folders, in path order, cut at a line end once ``eval_bytes`` is reached."""
    train, held = [], []
    for p in corpus_files(root)[:limit]:
        rel = p.relative_to(root).as_posix()
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if held_out(rel, every):
            held.append((rel, text))
        else:
            train.append(text)
    ev = ""
    for rel, text in held:
        if "test" in rel.split("/")[0] or "/test" in rel:
            continue
        ev += text if text.endswith("\n") else text + "\n"
        if len(ev) >= eval_bytes:
            break
    if len(ev) > eval_bytes:
        ev = ev[: ev.rfind("\n", 0, eval_bytes) + 1]
    return train, ev, len(held)


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    assert [tok.token_to_id(s) for s in SPECIALS] == list(range(len(SPECIALS))), "specials must be ids 0-8"
    return tok


def write_tokenizer_files(tok, out: Path, template: str) -> None:
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "add_bos_token": False,
                "model_max_length": 4096,
                "clean_up_tokenization_spaces": False,
                "chat_template": template,
            },
            indent=1,
        )
    )
    if not (out / "chat_template.jinja").exists() or (out / "chat_template.jinja").read_text() != template:
        (out / "chat_template.jinja").write_text(template)
    # As the hub's Qwen3.5 releases: both <|im_end|> (chat) and <|endoftext|> (end of a document) stop.
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "eos_token_id": [IM_END, EOT],
                "pad_token_id": EOT,
                "do_sample": True,
                "temperature": 0.6,
                "top_k": 20,
                "top_p": 0.95,
            },
            indent=1,
        )
    )


def hub_name(name: str) -> str:
    """transformers' text-model names -> the hub's multimodal layout the converter reads."""
    if name.startswith("model."):
        return "model.language_model." + name[len("model.") :]
    return name


def save_checkpoint(model, out: Path) -> int:
    import torch
    from safetensors.torch import save_file

    tensors = {hub_name(k): v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    import transformers

    cfg = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "dtype": "bfloat16",
        "text_config": {**TEXT_CONFIG, "dtype": "bfloat16"},
        "tie_word_embeddings": False,
        "transformers_version": transformers.__version__,
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def batches(data, batch: int, seq: int, gen):
    import torch

    n = data.numel() - seq - 1
    while True:
        starts = torch.randint(0, n, (batch,), generator=gen, device="cpu").to(data.device)
        idx = starts[:, None] + torch.arange(seq + 1, device=data.device)[None]
        chunk = data[idx].long()
        yield chunk[:, :-1], chunk[:, 1:]


def windows_ppl(model, ids: list[int], window: int, device) -> float:
    """Perplexity in non-overlapping windows, each a fresh context, in float32: as ``moestream eval`` scores."""
    import torch
    import torch.nn.functional as F

    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), window):
            w = ids[i : i + window]
            if len(w) < 2:
                continue
            x = torch.tensor(w, device=device)[None]
            logits = model(input_ids=x).logits[0, :-1].float()
            nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            n += len(w) - 1
    return math.exp(nll / n)


def sample(model, tok, prompt: str, n: int, device) -> str:
    """Greedy continuation, the whole sequence recomputed per token (no cache: version-proof and short)."""
    import torch

    ids = tok.encode(prompt).ids
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor(ids, device=device)[None]).logits[0, -1].argmax())
            if nxt in (EOT, IM_END):
                break
            ids.append(nxt)
    return tok.decode(ids)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("cli/demo_model"))
    ap.add_argument(
        "--template-dir",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "cli/demo_model",
        help="holds chat_template.jinja (and LICENSE, copied along)",
    )
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--minutes", type=float, default=4.0, help="training wall-clock budget")
    ap.add_argument("--steps", type=int, default=3000, help="at most this many steps (the schedule's length)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aux", type=float, default=0.01, help="router load-balancing loss weight")
    ap.add_argument("--holdout-every", type=int, default=40)
    ap.add_argument("--eval-bytes", type=int, default=40_000)
    ap.add_argument("--limit-files", type=int, default=None, help="first N files only (smoke tests)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)

    import torch
    import torch.nn.functional as F
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    template = (args.template_dir / "chat_template.jinja").read_text()
    if args.template_dir.resolve() != args.out.resolve() and (args.template_dir / "LICENSE").exists():
        shutil.copy(args.template_dir / "LICENSE", args.out / "LICENSE")

    docs, eval_text, n_held = read_corpus(args.stdlib, args.holdout_every, args.eval_bytes, args.limit_files)
    log.info(
        "corpus: %s (Python %s): %d training files, %.1f MB; %d held out, eval.txt %d bytes",
        args.stdlib,
        sys.version.split()[0],
        len(docs),
        sum(map(len, docs)) / 1e6,
        n_held,
        len(eval_text),
    )
    (args.out / "eval.txt").write_text(eval_text)

    tok = train_tokenizer(docs, TEXT_CONFIG["vocab_size"])
    write_tokenizer_files(tok, args.out, template)
    stream = []
    for enc in tok.encode_batch(docs):
        stream.extend(enc.ids)
        stream.append(EOT)  # a document boundary the model learns to emit at a file's end
    data = torch.tensor(stream, dtype=torch.int32, device=device)
    eval_ids = tok.encode(eval_text).ids
    log.info(
        "tokenizer: vocab %d; %d training tokens (%.2f bytes/token); eval %d tokens (%.1fs so far)",
        tok.get_vocab_size(),
        data.numel(),
        sum(map(len, docs)) / data.numel(),
        len(eval_ids),
        time.perf_counter() - t_start,
    )

    model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**TEXT_CONFIG)).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %d parameters (%.2f MB in bf16) on %s", n_params, 2 * n_params / 1e6, device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    warmup = min(100, args.steps // 10 + 1)

    def lr_at(frac: float) -> float:
        # Warm-up, then cosine to 10%. ``frac`` is the larger of steps and time used, so a run cut
        # short by the time budget still ends its schedule at the low learning rate.
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    gen = torch.Generator().manual_seed(args.seed)
    it = batches(data, args.batch, args.seq, gen)
    t_train, step, budget = time.perf_counter(), 0, args.minutes * 60
    while step < args.steps:
        used = time.perf_counter() - t_train
        if used > budget:
            break
        frac = max(step / args.steps, used / budget)
        for g in opt.param_groups:
            g["lr"] = args.lr * (step + 1) / warmup if step < warmup else lr_at(frac)
        x, y = next(it)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(input_ids=x, output_router_logits=True)
        ce = F.cross_entropy(out.logits.float().view(-1, out.logits.shape[-1]), y.reshape(-1))
        loss = ce + args.aux * out.aux_loss if out.aux_loss is not None else ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0 or step == 1:
            log.info(
                "step %d  loss %.3f  aux %.3f  lr %.2e  %.0f tok/s",
                step,
                ce.item(),
                float(out.aux_loss.detach()) if out.aux_loss is not None else 0.0,
                opt.param_groups[0]["lr"],
                step * args.batch * args.seq / (time.perf_counter() - t_train),
            )
    train_s = time.perf_counter() - t_train
    log.info("trained %d steps (%.1f M tokens) in %.1f s", step, step * args.batch * args.seq / 1e6, train_s)

    model.eval()
    # Score the weights as saved: rounded to bf16, computed in float32.
    model.to(torch.bfloat16).to(torch.float32)
    ppl = windows_ppl(model, eval_ids[:2048], 512, device)
    log.info("eval.txt perplexity (first 2048 tokens, windows of 512, bf16 weights): %.3f", ppl)
    for prompt in ("def fibonacci(n):\n", "import os\n\n\ndef ", "class Stack:\n    def __init__(self):\n"):
        log.info("sample %r:\n%s", prompt, sample(model, tok, prompt, 80, device))
    size = save_checkpoint(model, args.out)
    log.info("saved %s: %.2f MB of bf16 tensors; total %.1f s", args.out, size / 1e6, time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
