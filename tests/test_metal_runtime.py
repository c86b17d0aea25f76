"""The runtime's kernel choice: on Linux ``auto`` keeps the numba kernels, ``metal`` is refused in one
line; and the Metal path of the streamed layer (slab slots, expert order, slab groups, the two
launches) run end to end with the kernels emulated, against MLX's own kernels on the same pack."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from moestream import metal
from moestream.convert import convert
from moestream.convert.tiny import tiny_config, write_tiny_checkpoint
from moestream.layouts.errors import MoestreamError
from moestream.main import cli
from moestream.metal import kernels as K
from moestream.runtime import generate, load
from moestream.runtime.model.cpu_layers import CpuQuantizedLinear
from moestream.runtime.model.streamed import StreamedSwitchGLU

CONFIG = tiny_config(
    hidden_size=128,
    num_experts=16,
    num_experts_per_tok=4,
    moe_intermediate_size=64,
    num_hidden_layers=2,
    vocab_size=512,
    shared_expert_intermediate_size=64,
)
no_metal = pytest.mark.skipif(metal.available(), reason="checks the behaviour where there is no Metal device")


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> dict[int, Path]:
    d = tmp_path_factory.mktemp("metal_rt")
    src = write_tiny_checkpoint(d / "src", CONFIG, seed=4)
    out = {}
    for bits in (4, 3):
        convert(str(src), d / f"p{bits}", bits=bits, alignment=4096)
        out[bits] = d / f"p{bits}"
    # Per-expert tiers: each layer's experts in files of 2, 4 and 8 bits (skewed routing counts).
    from moestream.quant.calibration import Calibration

    counts = np.array([2000, 900, 500, 300, 200, 120, 80, 60, 40, 30, 20, 10, 5, 2, 1, 0], float)
    Calibration({f"experts.{layer}.count": np.roll(counts, 3 * layer) for layer in range(2)}).save(d / "cal.st")
    convert(
        str(src),
        d / "tiered",
        alignment=4096,
        method="clip",
        calibration=str(d / "cal.st"),
        weighted=False,
        tier_widths=["2g64", "4g64", "8g64"],
        bits_per_weight=4.5,
    )
    out["tiered"] = d / "tiered"
    return out


def _streamed(rt) -> list[StreamedSwitchGLU]:
    return [m for _, m in rt.model.named_modules() if isinstance(m, StreamedSwitchGLU)]


def test_unsupported_shapes():
    assert K.unsupported(4096, 1024, (4, 64), (4, 64)) is None
    assert K.unsupported(7168, 2048, (4, 64), (4, 64)) is None  # 29 KB of threadgroup memory
    assert "threadgroup memory" in K.unsupported(8192, 2048, (4, 64), (4, 64))
    assert "5-bit" in K.unsupported(256, 128, (5, 64), (4, 64))
    assert "group size 64 with 96" in K.unsupported(256, 96, (4, 64), (4, 64))
    with pytest.raises(ValueError, match="Metal expert kernels"):
        K.plan(256, 96, 4, (4, 64), (4, 64), mx.float32, True)


@no_metal
def test_kernel_choice_without_metal(packs):
    rt = load(packs[4])  # auto: numba kernels on the CPU, as before
    try:
        assert any(isinstance(m, CpuQuantizedLinear) for _, m in rt.model.named_modules())
        assert not any(s._metal for s in _streamed(rt))
    finally:
        rt.close()
    rt = load(packs[4], kernels="mlx")  # MLX's built-in ops everywhere
    try:
        assert not any(isinstance(m, CpuQuantizedLinear) for _, m in rt.model.named_modules())
        assert not any(s._metal or s._cpu for s in _streamed(rt))
    finally:
        rt.close()
    with pytest.raises(MoestreamError, match="no Metal device"):
        load(packs[4], kernels="metal")
    with pytest.raises(MoestreamError, match="expected one of auto, metal, numba, mlx"):
        load(packs[4], kernels="cuda")
    for cmd in (
        ["generate", str(packs[4]), "-p", "hi", "--kernels", "metal"],
        ["serve", str(packs[4]), "--kernels", "metal"],
    ):
        res = CliRunner().invoke(cli, cmd)
        assert res.exit_code == 1
        assert res.output.strip().splitlines()[-1].startswith("error: --kernels metal: no Metal device")


@pytest.mark.skipif(
    sys.platform != "linux" or shutil.which("g++") is None, reason="the Metal emulator needs Linux and g++"
)
@pytest.mark.parametrize("bits,cache", [(4, "os"), (3, "lru:40K"), ("tiered", "none")])
def test_metal_path_emulated_matches_mlx(packs, tmp_path, monkeypatch, bits, cache):
    """lru:40K holds one expert per layer, so each token's 4 experts come in 4 slab groups; the
    tiered pack sends each tier's experts to the kernels at that tier's width."""
    from metal_emu import Emulator

    emu = Emulator(tmp_path)
    calls = []

    def launch(spec, inputs):
        calls.append(spec.kernel)
        return emu.launch(spec, inputs)

    x = mx.array(np.random.default_rng(1).integers(0, 512, (1, 6)))
    ref = load(packs[bits], kernels="mlx")
    try:
        want = [np.array(ref.model(x[:, j : j + 1])) for j in range(x.shape[1])]  # one token per call: decode
        want_toks = [c.token for c in generate(ref, "ab", max_tokens=6, raw=True) if c.token is not None]
    finally:
        ref.close()
    monkeypatch.setattr(metal, "available", lambda: True)
    monkeypatch.setattr(K, "launch", launch)
    rt = load(packs[bits], cache=cache, kernels="metal")
    try:
        assert all(s._metal for s in _streamed(rt))
        if bits == "tiered":
            assert all(len(rt.pack.manifest.expert_tiers(layer)) > 1 for layer in (0, 1))
        for j in range(x.shape[1]):
            got = np.array(rt.model(x[:, j : j + 1]))
            np.testing.assert_allclose(got, want[j], rtol=0, atol=1e-4 * np.abs(want[j]).max())
        n = len(calls)
        assert n > 0 and calls.count("gate_up") == calls.count("down")
        toks = [c.token for c in generate(rt, "ab", max_tokens=6, raw=True) if c.token is not None]
        assert toks == want_toks
        assert len(calls) > n  # decode steps took the Metal path too (the prompt itself goes through MLX)
    finally:
        rt.close()


emulator = pytest.mark.skipif(
    sys.platform != "linux" or shutil.which("g++") is None, reason="the Metal emulator needs Linux and g++"
)


def _broken(emu, how: str):
    def launch(spec, inputs):
        if how == "build":
            raise RuntimeError("[metal::Device] Unable to build metal library from source\nerror: ...")
        out = emu.launch(spec, inputs)
        return [o * 1.25 for o in out] if spec.kernel == "down" else out

    return launch


@emulator
@pytest.mark.parametrize("how, reason", [("build", "failed to build"), ("wrong", "differs from MLX")])
def test_a_failing_metal_kernel_falls_back_or_stops(packs, tmp_path, monkeypatch, caplog, how, reason):
    """A kernel that does not build, or computes wrong values: ``auto`` warns once naming the kernel and
    the reason and computes with MLX's ops (same logits as kernels=mlx); ``metal`` stops in one line."""
    from metal_emu import Emulator

    from moestream.metal import selfcheck

    x = mx.array([[5]])
    with load(packs[4], kernels="mlx") as ref:
        want = np.array(ref.model(x))
    monkeypatch.setattr(metal, "available", lambda: True)
    monkeypatch.setattr(K, "launch", _broken(Emulator(tmp_path), how))
    selfcheck.check.cache_clear()
    try:
        with caplog.at_level("WARNING"), load(packs[4], kernels="auto") as rt:
            assert not any(s._metal for s in _streamed(rt))
            np.testing.assert_allclose(np.array(rt.model(x)), want, rtol=0, atol=1e-5 * np.abs(want).max())
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "Metal expert kernels at 4-bit" in warnings[0] and reason in warnings[0]
        with pytest.raises(MoestreamError, match=f"kernels='metal': Metal expert kernels at 4-bit.*{reason}"):
            load(packs[4], kernels="metal")
        res = CliRunner().invoke(cli, ["generate", str(packs[4]), "-p", "hi", "--kernels", "metal"])
        assert res.exit_code == 1 and "Traceback" not in res.output
        assert res.output.strip().splitlines()[-1].startswith("error: --kernels metal: Metal expert kernels")
    finally:
        selfcheck.check.cache_clear()


@emulator
def test_a_slab_slot_is_rewritten_only_after_the_kernels_reading_it_ran(packs, tmp_path, monkeypatch):
    """On Metal the kernels' outputs are lazy: a slab slot may be rewritten only once every queued
    computation reading the slab has been evaluated (``Slab.settle``: ``mx.eval`` returns when the GPU
    is done). lru:40K holds one expert per layer, so each token rewrites slots several times."""
    from metal_emu import Emulator

    from moestream.runtime.store.expert_store import ExpertStore
    from moestream.runtime.store.slabs import Slab

    emu = Emulator(tmp_path)
    monkeypatch.setattr(metal, "available", lambda: True)
    monkeypatch.setattr(K, "launch", emu.launch)
    read, checked = ExpertStore._read, []

    def guarded(self, x, local, slab, slot):
        checked.append(not slab.pending)
        return read(self, x, local, slab, slot)

    settle, waited = Slab.settle, []

    def counted(self):
        waited.append(len(self.pending))  # lazy kernel outputs still reading the slab
        return settle(self)

    monkeypatch.setattr(ExpertStore, "_read", guarded)
    monkeypatch.setattr(Slab, "settle", counted)
    with load(packs[4], cache="lru:40K", kernels="metal") as rt:
        for t in (3, 9, 1, 7):
            mx.eval(rt.model(mx.array([[t]])))
    assert len(checked) > 8 and all(checked)
    assert any(waited)  # there was queued work to wait for: the check above is not vacuous
