"""The whole chain's models in one object: :func:`load_pipeline` and :func:`save_pipeline`.

A pipeline is a tokenizer, a generator and a VQGAN, plus optionally a CLIP reranker and a
Real-ESRGAN upscaler. It loads from a registered name (the Hub checkpoints of the original) or from a
*pipeline directory* written by :func:`save_pipeline`::

    pipeline.json               {"format": "rudalle_pipe.pipeline", "version": 1, "name": ...}
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
from .hub import load_pretrained, save_pretrained
from .registry import list_pretrained

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
    valid names otherwise."""
    bundled = _bundled()
    if name in bundled:
        return "bundled", bundled[name]
    if (Path(name) / "pipeline.json").is_file():
        return "directory", Path(name)
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
    from .tokenizer import YTTMTokenizer
    from .vae import VQGAN, VQGANConfig

    meta = json.loads((directory / "pipeline.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory / 'pipeline.json'} is not a rudalle_pipe pipeline (format {meta.get('format')!r})")
    pipe = Pipeline(
        tokenizer=YTTMTokenizer.from_file(directory / "tokenizer" / "bpe.model"),
        dalle=DalleModel.from_pretrained(directory / "dalle", device=device, dtype=dtype),
        vae=load_pretrained(VQGAN, VQGANConfig, directory / "vae", model_type="vqgan", device=device),
        name=meta.get("name", name),
    )
    if clip and (directory / "clip").is_dir():
        from .clip import get_clip

        pipe.clip = get_clip(f"local-dir:{directory / 'clip'}", None, device=device)
    if upscaler and (directory / "upscaler").is_dir():
        from .realesrgan import RRDBNet, RRDBNetConfig

        pipe.upscaler = load_pretrained(RRDBNet, RRDBNetConfig, directory / "upscaler", model_type="rrdbnet",
                                        device=device)
    return pipe


def save_pipeline(pipe: Pipeline, directory: str | os.PathLike, *, clip_model_cfg: dict | None = None) -> Path:
    """Write ``pipe`` as a pipeline directory (see the module docstring); refuses to overwrite.

    Args:
        clip_model_cfg: open_clip's model config of ``pipe.clip``; needed only for an architecture
            that open_clip does not know by name.
    """
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty; choose a new directory")
    (directory / "tokenizer").mkdir(parents=True)
    pipe.tokenizer.save(directory / "tokenizer" / "bpe.model")
    pipe.dalle.save_pretrained(directory / "dalle")
    save_pretrained(pipe.vae, pipe.vae.config, directory / "vae", model_type="vqgan")
    if pipe.clip is not None:
        from .clip import save_clip

        save_clip(pipe.clip, directory / "clip", clip_model_cfg)
    if pipe.upscaler is not None:
        save_pretrained(pipe.upscaler, pipe.upscaler.config, directory / "upscaler", model_type="rrdbnet")
    meta = {"format": FORMAT, "version": 1, "name": pipe.name or directory.name}
    (directory / "pipeline.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory
