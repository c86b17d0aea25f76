"""Source checkpoints: resolve a local folder or hub id, index every tensor, read bounded slices.

A Hugging Face checkpoint is ``config.json`` plus one or more safetensors shards (with
``model.safetensors.index.json`` when sharded). :class:`SourceCheckpoint` reads every shard's header
up front (so a truncated shard or a tensor the index promises but no shard holds fails before any
output is written) and then serves float32 slices: one expert's rows of a fused tensor, or one 2-D
tensor, never a whole fused tensor.

mlx-lm's own conversions (e.g. mlx-community 4-bit folders) are sources too: config.json has
``quantization`` (``group_size``, ``bits``, per-module overrides) and a quantized module stores
``X.weight`` (uint32 codes) with ``X.scales`` and ``X.biases``. :meth:`SourceCheckpoint.quantized`
names such tensors' bits and group size; float reads dequantize them (for requantizing), and
:meth:`SourceCheckpoint.read_quantized_rows` hands out the stored arrays (for repacking unchanged).

compressed-tensors ``pack-quantized`` INT4 checkpoints (Kimi K2 Thinking, Kimi K2.5; see :mod:`.compressed`) store
``X.weight_packed`` + ``X.weight_scale`` (+ ``X.weight_shape``, ``X.weight_zero_point``) for a quantized ``X.weight``:
:attr:`SourceCheckpoint.packed` indexes them, :meth:`~SourceCheckpoint.logical_name` maps ``X.weight_packed`` to
``X.weight``, float reads dequantize them exactly, and :meth:`~SourceCheckpoint.packed_rows` hands out MLX's affine
arrays for the same values (for passing them through). Any other ``quantization_config`` than those moestream reads
stops :meth:`SourceCheckpoint.open` with one line naming it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from moestream.layouts import SafetensorsReader, TensorInfo
from moestream.layouts.errors import MoestreamError, OptionError
from moestream.quant.dtypes import decode_to_f32, dequantize_fp8_blocks

from . import compressed

log = logging.getLogger(__name__)

# Files a conversion needs from a hub repo (weights, config, tokenizer, chat template, license).
ALLOW_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "LICENSE*",
]
# Copied into the pack next to the weights.
EXTRA_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "LICENSE",
]
FLOAT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F8_E4M3": "bfloat16"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ConvertError(MoestreamError):
    """The source checkpoint or the conversion options are unusable."""


class ConvertOptionError(ConvertError, OptionError):
    """A conversion option with a value that cannot be used (``option`` names the argument)."""


def resolve_source(source: str, revision: str | None = None) -> tuple[Path, dict]:
    """A local folder, or a hub id fetched with ``snapshot_download`` (only the needed files).

    Returns:
        the folder, and the provenance to record in the manifest.
    """
    p = Path(source).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConvertError(f"{p}: not a folder (expected a Hugging Face checkpoint folder)")
        return p, {"kind": "local", "path": str(p.resolve())}
    if not HUB_ID.match(source):
        raise ConvertError(f"{source}: no such folder, and not a hub id of the form owner/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    log.info("downloading %s (revision %s)", source, revision or "main")
    try:
        folder = snapshot_download(source, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise ConvertError(f"{source}: cannot download from the hub ({str(e).splitlines()[0]})") from None
    folder = Path(folder)
    return folder, {
        "kind": "hub",
        "repo_id": source,
        "revision": revision or "main",
        "commit": folder.name,
        "path": str(folder),
    }


@dataclass
class SourceCheckpoint:
    """Every tensor of a checkpoint folder, by name, with bounded float32 reads.

    Example:
        >>> src = SourceCheckpoint.open(Path("Qwen3.5-35B-A3B"))
        >>> gate_up = src.read_rows_f32("model.language_model.layers.0.mlp.experts.gate_up_proj", 5, 6)
    """

    folder: Path
    config: dict
    readers: dict[str, SafetensorsReader] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)  # tensor name -> shard file name
    quantization: str | None = None  # the source's quantization_config kind (compressed.source_quantization)
    packed: dict[str, compressed.PackedWeight] = field(default_factory=dict)  # X.weight_packed -> its tensors

    @classmethod
    def open(cls, folder: Path) -> "SourceCheckpoint":
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise ConvertError(f"{cfg_path}: missing (not a Hugging Face checkpoint folder)")
        try:
            config = json.loads(cfg_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConvertError(f"{cfg_path}: not valid JSON ({e})") from None
        try:
            kind = compressed.source_quantization(config)
        except compressed.SchemeError as e:
            raise ConvertError(f"{cfg_path}: {e}") from None
        if kind == compressed.METHOD and compressed.quantization_config(config).get("kv_cache_scheme"):
            log.info("%s: kv_cache_scheme not applied: the runtime keeps the KV cache in float", cfg_path)
        src = cls(folder, config, quantization=kind)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (KeyError, TypeError, json.JSONDecodeError) as e:
                raise ConvertError(f"{index}: malformed index ({e})") from None
            shards = sorted(set(weight_map.values()))
        else:
            weight_map, shards = None, sorted(p.name for p in folder.glob("*.safetensors"))
        if not shards:
            raise ConvertError(f"{folder}: no *.safetensors files")
        for name in shards:
            if not (folder / name).is_file():
                raise ConvertError(f"{folder / name}: missing shard (listed in {index.name})")
            r = src.readers[name] = SafetensorsReader(folder / name)
            for t in r.tensors:
                if t in src.where:
                    raise ConvertError(f"{folder / name}: tensor {t} also in {src.where[t]}")
                src.where[t] = name
        if weight_map is not None:
            for t, f in weight_map.items():
                if src.where.get(t) != f:
                    raise ConvertError(f"{folder / f}: tensor {t} listed in {index.name} but not in that shard")
            for t, f in src.where.items():
                if t not in weight_map:
                    raise ConvertError(f"{folder / f}: tensor {t} is not listed in {index.name}")
        src._index_packed(cfg_path)
        return src

    def _index_packed(self, cfg_path: Path) -> None:
        """Index the compressed-tensors INT4 weights (a ``weight_packed`` under another config is refused)."""
        first = next((t for t in self.where if t.endswith(".weight_packed")), None)
        if first is None:
            return
        if self.quantization != compressed.METHOD:
            raise ConvertError(
                f"{self.file_of(first)}: tensor {first} is compressed-tensors packed, but {cfg_path.name} has no "
                f"compressed-tensors quantization_config"
            )
        scheme = compressed.parse_scheme(compressed.quantization_config(self.config))
        headers = {t: (self.info(t).dtype, tuple(self.info(t).shape)) for t in self.where}
        try:
            self.packed = compressed.index_packed(headers, scheme)
        except compressed.SchemeError as e:
            name, problem = e.args
            raise ConvertError(f"{self.file_of(name)}: tensor {name}: {problem}") from None

    # -- lookups ---------------------------------------------------------------------------------
    @property
    def names(self) -> set[str]:
        return set(self.where)

    def info(self, name: str) -> TensorInfo:
        return self.readers[self.where[name]].tensors[name]

    def file_of(self, name: str) -> Path:
        return self.folder / self.where[name]

    def logical_name(self, name: str) -> str | None:
        """The name a tensor stands for: ``X.weight`` for a compressed-tensors ``X.weight_packed``, None for the
        tensors read along with another (fp8 block scales, mlx-lm's ``.scales``/``.biases``, a packed weight's
        scale, shape and zero points), else ``name`` itself."""
        if name in self.packed:
            return name[: -len("_packed")]
        if name.endswith("weight_scale_inv"):
            return None
        base = name.rsplit(".", 1)[0]
        if name.endswith((".scales", ".biases")) and self.where.get(f"{base}.weight") is not None:
            if self.info(f"{base}.weight").dtype == "U32":
                return None
        for side in (".weight_scale", ".weight_shape", ".weight_zero_point"):
            if name.endswith(side) and name[: -len(side)] + ".weight_packed" in self.packed:
                return None
        return name

    def side_tensors(self, name: str) -> list[str]:
        """The tensors read together with ``name`` (its scales, biases, shape, zero points)."""
        if name in self.packed:
            return self.packed[name].sides
        base = name[: -len("weight")]
        out = [name + "_scale_inv"] if name + "_scale_inv" in self.where else []
        if self.info(name).dtype == "U32":
            out += [n for n in (base + "scales", base + "biases") if n in self.where]
        return out

    def stored_nbytes(self, name: str) -> int:
        """Bytes of ``name`` and its side tensors in the checkpoint."""
        return self.info(name).nbytes + sum(self.info(n).nbytes for n in self.side_tensors(name))

    def quantized(self, name: str) -> tuple[int, int] | None:
        """(bits, group size) of an mlx-lm-quantized ``X.weight`` (uint32 + ``X.scales``/``X.biases``) or of a
        compressed-tensors ``X.weight_packed`` (4 bits)."""
        if name in self.packed:
            return 4, self.packed[name].group
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if base is None or self.info(name).dtype != "U32" or f"{base}.scales" not in self.where:
            return None
        q = self.config.get("quantization") or {}
        mod = q.get(base) if isinstance(q.get(base), dict) else q
        if "group_size" not in mod or f"{base}.biases" not in self.where:
            raise ConvertError(
                f"{self.file_of(name)}: {name} is uint32 but config.json has no affine "
                f'"quantization" (group_size, bits) for it'
            )
        group = int(mod["group_size"])
        packed, groups = self.info(name).shape[-1], self.info(f"{base}.scales").shape[-1]
        bits, rem = divmod(packed * 32, groups * group)
        if rem or bits not in (2, 3, 4, 5, 6, 8) or ("bits" in mod and int(mod["bits"]) != bits):
            raise ConvertError(
                f"{self.file_of(name)}: {name} has {packed} words per row and {groups} groups: "
                f"not {mod.get('bits', '?')}-bit with group size {group}"
            )
        return bits, group

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's logical shape (for a quantized weight: columns before packing)."""
        if name in self.packed:
            return self.packed[name].shape
        shape = self.info(name).shape
        q = self.quantized(name)
        return shape if q is None else (*shape[:-1], shape[-1] * 32 // q[0])

    def read_quantized_rows(self, name: str, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows of a quantized weight as stored: ``weight`` (uint32), ``scales``, ``biases`` (raw)."""
        base = name[: -len(".weight")]
        return {
            part: self.readers[self.where[n]].read_rows(n, start, stop)
            for part, n in (("weight", name), ("scales", f"{base}.scales"), ("biases", f"{base}.biases"))
        }

    def _packed_raw(self, name: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Rows of a compressed-tensors weight as stored: its words, scales, zero-point words (or None)."""
        pw = self.packed[name]
        if start == 0 and stop == pw.shape[-2] and pw.shape_tensor is not None and len(pw.shape) == 2:
            st = self.info(pw.shape_tensor)
            got = self.readers[self.where[pw.shape_tensor]].read(pw.shape_tensor).reshape(-1).tolist()
            if st.dtype not in ("I32", "I64") or tuple(got) != tuple(pw.shape):
                raise ConvertError(
                    f"{self.file_of(pw.shape_tensor)}: tensor {pw.shape_tensor} says {got}, but {name} and "
                    f"{pw.scale} hold {list(pw.shape)}"
                )
        words = self.readers[self.where[name]].read_rows(name, start, stop)
        scale = self.readers[self.where[pw.scale]].read_rows(pw.scale, start, stop)
        zp = None
        if pw.zero_point is not None:
            r0, r1 = start, stop
            if len(pw.shape) == 2:  # packed eight rows to a word: slices start on a word
                if start % 8 or (stop % 8 and stop != pw.shape[0]):
                    raise ConvertError(
                        f"{self.file_of(name)}: {name}: row slice {start}:{stop} splits packed zero points"
                    )
                r0, r1 = start // 8, -(-stop // 8)
            zp = self.readers[self.where[pw.zero_point]].read_rows(pw.zero_point, r0, r1)
        return words, scale, zp

    def packed_rows(self, name: str, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows of a compressed-tensors weight as MLX's affine arrays (:func:`.compressed.mlx_parts`): ``weight``
        uint32 (the source's words), ``scales`` and ``biases`` float32 (exact), ``raw_scales`` as stored."""
        words, raw, zp = self._packed_raw(name, start, stop)
        w, sc, bi = compressed.mlx_parts(words, decode_to_f32(raw, self.packed[name].scale_dtype, raw.shape), zp)
        return {"weight": w, "scales": sc, "biases": bi, "raw_scales": raw}

    def _dequantize_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        import mlx.core as mx

        bits, group = self.quantized(name)
        parts = self.read_quantized_rows(name, start, stop)
        base = name[: -len(".weight")]
        sb = [decode_to_f32(parts[p], self.info(f"{base}.{p}").dtype, parts[p].shape) for p in ("scales", "biases")]
        w = parts["weight"]
        flat = mx.dequantize(
            mx.array(w.reshape(-1, w.shape[-1])),
            mx.array(sb[0].reshape(-1, sb[0].shape[-1])),
            mx.array(sb[1].reshape(-1, sb[1].shape[-1])),
            group_size=group,
            bits=bits,
        )
        return np.array(flat.astype(mx.float32)).reshape(*w.shape[:-1], -1)

    def float_dtype(self) -> str:
        """The checkpoint's float type (bf16 for fp8 releases): the dtype of scales and biases."""
        counts: dict[str, int] = {}
        for r in self.readers.values():
            for t in r.tensors.values():
                if t.dtype in FLOAT_DTYPES and not t.name.endswith("weight_scale_inv"):
                    counts[t.dtype] = counts.get(t.dtype, 0) + t.nbytes
        if not counts:
            raise ConvertError(f"{self.folder}: no floating-point tensors")
        return FLOAT_DTYPES[max(counts, key=counts.get)]

    # -- reads -----------------------------------------------------------------------------------
    def read_rows_f32(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of tensor ``name`` as float32 (fp8 dequantized with its block scales)."""
        info = self.info(name)
        if name in self.packed:
            pw = self.packed[name]
            words, raw, zp = self._packed_raw(name, start, stop)
            return compressed.dequantize(words, decode_to_f32(raw, pw.scale_dtype, raw.shape), zp, pw.shape[-1])
        if info.dtype == "U32" and self.quantized(name):
            return self._dequantize_rows(name, start, stop)
        if info.dtype not in FLOAT_DTYPES:
            raise ConvertError(f"{self.file_of(name)}: tensor {name} has dtype {info.dtype}, expected a float type")
        raw = self.readers[self.where[name]].read_rows(name, start, stop)
        if info.dtype != "F8_E4M3":
            return decode_to_f32(raw, info.dtype, raw.shape)
        scale_name = name + "_scale_inv" if name.endswith(".weight") else name + ".weight_scale_inv"
        if scale_name not in self.where:
            raise ConvertError(f"{self.file_of(name)}: fp8 tensor {name} has no {scale_name}")
        if len(info.shape) != 2:
            raise ConvertError(f"{self.file_of(name)}: fp8 tensor {name} is not 2-D")
        block = 128
        if start % block:
            raise ConvertError(f"{self.file_of(name)}: fp8 tensor {name}: row slice not block aligned")
        s_info = self.info(scale_name)
        scale = decode_to_f32(self.readers[self.where[scale_name]].read(scale_name), s_info.dtype, s_info.shape)
        rows_blocks = -(-info.shape[0] // block)
        if scale.shape != (rows_blocks, -(-info.shape[1] // block)):
            raise ConvertError(
                f"{self.file_of(scale_name)}: {scale_name} has shape {list(scale.shape)}, "
                f"expected {[rows_blocks, -(-info.shape[1] // block)]} for 128x128 blocks"
            )
        scale = scale[start // block : -(-stop // block)]
        return dequantize_fp8_blocks(raw, scale, (block, block))

    def read_f32(self, name: str) -> np.ndarray:
        info = self.info(name)
        return (
            self.read_rows_f32(name, 0, info.shape[0])
            if info.shape
            else decode_to_f32(self.readers[self.where[name]].read(name), info.dtype, ())
        )

    # -- provenance ------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, dict]:
        """Size and header hash of every shard (cheap; the header fixes names, shapes and offsets),
        plus the hub blob id (the LFS sha256) when the file lives in the hub cache."""
        out = {}
        for name, r in sorted(self.readers.items()):
            entry = {"size": r.size, "header_xxh3": xxhash.xxh3_64_hexdigest(r.header_bytes)}
            p = self.folder / name
            if p.is_symlink():
                entry["blob"] = Path(os.readlink(p)).name
            out[name] = entry
        return out

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
