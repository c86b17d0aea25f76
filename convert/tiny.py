"""A tiny random Qwen3.5-MoE checkpoint in the hub's own BF16 layout, made without torch.

Used by the tests (packs of any shape without ``../shared``) and by the benchmark that needs a
checkpoint bigger than a real test fixture (``moestream demo`` ships a trained model instead).
Tensor names and shapes are derived from mlx-lm's model definition and mapped back to the hub's
layout: ``model.language_model.*``, fused ``experts.gate_up_proj`` [E, 2I, H] /
``experts.down_proj`` [E, H, I], RMSNorm weights stored offset from 1, conv1d as [C, 1, K], plus a
``model.visual`` and an ``mtp`` tensor that a converter must drop. Tensors are written one at a
time, so a checkpoint far larger than RAM can be made.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from moestream.layouts import SafetensorsWriter
from moestream.quant import f32_to_bf16

log = logging.getLogger(__name__)

INIT_STD = 0.02
TINY_TEXT_CONFIG = {
    "model_type": "qwen3_5_moe_text",
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    "full_attention_interval": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "linear_num_key_heads": 4,
    "linear_num_value_heads": 8,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 32,
    "linear_conv_kernel_dim": 4,
    "num_experts": 32,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 128,
    "shared_expert_intermediate_size": 128,
    "vocab_size": 1024,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
    "attn_output_gate": True,
    "hidden_act": "silu",
    "dtype": "bfloat16",
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000000,
        "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10],
        "mrope_interleaved": True,
    },
}


def tiny_config(**text_overrides) -> dict:
    """A hub-style ``config.json`` dict (``qwen3_5_moe`` with a ``text_config``)."""
    tc = {**TINY_TEXT_CONFIG, **text_overrides}
    n = tc["num_hidden_layers"]
    if "layer_types" not in text_overrides:
        # mlx-lm needs at least one full-attention layer: shorten the interval for very small models.
        k = tc["full_attention_interval"] = min(tc["full_attention_interval"], n)
        tc["layer_types"] = ["full_attention" if (i + 1) % k == 0 else "linear_attention" for i in range(n)]
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": tc,
        "tie_word_embeddings": tc["tie_word_embeddings"],
    }


def hub_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """Hub tensor names and shapes for ``config``, from mlx-lm's model definition."""
    from moestream.convert.family import family_for

    fam = family_for(config)
    out: dict[str, tuple[int, ...]] = {}
    for target, (shape, _) in fam.resident_params.items():
        name = target.replace("language_model.model", "model.language_model", 1)
        name = "lm_head.weight" if name == "language_model.lm_head.weight" else name
        if "conv1d.weight" in name:
            shape = (shape[0], 1, shape[1])
        out[name] = tuple(shape)
    for layer in fam.moe_layers():
        i, h = fam.expert_shape(layer)
        pre = f"model.language_model.layers.{layer}.mlp.experts"
        out[f"{pre}.gate_up_proj"] = (fam.num_experts, 2 * i, h)
        out[f"{pre}.down_proj"] = (fam.num_experts, h, i)
    out["model.visual.patch_embed.proj.weight"] = (64, 3 * 2 * 16 * 16)
    out["mtp.fc.weight"] = (fam.args.hidden_size, 2 * fam.args.hidden_size)
    return out


def _values(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if name.endswith("A_log"):
        return np.log(rng.uniform(1, 16, shape)).astype(np.float32)
    if name.endswith("dt_bias"):
        return np.ones(shape, np.float32)
    if len(shape) == 1:  # norms: stored offset from 1 (or plain for the gated norm), near their init
        return (0.02 * rng.standard_normal(shape)).astype(np.float32) + (1.0 if "linear_attn.norm" in name else 0.0)
    # Hugging Face's initializer_range: keeps a random model's logits from being chaotic, so
    # quantization error shows as a modest KL rather than as noise.
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(INIT_STD)


# The Qwen chat specials at ids 0-8 (as in the trained fixture), then the 256 byte-level symbols.
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
# A compact chat template in Qwen3.5's wire format (written for moestream, not copied): ChatML turns,
# a <tools> system block, assistant tool calls as <tool_call><function=NAME><parameter=ARG>,
# tool results as <tool_response> in a user turn, and the <think> switch on the generation prompt.
# Tiny models made here thus exercise the same thinking and tool paths as the real checkpoints.
CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n# Tools\\n\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>' }}"
    "{%- if messages[0].role == 'system' %}{{- '\\n\\n' + messages[0].content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}{{- '<|im_start|>user\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + (m.content or '') }}"
    "{%- for call in (m.tool_calls or []) %}"
    "{%- set f = call.function if call.function is defined else call %}"
    "{{- '\\n<tool_call>\\n<function=' + f.name + '>\\n' }}"
    "{%- for k, v in f.arguments | items %}"
    "{{- '<parameter=' + k + '>\\n' }}"
    "{{- (v | tojson) if v is mapping or (v is sequence and v is not string) else (v | string) }}"
    "{{- '\\n</parameter>\\n' }}"
    "{%- endfor %}"
    "{{- '</function>\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or loop.previtem.role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or loop.nextitem.role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}"
    "{%- endif %}"
)


def write_byte_tokenizer(folder: str | Path) -> None:
    """A minimal byte-level tokenizer (265 ids, no merges) with a ChatML template, via ``tokenizers``.

    Writes tokenizer.json, tokenizer_config.json, chat_template.jinja and generation_config.json.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    folder = Path(folder)
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord)
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({sym: len(SPECIALS) + i for i, sym in enumerate(byte_symbols)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "add_bos_token": False,
                "model_max_length": 4096,
                "clean_up_tokenization_spaces": False,
                "chat_template": CHATML_TEMPLATE,
            },
            indent=1,
        )
    )
    (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}, indent=1))


def write_tiny_checkpoint(
    folder: str | Path,
    config: dict | None = None,
    seed: int = 0,
    max_shard_bytes: int = 1 << 30,
    tokenizer: bool = True,
) -> Path:
    """Write a random checkpoint in the hub's BF16 layout (sharded, with an index).

    Args:
        folder: where to write (created).
        config: hub-style config dict (default :func:`tiny_config`).
        seed: random seed.
        max_shard_bytes: start a new shard past this size.
        tokenizer: also write a byte-level tokenizer and chat template (needs vocab_size >= 265).

    Returns:
        the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = config or tiny_config()
    rng = np.random.default_rng(seed)
    shapes = hub_tensors(config)
    shards, cur, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nbytes
    shards.append(cur)
    weight_map = {}
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        w = SafetensorsWriter(folder / fname, metadata={"format": "pt"})
        for name in names:
            w.declare(name, "BF16", shapes[name])
            weight_map[name] = fname
        w.begin()
        for name in names:
            shape = shapes[name]
            if len(shape) == 3 and ".experts." in name:  # one expert at a time: bounded memory
                for e in range(shape[0]):
                    w.write(name, f32_to_bf16(_values(name, shape[1:], rng)))
            else:
                w.write(name, f32_to_bf16(_values(name, shape, rng)))
        w.finish()
    total = sum(2 * int(np.prod(s)) for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    if tokenizer and config.get("text_config", config)["vocab_size"] >= len(SPECIALS) + 256:
        write_byte_tokenizer(folder)
    log.info("wrote %s: %d tensors, %.1f MB", folder, len(shapes), total / 1e6)
    return folder
