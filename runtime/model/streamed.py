"""The streamed MoE layer: mlx-lm's ``switch_mlp`` seam, fed from the expert store.

mlx-lm's sparse MoE block computes the router, then calls ``switch_mlp(x, inds)`` and weights the
result by the router scores. :class:`StreamedSwitchGLU` takes that call: it reads the union of the
routed experts (one read each, all in flight together), maps expert ids to slab slots, and runs
mlx-lm's own ``SwitchGLU`` (quantized switch linears, the same kernels as a fully resident model)
with the slab arrays as its weights. Everything else in the model is mlx-lm's code. On a Metal device
a one-token call runs moestream's fused expert kernels instead (:mod:`moestream.metal.kernels`).
"""

from __future__ import annotations

import logging

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwiGLU

from moestream.layouts import ExpertLayer
from moestream.runtime.model.cpu_layers import CpuQuantizedLinear
from moestream.runtime.model.hidden import Hidden
from moestream.runtime.model.profile import region
from moestream.runtime.model.switch_glu import PROJS, has_bias, switch_glu
from moestream.runtime.store.expert_store import ExpertStore, block_key

log = logging.getLogger(__name__)


class EarlySharedExpert(nn.Module):
    """Wraps a block's ``shared_expert`` so its output can be computed while expert reads are in flight.

    :meth:`start` builds the lazy output for ``x``; mlx-lm's block then calls the module with the same
    ``x`` and gets that output instead of a second computation.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self._memo = Hidden(None)

    def start(self, x: mx.array) -> mx.array:
        y = self.inner(x)
        self._memo.module = (x, y)
        return y

    def __call__(self, x: mx.array) -> mx.array:
        memo, self._memo.module = self._memo.module, None
        if memo is not None and memo[0] is x:
            return memo[1]
        return self.inner(x)


class StreamedSwitchGLU(nn.Module):
    """Drop-in for ``mlp.switch_mlp`` (gpt-oss: ``mlp.experts``): ``(x [..., H], inds [..., k]) -> [..., k, H]``.

    With ``shared`` (the block's :class:`EarlySharedExpert`), the shared expert is evaluated while
    this layer's routed experts are being read. With ``metal_kernels``, one-token calls (decode) run
    the Metal expert kernels; larger batches, and shapes the kernels do not take, run mlx-lm's layer.
    """

    def __init__(
        self,
        store: ExpertStore,
        layer: int,
        compute_dtype: mx.Dtype | None = None,
        shared: EarlySharedExpert | None = None,
        cpu_kernels: bool = False,
        metal_kernels: bool = False,
        activation: nn.Module | None = None,
    ):
        super().__init__()
        self._store, self._layer = store, layer
        self._shared = Hidden(shared)
        self._cpu = cpu_kernels
        tiers = store.pack.manifest.expert_tiers(layer)
        # One mlx-lm SwitchGLU per block layout (several for a tiered layer), keyed as the store's slabs.
        self._glus = Hidden({block_key(x): switch_glu(x, 1, activation) for x in tiers})
        self._glu = Hidden(next(iter(self._glus.module.values())))  # the activation, shared by the tiers
        x = tiers[0]
        self._quantized = x.component("gate_proj.weight").bits < 16
        self._mode = x.component("gate_proj.weight").mode
        self._bias = has_bias(x)
        self._dtype = compute_dtype
        self.recorder = None  # calibration: called with (expert, its inputs, its SwiGLU intermediate)
        self.trace = None  # a RoutingTrace: records the router's choices
        self.parallel = None  # expert parallel (expert_parallel.py): this rank computes a share of the experts
        self._metal = metal_kernels and self._quantized and all(self._metal_shapes(x) for x in tiers)
        self._next = Hidden(None)  # (layer, MoE block) of the next MoE layer, for read-ahead
        self.read_ahead = 0
        self._next_prefill = Hidden(None)  # the next MoE layer's EntryGuess (prefill ring)

    @property
    def numpy_decode(self) -> bool:
        """Whether :meth:`decode_numpy` can take this layer's tokens (the numba kernels compute it)."""
        return self._cpu

    def read_ahead_for(self, layer: int, block: nn.Module, count: int) -> None:
        """On one-token calls, guess ``count`` experts of the next MoE ``layer`` by applying its router
        to this layer's input (the residual stream changes little between layers) and start reading
        them while this layer computes. A wrong guess costs disk time only."""
        self._next.module = (layer, block)
        self.read_ahead = count

    def prefill_guess_next(self, guess) -> None:
        """On multi-token calls, run the next MoE layer's :class:`~moestream.runtime.store.prefill_ring.EntryGuess`
        on this layer's input once this layer's reads are queued: the prefill ring then reads the next
        layer's experts while this one computes, not only from the next layer's entry."""
        self._next_prefill.module = guess

    def overlap_with(self, shared: EarlySharedExpert) -> None:
        """Evaluate ``shared`` while this layer's expert reads are in flight."""
        self._shared.module = shared

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        with region("routing"):
            inds = np.array(indices)  # the router's choice: a sync point, as in any streaming design
        if self.trace is not None:
            self.trace.record(self._layer, inds)
        experts = np.unique(inds)
        if self.parallel is not None:
            experts = self.parallel.share(self._layer, x, inds, experts)
        out = None
        shared = self._shared.module
        # Called once the reads are issued (the CPU kernels compute eagerly, so not before).
        overlap = [lambda: _other(lambda: mx.eval(shared.start(x)))] if shared is not None else []
        if self.read_ahead and self._next.module is not None and x.size == x.shape[-1]:
            overlap.insert(0, lambda: self._guess_next(x))
        if self._next_prefill.module is not None and x.size > x.shape[-1]:
            overlap.insert(0, lambda: self._next_prefill.module(x, normed=True))
        if self._cpu:
            return self._cpu_call(x, inds, experts, overlap)
        if self._metal and x.size == x.shape[-1]:
            return self._metal_call(x, inds, experts, overlap)
        for slab, part, slots in self._store.fetch(self._layer, experts, overlap):
            glu = self._glus.module[slab.key]
            lookup = np.zeros(int(inds.max()) + 1, np.int32)  # inds: also other ranks' experts
            lookup[part] = slots
            mine = np.isin(inds, part)
            local = mx.array(np.where(mine, lookup[inds], 0).astype(np.uint32))
            for p in PROJS:
                lin = getattr(glu, p)
                if self._quantized:
                    lin.weight = slab.arrays[f"{p}.weight"]
                    lin.scales = slab.arrays[f"{p}.scales"]
                    if self._mode == "affine":
                        lin.biases = slab.arrays[f"{p}.biases"]
                else:  # unquantized packs: CPU gather_mm takes float32 only
                    w = slab.arrays[f"{p}.weight"]
                    lin.weight = w.astype(self._dtype) if self._dtype is not None else w
                if self._bias:
                    b = slab.arrays[f"{p}.bias"]
                    lin.bias = b.astype(self._dtype) if self._dtype is not None else b
            y = glu(x, local)
            if not mine.all():
                y = y * mx.array(mine)[..., None].astype(y.dtype)
            slab.pending.append(y)
            out = y if out is None else out + y
        return out

    def _guess_next(self, x: mx.array) -> list:
        layer, block = self._next.module
        router = router_of(block)
        if router is not None:
            logits = np.array(router(x).astype(mx.float32)).reshape(-1)
            k = min(self.read_ahead, logits.size)
            self._store.read_ahead(layer, np.sort(np.argpartition(-logits, k - 1)[:k]))
        return []

    def _metal_shapes(self, x: ExpertLayer) -> bool:
        from moestream.metal.kernels import unsupported

        g, u, d = (x.component(f"{p}.weight") for p in PROJS)
        h, i = d.shape[0], g.shape[0]
        why = unsupported(h, i, (g.bits, g.group_size), (d.bits, d.group_size))
        if why is None and (u.bits, u.group_size) != (g.bits, g.group_size):
            why = "gate and up quantized differently"
        # The fused kernels compute affine codes and plain SwiGLU without expert biases (not gpt-oss).
        if why is None and g.mode != "affine":
            why = f"{g.mode} experts"
        if why is None and (has_bias(x) or type(self._glu.module.activation) is not SwiGLU):
            why = "expert biases or another activation than SwiGLU"
        if why:
            log.info("layer %d: MLX's kernels, not Metal's (%s)", self._layer, why)
        return why is None

    def _metal_call(self, x: mx.array, inds: np.ndarray, experts: np.ndarray, overlap: list) -> mx.array:
        """One token: each slab group's experts through the fused Metal kernels, outputs [..., k, H].

        mlx-lm's block owns the router scores and weights the experts itself, so the kernels keep the
        experts apart here (their weighted-sum mode serves callers that hold the scores).
        """
        from moestream.metal.kernels import routed_experts

        flat = inds.reshape(-1)
        xs = x.reshape(-1)
        pieces, order = [], []
        for slab, part, slots in self._store.fetch(self._layer, experts, overlap):
            glu = self._glus.module[slab.key]
            gu = (glu.gate_proj.bits, glu.gate_proj.group_size)
            dn = (glu.down_proj.bits, glu.down_proj.group_size)
            slot_of = dict(zip(part.tolist(), slots.tolist()))
            pos = [j for j, e in enumerate(flat.tolist()) if e in slot_of]
            y = routed_experts(
                xs, slab.arrays, mx.array(np.array([slot_of[int(flat[j])] for j in pos], np.uint32)), gu, dn
            )
            slab.pending.append(y)
            pieces.append(y)
            order += pos
        if len(order) < len(flat):  # expert parallel: the slots of other ranks' experts stay zero
            rows = np.full(len(flat), len(order))
            rows[order] = np.arange(len(order))
            pieces.append(mx.zeros((1, xs.shape[-1]), pieces[0].dtype if pieces else x.dtype))
            return mx.concatenate(pieces, axis=0)[mx.array(rows)].reshape(*inds.shape, x.shape[-1])
        out = pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=0)
        if order != list(range(len(flat))):
            out = out[mx.array(np.argsort(np.array(order)))]
        return out.reshape(*inds.shape, x.shape[-1])

    def decode_numpy(self, xs: np.ndarray, inds: np.ndarray, overlap: list) -> np.ndarray:
        """One token from numpy to numpy (the CPU decode fast path, :mod:`.cpu_decode`): ``xs [1, H]``
        float32, ``inds [k]`` the routed experts -> ``[k, H]``, each expert's output. ``overlap``: work
        for while the reads are in flight (the shared expert), as in :meth:`__call__`."""
        inds = inds.reshape(1, -1)
        if self.trace is not None:
            self.trace.record(self._layer, inds)
        if self.read_ahead and self._next.module is not None:
            overlap.insert(0, lambda: self._guess_next(mx.array(xs)))
        experts = np.unique(inds)
        if self.parallel is not None:
            experts = self.parallel.share(self._layer, xs, inds, experts)
        return self._cpu_numpy(xs, inds, experts, overlap)[0]

    def _cpu_call(self, x: mx.array, inds: np.ndarray, experts: np.ndarray, overlap: list) -> mx.array:
        """The same computation with the numba kernels, reading the slabs through numpy views."""
        xs = np.array(x.astype(mx.float32)).reshape(-1, x.shape[-1])
        return mx.array(self._cpu_numpy(xs, inds, experts, overlap).reshape(*inds.shape, x.shape[-1]))

    def _cpu_numpy(self, xs: np.ndarray, inds: np.ndarray, experts: np.ndarray, overlap: list) -> np.ndarray:
        h = xs.shape[-1]
        flat = inds.reshape(xs.shape[0], -1)
        out = np.zeros((*flat.shape, h), np.float32)
        for slab, part, slots in _marked(self._store.fetch(self._layer, experts, overlap, many=xs.shape[0] > 1)):
            glu = self._glus.module[slab.key]
            a = slab.numpy
            if self.recorder is None and self._mode == "affine" and not self._bias:
                # decode: the group's experts in 3 launches; prefill: the same, each expert's tokens
                # a segment of the group's rows
                with region("products"):
                    (self._cpu_decode if xs.shape[0] == 1 else self._cpu_prefill)(xs, flat, part, slots, a, glu, out)
                continue
            for e, slot in zip(part.tolist(), slots.tolist()):
                t, j = np.nonzero(flat == e)
                xe = xs[t]
                gate = self._cpu_linear(glu, a, "gate_proj", slot, xe)
                up = self._cpu_linear(glu, a, "up_proj", slot, xe)
                mid = self._cpu_activation(gate, up)
                if self.recorder is not None:
                    self.recorder(e, xe, mid)
                out[t, j] = self._cpu_linear(glu, a, "down_proj", slot, mid)
        return out

    def _cpu_decode(
        self, xs: np.ndarray, flat: np.ndarray, part: np.ndarray, slots: np.ndarray, a: dict, glu, out: np.ndarray
    ) -> None:
        """One token: every expert of the group through :func:`qmm_experts`, gate, up and down each one
        parallel launch (per-expert launches cost about a third of a decode layer's expert time where
        measured)."""
        from moestream.runtime.cpu.kernels import qmm_experts, qmm_experts_pair

        pos = {e: j for j, e in enumerate(flat[0].tolist())}
        cols = np.array([pos[e] for e in part.tolist()])
        w = {p: (a[f"{p}.weight"], a[f"{p}.scales"], a[f"{p}.biases"]) for p in PROJS}
        g, d = glu.gate_proj, glu.down_proj
        if (glu.up_proj.bits, glu.up_proj.group_size) == (g.bits, g.group_size):
            gate, up = qmm_experts_pair(xs, w["gate_proj"], w["up_proj"], slots, g.bits, g.group_size)
        else:
            x = np.repeat(xs, len(part), axis=0)
            gate = qmm_experts(x, *w["gate_proj"], slots, g.bits, g.group_size)
            up = qmm_experts(x, *w["up_proj"], slots, glu.up_proj.bits, glu.up_proj.group_size)
        out[0, cols] = qmm_experts(self._cpu_activation(gate, up), *w["down_proj"], slots, d.bits, d.group_size)

    def _cpu_prefill(
        self, xs: np.ndarray, flat: np.ndarray, part: np.ndarray, slots: np.ndarray, a: dict, glu, out: np.ndarray
    ) -> None:
        """Several tokens: the (token, expert) pairs of the group sorted by expert, gate, up and down
        each one call of :func:`qmm_grouped` over all the group's experts."""
        from moestream.runtime.cpu.kernels import qmm_grouped

        where = [np.nonzero(flat == e) for e in part.tolist()]
        t = np.concatenate([w[0] for w in where])
        j = np.concatenate([w[1] for w in where])
        counts = np.array([len(w[0]) for w in where])
        args = {
            p: (
                a[f"{p}.weight"],
                a[f"{p}.scales"],
                a[f"{p}.biases"],
                slots,
                counts,
                getattr(glu, p).bits,
                getattr(glu, p).group_size,
            )
            for p in PROJS
        }
        xe = xs[t]
        mid = self._cpu_activation(qmm_grouped(xe, *args["gate_proj"]), qmm_grouped(xe, *args["up_proj"]))
        out[t, j] = qmm_grouped(mid, *args["down_proj"])

    def _cpu_linear(self, glu, a: dict[str, np.ndarray], p: str, slot: int, xe: np.ndarray) -> np.ndarray:
        from moestream.runtime.cpu.kernels import as_f32, qmm, qmm_mxfp4

        lin = getattr(glu, p)
        if self._mode == "mxfp4":
            y = qmm_mxfp4(xe, a[f"{p}.weight"][slot], a[f"{p}.scales"][slot])
        else:  # bf16 scales as stored: the kernel widens them itself
            y = qmm(
                xe, a[f"{p}.weight"][slot], a[f"{p}.scales"][slot], a[f"{p}.biases"][slot], lin.bits, lin.group_size
            )
        if self._bias:
            y += as_f32(a[f"{p}.bias"][slot])
        return y

    def _cpu_activation(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """The family's gated activation: plain SwiGLU, gpt-oss's clamped one, or MLX's module."""
        from mlx_lm.models.activations import SwigluOAI

        from moestream.runtime.cpu.kernels import silu_mul, swiglu_oai

        act = self._glu.module.activation
        if type(act) is SwiGLU:
            return silu_mul(gate, up)
        if type(act) is SwigluOAI:
            return swiglu_oai(gate, up, act._alpha, act._limit)
        return np.array(act(mx.array(up), mx.array(gate)).astype(mx.float32))


def _other(fn):
    """Call ``fn`` with its time charged to ``other`` (overlap work runs inside the store's fetch)."""
    with region("other"):
        return fn()


def _marked(groups):
    """The store's fetch generator, the time spent inside it charged to ``store``."""
    it = iter(groups)
    while True:
        with region("store"):
            group = next(it, None)
        if group is None:
            return
        yield group


def router_of(block: nn.Module) -> nn.Module | None:
    """A MoE block's router when it is a plain linear giving one logit per expert (Qwen, Mixtral,
    gpt-oss); None for routers that are not (DeepSeek's grouped, bias-corrected gate)."""
    for name in ("gate", "router"):
        g = getattr(block, name, None)
        if isinstance(g, (nn.Linear, nn.QuantizedLinear, CpuQuantizedLinear)):
            return g
    return None
