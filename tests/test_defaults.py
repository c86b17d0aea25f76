"""convert's defaults: the table in convert/defaults.py is the choice benchmarks/defaults_study.py recorded;
what a plain ``--bits B`` fills in (and what a flag or a recipe keeps); the sizes doctor and the README quote;
and the CPU kernels' int8 activations per width, chosen by measured error."""

import json
from pathlib import Path

import pytest

from moestream.convert.defaults import DEFAULTS, default_for
from moestream.convert.plan import Options
from moestream.convert.sizes import model_sizes

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "defaults_study.json"


def test_the_table_is_the_recorded_study():
    choices = json.loads(STUDY.read_text())["summary"]["choices"]
    assert set(choices) <= {str(b) for b in DEFAULTS}
    for bits, choice in choices.items():
        d, opts = DEFAULTS[int(bits)], choice["options"]
        assert (d.method, d.resident_bits, d.down_bits) == (
            opts["method"],
            opts["resident_bits"],
            opts.get("down_bits"),
        ), bits
        assert d.resident_kinds == opts.get("resident_kinds", {}), bits
        assert d.calibrated == choice.get("calibrated", {}).get("method"), bits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_plain_bits_take_the_defaults(bits):
    d = default_for(bits)
    o = Options(bits=bits).with_defaults()
    assert (o.resident_bits, o.resident_kinds or {}, o.down_bits) == (d.resident_bits, d.resident_kinds, d.down_bits)
    assert o.resolved_method() == d.method
    # a flag wins for its own field; a recipe is taken as it is
    given = Options(bits=bits, resident_bits=8, method="rtn", down_bits=bits).with_defaults()
    assert (given.resident_bits, given.resident_kinds, given.down_bits, given.resolved_method()) == (
        8,
        None,
        bits,
        "rtn",
    )
    assert Options(bits=bits, recipe="q4").with_defaults() == Options(bits=bits, recipe="q4")
    tiers = Options(bits=bits, tier_widths=["2g64", "4g64"], bits_per_weight=3.0).with_defaults()
    assert tiers.down_bits is None


def test_sizes_follow_the_defaults():
    s = model_sizes("qwen3.5-397b-a17b", 4)
    d = default_for(4)
    assert (s["resident_kinds"], s["down_bits"]) == (d.resident_kinds or None, d.down_bits or 4)
    explicit = model_sizes("qwen3.5-397b-a17b", 4, 4)
    assert explicit["resident_bytes"] < s["resident_bytes"] or d.resident_bits == 4


def test_int8_activations_by_width(monkeypatch):
    from moestream.runtime.cpu import int8 as cpu_int8
    from moestream.runtime.cpu import kernels

    monkeypatch.setattr(kernels, "INT8_ACTIVATIONS", True)
    assert 8 not in kernels.INT8_WIDTHS  # measured: int8 rounding visibly raises 8-bit packs' decode KL
    for bits in (2, 3, 4, 8):
        want = bits in kernels.INT8_WIDTHS and cpu_int8.supported(bits, 64)
        assert kernels._use_int8(None, 1, bits, 64) == want
        assert kernels._use_int8(False, 1, bits, 64) is False
        assert kernels._use_int8(True, 1, bits, 64) == cpu_int8.supported(bits, 64)  # asked for: taken
        assert kernels._use_int8(None, kernels.BLAS_MIN_TOKENS, bits, 64) is False
    monkeypatch.setattr(kernels, "INT8_ACTIVATIONS", False)
    assert not any(kernels._use_int8(None, 1, b, 64) for b in (2, 3, 4, 8))


def test_calibration_never_makes_a_pack_worse(tmp_path):
    """On the shipped demo model, calibrated as the study calibrates it: at each width, ``--calibration`` with
    no method gives a pack no worse (mean KL against the bf16 model) than the same bits without it; where
    the study found no way of using the statistics that is, the pack is the one made without them."""
    from moestream.convert import convert
    from moestream.runtime import load
    from moestream.runtime.collect_calibration import calibrate
    from moestream.runtime.evaluate import evaluate, load_reference

    demo = Path(__file__).resolve().parents[1] / "cli" / "demo_model"
    text = (demo / "eval.txt").read_text()
    convert(str(demo), tmp_path / "p8", bits=8, resident_bits=8)
    calibrate(tmp_path / "p8", text[16_000:], max_tokens=6144).save(tmp_path / "cal.st")
    ref = load_reference(demo)
    for bits in (2, 3, 4):
        plain = convert(str(demo), tmp_path / f"p{bits}", bits=bits)
        cal = convert(str(demo), tmp_path / f"c{bits}", bits=bits, calibration=str(tmp_path / "cal.st"))
        if default_for(bits).calibrated is None:
            for x, y in zip(plain.experts, cal.experts):
                assert (tmp_path / f"p{bits}" / x.file).read_bytes() == (tmp_path / f"c{bits}" / y.file).read_bytes()
            continue
        kl = {}
        for name in (f"p{bits}", f"c{bits}"):
            with load(tmp_path / name) as rt:
                kl[name] = evaluate(rt, text, reference=ref, max_tokens=2048)["kl_mean"]
        assert kl[f"c{bits}"] <= kl[f"p{bits}"], (bits, kl)
