"""Where each model family keeps its MoE pieces: the experts module, top-k, shared expert, output head."""

from __future__ import annotations

import mlx.nn as nn

from moestream.layouts import PackError


def output_head(model: nn.Module):
    """The model's output projection when it runs on the CPU kernels (else None)."""
    from moestream.runtime.model.cpu_layers import CpuQuantizedLinear

    lm = getattr(model, "language_model", model)
    head = getattr(lm, "lm_head", None)
    return head if isinstance(head, CpuQuantizedLinear) else None


SWITCH_ATTRS = ("switch_mlp", "experts")  # gpt-oss names its SwitchGLU ``experts``


def _switch_attr(block: nn.Module) -> str | None:
    from mlx_lm.models.switch_layers import SwitchGLU

    from moestream.runtime.model.streamed import StreamedSwitchGLU
    from moestream.runtime.model.tiered import TieredSwitchGLU

    for attr in SWITCH_ATTRS:
        if isinstance(getattr(block, attr, None), (SwitchGLU, StreamedSwitchGLU, TieredSwitchGLU)):
            return attr
    return None


def get_switch(block: nn.Module) -> nn.Module:
    """A MoE block's experts module (``switch_mlp``; gpt-oss: ``experts``)."""
    return getattr(block, _switch_attr(block))


def set_switch(block: nn.Module, module: nn.Module) -> None:
    setattr(block, _switch_attr(block), module)


def moe_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """Layer index -> the layer's sparse MoE block: the child holding the experts' SwitchGLU (``mlp``
    in most families, ``block_sparse_moe`` in Mixtral; see :func:`get_switch`)."""
    out = {}
    for i, layer in enumerate(model.layers):
        for child in layer.children().values():
            if isinstance(child, nn.Module) and _switch_attr(child) is not None:
                out[i] = child
                break
    return out


# Where a block keeps its top-k: Qwen's ``top_k``, Mixtral's ``num_experts_per_tok``, DeepSeek's
# router (``gate.top_k``), which does the selection itself.
TOP_K_ATTRS = ("top_k", "num_experts_per_tok")


SHARED_EXPERT_ATTRS = ("shared_expert", "shared_experts")


def get_experts_per_token(block: nn.Module) -> int:
    """A MoE block's current top-k, wherever its family keeps it."""
    for owner in (block, getattr(block, "gate", None)):
        for attr in TOP_K_ATTRS:
            if owner is not None and isinstance(getattr(owner, attr, None), int):
                return getattr(owner, attr)
    raise PackError(f"{type(block).__name__}: no top-k attribute")


def set_experts_per_token(block: nn.Module, k: int) -> None:
    """Override a MoE block's top-k wherever its family keeps it."""
    found = False
    for owner in (block, getattr(block, "gate", None)):
        for attr in TOP_K_ATTRS:
            if owner is not None and isinstance(getattr(owner, attr, None), int):
                setattr(owner, attr, k)
                found = True
    if not found:
        raise PackError(f"{type(block).__name__}: no top-k attribute to override")
