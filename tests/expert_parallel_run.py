"""What tests/test_expert_parallel.py runs on every rank of a group (and in one process, for the
reference): logits token by token, greedy and seeded sampling, perplexity, and the server through the
official openai client. ``python expert_parallel_run.py OUT PACK [PACK ...]``: rank 0 writes its
results to OUT (.npz), then, with ``--then-generate``, writes OUT.ready and generates until stopped
(the failure tests stop or kill a rank meanwhile)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

TOKENS = [5, 17, 3, 99, 42, 7, 256, 11, 64, 2, 31, 8, 123]
PROMPT = "The cat sat on"


def logits(rt, tokens=TOKENS, prefill: int = 6) -> np.ndarray:
    """Logits of the last prefill position, then of each token fed alone (the decode path)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(rt.model)
    rows = [np.array(rt.model(mx.array([tokens[:prefill]]), cache=cache)[0, -1:])]
    rows += [np.array(rt.model(mx.array([[t]]), cache=cache)[0]) for t in tokens[prefill:]]
    return np.concatenate(rows).astype(np.float32)


def decode_layers(rt) -> int:
    """Layers whose one-token forwards take the CPU decode path (the experts' ``decode_numpy``)."""
    from moestream.runtime.model.cpu_decode import DecodeLayer

    return sum(isinstance(getattr(layer, "_cpu_decode", None), DecodeLayer) for layer in rt.model.layers)


def run(rt, text: str) -> dict:
    from moestream.runtime import evaluate, generate

    out = {"logits": logits(rt)}
    out["greedy"] = np.array([c.token for c in generate(rt, PROMPT, max_tokens=10, raw=True) if c.token is not None])
    sampled = generate(rt, PROMPT, max_tokens=10, raw=True, temp=1.0, seed=7)
    out["sampled"] = np.array([c.token for c in sampled if c.token is not None])
    out["ppl"] = np.array(evaluate(rt, text, max_tokens=48, window=16)["ppl"])
    return out


def serve(pack: str) -> dict:
    """Two requests to the server through the official openai client, greedy."""
    import openai

    from moestream.runtime.serve.server import build_server

    server = build_server(pack, port=0).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        chat = client.chat.completions.create(
            model="default_model",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=8,
            temperature=0,
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        )
        done = client.completions.create(model="default_model", prompt=PROMPT, max_tokens=8, temperature=0)
        return {"chat": chat.choices[0].message.content or "", "completion": done.choices[0].text}
    finally:
        server.close()


def everything(packs: list[str], text: str) -> dict:
    from moestream.runtime import load

    out = {}
    for i, pack in enumerate(packs):
        with load(pack) as rt:
            for k, v in run(rt, text).items():
                out[f"{i}.{k}"] = v
            out[f"{i}.decode_layers"] = np.array(decode_layers(rt))
        for k, v in serve(pack).items():
            out[f"{i}.serve.{k}"] = np.array(v)
    with load(packs[0], kernels="mlx") as rt:  # MLX's own kernels: the streamed layer's MLX path
        out["mlx.logits"] = logits(rt)
        out["mlx.parallel"] = np.array(json.dumps(rt.parallel.figures() if rt.parallel else {}))
    return out


def main(argv: list[str]) -> None:
    from moestream.runtime import load
    from moestream.runtime.model import expert_parallel

    flags = {a for a in argv if a.startswith("--")}
    argv = [a for a in argv if not a.startswith("--")]
    out, packs = Path(argv[0]), argv[1:]
    text = "the quick brown fox jumps over the lazy dog and then sleeps under the old oak tree " * 3
    group = expert_parallel.world()
    if group is not None and group.rank != 0:
        load(packs[0])  # serves rank 0 until it exits
        return
    results = everything(packs, text)
    if "--bench" in flags:
        from moestream.runtime.bench import bench

        r = bench(packs[0], prompt_tokens=16, gen_tokens=8, baselines=False, experts_per_token=4)
        results["bench"] = np.array(json.dumps(r))
    np.savez(out, **results)
    if "--then-generate" in flags:
        forever(packs[0], Path(f"{out}.ready"))


def forever(pack: str, ready: Path) -> None:
    """Decode greedily until stopped (no end of sequence), writing ``ready`` after a few tokens."""
    from mlx_lm.models.cache import make_prompt_cache

    from moestream.runtime import load

    with load(pack) as rt:
        cache = make_prompt_cache(rt.model)
        tok = mx.array([TOKENS[:4]])
        for i in range(1 << 30):
            tok = mx.argmax(rt.model(tok, cache=cache)[:, -1:], axis=-1)
            mx.eval(tok)
            if i == 4:
                ready.write_text("decoding")


if __name__ == "__main__":
    main(sys.argv[1:])
