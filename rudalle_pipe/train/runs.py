"""What a finetuning run records about itself, so that a rerun can tell "resume" from "another run",
and the pipeline folder a finished run exports.

``out_dir/finetune.json`` (written atomically before the first step) holds::

    {"format": 2, "settings": {...FinetuneConfig...}, "pairs": N,
     "data_sha256": "...", "base_weights_sha256": "..."}

* ``data_sha256``: sha256 over every pair in order: the image's file name (not its folder, so a moved
  data folder still resumes) and file bytes (or, for a PIL image, its mode, size and pixels), and the
  caption's UTF-8 bytes.
* ``base_weights_sha256``: :func:`weights_digest` of the generator *before* training: sha256 over the
  state dict in sorted key order, each key with its dtype, shape and raw bytes. The cost is one pass
  over the weights at about 1 GB/s on one CPU core (measured: the tiny test generator, 0.25 MB, in
  0.5 ms; a 256 MB fp32 layer in 0.27 s), so about 3 s for Malevich in fp16 (2.6 GB) and 5 s in fp32,
  plus the copy from the GPU.

A rerun in the same ``out_dir`` that differs in the data, the base weights or a setting other than
``checkpoint_every``/``keep_checkpoints``/``log_every`` (``steps`` included: the learning-rate
schedule depends on it) is refused by :func:`check_record`, naming each difference.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from .. import files

logger = logging.getLogger(__name__)

__all__ = ["RECORD", "FREE_SETTINGS", "data_digest", "weights_digest", "make_record", "check_record",
           "write_record", "export_pipeline"]

RECORD = "finetune.json"
FORMAT = 2
FREE_SETTINGS = ("checkpoint_every", "keep_checkpoints", "log_every")  # may change when resuming
ADDED_SETTINGS = {"gradient_accumulation_steps": 1}  # settings added later: a record without one ran with this


def data_digest(pairs: Sequence[tuple[Any, str]]) -> str:
    """sha256 (hex) of the ``(image, caption)`` pairs, in order (see the module docstring)."""
    digest = hashlib.sha256()
    for image, caption in pairs:
        if isinstance(image, Image.Image):
            head, body = f"pil:{image.mode}:{image.size}", image.tobytes()
        else:
            path = Path(image)
            head, body = f"file:{path.name}", path.read_bytes()
        text = caption.encode("utf-8")
        digest.update(f"{head}:{len(body)}:{len(text)}\n".encode("utf-8"))
        digest.update(body)
        digest.update(text)
    return digest.hexdigest()


@torch.no_grad()
def weights_digest(module: torch.nn.Module) -> str:
    """sha256 (hex) of ``module.state_dict()``: keys sorted, each with dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    state = module.state_dict()
    for key in sorted(state):
        tensor = state[key].detach()
        digest.update(f"{key}:{str(tensor.dtype)}:{tuple(tensor.shape)}\n".encode("utf-8"))
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def make_record(settings: dict[str, Any], pairs: Sequence[tuple[Any, str]], base: torch.nn.Module) -> dict[str, Any]:
    """The ``finetune.json`` content of a run (JSON types only)."""
    return {"format": FORMAT, "settings": json.loads(json.dumps(settings)), "pairs": len(pairs),
            "data_sha256": data_digest(pairs), "base_weights_sha256": weights_digest(base)}


def check_record(out_dir: Path, record: dict[str, Any]) -> None:
    """Refuse to continue the run in ``out_dir`` with another ``record``.

    Raises:
        ValueError: ``finetune.json`` is missing, unreadable, of an older format, or differs; the
            message names every difference (settings as ``{name: (before, now)}``).
    """
    path = out_dir / RECORD
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{out_dir} holds a checkpoint but {path} cannot be read ({err}); choose another "
                         "out_dir") from None
    if not isinstance(before, dict) or before.get("format") != FORMAT:
        raise ValueError(f"{path} was written by an older rudalle_pipe and does not record the data and base "
                         "weights of the run; it cannot be resumed safely: choose another out_dir")
    old, new = before.get("settings") or {}, record["settings"]
    problems = []
    old = {**ADDED_SETTINGS, **old}
    changed = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v and k not in FREE_SETTINGS}
    if changed:
        problems.append(f"other settings {changed} (before, now)")
    if before.get("pairs") != record["pairs"] or before.get("data_sha256") != record["data_sha256"]:
        problems.append(f"other data ({before.get('pairs')} pairs, sha256 {str(before.get('data_sha256'))[:12]}... "
                        f"before; {record['pairs']} pairs, sha256 {record['data_sha256'][:12]}... now: the images, "
                        "their file names or the captions differ)")
    if before.get("base_weights_sha256") != record["base_weights_sha256"]:
        problems.append(f"other base weights (sha256 {str(before.get('base_weights_sha256'))[:12]}... before, "
                        f"{record['base_weights_sha256'][:12]}... now: another model, or another --dtype)")
    if problems:
        raise ValueError(f"{out_dir} holds a run with {'; '.join(problems)}; resume it with the same data, model "
                         "and settings, or choose another out_dir")


def write_record(out_dir: Path, record: dict[str, Any]) -> None:
    """Write ``out_dir/finetune.json`` atomically."""
    files.atomic_write(out_dir / RECORD, json.dumps(record, indent=2) + "\n")


def _copy_tree(source: Path, target: Path, *, skip: str | None = None) -> None:
    """Copy the regular files under ``source`` into the existing folder ``target`` (minus the top-level
    entry ``skip``). A symlink is followed only to a regular file inside ``source``; anything else
    (a link leading out, a folder link, a device, a FIFO) raises :class:`files.UnsafePathError` /
    ``ValueError``."""
    for root, dirs, names in os.walk(source):
        rel_root = Path(root).relative_to(source)
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if d != skip]
            names = [n for n in names if n != skip]
        for d in dirs:  # os.walk does not enter folder symlinks: refuse them rather than drop their files
            if (Path(root) / d).is_symlink():
                raise ValueError(f"pipeline folder {source}: {(rel_root / d).as_posix()} is a symlink to a folder; "
                                 "copy its files in instead")
        for name in names:
            rel = (rel_root / name).as_posix()
            path = files.resolve_inside(source, rel, what=f"pipeline folder {source}")
            if not path.resolve().is_file():
                raise ValueError(f"pipeline folder {source}: {rel} is not a regular file")
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / rel)


def export_pipeline(base_dir: Path, model_dir: Path, target: Path) -> Path:
    """Write ``target``: the pipeline folder ``base_dir`` with its ``dalle/`` replaced by ``model_dir``,
    built under a temporary name and renamed into place when complete (never a half pipeline)."""
    with files.atomic_directory(target) as tmp:
        _copy_tree(Path(base_dir), tmp, skip="dalle")
        (tmp / "dalle").mkdir()
        _copy_tree(Path(model_dir), tmp / "dalle")
    return target
