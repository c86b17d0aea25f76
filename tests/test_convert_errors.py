"""Bad input through the CLI: a one-line error naming the file and problem, a non-zero exit, no
valid-looking pack left behind, and the source untouched. Plus resume, force and dry runs."""

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from moestream.convert.tiny import tiny_config, write_tiny_checkpoint
from moestream.layouts import PackError, open_pack
from moestream.main import cli

SMALL = dict(
    hidden_size=64,
    num_experts=4,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    vocab_size=128,
    shared_expert_intermediate_size=32,
)


@pytest.fixture()
def src(tmp_path) -> Path:
    return write_tiny_checkpoint(tmp_path / "src", tiny_config(**SMALL), max_shard_bytes=64 << 10)


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def run(*args) -> tuple[int, str]:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


def assert_clean_failure(code: int, out: str, must: str, output: Path) -> None:
    assert code != 0
    lines = [line for line in out.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert "Traceback" not in out
    assert must in lines[0], lines[0]
    assert not (output / "manifest.json").exists()
    assert not list(output.rglob("*.partial")) if output.exists() else True
    with pytest.raises(PackError):
        open_pack(output)


def test_truncated_shard(src, tmp_path):
    shard = sorted(src.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    before = _digest(src)
    code, out = run("convert", src, "-o", tmp_path / "out")
    assert_clean_failure(code, out, f"{shard.name}: truncated", tmp_path / "out")
    assert _digest(src) == before


def _rewrite_shard(src: Path, name: str, as_int32: bool = False) -> Path:
    """Remove tensor ``name`` from its shard and the index, or (``as_int32``) store it as int32."""
    from moestream.layouts import SafetensorsReader, SafetensorsWriter

    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = src / (index["weight_map"][name] if as_int32 else index["weight_map"].pop(name))
    with SafetensorsReader(shard) as r:
        tensors = {k: (r.tensors[k].dtype, r.read(k)) for k in r.tensors if as_int32 or k != name}
    if as_int32:
        tensors[name] = ("I32", tensors[name][1].astype("int32"))
    w = SafetensorsWriter(shard)
    for k, (dt, v) in tensors.items():
        w.declare(k, dt, v.shape)
    w.begin()
    for k, (dt, v) in tensors.items():
        w.write(k, v)
    w.finish()
    index_path.write_text(json.dumps(index))
    return shard


def test_wrong_dtype(src, tmp_path):
    name = "model.language_model.layers.0.input_layernorm.weight"
    shard = _rewrite_shard(src, name, as_int32=True)
    before = _digest(src)
    code, out = run("convert", src, "-o", tmp_path / "out")
    assert_clean_failure(code, out, f"{shard.name}: tensor {name} has dtype I32", tmp_path / "out")
    assert _digest(src) == before


def test_missing_expert(src, tmp_path):
    name = "model.language_model.layers.1.mlp.experts.down_proj"
    _rewrite_shard(src, name)
    code, out = run("convert", src, "-o", tmp_path / "out")
    assert_clean_failure(code, out, f"missing expert tensor {name} (layer 1)", tmp_path / "out")


def test_index_and_shards_disagree(src, tmp_path):
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.language_model.layers.1.mlp.experts.down_proj"
    shard = index["weight_map"].pop(name)
    index_path.write_text(json.dumps(index))
    code, out = run("convert", src, "-o", tmp_path / "out")
    assert_clean_failure(
        code, out, f"{shard}: tensor {name} is not listed in model.safetensors.index.json", tmp_path / "out"
    )


def test_missing_resident_tensor(src, tmp_path):
    name = "model.language_model.layers.0.linear_attn.A_log"
    _rewrite_shard(src, name)
    code, out = run("convert", src, "-o", tmp_path / "out")
    assert_clean_failure(code, out, f"missing tensor {name}", tmp_path / "out")


def test_leftover_tensor(src, tmp_path):
    import numpy as np

    from moestream.layouts import SafetensorsWriter

    w = SafetensorsWriter(src / "extra.safetensors")
    w.declare("model.language_model.layers.0.mystery.weight", "F32", (4,))
    w.begin()
    w.write("model.language_model.layers.0.mystery.weight", np.zeros(4, np.float32))
    w.finish()
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.language_model.layers.0.mystery.weight"] = "extra.safetensors"
    index_path.write_text(json.dumps(index))
    code, out = run("convert", src, "-o", tmp_path / "out")
    assert_clean_failure(
        code, out, "extra.safetensors: unexpected tensor model.language_model.layers.0.mystery.weight", tmp_path / "out"
    )


def test_missing_per_expert_tensor(tmp_path):
    checkpoints = pytest.importorskip("checkpoints")
    from safetensors.torch import load_file, save_file

    folder = checkpoints.save_transformers(tmp_path / "hf", dtype="float32", shards=1)
    sd = load_file(folder / "model.safetensors")
    gone = "model.language_model.layers.1.mlp.experts.3.up_proj.weight"
    del sd[gone]
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    code, out = run("convert", folder, "-o", tmp_path / "out")
    assert_clean_failure(code, out, f"missing expert tensor {gone}", tmp_path / "out")


def test_config_without_moe_fields(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    del cfg["text_config"]["num_experts"]
    (src / "config.json").write_text(json.dumps(cfg))
    code, out = run("convert", src, "-o", tmp_path / "out")
    assert_clean_failure(code, out, "not a Mixture-of-Experts config (missing num_experts)", tmp_path / "out")


def test_unsupported_architecture(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama4"
    (src / "config.json").write_text(json.dumps(cfg))
    code, out = run("convert", src, "-o", tmp_path / "out")
    assert_clean_failure(code, out, "model_type 'llama4' is not supported", tmp_path / "out")
    assert "supported: " in out and all(f in out for f in ("qwen3_5_moe", "qwen3_moe", "mixtral"))


def test_unwritable_output(src, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, out = run("convert", src, "-o", blocker / "pack")
    assert code != 0 and out.startswith("error: ") and "cannot write there" in out and len(out.splitlines()) == 1
    assert blocker.read_text() == "not a folder"


def test_disk_full(src, tmp_path, monkeypatch):
    import os

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    code, out = run("convert", src, "-o", tmp_path / "out")
    assert_clean_failure(code, out, "No space left on device", tmp_path / "out")


def test_existing_non_pack_folder_is_left_alone(src, tmp_path):
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("precious")
    for extra in ([], ["--force"], ["--resume"]):
        code, out = run("convert", src, "-o", out_dir, *extra)
        assert_clean_failure(code, out, "is not a moestream pack; refusing to write into it", out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == ["notes.txt"]
    assert (out_dir / "notes.txt").read_text() == "precious"


def test_existing_pack_needs_force(src, tmp_path):
    assert run("convert", src, "-o", tmp_path / "p", "--bits", "4")[0] == 0
    code, out = run("convert", src, "-o", tmp_path / "p", "--bits", "2")
    assert code != 0 and "already a pack (pass --force" in out
    assert open_pack(tmp_path / "p").manifest.quantization["experts"]["bits"] == 4
    assert run("convert", src, "-o", tmp_path / "p", "--bits", "2", "--force")[0] == 0
    assert open_pack(tmp_path / "p").manifest.quantization["experts"]["bits"] == 2


def test_interrupted_conversion_resumes(src, tmp_path, monkeypatch):
    from moestream.convert import pipeline

    real = pipeline.expert_block
    calls = {"n": 0}

    def flaky(s, x, e, *a):
        if x.layer == 1 and e == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(s, x, e, *a)

    monkeypatch.setattr(pipeline, "expert_block", flaky)
    out_dir = tmp_path / "p"
    code, out = run("convert", src, "-o", out_dir)
    assert code == 130 and not (out_dir / "manifest.json").exists()
    assert (out_dir / "experts" / "layer-000.bin").exists()
    assert not (out_dir / "experts" / "layer-001.bin").exists() and not list(out_dir.rglob("*.partial"))
    mtime = (out_dir / "experts" / "layer-000.bin").stat().st_mtime_ns
    code, out = run("convert", src, "-o", out_dir)
    assert code != 0 and "interrupted conversion (pass --resume" in out
    monkeypatch.setattr(pipeline, "expert_block", real)
    code, out = run("convert", src, "-o", out_dir, "--resume")
    assert code == 0, out
    assert (out_dir / "experts" / "layer-000.bin").stat().st_mtime_ns == mtime  # layer 0 was kept
    with open_pack(out_dir) as p:
        p.verify()
    assert not (out_dir / ".moestream-work").exists()


def test_resume_redoes_a_corrupt_finished_layer(src, tmp_path, monkeypatch):
    from moestream.convert import pipeline

    real = pipeline.expert_block
    monkeypatch.setattr(
        pipeline,
        "expert_block",
        lambda s, x, e, *a: (_ for _ in ()).throw(KeyboardInterrupt) if x.layer == 1 else real(s, x, e, *a),
    )
    out_dir = tmp_path / "p"
    run("convert", src, "-o", out_dir)
    f = out_dir / "experts" / "layer-000.bin"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    monkeypatch.setattr(pipeline, "expert_block", real)
    assert run("convert", src, "-o", out_dir, "--resume")[0] == 0
    with open_pack(out_dir) as p:
        p.verify()  # the corrupt layer was converted again


def test_dry_run_writes_nothing(src, tmp_path):
    code, out = run("convert", src, "-o", tmp_path / "out", "--bits", "2", "--dry-run")
    assert code == 0 and "bytes read per token at top-4" in out and "2-bit g64 (clip)" in out
    assert not (tmp_path / "out").exists()


def test_hub_id_source(src, tmp_path, monkeypatch):
    import huggingface_hub

    seen = {}

    def fake_download(repo_id, revision=None, allow_patterns=None, **kw):
        seen.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        snap = tmp_path / "cache" / "abc123"
        shutil.copytree(src, snap)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    code, out = run("convert", "Qwen/Qwen3.5-Tiny", "--revision", "v1", "-o", tmp_path / "out")
    assert code == 0, out
    assert seen["repo_id"] == "Qwen/Qwen3.5-Tiny" and seen["revision"] == "v1"
    assert "*.safetensors" in seen["allow_patterns"] and "config.json" in seen["allow_patterns"]
    src_meta = open_pack(tmp_path / "out").manifest.source
    assert src_meta["kind"] == "hub" and src_meta["repo_id"] == "Qwen/Qwen3.5-Tiny" and src_meta["commit"] == "abc123"
    code, out = run("convert", "not a repo id!", "-o", tmp_path / "o2")
    assert code != 0 and "no such folder, and not a hub id" in out


def test_keep_mtp_stores_the_head(tmp_path):
    checkpoints = pytest.importorskip("checkpoints")
    from moestream.layouts import SafetensorsReader

    folder = checkpoints.save_hub_fused(tmp_path / "hub", mtp=True)
    code, out = run("convert", folder, "-o", tmp_path / "drop")
    assert code == 0 and not any(k.startswith("mtp.") for k in open_pack(tmp_path / "drop").manifest.resident_tensors)
    code, out = run("convert", folder, "-o", tmp_path / "keep", "--keep-mtp")
    assert code == 0, out
    m = open_pack(tmp_path / "keep").manifest
    mtp = {k: t for k, t in m.resident_tensors.items() if k.startswith("mtp.")}
    assert mtp and all(t.file == "resident/mtp.safetensors" for t in mtp.values())
    with SafetensorsReader(tmp_path / "keep" / "resident" / "mtp.safetensors") as r:
        assert any(k.endswith(".scales") for k in r.tensors)  # its linears are quantized like the rest


def test_dimension_not_divisible_by_32_fails_naming_it(tmp_path):
    src = write_tiny_checkpoint(tmp_path / "src", tiny_config(**{**SMALL, "moe_intermediate_size": 48}))
    code, out = run("convert", src, "-o", tmp_path / "out")
    assert_clean_failure(
        code, out, "layer 0 experts down_proj (intermediate 48): not divisible by group size 64 or 32", tmp_path / "out"
    )
    assert run("convert", src, "-o", tmp_path / "out16", "--bits", "16")[0] == 0  # unquantized needs no groups
