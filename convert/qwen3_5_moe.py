"""Qwen3.5-MoE (``qwen3_5_moe``): Qwen3.5-397B-A17B, -122B-A10B, -35B-A3B.

Checkpoints on the hub: ``model.language_model.layers.N.*`` (text), ``model.visual.*`` (dropped),
``mtp.*`` (multi-token prediction; dropped unless ``--keep-mtp``), ``lm_head.weight``. BF16 releases
fuse experts (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]); FP8
releases and transformers' ``save_pretrained`` store ``mlp.experts.{e}.{gate,up,down}_proj.weight``.
mlx-lm's sanitize renames to ``language_model.model.*``, adds 1 to the RMSNorm weights (the
checkpoint stores them offset from 1) and moves the conv1d kernel axis last.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .family import MlxLmFamily, register

# RMSNorm weights stored as (weight - 1) in Hugging Face checkpoints (mlx-lm's sanitize adds 1).
NORM_SUFFIXES = (
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    "model.norm.weight",
    ".q_norm.weight",
    ".k_norm.weight",
)


@dataclass
class ModelArgs:
    """The text-config fields the converter reads, named as in config.json."""

    hidden_size: int
    num_hidden_layers: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int = 0
    vocab_size: int = 0
    tie_word_embeddings: bool = False
    layer_types: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        tc = config.get("text_config", config)
        return cls(**{k: tc[k] for k in cls.__dataclass_fields__ if k in tc})


@register
class Qwen3_5Moe(MlxLmFamily):
    model_type = "qwen3_5_moe"
    router_suffixes = ("mlp.gate.weight", "mlp.shared_expert_gate.weight")

    def __init__(self, config: dict):
        super().__init__(config)
        self.args = ModelArgs.from_dict(config)

    def target_name(self, src: str) -> str:
        if src.startswith("model.language_model"):
            return src.replace("model.language_model", "language_model.model", 1)
        if src.startswith("language_model.") or src.startswith("mtp."):
            return src
        return "language_model." + src

    def source_name_hint(self, target: str) -> str:
        return target.replace("language_model.model", "model.language_model", 1)

    def transform(self, target: str, value: np.ndarray, hf_layout: bool) -> np.ndarray:
        if not hf_layout:
            return value
        if "conv1d.weight" in target and value.ndim == 3:
            return np.ascontiguousarray(np.moveaxis(value, 2, 1))
        if value.ndim == 1 and target.endswith(NORM_SUFFIXES):
            return value + np.float32(1.0)
        return value
