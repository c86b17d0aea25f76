"""Tiny random Qwen3.5-MoE checkpoints on disk, laid out like the real ones, for the converter's tests.

Every builder writes a folder (config.json, safetensors shards, optionally a tokenizer) in one of the
three layouts a converter meets, and returns its path. The weights always come from one seeded
``transformers.Qwen3_5MoeForConditionalGeneration`` (text tower + a one-block vision tower), so the
three layouts of one seed and config hold the *same* model:

- ``save_transformers``: what ``save_pretrained`` of transformers 5.23 writes. In memory the model
  keeps fused 3-D experts (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj``
  [E, H, I]), but ``save_pretrained`` reverts its load-time conversion (``qwen2_moe`` mapping:
  MergeModulelist + Concatenate) and writes **per-expert 2-D tensors**
  ``model.language_model.layers.N.mlp.experts.{e}.{gate,up,down}_proj.weight``.
- ``save_hub_fused``: the official BF16 hub releases (and ``TRAINED_TINY``): fused
  ``...mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows first, then up rows) and
  ``...mlp.experts.down_proj`` [E, H, I], no ``.weight`` suffix, plus ``model.visual.*`` and an
  ``mtp.*`` block. This is exactly the in-memory parameter layout of the transformers model.
- ``save_hub_fp8``: the official FP8 release: per-expert 2-D experts, big linears stored
  F8_E4M3 with ``weight_scale_inv`` per 128x128 block (weight ~= fp8 * scale_inv), the modules of
  ``quantization_config.modules_to_not_convert`` kept bf16.

``reference_state_dict`` reads any of these folders back, independently of moestream's converter,
as float32 tensors in one canonical naming (per-expert experts, FP8 dequantized): the tests'
reference.

Things a converter must know (all reproduced here):

- Key prefixes: ``model.language_model.{embed_tokens,layers.N,norm}.*``, ``lm_head.weight``
  (untied), ``model.visual.*`` (drop), ``mtp.*`` (drop by default).
- RMSNorms of the text model are zero-centred: the stored weight ``w`` scales by ``1 + w``
  (``input_layernorm``, ``post_attention_layernorm``, ``model.language_model.norm``,
  ``self_attn.q_norm``/``k_norm``, ``mtp.*norm*``). The gated norm ``linear_attn.norm`` is *not*:
  it scales by ``w`` (initialised to ones). mlx-lm adds 1 to the former when it sees an
  unsanitized (HF) checkpoint, detected by the conv1d shape.
- ``linear_attn.conv1d.weight`` is [conv_dim, 1, K] (depthwise Conv1d, conv_dim = 2*key_dim +
  value_dim); mlx wants [conv_dim, K, 1].
- ``self_attn.q_proj`` has 2 * heads * head_dim rows: per head, head_dim query rows then
  head_dim output-gate rows (there is no ``attn_output_gate`` switch in transformers).
- ``A_log`` and ``dt_bias`` are 1-D [linear_num_value_heads]; ``mlp.gate.weight`` [E, H];
  ``mlp.shared_expert_gate.weight`` [1, H].

Randomness: ``torch.manual_seed(seed)`` before building the model (transformers' own init: normal
std 0.02), then every norm weight and ``dt_bias`` gets N(0, 0.1) noise so that norms are not all
0 / 1 and a converter that mixes them up is caught. The ``mtp.*`` tensors are drawn from a
separate generator seeded with ``seed``.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moestream.convert.tiny import write_byte_tokenizer

SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
TRAINED_TINY = SHARED_FIXTURES / "trained-tiny-qwen3_5-moe"

TOKENIZER_VOCAB_SIZE = 4096
"""vocab_size a builder uses when asked for a tokenizer: the trained fixture's tokenizer has 4096 ids."""

FP8_DEFAULTS = {"hidden_size": 192}
"""save_hub_fp8's default overrides: H=192 gives FP8 scale grids of 2 blocks with a partial last
block (expert gate/up [64, 192] -> scale [1, 2], down [192, 64] -> [2, 1])."""

FP8_BLOCK = (128, 128)
FP8_MAX = 448.0  # largest finite float8_e4m3fn

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_TEXT_DEFAULTS = {
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_output_gate": True,
    "dtype": "bfloat16",
    "eos_token_id": 2,  # <|im_end|> in the tokenizer add_tokenizer writes
    "full_attention_interval": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "hidden_size": 128,
    "initializer_range": 0.02,
    "layer_types": None,  # filled from num_hidden_layers and full_attention_interval
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 32,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_value_head_dim": 32,
    "max_position_embeddings": 4096,
    "mlp_only_layers": [],
    "model_type": "qwen3_5_moe_text",
    "moe_intermediate_size": 64,
    "mtp_num_hidden_layers": 1,
    "mtp_use_dedicated_embeddings": False,
    "num_attention_heads": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 64,
    "use_cache": True,
    "vocab_size": 512,
    "mamba_ssm_dtype": "float32",
    "rope_parameters": {
        "mrope_interleaved": True,
        "mrope_section": None,  # filled: sums to head_dim * partial_rotary_factor / 2
        "rope_type": "default",
        "rope_theta": 10000000,
        "partial_rotary_factor": 0.25,
    },
}

_VISION_DEFAULTS = {
    "deepstack_visual_indexes": [],
    "depth": 1,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_size": 32,
    "in_channels": 3,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "model_type": "qwen3_5_moe",  # as on the hub; transformers renames it qwen3_5_moe_vision
    "num_heads": 2,
    "num_position_embeddings": 64,
    "out_hidden_size": None,  # filled: the text hidden_size
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}

_TOP_LEVEL = {
    "architectures",
    "image_token_id",
    "model_type",
    "tie_word_embeddings",
    "transformers_version",
    "video_token_id",
    "vision_end_token_id",
    "vision_start_token_id",
}


# ----------------------------------------------------------------------------------------------
# config


def tiny_config(**overrides) -> dict:
    """The hub-style config.json dict of a tiny Qwen3.5-MoE (``model_type`` "qwen3_5_moe").

    Args:
        **overrides: text_config fields (``hidden_size=64``, ``moe_intermediate_size=96``,
            ``num_hidden_layers=2``, ``full_attention_interval=4``, ...); top-level fields
            (``tie_word_embeddings``, ``image_token_id``, ...); ``vision_config={...}`` merges into
            the vision config. ``layer_types``, ``mrope_section`` and the vision
            ``out_hidden_size`` are derived unless given.

    Returns:
        A fresh dict shaped like the real 397B config.json (without ``quantization_config``):
        default 4 layers [linear, full, linear, full], H=128, 8 experts top-2, I=64, shared 64,
        vocab 512, 4 heads x 32 (2 KV), linear attention 2 key / 4 value heads of 32.

    Example:
        >>> tiny_config(moe_intermediate_size=96)["text_config"]["moe_intermediate_size"]
        96
    """
    overrides = dict(overrides)
    vision_overrides = overrides.pop("vision_config", None) or {}
    top = {k: overrides.pop(k) for k in list(overrides) if k in _TOP_LEVEL}

    text = json.loads(json.dumps(_TEXT_DEFAULTS))
    text.update(overrides)
    if text.get("layer_types") is None:
        interval = text["full_attention_interval"]
        text["layer_types"] = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(text["num_hidden_layers"])
        ]
    if len(text["layer_types"]) != text["num_hidden_layers"]:
        raise ValueError("layer_types must have num_hidden_layers entries")
    rope = text["rope_parameters"]
    if rope.get("mrope_section") is None:
        half = int(text["head_dim"] * rope["partial_rotary_factor"]) // 2
        rope["mrope_section"] = [half - 2 * (half // 4), half // 4, half // 4]

    vision = dict(_VISION_DEFAULTS)
    vision.update(vision_overrides)
    if vision.get("out_hidden_size") is None:
        vision["out_hidden_size"] = text["hidden_size"]

    config = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "image_token_id": 248056,
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "tie_word_embeddings": False,
        "transformers_version": "4.57.0.dev0",
        "video_token_id": 248057,
        "vision_config": vision,
        "vision_end_token_id": 248054,
        "vision_start_token_id": 248053,
    }
    config.update(top)
    return config


# ----------------------------------------------------------------------------------------------
# the model all layouts come from


def build_model(config: dict, seed: int = 0):
    """The float32 ``Qwen3_5MoeForConditionalGeneration`` of a (hub-style) config dict, seeded.

    Args:
        config: a dict from ``tiny_config``.
        seed: torch seed for transformers' init and for the norm noise.

    Returns:
        The model, in eval mode, float32 (the text_config ``dtype`` field is ignored: transformers
        would otherwise build the text tower in bf16 and the lm_head in fp32).
    """
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    config = json.loads(json.dumps(config))
    config["text_config"].pop("dtype", None)
    config.pop("quantization_config", None)
    torch.manual_seed(seed)
    model = Qwen3_5MoeForConditionalGeneration(Qwen3_5MoeConfig.from_dict(config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "dt_bias")):
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model.eval()


def _mtp_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """A random float32 ``mtp.*`` block (one full-attention MoE layer, fused experts) as on the hub."""
    t = config["text_config"]
    h, hd, e = t["hidden_size"], t["head_dim"], t["num_experts"]
    nh, nkv = t["num_attention_heads"], t["num_key_value_heads"]
    i, s = t["moe_intermediate_size"], t["shared_expert_intermediate_size"]
    shapes = {
        "mtp.fc.weight": (h, 2 * h),
        "mtp.pre_fc_norm_embedding.weight": (h,),
        "mtp.pre_fc_norm_hidden.weight": (h,),
        "mtp.norm.weight": (h,),
    }
    for j in range(t.get("mtp_num_hidden_layers", 1) or 1):
        p = f"mtp.layers.{j}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (2 * nh * hd, h),
                p + "self_attn.k_proj.weight": (nkv * hd, h),
                p + "self_attn.v_proj.weight": (nkv * hd, h),
                p + "self_attn.o_proj.weight": (h, nh * hd),
                p + "self_attn.q_norm.weight": (hd,),
                p + "self_attn.k_norm.weight": (hd,),
                p + "mlp.gate.weight": (e, h),
                p + "mlp.experts.gate_up_proj": (e, 2 * i, h),
                p + "mlp.experts.down_proj": (e, h, i),
                p + "mlp.shared_expert.gate_proj.weight": (s, h),
                p + "mlp.shared_expert.up_proj.weight": (s, h),
                p + "mlp.shared_expert.down_proj.weight": (h, s),
                p + "mlp.shared_expert_gate.weight": (1, h),
            }
        )
    gen = torch.Generator().manual_seed(10_000 + seed)
    std = t.get("initializer_range", 0.02)
    return {
        k: torch.randn(shape, generator=gen) * (0.1 if len(shape) == 1 else std) for k, shape in sorted(shapes.items())
    }


# ----------------------------------------------------------------------------------------------
# writing


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _write_shards(folder: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """Hub-style shards: keys sorted, cut into ``shards`` contiguous runs of about equal bytes;
    ``model.safetensors`` alone when shards == 1, else ``model-0000i-of-0000N.safetensors`` and
    ``model.safetensors.index.json`` ({"metadata": {"total_size"}, "weight_map"})."""
    keys = sorted(tensors)
    if not 1 <= shards <= len(keys):
        raise ValueError(f"shards must be in 1..{len(keys)}")
    if shards == 1:
        save_file({k: tensors[k].contiguous() for k in keys}, folder / "model.safetensors", metadata={"format": "pt"})
        return
    sizes = [tensors[k].numel() * tensors[k].element_size() for k in keys]
    total = sum(sizes)
    before = [0, *itertools.accumulate(sizes)][:-1]  # bytes before key n
    cuts = [0]
    for g in range(1, shards):  # first key of shard g: where the bytes pass g/shards of the total
        cut = next((n for n, b in enumerate(before) if b >= g * total / shards), len(keys))
        cuts.append(min(max(cut, cuts[-1] + 1), len(keys) - (shards - g)))
    cuts.append(len(keys))
    groups = [keys[a:b] for a, b in zip(cuts, cuts[1:])]
    weight_map = {}
    for g, names in enumerate(groups):
        name = f"model-{g + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in names}, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, name))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _new_folder(tmp, name: str) -> Path:
    """A new folder ``tmp/name`` (``name-2``, ``name-3``, ... when taken)."""
    folder, n = Path(tmp) / name, 1
    while folder.exists():
        n += 1
        folder = Path(tmp) / f"{name}-{n}"
    folder.mkdir(parents=True)
    return folder


def _with_tokenizer_vocab(tokenizer: bool, overrides: dict) -> dict:
    if tokenizer and "vocab_size" not in overrides:
        overrides = {**overrides, "vocab_size": TOKENIZER_VOCAB_SIZE}
    return overrides


def save_transformers(
    tmp, dtype: str = "float32", shards: int = 1, seed: int = 0, tokenizer: bool = False, **config_overrides
) -> Path:
    """Build the tiny model with transformers and ``save_pretrained`` it.

    What transformers 5.23 writes: per-expert 2-D experts
    ``model.language_model.layers.N.mlp.experts.{e}.{gate,up,down}_proj.weight`` (gate/up [I, H],
    down [H, I]; it splits the in-memory fused ``gate_up_proj`` [E, 2I, H] as gate = rows [:I],
    up = rows [I:]), ``model.language_model.*`` for the rest of the text tower, untied
    ``lm_head.weight``, ``model.visual.*``, no ``mtp.*``. Its config.json is transformers' own
    (``"dtype"`` at top level, vision ``model_type`` "qwen3_5_moe_vision", ``transformers_version``
    5.23.0); it also writes generation_config.json. Index metadata has ``total_parameters`` and
    ``total_size``.

    Args:
        tmp: directory to create the checkpoint folder in.
        dtype: "float32" or "bfloat16" (or "float16").
        shards: number of safetensors files; 1 gives ``model.safetensors`` without index, more
            gives ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` (found
            by searching the ``max_shard_size`` that yields exactly that many).
        seed: model seed.
        tokenizer: also call ``add_tokenizer`` (vocab_size then defaults to 4096).
        **config_overrides: passed to ``tiny_config``.

    Returns:
        The folder, ``tmp/transformers-<dtype>-s<seed>``.
    """
    config_overrides = _with_tokenizer_vocab(tokenizer, config_overrides)
    model = build_model(tiny_config(**config_overrides), seed).to(_DTYPES[dtype])
    folder = _new_folder(tmp, f"transformers-{dtype}-s{seed}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    max_shard_size = "50GB" if shards == 1 else _max_shard_size_for(model, shards)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    got = len(list(folder.glob("*.safetensors")))
    if got != shards:
        raise RuntimeError(f"save_pretrained wrote {got} shards, wanted {shards}")
    if tokenizer:
        add_tokenizer(folder)
    return folder


def _max_shard_size_for(model, shards: int) -> int:
    """The smallest max_shard_size for which save_pretrained cuts ``shards`` files, found by
    replaying its split (revert the expert fusion, then huggingface_hub's greedy splitter)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = revert_weight_conversion(model, remove_tied_weights_from_state_dict(model.state_dict(), model))

    def count(limit: int) -> int:
        return len(split_torch_state_dict_into_shards(state, max_shard_size=limit).filename_to_tensors)

    lo, hi = 1, sum(t.numel() * t.element_size() for t in state.values())
    while lo < hi:  # smallest limit with count(limit) <= shards (count falls as limit grows)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if count(mid) <= shards else (mid + 1, hi)
    if count(lo) != shards:
        raise ValueError(f"save_pretrained cannot cut this model into exactly {shards} shards")
    return lo


def save_hub_fused(
    tmp,
    dtype: str = "bfloat16",
    shards: int = 2,
    seed: int = 0,
    mtp: bool = True,
    tokenizer: bool = False,
    **config_overrides,
) -> Path:
    """The layout of the official BF16 hub releases (and of ``TRAINED_TINY``).

    The tensors are the transformers model's in-memory ``state_dict()`` unchanged: its experts
    already are the hub's fused ``model.language_model.layers.N.mlp.experts.gate_up_proj``
    [E, 2I, H] (expert e's gate_proj is ``[e, :I]``, its up_proj ``[e, I:]``) and
    ``...mlp.experts.down_proj`` [E, H, I], without ``.weight``. So no per-expert -> fused mapping
    is done here; the per-expert files of ``save_transformers`` (same seed) are transformers' own
    split of these tensors. Added: an ``mtp.*`` block (``mtp.fc.weight`` [H, 2H],
    ``mtp.pre_fc_norm_{embedding,hidden}.weight``, ``mtp.norm.weight``, ``mtp.layers.0.*`` full
    attention + fused MoE) that converters drop by default. ``model.visual.*`` comes from the model.

    Args:
        tmp: directory to create the checkpoint folder in.
        dtype: storage dtype of every tensor ("bfloat16" as on the hub, or "float32").
        shards: number of shard files (sorted keys cut by bytes, index written when > 1).
        seed: model seed (same seed + config = same weights as ``save_transformers``).
        mtp: include the ``mtp.*`` block (config ``mtp_num_hidden_layers`` is set to 0 when not).
        tokenizer: also call ``add_tokenizer`` (vocab_size then defaults to 4096).
        **config_overrides: passed to ``tiny_config``.

    Returns:
        The folder, ``tmp/hub-fused-<dtype>-s<seed>``, with a hub-style config.json.
    """
    config_overrides = _with_tokenizer_vocab(tokenizer, config_overrides)
    if not mtp:
        config_overrides.setdefault("mtp_num_hidden_layers", 0)
    config = tiny_config(dtype=dtype, **config_overrides)
    tensors = dict(build_model(config, seed).state_dict())
    if mtp:
        tensors.update(_mtp_state_dict(config, seed))
    tensors = {k: v.detach().to(_DTYPES[dtype]) for k, v in tensors.items()}
    folder = _new_folder(tmp, f"hub-fused-{dtype}-s{seed}")
    _write_shards(folder, tensors, shards)
    _write_json(folder / "config.json", config)
    if tokenizer:
        add_tokenizer(folder)
    return folder


def _split_fused(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused ``P.experts.gate_up_proj``/``down_proj`` -> ``P.experts.{e}.{gate,up,down}_proj.weight``."""
    out = {}
    for key, value in tensors.items():
        if key.endswith(".experts.gate_up_proj"):
            base, mid = key[: -len("gate_up_proj")], value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = value[e, :mid]
                out[f"{base}{e}.up_proj.weight"] = value[e, mid:]
        elif key.endswith(".experts.down_proj"):
            base = key[: -len("down_proj")]
            for e in range(value.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = value[e]
        else:
            out[key] = value
    return out


def _not_converted(config: dict, keys) -> list[str]:
    """``modules_to_not_convert`` as the FP8 release writes it, for this model's module names."""
    mods = {"lm_head", "model.language_model.embed_tokens"}
    for key in keys:
        mod = key.rsplit(".", 1)[0]
        if (
            key.startswith("model.visual.")
            and key.endswith(".weight")
            and (
                ".attn." in key
                or ".mlp." in key
                or ".merger.linear" in key
                or "patch_embed" in key
                or "pos_embed" in key
            )
        ):
            mods.add(mod)
        elif key.endswith(
            (
                ".linear_attn.conv1d.weight",
                ".linear_attn.in_proj_a.weight",
                ".linear_attn.in_proj_b.weight",
                ".mlp.gate.weight",
                ".mlp.shared_expert_gate.weight",
            )
        ):
            mods.add(mod)
        elif key == "mtp.fc.weight":
            mods.add(mod)
    return sorted(mods)


def fp8_quantize(weight: torch.Tensor, block=FP8_BLOCK, scale_dtype=torch.float32):
    """Block-wise FP8 (e4m3) quantization as in the FP8 releases.

    Args:
        weight: 2-D float tensor [R, C].
        block: (rows, cols) of a block.
        scale_dtype: dtype of the stored scale.

    Returns:
        ``(fp8 [R, C] float8_e4m3fn, scale_inv [ceil(R/br), ceil(C/bc)])`` with
        weight ~= fp8 * scale_inv over each block; scale_inv = block amax / 448 (1 for an all-zero
        block), rounded to ``scale_dtype`` before the division so the pair is self-consistent.
    """
    rows, cols = weight.shape
    br, bc = block
    nr, nc = math.ceil(rows / br), math.ceil(cols / bc)
    padded = torch.zeros(nr * br, nc * bc, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(nr, br, nc, bc)
    amax = blocks.permute(0, 2, 1, 3).reshape(nr, nc, br * bc).abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(scale_dtype)
    q = (blocks / scale.float()[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.to(torch.float8_e4m3fn).view(nr * br, nc * bc)[:rows, :cols].contiguous()
    return q, scale


def fp8_dequantize(fp8: torch.Tensor, scale_inv: torch.Tensor, block=FP8_BLOCK) -> torch.Tensor:
    """float32 ``fp8 * scale_inv`` with every scale spread over its (possibly partial) block."""
    rows, cols = fp8.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return fp8.float() * scale[:rows, :cols]


def save_hub_fp8(
    tmp,
    seed: int = 0,
    shards: int = 2,
    mtp: bool = True,
    scale_dtype: str = "float32",
    tokenizer: bool = False,
    **config_overrides,
) -> Path:
    """The layout of the official FP8 release (Qwen3.5-397B-A17B-FP8 style).

    From the float32 model (and mtp block) of ``seed``, with fused experts split per expert
    (gate = ``gate_up_proj[e, :I]``, up = ``[e, I:]``, down = ``down_proj[e]``):

    - every 2-D ``*.weight`` of the text tower and ``mtp.*`` whose module is not in
      ``modules_to_not_convert`` is stored F8_E4M3 with ``<module>.weight_scale_inv``
      [ceil(rows/128), ceil(cols/128)] (``scale_dtype``; weight ~= fp8 * scale_inv per block): experts
      ``mlp.experts.{e}.{gate,up,down}_proj``, ``self_attn.{q,k,v,o}_proj``,
      ``linear_attn.{in_proj_qkv,in_proj_z,out_proj}``, ``mlp.shared_expert.*``;
    - everything else is bf16: embed_tokens, lm_head, ``linear_attn.{conv1d,in_proj_a,in_proj_b}``,
      ``mlp.gate``, ``mlp.shared_expert_gate``, norms, A_log, dt_bias, ``model.visual.*``,
      ``mtp.fc``.

    config.json is ``tiny_config`` + ``quantization_config`` (quant_method fp8, dynamic
    activations, weight_block_size [128, 128], modules_to_not_convert of this model's names,
    sorted as in the release).

    Args:
        tmp: directory to create the checkpoint folder in.
        seed: model seed.
        shards: number of shard files.
        mtp: include the ``mtp.*`` block.
        scale_dtype: "float32" (default) or "bfloat16" (some Qwen FP8 releases store bf16 scales).
        tokenizer: also call ``add_tokenizer`` (vocab_size then defaults to 4096).
        **config_overrides: passed to ``tiny_config`` on top of ``FP8_DEFAULTS`` (hidden 192).

    Returns:
        The folder, ``tmp/hub-fp8-s<seed>``.
    """
    config_overrides = _with_tokenizer_vocab(tokenizer, {**FP8_DEFAULTS, **config_overrides})
    if not mtp:
        config_overrides.setdefault("mtp_num_hidden_layers", 0)
    config = tiny_config(**config_overrides)
    source = dict(build_model(config, seed).state_dict())
    if mtp:
        source.update(_mtp_state_dict(config, seed))
    source = _split_fused({k: v.detach().float() for k, v in source.items()})
    skip = _not_converted(config, source)
    tensors = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny reductions: threads only add barrier waits (10x slower)
    try:
        for key, value in source.items():
            module = key[: -len(".weight")] if key.endswith(".weight") else None
            quantize = (
                module is not None
                and value.ndim == 2
                and module not in skip
                and key.startswith(("model.language_model.", "mtp."))
            )
            if quantize:
                tensors[key], tensors[module + ".weight_scale_inv"] = fp8_quantize(
                    value, FP8_BLOCK, _DTYPES[scale_dtype]
                )
            else:
                tensors[key] = value.to(torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_per_tensor": False,
        "act_per_tensor": False,
        "weight_block_size": list(FP8_BLOCK),
        "modules_to_not_convert": skip,
    }
    folder = _new_folder(tmp, f"hub-fp8-s{seed}")
    _write_shards(folder, tensors, shards)
    _write_json(folder / "config.json", config)
    if tokenizer:
        add_tokenizer(folder)
    return folder


# ----------------------------------------------------------------------------------------------
# tokenizer

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def add_tokenizer(folder) -> None:
    """Give a checkpoint folder a tokenizer: tokenizer.json, tokenizer_config.json,
    chat_template.jinja, generation_config.json.

    Copies the four files of ``TRAINED_TINY`` when it exists (byte-level BPE, 4096 ids, specials
    0-8 with ``<|im_end|>`` = 2, the real Qwen3.5 chat template). Without it, writes an equivalent
    minimal one with the ``tokenizers`` library: the same 9 specials at ids 0-8, then the 256
    byte-level symbols (265 ids, no merges) and a plain ChatML template.

    The model's vocab_size must cover the tokenizer: the builders' ``tokenizer=True`` sets
    vocab_size=4096 (``TOKENIZER_VOCAB_SIZE``) unless you pass one.

    Raises:
        ValueError: config.json's vocab_size is smaller than the tokenizer.
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    vocab_size = config.get("text_config", config)["vocab_size"]
    if TRAINED_TINY.is_dir():
        for name in _TOKENIZER_FILES:
            shutil.copyfile(TRAINED_TINY / name, folder / name)
    else:
        write_byte_tokenizer(folder)
    n = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    if n > vocab_size:
        raise ValueError(
            f"tokenizer has {n} ids but the model's vocab_size is {vocab_size}: "
            f"build with vocab_size={TOKENIZER_VOCAB_SIZE}"
        )


# ----------------------------------------------------------------------------------------------
# reading back (the tests' reference, independent of moestream)


def shard_files(folder) -> list[Path]:
    """The safetensors files of a checkpoint: those named by its index, else model.safetensors."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    return [folder / "model.safetensors"]


def load_tensors(folder) -> dict[str, torch.Tensor]:
    """Every stored tensor of a checkpoint, as stored (names, dtypes)."""
    out = {}
    for path in shard_files(folder):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def fp8_dequantized_state_dict(folder) -> dict[str, torch.Tensor]:
    """float32 tensors of a checkpoint under their stored names, FP8 weights dequantized.

    Each ``K.weight`` with a ``K.weight_scale_inv`` becomes ``fp8.float() * scale_inv`` (scale
    repeated over its 128x128 block, or the config's ``weight_block_size``, cut at the edges); the
    ``weight_scale_inv`` tensors are dropped. Works on non-FP8 folders too (plain float32 cast).
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    block = tuple(config.get("quantization_config", {}).get("weight_block_size", FP8_BLOCK))
    raw = load_tensors(folder)
    out = {}
    for key, value in raw.items():
        if key.endswith(".weight_scale_inv"):
            continue
        scale = raw.get(key[: -len(".weight")] + ".weight_scale_inv") if key.endswith(".weight") else None
        out[key] = fp8_dequantize(value, scale, block) if scale is not None else value.float()
    return out


def reference_state_dict(folder) -> dict[str, torch.Tensor]:
    """float32 tensors of any checkpoint built here (or of ``TRAINED_TINY``) in canonical naming.

    Canonical: experts per expert, ``<prefix>.mlp.experts.{e}.{gate,up,down}_proj.weight`` (fused
    ``gate_up_proj`` [E, 2I, H] split as gate = ``[e, :I]``, up = ``[e, I:]``; ``down_proj[e]``),
    FP8 dequantized, scales dropped, everything else (visual, mtp, norms as stored, i.e. without
    the +1) under its stored name.
    """
    return dict(sorted(_split_fused(fp8_dequantized_state_dict(folder)).items()))
