"""gpt-oss beyond the common family tests (tests/test_families.py covers the float layout at 16 and
8 bits): the hub's MXFP4 experts pass through bit for bit, and the pack runs like transformers on
the weights those bits stand for. References: transformers' ``convert_moe_packed_tensors`` and
float32 forward, MLX's own mxfp4 quantizer and dequantizer, mlx-lm's ``swiglu_oai``."""

import json

import mlx.core as mx
import numpy as np
import pytest

from moestream.convert import ConvertError, convert, family_for
from moestream.layouts import Manifest, open_pack
from moestream.runtime import evaluate, load
from moestream.runtime.model.build import load_resident_model

families = pytest.importorskip("families", reason="needs the test extras: torch, transformers")
pytest.importorskip("checkpoints")
torch = pytest.importorskip("torch")

TOL_16BIT = 2e-4  # as tests/test_families.py
KL_MXFP4 = 1e-4  # no requantization: only float32 summation order differs


def _tokens(seed: int, shape=(2, 20)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, families.VOCAB, shape)


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory):
    """The tiny gpt-oss in the hub's MXFP4 layout, its dequantized float32 twin (the reference), and
    a pack of it: experts passed through, residents float32."""
    d = tmp_path_factory.mktemp("gptoss")
    src = families.save_mxfp4(families.save_family(d, "gpt_oss", seed=3), d / "mxfp4")
    deq = families.save_mxfp4_dequantized(src, d / "deq")
    convert(str(src), d / "p", bits=16, dtype="float32", alignment=4096)
    return src, deq, d / "p"


def test_hub_nibbles_and_scales_are_mlx_mxfp4():
    """MLX's mxfp4 bytes, read as hub blocks (16 bytes per 32 values) and E8M0 scales, dequantize
    through transformers' converter to exactly MLX's own dequantization."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    w = mx.random.normal((1, 6, 64), key=mx.random.key(0)) * 3
    q, s = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")
    blocks = torch.from_numpy(np.array(q).view(np.uint8).reshape(1, 6, 2, 16))
    hf = convert_moe_packed_tensors(blocks, torch.from_numpy(np.array(s)), dtype=torch.float32)  # [1, 64, 6]
    ref = mx.dequantize(q, s, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32)
    assert np.array_equal(hf.transpose(1, 2).numpy(), np.array(ref))


def test_mxfp4_experts_pass_through_bit_exact(mxfp4):
    from checkpoints import load_tensors
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    src, deq, pack = mxfp4
    m = Manifest.load(pack)
    assert m.quantization["experts"] == {
        "bits": 4,
        "group_size": 32,
        "mode": "mxfp4",
        "method": "passthrough",
        "scale_dtype": "uint8",
        "linear_bias": True,
    }
    t = load_tensors(src)
    with open_pack(pack) as p:
        for x in m.experts:
            pre = f"model.layers.{x.layer}.mlp.experts"
            gu_b, gu_s = t[f"{pre}.gate_up_proj_blocks"].numpy(), t[f"{pre}.gate_up_proj_scales"].numpy()
            d_b, d_s = t[f"{pre}.down_proj_blocks"].numpy(), t[f"{pre}.down_proj_scales"].numpy()
            gu_bias = t[f"{pre}.gate_up_proj_bias"].float().numpy()
            hf_gu = convert_moe_packed_tensors(torch.from_numpy(gu_b), torch.from_numpy(gu_s), dtype=torch.float32)
            for e in range(x.num_experts):
                a = p.expert_arrays(x.layer, e)
                want = {
                    "gate_proj": (gu_b[e, 0::2], gu_s[e, 0::2]),
                    "up_proj": (gu_b[e, 1::2], gu_s[e, 1::2]),
                    "down_proj": (d_b[e], d_s[e]),
                }
                for proj, (b, sc) in want.items():
                    assert a[f"{proj}.weight"].tobytes() == b.tobytes(), (x.layer, e, proj)
                    assert np.array_equal(a[f"{proj}.scales"], sc)
                assert np.array_equal(a["gate_proj.bias"], gu_bias[e, 0::2])
                assert np.array_equal(a["up_proj.bias"], gu_bias[e, 1::2])
                assert np.array_equal(a["down_proj.bias"], t[f"{pre}.down_proj_bias"].float().numpy()[e])
                # MLX reads the pack's codes as transformers reads the hub's blocks
                got = mx.dequantize(
                    mx.array(a["gate_proj.weight"]),
                    mx.array(a["gate_proj.scales"]),
                    group_size=32,
                    bits=4,
                    mode="mxfp4",
                    dtype=mx.float32,
                )
                assert np.array_equal(np.array(got), hf_gu[e, :, 0::2].T.numpy())


def test_mxfp4_pack_matches_transformers(mxfp4):
    src, deq, pack = mxfp4
    tokens = _tokens(12)
    ref = families.transformers_logits(deq, tokens)
    model, p = load_resident_model(pack, dtype="float32")
    p.close()
    got = np.array(model(mx.array(tokens)))
    diff = np.abs(got - ref).max()
    print(f"\ngpt_oss mxfp4: max |logit diff| {diff:.2e} (max |logit| {np.abs(ref).max():.2f})")
    assert ref.std() > 0.3 and diff <= TOL_16BIT * np.abs(ref).max()
    text = " ".join(["the quick brown fox jumps over a lazy dog"] * 30)
    rt = load(pack)  # streamed, numba mxfp4 kernels
    try:
        res = evaluate(rt, text, reference=deq, reference_backend="transformers", window=128)
    finally:
        rt.close()
    print(f"gpt_oss mxfp4: streamed mean KL {res['kl_mean']:.2e} over {res['tokens']} tokens")
    assert res["tokens"] > 200 and res["kl_mean"] <= KL_MXFP4


@pytest.mark.parametrize("cpu_kernels", [False, True])
def test_mxfp4_streamed_equals_resident(mxfp4, cpu_kernels):
    pack = mxfp4[2]
    x = mx.array(_tokens(23, (1, 30)))
    model, p = load_resident_model(pack, dtype="float32")
    p.close()
    want = np.array(model(x))
    rt = load(pack, cache="none", kernels="numba" if cpu_kernels else "mlx", max_slots=3)
    try:
        got = np.array(rt.model(x))
    finally:
        rt.close()
    if cpu_kernels:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    else:
        assert np.array_equal(got, want)


def test_mxfp4_experts_per_token_override_reads_k(mxfp4):
    from mlx_lm.models.cache import make_prompt_cache

    pack = mxfp4[2]
    rt = load(pack, cache="none", experts_per_token=1, trace=True)
    try:
        cache = make_prompt_cache(rt.model)
        mx.eval(rt.model(mx.array(_tokens(3, (1, 5))), cache=cache))
        rt.store.stats.reset()
        mx.eval(rt.model(mx.array([[7]]), cache=cache))
        assert rt.store.stats.reads == len(rt.pack.manifest.experts) == 3
    finally:
        rt.close()


def test_metal_kernels_leave_gpt_oss_to_mlx(mxfp4):
    """The fused Metal kernels compute affine SwiGLU without biases: gpt-oss layers run MLX's ops."""
    from moestream.runtime.model.streamed import StreamedSwitchGLU
    from moestream.runtime.store.expert_store import ExpertStore

    with open_pack(mxfp4[2]) as p:
        store = ExpertStore(p)
        try:
            assert not StreamedSwitchGLU(store, 0, metal_kernels=True)._metal
        finally:
            store.close()


@pytest.mark.parametrize("tokens", [1, 5, 40])  # 40: the dequantize + BLAS path
def test_cpu_mxfp4_kernel_matches_mlx(tokens):
    from moestream.runtime.cpu.kernels import qmm_mxfp4

    w = mx.random.normal((96, 128), key=mx.random.key(1))
    q, s = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")
    x = np.random.default_rng(0).standard_normal((tokens, 128)).astype(np.float32)
    ref = x @ np.array(mx.dequantize(q, s, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32)).T
    np.testing.assert_allclose(qmm_mxfp4(x, np.array(q), np.array(s)), ref, rtol=1e-5, atol=1e-4)


def test_cpu_swiglu_oai_matches_mlx_lm():
    from mlx_lm.models.activations import swiglu_oai

    from moestream.runtime.cpu.kernels import swiglu_oai as cpu

    rng = np.random.default_rng(0)
    gate, up = (rng.standard_normal((3, 200)).astype(np.float32) * 6 for _ in range(2))
    ref = np.array(swiglu_oai(mx.array(gate), mx.array(up)))
    np.testing.assert_allclose(cpu(gate.copy(), up, 1.702, 7.0), ref, rtol=1e-5, atol=1e-5)


def test_other_swiglu_limit_refused():
    cfg = families.family_config("gpt_oss", swiglu_limit=10.0).to_dict()
    with pytest.raises(ConvertError, match="swiglu_limit"):
        family_for(json.loads(json.dumps(cfg)))
