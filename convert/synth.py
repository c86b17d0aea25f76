"""``moestream synth``: a pack with a real model's shapes, random contents, and no source checkpoint.

Users run it to learn what their machine would do with a model before downloading it: the expert
blocks have exactly the real layout and size (random codes, scales and biases of a realistic
magnitude), resident tensors have the real names, shapes and bits, and only ``layers`` of the
model's layers are written (keeping at least one full-attention layer, which mlx-lm needs). With
``experts``, each MoE layer holds that many experts instead of the model's own count (same shapes per
expert; the router has that many rows): a model's full depth at a size a small disk and RAM can hold.
The manifest is marked ``synthetic``; its ``source`` records the layers and experts written and the
model's own expert count. Expert blocks stream to disk as fast as they are generated.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moestream import __version__
from moestream.layouts import (
    ExpertLayerWriter,
    Manifest,
    ResidentFile,
    ResidentTensor,
    SafetensorsWriter,
    expert_block_layout,
    file_checksum,
    round_up,
)
from moestream.quant import f32_to_bf16

from .family import family_for
from .plan import _resident_bits, resident_file_for
from .source import ConvertError, ConvertOptionError
from .tiny import write_byte_tokenizer

log = logging.getLogger(__name__)
WEIGHT_STD = 0.02  # typical std of a trained model's linear weights (sets scales and biases)


def known_configs() -> list[str]:
    return sorted(
        p.name[:-5]
        for p in resources.files("moestream.convert").joinpath("known_configs").iterdir()
        if p.name.endswith(".json")
    )


def load_like(like: str) -> dict:
    """A config.json path, or a known model name (see :func:`known_configs`)."""
    p = Path(like)
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConvertError(f"{p}: not valid JSON ({e})") from None
    f = resources.files("moestream.convert").joinpath("known_configs", f"{like.lower()}.json")
    if not f.is_file():
        raise ConvertOptionError(
            "like", like, f"no such config file or known model (known: {', '.join(known_configs())})"
        )
    return json.loads(f.read_text())


# Where families' configs keep the routed expert count (Qwen, DeepSeek, Mixtral and gpt-oss).
EXPERT_COUNT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts")
TOP_K_KEYS = ("num_experts_per_tok", "experts_per_token")


def model_experts(config: dict) -> int | None:
    """The routed experts per MoE layer that ``config`` declares (None if it names none)."""
    tc = config.get("text_config", config)
    return next((int(tc[k]) for k in EXPERT_COUNT_KEYS if tc.get(k)), None)


def reduced_config(config: dict, layers: int, experts: int | None = None) -> dict:
    """The config with only ``layers`` layers (at least one of them full attention) and, with
    ``experts``, that many routed experts per MoE layer (at least the model's top-k)."""
    config = json.loads(json.dumps(config))
    tc = config.get("text_config", config)
    n = tc["num_hidden_layers"]
    if not 1 <= layers <= n:
        raise ConvertOptionError("layers", layers, f"the model has {n} layers")
    if experts is not None:
        own = model_experts(config)
        k = next((int(tc[key]) for key in TOP_K_KEYS if tc.get(key)), 1)
        if own is None:
            raise ConvertOptionError(
                "experts", experts, f"the config names no expert count ({', '.join(EXPERT_COUNT_KEYS)})"
            )
        if not k <= experts <= own:
            raise ConvertOptionError(
                "experts", experts, f"expected from the model's top-k ({k}) to its own count ({own})"
            )
        groups = int(tc.get("n_group") or 1)  # DeepSeek's grouped routing splits the experts evenly
        if experts % groups:
            raise ConvertOptionError("experts", experts, f"the router splits experts into {groups} groups")
        for key in EXPERT_COUNT_KEYS:
            if tc.get(key):
                tc[key] = experts
    if layers < 2 and tc.get("full_attention_interval", 4) > 1:
        raise ConvertOptionError(
            "layers",
            layers,
            "this model mixes linear and full attention, and mlx-lm's "
            "model needs one layer of each: use --layers 2 or more",
        )
    k = min(tc.get("full_attention_interval", 4), layers)
    tc.update(
        num_hidden_layers=layers,
        full_attention_interval=k,
        layer_types=["full_attention" if (i + 1) % k == 0 else "linear_attention" for i in range(layers)],
    )
    tc.pop("mtp_num_hidden_layers", None)
    tc.pop("quantization_config", None)  # Kimi K2.5 also keeps it in text_config; synth packs are its own
    config.pop("quantization_config", None)
    config.pop("vision_config", None)
    return config


def _random_block(rng: np.random.Generator, comps, block_bytes: int, bits: int) -> np.ndarray:
    block = rng.integers(0, 256, block_bytes, dtype=np.uint8)
    for c in comps:
        if c.name.endswith((".scales", ".biases")):
            n = c.nbytes // 2
            span = WEIGHT_STD * 6 / ((1 << bits) - 1) if c.name.endswith(".scales") else -3 * WEIGHT_STD
            vals = (span * rng.uniform(0.7, 1.3, n)).astype(np.float32)
            block[c.offset : c.offset + c.nbytes] = f32_to_bf16(vals).view(np.uint8)
    return block


def synth(
    like: str,
    output: str | os.PathLike,
    layers: int = 4,
    bits: int = 4,
    group_size: int = 64,
    resident_bits: int | None = None,
    seed: int = 0,
    alignment: int = 16384,
    jobs: int | None = None,
    force: bool = False,
    progress: bool = False,
    routing: str = "uniform",
    experts: int | None = None,
) -> Manifest:
    """Write a synthetic pack shaped like ``like``. Returns its manifest.

    ``experts``: routed experts per MoE layer (None: the model's own count); each keeps the model's
    shapes, so a token's bytes and compute are the real model's at the same top-k.

    ``routing``: ``uniform``, or ``zipf:S`` for hot experts: router row ``e`` is scaled by
    ``(rank(e) + 1) ** -S`` (a random rank per layer), so its logits spread wider and it lands in the
    top-k more often, as popular experts do in trained models.
    """
    skew = _parse_routing(routing)
    if bits not in (2, 3, 4, 8):
        raise ConvertOptionError("bits", bits, "synth supports 2, 3, 4 and 8")
    full = load_like(like)
    config = reduced_config(full, layers, experts)
    fam = family_for(config, str(like))
    out = Path(output)
    if out.exists():
        if not (out / "manifest.json").exists() and any(out.iterdir()):
            raise ConvertError(f"{out}: exists, is not empty and is not a moestream pack; refusing to write into it")
        if (out / "manifest.json").exists() and not force:
            raise ConvertError(f"{out}: already a pack (pass --force to replace it)")
        (out / "manifest.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    rb = resident_bits or bits
    layer_list = fam.moe_layers()
    total = 0
    plans = []
    for layer in layer_list:
        i, h = fam.expert_shape(layer)
        comps, block = expert_block_layout(h, i, bits, group_size, group_size, "bfloat16")
        plans.append((layer, comps, block))
        total += fam.num_experts * round_up(block, alignment)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="synth", disable=not progress)
    experts = []
    with ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        for layer, comps, block in plans:
            w = ExpertLayerWriter(
                out / f"experts/layer-{layer:03d}.bin", layer, fam.num_experts, comps, block, alignment
            )
            w.open()
            try:

                def one(e: int) -> None:
                    w.write_expert(e, _random_block(np.random.default_rng([seed, layer, e]), comps, block, bits))
                    bar.update(w.stride)

                list(pool.map(one, range(fam.num_experts)))
                experts.append(w.finish(f"experts/layer-{layer:03d}.bin"))
            except BaseException:
                w.abort()
                raise
    bar.close()
    rfiles, rtensors = _write_residents(fam, out, rb, group_size, np.random.default_rng([seed, 10**6]), skew)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    write_byte_tokenizer(out)
    m = Manifest(
        model_type=fam.model_type,
        config=fam.text_config,
        num_experts=fam.num_experts,
        top_k=fam.top_k,
        quantization={
            "experts": {
                "bits": bits,
                "group_size": group_size,
                "mode": "affine",
                "method": "random",
                "scale_dtype": "bfloat16",
            },
            "resident": {"bits": rb, "group_size": group_size, "mode": "affine", "method": "random"},
            "dtype": "bfloat16",
        },
        experts=experts,
        resident_files=rfiles,
        resident_tensors=rtensors,
        alignment=alignment,
        source={
            "kind": "synthetic",
            "like": str(like),
            "layers": layers,
            "experts": fam.num_experts,
            "model_experts": model_experts(full) or fam.num_experts,
            "seed": seed,
            "routing": routing,
        },
        extra_files=[
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "generation_config.json",
        ],
        synthetic=True,
        created_by=f"moestream {__version__}",
    )
    m.check_layout()
    m.save(out)
    return m


def _parse_routing(routing: str) -> float:
    if routing == "uniform":
        return 0.0
    if routing.startswith("zipf:"):
        try:
            return float(routing[5:])
        except ValueError:
            pass
    raise ConvertOptionError("routing", routing, "expected uniform or zipf:S (e.g. zipf:1.0)")


def _write_residents(fam, out: Path, rbits: int, g: int, rng: np.random.Generator, skew: float = 0.0):
    files: dict[str, list] = {}
    for target, (shape, _) in fam.resident_params.items():
        files.setdefault(resident_file_for(target), []).append((target, tuple(shape)))
    rfiles, rtensors = [], {}
    for fname, tensors in sorted(files.items()):
        w = SafetensorsWriter(out / fname, metadata={"format": "mlx", "producer": "moestream synth"})
        specs = []
        for target, shape in tensors:
            bits, group = _resident_bits(fam, target, shape, rbits, g)
            dtype = "float32" if len(shape) == 1 else "bfloat16"
            base = target[: -len(".weight")] if target.endswith(".weight") else target
            if bits >= 16:
                w.declare(target, "F32" if dtype == "float32" else "BF16", shape)
            else:
                w.declare(f"{base}.weight", "U32", (*shape[:-1], shape[-1] * bits // 32))
                for part in ("scales", "biases"):
                    w.declare(f"{base}.{part}", "BF16", (*shape[:-1], shape[-1] // group))
            specs.append((target, base, shape, bits, group, dtype))
            rtensors[target] = ResidentTensor(fname, list(shape), dtype, bits, group)
        w.begin()
        for target, base, shape, bits, group, dtype in specs:
            _write_values(
                w, rng, target, base, shape, bits, group, dtype, skew if target.endswith("mlp.gate.weight") else 0.0
            )
        w.finish()
        rfiles.append(ResidentFile(fname, (out / fname).stat().st_size, file_checksum(out / fname)))
    return rfiles, rtensors


def _write_values(w, rng, target, base, shape, bits, group, dtype, skew: float = 0.0) -> None:
    rows, cols = int(np.prod(shape[:-1])) if len(shape) > 1 else 1, shape[-1]
    step = max(1, (8 << 20) // cols)
    if bits >= 16:
        if target.endswith("A_log"):
            vals = np.log(rng.uniform(1, 16, shape))
        elif len(shape) == 1:
            vals = np.ones(shape)
        else:
            vals = rng.standard_normal(shape) * WEIGHT_STD
        w.write(target, vals.astype(np.float32) if dtype == "float32" else f32_to_bf16(vals))
        return
    for r0 in range(0, rows, step):
        r = min(step, rows - r0)
        w.write(f"{base}.weight", rng.integers(0, 2**32, (r, cols * bits // 32), dtype=np.uint32))
    n = rows * (cols // group)
    row_scale = np.ones(rows)
    if skew:  # hot experts: a random rank per router row, scaled by (rank + 1) ** -skew
        row_scale = (rng.permutation(rows) + 1.0) ** -skew * np.sqrt(rows)
    per_group = np.repeat(row_scale, cols // group)
    w.write(f"{base}.scales", f32_to_bf16(rng.uniform(0.7, 1.3, n) * WEIGHT_STD * 6 / ((1 << bits) - 1) * per_group))
    w.write(f"{base}.biases", f32_to_bf16(-3 * WEIGHT_STD * rng.uniform(0.7, 1.3, n) * per_group))


__all__ = ["synth", "known_configs", "load_like", "model_experts", "reduced_config"]
