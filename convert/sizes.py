"""What a model would weigh as a pack, from its config alone: expert and resident bytes, and the
bytes a decoded token reads (for ``moestream doctor``'s table of known models)."""

from __future__ import annotations

import math

from moestream.layouts import expert_block_layout, round_up

from .family import family_for
from .plan import Options, _resident_bits
from .synth import load_like


def model_sizes(
    like: str,
    bits: int = 4,
    resident_bits: int | None = None,
    group_size: int = 64,
    alignment: int = 16384,
    down_bits: int | None = None,
    resident_kinds: dict[str, int] | None = None,
) -> dict:
    """Sizes of ``like`` (a known model's name or a config.json) converted at ``bits`` (experts; down_proj
    at ``down_bits``), ``resident_bits`` and ``resident_kinds`` (bits by tensor kind, as a recipe sets
    them); where none of the three is given, as ``convert --bits`` makes it by default
    (convert/defaults.py). Resident bytes per token count the embedding table's one row, as the runtime
    reads it."""
    if resident_bits is None and resident_kinds is None and down_bits is None:
        o = Options(bits=bits, group_size=group_size).with_defaults()
        resident_bits, resident_kinds, down_bits = o.resident_bits, o.resident_kinds, o.down_bits
    config = load_like(like)
    fam = family_for(config, str(like))
    layers = fam.moe_layers()
    per_token = total = 0
    for layer in layers:
        i, h = fam.expert_shape(layer)
        g = None if bits >= 16 else group_size
        _, block = expert_block_layout(h, i, bits, g, g, "bfloat16", down_bits or bits)
        stride = round_up(block, alignment)
        per_token += fam.top_k * stride
        total += fam.num_experts * stride
    rb = resident_bits or bits
    resident = resident_token = 0
    for target, (shape, _) in fam.resident_params.items():
        n = math.prod(shape)
        rbits, group = _resident_bits(fam, target, tuple(shape), rb, group_size, resident_kinds)
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
        "resident_kinds": resident_kinds,
        "down_bits": down_bits or bits,
        "expert_bytes": total,
        "expert_bytes_per_token": per_token,
        "resident_bytes": resident,
        "resident_bytes_per_token": resident_token,
    }
