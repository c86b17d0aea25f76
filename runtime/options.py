"""How a pack is run: the one options object :func:`~moestream.runtime.load` takes.

The CLI commands that run packs (generate, chat, eval, bench, serve) build it from the same flags
(``cli/runtime_options.py``), and ``bench`` and ``serve`` pass it on unchanged to the runtimes they
load. Errors name the field and the value (:class:`OptionError`); the CLI turns the field into its flag.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from moestream.layouts.errors import OptionError  # noqa: F401  (re-exported: moestream.runtime.OptionError)

KERNELS = ("auto", "metal", "numba", "mlx")
CACHE_POLICIES = ("os", "os-map", "none", "mmap", "mmap-none")


@dataclass(frozen=True)
class RuntimeOptions:
    """Options for running a pack.

    Attributes:
        cache: expert cache policy: ``os`` (plain reads; the OS page cache keeps what it can),
            ``os-map`` (numba kernels: experts wholly in the page cache computed from a read-only
            mapping), ``none`` (cold streaming: direct I/O, or pages dropped after each read),
            ``mmap`` / ``mmap-none`` (the naive page-fault baselines; numba kernels only) or
            ``lru:SIZE`` (an in-process cache of SIZE bytes, e.g. ``lru:8G``).
        experts_per_token: override the model's top-k (fewer experts read per token).
        threads: reader threads.
        verify: check each expert block read against its manifest checksum.
        kernels: ``auto`` (Metal expert kernels on a Metal device, numba kernels where MLX runs on
            the CPU), ``metal``, ``numba`` or ``mlx`` (MLX's built-in quantized ops everywhere: the
            reference the others are tested against).
        prefill_buffer: bytes of the prefill ring (numba kernels, ``os``/``none``): a prompt chunk's
            expert reads start at each MoE layer's entry, guessed by its router, and run back to back
            through the layer's compute. None: 4 GiB, at most RAM / 8; 0: off.
        read_ahead: experts of the next MoE layer to start reading while a layer computes, guessed
            by the next router on this layer's input (decode, ``os``/``os-map``/``none``; 0: off).
            Wrong guesses cost disk and memory bandwidth (docs/benchmarks.md has the measurements).
        max_slots: experts held at once per slab with ``os``/``none`` (a larger union is processed in
            groups); None: max(2 x top-k, 32), at most the expert count.
        dtype: float type of compute (``float32``, ``bfloat16``, ``float16``); None: float32 where
            MLX runs on the CPU, the pack's own on a GPU.
        expert_parallel: under ``mlx.launch`` with several ranks, split each layer's routed experts
            between them (docs/distributed.md); False: this process runs the pack alone.
    """

    cache: str = "os"
    experts_per_token: int | None = None
    threads: int | None = None
    verify: bool = True
    kernels: str = "auto"
    prefill_buffer: int | None = None
    read_ahead: int = 0
    max_slots: int | None = None
    dtype: str | None = None
    expert_parallel: bool = True

    def __post_init__(self) -> None:
        cache_policy(self.cache)
        if self.kernels not in KERNELS:
            raise OptionError("kernels", self.kernels, f"expected one of {', '.join(KERNELS)}")
        for name in ("experts_per_token", "threads", "max_slots"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise OptionError(name, v, "expected a positive integer")
        for name in ("prefill_buffer", "read_ahead"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise OptionError(name, v, "expected a non-negative integer")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise OptionError("dtype", self.dtype, "expected float32, bfloat16 or float16")

    def replace(self, **changes) -> RuntimeOptions:
        """A copy with ``changes`` (field names; an unknown name is a TypeError)."""
        return dataclasses.replace(self, **changes)


def parse_size(text: str) -> int:
    """``SIZE`` in bytes, or with a K/M/G suffix (``8G``, ``512M``); ValueError otherwise."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgG]?)(?:i?[bB])?", text)
    if not m:
        raise ValueError(f"{text!r}: expected a size such as 512M or 8G")
    return int(float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()])


def cache_policy(spec: str) -> tuple[str, int]:
    """A ``cache`` value -> (policy, bytes of the in-process cache; 0 unless ``lru``)."""
    if spec in CACHE_POLICIES:
        return spec, 0
    if isinstance(spec, str) and spec.startswith("lru:"):
        try:
            return "lru", parse_size(spec[4:])
        except ValueError as e:
            raise OptionError("cache", spec, f"lru:SIZE with {e}") from None
    raise OptionError("cache", spec, f"expected {', '.join(CACHE_POLICIES)} or lru:SIZE (e.g. lru:8G)")
