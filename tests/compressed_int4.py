"""Tiny compressed-tensors ``pack-quantized`` INT4 checkpoints, written with the compressed-tensors package's own
compressor (an implementation independent of moestream's reader), for the INT4 tests.

:func:`save_int4` takes a float checkpoint from :mod:`families` and writes it the way the releases are laid out:

- ``kimi_k25`` (Kimi K2.5): the DeepSeek-V3 text model under ``language_model.`` (``language_model.model.layers.N``,
  ``language_model.lm_head``), config ``model_type`` ``kimi_k25`` with the text config in ``text_config`` and
  ``quantization_config`` both at the top and in ``text_config`` (as the release has it), plus a small random vision
  tower (``vision_tower.*``) and projector (``mm_projector.*``), which a converter must drop;
- ``kimi_k2`` (Kimi K2 Thinking): the same names as DeepSeek-V3, ``model_type`` ``kimi_k2``;
- ``plain``: the family's own names and ``model_type`` (an llm-compressor W4A16 export).

The routed experts (``targets="experts"``, the Kimi releases: attention, shared experts, the dense layer and
lm_head stay bf16) or every linear but lm_head and the router (``targets="linears"``) are quantized per group of
``group`` inputs: scales and zero points from compressed-tensors' ``calculate_qparams`` over each group's range (its
min-max observer's rule), scales rounded to bf16 as the releases store them, then packed by its
``PackedQuantizationCompressor``. Other tensors are stored in bf16 (``e_score_correction_bias`` in float32, as in
the release), and ``config.json``'s ``quantization_config`` is written by its ``ModelCompressor.update_config``.

:func:`save_decompressed` is the reference: the float32 model those bits stand for, decompressed by
compressed-tensors itself, with the text model under DeepSeek-V3's (or the family's) own names for transformers.
Its scales are widened to float32 first: compressed-tensors computes ``(q - z) * s`` in the scale's type, and in
bf16 that product rounds (``q * s`` needs up to 12 significant bits), while the checkpoint stands for the exact
product.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
# what llm-compressor's W4A16 recipes leave unquantized in a MoE model: the output head and the router
NOT_LINEAR = re.compile(r"(embed_tokens|lm_head|norm|mlp\.gate)\.weight$")


def int4_scheme(group: int = 32, symmetric: bool = True):
    """compressed-tensors' scheme of the releases: INT4 weights, group scales, float activations."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=group, symmetric=symmetric)
    return QuantizationScheme(targets=["Linear"], weights=args)


def compress_weight(w: torch.Tensor, scheme) -> dict[str, torch.Tensor]:
    """One float weight [rows, cols] packed by compressed-tensors: weight_packed, weight_scale (bf16),
    weight_shape, and weight_zero_point when asymmetric."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    args = scheme.weights
    rows, cols = w.shape
    groups = w.float().reshape(rows, cols // args.group_size, args.group_size)
    scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    state = {"weight": w.float(), "weight_scale": scale.to(torch.bfloat16)}
    if not args.symmetric:
        state["weight_zero_point"] = zp.round().to(torch.int8)
    return PackedQuantizationCompressor.compress(state, scheme)


def _quantized(name: str, targets: str) -> bool:
    if targets == "experts":
        return bool(EXPERT.search(name))
    return name.endswith(".weight") and not NOT_LINEAR.search(name) and "layernorm" not in name


def save_int4(
    folder, out, layout: str = "kimi_k25", group: int = 32, symmetric: bool = True, targets: str = "experts"
) -> Path:
    """The float checkpoint ``folder`` in compressed-tensors INT4 (see the module docstring); returns ``out``."""
    from checkpoints import load_tensors
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    out = Path(out)
    out.mkdir(parents=True)
    scheme = int4_scheme(group, symmetric)
    tensors = {}
    for key, value in load_tensors(folder).items():
        name = key
        if layout == "kimi_k25":
            name = "language_model." + key
        if value.ndim == 2 and _quantized(key, targets):
            for part, t in compress_weight(value, scheme).items():
                tensors[name[: -len("weight")] + part] = t  # X.weight_packed, X.weight_scale, ...
        elif key.endswith("e_score_correction_bias"):
            tensors[name] = value.float()
        else:
            tensors[name] = value.to(torch.bfloat16)
    config = json.loads((Path(folder) / "config.json").read_text())
    if layout == "kimi_k25":
        gen = torch.Generator().manual_seed(7)
        for name, shape in {
            "vision_tower.patch_embed.proj.weight": (32, 3, 14, 14),
            "vision_tower.encoder.blocks.0.wqkv.weight": (96, 32),
            "vision_tower.encoder.blocks.0.wo.weight": (32, 32),
            "mm_projector.proj.0.weight": (128, 128),
            "mm_projector.proj.2.weight": (config["hidden_size"], 128),
        }.items():
            tensors[name] = (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
        config = {
            "architectures": ["KimiK25ForConditionalGeneration"],
            "model_type": "kimi_k25",
            "text_config": {**config, "model_type": "kimi_k2"},
            "vision_config": {"vt_hidden_size": 32, "vt_num_hidden_layers": 1, "mm_hidden_size": 32},
            "media_placeholder_token_id": 300,
            "tie_word_embeddings": False,
        }
    elif layout == "kimi_k2":
        config["model_type"] = "kimi_k2"
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    ignore = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]
    qc = QuantizationConfig(
        config_groups={"group_0": scheme},
        format="pack-quantized",
        ignore=ignore if targets == "experts" else ["lm_head", "re:.*mlp.gate$"],
        quantization_status="compressed",
    )
    ModelCompressor(quantization_config=qc).update_config(str(out))
    if layout == "kimi_k25":  # the release keeps a copy in text_config
        config = json.loads((out / "config.json").read_text())
        config["text_config"]["quantization_config"] = config["quantization_config"]
        (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(folder) / name, out / name)
    return out


def decompressed_tensors(folder) -> dict[str, torch.Tensor]:
    """Every weight of an INT4 checkpoint as float32 under its stored name (``X.weight``), the packed ones
    decompressed by compressed-tensors with float32 scales."""
    from checkpoints import load_tensors
    from compressed_tensors.compressors import PackedQuantizationCompressor

    config = json.loads((Path(folder) / "config.json").read_text())
    w = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    scheme = int4_scheme(w["group_size"], w["symmetric"])
    src, out = load_tensors(folder), {}
    for key, value in src.items():
        if key.endswith(".weight_packed"):
            base = key[: -len("weight_packed")]
            state = {
                p: src[base + p] for p in ("weight_packed", "weight_shape", "weight_zero_point") if base + p in src
            }
            state["weight_scale"] = src[base + "weight_scale"].float()
            out[base + "weight"] = PackedQuantizationCompressor.decompress(state, scheme)["weight"].float()
        elif not key.endswith(("weight_scale", "weight_shape", "weight_zero_point")):
            out[key] = value.float()
    return out


def save_decompressed(folder, out) -> Path:
    """The float32 model an INT4 checkpoint stands for, as a checkpoint transformers loads: Kimi K2.5's text model
    under DeepSeek-V3's names and ``model_type``, the vision tower and projector left out, no quantization_config."""
    out = Path(out)
    out.mkdir(parents=True)
    config = json.loads((Path(folder) / "config.json").read_text())
    config = config.get("text_config", config)
    config.pop("quantization_config", None)
    if config["model_type"] in ("kimi_k2", "kimi_k25"):
        config["model_type"] = "deepseek_v3"
    sd = {}
    for key, value in decompressed_tensors(folder).items():
        if key.startswith(("vision_tower.", "mm_projector.")):
            continue
        sd[key.removeprefix("language_model.")] = value.contiguous()
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(folder) / name, out / name)
    return out


def release_tensors(config: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Kimi K2.5's release tensors (name -> (safetensors dtype, shape)) for its config: the text model under
    ``language_model.``, routed experts pack-quantized at the config's group size with int32 ``weight_shape``, the
    rest bf16 (router bias float32), and the MoonViT vision tower with its projector. Names, dtypes and shapes as
    listed by a public model-information report of moonshotai/Kimi-K2.5 (208,550 tensors; see
    convert/known_configs/SOURCES.md)."""
    tc, vc = config["text_config"], config["vision_config"]
    h, v, heads = tc["hidden_size"], tc["vocab_size"], tc["num_attention_heads"]
    qk, rope, vd = tc["qk_nope_head_dim"], tc["qk_rope_head_dim"], tc["v_head_dim"]
    kv, ql, i, inter = tc["kv_lora_rank"], tc["q_lora_rank"], tc["moe_intermediate_size"], tc["intermediate_size"]
    g = tc["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"]
    bf = "BF16"
    out = {
        "language_model.lm_head.weight": (bf, (v, h)),
        "language_model.model.embed_tokens.weight": (bf, (v, h)),
        "language_model.model.norm.weight": (bf, (h,)),
    }
    for layer in range(tc["num_hidden_layers"]):
        p = f"language_model.model.layers.{layer}."
        out.update({
            p + "input_layernorm.weight": (bf, (h,)),
            p + "post_attention_layernorm.weight": (bf, (h,)),
            p + "self_attn.kv_a_layernorm.weight": (bf, (kv,)),
            p + "self_attn.kv_a_proj_with_mqa.weight": (bf, (kv + rope, h)),
            p + "self_attn.kv_b_proj.weight": (bf, (heads * (qk + vd), kv)),
            p + "self_attn.o_proj.weight": (bf, (h, heads * vd)),
            p + "self_attn.q_a_layernorm.weight": (bf, (ql,)),
            p + "self_attn.q_a_proj.weight": (bf, (ql, h)),
            p + "self_attn.q_b_proj.weight": (bf, (heads * (qk + rope), ql)),
        })  # fmt: skip
        if layer < tc["first_k_dense_replace"]:
            for proj, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
                out[p + f"mlp.{proj}.weight"] = (bf, shape)
            continue
        e_n, s_i = tc["n_routed_experts"], i * tc["n_shared_experts"]
        out[p + "mlp.gate.weight"] = (bf, (e_n, h))
        out[p + "mlp.gate.e_score_correction_bias"] = ("F32", (e_n,))
        for proj, shape in (("gate_proj", (s_i, h)), ("up_proj", (s_i, h)), ("down_proj", (h, s_i))):
            out[p + f"mlp.shared_experts.{proj}.weight"] = (bf, shape)
        for e in range(e_n):
            for proj, (rows, cols) in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
                q = p + f"mlp.experts.{e}.{proj}."
                out[q + "weight_packed"] = ("I32", (rows, cols // 8))
                out[q + "weight_scale"] = (bf, (rows, cols // g))
                out[q + "weight_shape"] = ("I32", (2,))
    vh, vi = vc["vt_hidden_size"], vc["vt_intermediate_size"]
    for b in range(vc["vt_num_hidden_layers"]):
        p = f"vision_tower.encoder.blocks.{b}."
        for name, shape in (("fc0", (vi, vh)), ("fc1", (vh, vi)), ("wo", (vh, vh)), ("wqkv", (3 * vh, vh))):
            out[p + name + ".weight"], out[p + name + ".bias"] = (bf, shape), (bf, shape[:1])
        for name in ("norm0", "norm1"):
            out[p + name + ".weight"], out[p + name + ".bias"] = (bf, (vh,)), (bf, (vh,))
    ps, merged = vc["patch_size"], vh * vc["merge_kernel_size"][0] * vc["merge_kernel_size"][1]
    out.update({
        "vision_tower.encoder.final_layernorm.weight": (bf, (vh,)),
        "vision_tower.encoder.final_layernorm.bias": (bf, (vh,)),
        "vision_tower.patch_embed.pos_emb.weight": (bf, (vc["init_pos_emb_height"], vc["init_pos_emb_width"], vh)),
        "vision_tower.patch_embed.proj.weight": (bf, (vh, 3, ps, ps)),
        "vision_tower.patch_embed.proj.bias": (bf, (vh,)),
        "mm_projector.pre_norm.weight": (bf, (vh,)),
        "mm_projector.pre_norm.bias": (bf, (vh,)),
        "mm_projector.proj.0.weight": (bf, (merged, merged)),
        "mm_projector.proj.0.bias": (bf, (merged,)),
        "mm_projector.proj.2.weight": (bf, (vc["text_hidden_size"], merged)),
        "mm_projector.proj.2.bias": (bf, (vc["text_hidden_size"],)),
    })  # fmt: skip
    return out


def save_release_headers(config: dict, out) -> Path:
    """A header-only stand-in for Kimi K2.5's release: config.json and one safetensors file whose header lists
    every tensor of :func:`release_tensors` and whose data is a sparse hole of the right size (no disk space, reads
    give zeros), enough for ``convert --dry-run``, which reads headers only."""
    import struct

    sizes = {"BF16": 2, "F32": 4, "I32": 4}
    out = Path(out)
    out.mkdir(parents=True)
    header, offset = {}, 0
    for name, (dtype, shape) in release_tensors(config).items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out
