"""The expert store's ``lru:SIZE`` policy: an in-process cache of SIZE bytes of expert slots, shared
equally by the MoE layers, on top of uncached reads (what a machine with that much RAM for experts
would see). Hits are counted where the expert is already in its layer's slab; misses evict the
least recently used expert that the current group does not need.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from moestream.runtime.store.slabs import Slab
from moestream.runtime.store.stats import StoreStats, run_overlap

log = logging.getLogger(__name__)


@dataclass
class _LayerCache:
    slab: Slab
    slots: OrderedDict = field(default_factory=OrderedDict)  # expert -> slot, in LRU order


class LruExperts:
    """One slab per (layer, tier), sized from an equal share of ``cache_bytes`` per layer (a tiered
    layer splits its share by its files' sizes)."""

    def __init__(self, tiers: dict, cache_bytes: int, top_k: int, stats: StoreStats):
        self.stats = stats
        per_layer = cache_bytes // max(1, len(tiers))
        self._lru: dict[tuple[int, int], _LayerCache] = {}
        self._tiers = tiers
        for layer, xs in tiers.items():
            total = sum(x.num_experts * x.stride for x in xs)
            for t, x in enumerate(xs):
                slots = per_layer * x.num_experts // total
                self._lru[layer, t] = _LayerCache(Slab(x, max(1, min(x.num_experts, slots))))
        if any(sum(c.slab.capacity for (lay, _), c in self._lru.items() if lay == layer) < top_k for layer in tiers):
            log.warning("lru cache of %d bytes holds fewer than top-k experts per layer", cache_bytes)

    def fetch(self, layer: int, by_tier: list, overlap: list, read_all: Callable) -> Iterator[tuple]:
        """``by_tier``: (tier, expert ids, positions in the tier's file) as the store's ``_by_tier``
        gives them; ``read_all(file, [(position, slot)], slab, overlap)`` reads the misses."""
        for t, tier_part, tier_local in by_tier:
            lc = self._lru[layer, t]
            x = self._tiers[layer][t]
            cap = lc.slab.capacity
            for g0 in range(0, len(tier_part), cap):
                part = tier_part[g0 : g0 + cap].tolist()
                pos = dict(zip(part, tier_local[g0 : g0 + cap].tolist()))
                want = set(part)
                todo, slots = [], []
                used = set(lc.slots.values())  # once: inside the comprehension it was rebuilt per slot
                free = [s for s in range(cap) if s not in used]
                for e in part:
                    if e in lc.slots:
                        lc.slots.move_to_end(e)
                        self.stats.hits += 1
                    else:
                        if not free:  # evict the least recently used expert not needed by this group
                            victim = next(v for v in lc.slots if v not in want)
                            free.append(lc.slots.pop(victim))
                        slot = free.pop()
                        lc.slots[e] = slot
                        todo.append((pos[e], slot))
                        self.stats.misses += 1
                    slots.append(lc.slots[e])
                if todo:
                    lc.slab.settle()
                    read_all(x, todo, lc.slab, overlap)
                run_overlap(overlap)
                yield lc.slab, np.array(part), np.array(slots)
        run_overlap(overlap)

    def prefetch_all(self, by_tier_of: Callable[[int], list], read_all: Callable) -> None:
        """Read every expert of every layer into the cache (it must hold them all)."""
        for (layer, t), lc in self._lru.items():
            n = self._tiers[layer][t].num_experts
            if lc.slab.capacity < n:
                raise ValueError(
                    f"lru cache holds {lc.slab.capacity} of layer {layer}'s {n} experts "
                    f"(file {self._tiers[layer][t].file})"
                )
        for layer in self._tiers:
            for _ in self.fetch(layer, by_tier_of(layer), [], read_all):
                pass
