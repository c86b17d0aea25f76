"""``moestream calibrate``: run text through a pack and record :class:`~moestream.quant.Calibration`.

The model runs streamed from a pack (an 8-bit pack's activations are close to the source's) with
the CPU kernels, whose expert path exposes each expert's SwiGLU intermediate. Memory: the sums and
one window of activations, besides the runtime itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlx.core as mx

from moestream.layouts import PackError
from moestream.quant.calibration import Calibration

log = logging.getLogger(__name__)


def calibrate(pack: str | Path, text: str, max_tokens: int = 4096, window: int = 512) -> Calibration:
    """Run ``text`` (its first ``max_tokens`` tokens, in independent windows) through the pack."""
    from .model import load, moe_blocks
    from .streamed import CpuQuantizedLinear

    rt = load(pack, cpu_kernels=True)
    try:
        if not rt.cpu_kernels:
            raise PackError(f"{pack}: calibrate needs a quantized pack (an 8-bit one is closest to the source)")
        cal = Calibration(meta={"pack": str(pack), "window": window})
        for layer, mlp in moe_blocks(rt.model).items():
            x = rt.pack.manifest.expert_layer(layer)
            hidden, inter = x.component("down_proj.weight").shape[0], x.component("gate_proj.weight").shape[0]
            mlp.switch_mlp.recorder = cal.expert_recorder(layer, rt.pack.manifest.num_experts, hidden, inter)
        for name, m in rt.model.named_modules():
            if isinstance(m, CpuQuantizedLinear):
                # Module paths carry wrapper segments (EarlySharedExpert's .inner); pack names do not.
                m.recorder = cal.linear_recorder(name.replace(".inner.", "."))
        ids = rt.tokenizer.encode(text)[:max_tokens]
        if len(ids) < 2:
            raise PackError("calibration text: fewer than 2 tokens")
        from tqdm import tqdm

        for i in tqdm(range(0, len(ids), window), desc="calibrate", unit="window", leave=False):
            mx.eval(rt.model(mx.array(ids[i:i + window])[None]))
        cal.meta["tokens"] = len(ids)
        log.info("calibrated on %d tokens: %d MoE layers, %d linears", len(ids), len(cal.experts), len(cal.linears))
        return cal
    finally:
        rt.close()
