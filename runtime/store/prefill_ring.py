"""Prefill's expert stream: a ring of expert slots that keeps the disk busy through a whole prompt.

A prompt chunk of T tokens routes to most of a layer's experts (T x k pairs over E experts: for
512 tokens at k = 4 over 512 experts, 98% of them), so prefill reads nearly every expert of every
layer. With the decode slabs those reads wait for the router, and the disk idles while the layer's
attention and projections run (about a third of a cold 512-token prefill where measured). The ring changes
two things:

- at each MoE layer's entry, before its attention, the layer's router applied to the layer's input
  guesses the experts the chunk will route to, and their reads start at once into the ring, most
  often-guessed first (:meth:`PrefillStream.guess`);
- once the real routing is known, :meth:`PrefillStream.fetch` drops the wrong guesses (cancelling
  reads not yet started), queues the missed experts, and hands experts to the caller as their reads
  land; a slot is reused as soon as its expert has been computed.

So reads run back to back, overlapping the resident compute and the experts' own compute. Only
for the CPU kernels (they compute eagerly from numpy views, so a slot is free once the caller
returns) and untiered layers of one block layout.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from typing import Callable, Iterator

import numpy as np

from moestream.runtime.store import system
from moestream.runtime.store.slabs import Slab

MIN_GROUP = 8  # experts handed over at once while reads lag (fewer, larger kernel launches)
MAX_GROUP = 32  # and at most: a full ring's slots come back while its experts are computed, not after


class PrefillStream:
    """``capacity`` page-aligned expert slots and the reads in flight into them.

    Args:
        layout: an expert file of the block layout the ring holds.
        capacity: slots.
        submit: ``submit(layer, expert, slab, slot) -> Future`` issues one expert's read.
        stats: the store's counters (``wasted`` counts the reads of wrong guesses).
    """

    def __init__(self, layout, capacity: int, submit: Callable[[int, int, Slab, int], Future], stats=None):
        self.slab = Slab(layout, capacity, numpy_only=True)
        self.capacity = capacity
        self._submit = submit
        self._stats = stats
        self._free: deque[int] = deque(range(capacity))
        self._held: dict[tuple[int, int], tuple[int, Future]] = {}  # (layer, expert) -> slot, read; issue order
        self._queue: deque[tuple[int, int]] = deque()  # waiting for a free slot
        self._dropped: list[tuple[int, Future]] = []  # wrong guesses whose reads are still running
        self.guessed = 0  # experts guessed (queued for reading before their layer's routing)
        self.guess_hits = 0  # routed experts a guess had read or started
        self._guesses: set[tuple[int, int]] = set()

    def guess(self, layer: int, experts: list[int]) -> None:
        """Start reading ``experts`` of ``layer`` (in this order) before its routing is known."""
        for e in experts:
            k = (layer, int(e))
            if k not in self._held and k not in self._guesses:
                self._queue.append(k)
                self._guesses.add(k)
                self.guessed += 1
        self._pump()

    def fetch(self, layer: int, experts: np.ndarray) -> Iterator[tuple[Slab, np.ndarray, np.ndarray]]:
        """Drop the wrong guesses and queue the missed experts now; the returned iterator yields
        (slab, experts, slots) groups until every one of ``experts`` has been handed over. The
        caller computes a group before asking for the next (its slots are then reused)."""
        need = set(np.asarray(experts).tolist())
        self._drop(lambda k: k[0] != layer or k[1] not in need)
        self.guess_hits += sum(1 for k in self._guesses if k[0] == layer and k[1] in need)
        self._guesses.clear()
        queued = set(self._queue)
        self._queue.extend(k for k in ((layer, e) for e in sorted(need)) if k not in self._held and k not in queued)
        self._pump()
        return self._groups({(layer, e) for e in need})

    def _groups(self, pending: set[tuple[int, int]]) -> Iterator[tuple[Slab, np.ndarray, np.ndarray]]:
        # Guesses for the next layer may be queued or held meanwhile: only ``pending`` is handed over.
        try:
            while pending:
                if not any(k in pending for k in self._held):
                    # the pending reads queue behind no guess (they were queued first), so only dropped
                    # reads can be holding the slots they wait for
                    if not self._dropped:
                        raise RuntimeError("prefill ring: no slot for a pending read")
                    self._dropped[0][1].exception()
                    self._pump()
                    continue
                group = self._ready(pending)
                try:
                    yield self.slab, np.array([e for _, e in group]), np.array([self._held[k][0] for k in group])
                finally:
                    for k in group:
                        self._free.append(self._held.pop(k)[0])
                        pending.discard(k)
                    self._pump()
            # The layer's wrong guesses that had started are long done by now; waiting for them here
            # keeps the counters of this fetch complete when it returns.
            for _, f in self._dropped:
                f.exception()
            self._pump()
        except BaseException:
            self._drop(lambda k: True)  # an error or an abandoned fetch: nothing here is wanted now
            raise

    def _ready(self, pending: set[tuple[int, int]]) -> list[tuple[int, int]]:
        """The pending experts whose reads are done, oldest first: at least one (waiting for the
        oldest), and while more are in flight, at least MIN_GROUP or all that are left; at most MAX_GROUP."""
        keys = [k for k in self._held if k in pending]
        self._held[keys[0]][1].result()  # re-raises a short read, I/O error or checksum mismatch
        want = min(MIN_GROUP, len(keys))
        done = [k for k in keys if self._held[k][1].done()]
        while len(done) < want:
            waiting = set(keys) - set(done)
            next(self._held[k][1] for k in keys if k in waiting).result()
            done = [k for k in keys if self._held[k][1].done()]
        done = done[:MAX_GROUP]
        for k in done:
            self._held[k][1].result()
        return done

    def _drop(self, unwanted: Callable[[tuple[int, int]], bool]) -> None:
        self._queue = deque(k for k in self._queue if not unwanted(k))
        for k in [k for k in self._held if unwanted(k)]:
            slot, f = self._held.pop(k)
            if f.cancel():  # not started: no read
                self._free.append(slot)
            else:
                self._dropped.append((slot, f))
                if self._stats is not None:
                    self._stats.wasted += 1

    def _pump(self) -> None:
        """Issue queued reads into free slots (slots of dropped reads come back once those finish)."""
        still = []
        for slot, f in self._dropped:
            (self._free.append(slot) if f.done() else still.append((slot, f)))
        self._dropped = still
        while self._free and self._queue:
            layer, e = self._queue.popleft()
            slot = self._free.popleft()
            self._held[layer, e] = (slot, self._submit(layer, e, self.slab, slot))

    def prefault(self) -> None:
        """Touch every page of the ring now. A read into a page not yet faulted in ran at about half
        speed (the kernel allocates and zeroes it inside the read; with a full page cache it
        reclaims first), so a first prefill pays that unless this ran before (bench's warm-up)."""
        self.slab.prefault()

    def close(self) -> None:
        """Drop what is queued and wait for the reads still writing into the ring."""
        self._drop(lambda k: True)
        for _, f in self._dropped:
            f.exception()
        self._dropped = []


def default_budget() -> int:
    """Bytes of ring by default: 4 GiB, at most an eighth of the machine's RAM (the ring should hold
    what the disk reads during one layer's resident compute on a 512-token chunk)."""
    return min(4 << 30, system.ram_bytes() // 8)
