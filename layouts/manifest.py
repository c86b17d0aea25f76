"""The pack manifest: schema, version and validation of ``manifest.json``.

A pack is a folder. ``manifest.json`` is written last, so its presence is what makes a folder a
pack; everything else a reader needs (files, offsets, strides, component layout, quantization,
checksums) is in it. Expert blocks of layer ``l`` sit at ``offset + e * stride`` in
``experts[l].file``; every offset and stride is a multiple of ``alignment``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import PackError

FORMAT_NAME = "moestream-pack"
# 2: expert components carry a quantization ``mode`` (``affine`` or ``mxfp4``, uint8 E8M0 scales) and
# may include the projections' own ``bias`` vectors (gpt-oss). Version 1 packs (affine, no biases) read
# unchanged: a component without ``mode`` is affine.
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExpertLayer":
        return cls(**{**d, "components": [Component(**c) for c in d["components"]]})

    def expert_offset(self, expert: int) -> int:
        return self.offset + expert * self.stride

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
        for x in self.experts:
            if x.layer == layer:
                return x
        raise PackError(f"{MANIFEST_NAME}: no expert file for layer {layer}")

    def expert_bytes_per_token(self, top_k: int | None = None) -> int:
        """Bytes read from disk per token when every routed expert misses the cache."""
        k = self.top_k if top_k is None else top_k
        return sum(k * x.stride for x in self.experts)

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
            raise PackError(f"{where}: unsupported pack version {d.get('version')!r} "
                            f"(this moestream reads versions {', '.join(map(str, READ_VERSIONS))})")
        try:
            d = dict(d)
            d["experts"] = [ExpertLayer.from_dict(x) for x in d["experts"]]
            d["resident_files"] = [ResidentFile(**f) for f in d["resident_files"]]
            d["resident_tensors"] = {k: ResidentTensor(**v) for k, v in d["resident_tensors"].items()}
            m = cls(**d)
        except (TypeError, KeyError) as e:
            raise PackError(f"{where}: malformed manifest ({e})") from None
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
        return cls.from_dict(d, str(path))

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
            for c in x.components:
                if c.offset < 0 or c.offset + c.nbytes > x.block_bytes:
                    raise PackError(f"{f}: component {c.name} lies past the end of the block")
                if c.mode not in MODES:
                    raise PackError(f"{f}: component {c.name}: unknown quantization mode {c.mode!r}")
                n = DTYPE_BYTES.get(c.dtype)
                if n is None or n * _prod(c.shape) != c.nbytes:
                    raise PackError(f"{f}: component {c.name}: {c.nbytes} bytes for {c.dtype}{c.shape}")
        names = {r.file for r in self.resident_files}
        for k, t in self.resident_tensors.items():
            if t.file not in names:
                raise PackError(f"{where}: resident tensor {k} names unknown file {t.file}")


def _prod(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
