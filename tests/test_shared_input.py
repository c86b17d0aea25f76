"""Sibling CPU linears on one input share one product (runtime/model/shared_input.py)."""

import mlx.core as mx
import numpy as np
import pytest
from tiny_packs import tiny_pack

from moestream.runtime.cpu import kernels as cpu_kernels
from moestream.runtime.model.cpu_layers import CpuQuantizedLinear


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    from moestream.convert.tiny import tiny_config
    from moestream.runtime import load

    # 4 layers: gated-delta and attention layers both (full attention every 4th)
    pack = tiny_pack(
        tmp_path_factory,
        "shared",
        tiny_config(
            hidden_size=128,
            num_experts=8,
            moe_intermediate_size=64,
            num_hidden_layers=4,
            vocab_size=512,
            shared_expert_intermediate_size=64,
        ),
        seed=5,
        resident_bits=4,  # every resident quantized (the default keeps some bf16, which take BLAS instead)
    )
    rt = load(pack, kernels="numba")
    yield rt
    rt.close()


def _groups(model):
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, CpuQuantizedLinear) and m.shared is not None:
            out.setdefault(id(m.shared.module[0]), []).append((name, m))
    return list(out.values())


def test_groups_found_and_members_are_views(runtime):
    groups = _groups(runtime.model)
    names = {n.rsplit(".", 1)[-1] for g in groups for n, _ in g}
    # gated-delta in_proj_*, attention q/k/v, the shared expert's gate/up, router + shared gate
    assert {
        "in_proj_qkv",
        "in_proj_z",
        "in_proj_a",
        "in_proj_b",
        "q_proj",
        "k_proj",
        "v_proj",
        "gate_proj",
        "up_proj",
    } <= names
    assert "down_proj" not in names and "o_proj" not in names and "out_proj" not in names
    for g in groups:
        fused = g[0][1].shared.module[0].fused._w.module
        lo, hi = fused.ctypes.data, fused.ctypes.data + fused.nbytes
        for _, m in g:  # each member's codes lie inside the shared matrix: no second copy
            assert lo <= m._w.module.ctypes.data and m._w.module.ctypes.data + m._w.module.nbytes <= hi


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_one_product_per_input_equal_to_each_alone(runtime, monkeypatch, tokens):
    rng = np.random.default_rng(tokens)
    calls = []
    qmm = cpu_kernels.qmm
    monkeypatch.setattr(cpu_kernels, "qmm", lambda *a, **k: calls.append(a[1].shape) or qmm(*a, **k))
    for g in _groups(runtime.model):
        width = g[0][1].inner.weight.shape[1] * 32 // g[0][1].inner.bits
        x = mx.array(rng.standard_normal((1, tokens, width)).astype(np.float32))
        calls.clear()
        together = [np.array(m(x)) for _, m in g]
        assert len(calls) == 1  # the first member computed the group's rows; the others sliced them
        group = g[0][1].shared.module[0]
        assert group._x is None and group._y is None  # all served: the input and product let go
        alone = []
        for _, m in g:
            shared, m.shared = m.shared, None
            try:
                alone.append(np.array(m(x)))
            finally:
                m.shared = shared
        for (name, _), a, b in zip(g, together, alone):
            assert a.shape == b.shape, name
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * max(1e-30, np.abs(b).max()), err_msg=name)
        x2 = x + 0
        y = np.array(g[1][1](x2))  # another input object: computed again, not the cached rows
        assert len(calls) == 1 + len(g) + 1 and y.shape == alone[1].shape
        np.testing.assert_array_equal(np.array(g[1][1](x2)), y)  # the same member, same input: again
        assert len(calls) == 1 + len(g) + 2
