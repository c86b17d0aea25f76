"""``moestream serve`` driven by the official ``openai`` client over loopback.

Most tests run the server in-process (``build_server(...).start()``) so that a test can script the
model's output: the tiny random model never writes a tool call by itself, so a logits processor
forces a given text token by token; everything after the logits (sampling, the state machine, the
tool parser, the HTTP response) is the server's own path. One test starts the CLI in a subprocess.
"""

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import mlx.core as mx
import pytest

from moestream.convert import convert
from moestream.convert.tiny import tiny_config, write_tiny_checkpoint

openai = pytest.importorskip("openai", reason="needs the test extras: openai")

from mlx_lm import server as mlx_server  # noqa: E402

from moestream.runtime import load  # noqa: E402
from moestream.runtime.model.blocks import get_experts_per_token, moe_blocks  # noqa: E402
from moestream.runtime.serve.server import build_server  # noqa: E402

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "opts": {"type": "object"}},
            },
        },
    }
]
THINK_OFF = {"chat_template_kwargs": {"enable_thinking": False}}
NO_THINK = {"extra_body": THINK_OFF}


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    src = write_tiny_checkpoint(
        d / "src",
        tiny_config(
            hidden_size=128,
            num_experts=8,
            moe_intermediate_size=64,
            num_hidden_layers=2,
            vocab_size=512,
            shared_expert_intermediate_size=64,
        ),
    )
    convert(str(src), d / "tinypack", bits=4)
    return d / "tinypack"


class Script:
    """Forces the model's next tokens to spell ``text`` (then EOS), through mlx-lm's logits processors."""

    def __init__(self):
        self.tokens, self.eos = None, None
        self._orig = mlx_server._make_logits_processors

    def __call__(self, args):
        procs = self._orig(args)
        if self.tokens is None:
            return procs
        todo = list(self.tokens) + [self.eos]

        def force(tokens, logits):
            t = todo.pop(0) if len(todo) > 1 else todo[0]
            return mx.where(mx.arange(logits.shape[-1]) == t, 0.0, -1e9).astype(logits.dtype)[None]

        return [*procs, force]


@contextlib.contextmanager
def scripted_server(pack, **kwargs):
    """An in-process server on a free port, with a :class:`Script` in mlx-lm's logits-processor hook."""
    s = build_server(str(pack), port=0, **kwargs).start()
    script = Script()
    script.eos = s.generator.model_provider.tokenizer.eos_token_id
    mlx_server._make_logits_processors = script
    try:
        yield s, script
    finally:
        mlx_server._make_logits_processors = script._orig
        s.close()


@pytest.fixture(scope="module")
def server(pack):
    with scripted_server(pack, max_concurrency=8, max_context=512) as s:
        yield s


@pytest.fixture
def client(server):
    server[1].tokens = None
    return openai.OpenAI(base_url=f"{server[0].url}/v1", api_key="none", max_retries=0)


def scripted(server, text: str):
    s, script = server
    script.tokens = s.generator.model_provider.tokenizer.encode(text, add_special_tokens=False)


def get(url: str, path: str) -> dict:
    return json.loads(urllib.request.urlopen(url + path, timeout=10).read())


def post(url: str, body, path="/v1/chat/completions") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        r = urllib.request.urlopen(req, timeout=60)
        return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_chat_stream_and_completions(client):
    assert [m.id for m in client.models.list().data] == ["tinypack"]
    assert client.models.retrieve("tinypack").id == "tinypack"
    msgs = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model="tinypack", messages=msgs, max_tokens=6, temperature=0, **NO_THINK)
    assert r.choices[0].finish_reason in ("length", "stop") and 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model="tinypack",
            messages=msgs,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            **NO_THINK,
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == (r.choices[0].message.content or "")  # greedy: streaming and not agree
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and not chunks[-1].choices
    t = client.completions.create(model="tinypack", prompt="def f(x):", max_tokens=4, temperature=0)
    assert t.choices[0].finish_reason in ("length", "stop") and t.usage.prompt_tokens == len("def f(x):")


def test_thinking_switch_and_reasoning_content(server, client):
    msgs = [{"role": "user", "content": "2+2?"}]
    scripted(server, "Add them.</think>\n\nIt is 4.")
    r = client.chat.completions.create(model="tinypack", messages=msgs, max_tokens=40)
    m = r.choices[0].message
    assert (m.reasoning_content, m.content, r.choices[0].finish_reason) == ("Add them.", "It is 4.", "stop")
    chunks = list(client.chat.completions.create(model="tinypack", messages=msgs, max_tokens=40, stream=True))
    assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks) == "Add them."
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "It is 4."
    scripted(server, "It is 4.")
    off = client.chat.completions.create(model="tinypack", messages=msgs, max_tokens=40, **NO_THINK)
    assert off.choices[0].message.content == "It is 4." and not getattr(
        off.choices[0].message, "reasoning_content", None
    )
    # The switch reaches the template: off closes an empty think block in the prompt.
    tok = server[0].generator.model_provider.tokenizer
    on_text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    off_text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert on_text.endswith("<think>\n") and off_text.endswith("<think>\n\n</think>\n\n")
    assert (r.usage.prompt_tokens, off.usage.prompt_tokens) == (len(tok.encode(on_text)), len(tok.encode(off_text)))


def test_tool_calls_plain_and_streamed(server, client):
    # Short names: the byte-level tiny tokenizer spends one token per character.
    tools = [
        {
            "type": "function",
            "function": {
                "name": "w",
                "parameters": {
                    "type": "object",
                    "properties": {"c": {"type": "string"}, "d": {"type": "integer"}, "o": {"type": "object"}},
                },
            },
        }
    ]
    out = (
        "Ok.\n<tool_call>\n<function=w>\n<parameter=c>\nParis\n</parameter>\n<parameter=d>\n3\n</parameter>\n"
        '<parameter=o>\n{"u": [1, {"v": true}]}\n</parameter>\n</function>\n</tool_call>'
    )
    want = {"c": "Paris", "d": 3, "o": {"u": [1, {"v": True}]}}
    msgs = [{"role": "user", "content": "Paris?"}]
    scripted(server, out)
    r = client.chat.completions.create(model="tinypack", messages=msgs, tools=tools, max_tokens=200, **NO_THINK)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Ok.\n"
    assert [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls] == [("w", want)]
    chunks = list(
        client.chat.completions.create(
            model="tinypack", messages=msgs, tools=tools, max_tokens=200, stream=True, **NO_THINK
        )
    )
    calls = [t for ch in chunks for t in (ch.choices[0].delta.tool_calls or [])]
    assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in calls] == [(0, "w", want)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The call and its result go back in the next turn (arguments as the JSON string clients send).
    follow = msgs + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": calls[0].id, "type": "function", "function": {"name": "w", "arguments": json.dumps(want)}}
            ],
        },
        {"role": "tool", "tool_call_id": calls[0].id, "content": "sun"},
    ]
    scripted(server, "Sun.")
    r2 = client.chat.completions.create(model="tinypack", messages=follow, tools=tools, max_tokens=20, **NO_THINK)
    assert r2.choices[0].message.content == "Sun." and r2.choices[0].finish_reason == "stop"


def test_malformed_tool_call_is_returned_as_text(server, client):
    tools = [
        {
            "type": "function",
            "function": {"name": "w", "parameters": {"type": "object", "properties": {"d": {"type": "integer"}}}},
        }
    ]
    bad = "<tool_call>\n<function=w>\n<parameter=d>\nmany\n</parameter>\n</function>\n</tool_call>"
    scripted(server, bad)
    r = client.chat.completions.create(
        model="tinypack", messages=[{"role": "user", "content": "hi"}], tools=tools, max_tokens=200, **NO_THINK
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == bad
    assert r.choices[0].finish_reason == "stop"


def test_stop_strings_and_seed(server, client):
    msgs = [{"role": "user", "content": "hi"}]
    scripted(server, "alpha beta STOP gamma")
    r = client.chat.completions.create(model="tinypack", messages=msgs, max_tokens=50, stop=["STOP"], **NO_THINK)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("alpha beta ", "stop")
    server[1].tokens = None
    kw = dict(model="tinypack", messages=msgs, max_tokens=8, temperature=1.0, logprobs=True, **NO_THINK)

    def ids(seed):
        return [
            x.model_extra["id"] for x in client.chat.completions.create(seed=seed, **kw).choices[0].logprobs.content
        ]

    assert ids(1) == ids(1) and ids(1) != ids(2)  # seeded sampling is reproducible, and the seed is used


def _reference_tokens(pack, tokenizer, messages, n, **load_kw) -> list[int]:
    """Greedy tokens from a fresh in-process runtime (no prompt cache), as the server should produce."""
    from mlx_lm.generate import stream_generate

    rt = load(pack, **load_kw)
    try:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
        return [g.token for g in stream_generate(rt.model, rt.tokenizer, prompt, max_tokens=n)]
    finally:
        rt.close()


def test_follow_up_turn_reuses_the_conversation_prefix(server, client, pack):
    tok = server[0].generator.model_provider.tokenizer
    turn1 = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
    r1 = client.chat.completions.create(model="tinypack", messages=turn1, max_tokens=5, temperature=0, **NO_THINK)
    turn2 = turn1 + [
        {"role": "assistant", "content": r1.choices[0].message.content or ""},
        {"role": "user", "content": "Another one."},
    ]
    r2 = client.chat.completions.create(
        model="tinypack", messages=turn2, max_tokens=5, temperature=0, logprobs=True, **NO_THINK
    )
    history = tok.apply_chat_template(turn2, add_generation_prompt=False, enable_thinking=False)
    prompt = tok.apply_chat_template(turn2, add_generation_prompt=True, enable_thinking=False)
    assert r2.usage.prompt_tokens == len(prompt)
    # Everything up to turn 1's reply is reused; at least the first turn's history was not recomputed.
    first = tok.apply_chat_template(turn1, add_generation_prompt=False)
    assert len(first) <= r2.usage.prompt_tokens_details.cached_tokens < len(history)
    got = [x.model_extra["id"] for x in r2.choices[0].logprobs.content]
    assert got == _reference_tokens(pack, tok, turn2, len(got))


def test_per_request_experts_per_token(server, client, pack):
    tok = server[0].generator.model_provider.tokenizer
    msgs = [{"role": "user", "content": "count"}]
    blocks = moe_blocks(server[0].generator.model_provider.model).values()
    k0 = [get_experts_per_token(b) for b in blocks]
    r = client.chat.completions.create(
        model="tinypack",
        messages=msgs,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        extra_body={"experts_per_token": 1, **THINK_OFF},
    )
    got = [x.model_extra["id"] for x in r.choices[0].logprobs.content]
    assert got == _reference_tokens(pack, tok, msgs, len(got), experts_per_token=1)
    r0 = client.chat.completions.create(
        model="tinypack", messages=msgs, max_tokens=6, temperature=0, logprobs=True, extra_body=THINK_OFF
    )
    # K was applied: the pack's own K gives other tokens or, where greedy agrees, other probabilities
    ones = [(x.model_extra["id"], x.logprob) for x in r.choices[0].logprobs.content]
    own = [(x.model_extra["id"], x.logprob) for x in r0.choices[0].logprobs.content]
    assert [t for t, _ in own] != got or max(abs(a[1] - b[1]) for a, b in zip(ones, own)) > 1e-3
    assert k0 and [get_experts_per_token(b) for b in blocks] == k0 and k0[0] != 1  # the pack's own K again afterwards


@pytest.mark.parametrize(
    "body,status,code,param",
    [
        (b"{bad json", 400, None, None),
        ({"model": "tinypack"}, 400, None, "messages"),
        ({"messages": [{"content": "no role"}]}, 400, None, "messages[0]"),
        ({"model": "not-this-one", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found", "model"),
        ({"messages": [{"role": "user", "content": "x" * 600}]}, 400, "context_length_exceeded", "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, None, None),
        ({"messages": [{"role": "user", "content": "hi"}], "experts_per_token": 99}, 400, None, "experts_per_token"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, None, "n"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, None, "tools"),
    ],
)
def test_bad_requests_get_openai_error_objects(server, body, status, code, param):
    url = server[0].url
    got, err = post(url, body)
    assert got == status and set(err) == {"error"}
    e = err["error"]
    assert isinstance(e["message"], str) and e["message"] and e["type"] == "invalid_request_error"
    assert (e["code"], e["param"]) == (code, param)
    assert post(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})[0] == 200


def test_prompt_too_long_for_max_tokens_is_clamped(client):
    r = client.chat.completions.create(
        model="tinypack",
        messages=[{"role": "user", "content": "y" * 480}],
        max_tokens=10_000,
        temperature=0,
        **NO_THINK,
    )
    assert r.usage.total_tokens <= 512


def _eos_suppressed(server) -> dict:
    return {"logit_bias": {str(server[0].generator.model_provider.tokenizer.eos_token_id): -100.0}}


def test_client_disconnect_stops_its_generation_only(server, client):
    url = server[0].url
    before = get(url, "/stats")
    stream = client.chat.completions.create(
        model="tinypack",
        messages=[{"role": "user", "content": "go on"}],
        max_tokens=5000,
        stream=True,
        temperature=0,
        extra_body={**_eos_suppressed(server), **THINK_OFF},
    )
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()
    deadline = time.time() + 60
    while (s := get(url, "/stats"))["cancelled"] == before["cancelled"] and time.time() < deadline:
        time.sleep(0.05)
    assert s["cancelled"] == before["cancelled"] + 1 and s["last"]["cancelled"]
    assert s["last"]["generated_tokens"] < 1000  # stopped long before max_tokens
    assert s["in_flight"] == 0 and s["running"] is None
    r = client.chat.completions.create(model="tinypack", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_concurrent_clients_queue_and_all_complete(server):
    s, _ = server
    url = s.url
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 24, **_eos_suppressed(server), **THINK_OFF}
    results = [None] * 8

    def raw(i):
        results[i] = post(url, body)

    def at_once(n):
        threads = [threading.Thread(target=raw, args=(i,)) for i in range(n)]
        [t.start() for t in threads]
        [t.join() for t in threads]

    at_once(8)  # within --max-concurrency: all queue and all complete
    assert [r[0] for r in results] == [200] * 8 and all(r[1]["usage"]["completion_tokens"] == 24 for r in results)
    before = get(url, "/stats")
    s.generator.stats.max_concurrency = 2
    try:
        at_once(8)
        codes = sorted(r[0] for r in results)
        assert set(codes) == {200, 429} and codes.count(200) >= 2, codes
        assert all(r[1]["error"]["code"] == "rate_limit_exceeded" for r in results if r[0] == 429)
        assert all(r[1]["usage"]["completion_tokens"] == 24 for r in results if r[0] == 200)
        # Clients that honour 429 + Retry-After (the openai client does) all get served.
        done = []

        def polite(i):
            c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=30)
            done.append(
                c.chat.completions.create(
                    model="tinypack",
                    messages=body["messages"],
                    max_tokens=24,
                    extra_body={k: body[k] for k in ("logit_bias", "chat_template_kwargs")},
                )
            )

        threads = [threading.Thread(target=polite, args=(i,)) for i in range(6)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(done) == 6 and all(r.usage.completion_tokens == 24 for r in done)
    finally:
        s.generator.stats.max_concurrency = 8
    after = get(url, "/stats")
    assert after["completed"] - before["completed"] == codes.count(200) + 6 and after["in_flight"] == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_with_api_key(pack):
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moestream",
            "serve",
            str(pack),
            "--port",
            str(port),
            "--api-key",
            "sekrit",
            "--max-concurrency",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:  # no key needed
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(proc.stdout.read().decode()[-2000:])
                time.sleep(0.3)
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model="tinypack", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0)
        r = good.chat.completions.create(model="tinypack", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert r.usage.completion_tokens <= 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -- the trained fixture with the real Qwen3.5 chat template (skipped where ../shared is absent) -----


@pytest.fixture(scope="module")
def trained_server(trained_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "trained-4bit"
    convert(str(trained_tiny), out, bits=4)
    with scripted_server(out) as s:
        yield s


def test_real_template_renders_tools_calls_and_results(trained_server):
    """What the server sends the model for a tool round trip, as Qwen3.5 was trained to see it."""
    tok = trained_server[0].generator.model_provider.tokenizer
    assert (tok.tool_call_start, tok.tool_call_end, tok.has_thinking) == ("<tool_call>", "</tool_call>", True)
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": json.dumps({"city": "Paris", "opts": {"units": "C"}}),
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    mlx_server.process_message_content(msgs)  # the server's own step: JSON-string arguments -> dict
    text = tok.apply_chat_template(msgs, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert text.startswith(
        "<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n" + json.dumps(TOOLS[0])
    )
    assert (
        "<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n<function=get_weather>\n"
        '<parameter=city>\nParis\n</parameter>\n<parameter=opts>\n{"units": "C"}\n</parameter>\n'
        "</function>\n</tool_call><|im_end|>\n"
    ) in text
    assert text.endswith(
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n"
    )


def test_trained_pack_plain_streaming_and_tools(trained_server):
    s, script = trained_server
    script.tokens = None
    client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0)
    name = client.models.list().data[0].id
    msgs = [{"role": "user", "content": "def fib(n):"}]
    r = client.chat.completions.create(model=name, messages=msgs, max_tokens=12, temperature=0, **NO_THINK)
    assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("stop", "length")
    chunks = list(
        client.chat.completions.create(model=name, messages=msgs, max_tokens=12, temperature=0, stream=True, **NO_THINK)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (r.choices[0].message.content or "")
    with_tools = client.chat.completions.create(
        model=name, messages=msgs, tools=TOOLS, max_tokens=4, temperature=0, **NO_THINK
    )
    assert with_tools.usage.prompt_tokens > r.usage.prompt_tokens + 100  # the tools block reached the model
    scripted(
        trained_server,
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
    )
    t = client.chat.completions.create(model=name, messages=msgs, tools=TOOLS, max_tokens=100, **NO_THINK)
    call = t.choices[0].message.tool_calls[0].function
    assert (call.name, json.loads(call.arguments), t.choices[0].finish_reason) == (
        "get_weather",
        {"city": "Paris", "days": 2},
        "tool_calls",
    )
