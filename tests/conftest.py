"""Session fixtures: tiny random Qwen3.5-MoE checkpoints on disk (built by tests/checkpoints.py,
once per test session, each well under a second) and the trained tiny model of ../shared."""

from pathlib import Path

from moestream.runtime.cpu.threads import prefer_passive_wait

# numba's OpenMP workers wait passively (the CLI does the same): before torch or mlx-lm load libgomp.
prefer_passive_wait()

import pytest  # noqa: E402 (after the wait policy is set)
from macos_lane import EMULATE_DARWIN, emulate_darwin  # noqa: E402

if EMULATE_DARWIN:
    emulate_darwin()

TRAINED_TINY = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "trained-tiny-qwen3_5-moe"


def _build(tmp_path_factory, builder: str, **kwargs) -> Path:
    checkpoints = pytest.importorskip("checkpoints", reason="needs the test extras: torch, transformers")
    return getattr(checkpoints, builder)(tmp_path_factory.mktemp(builder), **kwargs)


@pytest.fixture(scope="session")
def tiny_per_expert_fp32(tmp_path_factory) -> Path:
    """transformers' save_pretrained: per-expert experts, float32, one model.safetensors."""
    return _build(tmp_path_factory, "save_transformers", dtype="float32", shards=1)


@pytest.fixture(scope="session")
def tiny_per_expert_bf16(tmp_path_factory) -> Path:
    """transformers' save_pretrained: per-expert experts, bf16, 3 shards + index."""
    return _build(tmp_path_factory, "save_transformers", dtype="bfloat16", shards=3)


@pytest.fixture(scope="session")
def tiny_fused_bf16(tmp_path_factory) -> Path:
    """BF16 hub layout: fused gate_up_proj/down_proj, model.visual.*, mtp.*, 2 shards + index."""
    return _build(tmp_path_factory, "save_hub_fused")


@pytest.fixture(scope="session")
def tiny_fused_i96(tmp_path_factory) -> Path:
    """BF16 hub layout with moe_intermediate_size=96 (divisible by 32, not by 64)."""
    return _build(tmp_path_factory, "save_hub_fused", moe_intermediate_size=96)


@pytest.fixture(scope="session")
def tiny_fp8(tmp_path_factory) -> Path:
    """FP8 hub layout: per-expert F8_E4M3 + float32 weight_scale_inv, hidden 192 (partial blocks)."""
    return _build(tmp_path_factory, "save_hub_fp8")


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory) -> Path:
    """BF16 hub layout with a tokenizer and chat template (vocab_size 4096)."""
    return _build(tmp_path_factory, "save_hub_fused", tokenizer=True)


@pytest.fixture(scope="session")
def trained_tiny() -> Path:
    """The trained tiny model in ../shared/fixtures (hub BF16 layout, 32 experts, tokenizer)."""
    if not (TRAINED_TINY / "model.safetensors.index.json").exists():
        pytest.skip(f"shared fixture absent: {TRAINED_TINY}")
    return TRAINED_TINY


@pytest.fixture
def float_kernels(monkeypatch):
    """The CPU kernels with float32 activations only: for tests that check the streaming plumbing
    (slots, groups, tiers) by exact agreement with a resident model. The int8-activation decode
    kernels have their own error bounds (test_cpu_int8.py)."""
    from moestream.runtime.cpu import kernels as cpu_kernels

    monkeypatch.setattr(cpu_kernels, "INT8_ACTIVATIONS", False)
