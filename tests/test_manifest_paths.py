"""Every path a manifest names stays inside its pack (issue 24): packs are shared and downloaded, so a
manifest naming ``/etc/hostname``, ``../../x`` or a symlink leaving the pack is refused in one line,
before anything is opened."""

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from moestream.layouts import Manifest, PackError, open_pack
from moestream.main import cli


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from moestream.convert import convert
    from moestream.convert.tiny import tiny_config, write_tiny_checkpoint

    d = tmp_path_factory.mktemp("paths")
    src = write_tiny_checkpoint(
        d / "src",
        tiny_config(
            hidden_size=64,
            num_experts=4,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            vocab_size=128,
            shared_expert_intermediate_size=32,
        ),
    )
    convert(str(src), d / "pack", bits=4, alignment=4096)
    return d / "pack"


@pytest.fixture
def pack(built, tmp_path):
    """A fresh copy per test, inside ``tmp_path/packs`` so that ``tmp_path`` itself is outside it."""
    p = tmp_path / "packs" / "pack"
    shutil.copytree(built, p)
    return p


def _edit(pack, change) -> None:
    d = json.loads((pack / "manifest.json").read_text())
    change(d)
    (pack / "manifest.json").write_text(json.dumps(d))


def _refused(pack) -> str:
    with pytest.raises(PackError) as e:
        open_pack(pack)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(pack / "manifest.json"))
    return msg


def test_absolute_path_is_refused_even_when_the_file_is_a_valid_copy(pack, tmp_path):
    # An exact copy outside the pack: size and header agree, so only the path rule can refuse it.
    outside = tmp_path / "outside.bin"
    shutil.copyfile(pack / "experts" / "layer-000.bin", outside)
    _edit(pack, lambda d: d["experts"][0].update(file=str(outside)))
    msg = _refused(pack)
    assert f"expert file {str(outside)!r}: absolute path" in msg


@pytest.mark.parametrize("entry", ["expert", "resident", "extra"])
def test_dotdot_escape_is_refused_for_every_kind_of_file(pack, tmp_path, entry):
    name = "../../outside.bin"
    shutil.copyfile(pack / "experts" / "layer-000.bin", tmp_path / "outside.bin")
    if entry == "expert":
        _edit(pack, lambda d: d["experts"][0].update(file=name))
    elif entry == "resident":
        _edit(pack, lambda d: d["resident_files"][0].update(file=name))
    else:
        assert "config.json" in Manifest.load(pack).extra_files
        _edit(pack, lambda d: d.update(extra_files=[name if f == "config.json" else f for f in d["extra_files"]]))
    msg = _refused(pack)
    assert f"{name!r}: leaves the pack folder" in msg


@pytest.mark.parametrize(
    "name", ["/etc/hostname", "../../../etc/passwd", "experts/../../x", "..\\..\\x", "C:\\x", "\\\\host\\share\\x", ""]
)
def test_names_alone_are_checked_without_the_folder(built, name):
    d = json.loads((built / "manifest.json").read_text())
    d["experts"][0]["file"] = name
    with pytest.raises(PackError, match=r"^manifest\.json: expert file "):
        Manifest.from_dict(d)


def test_symlink_leaving_the_pack_is_refused(pack, tmp_path):
    f = pack / "experts" / "layer-001.bin"
    shutil.move(f, tmp_path / "outside.bin")
    f.symlink_to(tmp_path / "outside.bin")
    msg = _refused(pack)
    assert "'experts/layer-001.bin'" in msg and "outside the pack folder" in msg
    # A symlinked folder leaving the pack, too.
    shutil.move(pack / "experts", tmp_path / "experts")
    (pack / "experts").symlink_to(tmp_path / "experts")
    assert "outside the pack folder" in _refused(pack)


def test_symlinks_inside_the_pack_and_a_symlinked_pack_folder_still_open(pack, tmp_path):
    f = pack / "experts" / "layer-001.bin"
    os.replace(f, pack / "moved.bin")
    f.symlink_to(os.path.join("..", "moved.bin"))
    link = tmp_path / "link"
    link.symlink_to(pack)  # e.g. ~/packs/x -> /Volumes/SSD/x
    for p in (pack, link):
        with open_pack(p) as opened:
            opened.verify()


def test_verify_cli_prints_one_error_line(pack):
    _edit(pack, lambda d: d["experts"][0].update(file="../../../etc/passwd"))
    r = CliRunner().invoke(cli, ["verify", str(pack)])
    assert r.exit_code == 1 and not isinstance(r.exception, PackError)
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output
    assert "manifest.json" in lines[0] and "'../../../etc/passwd'" in lines[0]
