"""Quantized linears that read the same input, computed as one product on the CPU.

mlx-lm's layers call several linears on one input in a row: a gated-delta layer's ``in_proj_qkv``,
``in_proj_z``, ``in_proj_b`` and ``in_proj_a``; attention's ``q_proj``, ``k_proj``, ``v_proj``; an MLP's
(or shared expert's) ``gate_proj`` and ``up_proj``; a MoE block's router ``gate`` and
``shared_expert_gate``. On the CPU each call converts the input to numpy, quantizes it to int8 and
wakes the OpenMP workers: tens of microseconds each, which on the small matrices of a layer (the 397B's
``in_proj_a`` is 64 x 4096) cost more than the bytes.

:func:`share_inputs` concatenates each such group's codes, scales and biases once, at load, into one
matrix and makes the members' own arrays row slices of it (views: no memory is added). The first
member called with an input computes every member's rows in one product; the others, called with
the same input object, take their slice, and once every member has had its slice the group lets go
of the input and the product (a 512-token prefill's would otherwise stay, ~5 MB a token on the 397B).
A member called with any other input, or again, computes alone, as before. This relies on the model
code not changing an input in place between sibling calls (mlx-lm's do not: only reshapes, or the
expert call, run between them).
"""

from __future__ import annotations

import logging

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moestream.runtime.model.cpu_layers import CpuQuantizedLinear
from moestream.runtime.model.hidden import Hidden

log = logging.getLogger(__name__)

# Sibling attributes that mlx-lm's model files call on the same input (only these: fusing by shape
# alone would also catch e.g. an o_proj whose input width equals the hidden size).
GROUPS = (
    ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),
    ("in_proj_qkvz", "in_proj_ba"),
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("gate", "shared_expert_gate"),
)


def _key(lin: CpuQuantizedLinear) -> tuple:
    inner = lin.inner
    return inner.weight.shape[1], inner.weight.dtype, inner.scales.dtype, inner.bits, inner.group_size, lin.int8


class SharedInput:
    """One product for ``members`` (CPU linears on one input, same layout); see the module text."""

    def __init__(self, members: list[CpuQuantizedLinear]):
        inners = [m.inner for m in members]
        cat = {a: mx.concatenate([q[a] for q in inners]) for a in ("weight", "scales", "biases")}
        mx.eval(*cat.values())
        rows = np.cumsum([0] + [q.weight.shape[0] for q in inners]).tolist()
        for m, r0, r1 in zip(members, rows[:-1], rows[1:]):
            for a, arr in cat.items():
                setattr(m.inner, a, arr[r0:r1])  # a view of the concatenated array
            mx.eval(m.inner.parameters())
            m.bind()  # its own numpy views (computing alone) now point into the shared arrays
            m.shared = Hidden((self, r0, r1))
        q = inners[0]
        # built tiny (the constructor quantizes random weights), then given the concatenated arrays
        fused = nn.QuantizedLinear(q.group_size, 1, bias=False, group_size=q.group_size, bits=q.bits)
        fused.weight, fused.scales, fused.biases = cat["weight"], cat["scales"], cat["biases"]
        self.fused = CpuQuantizedLinear(fused)
        self.fused.int8 = members[0].int8
        self.size = len(members)
        self._x: mx.array | None = None  # the input of the product held, kept alive so its identity holds
        self._y: mx.array | None = None
        self._served: set[int] = set()  # rows (r0) of the members that took their slice of it

    def output(self, r0: int, r1: int, x: mx.array) -> mx.array:
        if x is not self._x or r0 in self._served:
            self._x, self._y, self._served = x, self.fused(x), set()
        self._served.add(r0)
        y = self._y[..., r0:r1]
        if len(self._served) == self.size:  # everyone served: nothing left to hold
            self._x = self._y = None
        return y


def share_inputs(model: nn.Module) -> int:
    """Give each group of sibling CPU linears in :data:`GROUPS` (two or more present, same input width,
    bits, group size and int8 setting, no biases) one shared product. Returns the number of groups."""
    n = 0
    for _, m in model.named_modules():
        kids = m.children()
        for names in GROUPS:
            lins = [kids[k] for k in names if isinstance(kids.get(k), CpuQuantizedLinear)]
            lins = [x for x in lins if x.shared is None and "bias" not in x.inner and not x.last_only]
            keys = [_key(x) for x in lins]
            if len(set(keys)) > 1:  # e.g. different bits: the largest subset of one layout
                best = max(set(keys), key=keys.count)
                lins = [x for x, k in zip(lins, keys) if k == best]
            if len(lins) < 2:
                continue
            SharedInput(lins)
            n += 1
    log.info("%d groups of linears share one product per input", n)
    return n
