"""The tiny checkpoint builders of tests/checkpoints.py produce what they claim."""

import json
import re

import pytest

torch = pytest.importorskip("torch")
checkpoints = pytest.importorskip("checkpoints")

LM = "model.language_model"
FUSED_RE = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")
PER_EXPERT_RE = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")


def text_config(folder):
    return json.loads((folder / "config.json").read_text())["text_config"]


def header(folder):
    """{name: (dtype string, shape)} over all shards, from the safetensors headers."""
    out = {}
    for path in checkpoints.shard_files(folder):
        with checkpoints.safe_open(str(path), "pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                out[key] = (s.get_dtype(), tuple(s.get_shape()))
    return out


def assert_index_consistent(folder, shards):
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert files == [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    stored = {}
    for name in files:
        with checkpoints.safe_open(str(folder / name), "pt") as f:
            stored.update(dict.fromkeys(f.keys(), name))
    assert index["weight_map"] == stored
    assert index["metadata"]["total_size"] > 0


def assert_text_layers(cfg, keys):
    """Every text layer has the tensors of its layer type, and no other."""
    assert "full_attention" in cfg["layer_types"] and "linear_attention" in cfg["layer_types"]
    for n, kind in enumerate(cfg["layer_types"]):
        p = f"{LM}.layers.{n}."
        has_lin = p + "linear_attn.in_proj_qkv.weight" in keys
        has_att = p + "self_attn.q_proj.weight" in keys
        assert (has_lin, has_att) == (kind == "linear_attention", kind == "full_attention")
        for k in (
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "mlp.gate.weight",
            "mlp.shared_expert.gate_proj.weight",
            "mlp.shared_expert_gate.weight",
        ):
            assert p + k in keys
    for k in ("lm_head.weight", f"{LM}.embed_tokens.weight", f"{LM}.norm.weight"):
        assert k in keys


# ----------------------------------------------------------------------------------------------


def test_tiny_config_fields_and_overrides():
    cfg = checkpoints.tiny_config()
    t, v = cfg["text_config"], cfg["vision_config"]
    assert cfg["model_type"] == "qwen3_5_moe" and t["model_type"] == "qwen3_5_moe_text"
    assert t["layer_types"] == ["linear_attention", "full_attention"] * 2
    assert v["out_hidden_size"] == t["hidden_size"]
    rope = t["rope_parameters"]
    assert sum(rope["mrope_section"]) == int(t["head_dim"] * rope["partial_rotary_factor"]) // 2
    for dim in ("hidden_size", "moe_intermediate_size", "shared_expert_intermediate_size", "head_dim"):
        assert t[dim] % 32 == 0

    cfg = checkpoints.tiny_config(
        hidden_size=64,
        num_hidden_layers=3,
        full_attention_interval=3,
        tie_word_embeddings=True,
        vision_config={"depth": 2},
    )
    assert cfg["tie_word_embeddings"] is True and "tie_word_embeddings" not in cfg["text_config"]
    assert cfg["text_config"]["layer_types"] == ["linear_attention"] * 2 + ["full_attention"]
    assert cfg["vision_config"] == {**cfg["vision_config"], "depth": 2, "out_hidden_size": 64}
    assert checkpoints.tiny_config() == checkpoints.tiny_config()  # fresh, unshared dicts


def test_transformers_layout_is_per_expert(tiny_per_expert_fp32):
    folder = tiny_per_expert_fp32
    cfg = text_config(folder)
    h, i, e = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"]
    heads = header(folder)
    assert [p.name for p in folder.glob("*.safetensors")] == ["model.safetensors"]
    assert not (folder / "model.safetensors.index.json").exists()
    assert {d for d, _ in heads.values()} == {"F32"}
    assert not any(FUSED_RE.search(k) for k in heads) and not any(k.startswith("mtp.") for k in heads)
    assert any(k.startswith("model.visual.") for k in heads)
    assert_text_layers(cfg, heads)
    for n in range(cfg["num_hidden_layers"]):
        for x in range(e):
            p = f"{LM}.layers.{n}.mlp.experts.{x}."
            assert heads[p + "gate_proj.weight"][1] == heads[p + "up_proj.weight"][1] == (i, h)
            assert heads[p + "down_proj.weight"][1] == (h, i)
    conv_dim = (
        2 * cfg["linear_key_head_dim"] * cfg["linear_num_key_heads"]
        + cfg["linear_value_head_dim"] * cfg["linear_num_value_heads"]
    )
    assert heads[f"{LM}.layers.0.linear_attn.conv1d.weight"][1] == (conv_dim, 1, cfg["linear_conv_kernel_dim"])
    assert heads[f"{LM}.layers.1.self_attn.q_proj.weight"][1] == (2 * cfg["num_attention_heads"] * cfg["head_dim"], h)


def test_transformers_sharded_bf16(tiny_per_expert_bf16):
    assert_index_consistent(tiny_per_expert_bf16, 3)
    heads = header(tiny_per_expert_bf16)
    assert {d for d, _ in heads.values()} == {"BF16"}
    assert any(PER_EXPERT_RE.search(k) for k in heads)


def test_norms_are_perturbed(tiny_per_expert_fp32):
    ref = checkpoints.reference_state_dict(tiny_per_expert_fp32)
    zero_centred = ref[f"{LM}.layers.0.input_layernorm.weight"]
    gated = ref[f"{LM}.layers.0.linear_attn.norm.weight"]
    assert 0 < zero_centred.abs().mean() < 0.3
    assert (gated - 1).abs().max() > 0 and (gated - 1).abs().mean() < 0.3


def test_hub_fused_layout(tiny_fused_bf16):
    folder = tiny_fused_bf16
    cfg = text_config(folder)
    h, i, e = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"]
    assert_index_consistent(folder, 2)
    heads = header(folder)
    assert {d for d, _ in heads.values()} == {"BF16"}
    assert not any(PER_EXPERT_RE.search(k) for k in heads)
    assert_text_layers(cfg, heads)
    for n in range(cfg["num_hidden_layers"]):
        assert heads[f"{LM}.layers.{n}.mlp.experts.gate_up_proj"][1] == (e, 2 * i, h)
        assert heads[f"{LM}.layers.{n}.mlp.experts.down_proj"][1] == (e, h, i)
    assert any(k.startswith("model.visual.blocks.0.") for k in heads)
    assert heads["mtp.fc.weight"][1] == (h, 2 * h)
    assert heads["mtp.layers.0.mlp.experts.gate_up_proj"][1] == (e, 2 * i, h)
    assert "mtp.norm.weight" in heads and "mtp.pre_fc_norm_hidden.weight" in heads
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    sizes = {"BF16": 2}
    assert index["metadata"]["total_size"] == sum(sizes[d] * torch.Size(s).numel() for d, s in heads.values())


def test_i96_variant(tiny_fused_i96):
    cfg = text_config(tiny_fused_i96)
    assert cfg["moe_intermediate_size"] == 96 and 96 % 32 == 0 and 96 % 64
    assert header(tiny_fused_i96)[f"{LM}.layers.0.mlp.experts.down_proj"][1] == (8, cfg["hidden_size"], 96)


def test_fused_split_equals_transformers_per_expert(tmp_path, tiny_fused_bf16, tiny_per_expert_bf16):
    """transformers' own per-expert split of the same seeded model == our split of the fused hub layout."""
    fused = checkpoints.reference_state_dict(tiny_fused_bf16)
    per_expert = checkpoints.reference_state_dict(tiny_per_expert_bf16)
    assert set(fused) - set(per_expert) == {k for k in fused if k.startswith("mtp.")}
    assert set(per_expert) <= set(fused)
    for key, value in per_expert.items():
        assert torch.equal(fused[key], value), key
    raw = checkpoints.load_tensors(tiny_fused_bf16)[f"{LM}.layers.0.mlp.experts.gate_up_proj"]
    i = raw.shape[1] // 2
    assert torch.equal(per_expert[f"{LM}.layers.0.mlp.experts.5.up_proj.weight"], raw[5, i:].float())


def test_seeded(tmp_path):
    a = checkpoints.load_tensors(checkpoints.save_hub_fused(tmp_path, seed=3))
    b = checkpoints.load_tensors(checkpoints.save_hub_fused(tmp_path, seed=3))
    c = checkpoints.load_tensors(checkpoints.save_hub_fused(tmp_path, seed=4))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["mtp.fc.weight"], c["mtp.fc.weight"])
    assert not torch.equal(a[f"{LM}.layers.0.mlp.experts.gate_up_proj"], c[f"{LM}.layers.0.mlp.experts.gate_up_proj"])


def test_transformers_loads_both_layouts_to_the_same_model(tmp_path, tiny_per_expert_fp32):
    from transformers import AutoModelForCausalLM, Qwen3_5MoeForConditionalGeneration

    fused = checkpoints.save_hub_fused(tmp_path, dtype="float32")
    ids = torch.tensor([[1, 17, 300, 42, 5, 99]])
    models = []
    for folder in (tiny_per_expert_fp32, fused):
        model, info = Qwen3_5MoeForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"], info
        models.append(model.eval())
    a, b = (m.state_dict() for m in models)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    models.append(AutoModelForCausalLM.from_pretrained(tiny_per_expert_fp32).eval())
    with torch.no_grad():
        logits = [m(input_ids=ids).logits for m in models]
    assert logits[0].abs().max() > 0.1
    for other in logits[1:]:  # not bit-equal: kernels differ with the tensors' memory alignment
        torch.testing.assert_close(other, logits[0], rtol=1e-5, atol=1e-5)


def test_hub_fused_matches_trained_fixture_names(tmp_path, trained_tiny):
    real = json.loads((trained_tiny / "config.json").read_text())
    text = {
        k: v
        for k, v in real["text_config"].items()
        if k in checkpoints._TEXT_DEFAULTS and k not in ("dtype", "model_type", "rope_parameters")
    }
    vision = {k: v for k, v in real["vision_config"].items() if k in checkpoints._VISION_DEFAULTS and k != "model_type"}
    ours = checkpoints.save_hub_fused(tmp_path, mtp=False, vision_config=vision, **text)
    assert header(ours) == header(trained_tiny)
    index = json.loads((trained_tiny / "model.safetensors.index.json").read_text())
    assert set(index["metadata"]) == set(json.loads((ours / "model.safetensors.index.json").read_text())["metadata"])


def test_reference_state_dict_of_trained_fixture(trained_tiny):
    ref = checkpoints.reference_state_dict(trained_tiny)
    cfg = text_config(trained_tiny)
    experts = [k for k in ref if PER_EXPERT_RE.search(k)]
    assert len(experts) == 3 * cfg["num_experts"] * cfg["num_hidden_layers"]
    assert not any(FUSED_RE.search(k) for k in ref)
    assert all(v.dtype == torch.float32 for v in ref.values())
    raw = checkpoints.load_tensors(trained_tiny)[f"{LM}.layers.3.mlp.experts.down_proj"]
    assert torch.equal(ref[f"{LM}.layers.3.mlp.experts.31.down_proj.weight"], raw[31].float())


def test_fp8_layout(tiny_fp8):
    folder = tiny_fp8
    config = json.loads((folder / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "fp8" and q["weight_block_size"] == [128, 128]
    skip = set(q["modules_to_not_convert"])
    assert {
        "lm_head",
        f"{LM}.embed_tokens",
        f"{LM}.layers.0.linear_attn.conv1d",
        f"{LM}.layers.0.mlp.gate",
        f"{LM}.layers.1.mlp.shared_expert_gate",
        "mtp.fc",
        "model.visual.blocks.0.attn.qkv",
    } <= skip
    assert_index_consistent(folder, 2)
    heads = header(folder)
    assert not any(FUSED_RE.search(k) for k in heads)
    fp8 = {k for k, (d, _) in heads.items() if d == "F8_E4M3"}
    scales = {k for k in heads if k.endswith(".weight_scale_inv")}
    assert {k[: -len("_scale_inv")] for k in scales} == fp8
    assert {d for k, (d, _) in heads.items() if k not in fp8 | scales} == {"BF16"}
    for k in fp8:
        rows, cols = heads[k][1]
        assert heads[k + "_scale_inv"] == ("F32", (-(-rows // 128), -(-cols // 128)))
        assert k.rsplit(".", 1)[0] not in skip
    for k in heads:
        if k.rsplit(".", 1)[0] in skip:
            assert heads[k][0] == "BF16"
    h = config["text_config"]["hidden_size"]
    for k in (
        f"{LM}.layers.0.mlp.experts.7.gate_proj.weight",
        f"{LM}.layers.0.mlp.experts.7.down_proj.weight",
        f"{LM}.layers.0.linear_attn.in_proj_qkv.weight",
        f"{LM}.layers.1.self_attn.o_proj.weight",
        f"{LM}.layers.0.mlp.shared_expert.up_proj.weight",
        "mtp.layers.0.mlp.experts.0.up_proj.weight",
    ):
        assert k in fp8, k
    assert heads[f"{LM}.layers.0.mlp.experts.7.gate_proj.weight_scale_inv"][1] == (1, -(-h // 128))
    assert h % 128  # partial blocks exercised


@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_fp8_dequantized_close_to_original(tmp_path, scale_dtype):
    folder = checkpoints.save_hub_fp8(tmp_path, seed=1, scale_dtype=scale_dtype)
    original = checkpoints.reference_state_dict(
        checkpoints.save_transformers(tmp_path, seed=1, **checkpoints.FP8_DEFAULTS)
    )
    raw = checkpoints.load_tensors(folder)
    deq = checkpoints.fp8_dequantized_state_dict(folder)
    assert deq.keys() == checkpoints.reference_state_dict(folder).keys()
    assert set(original) <= set(deq) and not any(k.endswith("_scale_inv") for k in deq)
    n_fp8 = 0
    for key, want in original.items():
        got = deq[key]
        assert got.dtype == torch.float32 and got.shape == want.shape
        scale = raw.get(key + "_scale_inv")
        if scale is None:  # bf16-stored
            assert (got - want).abs().le(want.abs() * 2**-8).all(), key
            continue
        n_fp8 += 1
        assert raw[key].dtype == torch.float8_e4m3fn and scale.dtype == getattr(torch, scale_dtype)
        s = scale.float().repeat_interleave(128, 0).repeat_interleave(128, 1)[: want.shape[0], : want.shape[1]]
        err = (got - want).abs()
        assert err.le(want.abs() / 16 + s * 2**-9).all(), key
        assert 0 < err.mean() < 0.05 * want.abs().mean(), key
    assert n_fp8 >= 3 * 8 * 4


def test_tokenizer(tiny_chat):
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tiny_chat / name).exists()
    cfg = text_config(tiny_chat)
    tok = AutoTokenizer.from_pretrained(tiny_chat)
    assert len(tok) <= cfg["vocab_size"] == checkpoints.TOKENIZER_VOCAB_SIZE
    assert tok.convert_tokens_to_ids("<|im_end|>") == cfg["eos_token_id"]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text and "<|im_start|>assistant" in text
    assert max(tok("def f(x): return x")["input_ids"]) < cfg["vocab_size"]


def test_minimal_tokenizer_without_fixture(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setattr(checkpoints, "TRAINED_TINY", tmp_path / "absent")
    (tmp_path / "config.json").write_text(json.dumps(checkpoints.tiny_config()))
    checkpoints.add_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 9 + 256 and tok.convert_tokens_to_ids("<|im_end|>") == 2
    ids = tok("héllo")["input_ids"]
    assert tok.decode(ids) == "héllo" and max(ids) < 512
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def test_add_tokenizer_rejects_small_vocab(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(checkpoints.tiny_config(vocab_size=256)))
    with pytest.raises(ValueError, match="vocab_size"):
        checkpoints.add_tokenizer(tmp_path)


def test_mlx_lm_reads_the_hub_layout_as_the_same_model(tmp_path):
    """mlx-lm (which drops mtp/visual, adds 1 to the zero-centred norms, moves conv1d axes) and
    transformers agree on the fused hub checkpoint: its weights make one real model."""
    mx = pytest.importorskip("mlx.core")
    mlx_utils = pytest.importorskip("mlx_lm.utils")
    from transformers import Qwen3_5MoeForConditionalGeneration

    folder = checkpoints.save_hub_fused(tmp_path, dtype="float32")
    ids = [1, 17, 300, 42, 5, 99]
    model, _ = mlx_utils.load_model(folder)
    got = torch.tensor(model(mx.array([ids])).astype(mx.float32).tolist())
    ref = Qwen3_5MoeForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids])).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
