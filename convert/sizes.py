"""What a model would weigh as a pack, from its config alone: expert and resident bytes, and the
bytes a decoded token reads (for ``moestream doctor``'s table of known models)."""

from __future__ import annotations

import math

from moestream.layouts import expert_block_layout, round_up

from .family import family_for
from .plan import _resident_bits
from .synth import load_like


def model_sizes(
    like: str, bits: int = 4, resident_bits: int | None = None, group_size: int = 64, alignment: int = 16384
) -> dict:
    """Sizes of ``like`` (a known model's name or a config.json) converted at ``bits`` (experts) and
    ``resident_bits`` (default: as ``bits``). Resident bytes per token count the embedding table's
    one row, as the runtime reads it."""
    config = load_like(like)
    fam = family_for(config, str(like))
    layers = fam.moe_layers()
    per_token = total = 0
    for layer in layers:
        i, h = fam.expert_shape(layer)
        _, block = expert_block_layout(h, i, bits, group_size, group_size, "bfloat16")
        stride = round_up(block, alignment)
        per_token += fam.top_k * stride
        total += fam.num_experts * stride
    rb = resident_bits or bits
    resident = resident_token = 0
    for target, (shape, _) in fam.resident_params.items():
        n = math.prod(shape)
        rbits, group = _resident_bits(fam, target, tuple(shape), rb, group_size)
        size = n * (4 if len(shape) == 1 else 2) if rbits >= 16 else n * rbits // 8 + 4 * (n // group)
        resident += size
        resident_token += size // shape[0] if "embed_tokens" in target else size
    return {
        "model_type": fam.model_type,
        "num_experts": fam.num_experts,
        "top_k": fam.top_k,
        "moe_layers": len(layers),
        "bits": bits,
        "resident_bits": rb,
        "expert_bytes": total,
        "expert_bytes_per_token": per_token,
        "resident_bytes": resident,
        "resident_bytes_per_token": resident_token,
    }
