"""The routed experts of one MoE layer at batch 1 in two Metal dispatches, straight from the slabs.

:func:`routed_experts` takes one token's activations, the expert store's slab arrays and the slots
of the K routed experts, and returns either the router-weighted sum over the experts ``[H]`` or the
per-expert outputs ``[K, H]``. Two kernels (``.metal`` sources in this folder):

- ``gate_up``: gate and up projections of all K experts with SwiGLU, into ``hmid [K, I]`` float32;
- ``down``: down projections, summed over the experts with the router weights (or kept per expert).

Two dispatches, not one: every output row of ``down`` needs the whole intermediate vector of every
expert, and Metal has no grid-wide barrier; one dispatch would mean one threadgroup per expert
(10 threadgroups on a 30-40 core GPU) or atomics. The generic path (``gather_qmm`` x 3, SwiGLU,
weighting, sum) is about seven dispatches with two float round trips of the intermediate.

:func:`plan` turns shapes into :class:`Launch` records (template values, grid, threadgroup, output
shapes); :func:`launch` runs one through ``mx.fast.metal_kernel``. The tests run the same records on
the C++ emulator in ``tests/metal_shim``, so everything here but the Metal compiler is checked on Linux.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import mlx.core as mx

SIMDGROUPS = 8  # per threadgroup (256 threads): enough simdgroups to hide latency, one staging of x each
ROWS = 4  # output rows per simdgroup: each staged input read serves ROWS rows (2 x ROWS in gate_up)
TG_MEMORY = 32768  # bytes of threadgroup memory a Metal kernel may use
GATE_UP_INPUTS = ("x", "gate_w", "up_w", "gate_s", "up_s", "gate_b", "up_b", "slots")
DOWN_INPUTS = ("hmid", "down_w", "down_s", "down_b", "slots", "weights")


@dataclass(frozen=True)
class Launch:
    """One dispatch: which kernel, its template arguments, grid and threadgroup (in threads), outputs."""

    kernel: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    template: tuple[tuple[str, object], ...]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: tuple[tuple[int, ...], ...]
    output_dtypes: tuple[mx.Dtype, ...]


def source(name: str) -> str:
    """The text of ``metal/<name>.metal`` (shipped as package data)."""
    return resources.files("moestream.metal").joinpath(f"{name}.metal").read_text()


def available() -> bool:
    """Whether MLX has a Metal device here (Apple silicon)."""
    return bool(mx.metal.is_available())


def unsupported(h: int, i: int, gate_up: tuple[int, int], down: tuple[int, int]) -> str | None:
    """Why the kernels cannot take these shapes (None when they can).

    ``gate_up``/``down`` are (bits, group size) of the two weight kinds (down's group can differ:
    the converter falls back to 32 where I is not divisible by 64).
    """
    for what, (bits, gs), n in (("gate/up", gate_up, h), ("down", down, i)):
        if bits not in (2, 3, 4, 8):
            return f"{what}: {bits}-bit weights (kernels exist for 2, 3, 4 and 8)"
        if gs not in (32, 64, 128) or n % gs:
            return f"{what}: group size {gs} with {n} inputs per row"
    if i % ROWS or h % ROWS:
        return f"H={h}, I={i}: not multiples of {ROWS} rows per simdgroup"
    need = 4 * (32 * ((max(h, i) // 32) | 1) + max(h, i) // 32)
    if need > TG_MEMORY:
        return f"staging {max(h, i)} inputs needs {need} B of threadgroup memory (limit {TG_MEMORY})"
    return None


def _grid(rows: int) -> tuple[int, int, int]:
    groups = -(-rows // (ROWS * SIMDGROUPS))
    return (groups * 32 * SIMDGROUPS, 1, 1)


def plan(
    h: int, i: int, k: int, gate_up: tuple[int, int], down: tuple[int, int], out_dtype: mx.Dtype, weighted_sum: bool
) -> tuple[Launch, Launch]:
    """The two dispatches for K experts of hidden size H and intermediate size I.

    Args:
        h, i, k: hidden size, expert intermediate size, experts.
        gate_up, down: (bits, group size) of gate/up and of down.
        out_dtype: dtype of the result (the activations' dtype).
        weighted_sum: sum the experts with the router weights (``[H]``) or keep them (``[K, H]``).
    """
    why = unsupported(h, i, gate_up, down)
    if why:
        raise ValueError(f"Metal expert kernels: {why}")
    tg = (32 * SIMDGROUPS, 1, 1)
    first = Launch(
        "gate_up",
        GATE_UP_INPUTS,
        ("hmid",),
        (("BITS", gate_up[0]), ("GS", gate_up[1]), ("H", h), ("I", i), ("K", k), ("ROWS", ROWS)),
        _grid(k * i),
        tg,
        ((k, i),),
        (mx.float32,),
    )
    second = Launch(
        "down",
        DOWN_INPUTS,
        ("y",),
        (
            ("T", out_dtype),
            ("BITS", down[0]),
            ("GS", down[1]),
            ("H", h),
            ("I", i),
            ("K", k),
            ("ROWS", ROWS),
            ("SUM", int(weighted_sum)),
        ),  # int, not bool: MLX writes template bools as 1/0
        _grid(h),
        tg,
        ((h,) if weighted_sum else (k, h),),
        (out_dtype,),
    )
    return first, second


@functools.lru_cache(maxsize=None)
def _metal_kernel(name: str, inputs: tuple[str, ...], outputs: tuple[str, ...]):
    return mx.fast.metal_kernel(
        name=f"moestream_{name}",
        input_names=list(inputs),
        output_names=list(outputs),
        source=source(name),
        header=source("common"),
        ensure_row_contiguous=True,
    )


def launch(spec: Launch, inputs: list[mx.array]) -> list[mx.array]:
    """Run one dispatch on the Metal device (the tests replace this with the emulator)."""
    kern = _metal_kernel(spec.kernel, spec.inputs, spec.outputs)
    return kern(
        inputs=inputs,
        template=list(spec.template),
        grid=spec.grid,
        threadgroup=spec.threadgroup,
        output_shapes=list(spec.output_shapes),
        output_dtypes=list(spec.output_dtypes),
    )


def routed_experts(
    x: mx.array,
    arrays: dict[str, mx.array],
    slots: mx.array,
    gate_up: tuple[int, int],
    down: tuple[int, int],
    weights: mx.array | None = None,
) -> mx.array:
    """One token through K routed experts held in slab arrays.

    Args:
        x: activations [H] (float32, float16 or bfloat16).
        arrays: the slab's ``{gate,up,down}_proj.{weight,scales,biases}`` arrays ([slots, rows, ...]).
        slots: uint32 [K], the slab slot of each routed expert.
        gate_up, down: (bits, group size) of the gate/up and the down weights.
        weights: float32 [K] router weights: return their weighted sum over the experts, [H];
            None: return each expert's output, [K, H].

    Example:
        >>> y = routed_experts(x, slab.arrays, mx.array([3, 0, 7], mx.uint32), (4, 64), (4, 64), scores)
    """
    h = x.size
    k = slots.size
    i = arrays["gate_proj.weight"].shape[1]
    first, second = plan(h, i, k, gate_up, down, x.dtype, weights is not None)
    slots = slots.astype(mx.uint32).reshape(k)
    a = arrays
    (hmid,) = launch(
        first,
        [
            x.reshape(h),
            a["gate_proj.weight"],
            a["up_proj.weight"],
            a["gate_proj.scales"],
            a["up_proj.scales"],
            a["gate_proj.biases"],
            a["up_proj.biases"],
            slots,
        ],
    )
    w = weights.astype(mx.float32).reshape(k) if weights is not None else mx.ones((k,), mx.float32)
    (y,) = launch(second, [hmid, a["down_proj.weight"], a["down_proj.scales"], a["down_proj.biases"], slots, w])
    return y
