"""``moestream eval-tools``: the cases file, the scores on crafted replies (read by the server's own
state machine and Qwen3.5 tool parser), one in-process run on a tiny pack, and ``--url`` against
``moestream serve`` started in-process with a scripted model."""

import importlib
import json
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx_lm import server as mlx_server

from moestream.convert import convert
from moestream.convert.tiny import tiny_config, write_byte_tokenizer, write_tiny_checkpoint
from moestream.main import cli
from moestream.runtime.eval_tools import (
    Reply,
    ToolCasesError,
    assemble_reply,
    load_cases,
    score_reply,
    summarize,
    typed,
)
from moestream.runtime.model.tokenizer import load_tokenizer

CASES = Path(__file__).parent / "data" / "tool_cases.jsonl"


@pytest.fixture(scope="module")
def cases():
    return {c.id: c for c in load_cases(CASES)}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_byte_tokenizer(d)
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe"}))
    return load_tokenizer(d)


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaltools")
    cfg = tiny_config(
        hidden_size=128,
        num_experts=8,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        vocab_size=512,
        shared_expert_intermediate_size=64,
    )
    src = write_tiny_checkpoint(d / "src", cfg)
    convert(str(src), d / "p4", bits=4, alignment=4096)
    return d / "p4"


def call(name: str, **params) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def score(tok, case, text: str, finish: str = "stop") -> dict:
    # split in two pieces: the reply is read across chunks as the server reads a stream
    reply = assemble_reply(tok, [text[: len(text) // 2], text[len(text) // 2 :]], case.tools, "normal", finish)
    return score_reply(case, reply)


def test_cases_file_and_its_errors(tmp_path, cases):
    assert list(cases) == ["weather", "search", "typed", "chat", "after-result"]
    assert cases["chat"].expected == [] and cases["weather"].expected[0]["arguments"]["d"] == 3
    good = CASES.read_text().splitlines()[0]
    for text, msg in [
        ("{not json", ":1: not a JSON object"),
        ("[1]", ":1: a case must be a JSON object"),
        ('{"id": 1, "tools": [], "messages": []}', ":1: missing 'expected'"),
        ('{"id": 1, "tools": [{}], "messages": [{"role": "user"}], "expected": []}', ":1: 'tools' must be"),
        ('{"id": 1, "tools": [], "messages": [], "expected": []}', ":1: 'messages' must be"),
        ('{"id": 1, "tools": [], "messages": [{"role": "user"}], "expected": [{"name": "x"}]}', "'x' is not among"),
        (good + "\n\n" + good, ":3: duplicate id 'weather'"),
        ("", ": no cases"),
    ]:
        p = tmp_path / "c.jsonl"
        p.write_text(text)
        with pytest.raises(ToolCasesError, match=msg) as e:
            load_cases(p)
        assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_right_call_typed_by_the_schema(tok, cases):
    s = score(tok, cases["weather"], "Checking.\n" + call("w", c="  Paris ", d="3", u="C"))
    assert (s["markup"], s["valid"], s["name_ok"], s["args_ok"], s["correct"]) == (True, True, True, True, True)
    assert s["calls"] == [{"name": "w", "arguments": {"c": "Paris", "d": 3, "u": "C"}}]
    s = score(tok, cases["typed"], call("w", c="Oslo", m="True", t="2.50"))
    assert s["args_ok"]
    # typing: integers from their text (3.0 too), numbers, booleans, enum members; no bool for an integer
    schema = {"type": "object", "properties": {"d": {"type": "integer"}, "n": {"type": "number"}}}
    assert typed({"d": "3.0", "n": "2"}, schema) == {"d": 3, "n": 2.0}
    assert typed(True, {"type": "integer"}) is True and typed("x", {"type": "integer"}) == "x"
    assert typed(" 2 ", {"enum": [1, 2]}) == 2 and typed("false", {"type": "boolean"}) is False
    assert typed('{"a": "1"}', {"type": "object", "properties": {"a": {"type": "integer"}}}) == {"a": 1}


def test_wrong_name_wrong_argument_and_missing_call(tok, cases):
    wrong_name = score(tok, cases["weather"], call("s", q="Paris"))
    assert (wrong_name["valid"], wrong_name["name_ok"], wrong_name["args_ok"]) == (True, False, False)
    wrong_arg = score(tok, cases["weather"], call("w", c="Paris", d="4", u="C"))
    assert (wrong_arg["name_ok"], wrong_arg["args_ok"]) == (True, False)
    extra_arg = score(tok, cases["search"], call("s", q="numba", k="1"))
    assert (extra_arg["name_ok"], extra_arg["args_ok"]) == (True, False)
    bad_bool = score(tok, cases["typed"], call("w", c="Oslo", m="1", t="2.5"))  # "1" is not true
    assert bad_bool["args_ok"] is False
    no_call = score(tok, cases["search"], "I would search for numba.")
    assert (no_call["markup"], no_call["name_ok"], no_call["args_ok"], no_call["correct"]) == (
        False,
        False,
        False,
        False,
    )
    twice = score(tok, cases["search"], call("s", q="numba") + call("s", q="numba"))
    assert (twice["name_ok"], twice["args_ok"]) == (False, False)


def test_unparseable_markup(tok, cases):
    for text in [
        "<tool_call>\nnot a call\n</tool_call>",  # the parser refuses it: back as text
        "<tool_call>\n<function=w>\n<parameter=c>\nPar",  # cut off inside the block
        "<function=w>\n<parameter=c>\nParis\n</parameter>\n</function>",  # no <tool_call> around it
    ]:
        s = score(tok, cases["weather"], text, finish="length")
        assert (s["markup"], s["valid"], s["args_ok"]) == (True, False, False), text
        assert s["invalid"] and s["invalid"][0].startswith(("<tool_call>", "<function="))
    bad_json = score_reply(cases["search"], Reply(calls=[], bad_calls=['{"name": "s", "arguments": "{"}']))
    assert (bad_json["markup"], bad_json["valid"]) == (True, False)


def test_no_call_cases_and_summary(tok, cases):
    quiet = score(tok, cases["chat"], "Hello! How can I help?")
    assert (quiet["markup"], quiet["no_call_ok"], quiet["correct"], quiet["name_ok"]) == (False, True, True, None)
    eager = score(tok, cases["chat"], call("s", q="hello"))
    assert (eager["valid"], eager["no_call_ok"], eager["correct"]) == (True, False, False)
    broken = score(tok, cases["after-result"], "<tool_call>\nnope\n</tool_call>")
    assert (broken["no_call_ok"], broken["valid"]) == (False, False)
    right = score(tok, cases["weather"], call("w", c="Paris", d="3", u="C"))
    wrong = score(tok, cases["search"], call("w", c="numba"))
    s = summarize([quiet, eager, broken, right, wrong])
    assert (s["cases"], s["calls_expected"], s["no_call_expected"], s["replies_with_markup"]) == (5, 2, 3, 4)
    assert s["markup_valid"] == 3 / 4 and s["name_ok"] == 0.5 and s["args_ok"] == 0.5
    assert s["no_call_ok"] == 1 / 3 and s["correct"] == 2 / 5
    assert [e["id"] for e in s["invalid_examples"]] == ["after-result"]


def test_in_process_run_on_a_tiny_pack(pack, cases, monkeypatch):
    """The CLI on a pack: each case's prompt (with its tools) through the streamed model, the reply's
    text scripted after one real token and read as the server reads it."""
    # the module itself: the name moestream.runtime.generate is also the package's lazy generate() function
    gen_mod = importlib.import_module("moestream.runtime.generate")

    seen, real = [], gen_mod.generate

    def scripted(rt, **kw):
        seen.append(kw)
        *_, last = real(rt, **{**kw, "max_tokens": 1})  # the real model: template, prefill, one token
        for piece in ("<tool_call>\n<function=w>\n<parameter=c>\nPa", "ris\n</parameter>\n</function>\n</tool_call>"):
            yield gen_mod.Chunk(piece)
        last.stats.finish_reason = "stop"
        yield gen_mod.Chunk("", None, last.stats)

    monkeypatch.setattr(gen_mod, "generate", scripted)
    r = CliRunner().invoke(cli, ["eval-tools", str(pack), "--cases", str(CASES), "-m", "8", "--think", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert (res["cases"], res["calls_expected"], res["no_call_expected"], res["think"]) == (5, 3, 2, True)
    assert seen[0]["tools"] == cases["weather"].tools and seen[0]["think"] is True and seen[0]["max_tokens"] == 8
    by_id = {s["id"]: s for s in res["per_case"]}
    w = by_id["weather"]
    assert (w["valid"], w["name_ok"], w["args_ok"]) == (True, True, False)  # d and u missing
    assert w["calls"] == [{"name": "w", "arguments": {"c": "Paris"}}]
    assert (by_id["search"]["name_ok"], by_id["chat"]["no_call_ok"], res["markup_valid"]) == (False, False, 1.0)
    assert res["correct"] == 0.0


class Script:
    """Forces the served model's tokens to spell a text (then EOS), through mlx-lm's logits processors."""

    def __init__(self, tokenizer):
        self.tok, self.text = tokenizer, None
        self._orig = mlx_server._make_logits_processors

    def __call__(self, args):
        procs = self._orig(args)
        if self.text is None:
            return procs
        todo = list(self.tok.encode(self.text, add_special_tokens=False)) + [self.tok.eos_token_id]

        def force(tokens, logits):
            t = todo.pop(0) if len(todo) > 1 else todo[0]
            return mx.where(mx.arange(logits.shape[-1]) == t, 0.0, -1e9).astype(logits.dtype)[None]

        return [*procs, force]


def test_url_against_moestream_serve(pack, cases, tmp_path):
    pytest.importorskip("openai", reason="needs the test extras: openai")  # the server's own tests' extras
    from moestream.runtime.serve.server import build_server

    s = build_server(str(pack), port=0).start()
    script = Script(s.generator.model_provider.tokenizer)
    mlx_server._make_logits_processors = script
    try:
        script.text = call("w", c="Paris", d="3", u="C")
        one = tmp_path / "one.jsonl"
        one.write_text(json.dumps({**cases["weather"].__dict__}) + "\n")
        r = CliRunner().invoke(
            cli, ["eval-tools", "--cases", str(one), "--url", s.url, "--max-tokens", "200", "--json"]
        )
        assert r.exit_code == 0, r.output
        res = json.loads(r.output)
        assert res["model"] == "p4" and res["target"] == s.url
        assert (res["markup_valid"], res["name_ok"], res["args_ok"], res["correct"]) == (1.0, 1.0, 1.0, 1.0)
        script.text = "<tool_call>\nbroken\n</tool_call>"  # the server hands it back as text
        r = CliRunner().invoke(
            cli, ["eval-tools", "--cases", str(one), "--url", s.url + "/v1", "--model", "p4", "-k", "2", "-m", "200"]
        )
        assert r.exit_code == 0, r.output
        assert "markup parses:      0.0% of 1 replies" in r.output and "invalid markup (weather)" in r.output
        r = CliRunner().invoke(cli, ["eval-tools", "--cases", str(one), "--url", s.url, "--model", "nope"])
        assert r.exit_code == 1 and r.output.startswith("error: ") and "HTTP 404" in r.output
    finally:
        mlx_server._make_logits_processors = script._orig
        s.close()


def test_cli_option_errors(pack):
    r = CliRunner().invoke(cli, ["eval-tools", "--cases", str(CASES)])
    assert r.exit_code == 1 and "--url" in r.output and "give either PACK or --url" in r.output
