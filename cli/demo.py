"""``moestream demo``: the whole path on a small trained model shipped with the package.

``demo_model/`` (next to this file) is a ~5.6 MB Qwen3.5-MoE trained on Python's standard library
(``scripts/train_demo_model.py``; its README says how), stored as the hub stores Qwen3.5 BF16
releases. The demo converts it at 4 and 2 bits, verifies both packs, scores each one against the
BF16 source on held-out text (``demo_model/eval.txt``: perplexity, mean KL, top-1 agreement, the
source run by mlx-lm in float32 as the independent reference), and completes a line of Python from
each pack with every routed expert read from disk (``--cache none``), with the stats.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"
DEMO_PROMPT = "def read_file(path):"


def run_demo(
    workdir: str | Path, bits: tuple[int, ...] = (4, 2), source: str | Path = DEMO_MODEL, eval_tokens: int = 2048
) -> dict:
    """Convert ``source`` at each of ``bits`` into ``workdir``, verify, and evaluate against the source.

    Args:
        workdir: where the packs go (``pack-4bit``, ``pack-2bit``); created.
        bits: expert bits of each pack.
        source: a Hugging Face BF16 checkpoint folder with an ``eval.txt``.
        eval_tokens: tokens of ``eval.txt`` scored (windows of 512).

    Returns:
        the figures the CLI prints: ``checkpoint`` and, per pack, its path, bits, method, bytes per
        token, stride and :func:`moestream.runtime.evaluate`'s result (ppl, ref_ppl, kl_*, top1_agreement).
    """
    from moestream.convert import convert
    from moestream.layouts import open_pack
    from moestream.runtime import load
    from moestream.runtime.evaluate import evaluate  # the function: a loaded submodule shadows the lazy name

    workdir, source = Path(workdir), Path(source)
    workdir.mkdir(parents=True, exist_ok=True)
    text = (source / "eval.txt").read_text()
    out: dict = {"checkpoint": str(source), "packs": []}
    for b in bits:
        pack = workdir / f"pack-{b}bit"
        m = convert(str(source), pack, bits=b, force=True)
        with open_pack(pack) as p:
            p.verify()
        rt = load(pack)
        try:
            ev = evaluate(rt, text, reference=source, max_tokens=eval_tokens)
        finally:
            rt.close()
        out["packs"].append(
            {
                "pack": str(pack),
                "bits": b,
                "method": m.quantization["experts"]["method"],
                "bytes_per_token": m.expert_bytes_per_token(),
                "stride": m.experts[0].stride,
                **ev,
            }
        )
    return out


def demo_generate(
    pack: str | Path, prompt: str = DEMO_PROMPT, max_tokens: int = 64, on_text: Callable[[str], None] | None = None
):
    """Greedy raw completion of ``prompt`` (a code model: no chat template) from ``pack``, every routed
    expert read from disk (cache none). ``on_text`` gets each piece as it streams.

    Returns:
        (completion text, :class:`~moestream.runtime.GenerationStats`).
    """
    from moestream.runtime import load
    from moestream.runtime.generate import generate  # the function: a loaded submodule shadows the lazy name

    rt = load(pack, cache="none")
    parts = []
    try:
        # Three newlines end a top-level block in PEP 8 code: the model has moved on to the next one.
        for c in generate(rt, prompt, max_tokens=max_tokens, raw=True, stop=("\n\n\n",)):
            parts.append(c.text)
            if on_text and c.text:
                on_text(c.text)
    finally:
        rt.close()
    return "".join(parts), c.stats
