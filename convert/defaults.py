"""What ``convert --bits B`` does when nothing else is given: method, resident widths, down projections.

Chosen by ``benchmarks/defaults_study.py`` over two trained models for the best KL per byte a token reads
(at Qwen3.5-397B-A17B's shapes), and recorded in ``benchmarks/defaults_study.json``; a test checks that this
table is the study's choice. Residents are bf16 (16) unless their kind is listed at a lower width; routers
never go below 8 bits (the families' own floor), norms and other 1-D tensors are never quantized.
docs/recipes-and-quality.md shows the figures behind each row.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Default:
    method: str  # rtn | clip
    resident_bits: int  # every resident kind not listed below
    resident_kinds: dict[str, int] = field(default_factory=dict)  # kinds set apart (see plan.RESIDENT_KINDS)
    down_bits: int | None = None  # the routed experts' down_proj, when not at --bits
    # With --calibration and no --method: how the quantizers use the statistics (gptq, or clip weighted by
    # them), or None where neither measured no worse than without on every model (the statistics then
    # serve the per-expert tiers only, and the pack is the one made without them).
    calibrated: str | None = None


_ALL8 = {"attention": 8, "linear_attention": 8, "shared_expert": 8, "router": 8, "embedding": 8, "lm_head": 8}
DEFAULTS: dict[int, Default] = {
    2: Default("clip", 16, _ALL8, down_bits=3),
    3: Default("clip", 16, _ALL8, down_bits=4, calibrated="gptq"),
    4: Default("clip", 16, {"attention": 8, "shared_expert": 8, "lm_head": 8}, down_bits=8),
    8: Default("clip", 16),
    16: Default("clip", 16),
}


def default_for(bits: int) -> Default:
    """The defaults at ``bits`` (experts' width)."""
    return DEFAULTS.get(bits, DEFAULTS[4])
