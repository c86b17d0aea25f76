"""Loading a pack for generation: mlx-lm's model with resident weights, streamed experts.

:func:`load` builds the model from the pack's config through mlx-lm, quantizes the resident modules
as the manifest says, loads the resident safetensors strictly by name, and replaces every MoE
layer's ``switch_mlp`` with a :class:`~moestream.runtime.model.streamed.StreamedSwitchGLU` over one shared
:class:`~moestream.runtime.store.expert_store.ExpertStore`. On the CPU (Linux) float parameters are cast
to float32: MLX's CPU kernels are fastest, or only work, in float32.

How it runs (cache policy, kernels, K, ...) is one :class:`~moestream.runtime.options.RuntimeOptions`.
Under ``mlx.launch`` with several ranks, each layer's experts are split between them
(:mod:`~moestream.runtime.model.expert_parallel`): rank 0's :func:`load` returns the runtime, the
others serve it inside :func:`load` and exit with it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from moestream.layouts import Pack, PackError, open_pack
from moestream.runtime.cpu.threads import prefer_passive_wait
from moestream.runtime.model import expert_parallel
from moestream.runtime.model.blocks import (
    SHARED_EXPERT_ATTRS,
    get_switch,
    moe_blocks,
    output_head,
    set_experts_per_token,
    set_switch,
)
from moestream.runtime.model.build import build_model, cast_floats
from moestream.runtime.model.cpu_decode import use_cpu_decode
from moestream.runtime.model.cpu_layers import cpu_linear_paths, use_cpu_attention, use_cpu_delta, use_cpu_kernels
from moestream.runtime.model.entry_guess import EntryGuess, guess_at_entry
from moestream.runtime.model.metal_check import check_metal_layers
from moestream.runtime.model.shared_input import share_inputs
from moestream.runtime.model.streamed import EarlySharedExpert, StreamedSwitchGLU
from moestream.runtime.model.tokenizer import load_tokenizer
from moestream.runtime.options import KERNELS, OptionError, RuntimeOptions
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
    options: RuntimeOptions = field(default_factory=RuntimeOptions)  # what it was loaded with
    parallel: expert_parallel.Share | None = None  # under mlx.launch: this rank's share of the experts
    switches: dict = field(default_factory=dict)  # MoE layer -> its streamed experts module

    def close(self) -> None:
        if self.parallel is not None and self.parallel.group.rank == 0:
            self.parallel.close()  # the other ranks close theirs
        self.store.close()
        self.pack.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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


def _with_share(rt: Runtime, blocks: dict, share) -> Runtime:
    """``rt`` with its MoE layers' experts modules, each computing this rank's share when ``share``
    makes one (expert parallel)."""
    rt.switches = {i: get_switch(mlp) for i, mlp in blocks.items()}
    if share is not None:
        layers = sorted(blocks)
        hidden = rt.pack.manifest.expert_tiers(layers[0])[0].component("down_proj.weight").shape[0]
        rt.parallel = share(rt.store, hidden, rt.pack.manifest.num_experts, layers)
        for sw in rt.switches.values():
            expert_parallel.attach(sw, rt.parallel)
    return rt


def check_kernels(kernels: str) -> bool:
    """Whether the Metal expert kernels will run for a ``kernels`` choice (``metal`` where there is no
    Metal device is an :class:`~moestream.runtime.options.OptionError`)."""
    from moestream import metal

    if kernels not in KERNELS:
        raise OptionError("kernels", kernels, f"expected one of {', '.join(KERNELS)}")
    if kernels == "metal" and not metal.available():
        raise OptionError("kernels", kernels, "no Metal device here (Apple silicon only); use auto or mlx")
    return kernels == "metal" or (kernels == "auto" and metal.available())


def load(
    path: str | Path, options: RuntimeOptions | None = None, *, tokenizer: bool = True, trace: bool = False, **changes
) -> Runtime:
    """Open a pack for streamed execution.

    Args:
        path: the pack folder.
        options: how to run it (:class:`~moestream.runtime.options.RuntimeOptions`; default: its defaults).
        tokenizer: also load the tokenizer (mlx-lm's wrapper) from the pack.
        trace: record every read (for I/O accounting tests).
        changes: shorthand for ``options.replace(**changes)`` (field names of RuntimeOptions).

    Returns a :class:`Runtime`; close it, or use it as a context manager.

    Example:
        >>> with load("packs/qwen-4bit", RuntimeOptions(cache="lru:8G")) as rt:
        ...     for r in generate(rt, "Hello"): print(r.text, end="")
    """
    opts = (options or RuntimeOptions()).replace(**changes) if changes else (options or RuntimeOptions())
    group = expert_parallel.world() if opts.expert_parallel else None
    if group is None:
        return _load(path, opts, tokenizer, trace)
    if group.rank != 0:
        follow()
        raise SystemExit(0)
    return expert_parallel.drive_load(group, path, opts, lambda share: _load(path, opts, tokenizer, trace, share))


def follow() -> None:
    """On a rank other than 0 of an ``mlx.launch`` group: open what rank 0 opens, compute this rank's
    share of each MoE layer it sends, until rank 0 exits (:func:`~.expert_parallel.follow`)."""
    group = expert_parallel.world()
    if group is None or group.rank == 0:
        raise expert_parallel.DistributedError("follow(): this process is not a rank > 0 of an mlx.launch group")
    expert_parallel.follow(group, lambda path, opts, share: _load(path, opts, False, False, share))


def _load(path, opts: RuntimeOptions, tokenizer: bool, trace: bool, share=None) -> Runtime:
    """:func:`load` in this process; ``share(store, hidden, experts, layers)`` makes this rank's
    :class:`~.expert_parallel.Share` of an expert-parallel runtime."""
    cache, experts_per_token, dtype, kernels = opts.cache, opts.experts_per_token, opts.dtype, opts.kernels
    use_metal = check_kernels(kernels)
    pack = open_pack(path)
    store = None
    try:
        if experts_per_token and not 1 <= experts_per_token <= pack.manifest.num_experts:
            raise OptionError(
                "experts_per_token", experts_per_token, f"{pack.root} has {pack.manifest.num_experts} experts per layer"
            )
        model = build_model(pack, experts=False)
        on_cpu = mx.default_device() == mx.cpu
        if dtype is None and on_cpu:
            dtype = "float32"
        cpu_kernels = kernels == "numba" or (kernels == "auto" and on_cpu)
        cpu_kernels = cpu_kernels and pack.manifest.quantization["experts"]["bits"] < 16 and not use_metal
        if cpu_kernels:
            prefer_passive_wait()
        store = ExpertStore(
            pack,
            cache=cache,
            threads=opts.threads,
            trace=trace,
            verify=opts.verify,
            max_slots=opts.max_slots,
            cpu_only=cpu_kernels,
            prefill_buffer=opts.prefill_buffer,
        )
        if store.policy.startswith("mmap") and not cpu_kernels:
            raise OptionError("cache", cache, "the naive page-fault baseline computes with the numba kernels only")
        if store.policy == "os-map":
            if not cpu_kernels:
                raise OptionError("cache", cache, "page-cache hits are computed in place by the numba kernels only")
            store.compute_hits_in_place()
        cdt = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[dtype] if dtype else None
        blocks = moe_blocks(model)
        missing = set(blocks) - {x.layer for x in pack.manifest.experts}
        if missing:
            raise PackError(f"{pack.root}: no expert file for MoE layers {sorted(missing)}")
        for i, mlp in blocks.items():
            # The family's activation (gpt-oss: clamped SwiGLU) comes from mlx-lm's own SwitchGLU.
            set_switch(
                mlp,
                StreamedSwitchGLU(
                    store,
                    i,
                    cdt,
                    cpu_kernels=cpu_kernels,
                    metal_kernels=use_metal,
                    activation=get_switch(mlp).activation,
                ),
            )
            if experts_per_token:
                set_experts_per_token(mlp, experts_per_token)
        if share is not None and expert_parallel.world().rank != 0:
            # another rank of an expert-parallel runtime computes routed experts only: no resident
            # weight is read (the model's own parameters stay unevaluated, taking no memory)
            if use_metal:
                check_metal_layers([get_switch(b) for b in blocks.values()], cdt, strict=kernels == "metal")
            return _with_share(Runtime(model, None, pack, store, cpu_kernels, opts), blocks, share)
        weights = []
        for f in pack.manifest.resident_files:
            weights += [(k, v) for k, v in mx.load(str(pack.root / f.file)).items() if not k.startswith("mtp.")]
        model.load_weights(weights, strict=True)
        del weights  # the model holds them now; replaced arrays (cast, shared products) can then be freed
        if cdt is not None:
            # The CPU kernels read bf16 scales and biases as stored: float32 copies would add 11% to
            # the bytes a 4-bit g64 product reads (and to resident RAM).
            keep = (
                frozenset(f"{p}.{a}" for p in cpu_linear_paths(model) for a in ("scales", "biases"))
                if cpu_kernels
                else frozenset()
            )
            model.update(cast_floats(model.parameters(), cdt, keep))
        mx.eval(model.parameters())
        for mlp in blocks.values():  # after loading: the wrapper renames the shared expert's parameters
            for attr in SHARED_EXPERT_ATTRS:
                if isinstance(getattr(mlp, attr, None), nn.Module):
                    setattr(mlp, attr, EarlySharedExpert(getattr(mlp, attr)))
                    get_switch(mlp).overlap_with(getattr(mlp, attr))
        layers = sorted(blocks)
        for a, b in zip(layers, layers[1:]):
            # Expert parallel: a guess of the next layer's experts cannot know which rank's share they
            # will be, so every rank would read them all; no read-ahead or prefill guesses.
            if opts.read_ahead and store.policy in ("os", "os-map", "none") and share is None:
                get_switch(blocks[a]).read_ahead_for(b, blocks[b], opts.read_ahead)
        if cpu_kernels:
            use_cpu_kernels(model)
            if share_inputs(model):
                mx.clear_cache()  # the arrays the concatenations replaced go back to the system
            use_cpu_delta(model)
            use_cpu_attention(model)
            use_cpu_decode(model)
        if store.prefill_stream is not None and share is None:
            guesses = {}
            for i, mlp in blocks.items():
                layer = model.layers[i]
                guesses[i] = EntryGuess(
                    store.prefill_guess,
                    i,
                    mlp,
                    getattr(layer, "post_attention_layernorm", None),
                    pack.manifest.num_experts,
                )
                guess_at_entry(layer, guesses[i])
            for a, b in zip(layers, layers[1:]):
                get_switch(blocks[a]).prefill_guess_next(guesses[b])
        if use_metal:
            check_metal_layers([get_switch(b) for b in blocks.values()], cdt, strict=kernels == "metal")
        log.info("expert kernels: %s", "metal" if use_metal else "numba (CPU)" if cpu_kernels else "mlx")
        model.eval()
        tok = load_tokenizer(pack.root) if tokenizer else None
        return _with_share(Runtime(model, tok, pack, store, cpu_kernels, opts), blocks, share)
    except BaseException:
        if store is not None:
            store.close()
        pack.close()
        raise
