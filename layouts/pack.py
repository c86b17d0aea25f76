"""Reading a pack: validate everything before use, then hand out expert blocks and resident files.

:func:`open_pack` checks the manifest's version and internal layout, that every file exists with
exactly the size the manifest gives, and that each expert file's header agrees; :meth:`Pack.verify`
additionally re-hashes every expert block and resident file. Problems raise :class:`PackError` with
one line naming the file, layer and expert.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import xxhash

from .errors import PackError
from .expert_file import HEADER, check_header, checksum
from .fileio import preadv
from .manifest import ExpertLayer, Manifest

NUMPY_STORAGE = {
    "uint32": np.uint32,
    "uint8": np.uint8,
    "bfloat16": np.uint16,
    "float16": np.float16,
    "float32": np.float32,
}
CHUNK = 16 << 20


def file_checksum(path: str | os.PathLike) -> str:
    """xxh3-64 of a whole file, read in 16 MiB chunks."""
    h = xxhash.xxh3_64()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


class Pack:
    """An opened, validated pack. Use :func:`open_pack`."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root, self.manifest = root, manifest
        self._fds: dict[str, int] = {}

    # -- expert blocks ---------------------------------------------------------------------------
    def _fd(self, x: ExpertLayer) -> int:
        fd = self._fds.get(x.file)
        if fd is None:
            fd = self._fds[x.file] = os.open(self.root / x.file, os.O_RDONLY)
        return fd

    def read_expert(self, layer: int, expert: int, out: np.ndarray | None = None) -> np.ndarray:
        """Expert ``expert`` of ``layer`` as its file's ``block_bytes`` raw bytes, in one positioned read."""
        if not 0 <= expert < self.manifest.num_experts:
            raise PackError(
                f"{self.manifest.expert_layer(layer).file}: layer {layer} has no expert {expert} "
                f"({self.manifest.num_experts} experts)"
            )
        x, j = self.manifest.locate(layer, expert)
        buf = np.empty(x.block_bytes, np.uint8) if out is None or out.nbytes < x.block_bytes else out
        got = preadv(self._fd(x), [memoryview(buf)[: x.block_bytes]], x.expert_offset(j))
        if got != x.block_bytes:
            raise PackError(f"{x.file}: layer {layer} expert {expert}: short read ({got} of {x.block_bytes} bytes)")
        return buf

    def expert_arrays(self, layer: int, expert: int, block: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Views of one expert's components (bf16 as raw uint16), without copying the block."""
        x, _ = self.manifest.locate(layer, expert)
        block = self.read_expert(layer, expert) if block is None else block
        return component_views(x, block)

    # -- checks ----------------------------------------------------------------------------------
    def verify(self, progress: Callable[[int], None] | None = None) -> None:
        """Re-hash every expert block and resident file; raise at the first mismatch.

        Args:
            progress: called with the number of bytes just checked (for a progress bar).
        """
        for x in self.manifest.experts:
            _verify_blocks(self._fd(x), x, progress)
        for f in self.manifest.resident_files:
            if file_checksum(self.root / f.file) != f.checksum:
                raise PackError(f"{f.file}: checksum mismatch (corrupt resident file)")
            if progress:
                progress(f.size)

    def total_bytes(self) -> int:
        return sum(x.file_size for x in self.manifest.experts) + self.manifest.resident_bytes()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "Pack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _verify_blocks(fd: int, x: ExpertLayer, progress: Callable[[int], None] | None = None) -> None:
    buf = np.empty(x.stride, np.uint8)
    for e in range(x.num_experts):
        got = preadv(fd, [memoryview(buf)], x.expert_offset(e))
        if got != x.stride:
            raise PackError(f"{x.file}: layer {x.layer} expert {e}: short read ({got} of {x.stride} bytes)")
        if checksum(buf) != x.checksums[e]:
            raise PackError(f"{x.file}: layer {x.layer} expert {e}: checksum mismatch (corrupt block)")
        if progress:
            progress(x.stride)


def verify_expert_file(root: str | os.PathLike, x: ExpertLayer, alignment: int) -> str | None:
    """Check one expert file fully (size, header, every block's checksum).

    Returns:
        None when the file is intact, else the one-line problem.
    """
    path = Path(root) / x.file
    try:
        if not path.is_file() or path.stat().st_size != x.file_size:
            return f"{x.file}: missing or of the wrong size"
        fd = os.open(path, os.O_RDONLY)
        try:
            check_header(os.pread(fd, HEADER.size, 0), x, alignment, x.file)
            _verify_blocks(fd, x)
        finally:
            os.close(fd)
    except PackError as e:
        return str(e)
    return None


def component_views(x: ExpertLayer, block: np.ndarray) -> dict[str, np.ndarray]:
    """Numpy views of a block's components by name (``gate_proj.weight``, ...)."""
    out = {}
    for c in x.components:
        out[c.name] = block[c.offset : c.offset + c.nbytes].view(NUMPY_STORAGE[c.dtype]).reshape(c.shape)
    return out


def open_pack(path: str | os.PathLike) -> Pack:
    """Open and validate a pack folder (manifest, file presence and sizes, expert file headers).

    Example:
        >>> with open_pack("packs/qwen-4bit") as p:
        ...     w = p.expert_arrays(layer=0, expert=3)["gate_proj.weight"]
    """
    root = Path(path)
    if not root.is_dir():
        raise PackError(f"{root}: no such pack folder")
    m = Manifest.load(root)
    for x in m.experts:
        f = root / x.file
        where = f"{x.file} (layer {x.layer})"
        if not f.is_file():
            raise PackError(f"{where}: missing expert file")
        size = f.stat().st_size
        if size != x.file_size:
            last = max(0, (size - x.offset) // x.stride)
            raise PackError(
                f"{where}: {size} bytes, expected {x.file_size}: "
                f"expert {min(last, x.num_experts - 1)} and later lie past the end of the file"
            )
        with open(f, "rb") as fh:
            check_header(fh.read(HEADER.size), x, m.alignment, where)
    for r in m.resident_files:
        f = root / r.file
        if not f.is_file():
            raise PackError(f"{r.file}: missing resident file")
        if f.stat().st_size != r.size:
            raise PackError(f"{r.file}: {f.stat().st_size} bytes, expected {r.size}")
    for name in m.extra_files:
        if not (root / name).is_file():
            raise PackError(f"{name}: missing from the pack")
    return Pack(root, m)
