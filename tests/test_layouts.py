"""The pack format library: safetensors streaming I/O against the safetensors package, the writer
state machines, and manifest / reader validation."""

import json

import numpy as np
import pytest

from moestream.layouts import (
    ExpertLayerWriter,
    Manifest,
    PackError,
    SafetensorsError,
    SafetensorsReader,
    SafetensorsWriter,
    expert_block_layout,
    open_pack,
)
from moestream.layouts.expert_file import HEADER


def test_safetensors_writer_loads_with_reference_reader(tmp_path):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((5, 7)).astype(np.float32),
        "b": rng.integers(0, 2**32, (3, 4), dtype=np.uint32),
        "c": rng.standard_normal(9).astype(np.float16),
        "empty": np.zeros((0, 4), np.float32),
    }
    w = SafetensorsWriter(tmp_path / "x.safetensors", metadata={"format": "mlx"})
    for k, v in tensors.items():
        w.declare(k, {"float32": "F32", "uint32": "U32", "float16": "F16"}[v.dtype.name], v.shape)
    w.begin()
    w.write("a", tensors["a"][:2])  # in row chunks
    w.write("a", tensors["a"][2:])
    w.write("b", tensors["b"])
    w.write("c", tensors["c"])
    w.finish()
    back = load_file(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        assert np.array_equal(back[k], v), k
    with SafetensorsReader(tmp_path / "x.safetensors") as r:
        assert np.array_equal(r.read_rows("a", 1, 4), tensors["a"][1:4])
        assert r.metadata == {"format": "mlx"}


def test_safetensors_reader_reads_bf16_rows_like_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    t = torch.randn(6, 3, 8).to(torch.bfloat16)
    save_file({"w": t}, tmp_path / "w.safetensors")
    with SafetensorsReader(tmp_path / "w.safetensors") as r:
        raw = r.read_rows("w", 2, 4)
    assert np.array_equal(raw, t[2:4].view(torch.int16).numpy().view(np.uint16))


def test_safetensors_writer_state_machine(tmp_path):
    w = SafetensorsWriter(tmp_path / "s.safetensors")
    w.declare("a", "F32", (2,))
    w.declare("b", "F32", (2,))
    with pytest.raises(RuntimeError, match="outside the writing state"):
        w.write("a", np.zeros(2, np.float32))
    w.begin()
    with pytest.raises(RuntimeError, match="declare"):
        w.declare("c", "F32", (1,))
    with pytest.raises(RuntimeError, match="a is next"):
        w.write("b", np.zeros(2, np.float32))
    w.write("a", np.zeros(2, np.float32))
    with pytest.raises(RuntimeError, match="not fully written"):
        w.finish()
    w.abort()
    assert not (tmp_path / "s.safetensors").exists() and not (tmp_path / "s.safetensors.partial").exists()


def test_safetensors_reader_rejects_truncated(tmp_path):
    from safetensors.numpy import save_file

    save_file({"a": np.ones((64, 64), np.float32)}, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-100])
    with pytest.raises(SafetensorsError, match=r"t\.safetensors: truncated: tensor a"):
        SafetensorsReader(tmp_path / "t.safetensors")
    (tmp_path / "t.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsError, match="truncated"):
        SafetensorsReader(tmp_path / "t.safetensors")


def _layer_writer(tmp_path, n=3, alignment=4096):
    comps, block = expert_block_layout(64, 32, 4, 64, 32, "bfloat16")
    return ExpertLayerWriter(tmp_path / "layer-000.bin", 0, n, comps, block, alignment), block


def test_expert_layer_writer_states_and_completeness(tmp_path):
    w, block = _layer_writer(tmp_path)
    with pytest.raises(RuntimeError, match="state new"):
        w.write_expert(0, np.zeros(block, np.uint8))
    w.open()
    w.write_expert(2, np.full(block, 2, np.uint8))  # any order
    with pytest.raises(RuntimeError, match="written twice"):
        w.write_expert(2, np.full(block, 2, np.uint8))
    with pytest.raises(RuntimeError, match="bytes, block is"):
        w.write_expert(1, np.zeros(block - 1, np.uint8))
    w.write_expert(0, np.zeros(block, np.uint8))
    with pytest.raises(RuntimeError, match=r"experts \[1\] of layer 0 were never written"):
        w.finish("experts/layer-000.bin")
    w.write_expert(1, np.ones(block, np.uint8))
    x = w.finish("experts/layer-000.bin")
    data = (tmp_path / "layer-000.bin").read_bytes()
    assert len(data) == x.file_size and x.stride % 4096 == 0 and x.offset % 4096 == 0
    for e in range(3):  # each expert's block lies at offset + e * stride
        assert data[x.offset + e * x.stride : x.offset + e * x.stride + block] == bytes([e]) * block
    assert data[:8] == b"MOESTRM\0" and len(HEADER.pack(b"MOESTRM\0", 1, 0, 0, 0, 0, 0, 0)) == HEADER.size


def test_block_layout_sizes_match_the_397b_figures():
    """One 397B expert (H 4096, I 1024): 7,077,888 B at 4-bit g64 and 3,932,160 B at 2-bit g64."""
    assert expert_block_layout(4096, 1024, 4, 64, 64, "bfloat16")[1] == 7_077_888
    assert expert_block_layout(4096, 1024, 2, 64, 64, "bfloat16")[1] == 3_932_160
    comps, _ = expert_block_layout(4096, 1024, 4, 64, 64, "bfloat16")
    gate, up = comps[0], comps[1]
    assert (gate.name, up.name) == ("gate_proj.weight", "up_proj.weight") and up.offset == gate.offset + gate.nbytes


def _small_pack(tmp_path):
    """A converted pack made from the tiny generator (no torch needed)."""
    from moestream.convert import convert
    from moestream.convert.tiny import tiny_config, write_tiny_checkpoint

    src = write_tiny_checkpoint(
        tmp_path / "src",
        tiny_config(
            hidden_size=64,
            num_experts=4,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            vocab_size=128,
            shared_expert_intermediate_size=32,
        ),
    )
    convert(str(src), tmp_path / "pack", bits=4, alignment=4096)
    return tmp_path / "pack"


def test_reader_validates_before_use(tmp_path):
    pack = _small_pack(tmp_path)
    with open_pack(pack) as p:
        p.verify()
    manifest = json.loads((pack / "manifest.json").read_text())

    def broken(change) -> str:
        d = json.loads(json.dumps(manifest))
        change(d)
        (pack / "manifest.json").write_text(json.dumps(d))
        with pytest.raises(PackError) as e:
            open_pack(pack)
        (pack / "manifest.json").write_text(json.dumps(manifest))
        return str(e.value)

    assert "unsupported pack version 99" in broken(lambda d: d.update(version=99))
    assert "not a multiple of alignment" in broken(
        lambda d: d["experts"][0].update(stride=d["experts"][0]["stride"] + 512)
    )
    assert "lies past the end of the block" in broken(lambda d: d["experts"][0]["components"][-1].update(offset=10**6))
    # A short expert file: the error names the file, the layer and the first expert past the end.
    x = manifest["experts"][1]
    f = pack / x["file"]
    data = f.read_bytes()
    f.write_bytes(data[: x.get("offset", 0) + 2 * x["stride"] + x["stride"] // 2])  # into expert 2
    with pytest.raises(PackError, match=r"layer-001\.bin \(layer 1\): .* expert 2 and later lie past the end"):
        open_pack(pack)
    f.write_bytes(data)
    (pack / manifest["resident_files"][0]["file"]).unlink()
    with pytest.raises(PackError, match="missing resident file"):
        open_pack(pack)


def test_verify_names_the_corrupt_block(tmp_path):
    pack = _small_pack(tmp_path)
    m = Manifest.load(pack)
    x = m.experts[1]
    with open(pack / x.file, "r+b") as f:
        pos = x.expert_offset(2) + 100
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x01]))
    with open_pack(pack) as p, pytest.raises(PackError, match=r"layer-001\.bin: layer 1 expert 2: checksum mismatch"):
        p.verify()


def test_version_1_packs_still_load(tmp_path):
    """Packs written before format 2 (no component ``mode``, version 1 in manifest and file headers)
    open and compute the same logits."""
    import struct

    import mlx.core as mx
    import numpy as np

    from moestream.layouts.expert_file import HEADER
    from moestream.runtime.model.build import load_resident_model

    pack = _small_pack(tmp_path)
    x = mx.array([[1, 5, 9, 3]])
    model, p = load_resident_model(pack, dtype="float32")
    p.close()
    want = np.array(model(x))
    d = json.loads((pack / "manifest.json").read_text())
    d["version"] = 1
    for layer in d["experts"]:
        for c in layer["components"]:
            del c["mode"]
        with open(pack / layer["file"], "r+b") as f:  # the version field follows the 8-byte magic
            f.seek(8)
            f.write(struct.pack("<I", 1))
    assert HEADER.format.startswith("<8sI")
    (pack / "manifest.json").write_text(json.dumps(d))
    with open_pack(pack) as p:
        assert p.manifest.version == 1 and p.manifest.experts[0].components[0].mode == "affine"
        p.verify()
    model, p = load_resident_model(pack, dtype="float32")
    p.close()
    assert np.array_equal(np.array(model(x)), want)
