"""Read-ahead: while a layer computes, the next layer's experts guessed by its router are read.
Outputs must not change (a guess only moves reads earlier), and the accounting must say what the
disk did."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from tiny_packs import tiny_pack

from moestream.convert.tiny import tiny_config
from moestream.layouts import Manifest
from moestream.runtime import load
from moestream.runtime.store.expert_store import ExpertStore

CONFIG = tiny_config(
    hidden_size=128,
    num_experts=16,
    num_experts_per_tok=4,
    moe_intermediate_size=64,
    num_hidden_layers=4,
    vocab_size=512,
    shared_expert_intermediate_size=64,
)


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    return tiny_pack(tmp_path_factory, "ra", CONFIG, seed=5)


def _decode(pack, tokens, **kw):
    rt = load(pack, tokenizer=False, **kw)
    try:
        cache = make_prompt_cache(rt.model)
        mx.eval(rt.model(mx.array([tokens[:6]]), cache=cache))  # prefill: no guesses
        out = [np.array(rt.model(mx.array([[t]]), cache=cache)) for t in tokens[6:]]
        return np.concatenate(out, axis=1), rt.store.stats
    finally:
        rt.close()


@pytest.mark.parametrize("cache", ["none", "os"])
@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_read_ahead_leaves_outputs_unchanged(pack, cache, cpu_kernels):
    tokens = np.random.default_rng(1).integers(0, 512, 20).tolist()
    base, st0 = _decode(pack, tokens, cache=cache, kernels="numba" if cpu_kernels else "mlx", read_ahead=0)
    got, st = _decode(pack, tokens, cache=cache, kernels="numba" if cpu_kernels else "mlx", read_ahead=4, max_slots=8)
    assert np.array_equal(got, base)
    m = Manifest.load(pack)
    decode_layers = 14 * (len(m.moe_layers()) - 1)  # every layer but the last guesses for the next
    assert st0.ahead == 0 and st.ahead == 4 * decode_layers
    assert 0 < st.ahead_hits <= st.ahead  # some guesses were right, on a random model too
    # the disk read every routed expert once, plus the wrong guesses (the prompt's prefill guesses
    # too: how many of its wrong ones were cancelled before they started varies between runs)
    assert st.reads - st.wasted == st0.reads - st0.wasted + st.ahead - st.ahead_hits


def test_a_guess_for_another_layer_is_not_used(pack):
    """A read-ahead is good for the next fetch only: fetching another layer (or the same layer with
    more experts than fit beside the guesses) reads afresh, after the guessed reads have landed."""
    from moestream.layouts import open_pack

    p = open_pack(pack)
    ref = ExpertStore(p, cache="none", max_slots=8)
    store = ExpertStore(p, cache="none", max_slots=8)
    try:
        layers = p.manifest.moe_layers()
        want = {}
        for layer, experts in ((layers[0], [1, 5, 9]), (layers[1], [0, 2, 3, 4, 6, 7, 8])):
            for slab, part, slots in ref.fetch(layer, np.array(experts)):
                want[layer] = {e: {k: v[s].copy() for k, v in slab.numpy.items()} for e, s in zip(part, slots)}
        store.read_ahead(layers[1], np.array([1, 5, 9, 11]))  # guessed for layer 1, then layer 0 comes
        for layer, experts in ((layers[0], [1, 5, 9]), (layers[1], [0, 2, 3, 4, 6, 7, 8])):
            if layer == layers[1]:
                store.read_ahead(layer, np.array([0, 12]))  # right layer, but 7 + 2 > 8 slots: not used
            for slab, part, slots in store.fetch(layer, np.array(experts)):
                for e, s in zip(part, slots):
                    for k, v in slab.numpy.items():
                        assert np.array_equal(v[s], want[layer][e][k]), (layer, e, k)
        assert store.stats.ahead_hits == 0 and store.stats.ahead == 6
    finally:
        ref.close()
        store.close()
        p.close()
