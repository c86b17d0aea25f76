"""Bounded reads and streaming writes of safetensors files.

The ``safetensors`` package loads whole tensors (or mmaps them, which makes every touched page count
in the process's RSS) and its numpy binding cannot represent bf16 or fp8. Conversion of a 400 GB
checkpoint needs neither: it reads one expert's rows at a time with ``os.pread`` into a private
buffer, and writes resident files whose tensors are produced chunk by chunk. This module implements
exactly that over the documented format (8-byte little-endian header length, JSON header, raw
little-endian data); files it writes load with ``safetensors`` and ``mx.load``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import SafetensorsError
from .fileio import preadv

DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
# Safetensors dtype -> numpy dtype of the raw storage (bf16 and fp8 are kept as raw bits).
STORAGE_NUMPY = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "F8_E4M3": np.uint8,
    "F8_E5M2": np.uint8,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along the first axis."""
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape[1:]:
            n *= d
        return n


class SafetensorsReader:
    """Validated header of a safetensors file plus bounded ``pread`` access to its tensors.

    Args:
        path: the file.

    Example:
        >>> with SafetensorsReader("model.safetensors") as f:
        ...     raw = f.read_rows("model.layers.0.mlp.experts.gate_up_proj", 3, 4)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise SafetensorsError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            self.size = os.fstat(self._fd).st_size
            self.header_bytes, self.metadata, self.tensors = self._parse()
        except BaseException:
            os.close(self._fd)
            raise

    def _parse(self) -> tuple[bytes, dict, dict[str, TensorInfo]]:
        if self.size < 8:
            raise SafetensorsError(f"{self.path}: truncated ({self.size} bytes, no header)")
        (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if n > MAX_HEADER or 8 + n > self.size:
            raise SafetensorsError(f"{self.path}: header length {n} exceeds file size {self.size}")
        raw = os.pread(self._fd, n, 8)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{self.path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        base = 8 + n
        tensors = {}
        for name, info in header.items():
            try:
                dtype, shape, (lo, hi) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: tensor {name}: malformed header entry") from None
            if dtype not in DTYPE_SIZES:
                raise SafetensorsError(f"{self.path}: tensor {name}: unsupported dtype {dtype}")
            expect = DTYPE_SIZES[dtype] * int(np.prod(shape, dtype=np.int64))
            if hi - lo != expect:
                raise SafetensorsError(
                    f"{self.path}: tensor {name}: {hi - lo} bytes for {dtype}{list(shape)}, expected {expect}"
                )
            if base + hi > self.size:
                raise SafetensorsError(
                    f"{self.path}: truncated: tensor {name} ends at byte {base + hi}, file has {self.size}"
                )
            tensors[name] = TensorInfo(name, dtype, shape, base + lo, hi - lo)
        return raw, meta, tensors

    def read_bytes(self, info: TensorInfo, start: int, nbytes: int, out: np.ndarray | None = None) -> np.ndarray:
        """Read ``nbytes`` at ``start`` (relative to the tensor) into ``out`` (uint8) or a new buffer."""
        buf = np.empty(nbytes, np.uint8) if out is None else out.reshape(-1).view(np.uint8)[:nbytes]
        view = memoryview(buf)
        done = 0
        while done < nbytes:
            got = preadv(self._fd, [view[done:]], info.begin + start + done)
            if got <= 0:
                raise SafetensorsError(f"{self.path}: tensor {info.name}: short read at byte {start + done}")
            done += got
        return buf

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` along the first axis, in the raw storage dtype (bf16 as uint16)."""
        info = self.tensors[name]
        rows = stop - start
        raw = self.read_bytes(info, start * info.row_bytes, rows * info.row_bytes)
        return raw.view(STORAGE_NUMPY[info.dtype]).reshape((rows,) + info.shape[1:])

    def read(self, name: str) -> np.ndarray:
        """The whole tensor in its raw storage dtype. Only for tensors known to be small."""
        info = self.tensors[name]
        if not info.shape:
            raw = self.read_bytes(info, 0, info.nbytes)
            return raw.view(STORAGE_NUMPY[info.dtype]).reshape(())
        return self.read_rows(name, 0, info.shape[0])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsWriter:
    """Streaming safetensors writer: declare every tensor, then write their bytes in order.

    States: ``declaring`` -> ``writing`` (after :meth:`begin`) -> ``done`` (after :meth:`finish`).
    Calls out of order raise ``RuntimeError``. The file is written to ``<path>.partial`` and renamed
    on :meth:`finish`, after a check that every declared byte was written.

    Example:
        >>> w = SafetensorsWriter(path); w.declare("a", "F32", (2, 3)); w.begin()
        >>> w.write("a", np.zeros((2, 3), np.float32)); w.finish()
    """

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.metadata = dict(metadata or {})
        self._entries: dict[str, tuple[str, tuple[int, ...], int]] = {}
        self._order: list[str] = []
        self._state = "declaring"
        self._f = None
        self._cur = 0  # index into _order of the tensor being written
        self._cur_written = 0

    def declare(self, name: str, dtype: str, shape: Iterable[int]) -> None:
        if self._state != "declaring":
            raise RuntimeError(f"{self.path}: declare() after begin()")
        if name in self._entries:
            raise RuntimeError(f"{self.path}: tensor {name} declared twice")
        shape = tuple(int(d) for d in shape)
        nbytes = DTYPE_SIZES[dtype] * int(np.prod(shape, dtype=np.int64))
        self._entries[name] = (dtype, shape, nbytes)
        self._order.append(name)

    def begin(self) -> None:
        """Write the header; tensors must then be written in declaration order."""
        if self._state != "declaring":
            raise RuntimeError(f"{self.path}: begin() called twice")
        header: dict = {"__metadata__": self.metadata} if self.metadata else {}
        off = 0
        for name in self._order:
            dtype, shape, nbytes = self._entries[name]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.partial, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._state = "writing"
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._cur < len(self._order) and self._entries[self._order[self._cur]][2] == 0:
            self._cur += 1

    def write(self, name: str, data: np.ndarray) -> None:
        """Append bytes of tensor ``name`` (the whole tensor, or its next rows)."""
        if self._state != "writing":
            raise RuntimeError(f"{self.path}: write() outside the writing state ({self._state})")
        if self._cur >= len(self._order) or self._order[self._cur] != name:
            want = self._order[self._cur] if self._cur < len(self._order) else "nothing"
            raise RuntimeError(f"{self.path}: wrote {name} but {want} is next")
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        nbytes = self._entries[name][2]
        if self._cur_written + raw.nbytes > nbytes:
            raise RuntimeError(f"{self.path}: tensor {name}: more bytes than declared ({nbytes})")
        self._f.write(memoryview(raw))
        self._cur_written += raw.nbytes
        if self._cur_written == nbytes:
            self._cur += 1
            self._cur_written = 0
            self._skip_empty()

    def finish(self) -> int:
        """Check completeness, fsync and rename into place. Returns the file size."""
        if self._state != "writing":
            raise RuntimeError(f"{self.path}: finish() before begin()")
        if self._cur < len(self._order):
            raise RuntimeError(f"{self.path}: tensor {self._order[self._cur]} not fully written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.partial, self.path)
        self._state = "done"
        return self.path.stat().st_size

    def abort(self) -> None:
        """Drop the partial file (after an error)."""
        if self._f is not None and not self._f.closed:
            self._f.close()
        self.partial.unlink(missing_ok=True)
        self._state = "done"
