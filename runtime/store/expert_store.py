"""The expert store: routed experts from a pack's layer files into the arrays the kernels read.

Each expert is one ``preadv`` of exactly ``stride`` bytes at its aligned offset, scattered straight
into per-component *slabs*: MLX arrays shaped ``[slots, ...]`` per component (codes, scales,
biases), so ``gather_qmm`` computes from the bytes where they landed, with no copy. A read's iovecs
are the slot's component views plus a sink for padding. Reads of one layer are issued together from a
thread pool (``os.preadv`` releases the GIL).

Cache policies (``--cache``):

- ``os``: plain reads; the OS page cache keeps what it can (what Flash-MoE found best on macOS).
- ``os-map`` (CPU kernels only): as ``os``, but an expert wholly in the page cache is computed from a
  read-only mapping of its file, without a copy; the rest are read as with ``os``. For packs that fit
  in RAM: the mapped pages then count in the process's RSS (they stay the kernel's to reclaim).
- ``none``: every read goes to the device: cold streaming. On the CPU kernels the slabs are
  page-aligned and read with ``O_DIRECT`` where the filesystem and block layout allow; otherwise
  each read is dropped from the page cache afterwards (``POSIX_FADV_DONTNEED``).
- ``lru:SIZE``: an in-process cache of SIZE bytes (shared equally by the MoE layers) on top of
  uncached reads: what a machine with that much RAM for experts would see.

A slab slot is rewritten only after any lazy computation that reads it has been evaluated.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import xxhash

from moestream.layouts import ExpertLayer, Pack, PackError
from moestream.runtime.options import cache_policy
from moestream.runtime.store import system
from moestream.runtime.store.lru import LruExperts
from moestream.runtime.store.prefill_ring import PrefillStream, default_budget
from moestream.runtime.store.slabs import MappedLayer, Slab, block_key
from moestream.runtime.store.stats import StoreStats, run_overlap

log = logging.getLogger(__name__)


@dataclass
class _ReadAhead:
    layer: int
    slab: Slab
    reads: dict  # expert -> (slot, future)


class ExpertStore:
    """Reads routed experts of a pack into slabs.

    Args:
        pack: an opened pack.
        cache: ``os``, ``none`` or ``lru:SIZE``.
        threads: reader threads (reads of one layer are in flight together).
        max_slots: experts held at once per slab in ``os``/``none`` mode (a larger union is processed
            in groups); default max(2 x top-k, 32), at most the expert count.
        trace: record (layer, offset, length) of every read in ``stats.log``.
        verify: check every read block against its manifest checksum (xxh3 runs an order of
            magnitude above a disk's speed, ``benchmarks/checksum_speed.py``), so a corrupt pack fails
            instead of computing garbage.
        cpu_only: the caller computes with the CPU kernels only (numpy views): with ``none``, slabs
            are page-aligned numpy buffers read with ``O_DIRECT`` where the filesystem allows (no
            copy through the page cache), else read buffered and dropped.
        prefill_buffer: bytes of the prefill ring (:mod:`~moestream.runtime.store.prefill_ring`; CPU kernels,
            ``os``/``none`` caches); default :func:`~moestream.runtime.store.prefill_ring.default_budget`,
            0 turns it off. Its pages, once touched, stay with the process (a reader buffer, like the
            slabs): faulting them in again for each prompt would halve its first reads' speed.
    """

    def __init__(
        self,
        pack: Pack,
        cache: str = "os",
        threads: int | None = None,
        max_slots: int | None = None,
        trace: bool = False,
        verify: bool = True,
        cpu_only: bool = False,
        prefill_buffer: int | None = None,
    ):
        self.pack = pack
        self.policy, self.cache_bytes = cache_policy(cache)
        self.verify = verify
        self.stats = StoreStats(log=[] if trace else None)
        self._pool = ThreadPoolExecutor(threads or min(16, 2 * system.cpu_count()), thread_name_prefix="reader")
        m = pack.manifest
        self._fds = {x.file: self._open(x) for x in m.experts}
        self._direct: dict[str, int] = {}  # O_DIRECT descriptors in use (none cache, CPU kernels)
        if self.policy == "none":
            # cold reads: on macOS the buffered descriptors bypass the cache (F_NOCACHE); on Linux
            # they are dropped after each read, or replaced by O_DIRECT ones below
            self._nocache = all([system.bypass_cache(fd) for fd in self._fds.values()])
        else:
            self._nocache = False
        if self.policy == "none" and cpu_only:
            for x in m.experts:
                fd = system.open_direct(self.pack.root / x.file)
                if fd is None:  # e.g. tmpfs, or macOS: buffered reads (dropped after use, or uncached)
                    for d in self._direct.values():
                        os.close(d)
                    self._direct = {}
                    break
                self._direct[x.file] = fd
        self._direct_fds = list(self._direct.values())  # all to close, also those dropped after EINVAL
        self._tiers = {layer: m.expert_tiers(layer) for layer in m.moe_layers()}
        # expert id -> (tier, position in its file), per layer
        self._where: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for layer, xs in self._tiers.items():
            tier, local = np.zeros(m.num_experts, np.int64), np.zeros(m.num_experts, np.int64)
            for t, x in enumerate(xs):
                tier[x.ids()], local[x.ids()] = t, np.arange(x.num_experts)
            self._where[layer] = (tier, local)
        self._lock = threading.Lock()
        self._ahead: _ReadAhead | None = None  # reads started for the next fetch (see read_ahead)
        n = m.num_experts
        self._mapped: dict[str, MappedLayer] = {}
        self._in_place = False  # os cache: compute page-cache hits where they lie (see compute_hits_in_place)
        self._verified: set[tuple[str, int]] = set()
        # os-map: blocks found wholly in the page cache, trusted until the process takes a major page
        # fault (see _page_cache_hits); per file, by position
        self._known = {x.file: np.zeros(x.num_experts, bool) for x in m.experts}
        self._faults = -1
        if self.policy.startswith("mmap"):
            self._mapped = {x.file: MappedLayer(self._fds[x.file], x) for x in m.experts}
        elif self.policy == "lru":
            self._lru = LruExperts(self._tiers, self.cache_bytes, m.top_k, self.stats)
        else:
            cap = min(n, max_slots or max(2 * m.top_k, 32))
            # Two slab sets per block layout, alternated between calls (double buffering).
            self._shared: dict[tuple, list[Slab]] = {}
            self._turn: dict[tuple, int] = {}
            for x in m.experts:
                key = block_key(x)
                if key not in self._shared:
                    aligned = bool(self._direct)
                    self._shared[key] = [Slab(x, cap, numpy_only=aligned), Slab(x, cap, numpy_only=aligned)]
                    self._turn[key] = 0
        self.prefill_stream: PrefillStream | None = None
        self._ring_layers: set[int] = set()
        if cpu_only and self.policy in ("os", "none") and prefill_buffer != 0:
            x = m.experts[0]
            budget = default_budget() if prefill_buffer is None else prefill_buffer
            self._ring_layers = {
                lay for lay, xs in self._tiers.items() if len(xs) == 1 and block_key(xs[0]) == block_key(x)
            }
            slots = min(budget // x.stride, n)
            if self._ring_layers and slots >= 1:
                self.prefill_stream = PrefillStream(x, slots, self._ring_read, self.stats)

    def _open(self, x: ExpertLayer) -> int:
        try:
            return os.open(self.pack.root / x.file, os.O_RDONLY)
        except OSError as e:
            raise PackError(f"{x.file} (layer {x.layer}): cannot open ({e.strerror})") from None

    def compute_hits_in_place(self) -> None:
        """``os-map`` cache, for callers that compute with the CPU kernels (they read numpy views): an
        expert whose block is wholly in the page cache is served from a read-only mapping of its
        file instead of being copied into a slab (the copy was a fifth of a warm decode where measured); the rest
        are read as before. A mapped block is checked against its checksum the first time it is
        used, unless this store read (and checked) it before."""
        if self.policy == "os-map" and not self._in_place:
            self._mapped = {x.file: MappedLayer(self._fds[x.file], x) for x in self.pack.manifest.experts}
            self._in_place = True

    def _page_cache_hits(self, layer: int, experts: np.ndarray) -> tuple[list, np.ndarray]:
        """(mapped groups of the experts wholly in the page cache, the experts left to read).

        A block found wholly in the page cache (``mincore``: a system call walking its ~400-1700
        pages, tens of microseconds a block here) is trusted to stay there until this process takes
        a major page fault: mapped pages leave the page cache only by reclaim, which unmaps them
        first, so a block that left is faulted back in by the kernels' next touch of it (the right
        bytes, read from the disk), and that fault makes every block checked again. One
        ``getrusage`` call a fetch instead of a ``mincore`` per block."""
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        if faults != self._faults:
            for known in self._known.values():
                known[:] = False
            self._faults = faults
        groups, left = [], []
        for t, part, local in self._by_tier(layer, experts):
            x = self._tiers[layer][t]
            mapped = self._mapped[x.file]
            known = self._known[x.file]
            hit = known[local]
            if not hit.all():
                ask = ~hit
                hit[ask] = mapped.resident(local[ask])
                known[local[hit]] = True
            if hit.any():
                todo = [j for j in local[hit].tolist() if (x.file, j) not in self._verified] if self.verify else []
                if todo:
                    list(self._pool.map(lambda j: self._check(x, j, [mapped.block(j)]), todo))  # raises if corrupt
                    self._verified.update((x.file, j) for j in todo)
                groups.append((mapped, part[hit], local[hit]))
                self.stats.page_hits += int(hit.sum())
            left.append(part[~hit])
        return groups, np.concatenate(left) if left else experts[:0]

    @property
    def direct_io(self) -> bool:
        """Whether ``none`` reads go to the slabs with ``O_DIRECT`` (every slab page-aligned)."""
        return bool(self._direct) and all(s.direct_ok for pair in getattr(self, "_shared", {}).values() for s in pair)

    @staticmethod
    def _what(x: ExpertLayer, local: int) -> str:
        return f"{x.file}: layer {x.layer} expert {x.ids()[local] if x.expert_ids else local}"

    def _check(self, x: ExpertLayer, local: int, pieces: list) -> None:
        """Raise if the block's bytes (its pieces in order) do not match its manifest checksum."""
        if not self.verify:
            return
        h = xxhash.xxh3_64()
        for v in pieces:
            h.update(v)
        if h.hexdigest() != x.checksums[local]:
            raise PackError(f"{self._what(x, local)}: checksum mismatch (corrupt block; run moestream verify)")

    # -- reads -----------------------------------------------------------------------------------
    def _read(self, x: ExpertLayer, local: int, slab: Slab, slot: int) -> None:
        """Block ``local`` of file ``x`` into ``slot`` of ``slab``: one aligned read of ``stride`` bytes."""
        off = x.offset + local * x.stride
        direct = slab.direct_ok and x.file in self._direct
        fd = self._direct[x.file] if direct else self._fds[x.file]
        try:
            got = system.preadv(fd, slab.iovecs[slot], off)
        except OSError as e:
            if not direct or e.errno != errno.EINVAL:
                raise
            # a filesystem that opens with O_DIRECT but refuses these reads: buffered from now on
            log.info("%s: O_DIRECT read refused (%s): buffered reads", x.file, e.strerror)
            self._direct.pop(x.file, None)
            direct, fd = False, self._fds[x.file]
            got = system.preadv(fd, slab.iovecs[slot], off)
        if got != x.stride:
            raise PackError(f"{self._what(x, local)}: short read ({got} of {x.stride} bytes)")
        self._check(x, local, slab.iovecs[slot])
        if self._in_place:  # the page cache now holds what was just checked: its mapped hits need no check
            self._verified.add((x.file, local))
        if self.policy == "none" and not direct and not self._nocache:
            system.drop_cached(fd, off, x.stride)
        with self._lock:
            self.stats.reads += 1
            self.stats.bytes_read += x.stride
            if self.stats.log is not None:
                self.stats.log.append((x.layer, off, x.stride))

    def _read_all(self, x: ExpertLayer, todo: list[tuple[int, int]], slab: Slab, overlap: list) -> None:
        futures = [self._pool.submit(self._read, x, j, slab, s) for j, s in todo]
        run_overlap(overlap)  # compute that needs no expert (the shared expert) runs while reads are in flight
        for f in futures:
            f.result()  # re-raises a short read or I/O error

    def _by_tier(self, layer: int, experts: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(tier, expert ids, their positions in the tier's file) for the tiers ``experts`` touch."""
        tier, local = self._where[layer]
        if len(self._tiers[layer]) == 1:
            return [(0, experts, local[experts])]
        t = tier[experts]
        return [(k, experts[t == k], local[experts[t == k]]) for k in np.unique(t).tolist()]

    # -- the interface the streamed MoE layer uses -------------------------------------------------
    def fetch(
        self, layer: int, experts: np.ndarray, overlap: list | None = None, many: bool = False
    ) -> Iterator[tuple[Slab, np.ndarray, np.ndarray]]:
        """Make ``experts`` (sorted, unique) available, in groups of (slab, experts, slots).

        ``overlap``: callables to call while the first reads are in flight.
        ``many``: a multi-token chunk (prefill): served by the prefill ring where there is one (the
        caller computes each group eagerly before asking for the next).

        Yields one group at a time (more than one only when the experts outnumber a slab's slots):
        its experts sit in the given slots of its slab. Before asking for the next group the caller
        appends the lazy outputs that read the slab to ``slab.pending``.
        """
        if not len(experts):  # nothing to read (a rank's empty share of a layer, expert parallel)
            run_overlap(overlap or [])
            return
        if self.policy == "lru":
            yield from self._lru.fetch(
                layer, self._by_tier(layer, experts), overlap if overlap is not None else [], self._read_all
            )
            return
        if self.policy.startswith("mmap"):
            run_overlap(overlap or [])
            self.stats.misses += len(experts)
            for t, part, local in self._by_tier(layer, experts):
                yield self._mapped[self._tiers[layer][t].file], part, local
            if self.policy == "mmap-none":  # after the caller computed from the pages
                self.drop_page_cache(layer)
            return
        overlap = overlap if overlap is not None else []
        ring = self.prefill_stream
        if ring is not None and many and layer in self._ring_layers:
            self.stats.misses += len(experts)
            groups = ring.fetch(layer, experts)
            run_overlap(overlap)
            yield from groups
            return
        ahead, self._ahead = self._ahead, None  # a read-ahead is good for the next fetch only
        in_place = []
        if self._in_place:
            in_place, experts = self._page_cache_hits(layer, experts)
            if not len(experts):  # all in the page cache: nothing to read
                if ahead is not None:
                    ahead.slab.inflight += [f for _, f in ahead.reads.values()]
                run_overlap(overlap)
                yield from in_place
                return
        groups = []  # (file, slab key, experts, positions), at most a slab's capacity each
        for t, part, local in self._by_tier(layer, experts):
            x = self._tiers[layer][t]
            key = block_key(x)
            cap = self._shared[key][0].capacity
            groups += [(x, key, part[g0 : g0 + cap], local[g0 : g0 + cap]) for g0 in range(0, len(part), cap)]

        def issue(group):
            x, key, part, local = group
            t = self._turn[key]
            self._turn[key] = 1 - t
            slab = self._shared[key][t]
            if self._ahead is not None and self._ahead.slab is slab:  # a guess made mid-fetch: dropped
                slab.inflight += [f for _, f in self._ahead.reads.values()]
                self._ahead = None
            slab.settle()
            slots = np.arange(len(part))
            futures = [self._pool.submit(self._read, x, j, slab, s) for j, s in zip(local.tolist(), slots.tolist())]
            self.stats.misses += len(part)
            return slab, part, slots, futures

        if ahead is not None:
            x, key, part, local = groups[0]
            if (
                ahead.layer == layer
                and len(groups) == 1
                and ahead.slab is self._shared[key][self._turn[key]]
                and len(part) + len(ahead.reads) <= ahead.slab.capacity
            ):
                nxt = self._issue_after_ahead(ahead, groups[0])
            else:  # a wrong layer or no room: its reads finish before the slab is written again
                ahead.slab.inflight += [f for _, f in ahead.reads.values()]
                nxt = issue(groups[0])
        else:
            nxt = issue(groups[0])
        # Double buffering: group g + 1 is read into the other slab while the caller computes group g.
        run_overlap(overlap)
        yield from in_place  # computed while the first reads are in flight
        for i in range(len(groups)):
            slab, part, slots, futures = nxt
            for f in futures:
                f.result()  # re-raises a short read, I/O error or checksum mismatch
            if i + 1 < len(groups):
                nxt = issue(groups[i + 1])
            yield slab, part, slots

    def _ring_read(self, layer: int, expert: int, slab: Slab, slot: int):
        return self._pool.submit(self._read, self._tiers[layer][0], int(self._where[layer][1][expert]), slab, slot)

    def prefill_guess(self, layer: int, experts: list[int]) -> None:
        """Start reading ``experts`` of ``layer`` into the prefill ring (a guess made at the layer's
        entry; see :class:`~moestream.runtime.store.prefill_ring.EntryGuess`)."""
        if self.prefill_stream is not None and layer in self._ring_layers:
            self.prefill_stream.guess(layer, experts)

    def read_ahead(self, layer: int, experts: np.ndarray) -> None:
        """Start reading ``experts`` of ``layer`` (a guess at its routing) into the slab its next fetch
        will use, so that fetch finds them read or in flight; only for ``os``/``none``, untiered layers.

        Called while the current layer computes; the guessed reads queue behind its own. Valid for
        the next :meth:`fetch` only; a guess that was wrong costs disk time, not correctness (its slots
        are neither used nor rewritten before the read is done).
        """
        if (
            self.policy not in ("os", "os-map", "none")
            or len(self._tiers.get(layer, ())) != 1
            or self._ahead is not None
        ):
            return
        x = self._tiers[layer][0]
        key = block_key(x)
        slab = self._shared[key][self._turn[key]]
        slab.settle()
        experts = np.asarray(experts)[: slab.capacity // 2].tolist()
        local = self._where[layer][1]
        reads = {e: (s, self._pool.submit(self._read, x, int(local[e]), slab, s)) for s, e in enumerate(experts)}
        self.stats.ahead += len(reads)
        self._ahead = _ReadAhead(layer, slab, reads)

    def _issue_after_ahead(self, ahead: _ReadAhead, group) -> tuple:
        """The one group of a fetch that a read-ahead prepared: guessed experts keep their slots (their
        reads are done or in flight), the rest are read into slots no guess occupies."""
        x, key, part, local = group
        self._turn[key] = 1 - self._turn[key]
        busy = {s for s, _ in ahead.reads.values()}
        free = (s for s in range(ahead.slab.capacity) if s not in busy)
        slots, futures = [], []
        for e, j in zip(part.tolist(), local.tolist()):
            if e in ahead.reads:
                s, f = ahead.reads.pop(e)
                self.stats.ahead_hits += 1
            else:
                s = next(free)
                f = self._pool.submit(self._read, x, j, ahead.slab, s)
            slots.append(s)
            futures.append(f)
        ahead.slab.inflight += [f for _, f in ahead.reads.values()]  # wrong guesses
        self.stats.misses += len(part)
        return ahead.slab, part, np.array(slots), futures

    def prefetch_all(self) -> None:
        """lru mode: read every expert of every layer into the cache (it must hold them all)."""
        if self.policy != "lru":
            raise ValueError("prefetch_all needs an lru cache")
        every = np.arange(self.pack.manifest.num_experts)
        self._lru.prefetch_all(lambda layer: self._by_tier(layer, every), self._read_all)

    def drop_page_cache(self, layer: int | None = None) -> None:
        """Drop the expert files (or one layer's) from the page cache, unmapping mapped pages first:
        the next read of any expert goes to the disk."""
        xs = self._tiers[layer] if layer is not None else [x for v in self._tiers.values() for x in v]
        for x in xs:
            self._known[x.file][:] = False
            if x.file in self._mapped:
                self._mapped[x.file].unmap_pages()
            system.drop_cached(self._fds[x.file])

    def close(self) -> None:
        if self.prefill_stream is not None:
            self.prefill_stream.close()  # waits for its reads
        self._pool.shutdown(wait=True)
        for mapped in self._mapped.values():
            mapped.close()
        for fd in [*self._fds.values(), *self._direct_fds]:
            os.close(fd)
        self._fds.clear()
        self._direct.clear()
