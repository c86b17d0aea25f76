"""The OpenAI response assembler on crafted model output: Qwen3.5-format tool calls (nested JSON
values, several calls, text around them, any split across stream chunks, malformed ones) and
reasoning, through mlx-lm's state machine and tool parser for the tiny tokenizer's template."""

import json
import random

import pytest
from mlx_lm.generate import make_text_state_machine

from moestream.convert.tiny import write_byte_tokenizer
from moestream.runtime.model.tokenizer import load_tokenizer
from moestream.runtime.serve.openai_response import Delta, ResponseAssembler, error_body, message_fields

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "opts": {"type": "object"},
                    "hours": {"type": "array"},
                    "metric": {"type": "boolean"},
                },
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "search", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}},
    },
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_byte_tokenizer(d)
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe"}))
    return load_tokenizer(d)


def call(name: str, **params) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def assemble(tok, chunks, initial="normal", finish="stop", streaming=False):
    asm = ResponseAssembler(
        make_text_state_machine(tok),
        initial,
        tok.tool_parser,
        TOOLS,
        (tok.tool_call_start, tok.tool_call_end),
        streaming=streaming,
    )
    out = Delta()
    for i, c in enumerate(chunks):
        out.merge(asm.feed(c, None))
    out.merge(asm.feed("", finish))  # the EOS token
    return out


def splits(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def args(d: Delta) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in d.tool_calls]


def test_nested_values_typed_by_the_schema(tok):
    text = call(
        "get_weather",
        city="Paris",
        days="3",
        opts='{"units": "metric", "nested": {"a": [1, {"b": null}]}}',
        hours="[1, 2, 3]",
        metric="true",
    )
    d = assemble(tok, [text])
    assert args(d) == [
        (
            "get_weather",
            {
                "city": "Paris",
                "days": 3,
                "hours": [1, 2, 3],
                "metric": True,
                "opts": {"units": "metric", "nested": {"a": [1, {"b": None}]}},
            },
        )
    ]
    assert d.content == "" and d.tool_calls[0]["type"] == "function" and d.tool_calls[0]["id"].startswith("call_")


def test_several_calls_with_text_before_and_after(tok):
    text = "Checking both.\n" + call("get_weather", city="Oslo") + "\n" + call("search", query="a <b> & c") + "\nDone."
    d = assemble(tok, [text])
    assert args(d) == [("get_weather", {"city": "Oslo"}), ("search", {"query": "a <b> & c"})]
    assert d.content == "Checking both.\n\n\nDone."


@pytest.mark.parametrize("seed", range(8))
def test_any_split_across_chunks_gives_the_same_result(tok, seed):
    text = "Sure.\n" + call("get_weather", city="New\nYork", opts='{"k": "</parameter"}') + " ok"
    whole = assemble(tok, [text])
    per_char = assemble(tok, list(text))
    random_split = assemble(tok, splits(text, seed))
    for d in (per_char, random_split):
        assert (d.content, args(d)) == (whole.content, args(whole))
    assert args(whole) == [("get_weather", {"city": "New\nYork", "opts": {"k": "</parameter"}})]


def test_streaming_numbers_calls_and_emits_each_whole(tok):
    asm = ResponseAssembler(
        make_text_state_machine(tok),
        "normal",
        tok.tool_parser,
        TOOLS,
        (tok.tool_call_start, tok.tool_call_end),
        streaming=True,
    )
    text = call("search", query="x") + call("search", query="y")
    emitted = [asm.feed(c) for c in text]
    with_calls = [d for d in emitted if d.tool_calls]
    assert [c["index"] for d in with_calls for c in d.tool_calls] == [0, 1]
    assert all(len(d.tool_calls) == 1 for d in with_calls)  # each call arrives once, complete


@pytest.mark.parametrize(
    "bad",
    [
        "<tool_call>\nnot a function at all\n</tool_call>",
        "<tool_call>\n<function=>\n</function>\n</tool_call>",
        "<tool_call>\n<function=get_weather>\n<parameter=days>\nthree and a half\n"
        "</parameter>\n</function>\n</tool_call>",
    ],
)
def test_malformed_calls_come_back_as_text(tok, bad):
    d = assemble(tok, ["before ", bad, " after"])
    assert d.tool_calls == [] and d.content == "before " + bad + " after"


def test_a_call_cut_off_by_max_tokens_is_returned_as_text(tok):
    text = "x " + call("search", query="abc")[:30]
    d = assemble(tok, splits(text, 1), finish="length")
    assert d.tool_calls == [] and d.content == text


def test_good_call_after_a_malformed_one_still_parses(tok):
    d = assemble(tok, ["<tool_call>junk</tool_call>", call("search", query="q")])
    assert d.content == "<tool_call>junk</tool_call>" and args(d) == [("search", {"query": "q"})]


def test_reasoning_then_answer(tok):
    d = assemble(tok, splits("Let me think: 2+2.\n</think>\n\nIt is 4.", 3), initial="reasoning")
    assert d.reasoning == "Let me think: 2+2.\n" and d.content == "It is 4."
    msg = message_fields(d, streaming=False)
    assert msg["reasoning_content"] == d.reasoning and msg["content"] == "It is 4."


def test_call_made_inside_reasoning(tok):
    d = assemble(tok, ["I need data. ", call("search", query="z")], initial="reasoning")
    assert d.reasoning == "I need data. " and args(d) == [("search", {"query": "z"})]


def test_error_body_is_an_openai_error_object():
    e = json.loads(error_body(429, "busy", "rate_limit_exceeded"))["error"]
    assert e == {"message": "busy", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}
