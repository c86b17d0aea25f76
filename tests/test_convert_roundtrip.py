"""Converted packs against independent references: MLX's own quantizer on the source weights
(byte for byte, every expert of every layer at its manifest offset), and transformers' float32
forward pass on the same checkpoint (logits through mlx-lm's model loaded from the pack)."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from moestream.convert import convert
from moestream.layouts import open_pack

checkpoints = pytest.importorskip("checkpoints", reason="needs the test extras: torch, transformers")
torch = pytest.importorskip("torch")

LAYOUTS = ["tiny_per_expert_fp32", "tiny_per_expert_bf16", "tiny_fused_bf16", "tiny_fp8", "tiny_fused_i96"]


def _expert_refs(ref: dict, layer: int, e: int) -> dict[str, np.ndarray]:
    pre = f"model.language_model.layers.{layer}.mlp.experts.{e}"
    return {p: ref[f"{pre}.{p}.weight"].numpy() for p in ("gate_proj", "up_proj", "down_proj")}


def _mx_view(a: np.ndarray, dtype: str) -> mx.array:
    return mx.array(a).view(mx.bfloat16) if dtype == "bfloat16" else mx.array(a)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits", [4, 3])
def test_expert_blocks_match_mx_quantize(layout, bits, request, tmp_path):
    src = request.getfixturevalue(layout)
    m = convert(str(src), tmp_path / "pack", bits=bits, method="rtn", down_bits=bits)  # uniform: MLX's bytes
    ref = checkpoints.reference_state_dict(src)
    fp8 = layout == "tiny_fp8"
    with open_pack(tmp_path / "pack") as pack:
        assert pack.manifest.experts, "no expert layers written"
        for x in m.experts:
            assert x.offset % m.alignment == 0 and x.stride % m.alignment == 0
            for e in range(x.num_experts):
                got = pack.expert_arrays(x.layer, e)
                for proj, w in _expert_refs(ref, x.layer, e).items():
                    g = x.component(f"{proj}.weight").group_size
                    scale_dtype = x.component(f"{proj}.scales").dtype
                    # The source's own precision: bf16 weights are exact in bf16, fp8 ones in float32.
                    wsrc = mx.array(w) if (fp8 or scale_dtype == "float32") else mx.array(w).astype(mx.bfloat16)
                    wq, s, b = mx.quantize(wsrc, group_size=g, bits=bits)
                    assert np.array_equal(np.array(wq), got[f"{proj}.weight"]), (layout, x.layer, e, proj)
                    want_s = (
                        np.array(s.astype(mx.bfloat16).view(mx.uint16))
                        if scale_dtype == "bfloat16"
                        else np.array(s.astype(mx.float32))
                    )
                    assert np.array_equal(want_s, got[f"{proj}.scales"]), (layout, x.layer, e, proj)
                    # Dequantizing the pack's block reproduces mx.dequantize(mx.quantize(w)) exactly.
                    deq = mx.dequantize(
                        mx.array(got[f"{proj}.weight"]),
                        _mx_view(got[f"{proj}.scales"], scale_dtype),
                        _mx_view(got[f"{proj}.biases"], scale_dtype),
                        group_size=g,
                        bits=bits,
                    )
                    want = mx.dequantize(wq, s.astype(deq.dtype), b.astype(deq.dtype), group_size=g, bits=bits)
                    assert np.array_equal(np.array(deq.astype(mx.float32)), np.array(want.astype(mx.float32)))


def test_group_size_fallback_recorded(tiny_fused_i96, tmp_path):
    m = convert(str(tiny_fused_i96), tmp_path / "p", bits=4)
    x = m.experts[0]
    assert x.component("gate_proj.weight").group_size == 64
    assert x.component("down_proj.weight").group_size == 32  # intermediate 96 is not a multiple of 64


def test_bf16_passthrough_is_exact(tiny_fused_bf16, tmp_path):
    m = convert(str(tiny_fused_bf16), tmp_path / "p", bits=16)
    ref = checkpoints.reference_state_dict(tiny_fused_bf16)
    with open_pack(tmp_path / "p") as pack:
        for x in m.experts:
            for e in range(x.num_experts):
                got = pack.expert_arrays(x.layer, e)
                for proj, w in _expert_refs(ref, x.layer, e).items():
                    want = np.array(mx.array(w).astype(mx.bfloat16).view(mx.uint16))
                    assert np.array_equal(got[f"{proj}.weight"], want)


def _transformers_logits(folder: Path, tokens: np.ndarray, tmp: Path) -> np.ndarray:
    import json

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = json.loads((folder / "config.json").read_text())
    if "quantization_config" in config:
        # transformers' fp8 path needs accelerate and a GPU kernel; feed it the dequantized weights instead.
        config.pop("quantization_config")
        (tmp / "deq").mkdir()
        (tmp / "deq" / "config.json").write_text(json.dumps(config))
        sd = {
            k: v.contiguous()
            for k, v in checkpoints.fp8_dequantized_state_dict(folder).items()
            if not k.startswith("mtp.")
        }
        save_file(sd, tmp / "deq" / "model.safetensors")
        folder = tmp / "deq"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


def _pack_logits(pack: Path, tokens: np.ndarray) -> np.ndarray:
    from moestream.runtime.model.build import load_resident_model

    model, p = load_resident_model(pack, dtype="float32")
    p.close()
    return np.array(model(mx.array(tokens)).astype(mx.float32))


def _kl(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    lr = ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ref.max(-1, keepdims=True)
    lg = got - np.log(np.exp(got - got.max(-1, keepdims=True)).sum(-1, keepdims=True)) - got.max(-1, keepdims=True)
    return (np.exp(lr) * (lr - lg)).sum(-1)


@pytest.mark.parametrize("layout", ["tiny_per_expert_fp32", "tiny_fused_bf16", "tiny_fp8"])
def test_pack_logits_match_transformers(layout, request, tmp_path):
    """16-bit packs reproduce transformers' float32 logits; 8-bit packs stay close (mean KL)."""
    src = request.getfixturevalue(layout)
    tokens = np.random.default_rng(7).integers(0, 512, (2, 24))
    ref = _transformers_logits(src, tokens, tmp_path)
    convert(str(src), tmp_path / "p16", bits=16, dtype="float32")
    got16 = _pack_logits(tmp_path / "p16", tokens)
    np.testing.assert_allclose(got16, ref, atol=2e-4 * np.abs(ref).max(), rtol=0)
    convert(str(src), tmp_path / "p8", bits=8)
    kl8 = _kl(ref, _pack_logits(tmp_path / "p8", tokens))
    assert kl8.mean() < 0.005, kl8.mean()
