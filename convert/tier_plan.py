"""Planning per-expert widths for a conversion: routing counts from calibration, errors measured.

The allocation itself is :func:`moestream.quant.tiers.allocate_widths`. Here its two inputs come
from the checkpoint: each expert's routing frequency from a ``moestream calibrate`` file, and each
width's relative error on a few of the layer's experts (quantized now, with the conversion's own
method), so the trade-off follows this model rather than a rule of thumb.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np

from moestream.quant import quantize_with_error
from moestream.quant.calibration import Calibration
from moestream.quant.tiers import Width, allocate_widths

from .expert_reader import read_expert
from .family import ExpertSource
from .source import ConvertError, SourceCheckpoint

log = logging.getLogger(__name__)

SAMPLE_EXPERTS = 4  # per layer, for the error of each width
UNSEEN_WEIGHT = 0.02  # an expert calibration never routed to still counts this fraction of the mean


def routing_frequency(cal: Calibration, layer: int, num_experts: int, where: str) -> np.ndarray:
    """Smoothed routing frequency of each expert of ``layer`` (sums to 1)."""
    key = f"experts.{layer}.count"
    if key not in cal.arrays:
        raise ConvertError(f"{where}: no routing counts for layer {layer} (calibrated on another model?)")
    n = np.asarray(cal.arrays[key], np.float64)
    if n.shape != (num_experts,):
        raise ConvertError(f"{where}: layer {layer} has counts for {n.shape[0]} experts, the model has {num_experts}")
    n = n + UNSEEN_WEIGHT * max(n.mean(), 1e-9)
    return n / n.sum()


def width_errors(
    src: SourceCheckpoint, es: ExpertSource, intermediate: int, widths: list[Width], method: str, dtype: str
) -> dict[Width, float]:
    """Mean relative squared error of each width over a few experts of one layer (all three projections)."""

    picks = np.unique(np.linspace(0, es.num_experts - 1, min(SAMPLE_EXPERTS, es.num_experts)).round().astype(int))
    x = SimpleNamespace(source=es, intermediate=intermediate)
    out = {w: 0.0 for w in widths}
    for e in picks.tolist():
        mats = read_expert(src, x, e)
        for w in widths:
            err2 = norm2 = 0.0
            for m in mats.values():
                st = quantize_with_error(np.ascontiguousarray(m), w.bits, w.group_size, dtype, method)[3]
                err2 += st.sum_err2
                norm2 += st.sum_w2
            out[w] += err2 / max(norm2, 1e-30) / len(picks)
    return out


def plan_widths(
    src: SourceCheckpoint,
    sources: dict[int, tuple[ExpertSource, int]],
    widths: list[Width],
    budget: float,
    cal: Calibration,
    cal_path: str,
    method: str,
    dtype: str,
) -> dict[int, list[Width]]:
    """Width of every expert of every layer in ``sources`` (layer -> (expert source, intermediate))."""
    freq, err = {}, {}
    for layer, (es, inter) in sources.items():
        freq[layer] = routing_frequency(cal, layer, es.num_experts, cal_path)
        err[layer] = width_errors(src, es, inter, widths, method, dtype)
        log.info(
            "layer %d: relative error by width %s",
            layer,
            ", ".join(f"{w} {v:.2e}" for w, v in sorted(err[layer].items())),
        )
    try:
        return allocate_widths(freq, err, widths, budget, scale_bytes=4 if dtype == "float32" else 2)
    except ValueError as e:
        raise ConvertError(f"per-expert tiers: {e}") from None
