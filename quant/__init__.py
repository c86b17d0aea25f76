"""moestream.quant: group quantization of expert weights in MLX's affine layout.

``affine`` holds the numba kernels (MLX-exact round-to-nearest and a lower-error range
search), ``errors`` the error statistics they accumulate, and ``dtypes`` the decoders for
checkpoint formats numpy lacks (bfloat16, FP8 e4m3 with block scales).
"""

from .affine import (
    METHODS,
    SCALE_DTYPES,
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    dequantize,
    quantize,
    quantize_with_error,
)
from .dtypes import (
    SAFETENSORS_FLOAT_DTYPES,
    bf16_to_f32,
    decode_to_f32,
    dequantize_fp8_blocks,
    f32_to_bf16,
    fp8_e4m3_to_f32,
)
from .errors import ErrorStats

__all__ = [
    "METHODS",
    "SAFETENSORS_FLOAT_DTYPES",
    "SCALE_DTYPES",
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "ErrorStats",
    "bf16_to_f32",
    "decode_to_f32",
    "dequantize",
    "dequantize_fp8_blocks",
    "f32_to_bf16",
    "fp8_e4m3_to_f32",
    "quantize",
    "quantize_with_error",
]
