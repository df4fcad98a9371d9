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
    repo = build_notebooks.REPO_URL
    owner_name = repo.removeprefix("https://github.com/")
    assert f"colab.research.google.com/github/{owner_name}/blob/main/notebooks/{name}" in committed["cells"][0]["source"]
    install = [c["source"] for c in committed["cells"] if '"pip", "install"' in c["source"]]
    assert len(install) == 1 and f'"{build_notebooks.PYPI_NAME}[train]"' in install[0]  # PyPI first, by name
    assert f"git+{repo}" in install[0]  # then the repository
    # Colab asks for a GPU only where the notebook can use one
    assert committed["metadata"].get("accelerator") == (None if name == "demo_offline.ipynb" else "GPU")


def test_one_repository_url_for_badges_install_cells_and_setup_cfg():
    """REPO_URL in notebooks/build.py is the one place to change where the project lives."""
    import configparser

    config = configparser.ConfigParser()
    config.read(NOTEBOOKS.parent / "setup.cfg", encoding="utf-8")
    assert config["metadata"]["url"] == build_notebooks.REPO_URL, "run python notebooks/build.py"
    assert build_notebooks.PYPI_NAME == config["metadata"]["name"] == "rudalle-pipe"
    text = (NOTEBOOKS.parent / "setup.cfg").read_text(encoding="utf-8")
    moved = build_notebooks.setup_cfg_text(text.replace(build_notebooks.REPO_URL, "https://example.org/old"))
    assert moved == text  # build.py puts REPO_URL back into setup.cfg
    sources = "".join(c["source"] for name in build_notebooks.NOTEBOOKS for c in build_notebooks.build(name).cells)
    assert set(re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", sources)) == {build_notebooks.REPO_URL}


@pytest.mark.parametrize("on_pypi", [True, False])
def test_install_cell_uses_pypi_then_the_repository(on_pypi, monkeypatch, capsys):
    """The install cell, run where the package is missing: PyPI by name; the repository only when PyPI
    has no such package."""
    import importlib.util
    import subprocess

    calls = []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd[-1]) or (0 if on_pypi else 1))
    monkeypatch.setattr(subprocess, "check_call", lambda cmd: calls.append(cmd[-1]) or 0)
    exec(build_notebooks.INSTALL, {})
    name, repo = build_notebooks.PYPI_NAME, build_notebooks.REPO_URL
    assert calls == ([f"{name}[train]"] if on_pypi else [f"{name}[train]", f"{name}[train] @ git+{repo}"])
    assert ("not on PyPI" in capsys.readouterr().out) == (not on_pypi)


@pytest.mark.parametrize("case", ["no GPU", "offline", "Hub silent", "Malevich"])
def test_model_choice_says_why_it_falls_back_to_the_demo(case, monkeypatch, capsys):
    import huggingface_hub
    import torch
    from huggingface_hub import constants

    monkeypatch.delenv("RUDALLE_PIPE_MODEL", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: case != "no GPU")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", case == "offline")

    class Api:
        def model_info(self, repo_id, timeout):
            if case == "Hub silent":
                raise TimeoutError("read timed out")

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    namespace: dict = {}
    exec(build_notebooks.CHOOSE, namespace)
    printed = capsys.readouterr().out
    reason = {"no GPU": "no GPU", "offline": "HF_HUB_OFFLINE is set",
              "Hub silent": "the Hugging Face Hub did not answer (TimeoutError: read timed out)"}.get(case)
    assert namespace["MODEL"] == ("Malevich" if reason is None else "demo")
    assert ("using the embedded demo model, not Malevich: " + reason in printed) if reason else "demo" not in printed


@pytest.mark.parametrize("name", sorted(build_notebooks.NOTEBOOKS))
def test_every_import_is_used(name):
    """No cell imports a name that no cell of the notebook uses."""
    import ast

    trees = [ast.parse(c.source) for c in build_notebooks.build(name).cells if c.cell_type == "code"]
    imported, used = set(), set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.Name):
                used.add(node.id)
    assert imported <= used, f"{name} imports {sorted(imported - used)} without using them"


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
def test_finetune_runs_lowers_the_loss_and_a_rerun_keeps_the_run(tmp_path, monkeypatch):
    printed = _run("finetune.ipynb", tmp_path, monkeypatch)
    assert re.search(r"LoRA r=16 attention\+MLP, checkpointing\s+\d+\.\d M\s+\d+\.\d\s+fits", printed)
    assert re.search(r"finetune_example_unzipped/finetune_example \['00.png'", printed)  # through the zip
    before, after = map(float, re.search(r"loss on the pictures ([\d.]+) -> ([\d.]+)", printed).groups())
    assert after < before
    weights = tmp_path / "finetune_run" / "final" / "model.safetensors"
    first = (weights.read_bytes(), weights.stat().st_mtime_ns, (tmp_path / "finetune_run" / "loss_log.csv").read_bytes())
    assert "after: colour right" in printed
    # running the notebook again keeps the finished run: it loads the result instead of deleting or retraining it
    again = _run("finetune.ipynb", tmp_path, monkeypatch)
    assert f"finetune_run has finished: loaded finetune_run/final; loss on the pictures {before:.3f} -> {after:.3f}" in again
    assert (weights.read_bytes(), weights.stat().st_mtime_ns,
            (tmp_path / "finetune_run" / "loss_log.csv").read_bytes()) == first
    assert again.split("after: colour right")[1] == printed.split("after: colour right")[1]  # the same model


@pytest.mark.slow
def test_image_prompts_runs_and_checks_its_results(tmp_path, monkeypatch):
    printed = _run("image_prompts.ipynb", tmp_path, monkeypatch)  # its cells assert kept codes and pixels
    assert "kept 16 of 64 codes; input, then 4 results" in printed  # the top quarter of the 8x8 grid
    drawn = re.search(r"drawn: (\[.*\])", printed).group(1)
    assert drawn.count("маленький жёлтый квадрат снизу / серый") >= 3  # the new caption, under the kept top
    assert re.search(r"filled in: \[('круг', ){3}'круг'\]", printed)  # the object redrawn in the hole
    assert "panoramas of 160x64 px (4 codes added per step, 3 steps)" in printed  # 64 + 3 * 32 px
    assert _images_shown(tmp_path / "image_prompts.ipynb") == 4
