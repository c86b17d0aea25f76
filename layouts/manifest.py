"""The pack manifest: schema, version and validation of ``manifest.json``.

A pack is a folder. ``manifest.json`` is written last, so its presence is what makes a folder a
pack; everything else a reader needs (files, offsets, strides, component layout, quantization,
checksums) is in it. Expert blocks of layer ``l`` sit at ``offset + e * stride`` in
``experts[l].file``; every offset and stride is a multiple of ``alignment``.

Version 2 adds per-expert tiers: a layer may have several entries (``tier`` 0, 1, ...), one file each,
every file uniform inside (one block layout, one stride) and holding the experts ``expert_ids`` in
block order. An expert is still one aligned block, read in one request; the tiers only give the
rarely-routed experts fewer bits. Version 1 packs (one entry per layer) read unchanged.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .errors import PackError

FORMAT_NAME = "moestream-pack"
# 2: per-expert tiers (see above); expert components carry a quantization ``mode`` (``affine`` or
# ``mxfp4``, uint8 E8M0 scales) and may include the projections' own ``bias`` vectors (gpt-oss).
# Version 1 packs (affine, no biases, one file per layer) read unchanged.
FORMAT_VERSION = 2
READ_VERSIONS = READABLE_VERSIONS = (1, 2)
EXPERT_FILE_VERSION = 1  # the expert file header did not change with the manifest's version 2
MANIFEST_NAME = "manifest.json"
DEFAULT_ALIGNMENT = 16384  # Apple SSD page
MIN_ALIGNMENT = 4096  # O_DIRECT needs at least the logical block size
CHECKSUM_ALGO = "xxh3_64"
COMPONENT_ALIGNMENT = 64  # components inside a block start on a cache line

DTYPE_BYTES = {"uint32": 4, "uint8": 1, "bfloat16": 2, "float16": 2, "float32": 4}
MODES = ("affine", "mxfp4")


@dataclass
class QuantSpec:
    """How one tensor kind is stored: ``bits`` 16 means unquantized (float ``dtype``)."""

    bits: int
    group_size: int | None = None
    mode: str = "affine"
    method: str = "rtn"

    @property
    def quantized(self) -> bool:
        return self.bits < 16


@dataclass
class Component:
    """One array inside an expert block, e.g. ``gate_proj.weight``, at ``offset`` within the block.

    ``mode`` is MLX's quantization mode: ``affine`` (codes, scales and biases) or ``mxfp4`` (FP4
    E2M1 codes, uint8 E8M0 scales per 32, no biases). ``X.bias`` components are the projection's
    own additive bias (gpt-oss), not quantization biases (``X.biases``).
    """

    name: str
    offset: int
    nbytes: int
    shape: list[int]
    dtype: str
    bits: int = 16
    group_size: int | None = None
    mode: str = "affine"


@dataclass
class ExpertLayer:
    """One MoE layer's expert file."""

    layer: int
    file: str
    offset: int
    stride: int
    block_bytes: int
    num_experts: int
    file_size: int
    components: list[Component]
    checksums: list[str]
    tier: int = 0
    expert_ids: list[int] | None = None  # the model's expert ids in block order; None: 0..num_experts-1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExpertLayer":
        return cls(**{**d, "components": [Component(**c) for c in d["components"]]})

    def expert_offset(self, expert: int) -> int:
        """Offset of the block at position ``expert`` of this file (a local index for tiers)."""
        return self.offset + expert * self.stride

    def ids(self) -> list[int]:
        return list(range(self.num_experts)) if self.expert_ids is None else list(self.expert_ids)

    @property
    def bits(self) -> tuple[int, int]:
        """(gate/up bits, down bits); 16 for unquantized."""
        return self.component("gate_proj.weight").bits, self.component("down_proj.weight").bits

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)


@dataclass
class ResidentTensor:
    """A non-expert tensor, named as mlx-lm's model expects after its sanitize."""

    file: str
    shape: list[int]
    dtype: str
    bits: int = 16
    group_size: int | None = None


@dataclass
class ResidentFile:
    file: str
    size: int
    checksum: str


@dataclass
class Manifest:
    """Everything a reader needs about a pack. Field names are the JSON keys."""

    model_type: str
    config: dict[str, Any]
    quantization: dict[str, Any]
    experts: list[ExpertLayer]
    resident_files: list[ResidentFile]
    resident_tensors: dict[str, ResidentTensor]
    num_experts: int
    top_k: int
    alignment: int = DEFAULT_ALIGNMENT
    source: dict[str, Any] = field(default_factory=dict)
    extra_files: list[str] = field(default_factory=list)
    synthetic: bool = False
    created_by: str = ""
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    checksum_algo: str = CHECKSUM_ALGO

    # -- derived figures -------------------------------------------------------------------------
    def expert_layer(self, layer: int) -> ExpertLayer:
        """The layer's first (or only) expert file: shapes, which every tier shares."""
        return self.expert_tiers(layer)[0]

    def expert_tiers(self, layer: int) -> list[ExpertLayer]:
        """The layer's expert files, by tier (one for packs without tiers)."""
        xs = sorted((x for x in self.experts if x.layer == layer), key=lambda x: x.tier)
        if not xs:
            raise PackError(f"{MANIFEST_NAME}: no expert file for layer {layer}")
        return xs

    def moe_layers(self) -> list[int]:
        return sorted({x.layer for x in self.experts})

    def locate(self, layer: int, expert: int) -> tuple[ExpertLayer, int]:
        """The file holding ``expert`` of ``layer`` and the expert's position in it."""
        for x in self.expert_tiers(layer):
            if x.expert_ids is None:
                if 0 <= expert < x.num_experts:
                    return x, expert
            elif expert in x.expert_ids:
                return x, x.expert_ids.index(expert)
        raise PackError(f"{MANIFEST_NAME}: layer {layer} has no expert {expert}")

    @property
    def tiered(self) -> bool:
        return any(x.expert_ids is not None for x in self.experts)

    def expert_bytes_per_token(self, top_k: int | None = None) -> int:
        """Bytes read from disk per token when every routed expert misses the cache (with tiers:
        assuming uniform routing; the runtime's counters give the measured figure)."""
        k = self.top_k if top_k is None else top_k
        return round(sum(k * x.stride * x.num_experts / self.num_experts for x in self.experts))

    def expert_bits_per_weight(self) -> float:
        """Stored bits per expert weight, averaged over every expert of every layer (padding excluded)."""
        params = bytes_ = 0
        for x in self.experts:
            g, d = x.component("gate_proj.weight"), x.component("down_proj.weight")
            rows_i, rows_h = g.shape[0], d.shape[0]
            params += x.num_experts * 3 * rows_i * rows_h
            bytes_ += x.num_experts * x.block_bytes
        return 8 * bytes_ / max(params, 1)

    def resident_bytes(self) -> int:
        return sum(f.size for f in self.resident_files)

    # -- (de)serialization -----------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = MANIFEST_NAME) -> "Manifest":
        if d.get("format") != FORMAT_NAME:
            raise PackError(f"{where}: not a moestream pack manifest (format={d.get('format')!r})")
        if d.get("version") not in READ_VERSIONS:
            raise PackError(
                f"{where}: unsupported pack version {d.get('version')!r} "
                f"(this moestream reads versions {', '.join(map(str, READ_VERSIONS))})"
            )
        try:
            d = dict(d)
            d["experts"] = [ExpertLayer.from_dict(x) for x in d["experts"]]
            d["resident_files"] = [ResidentFile(**f) for f in d["resident_files"]]
            d["resident_tensors"] = {k: ResidentTensor(**v) for k, v in d["resident_tensors"].items()}
            m = cls(**d)
        except (TypeError, KeyError) as e:
            raise PackError(f"{where}: malformed manifest ({e})") from None
        m.check_paths(where)  # first: the layout checks use the names
        m.check_layout(where)
        return m

    @classmethod
    def load(cls, pack: str | os.PathLike) -> "Manifest":
        path = Path(pack) / MANIFEST_NAME
        if not path.is_file():
            raise PackError(f"{path}: missing: {Path(pack)} is not a pack (or its conversion did not finish)")
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PackError(f"{path}: unreadable manifest ({e})") from None
        if not isinstance(d, dict):
            raise PackError(f"{path}: malformed manifest (not a JSON object)")
        m = cls.from_dict(d, str(path))
        m.check_paths(str(path), Path(pack))
        return m

    def save(self, pack: str | os.PathLike) -> None:
        """Write atomically: the manifest's appearance is what marks a pack as complete."""
        path = Path(pack) / MANIFEST_NAME
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "w") as f:
            f.write(self.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # -- validation ------------------------------------------------------------------------------
    def check_layout(self, where: str = MANIFEST_NAME) -> None:
        """Internal consistency: alignment, offsets, strides, components within blocks."""
        a = self.alignment
        if a < MIN_ALIGNMENT or a & (a - 1):
            raise PackError(f"{where}: alignment {a} is not a power of two >= {MIN_ALIGNMENT}")
        if self.checksum_algo != CHECKSUM_ALGO:
            raise PackError(f"{where}: unknown checksum algorithm {self.checksum_algo!r}")
        for x in self.experts:
            f = f"{where}: layer {x.layer} ({x.file})"
            if x.offset % a or x.stride % a:
                raise PackError(f"{f}: offset {x.offset} or stride {x.stride} not a multiple of alignment {a}")
            if x.block_bytes > x.stride:
                raise PackError(f"{f}: block of {x.block_bytes} bytes exceeds stride {x.stride}")
            if x.file_size != x.offset + x.num_experts * x.stride:
                raise PackError(f"{f}: file_size {x.file_size} != offset + experts * stride")
            if len(x.checksums) != x.num_experts:
                raise PackError(f"{f}: {len(x.checksums)} checksums for {x.num_experts} experts")
            if x.expert_ids is not None and len(x.expert_ids) != x.num_experts:
                raise PackError(f"{f}: {len(x.expert_ids)} expert ids for {x.num_experts} experts")
            for c in x.components:
                if c.offset < 0 or c.offset + c.nbytes > x.block_bytes:
                    raise PackError(f"{f}: component {c.name} lies past the end of the block")
                if c.mode not in MODES:
                    raise PackError(f"{f}: component {c.name}: unknown quantization mode {c.mode!r}")
                n = DTYPE_BYTES.get(c.dtype)
                if n is None or n * _prod(c.shape) != c.nbytes:
                    raise PackError(f"{f}: component {c.name}: {c.nbytes} bytes for {c.dtype}{c.shape}")
        for layer in {x.layer for x in self.experts}:
            ids = sorted(e for x in self.experts if x.layer == layer for e in x.ids())
            if ids != list(range(self.num_experts)):
                raise PackError(
                    f"{where}: layer {layer}'s expert files do not hold experts 0..{self.num_experts - 1} exactly once"
                )
        names = {r.file for r in self.resident_files}
        for k, t in self.resident_tensors.items():
            if t.file not in names:
                raise PackError(f"{where}: resident tensor {k} names unknown file {t.file}")

    def named_files(self) -> list[tuple[str, str]]:
        """Every path the manifest names, as (what it is, path relative to the pack folder)."""
        return (
            [("expert file", x.file) for x in self.experts]
            + [("resident file", r.file) for r in self.resident_files]
            + [(f"resident tensor {k}'s file", t.file) for k, t in self.resident_tensors.items()]
            + [("extra file", name) for name in self.extra_files]
        )

    def check_paths(self, where: str = MANIFEST_NAME, root: str | os.PathLike | None = None) -> None:
        """Every named file lies inside the pack folder: packs are shared and downloaded, and a manifest
        naming ``/etc/passwd`` or ``../../x`` must not make a reader open it.

        Without ``root`` only the names are checked (relative, no ``..``); with it each name is also
        resolved (symlinks followed) and must stay under ``root`` resolved.
        """
        base = None
        if root is not None:
            try:
                base = Path(root).resolve()
            except (OSError, RuntimeError) as e:
                raise PackError(f"{where}: cannot resolve the pack folder {root} ({e})") from None
        for kind, name in self.named_files():
            bad = f"{where}: {kind} {name!r}"
            if not isinstance(name, str) or not name or "\0" in name:
                raise PackError(f"{bad}: not a file name")
            # Windows forms too (``C:``, ``\\x``): a pack may be unpacked or read on another system.
            if PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor:
                raise PackError(f"{bad}: absolute path (pack files must be named relative to the pack folder)")
            if ".." in PureWindowsPath(name).parts:
                raise PackError(f'{bad}: leaves the pack folder ("..")')
            if base is None:
                continue
            try:
                target = (base / name).resolve()
            except (OSError, RuntimeError) as e:  # a symlink loop
                raise PackError(f"{bad}: cannot resolve ({e})") from None
            if not target.is_relative_to(base):
                raise PackError(f"{bad}: resolves to {str(target)!r}, outside the pack folder (through a symlink)")


def _prod(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
