"""``moestream doctor``: a report with every section, figures from real probes, markdown and JSON."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from tiny_packs import tiny_pack

from moestream.convert.sizes import model_sizes
from moestream.convert.tiny import tiny_config
from moestream.main import cli
from moestream.runtime import doctor as doc


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    cfg = tiny_config(hidden_size=64, num_experts=8, moe_intermediate_size=32, num_hidden_layers=2, vocab_size=256)
    return tiny_pack(tmp_path_factory, "doctor", cfg, seed=6)


def test_disk_probe_reads_every_block_and_cleans_up(tmp_path):
    r = doc.disk_read(tmp_path, total=16 << 20, stride=1 << 20, threads=2)
    assert r["reads"] == 16 and r["gbps"] > 0 and r["cache_bypassed"]
    assert list(tmp_path.iterdir()) == []


def test_known_models_follow_from_their_sizes():
    rows = doc.known_models(disk_gbps=2.0, mem_gbps=100.0)
    assert {r["model"] for r in rows} >= {"Qwen3.5-397B-A17B", "DeepSeek-V3", "Qwen3-30B-A3B"}
    row = next(r for r in rows if r["model"] == "Qwen3.5-397B-A17B" and r["bits"] == 4)
    s = model_sizes("qwen3.5-397b-a17b", 4)
    assert row["k"] == 10 and row["expert_bytes_per_token"] == s["expert_bytes_per_token"]
    e, res = s["expert_bytes_per_token"], s["resident_bytes_per_token"]
    assert row["cold_tps"] == pytest.approx(1 / (e / 2e9 + res / 100e9))
    two = next(r for r in rows if r["model"] == "Qwen3.5-397B-A17B" and r["bits"] == 2)
    assert two["expert_bytes_per_token"] < 0.6 * e  # 2-bit experts read a little over half the bytes


def test_doctor_report_on_a_pack(pack, tmp_path):
    out = tmp_path / "report.json"
    r = CliRunner().invoke(cli, ["doctor", "--pack", str(pack), "--quick", "--json", "-o", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["machine"]["cores"] >= 1 and rep["machine"]["ram_bytes"] > 1 << 30
    assert rep["kernels"]["checks"] and all(c["ok"] for c in rep["kernels"]["checks"])
    assert rep["disk"]["gbps"] > 0 and rep["memory_gbps"] > 0
    for name in ("cold", "warm"):
        assert rep["decode"][name]["decode_tps"] > 0
    cold, warm = rep["decode"]["cold"], rep["decode"]["warm"]
    assert cold["hit_rate"] == 0.0 and cold["bytes_per_token"] > 0
    assert warm["bytes_per_token"] < cold["bytes_per_token"]  # warm: computed from the page cache
    md = doc.format_doctor(rep)
    for heading in ("# moestream doctor", "## Decode", "## Known models"):
        assert heading in md
    assert "Qwen3.5-397B-A17B" in md and "| kernels (auto) |" in md
