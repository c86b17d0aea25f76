"""The acceptance path on the trained fixture: convert at 4 and 2 bits, report side by side, verify
(and fail after one flipped byte), inspect --json; and the clip method's gain on real experts."""

import json

import pytest
from click.testing import CliRunner

from moestream.layouts import Manifest
from moestream.main import cli


def run(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def packs(trained_tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("packs")
    for bits in (4, 2):
        code, out = run("convert", trained_tiny, "-o", d / f"p{bits}", "--bits", bits)
        assert code == 0, out
    return d


def test_report_side_by_side(packs, tmp_path):
    code, out = run("report", packs / "p2", packs / "p4", "--plot", tmp_path / "err.png")
    assert code == 0, out
    assert "p2 (2-bit clip)" in out and "p4 (4-bit clip)" in out  # clip at every width by default
    rows = [
        line.split()
        for line in out.splitlines()
        if line.strip().startswith(("0 ", "1 ", "2 ", "3 ")) and " experts " in f" {line} "
    ]
    assert len(rows) == 4  # one aggregate row per layer
    for r in rows:
        two, four = float(r[-2]), float(r[-1])
        assert two > 2 * four > 0  # 2-bit error is far above 4-bit, layer by layer
    assert (tmp_path / "err.png").stat().st_size > 1000
    code, out = run("report", packs / "p4", "--json")
    rep = json.loads(out)
    assert {"experts.gate_proj", "experts.up_proj", "experts.down_proj", "router", "attention"} <= set(
        next(iter(rep.values()))["per_kind"]
    )


def test_verify_passes_then_fails_after_a_flipped_byte(packs, tmp_path):
    import shutil

    p = tmp_path / "p4"
    shutil.copytree(packs / "p4", p)
    code, out = run("verify", p)
    assert code == 0 and "OK (128 expert blocks" in out
    x = Manifest.load(p).experts[2]
    with open(p / x.file, "r+b") as f:
        f.seek(x.expert_offset(17) + 4321)
        b = f.read(1)
        f.seek(x.expert_offset(17) + 4321)
        f.write(bytes([b[0] ^ 0x80]))
    code, out = run("verify", p)
    assert (
        code == 1
        and out.strip() == "error: experts/layer-002.bin: layer 2 expert 17: checksum mismatch (corrupt block)"
    )


def test_inspect_json(packs):
    code, out = run("inspect", packs / "p4", "--json")
    info = json.loads(out)
    assert info["stride_mod_alignment"] == 0 and info["stride"] % info["alignment"] == 0
    assert all(f["offset"] % info["alignment"] == 0 for f in info["expert_files"])
    assert info["expert_bytes_per_token"] == 4 * 4 * info["stride"]  # top-4 x 4 MoE layers
    code, out = run("inspect", packs / "p2")
    assert code == 0 and "2-bit g64 clip" in out


def test_clip_beats_rtn_on_real_experts(trained_tiny, tmp_path):
    """Per the report: clip lowers the 2-bit experts' relative RMSE clearly below round-to-nearest."""
    from moestream.quant.report import load_report

    for method in ("rtn", "clip"):
        assert run("convert", trained_tiny, "-o", tmp_path / method, "--bits", 2, "--method", method)[0] == 0
    rtn = load_report(tmp_path / "rtn")["per_kind"]["experts"]["rel_rmse"]
    clip = load_report(tmp_path / "clip")["per_kind"]["experts"]["rel_rmse"]
    # Measured 0.393 -> 0.318 (-19%); the exact per-group optimum of this layout is 0.3176 (see the note).
    assert clip < 0.82 * rtn, (rtn, clip)


def test_demo_runs(tmp_path):
    """README's first command: the demo converts the shipped model, verifies, scores and streams end to end,
    and its 2-bit vs 4-bit comparison is a trained model's (perplexity far below the vocabulary's 3072)."""
    import re

    from moestream.demo import DEMO_PROMPT

    r = CliRunner().invoke(cli, ["demo", "--workdir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "streamed generation" in r.output and "decode:" in r.output and "mean KL" in r.output
    ref = float(re.search(r"float32 \(perplexity ([\d.]+)\)", r.output).group(1))
    rows = {
        int(b): tuple(map(float, v))
        for b, *v in re.findall(r"^  ([24])-bit +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+)%$", r.output, re.M)
    }
    assert set(rows) == {2, 4}, r.output
    assert ref < 30, ref
    (ppl4, kl4, _, top4), (ppl2, kl2, _, top2) = rows[4], rows[2]
    assert ppl4 < min(1.5 * ref, ppl2) and kl4 < kl2 and top4 > top2, rows
    assert r.output.count(DEMO_PROMPT) >= 2
