"""compressed-tensors ``pack-quantized`` INT4 weights: Kimi K2 Thinking's and Kimi K2.5's releases (their routed
experts, from quantization-aware training) and llm-compressor's W4A16 exports of any family.

A checkpoint says so in ``config.json`` (``quantization_config``, top level or in ``text_config``): ``quant_method``
``compressed-tensors``, ``format`` ``pack-quantized`` (or per config group), weights ``type`` int, ``num_bits`` 4,
``strategy`` group, ``group_size`` 32, 64 or 128, symmetric or not. compressed-tensors' PackedQuantizationCompressor
stores a quantized linear ``X`` as

- ``X.weight_packed`` int32 ``[rows, cols / 8]``: codes ``c = q + 8`` of the signed integers ``q`` in [-8, 7], eight
  to a word, element ``i`` in bits ``4i .. 4i + 3`` (lowest first);
- ``X.weight_scale`` ``[rows, cols / g]`` in the model's float type (bf16 in the Kimi releases);
- ``X.weight_shape`` int ``[2]``: the logical ``(rows, cols)``;
- asymmetric only: ``X.weight_zero_point`` int32 ``[rows / 8, cols / g]``, the zero points ``z`` in [-8, 7] packed
  the same way down the rows (compressed-tensors' ``packed_dim=0``);

and dequantizes ``w = (q - z) * s = (c - (z + 8)) * s``. That is MLX's affine 4-bit layout exactly: MLX packs eight
4-bit codes per uint32, lowest first, and dequantizes ``w = c * scale + bias``, so the words are kept as they are
(viewed as uint32), ``scale = s`` and ``bias = -(z + 8) * s``. Symmetric: ``bias = -8 s``, a power-of-two multiple
of the scale, exact in the scale's own format; asymmetric: ``(z + 8) s`` needs up to four more mantissa bits than
``s``, exact in float32 (see :func:`mlx_parts`).

This module is pure numpy over a config dict and raw arrays; :mod:`.source` names files and tensors in its errors.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
GROUP_SIZES = (32, 64, 128)
# compressed-tensors' preset schemes that are pack-quantized INT4 weights with float activations
PRESETS = {
    "W4A16": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True},
    "W4A16_ASYM": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": False},
}
# quant_method values moestream reads; anything else stops conversion with its name.
KNOWN = "fp8 with 128x128 block scales, mxfp4 (gpt-oss), compressed-tensors pack-quantized INT4"


class SchemeError(ValueError):
    """A quantization config or a packed tensor moestream cannot read (the message says what)."""


@dataclass(frozen=True)
class Scheme:
    """What a compressed-tensors config allows: the group sizes and symmetries of its config groups."""

    group_sizes: frozenset[int]
    symmetric: frozenset[bool]


@dataclass(frozen=True)
class PackedWeight:
    """One pack-quantized weight: the names of its tensors and the logical array they encode."""

    packed: str  # X.weight_packed
    scale: str  # X.weight_scale
    zero_point: str | None  # X.weight_zero_point (asymmetric)
    shape_tensor: str | None  # X.weight_shape
    shape: tuple[int, ...]  # logical shape: leading dims, rows, cols
    group: int
    scale_dtype: str  # safetensors dtype of the scales

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    @property
    def sides(self) -> list[str]:
        """The tensors read with ``packed``."""
        return [n for n in (self.scale, self.zero_point, self.shape_tensor) if n is not None]


def quantization_config(config: dict) -> dict | None:
    """The checkpoint's ``quantization_config``: top level, else the text model's (multimodal wrappers)."""
    q = config.get("quantization_config")
    if q is None:
        q = (config.get("text_config") or {}).get("quantization_config")
    return q


def source_quantization(config: dict) -> str | None:
    """The kind of quantized source ``config`` describes: None (floats, or mlx-lm's own ``quantization``), ``fp8``,
    ``mxfp4`` or ``compressed-tensors``; :class:`SchemeError` naming what is unsupported otherwise."""
    q = quantization_config(config)
    if q is None:
        return None
    if not isinstance(q, dict):
        raise SchemeError("quantization_config is not an object")
    method = q.get("quant_method")
    if method is None:
        if config.get("quantization") is not None:  # mlx-lm writes its "quantization" under both names
            return None
        raise SchemeError("quantization_config has no quant_method")
    if method == "fp8":
        block = q.get("weight_block_size")
        if block is not None and list(block) != [128, 128]:
            raise SchemeError(
                f"quantization_config: fp8 with weight_block_size {list(block)} is not supported (128x128 only)"
            )
        return "fp8"
    if method == "mxfp4":
        return "mxfp4"
    if method == METHOD:
        parse_scheme(q)
        return METHOD
    raise SchemeError(f"quantization_config: quant_method {method!r} is not supported (supported: {KNOWN})")


def parse_scheme(q: dict) -> Scheme:
    """The config groups of a compressed-tensors ``quantization_config``, checked to be pack-quantized INT4 weights
    with float activations; :class:`SchemeError` naming the first thing that is not."""
    where = "quantization_config (compressed-tensors)"
    status = q.get("quantization_status", "compressed")
    if status != "compressed":
        raise SchemeError(f"{where}: quantization_status {status!r}; only compressed checkpoints are read")
    for key in ("sparsity_config", "transform_config", "moe_sparsity_config"):
        if q.get(key):  # pruned or rotated weights: the packed values alone are not the model
            raise SchemeError(f"{where}: {key} is not supported")
    groups = q.get("config_groups") or {}
    if not groups:
        raise SchemeError(f"{where}: no config_groups")
    sizes, sym = set(), set()
    for name, g in groups.items():
        if isinstance(g, list):  # a preset's name with its targets
            if name not in PRESETS:
                raise SchemeError(f"{where}: preset {name!r} is not supported (INT4 weights only: W4A16, W4A16_ASYM)")
            g = {"weights": PRESETS[name]}
        fmt = (g or {}).get("format") or q.get("format")
        if fmt != FORMAT:
            raise SchemeError(f"{where}: group {name}: format {fmt!r} is not supported ({FORMAT} INT4 only)")
        w = g.get("weights")
        if not w:
            raise SchemeError(f"{where}: group {name} quantizes no weights")
        for key in ("input_activations", "output_activations"):
            if g.get(key):  # moestream computes with float activations
                raise SchemeError(f"{where}: group {name}: {key} quantization is not supported (weights only)")
        want = {"type": "int", "num_bits": 4, "strategy": "group"}
        for key, value in want.items():
            if w.get(key) != value:
                raise SchemeError(
                    f"{where}: group {name}: weights {key} {w.get(key)!r} is not supported "
                    f"(INT4 with group scales only)"
                )
        if w.get("group_size") not in GROUP_SIZES:
            raise SchemeError(
                f"{where}: group {name}: group_size {w.get('group_size')!r} is not supported (32, 64 or 128)"
            )
        if w.get("dynamic") not in (None, False):
            raise SchemeError(f"{where}: group {name}: dynamic weight quantization is not supported")
        if w.get("actorder") == "group":  # columns permuted by g_idx: the groups are not contiguous
            raise SchemeError(f"{where}: group {name}: actorder 'group' (g_idx) is not supported")
        sizes.add(int(w["group_size"]))
        sym.add(bool(w.get("symmetric", True)))
    return Scheme(frozenset(sizes), frozenset(sym))


def index_packed(tensors: dict[str, tuple[str, tuple[int, ...]]], scheme: Scheme) -> dict[str, PackedWeight]:
    """Every pack-quantized weight among ``tensors`` (name -> (safetensors dtype, shape)), by its ``weight_packed``
    name; :class:`SchemeError` ``(tensor name, problem)`` for a tensor that does not fit the format."""
    out = {}
    for name, (dtype, shape) in tensors.items():
        if not name.endswith(".weight_packed"):
            if name.endswith(".weight_g_idx"):
                raise SchemeError(name, "activation-order group index (g_idx) is not supported")
            continue
        base = name[: -len("_packed")]  # X.weight
        scale, zp, st = f"{base}_scale", f"{base}_zero_point", f"{base}_shape"
        if dtype != "I32" or len(shape) < 2:
            raise SchemeError(name, f"dtype {dtype}{list(shape)}, expected int32 [rows, cols / 8]")
        if scale not in tensors:
            raise SchemeError(name, f"has no {scale}")
        s_dtype, s_shape = tensors[scale]
        if s_dtype not in ("BF16", "F16", "F32"):
            raise SchemeError(scale, f"dtype {s_dtype}, expected a float type")
        rows, cols = shape[-2], shape[-1] * 8
        if tuple(s_shape[:-1]) != tuple(shape[:-1]) or not s_shape[-1] or cols % s_shape[-1]:
            raise SchemeError(scale, f"shape {list(s_shape)} does not fit {name} {list(shape)}")
        group = cols // s_shape[-1]
        if group not in scheme.group_sizes:
            raise SchemeError(name, f"group size {group}, config_groups give {sorted(scheme.group_sizes)}")
        if zp in tensors:
            z_dtype, z_shape = tensors[zp]
            want = (*shape[:-2], -(-rows // 8), s_shape[-1])
            if z_dtype != "I32" or tuple(z_shape) != want:
                raise SchemeError(zp, f"{z_dtype}{list(z_shape)}, expected int32 {list(want)} (packed down the rows)")
            if False not in scheme.symmetric:
                raise SchemeError(zp, "zero points, but config_groups are symmetric")
        elif True not in scheme.symmetric:
            raise SchemeError(name, f"has no {zp} (config_groups are asymmetric)")
        out[name] = PackedWeight(
            name,
            scale,
            zp if zp in tensors else None,
            st if st in tensors else None,
            (*shape[:-2], rows, cols),
            group,
            s_dtype,
        )
    return out


def unpack_codes(words: np.ndarray) -> np.ndarray:
    """uint8 codes ``[..., 8 n]`` from int32 words ``[..., n]`` (eight 4-bit codes a word, lowest first)."""
    if sys.byteorder != "little":  # the words' bytes are read in memory order
        raise SchemeError("pack-quantized weights are read on little-endian machines only")
    b = np.ascontiguousarray(words).view(np.uint8)
    out = np.empty((*b.shape[:-1], 2 * b.shape[-1]), np.uint8)
    out[..., 0::2] = b & 15
    out[..., 1::2] = b >> 4
    return out


def zero_codes(zp_words: np.ndarray, rows: int) -> np.ndarray:
    """The unsigned zero points ``z + 8`` ``[..., rows, groups]`` from their words packed down the rows."""
    return np.swapaxes(unpack_codes(np.swapaxes(zp_words, -1, -2))[..., :rows], -1, -2)


def mlx_parts(
    words: np.ndarray, scale: np.ndarray, zp_words: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MLX's affine arrays for rows of a pack-quantized weight: ``weight`` uint32 (the same bytes), ``scales`` and
    ``biases`` float32 [..., rows, groups]. ``scale`` float32 (decoded from the source's float type).

    float32 holds ``-(z + 8) * s`` exactly for bf16 or fp16 scales (at most 11 + 4 significant bits)."""
    rows = words.shape[-2]
    z = np.float32(8) if zp_words is None else zero_codes(zp_words, rows).astype(np.float32)
    return np.ascontiguousarray(words).view(np.uint32), scale, -(z * scale)


def dequantize(words: np.ndarray, scale: np.ndarray, zp_words: np.ndarray | None, cols: int) -> np.ndarray:
    """float32 ``(c - (z + 8)) * s`` for rows of a pack-quantized weight (``scale`` float32 [..., rows, groups])."""
    codes = unpack_codes(words)[..., :cols]
    groups = scale.shape[-1]
    c = codes.reshape(*codes.shape[:-1], groups, cols // groups).astype(np.float32)
    rows = words.shape[-2]
    z = np.float32(8) if zp_words is None else zero_codes(zp_words, rows).astype(np.float32)[..., None]
    return ((c - z) * scale[..., None]).reshape(*codes.shape[:-1], cols)


__all__ = [
    "PackedWeight",
    "Scheme",
    "SchemeError",
    "dequantize",
    "index_packed",
    "mlx_parts",
    "parse_scheme",
    "quantization_config",
    "source_quantization",
    "unpack_codes",
]
