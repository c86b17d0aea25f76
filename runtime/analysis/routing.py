"""Routing traces: which experts each token was routed to, per MoE layer, and what they imply for
caching (``--trace-routing FILE`` on ``generate`` and ``eval``; ``notebooks/routing.ipynb``).

A trace is one int16 array per MoE layer, [tokens, K], in the order the runtime saw the tokens
(prompt windows, then each decoded token). Saved as ``.npz`` with the pack's expert count.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np


class RoutingTrace:
    """Collects the router's choices as the streamed layers receive them."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self._parts: dict[int, list[np.ndarray]] = {}

    def record(self, layer: int, inds: np.ndarray) -> None:
        self._parts.setdefault(layer, []).append(np.asarray(inds, np.int16).reshape(-1, inds.shape[-1]))

    @property
    def layers(self) -> dict[int, np.ndarray]:
        return {layer: np.concatenate(p) for layer, p in sorted(self._parts.items())}

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, num_experts=self.num_experts, **{f"layer_{i}": a for i, a in self.layers.items()})

    @staticmethod
    def load(path: str | Path) -> tuple[int, dict[int, np.ndarray]]:
        """(num_experts, {layer: [tokens, K] expert ids})."""
        with np.load(path) as z:
            return int(z["num_experts"]), {int(k.split("_")[1]): z[k] for k in z.files if k.startswith("layer_")}


def popularity(trace: np.ndarray, num_experts: int) -> np.ndarray:
    """Share of routings that went to each expert, sorted from most to least used."""
    counts = np.bincount(trace.ravel(), minlength=num_experts)
    return np.sort(counts)[::-1] / max(1, counts.sum())


def consecutive_reuse(trace: np.ndarray) -> float:
    """Mean share of a token's experts that the previous token also used (what a cache of one
    token's experts would hit)."""
    if len(trace) < 2:
        return 0.0
    prev, cur = trace[:-1], trace[1:]
    hits = (cur[:, :, None] == prev[:, None, :]).any(-1)
    return float(hits.mean())


def lru_hit_rate(trace: np.ndarray, capacity: int) -> float:
    """Hit rate of an LRU cache of ``capacity`` experts for one layer, replaying the trace.

    The experts of one token are looked up together (as the runtime reads a token's union at
    once): a token's own experts are never evicted to make room for each other.
    """
    cache: OrderedDict[int, None] = OrderedDict()
    hits = total = 0
    for row in trace:
        for e in dict.fromkeys(row.tolist()):  # unique, in order
            total += 1
            if e in cache:
                hits += 1
                cache.move_to_end(e)
            else:
                cache[e] = None
        while len(cache) > max(capacity, len(set(row.tolist()))):
            cache.popitem(last=False)
    return hits / total if total else 0.0


def routed_bytes_per_token(layers: dict[int, np.ndarray], manifest, padded: bool = True) -> float:
    """Mean bytes of expert blocks a token's routing reads when nothing is cached: per layer, the
    strides of its K experts (which differ between tiers of a tiered pack), summed over layers.
    ``padded=False`` counts the blocks without their alignment padding."""
    total = 0.0
    for layer, trace in layers.items():
        stride = np.zeros(manifest.num_experts)
        for x in manifest.expert_tiers(layer):
            stride[x.ids()] = x.stride if padded else x.block_bytes
        total += float(stride[trace].sum(-1).mean())
    return total


def lru_miss_bytes_per_token(layers: dict[int, np.ndarray], manifest, fraction: float) -> float:
    """Bytes a token reads from disk with a per-layer LRU cache holding ``fraction`` of each layer's
    expert bytes (blocks without padding), replaying the trace. Unlike a count-based LRU this weighs
    experts by size, so a tiered pack's wide hot experts take more of the cache than its narrow ones."""
    total = 0.0
    tokens = 0
    for layer, trace in layers.items():
        size = np.zeros(manifest.num_experts)
        for x in manifest.expert_tiers(layer):
            size[x.ids()] = x.block_bytes
        cap = fraction * size.sum()
        cache: OrderedDict[int, None] = OrderedDict()
        held = miss = 0.0
        for row in trace:
            want = list(dict.fromkeys(row.tolist()))
            for e in want:
                if e in cache:
                    cache.move_to_end(e)
                else:
                    miss += size[e]
                    cache[e] = None
                    held += size[e]
            while held > cap and len(cache) > len(want):
                victim, _ = cache.popitem(last=False)
                held -= size[victim]
        total += miss
        tokens = len(trace)
    return total / max(tokens, 1)
