"""Model families: what a checkpoint of a given ``model_type`` holds and how it maps to a pack.

A family adapter answers, for one architecture: which layers are MoE layers, where each expert's
gate/up/down weights live in the checkpoint (fused 3-D, stacked 3-D or per-expert 2-D), which
tensors are dropped, how source names map to the names mlx-lm's model expects after its
``sanitize``, and which value transforms that sanitize applies. The expected resident tensors come
from mlx-lm's own model definition, built lazily (no weights materialise), so a name or shape the
runtime would not accept is caught at conversion time. Adapters are declarative where they can be:
class attributes name the MoE block's expert tensors, the config keys, and the dropped tensors.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU

from .source import ConvertError

# Expert projections, in pack order.
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Modules that register a family (imported on first use).
FAMILY_MODULES = ("qwen3_5_moe", "qwen3_moe", "mixtral", "qwen3_next", "deepseek_v3", "gpt_oss")


@dataclass
class ExpertSource:
    """Where one layer's experts are in the checkpoint.

    ``layout`` is ``fused`` (``gate_up`` [E, 2I, H] gate rows first, ``down`` [E, H, I]), ``stacked``
    (``gate``/``up``/``down`` 3-D, one per projection) or ``per_expert`` (names formatted with ``e``);
    a family with its own layout gives a ``reader`` (see :class:`~moestream.convert.gpt_oss.GptOssExperts`:
    ``check``, ``floats``, ``biases``, and ``codes`` when ``mxfp4`` experts pass through unchanged).
    """

    layout: str
    names: dict[str, str]
    num_experts: int
    reader: Any = None

    def consumed(self) -> list[str]:
        if self.layout != "per_expert":
            return list(self.names.values())
        return [n.format(e=e) for e in range(self.num_experts) for n in self.names.values()]


def normalized_config(config: dict, aliases: dict[str, tuple[str, ...]]) -> dict:
    """``config`` plus the fields mlx-lm's ModelArgs need under the names it reads.

    transformers 5 writes some fields under new names (``num_local_experts``, ``rope_parameters``);
    the original keys are kept, missing ones are filled from their aliases.
    """
    config = json.loads(json.dumps(config))
    tc = config.get("text_config", config)
    for key, alts in aliases.items():
        if key not in tc:
            alt = next((a for a in alts if a in tc), None)
            if alt is not None:
                tc[key] = tc[alt]
    rope = tc.get("rope_parameters")
    if isinstance(rope, dict):
        for key in ("rope_theta", "partial_rotary_factor"):
            if key not in tc and key in rope:
                tc[key] = rope[key]
        if tc.get("rope_scaling") is None and rope.get("rope_type", "default") != "default":
            tc["rope_scaling"] = {**rope, "type": rope["rope_type"]}
    return config


class MlxLmFamily:
    """Base adapter for families that mlx-lm implements; subclasses fill in the class attributes."""

    model_type: str = ""
    mlx_module: str = ""  # mlx-lm's module for this model_type (default: the model_type itself)
    # Source tensors that are not part of the language model (vision tower, MTP head, buffers).
    drop_patterns: tuple[str, ...] = (r"^model\.visual\.", r"^vision_tower\.", r"rotary_emb\.inv_freq$")
    mtp_pattern = r"^mtp\."
    # Resident tensors kept at 8 bits whatever the default: the router decides which experts to read.
    router_suffixes: tuple[str, ...] = ("mlp.gate.weight",)
    # Per-expert source names of the three projections (``experts.{e}.<name>.weight``).
    expert_names: dict[str, str] = {p: p for p in PROJECTIONS}
    # mlx-lm config field -> the other names a checkpoint's config.json may give it.
    config_aliases: dict[str, tuple[str, ...]] = {}
    top_k_key = "num_experts_per_tok"
    # Config fields without which the model has no experts.
    moe_keys: tuple[str, ...] = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")

    def __init__(self, config: dict):
        self.config = self.prepare_config(config)
        self.text_config = self.config.get("text_config", self.config)
        missing = [k for k in self.moe_keys if not self.text_config.get(k)]
        if missing:
            raise ConvertError(f"config.json: not a Mixture-of-Experts config (missing {', '.join(missing)})")
        module = importlib.import_module(f"mlx_lm.models.{self.mlx_module or self.model_type}")
        try:
            self.model = module.Model(module.ModelArgs.from_dict(self.config))
        except (TypeError, KeyError, ValueError, AssertionError) as e:
            raise ConvertError(f"config.json: cannot build a {self.model_type} model from it ({e})") from None
        from mlx.utils import tree_flatten

        params = dict(tree_flatten(self.model.parameters()))
        # The experts are mlx-lm's SwitchGLU: ``switch_mlp`` in most families, ``experts`` in gpt-oss.
        pat = re.compile(r"^.*\.layers\.(\d+)\.\w+\.\w+$")
        self._switch = {
            int(m.group(1)): name
            for name, mod in self.model.named_modules()
            if isinstance(mod, SwitchGLU) and (m := pat.match(name))
        }
        under = tuple(f"{p}." for p in self._switch.values())
        self.expert_params = {k: tuple(v.shape) for k, v in params.items() if k.startswith(under)}
        self.resident_params = {k: (tuple(v.shape), v.dtype) for k, v in params.items() if not k.startswith(under)}
        # Modules mlx-lm would quantize (Linear, Embedding, MultiLinear): their ``.weight`` is quantizable.
        self.quantizable = {
            f"{name}.weight"
            for name, m in self.model.named_modules()
            if hasattr(m, "to_quantized") and not f"{name}.".startswith(under)
        }
        self._blocks = {layer: path.rsplit(".", 1)[0] for layer, path in self._switch.items()}
        if not self._blocks:
            raise ConvertError(
                f"config.json: not a Mixture-of-Experts config ({self.model_type} with "
                f"these settings has no expert layers)"
            )

    # -- config ----------------------------------------------------------------------------------
    @classmethod
    def prepare_config(cls, config: dict) -> dict:
        """The config mlx-lm's ModelArgs is built from (and the pack's config.json)."""
        return normalized_config(config, cls.config_aliases)

    def cfg(self, key: str, default=None):
        return self.text_config.get(key, default)

    @property
    def num_experts(self) -> int:
        return self.expert_params[f"{self.switch_path(self.moe_layers()[0])}.gate_proj.weight"][0]

    @property
    def top_k(self) -> int:
        return int(self.cfg(self.top_k_key))

    def moe_layers(self) -> list[int]:
        return sorted(self._blocks)

    def block_path(self, layer: int) -> str:
        """mlx-lm's path of the layer's MoE block (``...layers.N.mlp`` or ``...block_sparse_moe``)."""
        return self._blocks[layer]

    def switch_path(self, layer: int) -> str:
        """mlx-lm's path of the layer's SwitchGLU (``...mlp.switch_mlp``; gpt-oss: ``...mlp.experts``)."""
        return self._switch[layer]

    def layer_prefix(self, layer: int) -> str:
        return self._blocks[layer].rsplit(".", 1)[0]

    def expert_shape(self, layer: int) -> tuple[int, int]:
        """(intermediate, hidden) of the layer's experts, from mlx-lm's model."""
        e, i, h = self.expert_params[f"{self.switch_path(layer)}.gate_proj.weight"]
        return i, h

    def pack_config(self) -> dict:
        """The config.json written into the pack: the source's, with mlx-lm's field names filled in
        (without an mlx-lm source's ``quantization``: the manifest says how the pack is quantized)."""
        config = dict(self.config)
        q = config.pop("quantization", None)
        if q is not None and config.get("quantization_config") == q:
            config.pop("quantization_config")
        # A compressed-tensors config describes the source's INT4 packing (the manifest describes the pack's).
        for c in (config, config.get("text_config")):
            if isinstance(c, dict) and (c.get("quantization_config") or {}).get("quant_method") == "compressed-tensors":
                if c is not config:
                    c = config["text_config"] = dict(c)
                c.pop("quantization_config")
        return config

    # -- names -----------------------------------------------------------------------------------
    def dropped(self, src: str, keep_mtp: bool) -> bool:
        if self._drop_re().search(src):
            return True
        if not keep_mtp and re.search(self.mtp_pattern, src):
            return True
        return src == "lm_head.weight" and bool(self.cfg("tie_word_embeddings", False))

    @classmethod
    def _drop_re(cls) -> re.Pattern:
        """drop_patterns as one regex (a checkpoint of 1T parameters names 200,000 tensors)."""
        if cls.__dict__.get("_drop_compiled") is None:
            cls._drop_compiled = re.compile("|".join(f"(?:{p})" for p in cls.drop_patterns))
        return cls._drop_compiled

    def target_name(self, src: str) -> str:
        """Source name -> mlx-lm name (the prefix rules of mlx-lm's sanitize)."""
        return src

    def derived_source(self, target: str) -> str | None:
        """For a target that mlx-lm's sanitize computes from another tensor, that tensor's target name."""
        return None

    def expert_source(self, layer: int, by_target: dict[str, str]) -> ExpertSource:
        """Find layer ``layer``'s experts among the source tensors (``by_target``: target -> source)."""
        pre = self.block_path(layer)
        n = self.num_experts
        fused = {"gate_up": f"{pre}.experts.gate_up_proj", "down": f"{pre}.experts.down_proj"}
        stacked = {p: f"{self.switch_path(layer)}.{p}.weight" for p in PROJECTIONS}
        per = {p: f"{pre}.experts.{{e}}.{self.expert_names[p]}.weight" for p in PROJECTIONS}
        if all(t in by_target for t in fused.values()):
            return ExpertSource("fused", {k: by_target[t] for k, t in fused.items()}, n)
        for group in (fused, stacked):
            have = [t for t in group.values() if t in by_target]
            if have and len(have) < len(group):
                gone = next(t for t in group.values() if t not in by_target)
                raise ConvertError(f"checkpoint: missing expert tensor {self.source_name_hint(gone)} (layer {layer})")
        if all(t in by_target for t in stacked.values()):
            return ExpertSource("stacked", {k: by_target[t] for k, t in stacked.items()}, n)
        if any(p.format(e=0) in by_target for p in per.values()):
            missing = [p.format(e=e) for e in range(n) for p in per.values() if p.format(e=e) not in by_target]
            if missing:
                raise ConvertError(
                    f"checkpoint: missing expert tensor {self.source_name_hint(missing[0])} "
                    f"(layer {layer}; {len(missing)} expert tensors missing)"
                )
            # Store the source-name pattern: source names differ from targets only by prefix.
            src0 = {p: by_target[t.format(e=0)] for p, t in per.items()}
            return ExpertSource(
                "per_expert", {p: s.replace(".experts.0.", ".experts.{e}.") for p, s in src0.items()}, n
            )
        raise ConvertError(
            f"checkpoint: no experts found for layer {layer} "
            f"(looked for {self.source_name_hint(fused['gate_up'])} and per-expert weights)"
        )

    def source_name_hint(self, target: str) -> str:
        return target

    # -- values ----------------------------------------------------------------------------------
    def transform(self, target: str, value: np.ndarray, hf_layout: bool) -> np.ndarray:
        """Value changes mlx-lm's sanitize applies (float32 in, float32 out)."""
        return value

    def resident_override(self, target: str) -> int | None:
        """Bits forced for a resident tensor (the router), or None for the pack's default."""
        return 8 if target.endswith(self.router_suffixes) else None


_FAMILIES: dict[str, type[MlxLmFamily]] = {}


def register(cls: type[MlxLmFamily]) -> type[MlxLmFamily]:
    _FAMILIES[cls.model_type] = cls
    return cls


def _load_families() -> None:
    for name in FAMILY_MODULES:
        importlib.import_module(f"{__package__}.{name}")


def family_for(config: dict, where: str = "config.json") -> MlxLmFamily:
    """The adapter for a checkpoint's ``model_type``, or a one-line error listing supported ones."""
    _load_families()
    mt = config.get("model_type")
    if mt not in _FAMILIES:
        arch = "/".join(config.get("architectures") or []) or "no architectures field"
        raise ConvertError(
            f"{where}: model_type {mt!r} is not supported ({arch}); supported: {', '.join(sorted(_FAMILIES))}"
        )
    try:
        return _FAMILIES[mt](config)
    except ConvertError as e:
        raise ConvertError(str(e).replace("config.json", where, 1)) from None


def mlx_lm_config(config: dict, where: str = "config.json") -> dict:
    """``config`` as conversion hands it to mlx-lm's ModelArgs (the family's
    :meth:`~MlxLmFamily.prepare_config`: transformers 5's field names filled in), for loading a
    checkpoint with mlx-lm directly (an eval reference); unchanged for a ``model_type`` no family adapts."""
    _load_families()
    cls = _FAMILIES.get(config.get("model_type"))
    if cls is None:
        return config
    try:
        return cls.prepare_config(config)
    except ConvertError as e:
        raise ConvertError(str(e).replace("config.json", where, 1)) from None


def supported_families() -> list[str]:
    _load_families()
    return sorted(_FAMILIES)
