"""The pack format: the single contract between the converter and the runtime.

A pack is a folder::

    manifest.json                 written last; format name/version, config, quantization, layout
    experts/layer-NNN.bin         one file per MoE layer: header page + one aligned block per expert
    resident/*.safetensors        non-expert weights, named as mlx-lm's model expects after sanitize
    report.json, report.csv       quantization error per layer and tensor
    tokenizer.json, ...           tokenizer files, chat template, generation config, config.json

This package imports nothing else from moestream.
"""

from .errors import MoestreamError, PackError, SafetensorsError
from .expert_file import ExpertLayerWriter, expert_block_layout, quantized_shapes, round_up
from .manifest import (
    CHECKSUM_ALGO,
    DEFAULT_ALIGNMENT,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MIN_ALIGNMENT,
    READ_VERSIONS,
    Component,
    ExpertLayer,
    Manifest,
    QuantSpec,
    ResidentFile,
    ResidentTensor,
)
from .pack import Pack, component_views, file_checksum, open_pack
from .safetensors_io import SafetensorsReader, SafetensorsWriter, TensorInfo

__all__ = [
    "MoestreamError",
    "PackError",
    "SafetensorsError",
    "ExpertLayerWriter",
    "expert_block_layout",
    "quantized_shapes",
    "round_up",
    "CHECKSUM_ALGO",
    "DEFAULT_ALIGNMENT",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MIN_ALIGNMENT",
    "READ_VERSIONS",
    "Component",
    "ExpertLayer",
    "Manifest",
    "QuantSpec",
    "ResidentFile",
    "ResidentTensor",
    "Pack",
    "component_views",
    "file_checksum",
    "open_pack",
    "SafetensorsReader",
    "SafetensorsWriter",
    "TensorInfo",
]
