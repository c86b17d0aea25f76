"""Load a pack into mlx-lm's own model, with every expert resident (no streaming).

This is the reference the streaming runtime is compared against, and the "fully resident" baseline
of the benchmarks. It is also the end-to-end check of the pack contract: resident tensors load
strictly by name into mlx-lm's model, and expert blocks are stacked into the arrays of its
``SwitchGLU`` (``switch_mlp``; gpt-oss: ``experts``) byte for byte, so any layout mistake shows up as
an exception or as wrong logits.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moestream.layouts import Pack, open_pack
from moestream.runtime.model.rope import untruncate_yarn

log = logging.getLogger(__name__)

MX_DTYPE = {
    "bfloat16": mx.bfloat16,
    "float16": mx.float16,
    "float32": mx.float32,
    "uint32": mx.uint32,
    "uint8": mx.uint8,
}


def build_model(pack: Pack, experts: bool = True) -> nn.Module:
    """mlx-lm's model for the pack's config, quantized as the manifest says (weights not loaded).

    Args:
        experts: also quantize the experts' SwitchGLU (False when it is about to be replaced by a streamed one).
    """
    m = pack.manifest
    config = json.loads((pack.root / "config.json").read_text())
    module = importlib.import_module(f"mlx_lm.models.{mlx_module(m.model_type)}")
    model = module.Model(module.ModelArgs.from_dict(config))
    untruncate_yarn(model, config)  # gpt-oss's rope, which mlx-lm rounds (see rope.py)
    q = m.quantization["experts"]
    layers = {f"{path}.": layer for layer, path in switch_paths(model).items()}

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):
            return False
        sw = next((p for p in layers if path.startswith(p)), None)
        if sw is not None:
            if q["bits"] >= 16 or not experts:
                return False
            # Per projection: a layer whose size is not divisible by the group size fell back to 32.
            c = m.expert_layer(layers[sw]).component(f"{path[len(sw) :]}.weight")
            return {"bits": c.bits, "group_size": c.group_size, "mode": c.mode}
        t = m.resident_tensors.get(f"{path}.weight")
        if t is None or t.bits >= 16:
            return False
        return {"bits": t.bits, "group_size": t.group_size}

    nn.quantize(model, class_predicate=predicate)
    if experts:
        _expert_modules(model, pack)
    return model


def mlx_module(model_type: str) -> str:
    """mlx-lm's module for a model_type (``kimi_k2`` runs on ``deepseek_v3``)."""
    from mlx_lm.utils import MODEL_REMAPPING

    return MODEL_REMAPPING.get(model_type, model_type)


def _expert_modules(model: nn.Module, pack: Pack) -> None:
    """Tiered layers get a TieredSwitchGLU in ``switch_mlp``'s place (one SwitchGLU per width)."""
    from moestream.runtime.model.blocks import get_switch, moe_blocks, set_switch
    from moestream.runtime.model.tiered import TieredSwitchGLU

    m = pack.manifest
    blocks = moe_blocks(model)
    for layer in m.moe_layers():
        tiers = m.expert_tiers(layer)
        if len(tiers) > 1 or tiers[0].expert_ids is not None:
            set_switch(blocks[layer], TieredSwitchGLU(tiers, m.num_experts, get_switch(blocks[layer])))


def expert_weights(pack: Pack, layer: int) -> dict[str, mx.array]:
    """All experts of one layer stacked as mlx-lm's ``switch_mlp`` arrays ([E, ...] per component).

    For a tiered layer the keys are ``tiers.T.<component>``, each tier's experts in file order (the
    parameters of :class:`~moestream.runtime.model.tiered.TieredSwitchGLU`)."""
    tiers = pack.manifest.expert_tiers(layer)
    out = {}
    for t, x in enumerate(tiers):
        stacks = {c.name: np.empty((x.num_experts, *c.shape), _np(c.dtype)) for c in x.components}
        block = np.empty(x.block_bytes, np.uint8)
        for j, e in enumerate(x.ids()):
            for name, arr in pack.expert_arrays(layer, e, pack.read_expert(layer, e, block)).items():
                stacks[name][j] = arr
        prefix = f"tiers.{t}." if len(tiers) > 1 or x.expert_ids is not None else ""
        out.update({prefix + name: _to_mx(a, c.dtype) for (name, a), c in zip(stacks.items(), x.components)})
    return out


def _np(dtype: str):
    return {
        "uint32": np.uint32,
        "uint8": np.uint8,
        "bfloat16": np.uint16,
        "float16": np.float16,
        "float32": np.float32,
    }[dtype]


def _to_mx(a: np.ndarray, dtype: str) -> mx.array:
    if dtype == "bfloat16":
        return mx.array(a).view(mx.bfloat16)
    return mx.array(a)


def load_resident_model(path: str | Path, dtype: str | None = None) -> tuple[nn.Module, Pack]:
    """Build mlx-lm's model from a pack with all weights in memory.

    Args:
        path: the pack folder.
        dtype: cast float parameters (not codes) to this dtype, e.g. "float32" for CPU compute.

    Returns:
        (model, pack). The model's weights were loaded with ``strict=True``.
    """
    pack = open_pack(path)
    model = build_model(pack)
    weights: list[tuple[str, mx.array]] = []
    for f in pack.manifest.resident_files:
        weights += [(k, v) for k, v in mx.load(str(pack.root / f.file)).items() if not k.startswith("mtp.")]
    paths = switch_paths(model)
    for layer in pack.manifest.moe_layers():
        for name, arr in expert_weights(pack, layer).items():
            weights.append((f"{paths[layer]}.{name}", arr))
    model.load_weights(weights, strict=True)
    if dtype:
        target = MX_DTYPE[dtype]
        model.update(cast_floats(model.parameters(), target))
    mx.eval(model.parameters())
    model.eval()
    return model, pack


def switch_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Path -> mlx-lm SwitchGLU (a layer's experts: ``...mlp.switch_mlp``; gpt-oss ``...mlp.experts``)."""
    from mlx_lm.models.switch_layers import SwitchGLU

    from moestream.runtime.model.tiered import TieredSwitchGLU

    return {name: m for name, m in model.named_modules() if isinstance(m, (SwitchGLU, TieredSwitchGLU))}


def switch_paths(model: nn.Module) -> dict[int, str]:
    """Layer index -> parameter path of its experts (``model.layers.3.block_sparse_moe.switch_mlp``)."""
    import re

    pat = re.compile(r"^.*\.layers\.(\d+)\.\w+\.\w+$")
    return {int(m.group(1)): name for name in switch_modules(model) if (m := pat.match(name))}


def cast_floats(params: dict, dtype: mx.Dtype, keep: frozenset[str] = frozenset()) -> dict:
    """Float parameters to ``dtype``, except those whose dotted path is in ``keep``."""
    from mlx.utils import tree_map_with_path

    return tree_map_with_path(
        lambda path, a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) and path not in keep else a, params
    )
