"""mlx-lm SwitchGLUs shaped like a pack's expert blocks (the modules slab arrays are swapped into)."""

from __future__ import annotations

import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear

from moestream.layouts import ExpertLayer

PROJS = ("gate_proj", "up_proj", "down_proj")


def switch_glu(x: ExpertLayer, num_experts: int = 1, activation: nn.Module | None = None) -> SwitchGLU:
    """An mlx-lm SwitchGLU whose linears match the block layout of expert file ``x``."""
    i, h = x.component("gate_proj.weight").shape[0], x.component("down_proj.weight").shape[0]
    bias = has_bias(x)
    glu = SwitchGLU(h, i, num_experts, **({"activation": activation} if activation is not None else {}))
    for p in PROJS:
        c = x.component(f"{p}.weight")
        if c.bits < 16:
            din = c.shape[1] * 32 // c.bits
            setattr(
                glu,
                p,
                QuantizedSwitchLinear(
                    din, c.shape[0], num_experts, bias=bias, group_size=c.group_size, bits=c.bits, mode=c.mode
                ),
            )
        else:
            setattr(glu, p, SwitchLinear(c.shape[1], c.shape[0], num_experts, bias=bias))
    return glu


def has_bias(x: ExpertLayer) -> bool:
    """The projections carry their own bias vectors (gpt-oss)."""
    return any(c.name == "gate_proj.bias" for c in x.components)
