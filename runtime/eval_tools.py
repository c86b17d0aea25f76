"""``moestream eval-tools``: how often a pack's tool calls are valid and right.

Each case (one JSON object a line) is ``{"id", "tools", "messages", "expected"}``: OpenAI tool objects,
OpenAI chat messages, and the calls a right reply makes (``[{"name", "arguments": {...}}]``; ``[]``
when no tool should be called). A case runs through the pack's chat template, in process
(:func:`run_in_process`) or against any OpenAI-compatible server (:func:`run_against_server`), and its
reply is read as the server reads it: mlx-lm's state machine and the tokenizer's Qwen3.5 tool-call
parser, through :class:`~moestream.runtime.serve.openai_response.ResponseAssembler`, which hands a
block that does not parse back as text with its markers.

Scores (:func:`score_reply`, then :func:`summarize`):

- ``markup_valid``: of the replies with tool-call markup, the share whose markup all parses (markup
  left in the text, ``<tool_call>`` or ``<function=``, is markup that did not);
- ``name_ok``: of the cases expecting calls, the share whose calls name the expected functions;
- ``args_ok``: of those, the share whose every argument is right, compared after typing by the tool's
  JSON schema (integers, numbers, booleans, enums; objects and arrays through their own schemas) with
  strings stripped;
- ``no_call_ok``: of the cases expecting no call, the share with neither a call nor markup;
- ``correct``: the share of all cases fully right.
"""

from __future__ import annotations

import copy
import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from moestream.layouts.errors import MoestreamError

log = logging.getLogger(__name__)

MARKERS = ("<tool_call>", "</tool_call>")
INVALID_EXAMPLES = 5


class ToolCasesError(MoestreamError):
    """A cases file that cannot be read, or a server that does not answer as OpenAI's API does."""


@dataclass
class ToolCase:
    id: str
    tools: list[dict]
    messages: list[dict]
    expected: list[dict]


@dataclass
class Reply:
    """A reply as a client sees it: text, reasoning and parsed tool calls (``{"name", "arguments"}``;
    arguments that are not a JSON object leave the call out and its text in ``bad_calls``)."""

    content: str = ""
    reasoning: str = ""
    calls: list[dict] = field(default_factory=list)
    bad_calls: list[str] = field(default_factory=list)
    finish_reason: str | None = None


def load_cases(path: str | Path) -> list[ToolCase]:
    """Read a cases file; a malformed line stops with one line naming the file, the line and the problem."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ToolCasesError(f"{path}: cannot read the cases ({e})") from None
    cases, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ToolCasesError(f"{where}: not a JSON object ({e.msg})") from None
        case = _case(obj, where)
        if case.id in seen:
            raise ToolCasesError(f"{where}: duplicate id {case.id!r}")
        seen.add(case.id)
        cases.append(case)
    if not cases:
        raise ToolCasesError(f"{path}: no cases")
    return cases


def _case(obj: Any, where: str) -> ToolCase:
    if not isinstance(obj, dict):
        raise ToolCasesError(f"{where}: a case must be a JSON object")
    missing = [k for k in ("id", "tools", "messages", "expected") if k not in obj]
    if missing:
        raise ToolCasesError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
    tools, messages, expected = obj["tools"], obj["messages"], obj["expected"]
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
        for t in tools
    ):
        raise ToolCasesError(f"{where}: 'tools' must be a list of {{type: function, function: {{name, ...}}}}")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ToolCasesError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    if not isinstance(expected, list) or not all(
        isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("arguments", {}), dict)
        for c in expected
    ):
        raise ToolCasesError(f"{where}: 'expected' must be a list of {{name, arguments: {{...}}}}")
    names = {t["function"]["name"] for t in tools}
    unknown = [c["name"] for c in expected if c["name"] not in names]
    if unknown:
        raise ToolCasesError(f"{where}: expected call {unknown[0]!r} is not among the case's tools")
    return ToolCase(
        str(obj["id"]), tools, messages, [{"name": c["name"], "arguments": c.get("arguments", {})} for c in expected]
    )


# -- reading a reply ------------------------------------------------------------------------------


def reply_from_message(message: dict, finish_reason: str | None = None) -> Reply:
    """A :class:`Reply` from an OpenAI ``message`` object (a server's, or :func:`message_fields`')."""
    reply = Reply(
        content=message.get("content") or "",
        reasoning=message.get("reasoning_content") or message.get("reasoning") or "",
        finish_reason=finish_reason,
    )
    for tc in message.get("tool_calls") or []:
        fn = (tc or {}).get("function") or {}
        args = fn.get("arguments", {})
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError:
            args = None
        if isinstance(fn.get("name"), str) and isinstance(args, dict):
            reply.calls.append({"name": fn["name"], "arguments": args})
        else:
            reply.bad_calls.append(json.dumps(fn)[:200])
    return reply


def assemble_reply(
    tokenizer, chunks: Iterable[str], tools: list[dict] | None, initial_state: str, finish_reason: str | None
) -> Reply:
    """Generated text pieces read as the server reads them (state machine, tool parser, assembler)."""
    from mlx_lm.generate import make_text_state_machine

    from moestream.runtime.serve.openai_response import Delta, ResponseAssembler, message_fields

    asm = ResponseAssembler(
        make_text_state_machine(tokenizer),
        initial_state,
        getattr(tokenizer, "tool_parser", None),
        tools,
        (
            getattr(tokenizer, "tool_call_start", None) or MARKERS[0],
            getattr(tokenizer, "tool_call_end", None) or MARKERS[1],
        ),
    )
    total = Delta()
    for text in chunks:
        total.merge(asm.feed(text, None))
    total.merge(asm.feed("", "stop" if finish_reason == "stop" else "length"))
    return reply_from_message(message_fields(total, streaming=False), finish_reason)


def invalid_markup(reply: Reply) -> list[str]:
    """Tool-call markup that did not become a call: blocks the parser handed back as text, a bare
    ``<function=`` outside any block, and calls whose arguments are not a JSON object."""
    out = list(reply.bad_calls)
    for text in (reply.content, reply.reasoning):
        for marker in (MARKERS[0], "<function="):
            at = text.find(marker)
            if at >= 0:
                out.append(text[at : at + 200])
                break
    return out


# -- typing and comparing arguments ---------------------------------------------------------------


def _schema_type(schema: dict) -> str | None:
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), None)
    return t if isinstance(t, str) else None


def typed(value: Any, schema: dict | None) -> Any:
    """``value`` as the JSON schema types it: integers, numbers and booleans from their text, enum
    members by their text, objects and arrays (from JSON text too) member by member, strings
    stripped. A value that does not convert is returned as it is (and so compares unequal)."""
    schema = schema if isinstance(schema, dict) else {}
    t = _schema_type(schema)
    if isinstance(value, str):
        value = value.strip()
    if "enum" in schema and isinstance(schema["enum"], list):
        for e in schema["enum"]:
            if e == value or (not isinstance(value, (dict, list)) and str(e).strip() == str(value).strip()):
                return e.strip() if isinstance(e, str) else e
    try:
        if t == "integer" and not isinstance(value, bool):
            f = float(value)
            return int(f) if f.is_integer() else value
        if t == "number" and not isinstance(value, bool):
            return float(value)
        if t == "boolean" and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    except (TypeError, ValueError):
        return value
    if isinstance(value, str) and t in (None, "object", "array") and value[:1] in ("{", "["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        return {k: typed(v, props.get(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v, schema.get("items")) for v in value]
    return value


def _parameters(tools: list[dict], name: str) -> dict:
    for t in tools:
        if t["function"]["name"] == name:
            return t["function"].get("parameters") or {}
    return {}


def typed_arguments(tools: list[dict], name: str, arguments: dict) -> dict:
    """A call's arguments typed by its tool's parameter schema."""
    return typed(dict(arguments), {"type": "object", **_parameters(tools, name)})


def score_reply(case: ToolCase, reply: Reply) -> dict:
    """One case's scores (see the module's docstring); ``None`` where a score does not apply."""
    bad = invalid_markup(reply)
    markup = bool(reply.calls or bad)
    got = [(c["name"], typed_arguments(case.tools, c["name"], c["arguments"])) for c in reply.calls]
    want = [(c["name"], typed_arguments(case.tools, c["name"], c.get("arguments", {}))) for c in case.expected]
    out: dict[str, Any] = {
        "id": case.id,
        "markup": markup,
        "valid": not bad,
        "name_ok": None,
        "args_ok": None,
        "no_call_ok": None,
        "calls": [{"name": n, "arguments": a} for n, a in got],
        "expected": [{"name": n, "arguments": a} for n, a in want],
        "invalid": bad,
        "finish_reason": reply.finish_reason,
    }
    if want:
        out["name_ok"] = sorted(n for n, _ in got) == sorted(n for n, _ in want)
        # every expected call matched by one call, none left over; compared as canonical JSON, so that
        # true and 1 (or 1 and 1.0 where the schema does not say) differ
        left = [(n, json.dumps(a, sort_keys=True)) for n, a in got]
        for w in want:
            key = (w[0], json.dumps(w[1], sort_keys=True))
            if key in left:
                left.remove(key)
        out["args_ok"] = out["name_ok"] and not left and not bad
        out["correct"] = out["args_ok"]
    else:
        out["no_call_ok"] = not markup
        out["correct"] = out["no_call_ok"]
    if not out["correct"]:
        out["content"] = reply.content[:500]
    return out


def summarize(scores: list[dict]) -> dict:
    """Shares over the cases each score applies to; up to five invalid-markup examples."""

    def share(key: str) -> tuple[float | None, int]:
        vals = [s[key] for s in scores if s[key] is not None]
        return (sum(vals) / len(vals) if vals else None), len(vals)

    with_markup = [s for s in scores if s["markup"]]
    out = {
        "cases": len(scores),
        "calls_expected": sum(s["name_ok"] is not None for s in scores),
        "no_call_expected": sum(s["no_call_ok"] is not None for s in scores),
        "replies_with_markup": len(with_markup),
        "markup_valid": sum(s["valid"] for s in with_markup) / len(with_markup) if with_markup else None,
        "name_ok": share("name_ok")[0],
        "args_ok": share("args_ok")[0],
        "no_call_ok": share("no_call_ok")[0],
        "correct": sum(s["correct"] for s in scores) / len(scores) if scores else None,
        "invalid_examples": [{"id": s["id"], "text": t} for s in scores for t in s["invalid"]][:INVALID_EXAMPLES],
    }
    return out


# -- running the cases ----------------------------------------------------------------------------


def _initial_state(tokenizer, ids: list[int]) -> str:
    """``reasoning`` where the prompt leaves a think block open (thinking on), as mlx-lm's server decides."""
    state = "normal"
    if getattr(tokenizer, "has_thinking", False) and tokenizer.rfind_think_start(ids) > tokenizer.rfind_think_end(ids):
        state = "reasoning"
    return getattr(tokenizer, "response_initial_state", None) or state


def _server_messages(messages: list[dict]) -> list[dict]:
    """The messages as the server hands them to the template (tool-call arguments as objects)."""
    from mlx_lm import server as mlx_server

    msgs = copy.deepcopy(messages)
    mlx_server.process_message_content(msgs)
    return msgs


def run_in_process(rt, case: ToolCase, think: bool = False, max_tokens: int = 256) -> Reply:
    """One case through ``rt`` (from :func:`moestream.runtime.load`), greedy."""
    from moestream.runtime.generate import build_prompt, generate

    msgs = _server_messages(case.messages)
    tools = case.tools or None
    ids = build_prompt(rt, messages=msgs, think=think, tools=tools)
    texts, finish = [], None
    for chunk in generate(rt, messages=msgs, tools=tools, max_tokens=max_tokens, temp=0.0, think=think):
        texts.append(chunk.text)
        finish = chunk.stats.finish_reason
    return assemble_reply(rt.tokenizer, texts, tools, _initial_state(rt.tokenizer, ids), finish)


def _endpoint(url: str, path: str) -> str:
    url = url.rstrip("/")
    return f"{url}{path}" if url.endswith("/v1") else f"{url}/v1{path}"


def _request(url: str, body: dict | None, api_key: str | None, timeout: float) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode("utf-8", "replace")
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise ToolCasesError(f"{url}: HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ToolCasesError(f"{url}: {getattr(e, 'reason', e)}") from None
    except json.JSONDecodeError:
        raise ToolCasesError(f"{url}: the answer is not JSON") from None


def server_model(url: str, api_key: str | None = None, timeout: float = 30.0) -> str:
    """The first model a server lists (``GET /v1/models``)."""
    data = _request(_endpoint(url, "/models"), None, api_key, timeout)
    try:
        return data["data"][0]["id"]
    except (KeyError, IndexError, TypeError):
        raise ToolCasesError(f"{_endpoint(url, '/models')}: no model listed") from None


def run_against_server(
    url: str,
    model: str,
    case: ToolCase,
    think: bool = False,
    max_tokens: int = 256,
    experts_per_token: int | None = None,
    api_key: str | None = None,
    timeout: float = 600.0,
) -> Reply:
    """One case as a chat completion request (greedy) to an OpenAI-compatible server at ``url``.

    Thinking is switched through ``chat_template_kwargs`` (moestream's, mlx-lm's and vLLM's servers);
    ``experts_per_token`` is moestream's request field."""
    body: dict[str, Any] = {
        "model": model,
        "messages": case.messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "chat_template_kwargs": {"enable_thinking": think},
    }
    if case.tools:
        body["tools"] = case.tools
    if experts_per_token:
        body["experts_per_token"] = experts_per_token
    data = _request(_endpoint(url, "/chat/completions"), body, api_key, timeout)
    try:
        choice = data["choices"][0]
        return reply_from_message(choice["message"], choice.get("finish_reason"))
    except (KeyError, IndexError, TypeError):
        raise ToolCasesError(f"{_endpoint(url, '/chat/completions')}: no choices[0].message in the answer") from None


def eval_tools(
    cases: list[ToolCase],
    rt=None,
    url: str | None = None,
    model: str | None = None,
    think: bool = False,
    max_tokens: int = 256,
    experts_per_token: int | None = None,
    api_key: str | None = None,
) -> dict:
    """Run every case (in process through ``rt``, or against the server at ``url``) and score it.

    Returns:
        :func:`summarize`'s dict, with ``per_case`` (each :func:`score_reply`) and the settings.
    """
    if (rt is None) == (url is None):
        raise ValueError("eval_tools: give exactly one of rt and url")
    if url is not None and model is None:
        model = server_model(url, api_key)
    scores = []
    for case in cases:
        if rt is not None:
            reply = run_in_process(rt, case, think, max_tokens)
        else:
            reply = run_against_server(url, model, case, think, max_tokens, experts_per_token, api_key)
        scores.append(score_reply(case, reply))
        log.info("case %s: %s", case.id, "right" if scores[-1]["correct"] else "wrong")
    return {
        **summarize(scores),
        "think": think,
        "max_tokens": max_tokens,
        "experts_per_token": experts_per_token,
        "target": url if url is not None else str(rt.pack.root),
        "model": model,
        "per_case": scores,
    }


def format_summary(res: dict) -> str:
    """The summary as a few lines of text."""

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1%}"

    lines = [
        f"cases: {res['cases']} ({res['calls_expected']} expecting calls, {res['no_call_expected']} none)",
        f"markup parses:      {pct(res['markup_valid'])} of {res['replies_with_markup']} replies with markup",
        f"right function:     {pct(res['name_ok'])}",
        f"arguments right:    {pct(res['args_ok'])}",
        f"no call when none:  {pct(res['no_call_ok'])}",
        f"correct:            {pct(res['correct'])}",
    ]
    for ex in res["invalid_examples"]:
        lines.append(f"invalid markup ({ex['id']}): {ex['text'][:120]!r}")
    return "\n".join(lines)
