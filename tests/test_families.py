"""Each MoE family end to end: a tiny random model made with transformers, saved, converted at 16
and 8 bits, and run through moestream against transformers' own float32 forward pass (an
independent implementation): 16-bit logits equal up to float rounding, 8-bit mean KL <= 0.005 through
``evaluate(reference=..., reference_backend="transformers")`` (``moestream eval --reference``), and
streamed runs identical to fully resident ones."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from moestream.convert import ConvertError, convert, supported_families
from moestream.layouts import Manifest
from moestream.runtime import evaluate, load
from moestream.runtime.model.build import load_resident_model

families = pytest.importorskip("families", reason="needs the test extras: torch, transformers")

KL_8BIT = 0.005
# 16-bit packs hold the float32 source exactly: only summation order differs from transformers.
TOL_16BIT = 2e-4


def _text(seed: int, words: int = 120) -> str:
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    return " ".join("".join(rng.choice(letters, rng.integers(2, 8))) for _ in range(words))


def _tokens(seed: int, shape=(2, 20)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, families.VOCAB, shape)


@pytest.fixture(scope="module", params=sorted(families.FAMILIES))
def fam(request, tmp_path_factory):
    """One family's source checkpoint and its 16- and 8-bit packs (converted once per module)."""
    d = tmp_path_factory.mktemp(request.param)
    src = families.save_family(d, request.param)
    convert(str(src), d / "p16", bits=16, dtype="float32", alignment=4096)
    convert(str(src), d / "p8", bits=8, alignment=4096)
    return request.param, src, d


def _resident_logits(pack, tokens):
    model, p = load_resident_model(pack, dtype="float32")
    p.close()
    return np.array(model(mx.array(tokens)).astype(mx.float32))


def test_16bit_logits_match_transformers(fam):
    name, src, d = fam
    tokens = _tokens(11)
    ref = families.transformers_logits(src, tokens)
    got = _resident_logits(d / "p16", tokens)
    assert ref.std() > 0.3, "reference logits too flat to test anything"
    diff = np.abs(got - ref).max()
    print(f"\n{name}: 16-bit max |logit diff| {diff:.2e} (max |logit| {np.abs(ref).max():.2f})")
    assert diff <= TOL_16BIT * np.abs(ref).max(), diff


def test_8bit_kl_against_transformers(fam):
    name, src, d = fam
    rt = load(d / "p8")  # streamed; on the CPU with moestream's kernels
    try:
        res = evaluate(rt, _text(5), reference=src, reference_backend="transformers", window=128)
    finally:
        rt.close()
    print(
        f"\n{name}: 8-bit mean KL {res['kl_mean']:.5f}, top-1 {res['top1_agreement']:.1%}, "
        f"ppl {res['ppl']:.2f} vs reference {res['ref_ppl']:.2f} over {res['tokens']} tokens"
    )
    assert res["tokens"] > 200
    assert res["kl_mean"] <= KL_8BIT, res


@pytest.mark.parametrize("cpu_kernels", [False, True])
def test_streamed_equals_resident(fam, cpu_kernels, request):
    name, src, d = fam
    if cpu_kernels:  # plumbing checked against the resident model: float products (int8 has its own bounds)
        request.getfixturevalue("float_kernels")
    x = mx.array(_tokens(23, (1, 30)))
    want = _resident_logits(d / "p8", np.array(x))
    rt = load(d / "p8", cache="none", kernels="numba" if cpu_kernels else "mlx", max_slots=3)
    try:
        got = np.array(rt.model(x))
    finally:
        rt.close()
    if cpu_kernels:  # the numba kernels sum in another order than MLX's
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    else:
        assert np.array_equal(got, want)


def test_experts_per_token_override_reads_k(fam):
    from mlx_lm.models.cache import make_prompt_cache

    name, src, d = fam
    m = Manifest.load(d / "p8")
    rt = load(d / "p8", cache="none", experts_per_token=1, trace=True)
    try:
        cache = make_prompt_cache(rt.model)
        mx.eval(rt.model(mx.array(_tokens(3, (1, 5))), cache=cache))
        rt.store.stats.reset()
        mx.eval(rt.model(mx.array([[7]]), cache=cache))
        assert rt.store.stats.reads == len(m.experts) > 0
    finally:
        rt.close()


def test_pack_records_family(fam):
    name, src, d = fam
    m = Manifest.load(d / "p8")
    cfg = json.loads((src / "config.json").read_text())
    assert m.model_type == name == cfg["model_type"]
    assert m.top_k == cfg["num_experts_per_tok"]
    assert len(m.experts) == cfg["num_hidden_layers"] - cfg.get("first_k_dense_replace", 0)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen3_next", "deepseek_v3"])
def test_fused_in_memory_layout(family, tmp_path):
    """transformers' in-memory layout (fused gate_up_proj/down_proj) converts to the same model."""
    src = families.save_family(tmp_path, family, layout="fused", seed=2)
    assert any(n.endswith("experts.gate_up_proj") for n in families.stored_names(src))
    convert(str(src), tmp_path / "p16", bits=16, dtype="float32", alignment=4096)
    tokens = _tokens(4)
    ref = families.transformers_logits(src, tokens)
    got = _resident_logits(tmp_path / "p16", tokens)
    assert np.abs(got - ref).max() <= TOL_16BIT * np.abs(ref).max()


def test_unsupported_architecture_is_named(tmp_path):
    src = families.save_family(tmp_path, "qwen3_moe")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="olmoe", architectures=["OlmoeForCausalLM"])
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError) as e:
        convert(str(src), tmp_path / "out")
    msg = str(e.value)
    assert "'olmoe'" in msg and "OlmoeForCausalLM" in msg and "\n" not in msg
    assert all(f in msg for f in supported_families()) and len(supported_families()) >= 3
    assert not (tmp_path / "out").exists()


CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "configs"
# real config -> (family, MoE layers, experts, top-k, (expert intermediate, hidden))
REAL = {
    "qwen3-30b-a3b.json": ("qwen3_moe", 48, 128, 8, (768, 2048)),
    "qwen3-235b-a22b.json": ("qwen3_moe", 94, 128, 8, (1536, 4096)),
    "qwen3-next-80b-a3b.json": ("qwen3_next", 48, 512, 10, (512, 2048)),
    # dense layers 0-2, MTP layer 61 not a decoder layer
    "deepseek-v3.json": ("deepseek_v3", 58, 256, 8, (2048, 7168)),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_configs(name):
    """The adapters read the real releases' config.json files (mlx-lm's model built lazily)."""
    from moestream.convert import family_for

    if not (CONFIGS / name).exists():
        pytest.skip(f"shared fixture absent: {CONFIGS / name}")
    fam = family_for(json.loads((CONFIGS / name).read_text()))
    family, layers, experts, k, shape = REAL[name]
    assert (fam.model_type, len(fam.moe_layers()), fam.num_experts, fam.top_k) == (family, layers, experts, k)
    assert all(fam.expert_shape(i) == shape for i in fam.moe_layers())


@pytest.fixture(scope="module")
def deepseek_src(tmp_path_factory) -> Path:
    return families.save_family(tmp_path_factory.mktemp("ds"), "deepseek_v3", seed=1)


def test_kimi_k2_runs_as_deepseek_v3(deepseek_src, tmp_path):
    """kimi_k2 is DeepSeek-V3's architecture under its own model_type (mlx-lm maps it; transformers
    has no class of its own for it): the same weights give transformers' DeepSeek-V3 logits at 16
    bits, its KL bound at 8, and streamed equals resident."""
    import shutil

    src = tmp_path / "kimi"
    shutil.copytree(deepseek_src, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "kimi_k2"
    (src / "config.json").write_text(json.dumps(cfg))
    m = convert(str(src), tmp_path / "p16", bits=16, dtype="float32", alignment=4096)
    assert m.model_type == "kimi_k2"
    tokens = _tokens(8)
    ref = families.transformers_logits(deepseek_src, tokens)
    got = _resident_logits(tmp_path / "p16", tokens)
    assert np.abs(got - ref).max() <= TOL_16BIT * np.abs(ref).max()
    # the family tests' other two checks, on the kimi_k2 pack: 8-bit KL against transformers'
    # DeepSeek-V3 forward of the same weights, and streamed equal to resident
    convert(str(src), tmp_path / "p8", bits=8, alignment=4096)
    rt = load(tmp_path / "p8")
    try:
        res = evaluate(rt, _text(5), reference=str(deepseek_src), reference_backend="transformers", window=128)
    finally:
        rt.close()
    assert res["tokens"] > 200 and res["kl_mean"] <= KL_8BIT, res
    x = mx.array(_tokens(23, (1, 30)))
    want = _resident_logits(tmp_path / "p8", np.array(x))
    rt = load(tmp_path / "p8", cache="none", kernels="mlx", max_slots=3)
    try:
        assert np.array_equal(np.array(rt.model(x)), want)
    finally:
        rt.close()


def test_deepseek_fp8_release_layout(deepseek_src, tmp_path):
    """FP8 e4m3 weights with 128x128 block scales (partial blocks here: H=64) are dequantized on
    read, kv_b_proj included; the reference is transformers on the dequantized weights."""
    pytest.importorskip("checkpoints")
    fp8 = families.save_fp8(deepseek_src, tmp_path / "fp8")
    assert any(n.endswith("kv_b_proj.weight_scale_inv") for n in families.stored_names(fp8))
    convert(str(fp8), tmp_path / "p16", bits=16, dtype="float32", alignment=4096)
    tokens = _tokens(9)
    ref = families.transformers_logits(families.save_dequantized(fp8, tmp_path / "deq"), tokens)
    got = _resident_logits(tmp_path / "p16", tokens)
    assert np.abs(got - ref).max() <= TOL_16BIT * np.abs(ref).max()
