"""Qwen3-MoE (``qwen3_moe``): Qwen3-30B-A3B, Qwen3-235B-A22B.

Checkpoints name tensors as mlx-lm does (``model.layers.N.*``, ``model.embed_tokens``,
``model.norm``, ``lm_head``), so no renaming is needed. Hub releases store experts per expert
(``model.layers.N.mlp.experts.{e}.{gate,up,down}_proj.weight``), and so does transformers 5's
``save_pretrained`` (it holds them fused in memory, as ``mlp.experts.gate_up_proj`` [E, 2I, H] and
``mlp.experts.down_proj`` [E, H, I], a layout also accepted). transformers 5 writes the expert count
as ``num_local_experts`` and the rope base inside ``rope_parameters``; mlx-lm reads ``num_experts``
and ``rope_theta``. Norms are plain RMSNorm weights: no value transforms.
"""

from __future__ import annotations

from .family import MlxLmFamily, register


@register
class Qwen3Moe(MlxLmFamily):
    model_type = "qwen3_moe"
    config_aliases = {"num_experts": ("num_local_experts",)}
