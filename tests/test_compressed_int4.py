"""compressed-tensors ``pack-quantized`` INT4 sources: Kimi K2.5 (``kimi_k25``, its multimodal wrapper), Kimi K2
Thinking (``kimi_k2``), and any family's INT4 export, symmetric or not, at group 32, 64 and 128.

The checkpoints are tiny random models written by compressed-tensors' own compressor (tests/compressed_int4.py);
the references are its decompression (with float32 scales: exact) and transformers' float32 DeepSeek-V3 (or the
family's) forward of the decompressed model. The experts pass through bit for bit, so a pack with 16-bit residents
runs like that reference up to float summation order."""

import json
import logging
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from moestream.convert import ConvertError, convert, plan_conversion
from moestream.convert.defaults import default_for
from moestream.layouts import Manifest, open_pack
from moestream.runtime import evaluate, load
from moestream.runtime.model.build import load_resident_model

families = pytest.importorskip("families", reason="needs the test extras: torch, transformers")
pytest.importorskip("compressed_tensors", reason="needs the test extras: compressed-tensors")
torch = pytest.importorskip("torch")
ci = pytest.importorskip("compressed_int4")

TOL_16BIT = 2e-4  # as tests/test_families.py: the same values, another summation order
KL_MAX = 0.005


def _tokens(seed: int, shape=(2, 20)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, families.VOCAB, shape)


def _text(seed: int, words: int = 120) -> str:
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    return " ".join("".join(rng.choice(letters, rng.integers(2, 8))) for _ in range(words))


def _resident_logits(pack, tokens):
    model, p = load_resident_model(pack, dtype="float32")
    p.close()
    return np.array(model(mx.array(tokens)).astype(mx.float32))


@pytest.fixture(scope="module")
def k25(tmp_path_factory):
    """A tiny Kimi K2.5-style release (DeepSeek-V3 text model, INT4 g32 symmetric routed experts, bf16 rest, a
    vision tower), its decompressed float32 twin, and packs: 16-bit residents in float32, and the defaults."""
    d = tmp_path_factory.mktemp("k25")
    src = ci.save_int4(families.save_family(d, "deepseek_v3", seed=1), d / "k25")
    ref = ci.save_decompressed(src, d / "ref")
    convert(str(src), d / "p16", bits=16, dtype="float32", alignment=4096)
    convert(str(src), d / "p4", alignment=4096)
    return src, ref, d


def _packed_experts(src: Path, pack: Path, prefix: str) -> int:
    """Check every expert block of ``pack`` against the INT4 source: the codes are the source's words, the scales
    its scales, and MLX's dequantization is compressed-tensors' decompression exactly. Returns blocks checked."""
    from checkpoints import load_tensors

    t, deq = load_tensors(src), ci.decompressed_tensors(src)
    m, n = Manifest.load(pack), 0
    with open_pack(pack) as p:
        for x in m.experts:
            for e in range(x.num_experts):
                a = p.expert_arrays(x.layer, e)
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    base = f"{prefix}layers.{x.layer}.mlp.experts.{e}.{proj}."
                    w, s, b = (mx.array(a[f"{proj}.{k}"]) for k in ("weight", "scales", "biases"))
                    if a[f"{proj}.scales"].dtype == np.uint16:  # bf16 bits, widened (exactly): MLX would compute
                        # c * s + b in bf16, a rounding of the exact values the arrays stand for
                        s, b = s.view(mx.bfloat16).astype(mx.float32), b.view(mx.bfloat16).astype(mx.float32)
                        assert (
                            a[f"{proj}.scales"].tobytes()
                            == t[base + "weight_scale"].view(torch.uint16).numpy().tobytes()
                        )
                    assert a[f"{proj}.weight"].tobytes() == t[base + "weight_packed"].numpy().tobytes()
                    c = x.component(f"{proj}.weight")
                    got = mx.dequantize(w, s, b, group_size=c.group_size, bits=4, dtype=mx.float32)
                    assert np.array_equal(np.array(got), deq[base + "weight"].numpy()), (x.layer, e, proj)
                    n += 1
    return n


def test_experts_pass_through_bit_exact(k25):
    src, ref, d = k25
    for pack, dtype in ((d / "p4", "bfloat16"), (d / "p16", "float32")):
        q = Manifest.load(pack).quantization["experts"]
        assert (q["bits"], q["group_size"], q["mode"], q["method"], q["scale_dtype"]) == (
            4,
            32,
            "affine",
            "passthrough",
            dtype,
        )
        assert _packed_experts(src, pack, "language_model.model.") == 2 * 8 * 3


def test_16bit_int4_pack_matches_transformers(k25):
    """Residents at 16 bits (float32), experts INT4 as released: transformers' float32 DeepSeek-V3 on the
    decompressed weights gives the same logits, and the streamed pack its KL bound."""
    src, ref, d = k25
    tokens = _tokens(11)
    want = families.transformers_logits(ref, tokens)
    got = _resident_logits(d / "p16", tokens)
    diff = np.abs(got - want).max()
    print(f"\nkimi_k25 16-bit/INT4: max |logit diff| {diff:.2e} (max |logit| {np.abs(want).max():.2f})")
    assert want.std() > 0.3 and diff <= TOL_16BIT * np.abs(want).max()
    rt = load(d / "p16")  # streamed, numba kernels
    try:
        res = evaluate(rt, _text(5), reference=ref, reference_backend="transformers", window=128)
    finally:
        rt.close()
    print(f"kimi_k25 16-bit/INT4: streamed mean KL {res['kl_mean']:.2e} over {res['tokens']} tokens")
    assert res["tokens"] > 200 and res["kl_mean"] <= KL_MAX


@pytest.mark.parametrize("cpu_kernels", [False, True])
def test_streamed_equals_resident(k25, cpu_kernels, request):
    d = k25[2]
    if cpu_kernels:  # float products: the int8 activations have their own bounds (tests/test_cpu_int8.py)
        request.getfixturevalue("float_kernels")
    for pack in (d / "p16", d / "p4"):
        x = mx.array(_tokens(23, (1, 30)))
        want = _resident_logits(pack, np.array(x))
        rt = load(pack, cache="none", kernels="numba" if cpu_kernels else "mlx", max_slots=3)
        try:
            got = np.array(rt.model(x))
        finally:
            rt.close()
        if cpu_kernels:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
        else:
            assert np.array_equal(got, want)


def test_vision_tower_dropped_and_config_cleaned(k25, caplog, tmp_path):
    src, ref, d = k25
    with caplog.at_level(logging.INFO, logger="moestream.convert"):
        plan, s, _ = plan_conversion(str(src))
        s.close()
    assert any("vision_tower" in r.message and "mm_projector" in r.message for r in caplog.records)
    assert all(n.startswith(("vision_tower.", "mm_projector.")) for n in plan.dropped) and plan.dropped
    cfg = json.loads((d / "p4" / "config.json").read_text())
    assert cfg["model_type"] == "kimi_k25" and "quantization_config" not in cfg
    assert "quantization_config" not in cfg["text_config"]
    assert "quantization_config" not in Manifest.load(d / "p4").config
    s = plan.summary()
    assert (s["bits"], s["group_size"], s["method"], s["down_bits"]) == (4, 32, "passthrough", 4)
    assert s["resident_bits"] == default_for(4).resident_bits  # --bits sets the residents, as convert's defaults


@pytest.mark.parametrize("bits", [2, 3])
def test_low_bits_requantize_the_dequantized_values(k25, bits, tmp_path):
    """--bits 2|3: the experts are quantized from the INT4 values (exactly what quantizing compressed-tensors'
    decompression gives); the residents too, at the same bits."""
    from moestream.quant import quantize_with_error

    src, ref, d = k25
    m = convert(str(src), tmp_path / "p", bits=bits, down_bits=bits, alignment=4096)  # uniform, as the source
    q = m.quantization["experts"]
    assert (q["bits"], q["group_size"], q["mode"], q["method"]) == (bits, 64, "affine", "clip")
    deq = ci.decompressed_tensors(src)
    with open_pack(tmp_path / "p") as p:
        a = p.expert_arrays(1, 5)
    w = np.ascontiguousarray(deq["language_model.model.layers.1.mlp.experts.5.down_proj.weight"].numpy())
    wq, sc, bi, _ = quantize_with_error(w, bits, 64, "bfloat16", "clip")
    assert np.array_equal(a["down_proj.weight"], wq) and np.array_equal(a["down_proj.scales"], sc)
    assert np.array_equal(a["down_proj.biases"], bi)


def test_kimi_k2_thinking_layout(tmp_path):
    """Kimi K2 Thinking: DeepSeek-V3's names under model_type kimi_k2, INT4 routed experts: passed through, and the
    16-bit-resident pack gives transformers' DeepSeek-V3 logits of the decompressed weights."""
    src = ci.save_int4(families.save_family(tmp_path, "deepseek_v3", seed=2), tmp_path / "k2", layout="kimi_k2")
    ref = ci.save_decompressed(src, tmp_path / "ref")
    m = convert(str(src), tmp_path / "p16", bits=16, dtype="float32", alignment=4096)
    assert m.model_type == "kimi_k2" and m.quantization["experts"]["method"] == "passthrough"
    assert _packed_experts(src, tmp_path / "p16", "model.") == 2 * 8 * 3
    tokens = _tokens(4)
    want = families.transformers_logits(ref, tokens)
    got = _resident_logits(tmp_path / "p16", tokens)
    assert np.abs(got - want).max() <= TOL_16BIT * np.abs(want).max()


@pytest.mark.parametrize(
    "group,symmetric,overrides",
    [
        (64, False, {}),
        (128, True, {"hidden_size": 128, "head_dim": 32, "moe_intermediate_size": 128, "intermediate_size": 128}),
    ],
)
def test_other_family_every_linear_int4(group, symmetric, overrides, tmp_path):
    """qwen3_moe exported with every linear but lm_head and the router in INT4 (llm-compressor's W4A16 style):
    experts and attention pass through at --bits 4 and the source's group size (asymmetric: scales and biases in
    float32, where -(z + 8) * s is exact), so the pack gives transformers' logits of the decompressed model."""
    fl = families.save_family(tmp_path, "qwen3_moe", seed=3, **overrides)
    src = ci.save_int4(fl, tmp_path / "int4", layout="plain", group=group, symmetric=symmetric, targets="linears")
    assert any(n.endswith("self_attn.q_proj.weight_packed") for n in families.stored_names(src))
    ref = ci.save_decompressed(src, tmp_path / "ref")
    # the tensors the export left in bf16 (embedding, lm_head, router) stay 16-bit: only the INT4 ones are 4-bit
    kinds = {"embedding": 16, "lm_head": 16, "router": 16}
    m = convert(str(src), tmp_path / "p", bits=4, group_size=group, alignment=4096, resident_kinds=kinds)
    q = m.quantization["experts"]
    assert (q["group_size"], q["method"], q["scale_dtype"]) == (
        group,
        "passthrough",
        "bfloat16" if symmetric else "float32",
    )
    assert _packed_experts(src, tmp_path / "p", "model.") == 2 * 8 * 3
    attn = m.resident_tensors["model.layers.0.self_attn.q_proj.weight"]
    assert (attn.bits, attn.group_size) == (4, group)
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    q_rows = [r for r in report["rows"] if r["tensor"] == "model.layers.0.self_attn.q_proj.weight"]
    assert q_rows and q_rows[0]["max_abs"] == 0.0  # repacked: the source's values exactly
    tokens = _tokens(6)
    want = families.transformers_logits(ref, tokens)
    got = _resident_logits(tmp_path / "p", tokens)
    diff = np.abs(got - want).max()
    print(f"\nqwen3_moe INT4 g{group} {'sym' if symmetric else 'asym'}: max |logit diff| {diff:.2e}")
    assert want.std() > 0.3 and diff <= TOL_16BIT * np.abs(want).max()


def _edit_config(src: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "edited"
    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _groups(cfg: dict) -> dict:
    return cfg["quantization_config"]["config_groups"]["group_0"]


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda c: c["quantization_config"].update(quant_method="gptq"), "quant_method 'gptq' is not supported"),
        (lambda c: c["quantization_config"].update(format="float-quantized"), "format 'float-quantized'"),
        (lambda c: _groups(c)["weights"].update(num_bits=8), "num_bits 8 is not supported"),
        (lambda c: _groups(c)["weights"].update(strategy="channel"), "strategy 'channel' is not supported"),
        (lambda c: _groups(c)["weights"].update(group_size=16), "group_size 16 is not supported"),
        (lambda c: _groups(c)["weights"].update(actorder="group"), "actorder 'group'"),
        (lambda c: _groups(c).update(input_activations={"num_bits": 8, "type": "float"}), "input_activations"),
        (lambda c: c["quantization_config"].update(transform_config={"x": 1}), "transform_config"),
        (lambda c: c["quantization_config"].update(quantization_status="frozen"), "quantization_status 'frozen'"),
        (lambda c: [d.pop("quantization_config") for d in (c, c["text_config"])], "has no compressed-tensors"),
        (lambda c: _groups(c)["weights"].update(group_size=64), "group size 32, config_groups give [64]"),
    ],
)
def test_unsupported_quantization_is_one_line(k25, edit, words, tmp_path):
    src = _edit_config(k25[0], tmp_path, edit)
    with pytest.raises(ConvertError) as e:
        convert(str(src), tmp_path / "out", alignment=4096)
    msg = str(e.value)
    assert words in msg and "\n" not in msg and str(src) in msg, msg
    assert not (tmp_path / "out").exists()


def test_fp8_block_size_other_than_128_refused(tmp_path):
    src = families.save_family(tmp_path, "qwen3_moe")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [32, 32]}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match=r"config.json: quantization_config: fp8 with weight_block_size \[32, 32\]"):
        convert(str(src), tmp_path / "out")


# Kimi K2.5's real config (convert/known_configs/kimi-k2.5.json): 61 layers (layer 0 dense), 384 experts of
# H 7168 x I 2048, top-8.
K25_EXPERT_BLOCK = 3 * 2048 * 7168 * 4 // 8 + 3 * 2048 * 7168 // 32 * 2 * 2  # 4-bit codes + bf16 scales and biases


def test_real_config_dry_run(tmp_path):
    """The plan of Kimi K2.5's release (its tensors' names, shapes and dtypes in a header-only checkpoint whose
    data is a sparse hole): INT4 g32 experts passed through, and the figures --dry-run prints."""
    from moestream.convert.synth import load_like

    config = load_like("kimi-k2.5")
    folder = ci.save_release_headers(config, tmp_path / "k25")
    plan, src, _ = plan_conversion(str(folder), bits=16)
    src.close()
    s = plan.summary()
    assert (s["model_type"], s["moe_layers"], s["num_experts"], s["top_k"]) == ("kimi_k25", 60, 384, 8)
    assert (s["bits"], s["group_size"], s["method"], s["float_dtype"]) == (4, 32, "passthrough", "bfloat16")
    assert s["expert_block_bytes"] == s["expert_stride"] == K25_EXPERT_BLOCK == 27_525_120
    assert s["bytes_per_token"] == 60 * 8 * K25_EXPERT_BLOCK
    assert s["expert_files_bytes"] == 60 * (16384 + 384 * K25_EXPERT_BLOCK)
    print(f"\nKimi K2.5 plan: {s}")


@pytest.mark.parametrize(
    "change,words",
    [
        (
            lambda t, n: t.pop(n + "weight_scale"),
            "has no language_model.model.layers.1.mlp.experts.3.up_proj.weight_scale",
        ),
        (lambda t, n: t.update({n + "weight_shape": torch.tensor([64, 32])}), "weight_shape says [64, 32]"),
        (lambda t, n: t.update({n + "weight_scale": t[n + "weight_scale"][:32]}), "does not fit"),
        (
            lambda t, n: t.update({n + "weight_scale": t[n + "weight_scale"][:, :1]}),
            "group size 64, config_groups give [32]",
        ),
    ],
)
def test_malformed_packed_tensor_is_one_line(k25, change, words, tmp_path):
    from checkpoints import load_tensors
    from safetensors.torch import save_file

    out = tmp_path / "bad"
    shutil.copytree(k25[0], out)
    t = load_tensors(out)
    change(t, "language_model.model.layers.1.mlp.experts.3.up_proj.")
    save_file({k: v.contiguous() for k, v in t.items()}, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConvertError) as e:
        convert(str(out), tmp_path / "p", alignment=4096)
    msg = str(e.value)
    assert words in msg and "\n" not in msg and "model.safetensors" in msg, msg
    assert not (tmp_path / "p" / "manifest.json").exists()
