"""``moestream serve``: mlx-lm's OpenAI-compatible server over a streamed pack, driven by the
official ``openai`` client on loopback; and Qwen3.5 tool calls parsed from crafted model output."""

import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from moestream.convert import convert
from moestream.convert.tiny import tiny_config, write_tiny_checkpoint

openai = pytest.importorskip("openai", reason="needs the test extras: openai")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    src = write_tiny_checkpoint(d / "src", tiny_config(hidden_size=128, num_experts=8, moe_intermediate_size=64,
                                                       num_hidden_layers=2, vocab_size=512,
                                                       shared_expert_intermediate_size=64))
    convert(str(src), d / "tinypack", bits=4)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moestream", "serve", str(d / "tinypack"), "--port", str(port),
                             "--api-key", "sekrit"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read().decode()[-2000:])
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("server did not come up")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_models_chat_and_stream(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="sekrit")
    assert [m.id for m in client.models.list().data] == ["tinypack"]
    r = client.chat.completions.create(model="tinypack", messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens <= 5
    assert r.usage.prompt_tokens > 5 and isinstance(r.choices[0].message.content, str)
    chunks = list(client.chat.completions.create(model="tinypack", messages=[{"role": "user", "content": "hello"}],
                                                 max_tokens=5, temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == r.choices[0].message.content  # greedy: streaming and not agree
    # A follow-up turn: the whole history goes through the chat template.
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": streamed},
            {"role": "user", "content": "again"}]
    r2 = client.chat.completions.create(model="tinypack", messages=msgs, max_tokens=3, temperature=0)
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens and r2.usage.completion_tokens <= 3


def test_bad_requests_get_4xx_and_leave_the_model_loaded(server):
    import json
    import urllib.error

    def post(body: bytes) -> int:
        req = urllib.request.Request(f"{server}/v1/chat/completions", data=body, method="POST",
                                     headers={"Authorization": "Bearer sekrit", "Content-Type": "application/json"})
        try:
            return urllib.request.urlopen(req, timeout=60).status
        except urllib.error.HTTPError as e:
            return e.code

    assert post(b"{bad json") == 400
    assert post(json.dumps({"model": "tinypack"}).encode()) == 400
    other = {"model": "not-this-one", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert 400 <= post(json.dumps(other).encode()) < 500
    ok = {"model": "tinypack", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert post(json.dumps(ok).encode()) == 200  # the served pack is still there


def test_api_key_required(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tinypack", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert urllib.request.urlopen(f"{server}/health", timeout=5).status == 200  # health needs no key


def test_qwen35_tool_calls_parse_from_model_output(trained_tiny, tmp_path):
    """The tool parser mlx-lm picks for Qwen3.5's template turns its output into typed arguments."""
    from moestream.runtime.model import load_tokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        (tmp_path / name).write_bytes((trained_tiny / name).read_bytes())
    tok = load_tokenizer(tmp_path)
    assert (tok.tool_call_start, tok.tool_call_end) == ("<tool_call>", "</tool_call>")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                         "opts": {"type": "object"}}}}}]
    body = ("\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
            "<parameter=opts>\n{\"units\": \"metric\", \"hourly\": [1, 2]}\n</parameter>\n</function>\n")
    call = tok.tool_parser(body, tools)
    assert call == {"name": "get_weather", "arguments": {"city": "Paris", "days": 3,
                                                         "opts": {"units": "metric", "hourly": [1, 2]}}}
    rendered = tok.apply_chat_template([{"role": "user", "content": "weather?"}], tools=tools, tokenize=False,
                                       add_generation_prompt=True)
    assert "get_weather" in rendered and "<tools>" in rendered
