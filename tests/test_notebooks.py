"""The notebooks run headlessly, top to bottom, on the embedded demo model (a failing cell fails).

The model is the notebooks' MODEL parameter, read from the environment variable RUDALLE_PIPE_MODEL;
these tests set it to ``demo`` (override with RUDALLE_PIPE_NOTEBOOK_MODEL, e.g. a pipeline directory).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
spec = importlib.util.spec_from_file_location("build_notebooks", NOTEBOOKS / "build.py")
build_notebooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_notebooks)


def _cells(nb) -> list[tuple[str, str]]:
    return [(c["cell_type"], c["source"]) for c in nb["cells"]]


@pytest.mark.parametrize("name", sorted(build_notebooks.NOTEBOOKS))
def test_committed_notebook_matches_its_builder(name):
    import nbformat

    committed = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert _cells(committed) == _cells(build_notebooks.build(name)), f"run python notebooks/build.py ({name})"
    assert all(not c.get("outputs") for c in committed["cells"] if c["cell_type"] == "code")  # stored clean
    assert "colab.research.google.com/assets/colab-badge.svg" in committed["cells"][0]["source"]
    assert any("pip\", \"install\"" in c["source"] and "git+https://github.com/" in c["source"]
               for c in committed["cells"])


MODEL = os.environ.get("RUDALLE_PIPE_NOTEBOOK_MODEL", "demo")


def _run(name: str, tmp_path: Path, monkeypatch) -> str:
    """Execute notebook ``name`` in ``tmp_path``; return everything its cells printed."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("RUDALLE_PIPE_MODEL", MODEL)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the kernel runs in tmp_path: put this checkout first, so its package runs, not another install
    paths = [str(NOTEBOOKS.parent), os.environ.get("PYTHONPATH")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.write(nb, tmp_path / name)  # the executed copy, for a look when a test fails
    text = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("name") == "stdout":
                text.append(output["text"])
    return "".join(text)


def _images_shown(nb_path: Path) -> int:
    nb = json.loads(nb_path.read_text())
    return sum("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))


@pytest.mark.slow
def test_quickstart_runs(tmp_path, monkeypatch):
    printed = _run("quickstart.ipynb", tmp_path, monkeypatch)
    assert f"model: {MODEL}, device: cpu" in printed
    assert "upscaled to (256, 256)" in printed
    assert len(list((tmp_path / "quickstart_out").glob("image_*.png"))) == 4
    assert _images_shown(tmp_path / "quickstart.ipynb") == 3  # candidates, best 4, upscaled


@pytest.mark.slow
def test_demo_offline_runs(tmp_path, monkeypatch):
    printed = _run("demo_offline.ipynb", tmp_path, monkeypatch)
    assert printed.count("all attributes right in") == 8
    ranks = re.findall(r"^\s*\d+\. candidate\s+\d+\s+score (-?[\d.]+)", printed, re.M)
    assert len(ranks) == 16 and [float(s) for s in ranks] == sorted((float(s) for s in ranks), reverse=True)
    assert "x4 of the best 4" in printed


@pytest.mark.slow
def test_finetune_runs_and_lowers_the_loss(tmp_path, monkeypatch):
    printed = _run("finetune.ipynb", tmp_path, monkeypatch)
    assert re.search(r"LoRA r=16 attention\+MLP, checkpointing\s+\d+\.\d M\s+\d+\.\d\s+fits", printed)
    before, after = map(float, re.search(r"loss on the pictures ([\d.]+) -> ([\d.]+)", printed).groups())
    assert after < before
    assert (tmp_path / "finetune_run" / "final" / "model.safetensors").is_file()
    assert "after: colour right" in printed


@pytest.mark.slow
def test_image_prompts_runs_and_checks_its_results(tmp_path, monkeypatch):
    printed = _run("image_prompts.ipynb", tmp_path, monkeypatch)  # its cells assert kept codes and pixels
    assert "kept 16 of 64 codes; input, then 4 results" in printed  # the top quarter of the 8x8 grid
    drawn = re.search(r"drawn: (\[.*\])", printed).group(1)
    assert drawn.count("маленький жёлтый квадрат снизу / серый") >= 3  # the new caption, under the kept top
    assert re.search(r"filled in: \[('круг', ){3}'круг'\]", printed)  # the object redrawn in the hole
    assert "panoramas of 160x64 px (4 codes added per step, 3 steps)" in printed  # 64 + 3 * 32 px
    assert _images_shown(tmp_path / "image_prompts.ipynb") == 4
