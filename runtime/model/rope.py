"""YaRN without truncation: the rope gpt-oss was trained with, which mlx-lm's ``YarnRoPE`` does not build.

YaRN blends interpolated and original rope frequencies over a ramp between two "correction"
dimensions. mlx-lm always rounds those outward (``floor``/``ceil``); transformers does so only while
the config's ``truncate`` is true, and gpt-oss's config sets ``"truncate": false``. With rounding the
ramp is shifted (for gpt-oss-20b: 8..18 instead of 8.09..17.4) and mlx-lm's logits differ from
transformers' (float32, tiny model: 8e-3 instead of 2e-6). :func:`untruncate_yarn` recomputes the
frequencies of mlx-lm's rope modules in place; everything else (mscale, the kernel) stays mlx-lm's.
"""

from __future__ import annotations

import logging
import math

import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger(__name__)


def yarn_freqs(
    dims: int, base: float, factor: float, original_max: int, beta_fast: float, beta_slow: float
) -> mx.array:
    """Rope frequencies (as mlx-lm's ``YarnRoPE._freqs``) with the correction range left unrounded."""

    def corr(rot: float) -> float:
        return dims * math.log(original_max / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(corr(beta_fast), 0), min(corr(beta_slow), dims - 1)
    if low == high:
        high += 0.001
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extra = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    inter = factor * extra
    mask = 1.0 - ramp
    return (inter * extra) / (inter * mask + extra * (1 - mask))


def untruncate_yarn(model: nn.Module, config: dict) -> int:
    """Where ``config``'s yarn rope says ``truncate: false``, rebuild mlx-lm's YarnRoPE frequencies
    without rounding. Returns the number of rope modules changed."""
    from mlx_lm.models.rope_utils import YarnRoPE

    tc = config.get("text_config", config)
    rs = tc.get("rope_scaling") or tc.get("rope_parameters") or {}
    if rs.get("truncate", True) or (rs.get("rope_type") or rs.get("type")) != "yarn":
        return 0
    base = rs.get("rope_theta", tc.get("rope_theta"))
    n = 0
    for _, m in model.named_modules():
        if isinstance(m, YarnRoPE):
            m._freqs = yarn_freqs(
                m.dims,
                float(base),
                float(rs["factor"]),
                int(rs.get("original_max_position_embeddings", 4096)),
                float(rs.get("beta_fast", 32)),
                float(rs.get("beta_slow", 1)),
            )
            n += 1
    if n:
        log.info("yarn rope: correction range not truncated (config truncate=false), %d modules", n)
    return n
