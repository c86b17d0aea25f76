"""Where streamed experts land: slabs of expert slots as MLX arrays (and numpy views of the same
memory), the memory-mapped layer of the naive baseline, and the key that says which expert files
can share slabs.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import mlx.core as mx
import numpy as np

from moestream.layouts import ExpertLayer
from moestream.runtime.store.hugepages import back_with_huge_pages

NP_STORAGE = {
    "uint32": np.uint32,
    "uint8": np.uint8,
    "bfloat16": np.uint16,
    "float16": np.float16,
    "float32": np.float32,
}


class Slab:
    """``capacity`` expert slots of one block layout, as one MLX array per component.

    ``numpy_only``: page-aligned numpy buffers and no MLX arrays, for callers that compute with the
    CPU kernels only; when every piece of a slot is page-aligned (:attr:`direct_ok`) the store can read
    into it with ``O_DIRECT`` (MLX's allocations are not page-aligned).
    """

    def __init__(self, x: ExpertLayer, capacity: int, numpy_only: bool = False):
        self.capacity = capacity
        self.layout = x  # an expert file of this block layout (bits and shapes of the slots)
        self.key = block_key(x)
        self.arrays: dict[str, mx.array] = {}
        self.numpy: dict[str, np.ndarray] = {}  # the same memory, for the CPU kernels
        self._buffers: list[mmap.mmap] = []
        views: dict[str, memoryview] = {}
        for c in x.components:
            if numpy_only:
                # anonymous: page-aligned, zeroed; private (Python's default is shared memory)
                buf = mmap.mmap(-1, max(1, capacity * c.nbytes), flags=_PRIVATE)
                # before the first touch, so faults take huge pages (no collapse: nothing to move yet)
                back_with_huge_pages(np.frombuffer(buf, np.uint8), collapse=False)
                self._buffers.append(buf)
                views[c.name] = memoryview(buf)[: capacity * c.nbytes]
            else:
                # Built from numpy so the storage is real (not a broadcast constant) and writable.
                a = mx.array(np.zeros((capacity, *c.shape), NP_STORAGE[c.dtype]))
                if c.dtype == "bfloat16":
                    a = a.view(mx.bfloat16)
                mx.eval(a)
                self.arrays[c.name] = a
                views[c.name] = memoryview(a).cast("B")
                back_with_huge_pages(np.frombuffer(views[c.name], np.uint8), collapse=False)
            self.numpy[c.name] = np.frombuffer(views[c.name], NP_STORAGE[c.dtype]).reshape(capacity, *c.shape)
        # Padding between and after components lands in a per-slot sink (it is part of the checksum).
        pad = x.stride - sum(c.nbytes for c in x.components)
        if numpy_only and pad:
            self._buffers += [mmap.mmap(-1, pad, flags=_PRIVATE) for _ in range(capacity)]
            self.sinks = self._buffers[-capacity:]
        else:
            self.sinks = [bytearray(pad) for _ in range(capacity)]
        self.iovecs: list[list[memoryview]] = []
        for s in range(capacity):
            vecs, pos, sink, used = [], 0, memoryview(self.sinks[s]), 0
            for c in sorted(x.components, key=lambda c: c.offset):
                if c.offset > pos:
                    vecs.append(sink[used : used + c.offset - pos])
                    used += c.offset - pos
                vecs.append(views[c.name][s * c.nbytes : (s + 1) * c.nbytes])
                pos = c.offset + c.nbytes
            if x.stride > pos:
                vecs.append(sink[used : used + x.stride - pos])
            self.iovecs.append(vecs)
        self.direct_ok = numpy_only and all(_aligned(v) for vecs in self.iovecs for v in vecs)
        self.pending: list[mx.array] = []  # lazy outputs that still read this slab
        self.inflight: list = []  # read-ahead reads into this slab that no caller waits for

    def prefault(self) -> None:
        """Touch every page of a ``numpy_only`` slab now (a read into a page not yet faulted in is slower)."""
        for buf in self._buffers:
            np.frombuffer(buf, np.uint8)[:: mmap.PAGESIZE] = 0

    def settle(self) -> None:
        """Evaluate every pending computation that reads this slab and finish the reads still writing
        into it, so its slots may be rewritten."""
        if self.pending:
            mx.eval(*self.pending)
            self.pending.clear()
        for f in self.inflight:
            f.exception()  # waits; an unneeded guess that failed (e.g. a bad block) is not this caller's error
        self.inflight.clear()


_PAGE = mmap.PAGESIZE
_PRIVATE = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
_libc = None


def _mincore():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc.mincore.restype = ctypes.c_int
    return _libc.mincore


def _aligned(v: memoryview) -> bool:
    return np.frombuffer(v, np.uint8).ctypes.data % _PAGE == 0 and v.nbytes % _PAGE == 0


class MappedLayer:
    """Every expert of one layer as numpy views into the memory-mapped file.

    Two uses. The naive baseline: nothing is read explicitly; the kernels touch the pages and page
    faults (with the kernel's readahead) load them, which is what llama.cpp does for weights beyond
    RAM. And the page-cache hits of ``--cache os-map`` on the CPU: an expert whose pages are all in the
    page cache (:meth:`resident`) is computed where it lies instead of being copied into a slab.
    Only the CPU kernels can compute from it (MLX arrays cannot wrap foreign memory without a copy).
    """

    def __init__(self, fd: int, x: ExpertLayer):
        self.layout, self.key = x, block_key(x)
        self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        self._bytes = np.frombuffer(self._mm, np.uint8)
        self._vec = np.empty(-(-x.stride // _PAGE) + 1, np.uint8)  # mincore's answer, a byte per page
        self.numpy: dict[str, np.ndarray] = {}
        for c in x.components:
            dt = np.dtype(NP_STORAGE[c.dtype])
            inner = np.empty(c.shape, dt).strides
            self.numpy[c.name] = np.ndarray(
                (x.num_experts, *c.shape),
                dt,
                buffer=self._mm,
                offset=x.expert_offset(0) + c.offset,
                strides=(x.stride, *inner),
            )
        self.pending: list = []

    def settle(self) -> None:
        pass

    def block(self, local: int) -> memoryview:
        """Expert ``local``'s whole block (its checksum covers padding too)."""
        off = self.layout.expert_offset(local)
        return memoryview(self._mm)[off : off + self.layout.stride]

    def resident(self, local: np.ndarray) -> np.ndarray:
        """Which of the experts ``local`` have every page of their block in the page cache now."""
        call, base = _mincore(), self._bytes.ctypes.data
        out = np.zeros(len(local), bool)
        for i, j in enumerate(np.asarray(local).tolist()):
            off = self.layout.expert_offset(j)
            start = off - off % _PAGE
            n = off + self.layout.stride - start
            if call(base + start, n, self._vec.ctypes.data) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            out[i] = bool(np.all(self._vec[: -(-n // _PAGE)] & 1))
        return out

    def unmap_pages(self) -> None:
        """Release this process's pages (the page cache can then drop them)."""
        self._mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self.numpy.clear()
        self._bytes = None
        try:
            self._mm.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with it
            pass


def block_key(x: ExpertLayer) -> tuple:
    """Files with equal keys share slabs: same stride, same components (names, places, bits)."""
    return (x.stride, tuple((c.name, c.offset, c.dtype, tuple(c.shape), c.bits, c.group_size) for c in x.components))
