"""The prefill ring: a prompt chunk's expert reads start at each MoE layer's entry (guessed by its
router) and stream through a ring of slots; outputs must be those of the decode slabs, bit for bit."""

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from tiny_packs import tiny_pack

from moestream.convert.tiny import tiny_config
from moestream.layouts import Manifest, PackError
from moestream.runtime import load
from moestream.runtime.store.prefill_ring import PrefillStream

# 16 experts, top-2: a chunk of 8 or more tokens routes to most of them (tokens x k >= experts)
CONFIG = tiny_config(
    hidden_size=256,
    num_experts=16,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    num_hidden_layers=3,
    vocab_size=256,
    shared_expert_intermediate_size=128,
)


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    return tiny_pack(tmp_path_factory, "prefill", CONFIG, seed=8)


def _run(pack, prompt: np.ndarray, **kw):
    """Logits of a prompt chunk and three decoded tokens, and the store's ring and counters."""
    rt = load(pack, tokenizer=False, **kw)
    try:
        cache = make_prompt_cache(rt.model)
        out = [np.array(rt.model(mx.array(prompt[None]), cache=cache))]
        out += [np.array(rt.model(mx.array([[t]]), cache=cache)) for t in (9, 2, 6)]
        ring = rt.store.prefill_stream
        return np.concatenate(out, axis=1), ring, rt.store.stats
    finally:
        rt.close()


@pytest.mark.parametrize("cache", ["none", "os"])
def test_the_ring_computes_what_the_decode_slabs_compute(pack, cache):
    prompt = np.random.default_rng().integers(0, 256, 24)  # fresh tokens each run
    want, off, _ = _run(pack, prompt, cache=cache, prefill_buffer=0)
    assert off is None
    got, ring, st = _run(pack, prompt, cache=cache)
    assert ring is not None and ring.guessed > 0 and 0 < ring.guess_hits <= ring.guessed
    np.testing.assert_array_equal(got, want)
    assert st.reads == st.misses + st.wasted  # every read is a routed expert or a counted wrong guess


def test_a_ring_smaller_than_a_layer_recycles_its_slots(pack):
    """3 slots for 16 experts: slots are reused as soon as their experts are computed, and the guesses
    for the next layer queue behind this layer's reads without being handed over as this layer's."""
    prompt = np.random.default_rng().integers(0, 256, 32)
    want, _, _ = _run(pack, prompt, cache="none", prefill_buffer=0)
    stride = Manifest.load(pack).experts[0].stride
    got, ring, _ = _run(pack, prompt, cache="none", prefill_buffer=3 * stride)
    assert ring.capacity == 3
    np.testing.assert_array_equal(got, want)


def test_short_chunks_make_no_guess(pack):
    """2 tokens x top-2 < 16 experts: a guess would mostly be wrong, so none is made."""
    _, ring, st = _run(pack, np.array([5, 7]), cache="none")
    assert ring.guessed == 0 and st.reads == st.misses


def test_a_corrupt_block_read_through_the_ring_fails_in_one_line(pack, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(pack, bad)
    x = Manifest.load(bad).experts[1]
    with open(bad / x.file, "r+b") as f:  # flip bytes inside every expert of layer 1's file
        for e in range(x.num_experts):
            f.seek(x.expert_offset(e) + 100)
            f.write(b"\xff\x00\xff\x00")
    with pytest.raises(PackError, match=r"checksum mismatch"):
        _run(bad, np.random.default_rng().integers(0, 256, 24), cache="none")


class _FakeReads:
    """``submit`` for a ring without files: each read is a future completed by ``finish`` (or failed)."""

    def __init__(self):
        self.issued: list[tuple[int, int, int]] = []  # (layer, expert, slot)
        self.futures: dict[tuple[int, int], Future] = {}

    def __call__(self, layer, expert, slab, slot):
        f = Future()
        f.set_running_or_notify_cancel()
        self.issued.append((layer, expert, slot))
        self.futures[layer, expert] = f
        return f

    def finish(self, *keys, error=None):
        for k in keys:
            (self.futures[k].set_exception(error) if error else self.futures[k].set_result(None))


@pytest.fixture
def layout(pack):
    return Manifest.load(pack).experts[0]


def test_wrong_guesses_are_dropped_and_missed_experts_queued(layout):
    reads = _FakeReads()
    ring = PrefillStream(layout, 3, reads)
    ring.guess(0, [4, 1, 9, 2])  # 3 slots: 4, 1, 9 issued, 2 queued
    assert [(l, e) for l, e, _ in reads.issued] == [(0, 4), (0, 1), (0, 9)]
    groups = ring.fetch(0, np.array([1, 2, 5]))  # 4 and 9 were wrong; 2 was queued; 5 missed
    reads.finish((0, 4), (0, 9))  # the wrong guesses end: their slots come back
    reads.finish((0, 1))
    seen = []
    pool = ThreadPoolExecutor(1)
    # the remaining reads are issued into freed slots as the groups are taken; finish them as they come
    done = threading.Event()

    def finisher():
        while not done.is_set():
            for k, f in list(reads.futures.items()):
                if not f.done():
                    f.set_result(None)
            done.wait(0.001)

    pool.submit(finisher)
    try:
        for slab, part, slots in groups:
            assert slab is ring.slab and len(part) == len(slots)
            seen += part.tolist()
    finally:
        done.set()
        pool.shutdown()
    assert sorted(seen) == [1, 2, 5]
    assert ring.guess_hits == 2  # 1 and 2 were guessed and routed
    assert sorted(ring._free) == [0, 1, 2] and not ring._held


def test_a_failed_read_raises_from_the_fetch_and_leaves_the_ring_usable(layout):
    reads = _FakeReads()
    ring = PrefillStream(layout, 4, reads)
    groups = ring.fetch(2, np.array([0, 3]))
    reads.finish((2, 0), (2, 3), error=PackError("experts/layer_2.bin: layer 2 expert 0: checksum mismatch"))
    with pytest.raises(PackError, match="checksum mismatch"):
        list(groups)
    groups = ring.fetch(2, np.array([1]))  # a later fetch still gets its experts
    reads.finish((2, 1))
    assert [p.tolist() for _, p, _ in groups] == [[1]]
