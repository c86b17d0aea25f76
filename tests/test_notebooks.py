"""Every notebook runs top to bottom (nbclient), so none can rot; each is stored without outputs.

They use ``$MOESTREAM_NOTEBOOK_SRC``: the trained fixture in ../shared where it exists, else a tiny
random checkpoint built here (the notebooks' figures are then about a random model, but every cell
still runs)."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs the test extras: nbformat, nbclient, ipykernel")
nbclient = pytest.importorskip("nbclient", reason="needs the test extras: nbformat, nbclient, ipykernel")

from moestream.convert.tiny import tiny_config, write_tiny_checkpoint  # noqa: E402

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
TRAINED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "trained-tiny-qwen3_5-moe"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    # MOESTREAM_NB_FALLBACK=1 runs them on the random model even where the fixture exists (as CI does).
    if (TRAINED / "model.safetensors.index.json").exists() and not os.environ.get("MOESTREAM_NB_FALLBACK"):
        return TRAINED
    cfg = tiny_config(
        hidden_size=128,
        num_experts=8,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        vocab_size=512,
        shared_expert_intermediate_size=64,
    )
    return write_tiny_checkpoint(tmp_path_factory.mktemp("nbsrc"), cfg)


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"pack_anatomy.ipynb", "routing.ipynb", "quant_error.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, source, tmp_path, monkeypatch):
    monkeypatch.setenv("MOESTREAM_NOTEBOOK_SRC", str(source))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    # Run in a scratch folder (the notebooks write packs and figures next to themselves).
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute(env=dict(os.environ))
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")  # it printed something
