"""Start-up: what importing the package and printing help pull in, and the meta-device build of the loaders.

Times are measured by benchmarks/first_command.py; these tests check the properties that make them short.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import rudalle_pipe
from rudalle_pipe.hub import on_meta

NO_TORCH = """
import sys
{body}
heavy = [m for m in ("torch", "numpy", "open_clip", "transformers", "accelerate", "PIL") if m in sys.modules]
print("HEAVY:" + ",".join(heavy))
"""


def run_clean(body: str) -> str:
    """Run ``body`` in a fresh interpreter and return the heavy modules it left imported."""
    done = subprocess.run([sys.executable, "-c", NO_TORCH.format(body=body)], capture_output=True, text=True,
                          check=True)
    return done.stdout.rsplit("HEAVY:", 1)[1].strip()


def test_import_and_help_do_not_import_torch():
    assert run_clean("import rudalle_pipe") == ""
    for argv in (["--help"], ["generate", "--help"], ["outpaint", "--help"], ["finetune", "--help"],
                 ["models", "--help"]):
        body = (f"sys.argv = ['rudalle-pipe', *{argv!r}]\nfrom rudalle_pipe.cli import main\n"
                "try:\n    main()\nexcept SystemExit:\n    pass")
        assert run_clean(body) == "", f"rudalle-pipe {' '.join(argv)} imported heavy modules"


def test_every_public_name_resolves():
    for name in rudalle_pipe.__all__:
        assert getattr(rudalle_pipe, name) is not None, name
        assert name in dir(rudalle_pipe)
    assert rudalle_pipe.shapes.__name__ == "rudalle_pipe.shapes"
    assert callable(rudalle_pipe.show)  # a function named like its module
    from rudalle_pipe.generation import generate_images

    assert rudalle_pipe.generate_images is generate_images
    with pytest.raises(AttributeError, match="no attribute 'generate_image'"):
        rudalle_pipe.generate_image  # noqa: B018 (a typo of a real name)


def test_show_stays_the_function_after_its_module_is_imported():
    body = ("from rudalle_pipe.show import image_grid\nimport rudalle_pipe\n"
            "assert callable(rudalle_pipe.show) and rudalle_pipe.show.__name__ == 'show'")
    subprocess.run([sys.executable, "-c", body], check=True)


def test_on_meta_skips_initialisation_and_restores_it():
    original = torch.nn.init.normal_
    with on_meta():
        layer = torch.nn.Linear(4, 3)
        assert torch.nn.init.normal_ is not original
    assert layer.weight.is_meta
    assert torch.nn.init.normal_ is original
    with pytest.raises(RuntimeError, match="boom"):
        with on_meta():
            raise RuntimeError("boom")
    assert torch.nn.init.normal_ is original
    assert torch.nn.Linear(4, 3).weight.std() > 0  # initialisation works again


def test_masks_are_built_on_the_cpu_under_meta():
    from rudalle_pipe.masks import build_masks

    with torch.device("meta"):
        masks = build_masks(4, 3, kernel=3, hf_version="v3")
    assert all(m.device.type == "cpu" and m.dtype == torch.bool for m in masks.values())
    assert torch.equal(masks["row"], build_masks(4, 3, kernel=3, hf_version="v3")["row"])
