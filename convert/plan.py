"""The conversion plan: every source tensor assigned to exactly one output, before anything is written.

Planning reads only headers. It decides, per MoE layer, where the experts come from and the block
layout; per resident tensor, its source, target file, bits and group size; and it fails, naming the
tensor, when a source tensor would be left over or an expected one is missing. ``--dry-run`` prints
this plan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from moestream.layouts import Component, expert_block_layout, round_up
from moestream.layouts.expert_file import HEADER

from .family import ExpertSource, MlxLmFamily
from .source import FLOAT_DTYPES, ConvertError, SourceCheckpoint

log = logging.getLogger(__name__)

FALLBACK_GROUP = 32
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class Options:
    """Conversion options (the CLI flags, by the same names)."""

    bits: int = 4
    group_size: int = 64
    method: str | None = None  # None: clip at 2, 3 and 8 bits; rtn (MLX's own bytes, fastest) at 4
    resident_bits: int | None = None  # None: as the experts
    dtype: str | None = None  # float type of scales/biases/unquantized tensors; None: the source's
    alignment: int = 16384
    keep_mtp: bool = False
    calibration: str | None = None  # a `moestream calibrate` file: importance-weighted clip everywhere

    def resolved_method(self) -> str:
        # At 8 bits clip cuts the trained fixture's mean KL from 0.0068 to 0.0039 (benchmarks/RESULTS.md).
        if self.method == "gptq" and not self.calibration:
            raise ConvertError("--method gptq needs --calibration STATS (from `moestream calibrate`)")
        if self.calibration:
            if self.method == "rtn":
                raise ConvertError("--calibration weights the clip search and GPTQ; it cannot be used with --method rtn")
            return self.method or "gptq"
        return self.method or ("clip" if self.bits in (2, 3, 8) else "rtn")


@dataclass
class ExpertLayerPlan:
    layer: int
    source: ExpertSource
    intermediate: int
    hidden: int
    group_gate_up: int | None
    group_down: int | None
    components: list[Component]
    block_bytes: int
    stride: int
    src_bytes: int
    file: str
    repack: bool = False  # mlx-quantized source at these bits and group sizes: blocks copied, not requantized
    mode: str = "affine"  # "mxfp4": the source's MXFP4 experts, copied (gpt-oss hub releases)
    linear_bias: bool = False  # the experts' projections have bias vectors (gpt-oss)

    @property
    def bits(self) -> int:
        """The experts' stored bits (``--bits``, or 4 for passed-through MXFP4)."""
        return next(c.bits for c in self.components if c.name == "gate_proj.weight")


@dataclass
class ResidentPlan:
    target: str
    source: str
    shape: tuple[int, ...]  # the target (mlx-lm) shape
    bits: int  # 16: stored as float
    group_size: int | None
    dtype: str  # float dtype of the stored tensor (or of scales/biases)
    src_bytes: int
    derived: bool = False  # computed from a whole source tensor by the family's transform
    repack: bool = False  # mlx-quantized source at these bits and group size: copied, not requantized


@dataclass
class ResidentFilePlan:
    file: str
    tensors: list[ResidentPlan] = field(default_factory=list)


@dataclass
class ConversionPlan:
    options: Options
    family: MlxLmFamily
    float_dtype: str
    hf_layout: bool
    experts: list[ExpertLayerPlan]
    resident_files: list[ResidentFilePlan]
    dropped: list[str]

    @property
    def expert_bytes(self) -> int:
        return sum(HEADER_PAGE(self.options.alignment) + x.source.num_experts * x.stride for x in self.experts)

    @property
    def resident_out_bytes(self) -> int:
        return sum(resident_out_bytes(t) for f in self.resident_files for t in f.tensors)

    @property
    def src_bytes(self) -> int:
        return sum(x.src_bytes for x in self.experts) + sum(t.src_bytes for f in self.resident_files for t in f.tensors)

    def bytes_per_token(self, top_k: int | None = None) -> int:
        k = self.family.top_k if top_k is None else top_k
        return sum(k * x.stride for x in self.experts)

    def summary(self) -> dict:
        """What ``--dry-run`` prints."""
        o = self.options
        return {
            "model_type": self.family.model_type, "bits": o.bits, "group_size": o.group_size,
            "expert_mode": self.experts[0].mode if self.experts else "affine",
            "method": o.resolved_method(), "resident_bits": o.resident_bits or o.bits,
            "float_dtype": self.float_dtype, "alignment": o.alignment,
            "moe_layers": len(self.experts), "num_experts": self.family.num_experts, "top_k": self.family.top_k,
            "expert_stride": self.experts[0].stride if self.experts else 0,
            "expert_block_bytes": self.experts[0].block_bytes if self.experts else 0,
            "expert_files_bytes": self.expert_bytes, "resident_bytes": self.resident_out_bytes,
            "bytes_per_token": self.bytes_per_token(), "source_bytes": self.src_bytes,
            "files": [x.file for x in self.experts] + [f.file for f in self.resident_files],
            "dropped_tensors": len(self.dropped),
        }


def HEADER_PAGE(alignment: int) -> int:
    return round_up(HEADER.size, alignment)


def resident_out_bytes(t: ResidentPlan) -> int:
    n = int(np.prod(t.shape))
    if t.bits >= 16:
        return n * BYTES[t.dtype]
    groups = n // t.group_size
    return n * t.bits // 8 + 2 * groups * BYTES[t.dtype]


def _group_for(cols: int, g: int) -> int | None:
    if cols % g == 0:
        return g
    if cols % FALLBACK_GROUP == 0:
        return FALLBACK_GROUP
    return None


def resident_file_for(target: str) -> str:
    """Residents are grouped per layer so no single file (or write) grows with the model."""
    if target.startswith("mtp."):
        return "resident/mtp.safetensors"
    parts = target.split(".layers.")
    if len(parts) == 2 and parts[1].split(".")[0].isdigit():
        return f"resident/layer-{int(parts[1].split('.')[0]):03d}.safetensors"
    return "resident/model.safetensors"


def build_plan(src: SourceCheckpoint, family: MlxLmFamily, options: Options) -> ConversionPlan:
    """Assign every source tensor; raise :class:`ConvertError` naming any leftover or missing one."""
    o = options
    if o.bits not in (2, 3, 4, 8, 16):
        raise ConvertError(f"--bits {o.bits}: supported are 2, 3, 4, 8 and 16 (unquantized)")
    if o.group_size not in (32, 64, 128):
        raise ConvertError(f"--group-size {o.group_size}: supported are 32, 64 and 128")
    if o.alignment < 4096 or o.alignment & (o.alignment - 1):
        raise ConvertError(f"--alignment {o.alignment}: must be a power of two >= 4096 (O_DIRECT)")
    rbits = o.resident_bits or o.bits
    if rbits not in (2, 3, 4, 8, 16):
        raise ConvertError(f"--resident-bits {rbits}: supported are 2, 3, 4, 8 and 16")
    float_dtype = o.dtype or src.float_dtype()
    if float_dtype not in BYTES:
        raise ConvertError(f"--dtype {float_dtype}: supported are bfloat16, float16 and float32")

    dropped, by_target = [], {}
    for name in sorted(src.names):
        if family.dropped(name, o.keep_mtp):
            dropped.append(name)
        elif name.endswith("weight_scale_inv"):
            continue  # consumed with its fp8 weight
        elif name.endswith((".scales", ".biases")) and _quantized_weight(src, name):
            continue  # consumed with its mlx-quantized weight
        else:
            by_target[family.target_name(name)] = name
    consumed: set[str] = set()

    def consume(name: str, raw: bool = False) -> None:
        if name in consumed:
            raise ConvertError(f"{src.file_of(name)}: tensor {name} would be consumed twice")
        dtype = src.info(name).dtype
        if dtype not in FLOAT_DTYPES and not raw and not src.quantized(name):
            raise ConvertError(f"{src.file_of(name)}: tensor {name} has dtype {dtype}; "
                               f"expected one of {', '.join(FLOAT_DTYPES)}")
        consumed.add(name)
        for side in (name + "_scale_inv", name[:-len("weight")] + "scales", name[:-len("weight")] + "biases"):
            if side in src.where and (side.endswith("_scale_inv") or dtype == "U32"):
                consumed.add(side)

    experts = []
    for layer in family.moe_layers():
        es = family.expert_source(layer, by_target)
        i, h = family.expert_shape(layer)
        if es.reader is not None:
            es.reader.check(src, es.num_experts, layer)
        else:
            _check_expert_shapes(src, es, i, h, layer)
        mxfp4 = es.reader is not None and es.reader.mxfp4
        for n in es.consumed():
            consume(n, raw=mxfp4)  # MXFP4 blocks and scales are uint8 (the reader checked them)
        bias = es.reader is not None
        if mxfp4:
            log.info("layer %d: MXFP4 experts passed through (no requantization; --bits applies to residents)",
                     layer)
            comps, block = expert_block_layout(h, i, 4, 32, 32, float_dtype, "mxfp4", bias)
            experts.append(ExpertLayerPlan(layer, es, i, h, 32, 32, comps, block, round_up(block, o.alignment),
                                           sum(src.info(n).nbytes for n in es.names.values()),
                                           f"experts/layer-{layer:03d}.bin", mode="mxfp4", linear_bias=bias))
            continue
        gu, gd = (None, None) if o.bits >= 16 else (_group_for(h, o.group_size), _group_for(i, o.group_size))
        if o.bits < 16 and (gu is None or gd is None):
            bad = "gate_proj/up_proj (hidden %d)" % h if gu is None else "down_proj (intermediate %d)" % i
            raise ConvertError(f"layer {layer} experts {bad}: not divisible by group size {o.group_size} or 32")
        if o.bits < 16 and (gu != o.group_size or gd != o.group_size):
            log.warning("layer %d: experts use group size %s/%s (fallback)", layer, gu, gd)
        comps, block = expert_block_layout(h, i, o.bits, gu, gd, float_dtype, linear_bias=bias)
        src_bytes = sum(src.info(n).nbytes for n in es.consumed())
        if es.layout != "per_expert":
            src_bytes = sum(src.info(n).nbytes for n in es.names.values())
        repack = es.layout == "stacked" and all(
            src.quantized(es.names[p]) == (o.bits, gd if p == "down_proj" else gu) for p in es.names)
        if repack:
            log.info("layer %d: experts already %d-bit, group %s: repacked without requantizing", layer, o.bits, gu)
        experts.append(ExpertLayerPlan(layer, es, i, h, gu, gd, comps, block, round_up(block, o.alignment),
                                       src_bytes, f"experts/layer-{layer:03d}.bin", repack, linear_bias=bias))

    files: dict[str, ResidentFilePlan] = {}
    expected = dict(family.resident_params)
    if o.keep_mtp:
        for name in sorted(src.names):
            if name.startswith("mtp.") and not name.endswith("weight_scale_inv"):
                expected[name] = (src.info(name).shape, None)
    for target, (shape, _) in expected.items():
        source = by_target.get(target)
        derived = source is None and by_target.get(family.derived_source(target) or "") is not None
        if derived:
            source = by_target[family.derived_source(target)]
        if source is None:
            raise ConvertError(f"checkpoint: missing tensor {family.source_name_hint(target)} "
                               f"(expected by {family.model_type}, shape {list(shape)})")
        if not (derived and source in consumed):  # one source may feed several derived targets
            consume(source)
        sshape = src.shape(source)
        if not derived and int(np.prod(sshape)) != int(np.prod(shape)):
            raise ConvertError(f"{src.file_of(source)}: tensor {source} has shape {list(sshape)}, "
                               f"expected {list(shape)}")
        bits, g = _resident_bits(family, target, shape, rbits, o.group_size)
        # 1-D tensors (norms, A_log, dt_bias) stay float32: tiny, and bf16 would round the norms'
        # (1 + w) coarsely (mlx-lm keeps A_log in float32 for the same reason).
        dtype = "float32" if len(shape) == 1 else float_dtype
        repack = not derived and bits < 16 and src.quantized(source) == (bits, g)
        plan = ResidentPlan(target, source, tuple(shape), bits, g, dtype, src.info(source).nbytes, derived, repack)
        files.setdefault(resident_file_for(target), ResidentFilePlan(resident_file_for(target))).tensors.append(plan)

    leftovers = sorted(src.names - consumed - set(dropped))
    if leftovers:
        raise ConvertError(f"{src.file_of(leftovers[0])}: unexpected tensor {leftovers[0]} "
                           f"({len(leftovers)} source tensors would be left unconverted)")
    hf_layout = any("conv1d.weight" in n and src.info(n).shape[-1] != 1 for n in src.names)
    return ConversionPlan(o, family, float_dtype, hf_layout, experts, sorted(files.values(), key=lambda f: f.file),
                          dropped)


def _resident_bits(family: MlxLmFamily, target: str, shape: tuple, rbits: int, g: int) -> tuple[int, int | None]:
    if rbits >= 16 or len(shape) < 2:
        return 16, None
    if target not in family.quantizable and not (target.startswith("mtp.") and target.endswith("weight")
                                                 and "norm" not in target):
        return 16, None
    override = family.resident_override(target)
    bits = max(rbits, override) if override else rbits
    group = 64 if override else g
    group = _group_for(shape[-1], group)
    if group is None:
        log.info("%s: last dim %d not divisible by 32; kept unquantized", target, shape[-1])
        return 16, None
    return bits, group


def _quantized_weight(src: SourceCheckpoint, side: str) -> bool:
    weight = side.rsplit(".", 1)[0] + ".weight"
    return weight in src.where and src.info(weight).dtype == "U32"


def _check_expert_shapes(src: SourceCheckpoint, es: ExpertSource, i: int, h: int, layer: int) -> None:
    n = es.num_experts
    want = {"fused": {"gate_up": (n, 2 * i, h), "down": (n, h, i)},
            "stacked": {"gate_proj": (n, i, h), "up_proj": (n, i, h), "down_proj": (n, h, i)},
            "per_expert": {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}}[es.layout]
    for key, shape in want.items():
        name = es.names[key]
        names = [name.format(e=e) for e in range(n)] if es.layout == "per_expert" else [name]
        for nm in names:
            got = src.shape(nm)
            if tuple(got) != shape:
                raise ConvertError(f"{src.file_of(nm)}: tensor {nm} has shape {list(got)}, expected "
                                   f"{list(shape)} (layer {layer}, {n} experts, intermediate {i}, hidden {h})")
