"""``moestream serve``: mlx-lm's OpenAI-compatible server over a streamed pack.

mlx-lm's server already speaks the OpenAI chat/completions API (streaming SSE, tool calls parsed
with the chat template's tool parser, reasoning content, prompt-prefix caching). moestream only
changes how the model is loaded: :class:`StreamingModelProvider` builds it with
:func:`moestream.runtime.load`, so every request reads its routed experts from the pack.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

from mlx_lm import server as mlx_server

from .model import Runtime, output_head, load

log = logging.getLogger(__name__)


class StreamingModelProvider(mlx_server.ModelProvider):
    """mlx-lm's model provider, loading packs through the streaming runtime."""

    runtime_options: dict = {}

    def __init__(self, cli_args):
        super().__init__(cli_args)
        # Clients may name the model by the id /v1/models gives (the pack's folder name).
        pack = Path(cli_args.model)
        for alias in (pack.name, str(pack.resolve())):
            self._model_map[alias] = cli_args.model
            self._adapter_map[alias] = None
            self._draft_model_map[alias] = None

    def _load(self, model_path, adapter_path=None, draft_model_path=None):
        if adapter_path is not None or draft_model_path is not None:
            raise ValueError("moestream serve: adapters and draft models are not supported")
        if Path(model_path).resolve() != Path(self.cli_args.model).resolve():
            # Checked before reset(): a request for another model must not unload the served pack.
            raise ValueError(f"model {model_path!r} is not served here (this server serves "
                             f"{Path(self.cli_args.model).name!r})")
        self.reset()
        rt: Runtime = load(model_path, **self.runtime_options)
        # Generation only reads the last position's logits; the eager CPU output head would
        # otherwise compute them for every prompt token.
        h = output_head(rt.model)
        if h is not None:
            h.last_only = True
        self.runtime = rt
        self.model_key = (model_path, adapter_path, draft_model_path)
        self.model = rt.model
        self.tokenizer = rt.tokenizer
        self.processor = None
        self.draft_model = None
        self.is_batchable = False  # one sequence at a time over the shared expert store


class StreamingAPIHandler(mlx_server.APIHandler):
    """mlx-lm's request handler; ``/v1/models`` lists the served pack (not the hub cache), and with an
    API key every request but ``/health`` must carry ``Authorization: Bearer KEY``."""

    api_key: str | None = None

    def _authorized(self) -> bool:
        if not self.api_key or self.path == "/health":
            return True
        if self.headers.get("Authorization", "") == f"Bearer {self.api_key}":
            return True
        body = json.dumps({"error": {"message": "invalid or missing API key", "type": "invalid_request_error",
                                     "code": "invalid_api_key"}}).encode()
        self._set_completion_headers(401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return False

    def do_POST(self):
        if self._authorized():
            super().do_POST()

    def do_GET(self):
        if self._authorized():
            super().do_GET()

    def handle_models_request(self):
        self._set_completion_headers(200)
        self.end_headers()
        name = Path(self.response_generator.cli_args.model).name
        body = {"object": "list", "data": [{"id": name, "object": "model", "created": self.created,
                                            "owned_by": "moestream"}]}
        self.wfile.write(json.dumps(body).encode())
        self.wfile.flush()


def serve(pack: str, host: str = "127.0.0.1", port: int = 8080, extra_args: list[str] | None = None,
          api_key: str | None = None, **runtime_options) -> None:
    """Run the server until interrupted (mlx-lm's argument parser handles its own options)."""
    StreamingModelProvider.runtime_options = runtime_options
    StreamingAPIHandler.api_key = api_key
    argv = ["mlx_lm.server", "--model", str(pack), "--host", host, "--port", str(port), *(extra_args or [])]
    old = sys.argv, mlx_server.ModelProvider, mlx_server._run_http_server
    sys.argv, mlx_server.ModelProvider = argv, StreamingModelProvider
    mlx_server._run_http_server = functools.partial(old[2], handler_class=StreamingAPIHandler)
    try:
        mlx_server.main()
    finally:
        sys.argv, mlx_server.ModelProvider, mlx_server._run_http_server = old
