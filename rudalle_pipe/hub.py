"""Fetching files from the Hugging Face Hub and reading checkpoints safely.

Everything that touches the network or unpickles weights goes through this module:

* :func:`download` wraps :func:`huggingface_hub.hf_hub_download` (default cache, ``cache_dir``,
  ``revision``, ``token``, ``HF_HUB_OFFLINE``) and turns "not cached and no network" into an error
  that names the wanted file and says how to get it.
* :func:`read_checkpoint` opens ``.safetensors`` or ``torch.save`` files with
  ``weights_only=True`` (never an unsafe unpickle), memory-mapped where the format allows, and turns
  truncated or corrupt files into a clear ``ValueError``.
* :func:`check_state_dict` compares a checkpoint with a module's expected keys and shapes and lists
  every missing, unexpected and mis-shaped key.
* :func:`load_state_dict_lazily` copies a checked state dict into a module built on the ``meta``
  device, casting tensor by tensor, so a 12B model never exists twice in RAM.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, TypeVar

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "WeightsNotFoundError",
    "download",
    "read_checkpoint",
    "check_state_dict",
    "load_state_dict_lazily",
    "save_pretrained",
    "load_pretrained",
    "read_config",
]

M = TypeVar("M", bound=nn.Module)


class WeightsNotFoundError(FileNotFoundError):
    """A weights file is neither in the local cache nor downloadable (offline or no network)."""


def _not_cached(repo_id: str, filename: str, cache_dir) -> WeightsNotFoundError:
    from huggingface_hub import constants

    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
    return WeightsNotFoundError(
        f"Need '{filename}' from the Hugging Face Hub repo '{repo_id}', but it is not in the "
        f"cache ({cache_dir or 'default cache'}) and {reason}. Fetch it on a machine with "
        f"network access with `hf download {repo_id} {filename}` (then copy the cache), "
        f"or pass the local file as checkpoint_path=..."
    )


def download(
    repo_id: str,
    filename: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """Return the local path of ``filename`` from the Hub repo ``repo_id``, downloading if needed.

    Honours the default Hugging Face cache, ``cache_dir``, ``revision``, ``token`` and the
    ``HF_HUB_OFFLINE=1`` environment variable (then only the cache is used).

    Raises:
        WeightsNotFoundError: the file is not cached and cannot be downloaded; the message names the
            repo and file and tells how to fetch it or where to pass a local copy.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(
            hf_hub_download(
                repo_id=repo_id,
                filename=filename,
                cache_dir=cache_dir,
                revision=revision,
                token=token,
            )
        )
    except LocalEntryNotFoundError as err:
        raise _not_cached(repo_id, filename, cache_dir) from err
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as err:
        raise WeightsNotFoundError(
            f"'{filename}' was not found in the Hub repo '{repo_id}'"
            f"{f' at revision {revision!r}' if revision else ''}: {err}"
        ) from err
    except OSError as err:  # connection problems
        raise _not_cached(repo_id, filename, cache_dir) from err


def read_checkpoint(path: str | os.PathLike) -> dict[str, object]:
    """Read a checkpoint file without unsafe unpickling.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)`` on CPU, memory-mapped when the file is in the zip format so the
    tensors are paged in from disk instead of copied.

    Returns:
        The stored object: usually a dict of tensors, or a dict that holds one (``state_dict``,
        ``params_ema``, ...); callers unwrap it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is truncated, corrupt, or not a weights file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint file {path} is empty (0 bytes): truncated download?")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path), device="cpu"))
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            # Legacy (non-zip) torch.save files cannot be memory-mapped; read them normally.
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every reader error means the same thing to the user
        raise ValueError(
            f"could not read checkpoint {path} ({path.stat().st_size} bytes): the file is truncated, "
            f"corrupt, or not a weights file. Delete it and download it again. "
            f"Reader said: {type(err).__name__}: {err}"
        ) from err


def check_state_dict(
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    found: Mapping[str, torch.Tensor],
    *,
    what: str,
) -> None:
    """Raise a ``ValueError`` listing every missing, unexpected and mis-shaped key.

    Args:
        expected: key -> shape that the module wants.
        found: key -> tensor from the checkpoint (already converted to the module's layout).
        what: a short name of the checkpoint for the message (a path or model name).
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k])}"
        for k in set(expected) & set(found)
        if tuple(found[k].shape) != tuple(expected[k])
    )
    if not (missing or unexpected or misshaped):
        return

    def _fmt(items: list[str]) -> str:
        shown = ", ".join(items[:20])
        return shown + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")

    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
    if misshaped:
        parts.append(f"mis-shaped keys ({len(misshaped)}): {_fmt(misshaped)}")
    raise ValueError(
        f"checkpoint {what} does not fit the model configuration; " + "; ".join(parts)
        + ". Check the model name and config overrides."
    )


def load_state_dict_lazily(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    what: str,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load ``state_dict`` into ``module`` (typically built on the ``meta`` device) in place.

    Keys and shapes are checked first (see :func:`check_state_dict`). Each tensor is cast to
    ``dtype`` (floating point tensors only) and moved to ``device`` one at a time and *assigned* to
    the module, so no second full copy of the weights is ever allocated. Buffers that the module
    computes itself (non-persistent) are rebuilt by the caller.
    """
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_state_dict(expected, state_dict, what=what)
    converted = {}
    for key, tensor in state_dict.items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype=dtype)
        converted[key] = tensor.to(device=device)
    module.load_state_dict(converted, strict=True, assign=True)
    return module


# ---------------------------------------------------------------- Hugging Face layout save / load
def save_pretrained(
    module: nn.Module, config: Any, directory: str | os.PathLike, *, model_type: str,
    max_shard_size: int | str = "5GB", state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``config.json`` (the config dataclass plus ``model_type``) and ``model.safetensors``
    (sharded with ``model.safetensors.index.json`` above ``max_shard_size``) into ``directory``.
    ``state_dict`` replaces ``module.state_dict()`` (e.g. with adapters merged).

    Raises ``FileExistsError`` rather than overwrite a model already saved there.
    """
    from huggingface_hub import save_torch_state_dict

    directory = Path(directory)
    existing = sorted(p.name for p in directory.glob("*.safetensors*")) if directory.exists() else []
    if existing or (directory / "config.json").exists():
        raise FileExistsError(
            f"{directory} already holds a saved model ({', '.join(existing) or 'config.json'}); "
            "choose an empty directory"
        )
    directory.mkdir(parents=True, exist_ok=True)
    dtype = next(module.parameters()).dtype
    payload = {"model_type": model_type, "dtype": str(dtype).removeprefix("torch."), **dataclasses.asdict(config)}
    (directory / "config.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    state = module.state_dict() if state_dict is None else {k: v.contiguous() for k, v in state_dict.items()}
    save_torch_state_dict(state, directory, max_shard_size=max_shard_size)
    return directory


def read_config(directory: str | os.PathLike, config_cls: type, *, model_type: str, **overrides: Any) -> Any:
    """The ``config_cls`` stored in ``directory/config.json`` by :func:`save_pretrained`."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {path.parent}: not a saved {model_type} model")
    raw = json.loads(path.read_text())
    if raw.get("model_type") != model_type:
        raise ValueError(f"{path} describes a {raw.get('model_type')!r} model, expected {model_type!r}")
    names = {f.name for f in dataclasses.fields(config_cls)}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names}
    return config_cls(**{**fields, **overrides})


def load_pretrained(
    module_cls: type[M], config_cls: type, directory: str | os.PathLike, *, model_type: str,
    device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32, **overrides: Any,
) -> M:
    """Build ``module_cls(config)`` on the meta device and load the (possibly sharded) safetensors
    written by :func:`save_pretrained`; returns the module in eval mode."""
    from huggingface_hub import load_state_dict_from_file

    directory = Path(directory)
    config = read_config(directory, config_cls, model_type=model_type, **overrides)
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    state_dict: dict[str, torch.Tensor] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (listed by the saved model in {directory})")
        try:
            state_dict.update(load_state_dict_from_file(path, map_location="cpu"))
        except Exception as err:  # noqa: BLE001 - any reader error means a damaged file
            raise ValueError(f"could not read {path}: the file is truncated or corrupt ({err})") from err
    with torch.device("meta"):
        module = module_cls(config)
    load_state_dict_lazily(module, state_dict, what=str(directory), dtype=dtype, device=device)
    return module.eval()
