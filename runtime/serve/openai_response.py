"""Generated text to OpenAI message parts: ``content``, ``reasoning_content`` and ``tool_calls``.

mlx-lm's :class:`~mlx_lm.generate.TextStateMachine` splits the decoded text into ``normal``,
``reasoning`` and ``tool`` segments and strips the control markers (``<think>``, ``<tool_call>``);
the tokenizer's tool parser (``qwen3_coder`` for Qwen3.5's
``<function=NAME><parameter=ARG>value</parameter></function>`` format) turns one tool block into a
name and arguments typed by the request's JSON schema. :class:`ResponseAssembler` joins the two and
adds what a client needs from a server that cannot trust its model's output:

- a tool block that does not parse (or never closes) comes back as plain text, markers included,
  instead of being dropped or crashing the response;
- a tool call is emitted whole, once its block closes, however the text was split across tokens;
- reasoning is reported as ``reasoning_content`` (and under mlx-lm's ``reasoning`` key).

The class is pure: it sees text chunks and a finish reason, never the HTTP connection, so it is
tested on crafted model output.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from mlx_lm.generate import TextStateMachine

log = logging.getLogger(__name__)


@dataclass
class Delta:
    """What one step added to the response."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)

    def merge(self, other: "Delta") -> None:
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls += other.tool_calls


class ResponseAssembler:
    """Feeds decoded text through the state machine and collects message parts.

    Args:
        text_sm: mlx-lm's state machine for this tokenizer and the request's stop words.
        initial_state: ``normal`` or ``reasoning`` (a prompt ending in ``<think>``).
        tool_parser: the tokenizer's parser, ``(text, tools) -> {"name", "arguments"}`` (or a list).
        tools: the request's tool definitions (the schema types the arguments).
        markers: the tool block's start and end strings, restored around unparseable blocks.
        streaming: number the calls with ``index`` as streamed deltas require.
    """

    def __init__(
        self,
        text_sm: TextStateMachine,
        initial_state: str,
        tool_parser: Callable | None,
        tools: list | None,
        markers: tuple[str, str] = ("<tool_call>", "</tool_call>"),
        streaming: bool = False,
    ):
        self._sm = text_sm.make_state(initial_state)
        self._state = initial_state
        self._parser, self._tools, self._markers = tool_parser, tools, markers
        self._streaming = streaming
        self._tool_text = ""
        self._content_started = False
        self.num_calls = 0

    def feed(self, text: str, finish_reason: str | None = None) -> Delta:
        """Consume one token's text; ``finish_reason`` as mlx-lm reports it for the last token."""
        if finish_reason == "stop":
            # The EOS token or a stop word: whatever is buffered belongs to it.
            self._sm, state = TextStateMachine.discard(self._sm)
            segments = [(state, "")]
        else:
            self._sm, segments = TextStateMachine.split(self._sm, text)
            if finish_reason is not None:
                self._sm, flushed, state = TextStateMachine.flush(self._sm)
                segments.append((state, flushed))
        out = Delta()
        for state, chunk in segments:
            if self._state == "tool" and state != "tool":
                out.merge(self._close_tool(closed=True))
            if state == "reasoning":
                out.reasoning += chunk
            elif state == "tool":
                self._tool_text += chunk
            else:
                if not self._content_started:  # the blank lines after </think> are not an answer
                    chunk = chunk.lstrip("\n")
                    self._content_started = bool(chunk)
                out.content += chunk
            self._state = state
        if finish_reason is not None and self._state == "tool":
            out.merge(self._close_tool(closed=False))  # cut off inside a call: hand back the text
        return out

    def _close_tool(self, closed: bool) -> Delta:
        text, self._tool_text = self._tool_text, ""
        calls = self._parse(text) if closed else None
        if calls is None:
            start, end = self._markers
            self._content_started = True
            return Delta(content=start + text + (end if closed else ""))
        return Delta(tool_calls=[self._format(c) for c in calls])

    def _parse(self, text: str) -> list[dict] | None:
        if self._parser is None:
            return None
        try:
            parsed = self._parser(text, self._tools)
        except Exception as e:  # a model's malformed call must never break the response
            log.warning("tool call did not parse (%s: %s); returned as text", type(e).__name__, e)
            return None
        calls = parsed if isinstance(parsed, list) else [parsed]
        ok = all(
            isinstance(c, dict)
            and isinstance(c.get("name"), str)
            and c["name"]
            and isinstance(c.get("arguments", {}), dict)
            for c in calls
        )
        return calls if ok and calls else None

    def _format(self, call: dict) -> dict:
        out = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False)},
        }
        if self._streaming:
            out["index"] = self.num_calls
        self.num_calls += 1
        return out


def message_fields(delta: Delta, streaming: bool) -> dict[str, Any]:
    """The ``message`` (or streamed ``delta``) object of a chat completion choice."""
    msg: dict[str, Any] = {"role": "assistant"}
    if not streaming:
        msg["content"] = delta.content or None  # the schema requires the key
    elif delta.content:
        msg["content"] = delta.content
    if delta.reasoning:
        msg["reasoning_content"] = delta.reasoning
        msg["reasoning"] = delta.reasoning  # mlx-lm's and some clients' name for it
    if delta.tool_calls:
        msg["tool_calls"] = delta.tool_calls
    return msg


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    411: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    """An OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    err = {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param, "code": code}
    return json.dumps({"error": err}).encode()
