"""The whole chain's models in one object: :func:`load_pipeline` and :func:`save_pipeline`.

A pipeline is a tokenizer, a generator and a VQGAN, plus optionally a CLIP reranker and a
Real-ESRGAN upscaler. It loads from a registered name (the Hub checkpoints of the original) or from a
*pipeline directory* written by :func:`save_pipeline`::

    pipeline.json               {"format": "rudalle_pipe.pipeline", "version": 1, "name": ...,
                                 "vocabulary": [words...]}   (optional: the words the generator
                                 was trained on; see YTTMTokenizer.vocabulary)
    tokenizer/bpe.model         YouTokenToMe BPE text format
    dalle/                      config.json + model.safetensors   (DalleModel.save_pretrained)
    vae/                        config.json + model.safetensors   (model_type "vqgan")
    clip/                       open_clip_config.json + open_clip_model.safetensors (optional)
    upscaler/                   config.json + model.safetensors   (model_type "rrdbnet", optional)

The stages themselves stay plain functions (``generate_images``, ``cherry_pick_by_clip``,
``super_resolution``); a pipeline only carries their models.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .dalle import DalleModel
from .files import atomic_directory, atomic_write, resolve_inside
from .hub import load_pretrained, read_json, save_pretrained, snapshot_sandbox
from .registry import list_pretrained, local_folder

logger = logging.getLogger(__name__)

__all__ = ["Pipeline", "load_pipeline", "save_pipeline", "list_pipelines", "resolve_pipeline", "BUNDLED_DIR"]

FORMAT = "rudalle_pipe.pipeline"
BUNDLED_DIR = Path(__file__).parent / "weights"  # pipelines shipped inside the package (e.g. "demo")


@dataclass
class Pipeline:
    """The models of one text-to-image chain.

    tokenizer: a :class:`rudalle_pipe.YTTMTokenizer`.
    dalle: a :class:`rudalle_pipe.DalleModel`.
    vae: a :class:`rudalle_pipe.vae.VQGAN` whose codebook matches the generator's image vocabulary.
    clip: a :class:`rudalle_pipe.clip.ClipBundle` for reranking, or None.
    upscaler: a Real-ESRGAN ``RRDBNet`` (``.scale`` 2, 4 or 8), or None.
    name: where it came from (a registered name or a directory).
    """

    tokenizer: Any
    dalle: DalleModel
    vae: nn.Module
    clip: Optional[Any] = None
    upscaler: Optional[nn.Module] = None
    name: str = ""


def _bundled() -> dict[str, Path]:
    if not BUNDLED_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(BUNDLED_DIR.iterdir()) if (p / "pipeline.json").is_file()}


def list_pipelines() -> list[str]:
    """Names :func:`load_pipeline` accepts: bundled pipelines first, then the Hub generators."""
    return [*_bundled(), *list_pretrained("dalle")]


def load_pipeline(
    name: str | os.PathLike = "Malevich",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    clip: bool = True,
    upscaler: bool | str = True,
) -> Pipeline:
    """Load a whole chain.

    Args:
        name: a bundled pipeline (``"demo"``, no network needed), a Hub generator preset
            (``"Malevich"``, ...; the tokenizer, Sber VQGAN, the default multilingual CLIP and
            Real-ESRGAN come with it), or a directory written by :func:`save_pipeline`.
        device: where every model goes.
        dtype: the generator's precision; the VQGAN, CLIP and upscaler stay in fp32.
        cache_dir: Hugging Face cache for Hub downloads.
        clip: load the reranker.
        upscaler: load the upscaler; for Hub presets a name (``"x2"``, ``"x4"``, ``"x8"``), True
            meaning ``"x4"``.
    """
    key = str(name)
    kind, directory = resolve_pipeline(key)
    if kind == "hub":
        return _load_hub(key, device=device, dtype=dtype, cache_dir=cache_dir, clip=clip, upscaler=upscaler)
    return _load_dir(directory, key, device=device, dtype=dtype, clip=clip, upscaler=bool(upscaler))


def resolve_pipeline(name: str, *, what: str = "pipeline") -> tuple[str, Optional[Path]]:
    """Where ``name`` points, without loading anything: ``("bundled", dir)``, ``("directory", dir)``
    or ``("hub", None)`` for a generator preset. ``ValueError`` (calling it a ``what``) listing the
    valid names otherwise.

    An explicit path wins over a bundled pipeline or Hub preset of the same name: ``./demo``, any
    name with a path separator, or an existing folder holding ``pipeline.json`` (a warning says so
    when a bundled or Hub name is shadowed). ``save_pipeline(p, "demo")`` then
    ``load_pipeline("demo")`` loads ``./demo``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty name or path, got {name!r}")
    bundled = _bundled()
    folder = local_folder(name, "pipeline.json", registered=[*bundled, *list_pretrained("dalle")], what=what)
    if folder is not None:
        if not (folder / "pipeline.json").is_file():
            hint = "a directory without pipeline.json" if folder.is_dir() else "not an existing directory"
            raise ValueError(f"{what} {name!r} is a path, but {hint}: pass a folder written by save_pipeline, "
                             f"or one of the names {', '.join(list_pipelines())}")
        return "directory", folder
    if name in bundled:
        return "bundled", bundled[name]
    if name in list_pretrained("dalle"):
        return "hub", None
    hint = f" ({name} is a directory without pipeline.json)" if Path(name).is_dir() else ""
    raise ValueError(
        f"unknown {what} {name!r}{hint}. Available: {', '.join(list_pipelines())}, or a directory written "
        f"by save_pipeline (one holding pipeline.json)"
    )


def _load_hub(name: str, *, device, dtype, cache_dir, clip: bool, upscaler: bool | str) -> Pipeline:
    from .loader import get_rudalle_model, get_tokenizer, get_vae

    pipe = Pipeline(
        tokenizer=get_tokenizer(cache_dir=cache_dir),
        dalle=get_rudalle_model(name, device=device, dtype=dtype, cache_dir=cache_dir),
        vae=get_vae(device=device, cache_dir=cache_dir),
        name=name,
    )
    if clip:
        from .clip import get_clip

        pipe.clip = get_clip(device=device, cache_dir=cache_dir)
    if upscaler:
        from .realesrgan import get_realesrgan

        pipe.upscaler = get_realesrgan("x4" if upscaler is True else upscaler, device=device, cache_dir=cache_dir)
    return pipe


def _load_dir(directory: Path, name: str, *, device, dtype, clip: bool, upscaler: bool) -> Pipeline:
    """Load a pipeline folder; every file it holds must resolve inside it (symlinks included)."""
    from .tokenizer import YTTMTokenizer, check_word_list
    from .vae import VQGAN, VQGANConfig

    sandbox = snapshot_sandbox(directory)

    def inside(part: str) -> Path:
        return resolve_inside(directory, part, what=f"pipeline folder {directory}", sandbox=sandbox)

    meta = read_json(inside("pipeline.json"), what="pipeline description")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{directory / 'pipeline.json'} is not a rudalle_pipe pipeline (format {found!r})")
    vocabulary = meta.get("vocabulary")
    if vocabulary is not None:  # checked before any weights load
        vocabulary = check_word_list(vocabulary, what=f"{directory / 'pipeline.json'} 'vocabulary'")
    pipe = Pipeline(
        tokenizer=YTTMTokenizer.from_file(inside("tokenizer/bpe.model")),
        dalle=DalleModel.from_pretrained(inside("dalle"), device=device, dtype=dtype, sandbox=sandbox),
        vae=load_pretrained(VQGAN, VQGANConfig, inside("vae"), model_type="vqgan", device=device, sandbox=sandbox),
        name=str(meta.get("name", name)),
    )
    pipe.tokenizer.vocabulary = vocabulary
    if clip and (directory / "clip").is_dir():
        from .clip import get_clip

        pipe.clip = get_clip(f"local-dir:{inside('clip')}", None, device=device, sandbox=sandbox)
    if upscaler and (directory / "upscaler").is_dir():
        from .realesrgan import RRDBNet, RRDBNetConfig

        pipe.upscaler = load_pretrained(RRDBNet, RRDBNetConfig, inside("upscaler"), model_type="rrdbnet",
                                        device=device, sandbox=sandbox)
    return pipe


def save_pipeline(pipe: Pipeline, directory: str | os.PathLike, *, clip_model_cfg: dict | None = None) -> Path:
    """Write ``pipe`` as a pipeline directory (see the module docstring); refuses to overwrite.

    The folder is built under a temporary name beside ``directory`` and renamed into place when
    complete (``pipeline.json`` written last), so an interrupt or a full disk at any write leaves no
    ``directory`` (or the empty one there was) and the same call can be repeated; the result is
    byte-identical to an uninterrupted save.

    Args:
        clip_model_cfg: open_clip's model config of ``pipe.clip``; needed only for an architecture
            that open_clip does not know by name.

    Raises:
        FileExistsError: ``directory`` exists and is not empty.
    """
    directory = Path(directory)
    if directory.exists() and not (directory.is_dir() and not any(directory.iterdir())):
        raise FileExistsError(f"{directory} is not empty; choose a new directory")
    with atomic_directory(directory) as tmp:
        (tmp / "tokenizer").mkdir()
        pipe.tokenizer.save(tmp / "tokenizer" / "bpe.model")
        pipe.dalle.save_pretrained(tmp / "dalle")
        save_pretrained(pipe.vae, pipe.vae.config, tmp / "vae", model_type="vqgan")
        if pipe.clip is not None:
            from .clip import save_clip

            save_clip(pipe.clip, tmp / "clip", clip_model_cfg)
        if pipe.upscaler is not None:
            save_pretrained(pipe.upscaler, pipe.upscaler.config, tmp / "upscaler", model_type="rrdbnet")
        meta = {"format": FORMAT, "version": 1, "name": pipe.name or directory.name}
        vocabulary = getattr(pipe.tokenizer, "vocabulary", None)
        if vocabulary is not None:
            meta["vocabulary"] = sorted(vocabulary)
        atomic_write(tmp / "pipeline.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return directory
