"""Every mlx-lm name moestream relies on beyond its documented API, with the signature or attribute
used. A newer mlx-lm that renames or reshapes one fails here with one message naming the name and the
version, instead of in a user's ``serve`` or ``load``. pyproject.toml pins mlx-lm to the minor version
these ran on; widen the pin only with this test passing."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from importlib.metadata import version

import pytest

MLX_LM = version("mlx-lm")


def _get(path: str):
    mod, _, attr = path.rpartition(":")
    obj = importlib.import_module(mod)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


# (name, what moestream needs of it): a callable's leading parameters, or names its source must use
# (attributes set on instances, globals a method looks up).
PARAMS = [
    ("mlx_lm.server:ModelProvider.__init__", ["self", "cli_args"]),
    ("mlx_lm.server:ModelProvider._load", ["self", "model_path", "adapter_path", "draft_model_path"]),
    ("mlx_lm.server:ResponseGenerator.__init__", ["self", "model_provider", "prompt_cache"]),
    ("mlx_lm.server:ResponseGenerator._serve_single", ["self", "request"]),
    ("mlx_lm.server:ResponseGenerator._tokenize", ["self", "tokenizer", "request", "args"]),
    ("mlx_lm.server:APIHandler.__init__", ["self", "response_generator"]),
    ("mlx_lm.server:APIHandler.handle_completion", ["self", "request", "stop_words"]),
    ("mlx_lm.server:run", ["host", "port", "model_provider"]),
    ("mlx_lm.models.cache:LRUPromptCache.__init__", ["self", "max_size", "max_bytes"]),
    ("mlx_lm.models.cache:LRUPromptCache.fetch_nearest_cache", ["self", "model", "tokens"]),
    ("mlx_lm.models.cache:LRUPromptCache.insert_cache", ["self", "model", "tokens", "prompt_cache"]),
    ("mlx_lm.utils:load_model", ["model_path"]),
    ("mlx_lm.utils:load_tokenizer", ["model_path"]),
    ("mlx_lm.models.base:scaled_dot_product_attention", ["queries", "keys", "values", "cache", "scale", "mask"]),
    ("mlx_lm.models.gated_delta:gated_delta_update", ["q", "k", "v", "a", "b", "A_log", "dt_bias", "state", "mask"]),
    ("mlx_lm.models.gated_delta:compute_g", []),
    ("mlx_lm.models.switch_layers:SwitchGLU.__init__", ["self", "input_dims", "hidden_dims", "num_experts"]),
    ("mlx_lm.models.switch_layers:QuantizedSwitchLinear.__init__", ["self", "input_dims", "output_dims"]),
]
SOURCE_USES = [
    ("mlx_lm.server:ModelProvider.__init__", ["_model_map", "_adapter_map", "_draft_model_map", "cli_args"]),
    ("mlx_lm.server:ModelProvider.load", ["_load", "model_key"]),
    ("mlx_lm.server:ResponseGenerator", ["model_provider", "prompt_cache", "generation_available", "stop_and_join"]),
    ("mlx_lm.server:APIHandler", ["_set_completion_headers", "_set_stream_headers", "do_POST"]),
    (
        "mlx_lm.server:APIHandler.do_POST",
        ["requested_model", "temperature", "top_p", "top_k", "min_p", "logit_bias", "max_tokens", "logprobs", "seed"],
    ),
    ("mlx_lm.server:main", ["ArgumentParser", "parse_args", "run(", "ModelProvider("]),
    ("mlx_lm.models.activations:SwigluOAI", ["_alpha", "_limit"]),
    ("mlx_lm.tokenizer_utils:TokenizerWrapper", ["_tokenizer"]),
    ("mlx_lm.models.qwen3_5:GatedDeltaNet.__call__", ["gated_delta_update", "conv1d"]),
]
NAMES = [
    "mlx_lm.server:GenerationArguments",
    "mlx_lm.server:ModelDescription",
    "mlx_lm.server:SamplingArguments",
    "mlx_lm.server:LogitsProcessorArguments",
    "mlx_lm.server:CompletionRequest",
    "mlx_lm.server:GenerationContext",
    "mlx_lm.server:Response",
    "mlx_lm.server:process_message_content",
    "mlx_lm.server:make_prompt_cache",
    "mlx_lm.generate:TextStateMachine",
    "mlx_lm.generate:stream_generate",
    "mlx_lm.sample_utils:make_sampler",
    "mlx_lm.utils:MODEL_REMAPPING",
    "mlx_lm.utils:load_config",
    "mlx_lm.models.rope_utils:YarnRoPE",
    "mlx_lm.models.gated_delta:compute_lower_bound_g",
    "mlx_lm.models.switch_layers:SwitchLinear",
    "mlx_lm.models.switch_layers:SwiGLU",
]
FIELDS = [
    ("mlx_lm.server:GenerationArguments", ["model", "sampling", "logits", "stop_words", "max_tokens", "seed"]),
    ("mlx_lm.server:SamplingArguments", ["temperature", "top_p", "top_k", "min_p", "xtc_probability"]),
    ("mlx_lm.server:LogitsProcessorArguments", ["logit_bias", "repetition_penalty", "presence_penalty"]),
]


def _fail(name: str, what: str) -> None:
    pytest.fail(f"mlx-lm {MLX_LM}: {name}: {what} (moestream relies on it; see tests/test_mlx_lm_contract.py)")


def _resolve(name: str):
    try:
        return _get(name)
    except (ImportError, AttributeError) as e:
        _fail(name, f"missing ({e})")


@pytest.mark.parametrize("name", NAMES)
def test_names_exist(name):
    _resolve(name)


@pytest.mark.parametrize("name, params", PARAMS, ids=[p[0] for p in PARAMS])
def test_signatures(name, params):
    got = _params(_resolve(name))
    if got[: len(params)] != params:
        _fail(name, f"parameters {got}, expected to start with {params}")


@pytest.mark.parametrize("name, uses", SOURCE_USES, ids=[s[0] for s in SOURCE_USES])
def test_source_uses(name, uses):
    src = inspect.getsource(_resolve(name))
    missing = [u for u in uses if u not in src]
    if missing:
        _fail(name, f"no longer uses {missing}")


@pytest.mark.parametrize("name, fields", FIELDS, ids=[f[0] for f in FIELDS])
def test_dataclass_fields(name, fields):
    obj = _resolve(name)
    have = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set(_params(obj.__init__))
    missing = [f for f in fields if f not in have]
    if missing:
        _fail(name, f"fields {missing} missing")


def test_the_pin_covers_this_version():
    """pyproject.toml's range holds the installed mlx-lm (a CI install outside it would mean the pin drifted)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    lo, hi = re.search(r'"mlx-lm>=([\d.]+),<([\d.]+)"', text).groups()
    key = lambda v: tuple(int(x) for x in v.split(".")[:3])  # noqa: E731
    assert key(lo) <= key(MLX_LM) < key(hi), (MLX_LM, lo, hi)


def test_a_changed_name_fails_with_its_name_and_version(monkeypatch):
    import mlx_lm.server

    monkeypatch.delattr(mlx_lm.server.ModelProvider, "_load")
    with pytest.raises(pytest.fail.Exception, match=rf"mlx-lm {MLX_LM}: mlx_lm.server:ModelProvider._load: missing"):
        test_signatures("mlx_lm.server:ModelProvider._load", ["self"])
