"""Expert layer files: the block layout inside one expert and the writer of one layer's file.

A layer file is a header page followed by ``num_experts`` blocks of ``stride`` bytes. Block ``e`` holds expert
``e``'s gate, up and down projections in MLX's quantized layout (affine: uint32 codes packed LSB-first, then
per-group scales and biases; mxfp4: FP4 codes and uint8 E8M0 scales), and for families whose experts have them
(gpt-oss), the projections' bias vectors, so the runtime hands the bytes straight to MLX's quantized kernels.
Gate and up arrays are adjacent (gate rows first), so ``gate_proj.X`` followed by ``up_proj.X`` is also the
fused gate-up array ``[2I, ...]``.

Header (little-endian, at byte 0, zero-padded to ``offset``)::

    magic b"MOESTRM\\0" | version u32 | layer u32 | num_experts u32 | alignment u32
    | offset u64 | stride u64 | block_bytes u64
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import numpy as np
import xxhash

from .errors import PackError
from .manifest import COMPONENT_ALIGNMENT, DTYPE_BYTES, EXPERT_FILE_VERSION, READ_VERSIONS, Component, ExpertLayer

MAGIC = b"MOESTRM\0"
HEADER = struct.Struct("<8sIIIIQQQ")


def round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def quantized_shapes(
    rows: int, cols: int, bits: int, group_size: int | None, mode: str = "affine"
) -> dict[str, tuple[list[int], str]]:
    """Shapes of the arrays MLX stores for one ``[rows, cols]`` weight (bits 16: the weight alone).

    ``mode="mxfp4"``: 4-bit E2M1 codes and one uint8 E8M0 scale per 32 inputs, no biases.
    """
    if bits >= 16:
        return {"weight": ([rows, cols], "")}
    if mode == "mxfp4":
        return {"weight": ([rows, cols * 4 // 32], "uint32"), "scales": ([rows, cols // 32], "uint8")}
    return {
        "weight": ([rows, cols * bits // 32], "uint32"),
        "scales": ([rows, cols // group_size], ""),
        "biases": ([rows, cols // group_size], ""),
    }


def expert_block_layout(
    hidden: int,
    intermediate: int,
    bits: int,
    group_gate_up: int | None,
    group_down: int | None,
    float_dtype: str,
    down_bits: int | None = None,
    mode: str = "affine",
    linear_bias: bool = False,
) -> tuple[list[Component], int]:
    """Components of one expert block, in file order, and the block's size in bytes.

    Args:
        hidden: model hidden size H (gate/up are ``[I, H]``, down is ``[H, I]``).
        intermediate: expert intermediate size I.
        bits: 2, 3, 4, 8, or 16 for unquantized ``float_dtype`` weights (gate and up; 4 for ``mxfp4``).
        group_gate_up, group_down: quantization group sizes along H and I (32 for ``mxfp4``).
        float_dtype: dtype of scales and biases (or of the weights at 16 bits).
        down_bits: bits of down_proj when they differ from gate/up's (a recipe's choice).
        mode: ``affine`` or ``mxfp4`` (MLX's quantization modes).
        linear_bias: the projections have their own bias vectors (``X.bias``: [I], [I], [H]).
    """
    if mode == "mxfp4":
        bits, down_bits, group_gate_up, group_down = 4, 4, 32, 32
    db = bits if down_bits is None else down_bits
    if (bits >= 16) != (db >= 16):
        raise ValueError("gate/up and down must be both quantized or both unquantized")
    mats = {
        "gate_proj": (intermediate, hidden, group_gate_up, bits),
        "up_proj": (intermediate, hidden, group_gate_up, bits),
        "down_proj": (hidden, intermediate, group_down, db),
    }
    parts = ("weight",) if bits >= 16 else ("weight", "scales") if mode == "mxfp4" else ("weight", "scales", "biases")
    # Gate and up adjacent per part, so gate_proj.X followed by up_proj.X is the fused [2I, ...] array.
    order = [(m, p) for p in parts for m in ("gate_proj", "up_proj")]
    order += [(m, "bias") for m in ("gate_proj", "up_proj") if linear_bias]
    order += [("down_proj", p) for p in parts] + ([("down_proj", "bias")] if linear_bias else [])
    comps, off = [], 0
    for mat, part in order:
        rows, cols, g, b = mats[mat]
        if part == "bias":
            shape, dtype = [rows], float_dtype
        else:
            shape, dtype = quantized_shapes(rows, cols, b, g, mode)[part]
        dtype = dtype or float_dtype
        nbytes = int(np.prod(shape)) * DTYPE_BYTES[dtype]
        off = round_up(off, COMPONENT_ALIGNMENT)
        if part == "bias":  # a plain float vector, whatever the weights' quantization
            comps.append(Component(f"{mat}.{part}", off, nbytes, shape, dtype))
        else:
            comps.append(
                Component(
                    f"{mat}.{part}", off, nbytes, shape, dtype, b, None if b >= 16 else g, mode if b < 16 else "affine"
                )
            )
        off += nbytes
    return comps, off


def checksum(block: np.ndarray | memoryview | bytes, pad: int = 0) -> str:
    """Checksum of one expert slot: the block bytes followed by ``pad`` zero bytes."""
    h = xxhash.xxh3_64()
    h.update(block)
    if pad:
        h.update(bytes(pad))
    return h.hexdigest()


def pack_header(layer: int, num_experts: int, alignment: int, offset: int, stride: int, block_bytes: int) -> bytes:
    return HEADER.pack(MAGIC, EXPERT_FILE_VERSION, layer, num_experts, alignment, offset, stride, block_bytes)


def check_header(raw: bytes, x: ExpertLayer, alignment: int, where: str) -> None:
    """Raise unless the file header agrees with its manifest entry."""
    if len(raw) < HEADER.size or raw[:8] != MAGIC:
        raise PackError(f"{where}: not a moestream expert file (bad magic)")
    _, ver, layer, n, a, off, stride, bb = HEADER.unpack(raw[: HEADER.size])
    if ver not in READ_VERSIONS:  # main writes 1 (unchanged header); the gptoss branch wrote 2
        raise PackError(f"{where}: expert file version {ver}, expected one of {READ_VERSIONS}")
    if (layer, n, a, off, stride, bb) != (x.layer, x.num_experts, alignment, x.offset, x.stride, x.block_bytes):
        raise PackError(f"{where}: header (layer {layer}, {n} experts, stride {stride}) disagrees with manifest")


class ExpertLayerWriter:
    """Writes one layer's expert file; experts may arrive in any order from several threads.

    States: ``new`` -> ``open`` (:meth:`open`: file preallocated, header written) -> ``closed``
    (:meth:`finish`: every expert written, fsynced, renamed into place) or ``aborted``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        layer: int,
        num_experts: int,
        components: list[Component],
        block_bytes: int,
        alignment: int,
        tier: int = 0,
        expert_ids: list[int] | None = None,
    ):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.layer, self.num_experts, self.alignment = layer, num_experts, alignment
        self.components, self.block_bytes = components, block_bytes
        self.tier, self.expert_ids = tier, expert_ids  # tiers: the model's ids of this file's blocks
        self.offset = round_up(HEADER.size, alignment)
        self.stride = round_up(block_bytes, alignment)
        self.file_size = self.offset + num_experts * self.stride
        self._checksums: list[str | None] = [None] * num_experts
        self._lock = threading.Lock()
        self._fd = -1
        self.state = "new"

    def open(self) -> None:
        if self.state != "new":
            raise RuntimeError(f"{self.path}: open() in state {self.state}")
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            # Reserve the whole file now so a full disk fails here, not halfway through a layer.
            os.posix_fallocate(self._fd, 0, self.file_size)
            header = pack_header(
                self.layer, self.num_experts, self.alignment, self.offset, self.stride, self.block_bytes
            )
            os.pwrite(self._fd, header, 0)
        except BaseException:
            self.abort()
            raise
        self.state = "open"

    def write_expert(self, expert: int, block: np.ndarray) -> str:
        """Write expert ``expert``'s block (``block_bytes`` bytes); returns its checksum."""
        if self.state != "open":
            raise RuntimeError(f"{self.path}: write_expert() in state {self.state}")
        if not 0 <= expert < self.num_experts:
            raise RuntimeError(f"{self.path}: expert {expert} out of range [0, {self.num_experts})")
        view = memoryview(np.ascontiguousarray(block).reshape(-1).view(np.uint8))
        if view.nbytes != self.block_bytes:
            raise RuntimeError(f"{self.path}: expert {expert}: {view.nbytes} bytes, block is {self.block_bytes}")
        with self._lock:
            if self._checksums[expert] is not None:
                raise RuntimeError(f"{self.path}: expert {expert} written twice")
            self._checksums[expert] = ""  # claimed
        pos, done = self.offset + expert * self.stride, 0
        while done < view.nbytes:
            done += os.pwrite(self._fd, view[done:], pos + done)
        digest = checksum(view, self.stride - self.block_bytes)
        self._checksums[expert] = digest
        return digest

    def finish(self, relname: str) -> ExpertLayer:
        """Check that every expert was written, make the file durable and give it its final name.

        Args:
            relname: the file's path relative to the pack, as the manifest records it.
        """
        if self.state != "open":
            raise RuntimeError(f"{self.path}: finish() in state {self.state}")
        missing = [e for e, c in enumerate(self._checksums) if not c]
        if missing:
            raise RuntimeError(f"{self.path}: experts {missing[:8]} of layer {self.layer} were never written")
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        os.replace(self.partial, self.path)
        self.state = "closed"
        return ExpertLayer(
            self.layer,
            relname,
            self.offset,
            self.stride,
            self.block_bytes,
            self.num_experts,
            self.file_size,
            self.components,
            list(self._checksums),
            self.tier,
            None if self.expert_ids is None else list(self.expert_ids),
        )

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.partial.unlink(missing_ok=True)
        self.state = "aborted"
