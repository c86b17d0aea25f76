"""Per-expert widths: give the experts a layer routes to most the most bits, within a byte budget.

A routed expert's weight error reaches the output only when the expert is chosen, so its cost to the
model is about (routing frequency) x (its quantization error), while its cost on disk is its size.
With routing as skewed as real MoE models show (a few experts take most of a layer's tokens, some
almost none), spending bits by frequency buys far more quality per stored byte than a uniform width.

:func:`allocate_widths` solves: minimise sum_e freq_e * err(width_e) subject to the mean stored bits
per weight <= budget, over all experts of all layers at once, by the greedy convex-hull method
(exact for the convex relaxation, within one step of optimal here).
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass

import numpy as np

_WIDTH = re.compile(r"^(2|3|4|8)g(32|64|128)$")


@dataclass(frozen=True, order=True)
class Width:
    """One quantization choice for an expert: ``bits`` with ``group_size``."""

    bits: int
    group_size: int

    @classmethod
    def parse(cls, text: str) -> "Width":
        m = _WIDTH.match(text.strip())
        if not m:
            raise ValueError(
                f"width {text!r}: expected BITSgGROUP with bits 2, 3, 4 or 8 and group 32, 64 or 128 (e.g. 4g64)"
            )
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"{self.bits}g{self.group_size}"

    def bits_per_weight(self, scale_bytes: int = 2) -> float:
        """Stored bits per weight: the code plus a scale and a bias per group."""
        return self.bits + 2 * 8 * scale_bytes / self.group_size


def allocate_widths(
    freq: dict[int, np.ndarray],
    err: dict[int, dict[Width, float]],
    widths: list[Width],
    budget: float,
    scale_bytes: int = 2,
) -> dict[int, list[Width]]:
    """Choose a width per expert.

    Args:
        freq: layer -> routing frequency of each expert (any scale; compared within a layer and
            across layers, so normalise each layer to sum 1).
        err: layer -> width -> relative error of that width on that layer's experts.
        widths: the allowed widths.
        budget: mean stored bits per weight over all experts (every expert has the same size).
        scale_bytes: bytes of a stored scale or bias (2 for bf16/fp16).

    Returns:
        layer -> width of each expert. Raises ValueError when even the narrowest width exceeds the budget.
    """
    cost = {w: w.bits_per_weight(scale_bytes) for w in widths}
    order = sorted(widths, key=lambda w: cost[w])
    if cost[order[0]] > budget + 1e-9:
        raise ValueError(
            f"budget {budget} bits per weight is below the narrowest width {order[0]} ({cost[order[0]]:.3f})"
        )
    n = sum(len(f) for f in freq.values())
    choice = {layer: [order[0]] * len(f) for layer, f in freq.items()}
    spare = (budget - cost[order[0]]) * n
    heap: list[tuple[float, int, int, int]] = []  # (-gain per bit, layer, expert, hull index)
    hulls: dict[int, list[Width]] = {}
    for layer in freq:
        hulls[layer] = _lower_hull(order, cost, err[layer])
    for layer, f in freq.items():
        hull = hulls[layer]
        for e in range(len(f)):
            if len(hull) > 1:
                heapq.heappush(heap, (-_gain(f[e], hull[0], hull[1], cost, err[layer]), layer, e, 1))
    while heap:
        neg, layer, e, k = heapq.heappop(heap)
        hull = hulls[layer]
        step = cost[hull[k]] - cost[hull[k - 1]]
        if step > spare + 1e-9:
            continue  # this expert's next step does not fit; smaller steps elsewhere still may
        spare -= step
        choice[layer][e] = hull[k]
        if k + 1 < len(hull):
            heapq.heappush(heap, (-_gain(freq[layer][e], hull[k], hull[k + 1], cost, err[layer]), layer, e, k + 1))
    return choice


def _gain(f: float, a: Width, b: Width, cost: dict, err: dict) -> float:
    return float(f) * (err[a] - err[b]) / (cost[b] - cost[a])


def _lower_hull(order: list[Width], cost: dict, err: dict) -> list[Width]:
    """Widths on the lower convex hull of (cost, error): the only ones a greedy step should visit."""
    hull: list[Width] = []
    for w in order:
        if hull and err[w] >= err[hull[-1]]:
            continue  # costs more and is no better
        while len(hull) >= 2 and _slope(hull[-2], hull[-1], cost, err) >= _slope(hull[-1], w, cost, err):
            hull.pop()  # hull[-1] lies above the line from hull[-2] to w
        hull.append(w)
    return hull


def _slope(a: Width, b: Width, cost: dict, err: dict) -> float:
    return (err[b] - err[a]) / (cost[b] - cost[a])
