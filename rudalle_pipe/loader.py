"""Factories that join architecture configs, the registry and the Hub: ``get_tokenizer``,
``get_vae`` and ``get_rudalle_model``.

Each one resolves a file (a local path, or a download through :func:`rudalle_pipe.hub.download`),
reads it safely, converts the original layout once, checks every key and shape, and loads the weights
into a module built on the ``meta`` device, so the weights are materialised only once.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch

from .dalle import DalleConfig, DalleModel, convert_rudalle_state_dict
from .hub import (WeightsNotFoundError, download, load_state_dict_lazily, offline_if_unreachable, on_meta,
                  read_checkpoint)
from .registry import get_pretrained, list_pretrained, local_folder

logger = logging.getLogger(__name__)

__all__ = ["get_tokenizer", "get_vae", "get_rudalle_model", "apply_overrides"]

HF_HUB_PREFIX = "hf-hub:"


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """``dataclasses.replace(config, **overrides)`` with a ``TypeError`` listing the valid names.

    The preset ``config`` is never mutated (the dataclasses are frozen)."""
    valid = [f.name for f in dataclasses.fields(config)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise TypeError(
            f"unknown config override(s) {', '.join(unknown)} for {type(config).__name__}; "
            f"valid names: {', '.join(valid)}"
        )
    return dataclasses.replace(config, **overrides)


def _random_init(cls, config, *, device, dtype):
    """``cls(config)`` with random weights, moved to ``device``/``dtype``; a module built under a
    ``torch.device("meta")`` context stays on meta (handy for inspecting 12B shapes)."""
    module = cls(config).to(dtype=dtype)
    if next(module.parameters()).device.type != "meta":
        module = module.to(device=device)
    return module.eval()


def _fetch(entry, *, cache_dir, revision=None, token=None) -> Path:
    """Download ``entry.filename``, trying the fallback repos when the main repo fails."""
    errors = []
    for repo_id in (entry.repo_id, *entry.fallback_repo_ids):
        try:
            return download(repo_id, entry.filename, cache_dir=cache_dir, revision=revision, token=token)
        except WeightsNotFoundError as err:
            errors.append(err)
    raise errors[0]


# ---------------------------------------------------------------------------------------- tokenizer
def get_tokenizer(
    path: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    revision: Optional[str] = None,
    token: str | bool | None = None,
):
    """The ruDALL-E YouTokenToMe BPE tokenizer, read in pure Python (no youtokentome needed).

    Args:
        path: a local ``bpe.model``; ``None`` downloads ``shonenkov/rudalle-utils/bpe.model``.
        cache_dir, revision, token: passed to the Hub download.
    """
    from .tokenizer import YTTMTokenizer

    if path is None:
        path = _fetch(get_pretrained("tokenizer", "tokenizer"), cache_dir=cache_dir, revision=revision, token=token)
    return YTTMTokenizer.from_file(path)


# --------------------------------------------------------------------------------------------- VQGAN
def get_vae(
    pretrained: bool = True,
    *,
    dwt: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    revision: Optional[str] = None,
    token: str | bool | None = None,
    **config_overrides: Any,
):
    """The Sber VQGAN (256 px) or, with ``dwt=True``, its 512 px DWT-decoder variant.

    Args:
        pretrained: load weights (from ``checkpoint_path`` or the Hub); ``False`` gives random ones.
        dwt: use the DWT decoder (images come out 512x512 from 32x32 codes).
        checkpoint_path: a local ``.ckpt`` in the original Lightning layout (or safetensors).
        config_overrides: fields of :class:`rudalle_pipe.vae.VQGANConfig` named as in the original
            config: ``ch``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``, ``z_channels``,
            ``resolution``, ``n_embed``, ``embed_dim``.

    Returns:
        A :class:`rudalle_pipe.vae.VQGAN` in eval mode: ``get_codebook_indices(images [B,3,H,W] in
        [0,1]) -> [B, H/8*W/8]`` and ``decode(codes) -> [B,3,H,W] in [0,1]``.
    """
    from .vae import VQGAN, VQGANConfig, load_vqgan

    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained must be True or False, got {pretrained!r}")
    entry = get_pretrained("vqgan_dwt" if dwt else "vqgan", "vae")
    config = apply_overrides(VQGANConfig(**entry.config), config_overrides)
    if not pretrained:
        if checkpoint_path is not None:
            raise ValueError("checkpoint_path was given with pretrained=False; pass pretrained=True to load it")
        return _random_init(VQGAN, config, device=device, dtype=dtype)
    if checkpoint_path is None:
        checkpoint_path = _fetch(entry, cache_dir=cache_dir, revision=revision, token=token)
    return load_vqgan(checkpoint_path, config, device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------- generator
def _load_dalle_file(path: Path, config: DalleConfig, *, device, dtype) -> DalleModel:
    if path.is_dir():
        return DalleModel.from_pretrained(path, device=device, dtype=dtype)
    raw = read_checkpoint(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} does not hold a state dict but a {type(raw).__name__}")
    state_dict = convert_rudalle_state_dict(raw, config)
    with on_meta():
        model = DalleModel(config)
    load_state_dict_lazily(model, state_dict, what=str(path), dtype=dtype, device=device)
    return model.eval()


def _hub_repo_dir(repo_id: str, *, cache_dir, revision, token) -> Path:
    """Fetch a generator saved in the Hugging Face layout (config.json + safetensors)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        with offline_if_unreachable():
            return Path(snapshot_download(repo_id, cache_dir=cache_dir, revision=revision, token=token,
                                          allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json"]))
    except (LocalEntryNotFoundError, OSError) as err:
        raise WeightsNotFoundError(
            f"Need config.json and model*.safetensors of the Hub repo '{repo_id}', but they are not "
            f"cached and the Hub cannot be reached (or HF_HUB_OFFLINE is set). Run "
            f"`hf download {repo_id}` where there is network access, or pass a local directory."
        ) from err


def get_rudalle_model(
    name: str,
    pretrained: bool = True,
    *,
    checkpoint_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    revision: Optional[str] = None,
    token: str | bool | None = None,
    **config_overrides: Any,
) -> DalleModel:
    """A ruDALL-E generator.

    Args:
        name: a preset (``Malevich``, ``Malevich_v2``, ``Emojich``, ``Surrealist_XL``,
            ``Kandinsky``; see :func:`rudalle_pipe.list_pretrained`), a local directory written by
            :meth:`DalleModel.save_pretrained`, or ``"hf-hub:org/repo"`` for such a directory on the Hub.
            A path (``./Malevich``, any name with a separator, or an existing folder holding
            ``config.json``) wins over a preset of the same name, with a warning.
        pretrained: load weights; ``False`` builds the preset with random weights (no download).
        checkpoint_path: a local file in the original layout (fp16 state dict, mask buffers under
            ``transformer.`` or at top level) or a saved directory; skips the download.
        device, dtype: where and in what precision the weights end up (fp32 on CPU by default).
        cache_dir, revision, token: passed to the Hub download.
        config_overrides: :class:`DalleConfig` fields, e.g. ``num_layers``, ``hidden_size``,
            ``num_attention_heads``; the preset itself is never changed.

    Returns:
        A :class:`DalleModel` in eval mode. ``model(input_ids [B, L]).logits`` is ``[B, L, 24704]``.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained must be True or False, got {pretrained!r}")
    if name.startswith(HF_HUB_PREFIX):
        repo = _hub_repo_dir(name[len(HF_HUB_PREFIX):], cache_dir=cache_dir, revision=revision, token=token)
        return DalleModel.from_pretrained(repo, device=device, dtype=dtype, **config_overrides)
    presets = list_pretrained("dalle")
    folder = local_folder(name, "config.json", registered=presets, what="generator preset")
    if folder is None and Path(name).is_dir() and name not in presets:
        folder = Path(name)  # a folder without config.json: from_pretrained says what is missing
    if folder is not None:
        if checkpoint_path is not None or not pretrained:
            raise ValueError(f"{name!r} is a saved model folder; checkpoint_path= and pretrained=False apply "
                             "only to presets")
        return DalleModel.from_pretrained(folder, device=device, dtype=dtype, **config_overrides)
    entry = get_pretrained(name, "dalle")
    config = apply_overrides(DalleConfig(**entry.config), config_overrides)
    if not pretrained:
        if checkpoint_path is not None:
            raise ValueError("checkpoint_path was given with pretrained=False; pass pretrained=True to load it")
        return _random_init(DalleModel, config, device=device, dtype=dtype)
    if checkpoint_path is None:
        checkpoint_path = _fetch(entry, cache_dir=cache_dir, revision=revision, token=token)
    logger.info("loading %s from %s", name, checkpoint_path)
    return _load_dalle_file(Path(checkpoint_path), config, device=device, dtype=dtype)
