"""Qwen3-Next (``qwen3_next``): Qwen3-Next-80B-A3B.

Hybrid attention like Qwen3.5 (gated DeltaNet linear attention with one full-attention layer every
``full_attention_interval``), but a text-only checkpoint named as mlx-lm names it
(``model.layers.N.*``): linear attention keeps its fused ``in_proj_qkvz`` and ``in_proj_ba``
projections, experts are per expert (``mlp.experts.{e}.{gate,up,down}_proj.weight``, hub and
transformers 5's ``save_pretrained``; fused ``experts.gate_up_proj``/``down_proj`` accepted), plus a
shared expert and its sigmoid gate. As for Qwen3.5, mlx-lm's sanitize adds 1 to the zero-centred
RMSNorm weights and moves the conv1d kernel axis last (both applied when the conv1d weight has the
Hugging Face shape [C, 1, K]); ``mtp.*`` is dropped. transformers 5 writes ``layer_types`` instead of
``full_attention_interval`` (which mlx-lm reads), so the interval is recovered from the layer types.
"""

from __future__ import annotations

from .family import MlxLmFamily, normalized_config, register
from .qwen3_5_moe import Qwen3_5Moe
from .source import ConvertError


@register
class Qwen3Next(MlxLmFamily):
    model_type = "qwen3_next"
    router_suffixes = ("mlp.gate.weight", "mlp.shared_expert_gate.weight")
    transform = Qwen3_5Moe.transform  # same norm and conv1d conventions

    @classmethod
    def prepare_config(cls, config: dict) -> dict:
        config = normalized_config(config, cls.config_aliases)
        types = config.get("layer_types")
        if "full_attention_interval" not in config and types:
            k = types.index("full_attention") + 1 if "full_attention" in types else 0
            if not k or any((t == "full_attention") != ((i + 1) % k == 0) for i, t in enumerate(types)):
                raise ConvertError(
                    "config.json: layer_types is not one full-attention layer every N layers "
                    "(mlx-lm's qwen3_next needs a fixed full_attention_interval)"
                )
            config["full_attention_interval"] = k
        return config
