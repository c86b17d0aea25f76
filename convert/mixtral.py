"""Mixtral (``mixtral``): Mixtral-8x7B, Mixtral-8x22B.

Experts live in ``model.layers.N.block_sparse_moe`` (hub releases and transformers 5's
``save_pretrained``): per expert ``experts.{e}.w1.weight`` (gate, [I, H]), ``w3`` (up, [I, H]) and
``w2`` (down, [H, I]); the router is ``block_sparse_moe.gate.weight``. Fused
(``experts.gate_up_proj``/``experts.down_proj``) and mlx-lm's stacked ``switch_mlp`` layouts are
accepted too, as is transformers 5's in-memory naming (``model.layers.N.mlp.*`` for the block).
Other names are mlx-lm's own; the expert intermediate size is ``intermediate_size``.
"""

from __future__ import annotations

import re

from .family import MlxLmFamily, register

IN_MEMORY_BLOCK = re.compile(r"^(model\.layers\.\d+)\.mlp\.")


@register
class Mixtral(MlxLmFamily):
    model_type = "mixtral"
    expert_names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    router_suffixes = ("block_sparse_moe.gate.weight",)
    moe_keys = ("num_local_experts", "num_experts_per_tok")

    def target_name(self, src: str) -> str:
        return IN_MEMORY_BLOCK.sub(r"\1.block_sparse_moe.", src)
