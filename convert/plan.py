"""The conversion plan: every source tensor assigned to exactly one output, before anything is written.

Planning reads only headers. It decides, per MoE layer, where the experts come from and the block
layout; per resident tensor, its source, target file, bits and group size; and it fails, naming the
tensor, when a source tensor would be left over or an expected one is missing. ``--dry-run`` prints
this plan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np

from moestream.layouts import Component, expert_block_layout, round_up
from moestream.layouts.expert_file import HEADER

from .defaults import default_for
from .family import ExpertSource, MlxLmFamily
from .source import FLOAT_DTYPES, ConvertError, ConvertOptionError, SourceCheckpoint

log = logging.getLogger(__name__)

FALLBACK_GROUP = 32
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass
class Options:
    """Conversion options (the CLI flags, by the same names)."""

    bits: int = 4
    group_size: int = 64
    method: str | None = None  # None: the default for --bits (convert/defaults.py)
    resident_bits: int | None = None  # None: the default for --bits, or with a recipe, as the experts
    dtype: str | None = None  # float type of scales/biases/unquantized tensors; None: the source's
    alignment: int = 16384
    keep_mtp: bool = False
    calibration: str | None = None  # a `moestream calibrate` file: importance-weighted clip everywhere
    # Recipes (convert/recipes.py) fill these; the defaults give one width for every expert.
    down_bits: int | None = None  # down_proj's bits when they differ from gate/up's
    tier_widths: list[str] | None = None  # per-expert widths to choose from, e.g. ["2g128", "4g64", "8g64"]
    bits_per_weight: float | None = None  # the tiers' budget: mean stored bits per expert weight
    layer_widths: dict[int, str] | None = None  # one width for all experts of these layers
    resident_kinds: dict[str, int] | None = None  # resident bits by tensor kind (router, embedding, ...)
    weighted: bool = True  # with calibration and clip: weight the clip search by input statistics
    recipe: str | None = None  # the recipe's name or file, as recorded in the manifest
    # Which of the fields above with_defaults filled (not a flag): a default never widens a tensor the source
    # already holds quantized (its dequantized values carry no more than the source's own width).
    defaulted: tuple[str, ...] = ()

    def with_defaults(self) -> Options:
        """These options with convert/defaults.py's choices for ``bits`` wherever neither a flag nor a recipe
        set them: the residents' widths (unless ``resident_bits`` or ``resident_kinds`` is given),
        down_proj's (unless given, or widths come per layer or expert) and, with calibration and no
        method, how the quantizers use it. A recipe is taken as it is."""
        if self.recipe is not None:
            return self
        d = default_for(self.bits)
        out = replace(self)
        if self.calibration and self.weighted and self.method is None:
            if d.calibrated is None:
                out.weighted = False  # measured no better: the statistics choose tiers only
            else:
                out.method = d.calibrated
        filled = set()
        if self.resident_bits is None and self.resident_kinds is None:
            out.resident_bits, out.resident_kinds = d.resident_bits, dict(d.resident_kinds) or None
            filled.add("resident_bits")
        if self.down_bits is None and d.down_bits and not self.tier_widths and not self.layer_widths:
            out.down_bits = d.down_bits
            filled.add("down_bits")
        out.defaulted = tuple(sorted(filled))
        return out

    def resolved_method(self) -> str:
        if self.method == "gptq" and not self.calibration:
            raise ConvertOptionError("method", "gptq", "needs calibration statistics (from `moestream calibrate`)")
        if self.calibration and self.weighted:
            if self.method == "rtn":
                raise ConvertError(
                    "--calibration weights the clip search and GPTQ; it cannot be used with --method rtn"
                )
            return self.method or default_for(self.bits).calibrated or default_for(self.bits).method
        return self.method or default_for(self.bits).method


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
    bits: int = 16  # gate/up (4 for passed-through MXFP4)
    down_bits: int = 16
    tier: int = 0
    expert_ids: list[int] | None = None  # a tier's experts (the model's ids, in block order); None: all
    mode: str = "affine"  # "mxfp4": the source's MXFP4 experts, copied (gpt-oss hub releases)
    linear_bias: bool = False  # the experts' projections have bias vectors (gpt-oss)
    packed: bool = False  # compressed-tensors INT4 experts passed through as MLX affine 4-bit (repack is set too)

    @property
    def passthrough(self) -> bool:
        """The source's quantized experts are stored as they are (MXFP4 or compressed-tensors INT4)."""
        return self.mode == "mxfp4" or self.packed

    @property
    def num_blocks(self) -> int:
        return self.source.num_experts if self.expert_ids is None else len(self.expert_ids)

    def ids(self) -> list[int]:
        return list(range(self.source.num_experts)) if self.expert_ids is None else self.expert_ids


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
        return sum(HEADER_PAGE(self.options.alignment) + x.num_blocks * x.stride for x in self.experts)

    @property
    def resident_out_bytes(self) -> int:
        return sum(resident_out_bytes(t) for f in self.resident_files for t in f.tensors)

    @property
    def src_bytes(self) -> int:
        return sum(x.src_bytes for x in self.experts) + sum(t.src_bytes for f in self.resident_files for t in f.tensors)

    def bytes_per_token(self, top_k: int | None = None) -> int:
        k = self.family.top_k if top_k is None else top_k
        return round(sum(k * x.stride * x.num_blocks / x.source.num_experts for x in self.experts))

    @property
    def packed_experts(self) -> bool:
        """Every expert is the source's compressed-tensors INT4, passed through (4 bits, the source's groups)."""
        return bool(self.experts) and all(x.packed for x in self.experts)

    def summary(self) -> dict:
        """What ``--dry-run`` prints."""
        o = self.options
        packed = self.packed_experts
        return {
            "model_type": self.family.model_type,
            "bits": 4 if packed else o.bits,
            "group_size": self.experts[0].group_gate_up if packed else o.group_size,
            "expert_mode": self.experts[0].mode if self.experts else "affine",
            "method": "passthrough" if packed else o.resolved_method(),
            "resident_bits": o.resident_bits or o.bits,
            "resident_kinds": o.resident_kinds,
            "recipe": o.recipe,
            "down_bits": 4 if packed else o.down_bits or o.bits,
            "tiers": _tier_counts(self.experts),
            "float_dtype": self.float_dtype,
            "alignment": o.alignment,
            "moe_layers": len({x.layer for x in self.experts}),
            "num_experts": self.family.num_experts,
            "top_k": self.family.top_k,
            "expert_stride": self.experts[0].stride if self.experts else 0,
            "expert_block_bytes": self.experts[0].block_bytes if self.experts else 0,
            "expert_files_bytes": self.expert_bytes,
            "resident_bytes": self.resident_out_bytes,
            "bytes_per_token": self.bytes_per_token(),
            "source_bytes": self.src_bytes,
            "files": [x.file for x in self.experts] + [f.file for f in self.resident_files],
            "dropped_tensors": len(self.dropped),
        }


def _tier_counts(experts: list[ExpertLayerPlan]) -> dict[str, int] | None:
    """Experts per width over all layers, when the widths vary."""
    counts: dict[str, int] = {}
    for x in experts:
        key = f"{x.bits}g{x.group_gate_up}" if x.bits < 16 else "16"
        counts[key] = counts.get(key, 0) + x.num_blocks
    return counts if len(counts) > 1 or any(x.expert_ids is not None for x in experts) else None


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
    o = options.with_defaults()
    if o.bits not in (2, 3, 4, 8, 16):
        raise ConvertOptionError("bits", o.bits, "supported are 2, 3, 4, 8 and 16 (unquantized)")
    if o.group_size not in (32, 64, 128):
        raise ConvertOptionError("group_size", o.group_size, "supported are 32, 64 and 128")
    if o.alignment < 4096 or o.alignment & (o.alignment - 1):
        raise ConvertOptionError("alignment", o.alignment, "must be a power of two >= 4096 (O_DIRECT)")
    rbits = o.resident_bits or o.bits
    if rbits not in (2, 3, 4, 8, 16):
        raise ConvertOptionError("resident_bits", rbits, "supported are 2, 3, 4, 8 and 16")
    float_dtype = o.dtype or _packed_float_dtype(src) or src.float_dtype()
    if float_dtype not in BYTES:
        raise ConvertOptionError("dtype", float_dtype, "supported are bfloat16, float16 and float32")
    _check_packed_dtype(src, float_dtype)

    dropped, by_target = [], {}
    for name in sorted(src.names):
        if family.dropped(name, o.keep_mtp):
            dropped.append(name)
        elif (logical := src.logical_name(name)) is not None:  # None: read with another tensor
            by_target[family.target_name(logical)] = name
    if dropped:
        log.info("dropped %d source tensors not in the language model: %s", len(dropped), _groups(dropped))
    consumed: set[str] = set()

    def consume(name: str, raw: bool = False) -> None:
        if name in consumed:
            raise ConvertError(f"{src.file_of(name)}: tensor {name} would be consumed twice")
        dtype = src.info(name).dtype
        if dtype not in FLOAT_DTYPES and not raw and not src.quantized(name):
            raise ConvertError(
                f"{src.file_of(name)}: tensor {name} has dtype {dtype}; expected one of {', '.join(FLOAT_DTYPES)}"
            )
        consumed.add(name)
        consumed.update(src.side_tensors(name))

    widths = _expert_widths(src, family, o, float_dtype)
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
        src_bytes = sum(src.stored_nbytes(n) for n in es.consumed())
        if es.layout != "per_expert":
            src_bytes = sum(src.stored_nbytes(n) for n in es.names.values())
        if mxfp4:
            log.info("layer %d: MXFP4 experts passed through (no requantization; --bits applies to residents)", layer)
            comps, block = expert_block_layout(h, i, 4, 32, 32, float_dtype, mode="mxfp4", linear_bias=bias)
            experts.append(
                ExpertLayerPlan(
                    layer,
                    es,
                    i,
                    h,
                    32,
                    32,
                    comps,
                    block,
                    round_up(block, o.alignment),
                    sum(src.info(n).nbytes for n in es.names.values()),
                    f"experts/layer-{layer:03d}.bin",
                    False,
                    4,
                    4,
                    mode="mxfp4",
                    linear_bias=bias,
                )
            )
            continue
        tiers = widths.get(layer)  # None: the layer-wide --bits/--group-size
        packed = _packed_groups(src, es)  # compressed-tensors INT4 experts: (gate/up group, down group)
        if packed is not None and tiers is None and not ({o.bits, o.down_bits or o.bits} & {2, 3}):
            # The source's INT4 codes and scales as MLX's affine 4-bit layout: no requantization (only --bits 2
            # and 3 requantize, from the dequantized values); --bits sets the residents.
            gu, gd = packed
            log.info(
                "layer %d: compressed-tensors INT4 experts (g%d) passed through (--bits applies to residents)",
                layer,
                gu,
            )
            comps, block = expert_block_layout(h, i, 4, gu, gd, float_dtype)
            experts.append(
                ExpertLayerPlan(
                    layer,
                    es,
                    i,
                    h,
                    gu,
                    gd,
                    comps,
                    block,
                    round_up(block, o.alignment),
                    src_bytes,
                    f"experts/layer-{layer:03d}.bin",
                    True,
                    4,
                    4,
                    packed=True,
                )
            )
            continue
        groups = (
            [(None, o.bits, o.down_bits or o.bits, o.group_size)]
            if tiers is None
            else [(ids, w.bits, w.bits, w.group_size) for w, ids in tiers]
        )
        for t, (ids, bits, dbits, group) in enumerate(groups):
            dsrc = _source_width(src, es, "down_proj")
            if "down_bits" in o.defaulted and dsrc is not None and dbits > max(bits, dsrc[0]):
                dbits = max(bits, dsrc[0])  # the source's down_proj is already this narrow: no wider default
            gu, gd = (None, None) if bits >= 16 else (_group_for(h, group), _group_for(i, group))
            if bits < 16 and (gu is None or gd is None):
                bad = "gate_proj/up_proj (hidden %d)" % h if gu is None else "down_proj (intermediate %d)" % i
                raise ConvertError(f"layer {layer} experts {bad}: not divisible by group size {group} or 32")
            if bits < 16 and (gu != group or gd != group):
                log.warning("layer %d: experts use group size %s/%s (fallback)", layer, gu, gd)
            comps, block = expert_block_layout(h, i, bits, gu, gd, float_dtype, dbits, linear_bias=bias)
            repack = (
                es.layout == "stacked"
                and ids is None
                and bits == dbits
                and all(src.quantized(es.names[p]) == (bits, gd if p == "down_proj" else gu) for p in es.names)
            )
            # a recipe's width that is the compressed-tensors source's own: its codes, as above
            keep = packed is not None and bits == dbits == 4 and (gu, gd) == packed
            repack = repack or keep
            if keep:
                log.info("layer %d: compressed-tensors INT4 experts at %dg%d passed through", layer, bits, gu)
            elif repack:
                log.info("layer %d: experts already %d-bit, group %s: repacked without requantizing", layer, bits, gu)
            name = f"experts/layer-{layer:03d}.bin" if ids is None else f"experts/layer-{layer:03d}-{bits}g{group}.bin"
            share = src_bytes if ids is None else src_bytes * len(ids) // es.num_experts
            experts.append(
                ExpertLayerPlan(
                    layer,
                    es,
                    i,
                    h,
                    gu,
                    gd,
                    comps,
                    block,
                    round_up(block, o.alignment),
                    share,
                    name,
                    repack,
                    bits,
                    dbits,
                    t,
                    ids,
                    linear_bias=bias,
                    packed=keep,
                )
            )

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
            raise ConvertError(
                f"checkpoint: missing tensor {family.source_name_hint(target)} "
                f"(expected by {family.model_type}, shape {list(shape)})"
            )
        if not (derived and source in consumed):  # one source may feed several derived targets
            consume(source)
        sshape = src.shape(source)
        if not derived and int(np.prod(sshape)) != int(np.prod(shape)):
            raise ConvertError(
                f"{src.file_of(source)}: tensor {source} has shape {list(sshape)}, expected {list(shape)}"
            )
        bits, g = _resident_bits(family, target, shape, rbits, o.group_size, o.resident_kinds)
        sq = None if derived else src.quantized(source)
        if "resident_bits" in o.defaulted and sq is not None and bits > sq[0]:
            bits, g = sq  # a default width above the source's own: kept as the source holds it (repacked)
        # 1-D tensors (norms, A_log, dt_bias) stay float32: tiny, and bf16 would round the norms'
        # (1 + w) coarsely (mlx-lm keeps A_log in float32 for the same reason).
        dtype = "float32" if len(shape) == 1 else float_dtype
        repack = not derived and bits < 16 and src.quantized(source) == (bits, g)
        plan = ResidentPlan(target, source, tuple(shape), bits, g, dtype, src.info(source).nbytes, derived, repack)
        files.setdefault(resident_file_for(target), ResidentFilePlan(resident_file_for(target))).tensors.append(plan)

    leftovers = sorted(src.names - consumed - set(dropped))
    if leftovers:
        raise ConvertError(
            f"{src.file_of(leftovers[0])}: unexpected tensor {leftovers[0]} "
            f"({len(leftovers)} source tensors would be left unconverted)"
        )
    hf_layout = any("conv1d.weight" in n and src.info(n).shape[-1] != 1 for n in src.names)
    return ConversionPlan(
        o, family, float_dtype, hf_layout, experts, sorted(files.values(), key=lambda f: f.file), dropped
    )


def _expert_widths(
    src: SourceCheckpoint, family: MlxLmFamily, o: Options, float_dtype: str
) -> dict[int, list[tuple["Width", list[int] | None]]]:  # noqa: F821 (a string annotation; imported where used)
    """layer -> [(width, expert ids)] for layers that do not use the layer-wide bits: per-layer
    widths (ids None: every expert) and per-expert tiers (ids of each tier, narrowest first)."""
    from moestream.quant.calibration import Calibration
    from moestream.quant.tiers import Width

    from .tier_plan import plan_widths

    try:
        fixed = {int(k): Width.parse(v) for k, v in (o.layer_widths or {}).items()}
        tier_widths = [Width.parse(w) for w in o.tier_widths or []]
    except ValueError as e:
        raise ConvertError(f"recipe: {e}") from None
    out = {layer: [(w, None)] for layer, w in fixed.items()}
    if not tier_widths:
        return out
    if not o.calibration:
        raise ConvertError(
            "per-expert tiers choose widths from routing counts: pass --calibration STATS (from `moestream calibrate`)"
        )
    if o.bits_per_weight is None:
        raise ConvertError("per-expert tiers need a budget (bits_per_weight in the recipe)")
    layers = [layer for layer in family.moe_layers() if layer not in fixed]
    for layer in layers:  # a fallback group size would break the budget's arithmetic: refuse instead
        i, h = family.expert_shape(layer)
        bad = [w for w in tier_widths if h % w.group_size or i % w.group_size]
        if bad:
            raise ConvertError(
                f"recipe: width {bad[0]}: group size {bad[0].group_size} does not divide the experts' "
                f"hidden {h} and intermediate {i} (layer {layer})"
            )
    by_target = {
        family.target_name(logical): n
        for n in src.names
        if not family.dropped(n, o.keep_mtp) and (logical := src.logical_name(n)) is not None
    }
    sources = {layer: (family.expert_source(layer, by_target), family.expert_shape(layer)[0]) for layer in layers}
    method = o.resolved_method() if o.resolved_method() in ("rtn", "clip") else "clip"
    chosen = plan_widths(
        src,
        sources,
        tier_widths,
        o.bits_per_weight,
        Calibration.load(o.calibration),
        o.calibration,
        method,
        float_dtype,
    )
    for layer, ws in chosen.items():
        out[layer] = [
            (w, [e for e, we in enumerate(ws) if we == w]) for w in sorted(set(ws), key=lambda w: w.bits_per_weight())
        ]
    return out


def _resident_bits(
    family: MlxLmFamily, target: str, shape: tuple, rbits: int, g: int, kinds: dict[str, int] | None = None
) -> tuple[int, int | None]:
    if kinds and tensor_kind(target) in kinds:
        rbits = kinds[tensor_kind(target)]
    if rbits >= 16 or len(shape) < 2:
        return 16, None
    if target not in family.quantizable and not (
        target.startswith("mtp.") and target.endswith("weight") and "norm" not in target
    ):
        return 16, None
    override = family.resident_override(target)
    bits = max(rbits, override) if override else rbits
    group = 64 if override else g
    group = _group_for(shape[-1], group)
    if group is None:
        log.info("%s: last dim %d not divisible by 32; kept unquantized", target, shape[-1])
        return 16, None
    return bits, group


def _groups(names: list[str]) -> str:
    """Source names summarized by their first two components (``vision_tower.encoder.*``, ``mtp.layers.*``)."""
    counts: dict[str, int] = {}
    for n in names:
        key = ".".join(n.split(".")[:2]) + ".*"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} ({v})" for k, v in sorted(counts.items()))


def _source_width(src: SourceCheckpoint, es: ExpertSource, proj: str) -> tuple[int, int] | None:
    """(bits, group) of a projection the source holds quantized (its first expert's), else None."""
    name = es.names.get(proj)
    if name is None or es.reader is not None or es.layout == "fused":
        return None
    name = name.format(e=0) if es.layout == "per_expert" else name
    return src.quantized(name) if name in src.names else None


def _packed_groups(src: SourceCheckpoint, es: ExpertSource) -> tuple[int, int] | None:
    """(gate/up group size, down group size) when every expert tensor of the layer is compressed-tensors INT4,
    gate and up at one group size and down at one; else None (read as floats)."""
    if es.reader is not None or es.layout == "fused" or not src.packed:
        return None
    by_proj: dict[str, set[int]] = {}
    for key, name in es.names.items():
        names = [name.format(e=e) for e in range(es.num_experts)] if es.layout == "per_expert" else [name]
        if any(n not in src.packed for n in names):
            return None
        by_proj.setdefault("down" if key == "down_proj" else "gate_up", set()).update(
            src.packed[n].group for n in names
        )
    gu, gd = by_proj.get("gate_up", set()), by_proj.get("down", set())
    return (gu.pop(), gd.pop()) if len(gu) == 1 and len(gd) == 1 else None


def _packed_float_dtype(src: SourceCheckpoint) -> str | None:
    """float32 for asymmetric compressed-tensors sources: their biases -(z + 8) * s are exact in float32 only."""
    if any(not w.symmetric for w in src.packed.values()):
        log.info(
            "asymmetric INT4 source: scales, biases and float tensors stored as float32 (exact); --dtype overrides"
        )
        return "float32"
    return None


def _check_packed_dtype(src: SourceCheckpoint, dtype: str) -> None:
    """Warn where a chosen --dtype cannot hold a compressed-tensors source's scales or biases exactly."""
    if not src.packed or dtype == "float32":
        return
    scale_types = {w.scale_dtype for w in src.packed.values()}
    if scale_types != {ST_DTYPE[dtype]}:
        log.warning("--dtype %s: the source's %s INT4 scales are rounded to it", dtype, "/".join(sorted(scale_types)))
    if any(not w.symmetric for w in src.packed.values()):
        log.warning("--dtype %s: the asymmetric INT4 biases -(z + 8) * s are rounded to it (exact in float32)", dtype)


def _check_expert_shapes(src: SourceCheckpoint, es: ExpertSource, i: int, h: int, layer: int) -> None:
    n = es.num_experts
    want = {
        "fused": {"gate_up": (n, 2 * i, h), "down": (n, h, i)},
        "stacked": {"gate_proj": (n, i, h), "up_proj": (n, i, h), "down_proj": (n, h, i)},
        "per_expert": {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)},
    }[es.layout]
    for key, shape in want.items():
        name = es.names[key]
        names = [name.format(e=e) for e in range(n)] if es.layout == "per_expert" else [name]
        for nm in names:
            got = src.shape(nm)
            if tuple(got) != shape:
                raise ConvertError(
                    f"{src.file_of(nm)}: tensor {nm} has shape {list(got)}, expected "
                    f"{list(shape)} (layer {layer}, {n} experts, intermediate {i}, hidden {h})"
                )


RESIDENT_KINDS = (
    "router",
    "shared_expert",
    "attention",
    "linear_attention",
    "embedding",
    "lm_head",
    "mtp",
    "norm",
    "other",
)


def tensor_kind(target: str) -> str:
    """The kind of a resident tensor, as reports group them and recipes set their bits."""
    for key, kind in (
        (".mlp.gate.", "router"),
        (".block_sparse_moe.gate.", "router"),
        ("shared_expert_gate", "router"),
        ("shared_expert.", "shared_expert"),
        ("shared_experts.", "shared_expert"),
        ("self_attn.", "attention"),
        ("linear_attn.", "linear_attention"),
        ("embed_tokens", "embedding"),
        ("lm_head", "lm_head"),
        ("mtp.", "mtp"),
        ("norm", "norm"),
    ):
        if key in target:
            return kind
    return "other"
