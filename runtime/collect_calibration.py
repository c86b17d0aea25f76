"""``moestream calibrate``: run text through a pack and record :class:`~moestream.quant.Calibration`.

The model runs streamed from a pack (an 8-bit pack's activations are close to the source's) with
the CPU kernels, whose expert path exposes each expert's SwiGLU intermediate, in float32 throughout
(no int8 activations: their rounding would be noise in the statistics). Memory: the sums and
one window of activations, besides the runtime itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlx.core as mx

from moestream.layouts import PackError
from moestream.quant.calibration import Calibration

log = logging.getLogger(__name__)


def calibrate(
    pack: str | Path, text: str, max_tokens: int = 4096, window: int = 512, matrix_bytes: int = 1 << 30
) -> Calibration:
    """Run ``text`` (its first ``max_tokens`` tokens, in independent windows) through the pack.

    ``matrix_bytes``: budget for full second-moment matrices (GPTQ's input), per expert if they all
    fit, else pooled per MoE layer; the resident linears' only if they fit what remains.
    """
    from moestream.runtime.cpu import kernels as cpu_kernels
    from moestream.runtime.model import expert_parallel
    from moestream.runtime.model.blocks import get_switch, moe_blocks
    from moestream.runtime.model.cpu_layers import CpuQuantizedLinear
    from moestream.runtime.model.runtime import load

    if expert_parallel.launched():  # each rank would record its share of the experts only
        raise PackError("calibrate runs in one process: start it without mlx.launch")
    rt = load(pack, kernels="numba")
    int8, cpu_kernels.INT8_ACTIVATIONS = cpu_kernels.INT8_ACTIVATIONS, False  # statistics from exact products
    try:
        if not rt.cpu_kernels:
            raise PackError(f"{pack}: calibrate needs a quantized pack (an 8-bit one is closest to the source)")
        m = rt.pack.manifest
        blocks = moe_blocks(rt.model)
        dims = {
            i: (
                m.expert_layer(i).component("down_proj.weight").shape[0],
                m.expert_layer(i).component("gate_proj.weight").shape[0],
            )
            for i in blocks
        }
        pooled = sum(8 * (h * h + n * n) for h, n in dims.values())
        full = "expert" if pooled * m.num_experts <= matrix_bytes else "pooled" if pooled <= matrix_bytes else "none"
        left = matrix_bytes - {"expert": pooled * m.num_experts, "pooled": pooled, "none": 0}[full]
        linears = {
            name.replace(".inner.", "."): mod
            for name, mod in rt.model.named_modules()
            if isinstance(mod, CpuQuantizedLinear)
        }  # pack names carry no wrapper segments
        widths = {k: int(mod.inner["weight"].shape[-1]) * 32 // mod.inner.bits for k, mod in linears.items()}
        full_linears = sum(8 * w * w for w in widths.values()) <= left
        cal = Calibration(
            meta={"pack": str(pack), "window": window, "expert_matrices": full, "linear_matrices": full_linears}
        )
        for layer, mlp in blocks.items():
            get_switch(mlp).recorder = cal.expert_recorder(layer, m.num_experts, *dims[layer], full=full)
        for name, mod in linears.items():
            mod.recorder = cal.linear_recorder(name, widths[name], full=full_linears)
        ids = rt.tokenizer.encode(text)[:max_tokens]
        if len(ids) < 2:
            raise PackError("calibration text: fewer than 2 tokens")
        from tqdm import tqdm

        for i in tqdm(range(0, len(ids), window), desc="calibrate", unit="window", leave=False):
            mx.eval(rt.model(mx.array(ids[i : i + window])[None]))
        cal.meta["tokens"] = len(ids)
        log.info(
            "calibrated on %d tokens: %d MoE layers (%s matrices), %d linears",
            len(ids),
            len(blocks),
            full,
            len(linears),
        )
        return cal
    finally:
        cpu_kernels.INT8_ACTIVATIONS = int8
        rt.close()
