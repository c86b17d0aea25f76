"""The HTTP side of ``moestream serve``: mlx-lm's request handler with an OpenAI-shaped edge.

mlx-lm's :class:`~mlx_lm.server.APIHandler` parses the sampling options and builds the request;
this subclass checks everything a client can get wrong before that (JSON, fields, model id,
prompt length, concurrency), answers every failure with an OpenAI error object, writes the response
through :class:`~moestream.runtime.serve.openai_response.ResponseAssembler`, and stops a generation
whose client has gone away.
"""

from __future__ import annotations

import copy
import io
import json
import logging
from pathlib import Path

from mlx_lm import server as mlx_server

from moestream.runtime.serve.config import ServerConfig, ServerStats, served_names
from moestream.runtime.serve.openai_response import Delta, ResponseAssembler, error_body, message_fields

log = logging.getLogger(__name__)

ROUTES = {"/v1/chat/completions": True, "/chat/completions": True, "/v1/completions": False}
ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_BODY = 64 << 20


class _RequestError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


class _OpenAIErrors:
    """Wraps ``wfile`` while mlx-lm's ``do_POST`` runs: its ``{"error": "text"}`` bodies become
    OpenAI error objects."""

    def __init__(self, handler: "StreamingAPIHandler", raw):
        self.handler, self.raw = handler, raw

    def write(self, data: bytes) -> int:
        if self.handler.status >= 400 and self.handler.body_started:
            try:
                msg = json.loads(data)["error"]
                data = error_body(self.handler.status, msg if isinstance(msg, str) else json.dumps(msg))
            except (ValueError, KeyError, TypeError):
                data = error_body(self.handler.status, data.decode(errors="replace"))
        return self.raw.write(data)

    def __getattr__(self, name):
        return getattr(self.raw, name)


class StreamingAPIHandler(mlx_server.APIHandler):
    """One HTTP request. ``response_generator`` carries the server's config and counters."""

    status = 0
    body_started = False  # the headers are out: what wfile gets now is the body

    @property
    def config(self) -> ServerConfig:
        return self.response_generator.config

    @property
    def stats(self) -> ServerStats:
        return self.response_generator.stats

    def send_response(self, code, message=None):
        self.status = code
        super().send_response(code, message)

    def end_headers(self):
        super().end_headers()
        self.body_started = True

    def log_message(self, format, *args):  # http.server's access log, through logging
        log.info("%s %s", self.address_string(), format % args)

    def _json(self, status: int, body: bytes | dict, headers: dict | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self._set_completion_headers(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _error(self, e: _RequestError, headers: dict | None = None) -> None:
        self._json(e.status, error_body(e.status, str(e), e.code, e.param), headers)

    def _authorized(self) -> bool:
        key = self.config.api_key
        if not key or self.path == "/health" or self.headers.get("Authorization", "") == f"Bearer {key}":
            return True
        self._error(
            _RequestError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", "invalid_api_key")
        )
        return False

    # -- GET -------------------------------------------------------------------------------------
    def do_GET(self):
        if not self._authorized():
            return
        path = self.path.split("?")[0].rstrip("/")
        name = self._model_id()
        if path == "/health":
            ok = self.response_generator.is_healthy
            self._json(200 if ok else 503, {"status": "ok" if ok else "unavailable"})
        elif path == "/stats":
            self._json(200, self.stats.snapshot())
        elif path == "/v1/models":
            self._json(200, {"object": "list", "data": [self._model_object(name)]})
        elif path.startswith("/v1/models/"):
            wanted = path[len("/v1/models/") :]
            if wanted in served_names(self.config.pack):
                self._json(200, self._model_object(name))
            else:
                self._error(_RequestError(404, f"model {wanted!r} does not exist", "model_not_found", "model"))
        else:
            self._error(_RequestError(404, f"no route {self.path!r}", "not_found"))

    def _model_id(self) -> str:
        return Path(self.config.pack).name

    def _model_object(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "moestream"}

    # -- POST ------------------------------------------------------------------------------------
    def do_POST(self):
        if not self._authorized():
            return
        try:
            body = self._read_body()
            self._check(body, chat=ROUTES[self.path])
        except _RequestError as e:
            self._error(e)
            return
        if not self.stats.admit():
            self._error(
                _RequestError(
                    429, f"server busy: {self.stats.max_concurrency} requests in flight; retry", "rate_limit_exceeded"
                ),
                {"Retry-After": "1"},
            )
            return
        raw_wfile = self.wfile
        try:
            data = json.dumps(body).encode()  # mlx-lm parses it again, with our adjustments
            self.rfile = io.BytesIO(data)
            del self.headers["Content-Length"]
            self.headers["Content-Length"] = str(len(data))
            self.wfile = _OpenAIErrors(self, raw_wfile)
            super().do_POST()
        except (BrokenPipeError, ConnectionResetError):
            log.info("client %s went away; its generation was stopped", self.address_string())
        finally:
            self.wfile = raw_wfile
            self.stats.release()

    def _read_body(self) -> dict:
        if self.path not in ROUTES:
            raise _RequestError(404, f"no route {self.path!r}", "not_found")
        length = self.headers.get("Content-Length")
        if length is None:
            raise _RequestError(411, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            raise _RequestError(400, f"invalid Content-Length {length!r}") from None
        if n > MAX_BODY:
            raise _RequestError(413, f"request body of {n} bytes is over the limit of {MAX_BODY}")
        try:
            body = json.loads(self.rfile.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise _RequestError(400, f"invalid JSON in the request body: {e}") from None
        if not isinstance(body, dict):
            raise _RequestError(400, "the request body must be a JSON object")
        return body

    def _check(self, body: dict, chat: bool) -> None:
        """Reject what mlx-lm would fail on (or silently accept); clamp max_tokens to the context."""
        model = body.get("model")
        if model is not None and model not in served_names(self.config.pack):
            raise _RequestError(
                404,
                f"model {model!r} does not exist; this server serves {self._model_id()!r}",
                "model_not_found",
                "model",
            )
        if body.get("n", 1) != 1:
            raise _RequestError(400, "only n=1 is supported", param="n")
        k = body.get("experts_per_token")
        if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= self.config.num_experts):
            raise _RequestError(
                400,
                f"experts_per_token must be an integer in [1, {self.config.num_experts}]",
                param="experts_per_token",
            )
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise _RequestError(400, "'messages' must be a non-empty list", param="messages")
            for i, m in enumerate(msgs):
                if not isinstance(m, dict) or m.get("role") not in ROLES:
                    raise _RequestError(
                        400, f"messages[{i}] needs a 'role' among {sorted(ROLES)}", param=f"messages[{i}]"
                    )
            tools = body.get("tools")
            if tools is not None and not (
                isinstance(tools, list)
                and all(
                    isinstance(t, dict)
                    and isinstance(t.get("function"), dict)
                    and isinstance(t["function"].get("name"), str)
                    for t in tools
                )
            ):
                raise _RequestError(
                    400, "'tools' must be a list of {type: function, function: {name, ...}}", param="tools"
                )
            if body.get("tool_choice") == "none":
                body.pop("tools", None)  # the model is not shown the tools at all
        else:
            p = body.get("prompt")
            if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
                body["prompt"] = p = p[0]
            if not isinstance(p, str):
                raise _RequestError(400, "'prompt' must be a string", param="prompt")
        n = self._prompt_tokens(body, chat)
        limit = self.config.max_context
        if n >= limit:
            raise _RequestError(
                400,
                f"this model's maximum context length is {limit} tokens; the prompt has {n}",
                "context_length_exceeded",
                "messages" if chat else "prompt",
            )
        mt = body.pop("max_completion_tokens", None) or body.get("max_tokens")
        if isinstance(mt, int) and not isinstance(mt, bool) and mt > limit - n:
            mt = limit - n
        if mt is not None:
            body["max_tokens"] = mt

    def _prompt_tokens(self, body: dict, chat: bool) -> int:
        tok = self.response_generator.model_provider.tokenizer
        if not chat:
            return len(tok.encode(body["prompt"]))
        msgs = copy.deepcopy(body["messages"])
        kwargs = dict(self.response_generator.cli_args.chat_template_args or {})
        kwargs.update(body.get("chat_template_kwargs") or {})
        try:
            mlx_server.process_message_content(msgs)
            return len(
                tok.apply_chat_template(
                    msgs, tools=body.get("tools"), add_generation_prompt=True, tokenize=True, **kwargs
                )
            )
        except Exception as e:  # the template's own checks (roles, content types, arguments)
            raise _RequestError(
                400, f"the messages do not render with this model's chat template: {e}", param="messages"
            ) from None

    # -- the response ----------------------------------------------------------------------------
    def handle_completion(self, request: mlx_server.CompletionRequest, stop_words: list[str]):
        request.experts_per_token = self.body.get("experts_per_token")
        args = self._generation_args(stop_words)

        def keepalive(processed: int, total: int) -> None:
            if self.stream:  # SSE comments keep proxies from timing out a long prefill
                self.wfile.write(f": prefill {processed}/{total}\n\n".encode())
                self.wfile.flush()

        try:
            ctx, response = self.response_generator.generate(request, args, progress_callback=keepalive)
        except Exception as e:
            status = 400 if isinstance(e, (ValueError, TypeError, KeyError)) else 500
            self._error(_RequestError(status, f"{type(e).__name__}: {e}"))
            return
        chat = request.request_type == "chat"
        tok = self.response_generator.model_provider.tokenizer
        asm = ResponseAssembler(
            ctx.text_sm,
            ctx.initial_state,
            ctx.tool_parser,
            request.tools,
            (tok.tool_call_start or "<tool_call>", tok.tool_call_end or "</tool_call>"),
            streaming=self.stream,
        )
        total, finish, ntok, logprobs = Delta(), "stop", 0, []
        try:
            if self.stream:
                self._set_stream_headers(200)
                self.end_headers()
            for gen in response:
                ntok += 1
                d = asm.feed(gen.text, gen.finish_reason) if chat else Delta(content=gen.text)
                finish = gen.finish_reason or finish
                if args.logprobs or args.top_logprobs > 0:
                    # "id" is an extension: byte-level tokens do not round-trip through text.
                    logprobs.append(
                        {
                            "token": tok.decode([gen.token]),
                            "id": gen.token,
                            "logprob": gen.logprob,
                            "top_logprobs": list(gen.top_tokens),
                        }
                    )
                if self.stream and d:
                    self._sse(self._body(d, None))
                else:
                    total.merge(d)
            if finish == "stop" and asm.num_calls:
                finish = "tool_calls"
            usage = {
                "prompt_tokens": len(ctx.prompt),
                "completion_tokens": ntok,
                "total_tokens": len(ctx.prompt) + ntok,
                "prompt_tokens_details": {"cached_tokens": max(ctx.prompt_cache_count, 0)},
            }
            if self.stream:
                self._sse(self._body(total, finish))
                if (self.stream_options or {}).get("include_usage"):
                    self._sse({**self._body(Delta(), None), "choices": [], "usage": usage})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            else:
                body = self._body(total, finish)
                body["usage"] = usage
                if logprobs:
                    body["choices"][0]["logprobs"] = {"content": logprobs}
                self._json(200, body)
        except (BrokenPipeError, ConnectionResetError):
            raise  # do_POST logs it; ctx.stop() below ends the generation
        except Exception as e:  # a failure inside generation
            log.exception("generation failed")
            err = _RequestError(500, f"generation failed: {type(e).__name__}: {e}")
            if self.stream:
                self._sse(json.loads(error_body(500, str(err))))
            elif self.status < 200:
                self._error(err)
        finally:
            ctx.stop()

    def _generation_args(self, stop_words: list[str]) -> mlx_server.GenerationArguments:
        """mlx-lm's arguments from the fields its ``do_POST`` parsed onto the handler."""
        return mlx_server.GenerationArguments(
            model=mlx_server.ModelDescription(
                model=self.requested_model, draft=self.requested_draft_model, adapter=self.adapter
            ),
            sampling=mlx_server.SamplingArguments(
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                min_p=self.min_p,
                xtc_probability=self.xtc_probability,
                xtc_threshold=self.xtc_threshold,
            ),
            logits=mlx_server.LogitsProcessorArguments(
                logit_bias=self.logit_bias,
                repetition_penalty=self.repetition_penalty,
                repetition_context_size=self.repetition_context_size,
                presence_penalty=self.presence_penalty,
                presence_context_size=self.presence_context_size,
                frequency_penalty=self.frequency_penalty,
                frequency_context_size=self.frequency_context_size,
            ),
            stop_words=stop_words,
            max_tokens=self.max_tokens,
            num_draft_tokens=self.num_draft_tokens,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs,
            seed=self.seed,
            chat_template_kwargs=self.chat_template_kwargs,
        )

    def _body(self, d: Delta, finish: str | None) -> dict:
        choice = {"index": 0, "finish_reason": finish}
        if self.object_type.startswith("chat.completion"):
            choice["delta" if self.stream else "message"] = message_fields(d, self.stream)
        else:
            choice.update(text=d.content, logprobs=None)
        return {
            "id": self.request_id,
            "object": self.object_type,
            "created": self.created,
            "model": self._model_id(),
            "system_fingerprint": self.system_fingerprint,
            "choices": [choice],
        }

    def _sse(self, obj: dict) -> None:
        self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
        self.wfile.flush()
