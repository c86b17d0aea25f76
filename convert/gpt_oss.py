"""OpenAI gpt-oss (``gpt_oss``): gpt-oss-20b, gpt-oss-120b.

Names are mlx-lm's own (``model.layers.N.*``, ``model.embed_tokens``, ``model.norm``, ``lm_head``);
the router is ``mlp.router`` (weight and bias), attention has biases and per-head ``sinks``. Experts
sit in ``model.layers.N.mlp.experts`` with bias vectors, and their gate and up rows are INTERLEAVED
(gate = 0::2, up = 1::2 along the 2I axis). Two layouts are accepted:

- hub releases (MXFP4): ``gate_up_proj_blocks`` [E, 2I, H/32, 16] uint8 (FP4 E2M1 nibbles, low
  nibble first), ``gate_up_proj_scales`` [E, 2I, H/32] uint8 (E8M0 exponents, bias 127),
  ``down_proj_blocks`` [E, H, I/32, 16], ``down_proj_scales`` [E, H, I/32]. That is byte for byte
  MLX's ``mode="mxfp4"`` layout (what mlx-lm's sanitize relies on), so these experts are passed
  through: rows de-interleaved, bytes copied, never requantized, whatever ``--bits`` says (which then
  applies to the resident weights).
- transformers' ``save_pretrained`` (float): ``gate_up_proj`` [E, H, 2I] and ``down_proj`` [E, I, H]
  (input dimension first), quantized at ``--bits`` like any float source.

Both with ``gate_up_proj_bias`` [E, 2I] and ``down_proj_bias`` [E, H]. mlx-lm's gpt-oss hardcodes the
clamped SwiGLU (alpha 1.702, limit 7.0), so other values are refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .family import ExpertSource, MlxLmFamily, register
from .source import ConvertError, SourceCheckpoint

log = logging.getLogger(__name__)

# FP4 E2M1 code -> value (the sign is the high bit of the nibble), as MLX's mxfp4 and OCP's MX spec.
FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32
)
SWIGLU = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}


def mxfp4_dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 [rows, 32 * groups] from packed FP4 bytes [rows, groups * 16] and E8M0 scales [rows, groups]."""
    rows, groups = scales.shape
    b = codes.reshape(rows, groups, 16)
    vals = np.empty((rows, groups, 32), np.float32)
    vals[..., 0::2] = FP4_VALUES[b & 15]
    vals[..., 1::2] = FP4_VALUES[b >> 4]
    return (vals * np.ldexp(np.float32(1.0), scales.astype(np.int32) - 127)[..., None]).reshape(rows, -1)


@dataclass
class GptOssExperts:
    """Reader of one layer's gpt-oss experts (``mxfp4`` hub blocks or ``float`` save_pretrained)."""

    layout: str
    names: dict[str, str]
    intermediate: int
    hidden: int

    @property
    def mxfp4(self) -> bool:
        return self.layout == "mxfp4"

    def shapes(self, n: int) -> dict[str, tuple[int, ...]]:
        i, h = self.intermediate, self.hidden
        if self.mxfp4:
            want = {
                "gate_up_blocks": (n, 2 * i, h // 32, 16),
                "gate_up_scales": (n, 2 * i, h // 32),
                "down_blocks": (n, h, i // 32, 16),
                "down_scales": (n, h, i // 32),
            }
        else:
            want = {"gate_up": (n, h, 2 * i), "down": (n, i, h)}
        return {**want, "gate_up_bias": (n, 2 * i), "down_bias": (n, h)}

    def check(self, src: SourceCheckpoint, n: int, layer: int) -> None:
        for key, shape in self.shapes(n).items():
            name = self.names[key]
            got = tuple(src.info(name).shape)
            if got != shape:
                raise ConvertError(
                    f"{src.file_of(name)}: tensor {name} has shape {list(got)}, "
                    f"expected {list(shape)} (layer {layer}, {n} experts, intermediate {self.intermediate}, "
                    f"hidden {self.hidden})"
                )
            dtype = src.info(name).dtype
            if (dtype == "U8") != key.endswith(("_blocks", "_scales")):
                raise ConvertError(f"{src.file_of(name)}: tensor {name} has dtype {dtype}")

    def _raw(self, src: SourceCheckpoint, key: str, e: int) -> np.ndarray:
        name = self.names[key]
        return src.readers[src.where[name]].read_rows(name, e, e + 1)[0]

    def codes(self, src: SourceCheckpoint, e: int) -> dict[str, dict[str, np.ndarray]]:
        """Expert ``e``'s stored MXFP4 arrays per projection, as MLX holds them: ``weight`` uint32
        [rows, cols / 8] (the same bytes), ``scales`` uint8 [rows, cols / 32]."""
        gu_b, gu_s = self._raw(src, "gate_up_blocks", e), self._raw(src, "gate_up_scales", e)
        d_b, d_s = self._raw(src, "down_blocks", e), self._raw(src, "down_scales", e)

        def mlx(blocks: np.ndarray, scales: np.ndarray) -> dict[str, np.ndarray]:
            rows = blocks.shape[0]
            return {
                "weight": np.ascontiguousarray(blocks).reshape(rows, -1).view(np.uint32),
                "scales": np.ascontiguousarray(scales),
            }

        return {
            "gate_proj": mlx(gu_b[0::2], gu_s[0::2]),
            "up_proj": mlx(gu_b[1::2], gu_s[1::2]),
            "down_proj": mlx(d_b, d_s),
        }

    def floats(self, src: SourceCheckpoint, e: int) -> dict[str, np.ndarray]:
        """Expert ``e``'s float32 gate [I, H], up [I, H] and down [H, I] (MXFP4 dequantized)."""
        if self.mxfp4:
            return {p: mxfp4_dequantize(a["weight"].view(np.uint8), a["scales"]) for p, a in self.codes(src, e).items()}
        gu = src.read_rows_f32(self.names["gate_up"], e, e + 1)[0]  # [H, 2I]
        return {
            "gate_proj": gu[:, 0::2].T,
            "up_proj": gu[:, 1::2].T,
            "down_proj": src.read_rows_f32(self.names["down"], e, e + 1)[0].T,
        }

    def biases(self, src: SourceCheckpoint, e: int) -> dict[str, np.ndarray]:
        """Expert ``e``'s float32 bias vectors: gate [I], up [I], down [H]."""
        gu = src.read_rows_f32(self.names["gate_up_bias"], e, e + 1)[0]
        return {
            "gate_proj": gu[0::2],
            "up_proj": gu[1::2],
            "down_proj": src.read_rows_f32(self.names["down_bias"], e, e + 1)[0],
        }


@register
class GptOss(MlxLmFamily):
    model_type = "gpt_oss"
    router_suffixes = ("mlp.router.weight",)
    moe_keys = ("num_local_experts", "num_experts_per_tok", "intermediate_size")
    # The hub config also spells top-k ``experts_per_token``.
    config_aliases = {"num_experts_per_tok": ("experts_per_token",)}

    def __init__(self, config: dict):
        super().__init__(config)
        for key, want in SWIGLU.items():
            got = self.cfg(key, want)
            if float(got) != want:
                raise ConvertError(f"config.json: {key} {got}: mlx-lm's gpt_oss computes with {want} only")

    def pack_config(self) -> dict:
        config = super().pack_config()
        config.pop("quantization_config", None)  # describes the source's MXFP4 blocks, not the pack
        return config

    def expert_source(self, layer: int, by_target: dict[str, str]) -> ExpertSource:
        pre = f"{self.switch_path(layer)}"  # model.layers.N.mlp.experts
        i, h = self.expert_shape(layer)
        bias = {"gate_up_bias": f"{pre}.gate_up_proj_bias", "down_bias": f"{pre}.down_proj_bias"}
        hub = {
            "gate_up_blocks": f"{pre}.gate_up_proj_blocks",
            "gate_up_scales": f"{pre}.gate_up_proj_scales",
            "down_blocks": f"{pre}.down_proj_blocks",
            "down_scales": f"{pre}.down_proj_scales",
            **bias,
        }
        dense = {"gate_up": f"{pre}.gate_up_proj", "down": f"{pre}.down_proj", **bias}
        for layout, names in (("mxfp4", hub), ("float", dense)):
            if any(n in by_target for k, n in names.items() if k not in bias):
                missing = [n for n in names.values() if n not in by_target]
                if missing:
                    raise ConvertError(f"checkpoint: missing expert tensor {missing[0]} (layer {layer})")
                reader = GptOssExperts(layout, {k: by_target[n] for k, n in names.items()}, i, h)
                return ExpertSource(layout, dict(reader.names), self.num_experts, reader)
        raise ConvertError(
            f"checkpoint: no experts found for layer {layer} (looked for {hub['gate_up_blocks']} "
            f"and {dense['gate_up']})"
        )
