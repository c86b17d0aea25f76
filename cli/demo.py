"""``moestream demo``: the whole path on a model built on the spot, for a fresh machine.

Makes a tiny random Qwen3.5-MoE checkpoint in the hub's BF16 layout, converts it at 4 and 2 bits,
verifies both packs, and scores each pack's logits (mlx-lm's model loaded from the pack) against
mlx-lm running the unquantized source checkpoint in float32: the independent reference. Then it
generates from the 4-bit pack with streamed experts (cold: ``--cache none``) and reports the stats.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict:
    """Mean/p99 KL(ref || got) per position and top-1 agreement."""
    def logsoftmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lr, lg = logsoftmax(ref.astype(np.float64)), logsoftmax(got.astype(np.float64))
    kl = (np.exp(lr) * (lr - lg)).sum(-1).reshape(-1)
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
            "top1": float((ref.argmax(-1) == got.argmax(-1)).mean())}


def run_demo(workdir: str | Path, bits: tuple[int, ...] = (4, 2), seed: int = 0, tokens: int = 64) -> dict:
    """Build, convert, verify and score. Returns the figures the CLI prints."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import load_model

    from moestream.convert import convert
    from moestream.convert.tiny import tiny_config, write_tiny_checkpoint
    from moestream.layouts import open_pack
    from moestream.runtime.model.build import load_resident_model

    workdir = Path(workdir)
    src = workdir / "checkpoint"
    if not (src / "config.json").exists():
        write_tiny_checkpoint(src, tiny_config(), seed=seed)
    ref_model, _ = load_model(src)
    ref_model.update(tree_map(lambda a: a.astype(mx.float32), ref_model.parameters()))
    vocab = tiny_config()["text_config"]["vocab_size"]
    ids = mx.array(np.random.default_rng(seed + 1).integers(0, vocab, (1, tokens)))
    ref = np.array(ref_model(ids))
    out = {"checkpoint": str(src), "packs": []}
    for b in bits:
        pack = workdir / f"pack-{b}bit"
        m = convert(str(src), pack, bits=b, force=True)
        with open_pack(pack) as p:
            p.verify()
        model, p = load_resident_model(pack, dtype="float32")
        p.close()
        got = np.array(model(ids))
        out["packs"].append({"pack": str(pack), "bits": b, "method": m.quantization["experts"]["method"],
                             "bytes_per_token": m.expert_bytes_per_token(), "stride": m.experts[0].stride,
                             **compare_logits(ref, got)})
    return out


def demo_generate(pack: str | Path, prompt: str = "Hello", max_tokens: int = 32):
    """Greedy generation from ``pack`` with every routed expert read from disk (cache none)."""
    from moestream.runtime import generate, load

    rt = load(pack, cache="none")
    try:
        chunks = list(generate(rt, prompt, max_tokens=max_tokens, think=False))
    finally:
        rt.close()
    return "".join(c.text for c in chunks), chunks[-1].stats
