"""mlx-lm's own quantized conversions as sources (mlx-community style folders, made here with
``mlx_lm.convert``): experts and residents at the source's bits and group size are repacked without
requantizing (byte-identical to the source), other settings are requantized from the dequantized
source (byte-identical to MLX's own quantizer on it). The reference model is mlx-lm loading the
quantized folder itself."""

import json

import mlx.core as mx
import numpy as np
import pytest

from moestream.convert import convert, family_for, plan_conversion
from moestream.layouts import open_pack
from moestream.runtime import evaluate, load

families = pytest.importorskip("families", reason="needs the test extras: torch, transformers")
PROJS = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    """A tiny qwen3_moe converted by mlx-lm to 4 bits, group 64 (router at 8 bits), bf16 scales."""
    from mlx_lm.convert import convert as mlx_convert

    d = tmp_path_factory.mktemp("mlxsrc")
    src = families.save_family(d, "qwen3_moe", seed=4)
    # mlx-lm reads num_experts and rope_theta, which transformers 5 writes under other names.
    config = family_for(json.loads((src / "config.json").read_text())).pack_config()
    (src / "config.json").write_text(json.dumps(config))
    mlx_convert(str(src), str(d / "q4"), quantize=True, q_bits=4, q_group_size=64, dtype="bfloat16")
    return d / "q4"


def _source(folder) -> dict[str, mx.array]:
    return mx.load(str(folder / "model.safetensors"))


def _raw(a: mx.array) -> np.ndarray:
    return np.array(a.view(mx.uint16)) if a.dtype == mx.bfloat16 else np.array(a)


def test_same_bits_repacks_byte_identical(q4, tmp_path):
    cfg = json.loads((q4 / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["model.layers.0.mlp.gate"]["bits"] == 8
    plan, src, _ = plan_conversion(str(q4), bits=4, group_size=64)
    src.close()
    assert all(x.repack for x in plan.experts)
    assert {t.target for f in plan.resident_files for t in f.tensors if t.repack} >= {
        "model.layers.0.mlp.gate.weight",
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.q_proj.weight",
    }
    m = convert(str(q4), tmp_path / "p4", bits=4, group_size=64)
    w = _source(q4)
    with open_pack(tmp_path / "p4") as pack:
        for x in m.experts:
            for e in range(x.num_experts):
                got = pack.expert_arrays(x.layer, e)
                for p in PROJS:
                    for part in ("weight", "scales", "biases"):
                        want = _raw(w[f"model.layers.{x.layer}.mlp.switch_mlp.{p}.{part}"][e])
                        assert np.array_equal(got[f"{p}.{part}"], want), (x.layer, e, p, part)
        router = mx.load(str(pack.root / m.resident_tensors["model.layers.1.mlp.gate.weight"].file))
        for part in ("weight", "scales", "biases"):
            assert np.array_equal(
                _raw(router[f"model.layers.1.mlp.gate.{part}"]), _raw(w[f"model.layers.1.mlp.gate.{part}"])
            )


def test_repacked_pack_runs_as_mlx_lm_runs_the_source(q4, tmp_path, float_kernels):
    convert(str(q4), tmp_path / "p4", bits=4, group_size=64)
    rt = load(tmp_path / "p4")  # streamed, CPU kernels
    try:
        res = evaluate(rt, "the quick brown fox jumps over the lazy dog " * 12, reference=q4, window=128)
    finally:
        rt.close()
    print(f"\nrepacked 4-bit vs mlx-lm on the source: mean KL {res['kl_mean']:.2e}, top-1 {res['top1_agreement']:.1%}")
    assert res["kl_mean"] < 1e-5 and res["top1_agreement"] > 0.99


@pytest.mark.parametrize("bits,group", [(2, 64), (4, 32)])
def test_other_settings_requantize_from_the_dequantized_source(q4, tmp_path, bits, group):
    m = convert(str(q4), tmp_path / "p", bits=bits, group_size=group, method="rtn", down_bits=bits)  # uniform
    w = _source(q4)
    with open_pack(tmp_path / "p") as pack:
        for x in m.experts:
            for e in (0, x.num_experts - 1):
                got = pack.expert_arrays(x.layer, e)
                for p in PROJS:
                    pre = f"model.layers.{x.layer}.mlp.switch_mlp.{p}"
                    deq = mx.dequantize(
                        w[f"{pre}.weight"][e],
                        w[f"{pre}.scales"][e].astype(mx.float32),
                        w[f"{pre}.biases"][e].astype(mx.float32),
                        group_size=64,
                        bits=4,
                    )
                    wq, s, b = mx.quantize(deq, group_size=group, bits=bits)
                    assert np.array_equal(got[f"{p}.weight"], np.array(wq)), (x.layer, e, p)
                    assert np.array_equal(got[f"{p}.scales"], _raw(s.astype(mx.bfloat16))), (x.layer, e, p)


def test_requantize_to_8_bits_stays_close(q4, tmp_path):
    """Requantizing adds only the new setting's own rounding: 8 bits over the 4-bit model, mean KL
    within the 8-bit bound the families are held to."""
    convert(str(q4), tmp_path / "p8", bits=8)
    rt = load(tmp_path / "p8")
    try:
        res = evaluate(rt, "pack my box with five dozen liquor jugs " * 12, reference=q4, window=128)
    finally:
        rt.close()
    print(f"\n8-bit requantized vs 4-bit source: mean KL {res['kl_mean']:.2e}")
    assert res["kl_mean"] <= 0.005
