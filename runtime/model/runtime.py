"""Loading a pack for generation: mlx-lm's model with resident weights, streamed experts.

:func:`load` builds the model from the pack's config through mlx-lm, quantizes the resident modules
as the manifest says, loads the resident safetensors strictly by name, and replaces every MoE
layer's ``switch_mlp`` with a :class:`~moestream.runtime.model.streamed.StreamedSwitchGLU` over one shared
:class:`~moestream.runtime.store.expert_store.ExpertStore`. On the CPU (Linux) float parameters are cast
to float32: MLX's CPU kernels are fastest, or only work, in float32.

Kernels (``kernels=``): ``auto`` runs moestream's Metal expert kernels on a Metal device and its numba
kernels on the CPU; ``metal`` insists on the Metal ones; ``mlx`` uses MLX's built-in quantized ops
everywhere (the reference the others are tested against).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from moestream.layouts import Pack, PackError, open_pack
from moestream.layouts.errors import MoestreamError

from moestream.runtime.model.blocks import (SHARED_EXPERT_ATTRS, get_switch, moe_blocks, output_head,
                                            set_experts_per_token, set_switch)
from moestream.runtime.model.build import build_model, cast_floats
from moestream.runtime.model.cpu_layers import cpu_linear_paths, use_cpu_attention, use_cpu_delta, use_cpu_kernels
from moestream.runtime.model.entry_guess import EntryGuess, guess_at_entry
from moestream.runtime.model.shared_input import share_inputs
from moestream.runtime.model.streamed import EarlySharedExpert, StreamedSwitchGLU
from moestream.runtime.model.tokenizer import load_tokenizer
from moestream.runtime.store.expert_store import ExpertStore

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What :func:`load` returns: the model, its tokenizer, the pack and the expert store."""

    model: nn.Module
    tokenizer: object
    pack: Pack
    store: ExpertStore
    cpu_kernels: bool = False  # experts and quantized linears computed by moestream's numba kernels

    def close(self) -> None:
        self.store.close()
        self.pack.close()

    def trace_routing(self):
        """Start recording every MoE layer's routing; returns the :class:`RoutingTrace`."""
        from moestream.runtime.analysis.routing import RoutingTrace

        trace = RoutingTrace(self.pack.manifest.num_experts)
        for mlp in moe_blocks(self.model).values():
            get_switch(mlp).trace = trace
        return trace

    @contextmanager
    def prefill_logits_last(self):
        """Within this block, a multi-token forward computes logits for its last position only
        (what generation needs; evaluation needs them all and does not use this)."""
        head = output_head(self.model)
        if head is None:
            yield
            return
        head.last_only = True
        try:
            yield
        finally:
            head.last_only = False


def check_kernels(kernels: str) -> bool:
    """Validate a ``kernels`` choice; returns whether the Metal expert kernels will run."""
    from moestream import metal

    if kernels not in ("auto", "metal", "mlx"):
        raise MoestreamError(f"--kernels {kernels}: expected auto, metal or mlx")
    if kernels == "metal" and not metal.available():
        raise MoestreamError("--kernels metal: no Metal device here (Apple silicon only); use --kernels auto or mlx")
    return kernels == "metal" or (kernels == "auto" and metal.available())


def load(path: str | Path, cache: str = "os", experts_per_token: int | None = None, dtype: str | None = None,
         threads: int | None = None, tokenizer: bool = True, trace: bool = False, verify: bool = True,
         cpu_kernels: bool | None = None, max_slots: int | None = None, kernels: str = "auto",
         read_ahead: int = 0, prefill_buffer: int | None = None) -> Runtime:
    """Open a pack for streamed execution.

    Args:
        path: the pack folder.
        cache: ``os``, ``os-map``, ``none`` or ``lru:SIZE`` (see :mod:`moestream.runtime.store.expert_store`).
        experts_per_token: override the model's top-k.
        dtype: float dtype of compute; default float32 on the CPU, the pack's own on a GPU.
        threads: reader threads.
        tokenizer: also load the tokenizer (mlx-lm's wrapper) from the pack.
        trace: record every read (for I/O accounting tests).
        verify: check each block read against its manifest checksum.
        cpu_kernels: compute quantized linears and experts with moestream's numba kernels (default: when
            MLX runs on the CPU and ``kernels`` is not ``mlx``; MLX's own CPU quantized matmul is several
            times slower).
        max_slots: experts held at once per slab with ``os``/``none`` (see ExpertStore).
        kernels: ``auto`` (Metal expert kernels on a Metal device), ``metal`` (those, or an error where
            there is no Metal device) or ``mlx`` (MLX's built-in quantized ops).
        read_ahead: experts of the next MoE layer to start reading while a layer computes, guessed by
            the next router on this layer's input (decode, ``os``/``none`` caches; default 0: off).
            Wrong guesses cost disk and memory bandwidth: on a synthetic 397B pack (random routing,
            22% guessed right) it slowed cold decode by 19%; on the trained fixture the guess is right
            50-83% of the time (``benchmarks/RESULTS.md``).
        prefill_buffer: bytes of the prefill ring (CPU kernels, ``os``/``none``): a prompt chunk's
            expert reads start at each MoE layer's entry, guessed by its router, and run back to back
            through the layer's compute (:mod:`~moestream.runtime.store.prefill_ring`). Default 4 GiB
            (at most RAM / 8); 0: off.

    Example:
        >>> rt = load("packs/qwen-4bit", cache="lru:8G")
        >>> for r in generate(rt, "Hello"): print(r.text, end="")
    """
    use_metal = check_kernels(kernels)
    pack = open_pack(path)
    store = None
    try:
        if experts_per_token and not 1 <= experts_per_token <= pack.manifest.num_experts:
            raise PackError(f"--experts-per-token {experts_per_token}: must be in [1, {pack.manifest.num_experts}]")
        model = build_model(pack, experts=False)
        on_cpu = mx.default_device() == mx.cpu
        if dtype is None and on_cpu:
            dtype = "float32"
        if cpu_kernels is None:
            cpu_kernels = on_cpu and kernels != "mlx"
        cpu_kernels = cpu_kernels and pack.manifest.quantization["experts"]["bits"] < 16 and not use_metal
        store = ExpertStore(pack, cache=cache, threads=threads, trace=trace, verify=verify, max_slots=max_slots,
                            cpu_only=cpu_kernels, prefill_buffer=prefill_buffer)
        if store.policy.startswith("mmap") and not cpu_kernels:
            raise PackError("--cache mmap (the naive page-fault baseline) computes with the CPU kernels only")
        if store.policy == "os-map":
            if not cpu_kernels:
                raise PackError("--cache os-map (page-cache hits computed in place) needs the CPU kernels")
            store.compute_hits_in_place()
        cdt = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[dtype] if dtype else None
        blocks = moe_blocks(model)
        missing = set(blocks) - {x.layer for x in pack.manifest.experts}
        if missing:
            raise PackError(f"{pack.root}: no expert file for MoE layers {sorted(missing)}")
        for i, mlp in blocks.items():
            # The family's activation (gpt-oss: clamped SwiGLU) comes from mlx-lm's own SwitchGLU.
            set_switch(mlp, StreamedSwitchGLU(store, i, cdt, cpu_kernels=cpu_kernels, metal_kernels=use_metal,
                                              activation=get_switch(mlp).activation))
            if experts_per_token:
                set_experts_per_token(mlp, experts_per_token)
        weights = []
        for f in pack.manifest.resident_files:
            weights += [(k, v) for k, v in mx.load(str(pack.root / f.file)).items() if not k.startswith("mtp.")]
        model.load_weights(weights, strict=True)
        del weights  # the model holds them now; replaced arrays (cast, shared products) can then be freed
        if cdt is not None:
            # The CPU kernels read bf16 scales and biases as stored: float32 copies would add 11% to
            # the bytes a 4-bit g64 product reads (and to resident RAM).
            keep = frozenset(f"{p}.{a}" for p in cpu_linear_paths(model) for a in ("scales", "biases")) \
                if cpu_kernels else frozenset()
            model.update(cast_floats(model.parameters(), cdt, keep))
        mx.eval(model.parameters())
        for mlp in blocks.values():  # after loading: the wrapper renames the shared expert's parameters
            for attr in SHARED_EXPERT_ATTRS:
                if isinstance(getattr(mlp, attr, None), nn.Module):
                    setattr(mlp, attr, EarlySharedExpert(getattr(mlp, attr)))
                    get_switch(mlp).overlap_with(getattr(mlp, attr))
        layers = sorted(blocks)
        for a, b in zip(layers, layers[1:]):
            if read_ahead and store.policy in ("os", "os-map", "none"):
                get_switch(blocks[a]).read_ahead_for(b, blocks[b], read_ahead)
        if cpu_kernels:
            use_cpu_kernels(model)
            if share_inputs(model):
                mx.clear_cache()  # the arrays the concatenations replaced go back to the system
            use_cpu_delta(model)
            use_cpu_attention(model)
        if store.prefill_stream is not None:
            guesses = {}
            for i, mlp in blocks.items():
                layer = model.layers[i]
                guesses[i] = EntryGuess(store.prefill_guess, i, mlp, getattr(layer, "post_attention_layernorm", None),
                                        pack.manifest.num_experts)
                guess_at_entry(layer, guesses[i])
            for a, b in zip(layers, layers[1:]):
                get_switch(blocks[a]).prefill_guess_next(guesses[b])
        log.info("expert kernels: %s", "metal" if use_metal else "numba (CPU)" if cpu_kernels else "mlx")
        model.eval()
        tok = load_tokenizer(pack.root) if tokenizer else None
        return Runtime(model, tok, pack, store, cpu_kernels)
    except BaseException:
        if store is not None:
            store.close()
        pack.close()
        raise
