"""The OS layer on macOS and Linux (runtime/store/system.py, layouts/fileio.py): each Linux-only call
has its macOS counterpart or a fallback. Some of these run in every lane with the calls monkeypatched
away; the macOS lane (tests/macos_lane.py) runs the runtime's tests with them really gone."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from macos_lane import EMULATE_DARWIN, REMOVED
from numpy.testing import assert_allclose
from tiny_packs import tiny_pack

from moestream.convert.tiny import tiny_config
from moestream.layouts.fileio import preadv
from moestream.runtime.store import system


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    cfg = tiny_config(hidden_size=64, num_experts=8, moe_intermediate_size=32, num_hidden_layers=2, vocab_size=256)
    return tiny_pack(tmp_path_factory, "platform", cfg, seed=5)


def test_the_macos_lane_took_the_linux_calls_away():
    if not EMULATE_DARWIN:
        pytest.skip("checked in the macOS lane (MOESTREAM_EMULATE_DARWIN=1, run by .ci/run)")
    assert sys.platform == "darwin"
    assert not any(hasattr(os, name) for name in REMOVED)
    assert not system.can_drop_cache() and system.open_direct(__file__) is None


def test_pread_loop_reads_what_preadv_reads(tmp_path, monkeypatch):
    data = np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8)
    f = tmp_path / "blob"
    f.write_bytes(data.tobytes())
    fd = os.open(f, os.O_RDONLY)
    try:
        monkeypatch.delattr(os, "preadv", raising=False)
        a, b = np.zeros(1000, np.uint8), np.zeros(777, np.float32)  # 3108 bytes
        assert preadv(fd, [a, b], 123) == 1000 + 777 * 4
        assert a.tobytes() == data[123:1123].tobytes() and b.tobytes() == data[1123 : 1123 + 3108].tobytes()
        tail = np.zeros(100, np.uint8)  # past the end: a short read, as preadv's
        assert preadv(fd, [tail], data.size - 40) == 40 and tail[:40].tobytes() == data[-40:].tobytes()
    finally:
        os.close(fd)


def test_no_fadvise_means_no_drop(monkeypatch, tmp_path):
    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    f = tmp_path / "x"
    f.write_bytes(b"x" * 4096)
    fd = os.open(f, os.O_RDONLY)
    try:
        assert system.drop_cached(fd) is False
    finally:
        os.close(fd)


def test_macos_reads_bypass_the_cache_with_f_nocache(monkeypatch, tmp_path):
    import fcntl

    calls = []
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(fcntl, "fcntl", lambda fd, cmd, arg=0: calls.append((cmd, arg)) or 0)
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    f = tmp_path / "x"
    f.write_bytes(b"x" * 4096)
    fd, direct = system.open_uncached(f)
    os.close(fd)
    assert direct is False and calls == [(getattr(fcntl, "F_NOCACHE", system.F_NOCACHE), 1)]


def test_ram_size_from_sysctl_on_macos(monkeypatch):
    import subprocess

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(os, "sysconf", lambda name: (_ for _ in ()).throw(ValueError(name)))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "51539607552\n", ""))
    assert system.ram_bytes() == 48 << 30


def test_cold_store_on_macos_reads_uncached_and_drops_nothing(pack, monkeypatch):
    """``--cache none`` with the macOS calls: descriptors get F_NOCACHE, nothing is fadvised, and the
    logits are those of the Linux path."""
    import mlx.core as mx

    from moestream.runtime import load

    tokens = mx.array([[3, 1, 4, 1, 5]])
    with load(pack, cache="none", tokenizer=False) as rt:
        want = np.array(rt.model(tokens))
    bypassed, dropped = [], []
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    monkeypatch.setattr(system, "bypass_cache", lambda fd: bypassed.append(fd) or True)
    monkeypatch.setattr(system, "drop_cached", lambda *a: dropped.append(a) or False)
    with load(pack, cache="none", tokenizer=False) as rt:
        got = np.array(rt.model(tokens))
        assert not rt.store.direct_io and rt.store.stats.reads > 0
    assert bypassed and not dropped
    assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
