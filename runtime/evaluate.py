"""``moestream eval``: perplexity of a pack on a text, and KL against an independent reference.

The text is tokenized with the pack's tokenizer and scored in non-overlapping windows (each window a
fresh context). With a reference, the same windows run through it and each position gives
KL(reference || pack) and whether the two agree on the top token. A Hugging Face folder reference
runs through mlx-lm, unquantized, in float32: never through moestream's own loading code (only its
config gets the converter's field-name normalization, for checkpoints saved by transformers 5). A pack
reference runs fully resident (no streaming).
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlx.core as mx
import numpy as np

from moestream.layouts import PackError

log = logging.getLogger(__name__)


def log_softmax(x: mx.array) -> mx.array:
    x = x.astype(mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def load_reference(path, backend: str = "mlx"):
    """A callable ``ids [1, T] -> logits`` for an HF checkpoint folder or a pack (a callable is
    returned as it is).

    Args:
        backend: for an HF folder, ``mlx`` (mlx-lm, float32) or ``transformers`` (torch, float32).
    """
    from mlx.utils import tree_map

    if callable(path):  # already a reference (a benchmark's cached one)
        return path
    path = Path(path)
    if backend == "transformers" and not (path / "manifest.json").exists():
        return _transformers_reference(path)
    if (path / "manifest.json").exists():
        from moestream.runtime.model.build import load_resident_model

        model, pack = load_resident_model(path, dtype="float32")
        pack.close()
        return model
    if not (path / "config.json").exists():
        raise PackError(f"{path}: reference is neither a pack nor a Hugging Face checkpoint folder")
    from mlx_lm.utils import load_config, load_model

    from moestream.convert.family import mlx_lm_config

    # transformers 5 names some fields differently from mlx-lm's ModelArgs (num_local_experts,
    # rope_parameters): filled in exactly as conversion fills them in for the pack's config.json
    config = mlx_lm_config(load_config(path), str(path / "config.json"))
    try:
        model, _ = load_model(path, model_config=config)
    except (TypeError, KeyError, ValueError) as e:  # ModelArgs or the weights refused
        raise PackError(f"{path}: mlx-lm cannot load this reference ({type(e).__name__}: {e})") from None
    model.update(
        tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters())
    )
    return model


def _transformers_reference(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def run(x: mx.array) -> mx.array:
        with torch.no_grad():
            return mx.array(model(torch.from_numpy(np.array(x))).logits.float().numpy())

    return run


def evaluate(
    rt,
    text: str,
    reference: str | Path | None = None,
    max_tokens: int | None = 2048,
    window: int = 512,
    reference_backend: str = "mlx",
    decode: bool = False,
) -> dict:
    """Perplexity (and KL vs ``reference``) of ``rt`` (from :func:`moestream.runtime.load`) on ``text``.

    Args:
        decode: run the pack one token at a time with its caches, as generation computes (the CPU's
            small-batch kernels, int8 activations included), instead of a window per forward pass.

    Returns:
        a dict: tokens, windows, ppl, and with a reference ref_ppl, kl_mean, kl_median, kl_p99,
        top1_agreement.
    """
    ids = rt.tokenizer.encode(text)
    if max_tokens:
        ids = ids[:max_tokens]
    wins = [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]
    if not wins:
        raise PackError("eval: the text has fewer than 2 tokens")
    ref = load_reference(reference, reference_backend) if reference else None
    trace = _routing_trace(rt)
    nll, ref_nll, n = 0.0, 0.0, 0
    kls, agree = [], []
    for w in wins:
        x = mx.array(w)[None]
        target = mx.array(w[1:])[:, None]
        lp = _decode_log_probs(rt.model, x) if decode else log_softmax(rt.model(x)[0, :-1])
        nll -= mx.take_along_axis(lp, target, axis=-1).sum().item()
        n += len(w) - 1
        if ref is not None:
            lr = log_softmax(ref(x)[0, :-1])
            ref_nll -= mx.take_along_axis(lr, target, axis=-1).sum().item()
            kls.append(np.array((mx.exp(lr) * (lr - lp)).sum(-1)))
            agree.append(np.array(lr.argmax(-1) == lp.argmax(-1)))
    out = {"tokens": n + len(wins), "windows": len(wins), "window": window, "ppl": float(np.exp(nll / n))}
    out["mode"] = "decode" if decode else "windows"
    if trace is not None and trace.layers:
        from moestream.runtime.analysis.routing import routed_bytes_per_token

        m = rt.pack.manifest
        out["expert_bytes_per_token"] = routed_bytes_per_token(trace.layers, m)
        out["expert_bits_per_weight"] = m.expert_bits_per_weight()
        # What a token's routing reads per weight, padding excluded: the figure that carries over to
        # a model whose blocks are large (the tiny fixture's blocks are mostly alignment padding).
        x = m.expert_layer(m.moe_layers()[0])
        params = 3 * x.component("gate_proj.weight").shape[0] * x.component("down_proj.weight").shape[0]
        k = next(iter(trace.layers.values())).shape[-1]
        out["expert_read_bits_per_weight"] = (
            8 * routed_bytes_per_token(trace.layers, m, padded=False) / (params * k * len(trace.layers))
        )
    if ref is not None:
        kl = np.concatenate(kls)
        out.update(
            reference=str(reference),
            ref_ppl=float(np.exp(ref_nll / n)),
            kl_mean=float(kl.mean()),
            kl_median=float(np.median(kl)),
            kl_p99=float(np.percentile(kl, 99)),
            top1_agreement=float(np.concatenate(agree).mean()),
        )
    return out


def _decode_log_probs(model, x: mx.array) -> mx.array:
    """Log-probabilities of positions 0..T-2 with the window fed one token at a time through a fresh cache."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    rows = []
    for t in range(x.shape[1] - 1):
        rows.append(log_softmax(model(x[:, t : t + 1], cache=cache)[0, -1]))
        mx.eval(rows[-1])
    return mx.stack(rows)


def _routing_trace(rt):
    """The streamed runtime's routing trace (the one already recording, or a new one); None for
    other models."""
    if not hasattr(rt, "trace_routing"):
        return None
    from moestream.runtime.model.blocks import get_switch, moe_blocks

    blocks = list(moe_blocks(rt.model).values())
    current = getattr(get_switch(blocks[0]), "trace", None) if blocks else None
    return current if current is not None else rt.trace_routing()


def format_eval(res: dict) -> str:
    how = ", fed token by token" if res.get("mode") == "decode" else ""
    s = f"perplexity {res['ppl']:.4f} over {res['tokens']} tokens ({res['windows']} windows of {res['window']}{how})"
    if "expert_bytes_per_token" in res:
        s += (
            f"\nexperts: {res['expert_bits_per_weight']:.3f} bits per weight stored, "
            f"{res['expert_read_bits_per_weight']:.3f} per weight read; {res['expert_bytes_per_token'] / 1e6:.3f} MB "
            f"read per token (routed blocks with their padding, cache misses)"
        )
    if "kl_mean" in res:
        s += (
            f"\nreference {res['reference']}: perplexity {res['ref_ppl']:.4f}\n"
            f"KL(reference || pack): mean {res['kl_mean']:.4f}, median {res['kl_median']:.4f}, "
            f"p99 {res['kl_p99']:.3f}; top-1 agreement {res['top1_agreement']:.1%}"
        )
    return s


__all__ = ["evaluate", "format_eval", "load_reference"]
