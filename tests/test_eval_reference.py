"""``moestream eval --reference DIR`` on a checkpoint saved by transformers 5 (issue 24): its config.json
names fields as transformers 5 does (``num_local_experts``, ``rope_parameters``), which mlx-lm's
ModelArgs does not read; the reference loader fills them in as the converter does."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from moestream.convert import convert
from moestream.convert.family import mlx_lm_config
from moestream.main import cli
from moestream.runtime import evaluate, load

families = pytest.importorskip("families", reason="needs the test extras: torch, transformers")


def _text(seed: int = 5, words: int = 120) -> str:
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    return " ".join("".join(rng.choice(letters, rng.integers(2, 8))) for _ in range(words))


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    """A tiny qwen3_moe built with transformers and written by its save_pretrained, and its 8-bit pack."""
    d = tmp_path_factory.mktemp("evalref")
    src = families.save_family(d, "qwen3_moe")
    cfg = json.loads((src / "config.json").read_text())
    # what makes this a transformers 5 checkpoint to mlx-lm (else the test would test nothing)
    assert "num_local_experts" in cfg and "num_experts" not in cfg, cfg
    assert "rope_parameters" in cfg and "rope_theta" not in cfg, cfg
    convert(str(src), d / "p8", bits=8, alignment=4096)
    return src, d / "p8"


def test_mlx_reference_of_a_transformers_5_checkpoint(qwen3_moe):
    src, pack = qwen3_moe
    rt = load(pack)
    try:
        res = evaluate(rt, _text(), reference=str(src), reference_backend="mlx", window=128)
    finally:
        rt.close()
    assert res["tokens"] > 200 and math.isfinite(res["kl_mean"]) and math.isfinite(res["ref_ppl"])
    # the reference is the same model (a wrong rope base or expert count would not be): 8-bit KL is small
    assert res["kl_mean"] <= 0.005, res


def test_eval_cli_with_a_transformers_5_reference(qwen3_moe, tmp_path):
    src, pack = qwen3_moe
    (tmp_path / "text.txt").write_text(_text(6))
    r = CliRunner().invoke(
        cli, ["eval", str(pack), "--text", str(tmp_path / "text.txt"), "--reference", str(src), "--window", "128"]
    )
    assert r.exit_code == 0 and r.exception is None, r.output
    assert "KL(reference || pack)" in r.output and "Traceback" not in r.output


def test_mlx_lm_config_is_the_converters_normalization():
    cfg = {
        "model_type": "qwen3_moe",
        "num_local_experts": 8,
        "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
    }
    got = mlx_lm_config(cfg)
    assert got["num_experts"] == 8 and got["rope_theta"] == 1e6 and got["num_local_experts"] == 8
    assert "num_experts" not in cfg  # the caller's dict is left alone
    other = {"model_type": "llama", "rope_theta": 1.0}
    assert mlx_lm_config(other) == other  # no family adapts it: as it is
