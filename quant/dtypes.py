"""Numpy helpers for the float formats numpy lacks: bfloat16 and FP8 (e4m3fn).

Hugging Face checkpoints arrive as raw safetensors bytes in BF16, F16, F32 or F8_E4M3 (the
official FP8 releases of Qwen and DeepSeek, with one float32 ``scale_inv`` per 128x128 block).
The quantizer works in float32, so everything here decodes to float32 exactly, and rounds back
to bfloat16 bit for bit the way MLX does (round to nearest even, NaN -> 0x7FC0), so that bytes
produced here and bytes produced by ``mx.array.astype(mx.bfloat16)`` are interchangeable.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = [
    "SAFETENSORS_FLOAT_DTYPES",
    "bf16_to_f32",
    "decode_to_f32",
    "dequantize_fp8_blocks",
    "f32_to_bf16",
    "fp8_e4m3_to_f32",
]

# MLX (and PyTorch) write every bfloat16 NaN as this one quiet NaN, whatever its sign.
_BF16_NAN = np.uint16(0x7FC0)


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits to float32 (exact: bf16 is the top half of a float32).

    Args:
        u16: bfloat16 values stored as uint16 bit patterns, any shape.

    Returns:
        A new float32 array of the same shape.

    Example:
        >>> bf16_to_f32(np.array([0x3F80], np.uint16))
        array([1.], dtype=float32)
    """
    u16 = np.asarray(u16)
    if u16.dtype != np.uint16:
        raise TypeError(f"bf16_to_f32 expects uint16 bit patterns, got {u16.dtype}")
    return (u16.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16(f: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bits, round-to-nearest-even, exactly as MLX's astype does.

    Args:
        f: float32 values, any shape (other float dtypes are converted to float32 first).

    Returns:
        uint16 bit patterns of the same shape; NaN becomes the quiet NaN 0x7FC0, infinities
        stay infinite and values past the bf16 range round to infinity.
    """
    f = np.ascontiguousarray(f, dtype=np.float32)
    bits = f.view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds half-way cases to the even neighbour.
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = ((bits + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(f), _BF16_NAN, rounded)


def _build_e4m3fn_table() -> np.ndarray:
    """The 256 float32 values of float8 e4m3fn: bias 7, no infinities, S.1111.111 is NaN."""
    table = np.empty(256, dtype=np.float32)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exp = (code >> 3) & 0xF
        man = code & 0x7
        if exp == 0xF and man == 0x7:
            table[code] = np.nan
        elif exp == 0:
            table[code] = sign * math.ldexp(man, -9)  # subnormal: man/8 * 2^(1-7)
        else:
            table[code] = sign * math.ldexp(8 + man, exp - 10)  # (1+man/8) * 2^(exp-7)
    table.setflags(write=False)
    return table


_E4M3FN_TABLE = _build_e4m3fn_table()


def fp8_e4m3_to_f32(u8: np.ndarray) -> np.ndarray:
    """Decode float8 e4m3fn codes (stored as uint8) to float32 through a 256-entry table.

    Args:
        u8: uint8 codes, any shape.

    Returns:
        float32 array of the same shape (0x7F and 0xFF decode to NaN).
    """
    u8 = np.asarray(u8)
    if u8.dtype != np.uint8:
        raise TypeError(f"fp8_e4m3_to_f32 expects uint8 codes, got {u8.dtype}")
    return _E4M3FN_TABLE[u8]


def dequantize_fp8_blocks(
    w_u8: np.ndarray,
    scale_inv: np.ndarray,
    block: tuple[int, int] = (128, 128),
) -> np.ndarray:
    """Dequantize a block-scaled FP8 weight (Qwen/DeepSeek FP8 release format) to float32.

    Each weight is multiplied by the ``scale_inv`` of the ``block`` it falls in; the last row
    and column of blocks may be partial.

    Args:
        w_u8: [R, C] uint8 e4m3fn codes.
        scale_inv: [ceil(R/block[0]), ceil(C/block[1])] per-block multipliers (any float dtype;
            used as float32).
        block: block shape (rows, cols).

    Returns:
        [R, C] float32 array.
    """
    if w_u8.ndim != 2:
        raise ValueError(f"FP8 weight must be 2-D, got shape {w_u8.shape}")
    rows, cols = w_u8.shape
    br, bc = block
    expected = (-(-rows // br), -(-cols // bc))
    scale_inv = np.asarray(scale_inv, dtype=np.float32)
    if scale_inv.shape != expected:
        raise ValueError(
            f"scale_inv shape {scale_inv.shape} does not match weight {w_u8.shape} "
            f"in blocks of {block} (expected {expected})"
        )
    out = fp8_e4m3_to_f32(w_u8)
    # Broadcast each block's scale over a [nbr, br, nbc, bc] view of the padded-free interior,
    # then handle the ragged edges: simplest exact route is expanding the scales per row/col.
    row_scale_idx = np.arange(rows) // br
    col_scale_idx = np.arange(cols) // bc
    full = scale_inv[row_scale_idx][:, col_scale_idx]
    out *= full
    return out


def _decode_bf16(raw: np.ndarray) -> np.ndarray:
    return bf16_to_f32(raw.view(np.uint16))


def _decode_f16(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float16).astype(np.float32)


def _decode_f32(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float32).copy()


def _decode_f8_e4m3(raw: np.ndarray) -> np.ndarray:
    return fp8_e4m3_to_f32(raw.view(np.uint8))


# safetensors dtype string -> (bytes per element, decoder from a flat uint8 buffer to float32).
SAFETENSORS_FLOAT_DTYPES = {
    "BF16": (2, _decode_bf16),
    "F16": (2, _decode_f16),
    "F32": (4, _decode_f32),
    "F8_E4M3": (1, _decode_f8_e4m3),
}


def decode_to_f32(raw: np.ndarray | bytes | bytearray | memoryview, dtype: str, shape: Sequence[int]) -> np.ndarray:
    """Decode a tensor's raw little-endian safetensors bytes into a float32 array.

    Args:
        raw: the tensor's bytes (a bytes-like object or a numpy array of any dtype whose
            buffer holds exactly those bytes).
        dtype: the safetensors dtype string: "BF16", "F16", "F32" or "F8_E4M3".
        shape: the tensor's shape.

    Returns:
        A float32 array of ``shape`` (FP8 values are the raw codes decoded, without any
        block scale: apply ``dequantize_fp8_blocks`` for that).

    Example:
        >>> decode_to_f32(b"\\x80\\x3f", "BF16", (1,))
        array([1.], dtype=float32)
    """
    try:
        itemsize, decode = SAFETENSORS_FLOAT_DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"unsupported safetensors dtype {dtype!r}; expected one of {sorted(SAFETENSORS_FLOAT_DTYPES)}"
        ) from None
    if isinstance(raw, np.ndarray):
        buf = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    else:
        buf = np.frombuffer(raw, dtype=np.uint8)
    count = math.prod(shape)
    if buf.size != count * itemsize:
        raise ValueError(
            f"{buf.size} bytes cannot hold a {dtype} tensor of shape {tuple(shape)} ({count * itemsize} bytes expected)"
        )
    return decode(buf).reshape(tuple(shape))
