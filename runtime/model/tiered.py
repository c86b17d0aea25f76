"""Fully resident experts of a tiered layer: one mlx-lm ``SwitchGLU`` per tier.

A tiered pack stores a layer's experts in several files, each at its own width (see
:mod:`moestream.layouts.manifest`). The streamed runtime handles that per read group; the resident
model (the reference and the "resident" baseline) needs a module in ``switch_mlp``'s place that
routes each (token, slot) to its tier's SwitchGLU.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moestream.layouts import ExpertLayer
from moestream.runtime.model.hidden import Hidden
from moestream.runtime.model.switch_glu import switch_glu


class TieredSwitchGLU(nn.Module):
    """``(x [..., H], inds [..., k]) -> [..., k, H]`` over experts split into tiers.

    Each tier's SwitchGLU runs on every slot with its tier-local expert ids (others masked to 0 and
    zeroed afterwards): simple and exact, at the cost of computing each slot once per tier. This
    module serves the resident reference, not the streamed decode path.
    """

    def __init__(self, tiers: list[ExpertLayer], num_experts: int, original: nn.Module | None = None):
        super().__init__()
        act = getattr(original, "activation", None)  # the family's gated activation (gpt-oss clamps)
        self.tiers = [switch_glu(x, x.num_experts, act) for x in tiers]
        tier, local = np.zeros(num_experts, np.int32), np.zeros(num_experts, np.uint32)
        for t, x in enumerate(tiers):
            tier[x.ids()], local[x.ids()] = t, np.arange(x.num_experts)
        self._map = Hidden((mx.array(tier), mx.array(local)))

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        tier, local = self._map.module
        t, j = tier[indices], local[indices]
        out = None
        for k, glu in enumerate(self.tiers):
            mine = t == k
            y = glu(x, mx.where(mine, j, 0)) * mine[..., None].astype(x.dtype)
            out = y if out is None else out + y
        return out
