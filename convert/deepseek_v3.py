"""DeepSeek-V3 (``deepseek_v3``), Kimi K2 (``kimi_k2``, the same architecture) and Kimi K2.5 (``kimi_k25``: the same
text model in a multimodal wrapper).

Checkpoints name tensors as mlx-lm does (``model.layers.N.*``) with three exceptions its sanitize
handles: the first ``first_k_dense_replace`` layers are dense (``mlp.{gate,up,down}_proj``, kept
resident), MoE layers hold routed experts per expert (``mlp.experts.{e}.{gate,up,down}_proj.weight``,
hub and transformers 5's ``save_pretrained``; fused ``experts.gate_up_proj``/``down_proj`` accepted)
plus ``mlp.shared_experts.*`` and a router with ``gate.e_score_correction_bias`` (grouped top-k over
``n_group`` groups), and multi-head latent attention's ``self_attn.kv_b_proj`` [H * (nope + v),
kv_lora_rank] is split per head into ``embed_q`` [H, kv_lora_rank, nope] (transposed) and
``unembed_out`` [H, v, kv_lora_rank]. The hub's multi-token-prediction layer
(``model.layers.{num_hidden_layers}``) is dropped. Releases are FP8 e4m3 with 128x128
``weight_scale_inv`` blocks, dequantized on read; Kimi K2 Thinking and Kimi K2.5 store the routed experts in
compressed-tensors INT4 (see :mod:`.compressed`), passed through.

Kimi K2.5's checkpoint holds the text model under ``language_model.`` (``language_model.model.layers.N.*``,
``language_model.lm_head``) with its config in ``text_config``, as mlx-lm's ``kimi_k25`` names it, plus a vision
tower (``vision_tower.*``) and its projector (``mm_projector.*``), which are dropped (logged).
"""

from __future__ import annotations

import re

import numpy as np

from .family import MlxLmFamily, register

KV_B = re.compile(r"^(.*\.self_attn)\.(embed_q|unembed_out)\.weight$")
LAYER = re.compile(r"^(?:language_model\.)?model\.layers\.(\d+)\.")


@register
class DeepseekV3(MlxLmFamily):
    model_type = "deepseek_v3"
    # The router (MoEGate) is not a Linear: it stays unquantized anyway.
    router_suffixes = ()
    moe_keys = ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")
    # "num_routed_experts"/"num_shared_experts": spellings seen in circulated copies of the config.
    config_aliases = {"n_routed_experts": ("num_routed_experts",), "n_shared_experts": ("num_shared_experts",)}

    def dropped(self, src: str, keep_mtp: bool) -> bool:
        m = LAYER.match(src)
        if m and int(m.group(1)) >= int(self.cfg("num_hidden_layers")):
            return True  # the MTP layer(s) after the last decoder layer
        return super().dropped(src, keep_mtp)

    def derived_source(self, target: str) -> str | None:
        m = KV_B.match(target)
        return f"{m.group(1)}.kv_b_proj.weight" if m else None

    def transform(self, target: str, value: np.ndarray, hf_layout: bool) -> np.ndarray:
        m = KV_B.match(target)
        if not m:
            return value
        heads, nope = int(self.cfg("num_attention_heads")), int(self.cfg("qk_nope_head_dim"))
        per_head = value.reshape(heads, nope + int(self.cfg("v_head_dim")), -1)
        if m.group(2) == "embed_q":
            return np.ascontiguousarray(per_head[:, :nope, :].swapaxes(-1, -2))
        return np.ascontiguousarray(per_head[:, nope:, :])


@register
class KimiK2(DeepseekV3):
    """Kimi K2 (Moonshot): DeepSeek-V3's architecture and tensor names under its own model_type."""

    model_type = "kimi_k2"
    mlx_module = "deepseek_v3"


@register
class KimiK25(DeepseekV3):
    """Kimi K2.5 (Moonshot): the text model is DeepSeek-V3's (mlx-lm's ``kimi_k25`` wraps its ``deepseek_v3``);
    the vision tower and the projector are not part of it."""

    model_type = "kimi_k25"
    mlx_module = "kimi_k25"
    drop_patterns = (
        *DeepseekV3.drop_patterns,
        r"^vision_model\.",
        r"^mm_projector\.",
        r"^multi_modal_projector\.",
    )
