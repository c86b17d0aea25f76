"""Routing traces (--trace-routing): the recorded choices equal mlx-lm's resident model's router on the
same tokens; the cache analyses give hand-computed answers on crafted traces."""

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from moestream.convert import convert
from moestream.convert.tiny import tiny_config, write_tiny_checkpoint
from moestream.main import cli
from moestream.runtime import load
from moestream.runtime.analysis.routing import RoutingTrace, consecutive_reuse, lru_hit_rate, popularity
from moestream.runtime.model.blocks import moe_blocks
from moestream.runtime.model.build import load_resident_model


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    d = tmp_path_factory.mktemp("routing")
    cfg = tiny_config(
        hidden_size=128,
        num_experts=8,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        vocab_size=512,
        shared_expert_intermediate_size=64,
    )
    convert(str(write_tiny_checkpoint(d / "src", cfg)), d / "p4", bits=4)
    return d / "p4"


def test_trace_equals_the_resident_router(pack, tmp_path):
    ids = mx.array(np.random.default_rng(0).integers(0, 512, (1, 20)))
    rt = load(pack, kernels="mlx")  # MLX's kernels: bit-identical to the resident model
    try:
        trace = rt.trace_routing()
        mx.eval(rt.model(ids))
        trace.save(tmp_path / "t.npz")
    finally:
        rt.close()
    n, layers = RoutingTrace.load(tmp_path / "t.npz")
    model, p = load_resident_model(pack, dtype="float32")
    k = p.manifest.top_k
    p.close()
    seen = {}
    for i, mlp in moe_blocks(model).items():
        inner = mlp.switch_mlp

        def hook(x, inds, inner=inner, i=i):
            seen[i] = np.array(inds).reshape(-1, inds.shape[-1])
            return inner(x, inds)

        mlp.switch_mlp = hook
    mx.eval(model(ids))
    assert n == 8 and set(layers) == set(seen)
    for i in seen:
        assert layers[i].shape == (20, k) and np.array_equal(layers[i], seen[i])


def test_cli_generate_writes_a_trace(pack, tmp_path):
    r = CliRunner().invoke(
        cli, ["generate", str(pack), "-p", "hi", "-m", "5", "--no-think", "--trace-routing", str(tmp_path / "g.npz")]
    )
    assert r.exit_code == 0, r.output
    n, layers = RoutingTrace.load(tmp_path / "g.npz")
    rows = {a.shape[0] for a in layers.values()}
    assert len(rows) == 1 and rows.pop() >= 5 and all(a.max() < n for a in layers.values())


def test_cache_analyses_on_a_crafted_trace():
    t = np.array([[0, 1], [1, 2], [0, 1]])
    np.testing.assert_allclose(popularity(t, 4), [3 / 6, 2 / 6, 1 / 6, 0])
    assert consecutive_reuse(t) == 0.5  # token 1 keeps expert 1 of token 0; token 2 keeps expert 1
    # capacity 2: misses 0, 1, 2 (evicts 0), 0 (evicts 2); hits: 1 twice.
    assert lru_hit_rate(t, 2) == pytest.approx(2 / 6)
    assert lru_hit_rate(t, 3) == pytest.approx(3 / 6)  # all three fit: only first uses miss
    rng = np.random.default_rng(1)
    big = rng.integers(0, 16, (200, 4))
    assert lru_hit_rate(big, 16) == pytest.approx(1 - 16 / sum(len(set(r)) for r in big.tolist()))
