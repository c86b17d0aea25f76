"""Tiny random checkpoints of the other MoE families, made with transformers, for the family tests.

Each family has one tiny config (hidden 64, 2-3 layers, 4-8 experts, vocab 384: enough for the
byte-level tokenizer's 265 ids) in transformers' own config class. :func:`save_family` builds the
seeded float32 model and writes it either with ``save_pretrained`` (``layout="transformers"``: what
transformers 5 writes, per-expert experts) or as its in-memory ``state_dict`` (``layout="fused"``:
transformers 5 holds experts fused, ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj``).

Weights are drawn wider than transformers' default init (std 0.1 instead of 0.02) and every norm weight gets
noise (qwen3_next 0.05 and deepseek_v3 0.07, see there), so the logits spread over a few nats and routing
depends on the input: a quantization or routing mistake then shows up in the KL instead of vanishing in a flat
softmax.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from moestream.convert.tiny import write_byte_tokenizer

VOCAB = 384
COMMON = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "initializer_range": 0.1,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
}

# family -> (transformers config class, model class, config fields beyond COMMON)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "num_hidden_layers": 2,
            "head_dim": 16,
            "intermediate_size": 128,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
        },
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_hidden_layers": 2, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        {
            # transformers keeps full_attention_interval only as layer_types: [linear, full] x 2
            "num_hidden_layers": 4,
            "full_attention_interval": 2,
            "head_dim": 16,
            "intermediate_size": 128,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 64,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
            "linear_num_value_heads": 4,
            "linear_num_key_heads": 2,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_conv_kernel_dim": 4,
            "partial_rotary_factor": 0.25,
            # At std 0.1 this random hybrid model is chaotic: 8-bit quantizing its embedding alone (with
            # MLX's own quantizer) gives mean KL 0.03, so a KL bound would measure the random model, not
            # the converter. At 0.05 the logits still spread (std ~0.4).
            "initializer_range": 0.05,
        },
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {
            # layer 0 dense, 1-2 MoE; 8 experts in 4 groups, 2 kept per token (V3: 8 groups, 4 kept), top-2, 1 shared
            "num_hidden_layers": 3,
            "first_k_dense_replace": 1,
            "intermediate_size": 128,
            "moe_intermediate_size": 64,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "n_group": 4,
            "topk_group": 2,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            "num_key_value_heads": 4,
            "kv_lora_rank": 32,
            "q_lora_rank": 48,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 16,
            "v_head_dim": 16,
            # Hard grouped routing flips experts under small input noise in a random model: at std 0.1,
            # 8-bit mean KL 0.0087 (16-bit still exact); at 0.07, 0.003.
            "initializer_range": 0.07,
        },
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        {
            # sliding (window 8, shorter than the test sequences) and full attention layers, the hub's
            # yarn rope; H=64 != I=96 so a transposed expert layout cannot pass by accident
            "num_hidden_layers": 3,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "sliding_window": 8,
            "head_dim": 16,
            "intermediate_size": 96,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            # Hard top-k routing flips experts under small input noise in a random model: at std 0.1,
            # 8-bit mean KL 0.008 (residents 0.0066, experts 0.0014; 16-bit exact); at 0.07, 0.0019.
            "initializer_range": 0.07,
        },
    ),
}


def family_config(family: str, **overrides):
    """transformers' config object of the tiny ``family`` model."""
    import transformers

    cfg_cls, _, fields = FAMILIES[family]
    return getattr(transformers, cfg_cls)(**{**COMMON, **fields, **overrides})


def build_family_model(family: str, seed: int = 0, **overrides):
    """The seeded float32 model of ``family`` in eval mode, norms perturbed."""
    import transformers

    _, model_cls, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(family_config(family, **overrides))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("e_score_correction_bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif family == "gpt_oss" and name.endswith(("bias", "sinks")):
                # transformers starts biases at zero: noise so that a dropped bias shows in the logits
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.float().eval()


def save_family(
    tmp, family: str, layout: str = "transformers", seed: int = 0, dtype: str = "float32", **overrides
) -> Path:
    """Write the tiny ``family`` checkpoint with a byte-level tokenizer; returns its folder.

    Args:
        layout: ``transformers`` (``save_pretrained``) or ``fused`` (the in-memory state dict, with
            transformers' config.json).
        dtype: storage dtype, "float32" or "bfloat16".
    """
    model = build_family_model(family, seed, **overrides).to(getattr(torch, dtype))
    folder = Path(tmp) / f"{family}-{layout}-{dtype}-s{seed}"
    folder.mkdir(parents=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(folder)
    if layout == "fused":
        (folder / "model.safetensors").unlink()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    elif layout != "transformers":
        raise ValueError(f"layout {layout!r}")
    write_byte_tokenizer(folder)
    return folder


def stored_names(folder) -> list[str]:
    """Tensor names of a single-file checkpoint, from its safetensors header."""
    raw = (Path(folder) / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return sorted(k for k in json.loads(raw[8 : 8 + n]) if k != "__metadata__")


def transformers_logits(folder, tokens) -> "torch.Tensor":
    """transformers' float32 logits of a checkpoint folder for ``tokens`` [B, T] (numpy ints)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


def save_fp8(folder, out) -> Path:
    """A copy of checkpoint ``folder`` in the DeepSeek-V3 FP8 release layout: every 2-D linear weight
    except embeddings, lm_head and the router stored F8_E4M3 with float32 ``weight_scale_inv`` per
    128x128 block, ``quantization_config`` in config.json."""
    import shutil

    from checkpoints import FP8_BLOCK, fp8_quantize, load_tensors

    out = Path(out)
    out.mkdir(parents=True)
    tensors = {}
    for key, value in load_tensors(folder).items():
        module = key[: -len(".weight")]
        if (
            value.ndim == 2
            and key.endswith(".weight")
            and not key.endswith(("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight"))
        ):
            tensors[key], tensors[module + ".weight_scale_inv"] = fp8_quantize(value, FP8_BLOCK, torch.float32)
        else:
            tensors[key] = value.to(torch.bfloat16)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((Path(folder) / "config.json").read_text())
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(FP8_BLOCK),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(folder) / name, out / name)
    return out


def save_dequantized(folder, out) -> Path:
    """The float32 model an FP8 checkpoint stands for (weights dequantized), for transformers."""
    from checkpoints import fp8_dequantized_state_dict

    out = Path(out)
    out.mkdir(parents=True)
    config = json.loads((Path(folder) / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    sd = {k: v.contiguous() for k, v in fp8_dequantized_state_dict(folder).items()}
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return out


def mxfp4_encode(w: "np.ndarray") -> tuple["np.ndarray", "np.ndarray"]:  # noqa: F821 (a string annotation; imported where used)
    """A plain numpy MXFP4 encoder (OCP MX): per 32 values of a row, the shared exponent
    floor(log2(amax)) - 2 as an E8M0 byte, values rounded to the nearest FP4 E2M1 (saturating at 6),
    two codes per byte, low nibble first. ``w`` [..., K] -> (blocks [..., K/32, 16], scales [..., K/32])."""
    import numpy as np

    grid = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
    g = w.reshape(*w.shape[:-1], -1, 32).astype(np.float32)
    amax = np.abs(g).max(-1, keepdims=True)
    e = np.where(amax > 0, np.floor(np.log2(np.maximum(amax, 1e-30))) - 2, -127).clip(-127, 127)
    v = g / np.exp2(e)
    mag = np.abs(np.minimum(np.abs(v), 6.0)[..., None] - grid).argmin(-1)
    codes = (mag | ((v < 0) & (mag > 0)) * 8).astype(np.uint8)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (e[..., 0] + 127).astype(np.uint8)


def save_mxfp4(folder, out) -> Path:
    """A copy of gpt-oss checkpoint ``folder`` (save_pretrained) in the hub release layout: experts as
    MXFP4 ``*_proj_blocks``/``*_proj_scales`` [E, rows, cols/32(, 16)] with rows = output features
    (gate and up interleaved), everything else bf16, ``quantization_config`` mxfp4 in config.json."""
    import shutil

    from checkpoints import load_tensors

    out = Path(out)
    out.mkdir(parents=True)
    tensors = {}
    for key, value in load_tensors(folder).items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4_encode(value.float().transpose(1, 2).contiguous().numpy())
            tensors[key + "_blocks"], tensors[key + "_scales"] = torch.from_numpy(blocks), torch.from_numpy(scales)
        else:
            tensors[key] = value.to(torch.bfloat16)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((Path(folder) / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(folder) / name, out / name)
    return out


def save_mxfp4_dequantized(folder, out) -> Path:
    """The float32 model an MXFP4 checkpoint stands for, experts dequantized by transformers' own
    ``convert_moe_packed_tensors`` (the reference for the pass-through)."""
    from checkpoints import load_tensors
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    out = Path(out)
    out.mkdir(parents=True)
    config = json.loads((Path(folder) / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    src, sd = load_tensors(folder), {}
    for key, value in src.items():
        if key.endswith("_blocks"):
            base = key[: -len("_blocks")]
            sd[base] = convert_moe_packed_tensors(value, src[base + "_scales"], dtype=torch.float32)
        elif not key.endswith("_scales"):
            sd[key] = value.float()
    save_file({k: v.contiguous() for k, v in sd.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out
