"""``moestream serve``: an OpenAI-compatible server over a streamed pack, built from mlx-lm's server.

mlx-lm supplies the generation thread (one request at a time over the shared expert store, with
the others queued), chat templating, sampling, stop sequences, the tool parsers and the prompt
cache. moestream adds, here and in :mod:`.server_http`:

- the model comes from :func:`moestream.runtime.load`, so every request streams its experts;
- prompt-prefix reuse for hybrid models: Qwen3.5's linear-attention state cannot be trimmed back,
  so before generating, the conversation history (the prompt up to the generation prompt) is run
  into the cache and stored; the next turn of that conversation starts from it;
- per-request ``experts_per_token`` (K), admission control (``max_concurrency``), counters at
  ``GET /stats``, and a server object tests can start and stop in-process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import mlx.core as mx
from mlx_lm import server as mlx_server
from mlx_lm.models.cache import LRUPromptCache

from moestream.runtime.model import expert_parallel
from moestream.runtime.model.blocks import get_experts_per_token, moe_blocks, output_head, set_experts_per_token
from moestream.runtime.model.patches import swapped
from moestream.runtime.model.runtime import Runtime, load
from moestream.runtime.options import RuntimeOptions
from moestream.runtime.serve.config import ServerConfig, ServerStats, served_names

log = logging.getLogger(__name__)


class StreamingModelProvider(mlx_server.ModelProvider):
    """mlx-lm's model provider, loading the one served pack through the streaming runtime."""

    def __init__(self, cli_args, options: RuntimeOptions):
        super().__init__(cli_args)
        self.options = options
        self.runtime: Runtime | None = None
        for alias in served_names(cli_args.model):  # clients name the model by the id /v1/models gives
            self._model_map[alias] = cli_args.model
            self._adapter_map[alias] = None
            self._draft_model_map[alias] = None

    def _load(self, model_path, adapter_path=None, draft_model_path=None):
        if adapter_path is not None or draft_model_path is not None:
            raise ValueError("moestream serve: adapters and draft models are not supported")
        if Path(model_path).resolve() != Path(self.cli_args.model).resolve():
            # Checked before reset(): a request for another model must not unload the served pack.
            raise ValueError(f"model {model_path!r} is not served here")
        self.reset()
        rt = load(model_path, self.options)
        h = output_head(rt.model)
        if h is not None:  # generation reads only the last position's logits
            h.last_only = True
        self.runtime = rt
        self.model_key = (model_path, adapter_path, draft_model_path)
        self.model, self.tokenizer = rt.model, rt.tokenizer
        self.processor = self.draft_model = None
        self.is_batchable = False  # one sequence at a time over the shared expert store


class _CountingQueue:
    """The request's response queue, counting the tokens the generation thread puts on it."""

    def __init__(self, inner, running: dict):
        self.inner, self.running = inner, running
        self.ctx = None
        self.reused: int | None = None  # prompt tokens found cached before this request computed any

    def put(self, item) -> None:
        if isinstance(item, mlx_server.GenerationContext):
            self.ctx = item
        elif isinstance(item, mlx_server.Response):
            self.running["generated_tokens"] += 1
            if self.reused is not None:  # mlx-lm counted the history this request just computed
                self.ctx.prompt_cache_count = min(self.ctx.prompt_cache_count, self.reused)
        self.inner.put(item)


class StreamingResponseGenerator(mlx_server.ResponseGenerator):
    """mlx-lm's generation thread plus history checkpoints, per-request K and counters."""

    def __init__(self, provider: StreamingModelProvider, prompt_cache: LRUPromptCache, stats: ServerStats):
        self.stats = stats
        super().__init__(provider, prompt_cache)

    def _serve_single(self, request, stream):
        rqueue, req, args = request
        running = {"generated_tokens": 0, "started": time.time()}
        counting = _CountingQueue(rqueue, running)
        self.stats.running = running
        try:
            with self._experts_per_token(getattr(req, "experts_per_token", None)):
                try:
                    counting.reused = self._checkpoint_history(req, args, stream)
                except Exception as e:  # only an optimisation: generation itself reports real errors
                    log.warning("history checkpoint skipped (%s: %s)", type(e).__name__, e)
                super()._serve_single((counting, req, args), stream)
        finally:
            ctx = counting.ctx
            cancelled = ctx is not None and ctx._should_stop
            last = {
                "generated_tokens": running["generated_tokens"],
                "cancelled": cancelled,
                "prompt_tokens": len(ctx.prompt) if ctx else 0,
                "cached_tokens": ctx.prompt_cache_count if ctx else 0,
                "seconds": round(time.time() - running["started"], 3),
            }
            self.stats.record(
                completed=int(ctx is not None and not cancelled),
                cancelled=int(cancelled),
                failed=int(ctx is None),
                prompt_tokens=last["prompt_tokens"],
                cached_tokens=max(last["cached_tokens"], 0),
                generated_tokens=last["generated_tokens"],
            )
            self.stats.last, self.stats.running = last, None

    def _tokenize(self, tokenizer, request, args):
        """mlx-lm's tokenization, done once per request (the history checkpoint needs it before
        mlx-lm's own serving code asks again)."""
        done = getattr(request, "_moestream_tokens", None)
        if done is None:
            done = super()._tokenize(tokenizer, request, args)
            request._moestream_tokens = done
        return done

    @contextlib.contextmanager
    def _experts_per_token(self, k: int | None):
        blocks = list(moe_blocks(self.model_provider.model).values()) if k else []
        saved = [get_experts_per_token(b) for b in blocks]
        for b in blocks:
            set_experts_per_token(b, k)
        try:
            yield
        finally:
            for b, s in zip(blocks, saved):
                set_experts_per_token(b, s)

    def _checkpoint_history(self, req, args, stream) -> int | None:
        """Run the conversation history into a cache and store it under its tokens.

        The history is the rendered prompt up to where it differs from the same messages rendered
        without the generation prompt. The next turn of the conversation renders the same history
        (Qwen3.5 drops earlier turns' reasoning from both), so it finds this entry as a prefix,
        where the entry stored after generation (prompt + reply) would not match it.

        Returns the number of prompt tokens that were cached before this call computed any, or
        None when it computed nothing.
        """
        if req.request_type != "chat" or req.messages[-1].get("role") not in ("user", "tool"):
            return None
        provider = self.model_provider
        tok, model = provider.tokenizer, provider.model
        prompt = self._tokenize(tok, req, args)[0]
        kwargs = dict(provider.cli_args.chat_template_args or {})
        kwargs.update(args.chat_template_kwargs or {})
        history = tok.apply_chat_template(
            req.messages, tools=req.tools, tokenize=True, add_generation_prompt=False, **kwargs
        )
        p = next((i for i, (a, b) in enumerate(zip(prompt, history)) if a != b), min(len(prompt), len(history)))
        p = min(p, len(prompt) - 1)  # generation needs at least one token to run
        cache, rest = self.prompt_cache.fetch_nearest_cache(provider.model_key, prompt[:p])
        if p <= 0 or not rest:
            return None
        if cache is None:
            cache = mlx_server.make_prompt_cache(model)
        step = provider.cli_args.prefill_step_size
        with mx.stream(stream):
            for i in range(0, len(rest), step):
                model(mx.array(rest[i : i + step])[None], cache=cache)
                mx.eval([c.state for c in cache])
        self.prompt_cache.insert_cache(provider.model_key, prompt[:p], cache, cache_type="user")
        log.info("stored the history checkpoint: %d tokens (%d computed)", p, len(rest))
        return p - len(rest)


class Server:
    """A running server: :meth:`serve_forever` (CLI) or :meth:`start` / :meth:`close` (tests)."""

    def __init__(self, httpd: ThreadingHTTPServer, generator: StreamingResponseGenerator):
        self.httpd, self.generator = httpd, generator
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self.close()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
        self.httpd.server_close()
        self.generator.stop_and_join()
        if self.generator.model_provider.runtime is not None:
            self.generator.model_provider.runtime.close()


def _mlx_cli_args(argv: list[str]):
    """mlx-lm's server options, parsed by mlx-lm's own parser (without starting its server)."""
    got = {}
    with (
        swapped(sys, argv=["mlx_lm.server", *argv]),
        swapped(mlx_server, ModelProvider=lambda a: a, run=lambda host, port, args, **kw: got.setdefault("args", args)),
    ):
        mlx_server.main()
    return got["args"]


def _max_context(pack: str) -> int:
    cfg = json.loads((Path(pack) / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    return int(text.get("max_position_embeddings") or cfg.get("max_position_embeddings") or 32768)


def build_server(
    pack: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    api_key: str | None = None,
    max_concurrency: int = 8,
    max_context: int | None = None,
    mlx_args: list[str] | None = None,
    load_timeout: float = 600.0,
    options: RuntimeOptions | None = None,
    **changes,
) -> Server:
    """Load ``pack`` and bind the HTTP server (not yet serving).

    Args:
        pack: the pack folder.
        host, port: where to listen (port 0 picks a free one).
        api_key: require ``Authorization: Bearer KEY`` on every route but ``/health``.
        max_concurrency: requests admitted at once (generating or queued); more get 429.
        max_context: longest prompt accepted, in tokens (default: the model's context length).
        mlx_args: extra mlx-lm server options (``--temp``, ``--prompt-cache-size``, ...).
        load_timeout: seconds to wait for the pack to load.
        options: how the pack runs (:class:`~moestream.runtime.options.RuntimeOptions`); ``changes``
            to it as in :func:`moestream.runtime.load`.
    """
    from moestream.runtime.serve.http import StreamingAPIHandler

    cli_args = _mlx_cli_args(["--model", str(pack), "--host", host, "--port", str(port), *(mlx_args or [])])
    prompt_cache = LRUPromptCache(cli_args.prompt_cache_size, cli_args.prompt_cache_bytes or 1 << 63)
    stats = ServerStats(max_concurrency=max_concurrency)
    # Under mlx.launch the group is moestream's (rank 0 serves, the others compute experts, see
    # expert_parallel.py): mlx-lm's server must not run its own distributed protocol over it.
    group = expert_parallel.world()
    with swapped(mx.distributed, init=expert_parallel.solo_group) if group is not None else contextlib.nullcontext():
        provider = StreamingModelProvider(cli_args, (options or RuntimeOptions()).replace(**changes))
        generator = StreamingResponseGenerator(provider, prompt_cache, stats)
    deadline = time.time() + load_timeout
    while provider.model is None:  # mlx-lm loads in its generation thread; serve only once loaded
        if not generator.generation_available() or time.time() > deadline:
            generator.stop_and_join()
            raise RuntimeError(f"{pack}: the model did not load (see the log above)")
        time.sleep(0.05)
    num_experts = provider.runtime.pack.manifest.num_experts
    generator.config = ServerConfig(str(pack), api_key, max_context or _max_context(pack), num_experts)
    httpd = ThreadingHTTPServer((host, port), lambda *a, **kw: StreamingAPIHandler(generator, *a, **kw))
    return Server(httpd, generator)


def serve(pack: str, host: str = "127.0.0.1", port: int = 8080, **kwargs) -> None:
    """Run the server until interrupted (see :func:`build_server` for the options)."""
    server = build_server(pack, host, port, **kwargs)
    log.info("serving %s at %s/v1", pack, server.url)
    server.serve_forever()
