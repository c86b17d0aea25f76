"""``--cache none`` on the CPU kernels reads experts with ``O_DIRECT`` into page-aligned slabs (no copy
through the page cache) when every piece of a block is page-sized; outputs must not change."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from tiny_packs import tiny_pack

from moestream.convert.tiny import tiny_config
from moestream.layouts import Manifest
from moestream.runtime import load

# hidden 1024, expert intermediate 512, 4-bit g64: every component a multiple of 4 KiB
CONFIG = tiny_config(
    hidden_size=1024,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=512,
    num_hidden_layers=2,
    vocab_size=256,
    shared_expert_intermediate_size=256,
)


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    return tiny_pack(tmp_path_factory, "direct", CONFIG, seed=4)


def _logits(pack, **kw):
    rt = load(pack, tokenizer=False, **kw)
    try:
        cache = make_prompt_cache(rt.model)
        out = [np.array(rt.model(mx.array([[3, 1, 4, 1, 5]]), cache=cache))]
        out += [np.array(rt.model(mx.array([[t]]), cache=cache)) for t in (9, 2, 6)]
        slabs = [s for pair in getattr(rt.store, "_shared", {}).values() for s in pair]
        return np.concatenate(out, axis=1), bool(rt.store._direct), all(s.direct_ok for s in slabs), rt.store.stats
    finally:
        rt.close()


def test_direct_reads_compute_what_buffered_reads_compute(pack):
    want, direct, _, st0 = _logits(pack, cache="os")
    assert not direct  # os keeps the page cache's reads
    got, direct, aligned, st = _logits(pack, cache="none")
    if not direct:
        pytest.skip("this filesystem refuses O_DIRECT")
    assert aligned  # every slot piece page-aligned: the reads went direct
    np.testing.assert_array_equal(got, want)
    # the same bytes as buffered reads, but for wrong prefill guesses: how many of those started
    # before they could be cancelled varies between runs
    stride = Manifest.load(pack).experts[0].stride
    assert st.reads == st.misses + st.wasted
    assert st.bytes_read - st.wasted * stride == st0.bytes_read - st0.wasted * stride
    # the MLX path keeps MLX slabs and buffered reads
    got, direct, aligned, _ = _logits(pack, cache="none", kernels="mlx")
    assert not direct and not aligned


def test_a_filesystem_refusing_direct_reads_falls_back_to_buffered(pack, monkeypatch):
    """O_DIRECT opens but its reads fail with EINVAL (some filesystems): the store reads buffered
    from then on, with the same outputs."""
    import errno
    import os

    want, _, _, _ = _logits(pack, cache="os")
    real = os.preadv
    refused = []

    def preadv(fd, bufs, off):
        if fd in direct_fds:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, off)

    from moestream.runtime.store import expert_store

    direct_fds: set = set()
    orig = expert_store.ExpertStore.__init__

    def init(self, *a, **kw):
        orig(self, *a, **kw)
        direct_fds.update(self._direct.values())

    monkeypatch.setattr(expert_store.ExpertStore, "__init__", init)
    monkeypatch.setattr(os, "preadv", preadv)
    got, _, _, st = _logits(pack, cache="none")
    if not direct_fds:
        pytest.skip("this filesystem refuses O_DIRECT")
    assert refused  # the direct reads were tried, refused, and redone buffered
    np.testing.assert_array_equal(got, want)
