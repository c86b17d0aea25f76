"""Calibration: importance-weighted clip (checked with MLX's own dequantize), the statistics that
``moestream calibrate`` records (checked against mlx-lm's all-in-RAM model), and convert --calibration."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from moestream.convert import convert
from moestream.convert.defaults import default_for
from moestream.convert.tiny import tiny_config, write_tiny_checkpoint
from moestream.main import cli
from moestream.quant import quantize
from moestream.quant.calibration import Calibration
from moestream.runtime.collect_calibration import calibrate
from moestream.runtime.model.build import load_resident_model


def _mx_dequant(wq, s, b, bits, g) -> np.ndarray:
    """MLX's unpacking, in float32 (with bf16 scales MLX would round its output to bf16)."""
    as_mx = (lambda a: mx.array(a).view(mx.bfloat16).astype(mx.float32)) if s.dtype == np.uint16 else mx.array
    return np.array(mx.dequantize(mx.array(wq), as_mx(s), as_mx(b), group_size=g, bits=bits).astype(mx.float32))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_weighted_clip_lowers_the_output_error(bits):
    """With inputs whose channels differ in scale, weighting columns by E[x_j^2] lowers E||(W - Q)x||^2."""
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    scale = np.exp(rng.standard_normal(256) * 1.5)  # heavy-tailed channel scales, as activations have
    x = rng.standard_normal((2048, 256)) * scale
    imp = (x**2).mean(0)
    x_test = rng.standard_normal((2048, 256)) * scale  # fresh inputs for the measurement

    def out_err(**kw):
        q = _mx_dequant(*quantize(w, bits, 64, method="clip", **kw), bits, 64)
        return float(((x_test @ (w - q).T.astype(np.float64)) ** 2).mean())

    plain, weighted = out_err(), out_err(importance=imp)
    assert weighted < 0.9 * plain, (plain, weighted)


def test_unit_importance_is_plain_clip_and_bad_importance_is_refused():
    w = np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32)
    a = quantize(w, 3, 64, method="clip")
    b = quantize(w, 3, 64, method="clip", importance=np.full(128, 7.0))
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError, match="clip"):
        quantize(w, 4, 64, method="rtn", importance=np.ones(128))
    with pytest.raises(ValueError, match="128"):
        quantize(w, 4, 64, method="clip", importance=np.ones(64))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("cal")
    cfg = tiny_config(
        hidden_size=128,
        num_experts=8,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        vocab_size=512,
        shared_expert_intermediate_size=64,
    )
    src = write_tiny_checkpoint(d / "src", cfg)
    convert(str(src), d / "p8", bits=8, resident_bits=8)  # quantized residents record statistics too
    return d, src


def test_calibration_statistics_match_the_resident_model(tiny):
    d, _ = tiny
    text = "def f(x):\n    return [i * x for i in range(10)]\n" * 12
    cal = calibrate(d / "p8", text, max_tokens=200, window=64)
    cal.save(d / "cal.st")
    cal = Calibration.load(d / "cal.st")
    # Independent: mlx-lm's model with every expert in RAM and MLX's kernels; capture what the
    # MoE blocks' switch_mlp and the output head receive.
    model, pack = load_resident_model(d / "p8", dtype="float32")
    tok_ids = pack and __import__("moestream.runtime.model.runtime", fromlist=["load_tokenizer"]).load_tokenizer(
        pack.root
    )
    ids = tok_ids.encode(text)[:200]
    pack.close()
    seen = {}
    layers = model.language_model.model.layers
    for i, layer in enumerate(layers):
        inner = layer.mlp.switch_mlp

        def hook(x, inds, inner=inner, i=i):
            seen.setdefault(i, []).append(
                (
                    np.array(x.astype(mx.float32)).reshape(-1, x.shape[-1]),
                    np.array(inds).reshape(-1, inds.shape[-1]),
                    inner,
                )
            )
            return inner(x, inds)

        layer.mlp.switch_mlp = hook
    for i in range(0, len(ids), 64):
        mx.eval(model(mx.array(ids[i : i + 64])[None]))
    for i, calls in seen.items():
        xs = np.concatenate([c[0] for c in calls])
        inds = np.concatenate([c[1] for c in calls])
        glu = calls[0][2]
        counts = cal.arrays[f"experts.{i}.count"]
        assert counts.sum() == inds.size and np.array_equal(counts, np.bincount(inds.ravel(), minlength=8))
        assert cal.meta["expert_matrices"] == "expert" and cal.meta["linear_matrices"]
        for e in range(8):
            xe = xs[(inds == e).any(1)].astype(np.float64)
            np.testing.assert_allclose(cal.expert_importance(i, e, "up_proj"), (xe**2).mean(0), rtol=2e-4, atol=1e-6)
            np.testing.assert_allclose(cal.arrays[f"experts.{i}.gate_up_cov"][e], xe.T @ xe, rtol=2e-3, atol=1e-5)
            # GPTQ's matrix: shrunk towards the pooled correlation, with the expert's own diagonal.
            h = cal.expert_hessian(i, e, "gate_proj")
            np.testing.assert_allclose(np.diag(h), (xe**2).mean(0), rtol=2e-4, atol=1e-6)
            deq = {
                p: _mx_dequant(
                    np.array(getattr(glu, p)["weight"][e]),
                    np.array(getattr(glu, p)["scales"][e].view(mx.uint16)),
                    np.array(getattr(glu, p)["biases"][e].view(mx.uint16)),
                    8,
                    getattr(glu, p).group_size,
                )
                if getattr(glu, p)["scales"].dtype == mx.bfloat16
                else None
                for p in ("gate_proj", "up_proj")
            }
            if deq["gate_proj"] is not None:
                g, u = xe @ deq["gate_proj"].T, xe @ deq["up_proj"].T
                mid = g / (1 + np.exp(-g)) * u
                np.testing.assert_allclose(
                    cal.expert_importance(i, e, "down_proj"), (mid**2).mean(0), rtol=2e-3, atol=1e-6
                )
    head = cal.linear_importance("language_model.lm_head.weight")
    assert head is not None and head.shape == (128,) and np.all(head > 0)
    assert cal.meta["tokens"] == len(ids)


def test_pooled_matrices_rescale_to_each_expert(tiny, tmp_path):
    d, _ = tiny
    cal = calibrate(d / "p8", "abc def " * 30, max_tokens=120, window=60, matrix_bytes=400_000)
    assert cal.meta["expert_matrices"] == "pooled"  # per-expert ones would not fit the budget
    h = cal.expert_hessian(0, 3, "gate_proj")
    np.testing.assert_allclose(np.diag(h), cal.expert_importance(0, 3, "gate_proj"), rtol=1e-9)
    assert np.allclose(h, h.T) and np.all(np.linalg.eigvalsh(h) > -1e-9)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_clip_on_correlated_inputs(bits):
    """Output error E||(W - Q) x||^2 on fresh inputs; Q dequantized by MLX from GPTQ's packed bytes."""
    from moestream.quant.gptq import gptq_quantize

    rng = np.random.default_rng(10 + bits)
    mix = rng.standard_normal((256, 256)) * 0.3 + np.eye(256)
    scale = np.exp(rng.standard_normal(256))
    x, x_test = ((rng.standard_normal((4096, 256)) @ mix) * scale for _ in range(2))
    w = rng.standard_normal((96, 256)).astype(np.float32)

    def out_err(wq, s, b):
        q = _mx_dequant(wq, s, b, bits, 64)
        return float(((x_test @ (w - q).T.astype(np.float64)) ** 2).mean())

    clip = out_err(*quantize(w, bits, 64, method="clip"))
    wq, s, b, st = gptq_quantize(w, x.T @ x / len(x), bits, 64)
    assert out_err(wq, s, b) < 0.6 * clip
    q = _mx_dequant(wq, s, b, bits, 64)
    assert abs(st.sum_err2 - float(((q - w.astype(np.float64)) ** 2).sum())) < 1e-6 * st.sum_err2  # stats match MLX


def test_convert_with_calibration(tiny, tmp_path):
    d, src = tiny
    if not (d / "cal.st").exists():
        calibrate(d / "p8", "hello world " * 40, max_tokens=100, window=50).save(d / "cal.st")
    cal = ["--calibration", str(d / "cal.st")]
    r = CliRunner().invoke(
        cli, ["convert", str(src), "-o", str(tmp_path / "p2g"), "--bits", "2", "--method", "gptq", *cal]
    )
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "p2g" / "report.json").read_text())["rows"]
    assert {x["method"] for x in rows if x["kind"].startswith("experts")} == {"gptq+calibration"}
    plain = CliRunner().invoke(cli, ["convert", str(src), "-o", str(tmp_path / "p2"), "--bits", "2"])
    assert plain.exit_code == 0
    a = (tmp_path / "p2g" / "experts" / "layer-000.bin").read_bytes()
    b = (tmp_path / "p2" / "experts" / "layer-000.bin").read_bytes()
    assert a != b  # the statistics changed the codes
    # --calibration with no --method: as convert/defaults.py measured best (at 2 bits: not used for the codes)
    r = CliRunner().invoke(cli, ["convert", str(src), "-o", str(tmp_path / "p2c"), "--bits", "2", *cal])
    assert r.exit_code == 0, r.output
    c = (tmp_path / "p2c" / "experts" / "layer-000.bin").read_bytes()
    assert (c == b) == (default_for(2).calibrated is None)
    r = CliRunner().invoke(
        cli, ["convert", str(src), "-o", str(tmp_path / "x"), "--method", "rtn", "--calibration", str(d / "cal.st")]
    )
    assert r.exit_code == 1 and r.output.startswith("error: --calibration") and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["convert", str(src), "-o", str(tmp_path / "x"), "--method", "gptq"])
    assert r.exit_code == 1 and r.output.startswith("error: --method gptq: needs calibration statistics")
    bad = tmp_path / "bad.st"
    bad.write_bytes(b"not a file")
    r = CliRunner().invoke(cli, ["convert", str(src), "-o", str(tmp_path / "y"), "--calibration", str(bad)])
    assert r.exit_code == 1 and "bad.st" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "y").exists()  # refused before anything was written


def test_calibrate_refuses_a_bad_size_in_one_line(tiny, tmp_path):
    d, _ = tiny
    text = tmp_path / "t.txt"
    text.write_text("hello " * 20)
    r = CliRunner().invoke(
        cli, ["calibrate", str(d / "p8"), "--text", str(text), "-o", str(tmp_path / "c.st"), "--matrix-bytes", "12Q"]
    )
    assert r.exit_code == 1 and r.output == "error: --matrix-bytes 12Q: expected a size such as 512M or 8G\n"
    assert not (tmp_path / "c.st").exists()


def test_calibrate_a_checkpoint_through_a_temporary_8bit_pack(tiny, tmp_path):
    """`calibrate SOURCE`: the same statistics as calibrating its 8-bit pack, and no pack left behind."""
    d, src = tiny
    text = tmp_path / "t.txt"
    text.write_text("for i in range(3):\n    print(i * i)\n" * 10)
    args = ["--text", str(text), "--max-tokens", "100", "--window", "50"]
    r1 = CliRunner().invoke(cli, ["calibrate", str(src), "-o", str(tmp_path / "a.st"), *args])
    assert r1.exit_code == 0, r1.output
    r2 = CliRunner().invoke(cli, ["calibrate", str(d / "p8"), "-o", str(tmp_path / "b.st"), *args])
    assert r2.exit_code == 0, r2.output
    a, b = Calibration.load(tmp_path / "a.st"), Calibration.load(tmp_path / "b.st")
    assert set(a.arrays) == set(b.arrays)
    for k in a.arrays:
        np.testing.assert_allclose(a.arrays[k], b.arrays[k], rtol=1e-5, atol=1e-6)
    assert a.arrays["experts.0.count"].sum() > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.st", "b.st", "t.txt"]
