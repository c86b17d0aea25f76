"""Text generation over a streamed pack: chat template, sampling, stop strings, statistics.

Decoding itself is mlx-lm's ``stream_generate`` (prefill in chunks, KV and linear-attention caches,
samplers); this module adds what a streamed run must report: bytes read from disk per token, cache
hit rate, time to first token and peak RSS, next to the token rates.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx

from moestream.runtime.model.runtime import Runtime


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    ttft_s: float = 0.0
    prefill_bytes: int = 0
    decode_bytes: int = 0
    hit_rate: float = 0.0
    peak_rss_bytes: int = 0
    finish_reason: str | None = None

    @property
    def bytes_per_token(self) -> float:
        """Expert bytes read from disk per decoded token."""
        return self.decode_bytes / max(1, self.generation_tokens - 1)


@dataclass
class Chunk:
    """One piece of streamed output."""

    text: str
    token: int | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)


def build_prompt(
    rt: Runtime,
    prompt: str | None = None,
    messages: list[dict] | None = None,
    raw: bool = False,
    think: bool = True,
    tools: list[dict] | None = None,
) -> list[int]:
    """Token ids: the chat template applied to ``messages`` (or one user ``prompt``) and ``tools``
    (OpenAI tool objects), or raw text."""
    tok = rt.tokenizer
    if raw:
        return tok.encode(prompt or "")
    messages = messages or [{"role": "user", "content": prompt or ""}]
    if getattr(tok, "chat_template", None) is None:
        return tok.encode("\n".join(m["content"] for m in messages))
    kwargs = {"tools": tools} if tools else {}
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, enable_thinking=think, **kwargs)


def peak_rss() -> int:
    """Peak resident set size of this process in bytes.

    Linux: ``VmHWM`` (ru_maxrss would include the parent's peak, which survives fork + exec);
    macOS: ``ru_maxrss`` (in bytes there).
    """
    if sys.platform.startswith("linux"):
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def generate(
    rt: Runtime,
    prompt: str | None = None,
    *,
    messages: list[dict] | None = None,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: tuple[str, ...] = (),
    raw: bool = False,
    think: bool = True,
    tools: list[dict] | None = None,
) -> Iterator[Chunk]:
    """Stream generated text; the last chunk carries the final statistics.

    Args:
        rt: from :func:`moestream.runtime.load`.
        prompt / messages: one user message, or a whole conversation.
        max_tokens, temp, top_p, top_k, seed: sampling (temp 0 is greedy).
        stop: strings that end generation (not included in the output).
        raw: no chat template.
        think: thinking on (Qwen3.5's default) or off.
        tools: OpenAI tool objects the chat template shows the model.
    """
    from mlx_lm.sample_utils import make_sampler

    if seed is not None:
        mx.random.seed(seed)
    ids = build_prompt(rt, prompt, messages, raw, think, tools)
    sampler = make_sampler(temp=temp, top_p=top_p, top_k=top_k)
    st = rt.store.stats
    start_bytes, h0, m0 = st.bytes_read, st.hits, st.misses
    stats = GenerationStats(prompt_tokens=len(ids))
    t0 = time.perf_counter()
    with rt.prefill_logits_last():
        yield from _stream(rt, ids, max_tokens, sampler, stop, stats, st, start_bytes, h0, m0, t0)


def _stream(rt, ids, max_tokens, sampler, stop, stats, st, start_bytes, h0, m0, t0) -> Iterator[Chunk]:
    from mlx_lm.generate import stream_generate

    pending = ""  # text held back while it could still be the start of a stop string
    hold = max((len(s) for s in stop), default=0)
    after_prefill = None
    for r in stream_generate(rt.model, rt.tokenizer, mx.array(ids), max_tokens=max_tokens, sampler=sampler):
        if after_prefill is None:
            stats.ttft_s = time.perf_counter() - t0
            after_prefill = st.bytes_read
            stats.prefill_bytes = after_prefill - start_bytes
        stats.prompt_tps, stats.generation_tps = r.prompt_tps, r.generation_tps
        stats.generation_tokens = r.generation_tokens
        stats.finish_reason = r.finish_reason
        pending += r.text
        cut = min((pending.find(s) for s in stop if s in pending), default=-1)
        if cut >= 0:
            pending, stats.finish_reason = pending[:cut], "stop"
            break
        if hold and len(pending) >= hold:
            yield Chunk(pending[: -hold + 1] if hold > 1 else pending, r.token, stats)
            pending = pending[-hold + 1 :] if hold > 1 else ""
        elif not hold:
            yield Chunk(pending, r.token, stats)
            pending = ""
    stats.decode_bytes = st.bytes_read - (after_prefill if after_prefill is not None else start_bytes)
    n = (st.hits - h0) + (st.misses - m0)
    stats.hit_rate = (st.hits - h0) / n if n else 0.0
    stats.peak_rss_bytes = peak_rss()
    yield Chunk(pending, None, stats)
