"""``--cache os-map``: experts wholly in the page cache are computed from a read-only mapping of their
file, the rest read as with ``os``. Outputs must not change, the accounting must say which experts
were read and which were mapped, and a corrupt block must still be caught."""

import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from tiny_packs import tiny_pack

from moestream.convert.tiny import tiny_config
from moestream.layouts import Manifest, PackError
from moestream.runtime import OptionError, load

CONFIG = tiny_config(
    hidden_size=128,
    num_experts=16,
    num_experts_per_tok=4,
    moe_intermediate_size=64,
    num_hidden_layers=2,
    vocab_size=512,
    shared_expert_intermediate_size=64,
)


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    return tiny_pack(tmp_path_factory, "osmap", CONFIG, seed=9)


def _run(pack, tokens, **kw):
    rt = load(pack, tokenizer=False, **kw)
    try:
        cache = make_prompt_cache(rt.model)
        out = [np.array(rt.model(mx.array([tokens[:5]]), cache=cache))[:, -1:]]
        out += [np.array(rt.model(mx.array([[t]]), cache=cache)) for t in tokens[5:]]
        return np.concatenate(out, axis=1), rt.store.stats
    finally:
        rt.close()


def _drop(pack):
    from moestream.runtime.store import system

    if not system.can_drop_cache():
        pytest.skip("dropping a file's cached pages needs POSIX_FADV_DONTNEED (Linux; the macOS lane has none)")
    for f in (Path(pack) / "experts").glob("*.bin"):
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def _cached(pack) -> bool:
    """Whether this filesystem's page cache keeps the expert files once read (tmpfs, overlays...)."""
    from moestream.runtime.store.slabs import MappedLayer

    m = Manifest.load(pack)
    x = m.experts[0]
    fd = os.open(Path(pack) / x.file, os.O_RDONLY)
    try:
        os.pread(fd, x.stride, x.expert_offset(0))
        mapped = MappedLayer(fd, x)
        hit = bool(mapped.resident(np.array([0]))[0])
        mapped.close()
        return hit
    finally:
        os.close(fd)


def _same_logits(got, want) -> None:
    # Mapped blocks reach the numba kernels as read-only strided views, slabs as contiguous arrays:
    # other specializations, which may round differently (4.8e-7 of a 0.89 maximum seen in one clean
    # run; 0 in most). Serving a wrong expert's block moves these logits by ~5e-2 of the maximum.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_mapped_hits_compute_what_reads_compute(pack):
    tokens = np.random.default_rng(3).integers(0, 512, 16).tolist()
    want, st_os = _run(pack, tokens, cache="os")
    if not _cached(pack):
        pytest.skip("this filesystem does not keep the expert files in the page cache")
    # warm: every expert the run routes to is in the page cache, so none is read
    got, st = _run(pack, tokens, cache="os-map")
    _same_logits(got, want)
    assert st.page_hits == st_os.misses and st.reads == 0 and st.misses == 0
    # partly cold: some reads, some mapped, the same logits
    _drop(pack)
    got, st = _run(pack, tokens, cache="os-map")
    _same_logits(got, want)
    assert st.reads > 0 and st.page_hits > 0
    assert st.page_hits + st.misses == st_os.misses


def test_a_corrupt_block_in_the_page_cache_is_caught(pack, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(pack, bad)
    m = Manifest.load(bad)
    x = m.experts[0]
    with open(bad / x.file, "r+b") as f:  # every block of the file: whichever the router picks
        for j in range(x.num_experts):
            f.seek(x.expert_offset(j) + 100)
            f.write(b"\xff" * 64)
    if not _cached(bad):
        pytest.skip("this filesystem does not keep the expert files in the page cache")
    with pytest.raises(PackError, match=rf"{x.file}: layer {x.layer} expert \d+: checksum mismatch"):
        _run(bad, [1, 2, 3, 4, 5, 6], cache="os-map")


def test_os_map_needs_the_cpu_kernels(pack):
    with pytest.raises(OptionError, match="os-map"):
        load(pack, tokenizer=False, cache="os-map", kernels="mlx")


def test_bench_with_os_map_and_no_verify(pack):
    """``bench --cache os-map --no-verify`` runs the page-cache path with checksums off and says so."""
    from click.testing import CliRunner

    from moestream.main import cli

    _run(pack, [1, 2, 3, 4, 5, 6], cache="os")  # the experts into the page cache
    res = CliRunner().invoke(
        cli,
        [
            "bench",
            str(pack),
            "--cache",
            "os-map",
            "--no-verify",
            "--no-baselines",
            "--prompt-tokens",
            "8",
            "--gen-tokens",
            "4",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "cache os-map" in res.output and "checksums off" in res.output
    if _cached(pack):
        assert "computed in place (os-map)" in res.output


def test_blocks_found_cached_are_trusted_until_a_major_fault(pack, monkeypatch):
    """A block found wholly in the page cache is not asked about again (a ``mincore`` a block cost
    more than the layer's routing) until the process takes a major page fault, or the store drops the
    page cache itself; either makes every block checked again."""
    import types

    from moestream.runtime.store import expert_store
    from moestream.runtime.store.slabs import MappedLayer

    _run(pack, list(range(1, 12)), cache="os")  # the experts into the page cache
    if not _cached(pack):
        pytest.skip("this filesystem does not keep the expert files in the page cache")
    asked = []
    real = MappedLayer.resident
    monkeypatch.setattr(MappedLayer, "resident", lambda self, local: asked.append(len(local)) or real(self, local))
    faults = [0]
    fake = types.SimpleNamespace(RUSAGE_SELF=0, getrusage=lambda who: types.SimpleNamespace(ru_majflt=faults[0]))
    monkeypatch.setattr(expert_store, "resource", fake)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    rt = load(pack, tokenizer=False, cache="os-map")
    try:

        def tokens_run():
            cache = make_prompt_cache(rt.model)
            for t in tokens:
                mx.eval(rt.model(mx.array([[t]]), cache=cache))

        tokens_run()
        first = sum(asked)
        assert first > 0 and rt.store.stats.reads == 0
        tokens_run()  # the same experts again: all trusted
        assert sum(asked) == first and rt.store.stats.reads == 0
        faults[0] += 1  # a major fault somewhere in the process: everything is checked again
        tokens_run()
        assert sum(asked) == 2 * first
        from moestream.runtime.store import system

        if not system.can_drop_cache():
            return  # the macOS lane: a file's pages cannot be dropped there (checked up to here)
        rt.store.drop_page_cache()  # pages unmapped and dropped: checked, found missing, read
        tokens_run()
        assert rt.store.stats.reads > 0
    finally:
        rt.close()
