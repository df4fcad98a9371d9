"""Fetching files from the Hugging Face Hub and reading checkpoints safely.

Everything that touches the network or unpickles weights goes through this module:

* :func:`download` wraps :func:`huggingface_hub.hf_hub_download` (default cache, ``cache_dir``,
  ``revision``, ``token``, ``HF_HUB_OFFLINE``) and turns "not cached and no network" into an error
  that names the wanted file and says how to get it. One probe request (:func:`hub_reachable`,
  :data:`PROBE_TIMEOUT_S`) decides whether the Hub answers; if not, only the cache is read, so an
  offline machine gets that error in seconds, not after huggingface_hub's half-minute of retries
  (:func:`offline_if_unreachable` does the same for open_clip and transformers).
* :func:`read_checkpoint` opens ``.safetensors`` or ``torch.save`` files with
  ``weights_only=True`` (never an unsafe unpickle), memory-mapped where the format allows, and turns
  truncated or corrupt files into a clear ``ValueError``.
* :func:`check_state_dict` compares a checkpoint with a module's expected keys and shapes and lists
  every missing, unexpected and mis-shaped key.
* :func:`load_state_dict_lazily` copies a checked state dict into a module built on the ``meta``
  device, casting tensor by tensor, so a 12B model never exists twice in RAM; a tensor holding NaN
  or inf is refused by name (:func:`check_finite`).
* :func:`save_pretrained` / :func:`load_pretrained` write and read the Hugging Face layout. Saving
  is atomic (the folder appears complete or not at all). Loading treats the folder as a sandbox:
  every shard named by ``model.safetensors.index.json`` must be a ``.safetensors`` file inside it
  (no ``..``, no absolute path, no symlink out; for a Hugging Face cache snapshot the sandbox is the
  repo's cache folder, whose ``blobs/`` the snapshot links into), and JSON files are read with a
  size bound (:data:`MAX_JSON_BYTES`).

No function here lets huggingface_hub unpickle anything: its ``load_state_dict_from_file`` /
``load_torch_model`` default to ``weights_only=False`` in some releases that setup.cfg allows.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, TypeVar

import torch
from torch import nn

from .files import atomic_directory, atomic_write, read_bounded, resolve_inside

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
    "read_json",
    "weight_files",
    "check_finite",
    "snapshot_sandbox",
    "hub_reachable",
    "offline_if_unreachable",
    "offline_reason",
    "MAX_JSON_BYTES",
    "PROBE_TIMEOUT_S",
]

MAX_JSON_BYTES = 8 * 2**20  # config.json, model.safetensors.index.json, pipeline.json, open_clip_config.json
PROBE_TIMEOUT_S = 2.5  # how long one HTTP request to the Hub endpoint may take before it counts as unreachable
_PROBE_TTL_S = 60.0  # an "unreachable" verdict is reused this long (one probe per command, not per file)

M = TypeVar("M", bound=nn.Module)


class WeightsNotFoundError(FileNotFoundError):
    """A weights file is neither in the local cache nor downloadable (offline or no network)."""


_forced_offline = False  # True inside offline_if_unreachable() when it switched huggingface_hub offline


def offline_reason() -> str:
    """Why a file that is not cached cannot be downloaded, for error messages."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE and not _forced_offline:
        return "HF_HUB_OFFLINE is set"
    return f"the Hub ({constants.ENDPOINT}) could not be reached"


def _not_cached(repo_id: str, filename: str, cache_dir) -> WeightsNotFoundError:
    from huggingface_hub import constants

    reason = offline_reason()
    return WeightsNotFoundError(
        f"Need '{filename}' from the Hugging Face Hub repo '{repo_id}', but it is not in the "
        f"cache ({cache_dir or constants.HF_HUB_CACHE}) and {reason}. Fetch it on a machine with "
        f"network access with `hf download {repo_id} {filename}` (then copy the cache), "
        f"or pass the local file as checkpoint_path=..."
    )


_probe_verdicts: dict[str, tuple[float, bool]] = {}  # endpoint -> (time.monotonic() of the probe, reachable)


def hub_reachable() -> bool:
    """Whether the Hub endpoint (``HF_ENDPOINT``) answers one HTTP request within :data:`PROBE_TIMEOUT_S`.

    huggingface_hub retries a failing connection with exponential backoff (about 27 s, or minutes
    against a server that never answers) before it falls back to the cache; one plain request
    here, without retries, finds out first. Any HTTP answer, even an error status, or a TLS problem
    counts as reachable (huggingface_hub then reports the details); refused or reset connections,
    DNS failures and timeouts count as unreachable. A verdict is reused for a minute, so a
    command probes once. ``HF_HUB_OFFLINE=1`` skips the probe (callers check it first).
    """
    import ssl
    import urllib.error
    import urllib.request
    from http.client import HTTPException

    from huggingface_hub import constants

    endpoint = constants.ENDPOINT.rstrip("/")
    seen = _probe_verdicts.get(endpoint)
    if seen is not None and time.monotonic() - seen[0] < _PROBE_TTL_S:
        return seen[1]
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint + "/", method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
        reachable = True
    except urllib.error.HTTPError:
        reachable = True  # the server answered
    except urllib.error.URLError as err:
        reachable = isinstance(err.reason, ssl.SSLError)
    except ssl.SSLError:
        reachable = True
    except (HTTPException, OSError):  # reset, refused, timed out, closed without an answer
        reachable = False
    except ValueError:  # a malformed HF_ENDPOINT: let huggingface_hub report it
        reachable = True
    if not reachable:
        logger.info("the Hub at %s did not answer within %.1f s; using the cache only", endpoint, PROBE_TIMEOUT_S)
    _probe_verdicts[endpoint] = (time.monotonic(), reachable)
    return reachable


@contextlib.contextmanager
def offline_if_unreachable() -> Iterator[None]:
    """Run the block with huggingface_hub offline (as under ``HF_HUB_OFFLINE=1``) when the Hub does
    not answer (:func:`hub_reachable`), so that code calling huggingface_hub itself (open_clip,
    transformers) reads the cache at once instead of retrying for half a minute."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or hub_reachable():
        yield
        return
    global _forced_offline
    constants.HF_HUB_OFFLINE, _forced_offline = True, True  # read at call time by every allowed release
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, _forced_offline = False, False


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
    ``HF_HUB_OFFLINE=1`` environment variable (then only the cache is used). When the Hub does not
    answer (:func:`hub_reachable`), only the cache is used too, so a machine without network gets
    its answer in seconds instead of huggingface_hub's retries.

    Raises:
        WeightsNotFoundError: the file is not cached and cannot be downloaded; the message names the
            repo and file and tells how to fetch it or where to pass a local copy.
    """
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if constants.HF_HUB_OFFLINE or not hub_reachable():
        # a pure cache look-up: even hf_hub_download(local_files_only=True) may contact the Hub
        found = try_to_load_from_cache(repo_id, filename, cache_dir=None if cache_dir is None else str(cache_dir),
                                       revision=revision)
        if isinstance(found, str):
            return Path(found)
        raise _not_cached(repo_id, filename, cache_dir)
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


def check_finite(name: str, tensor: torch.Tensor, *, what: str) -> None:
    """Raise ``ValueError`` naming ``name`` (a key of the checkpoint ``what``) when the floating-point
    ``tensor`` holds NaN or inf; integer and bool tensors always pass.

    Non-finite weights otherwise load silently and surface much later (all-black images, "probability
    tensor contains either inf, nan").
    """
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.device.type == "meta":
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise ValueError(f"checkpoint {what}: tensor {name!r} {tuple(tensor.shape)} holds {bad} NaN/inf value(s) "
                         f"(dtype {str(tensor.dtype).removeprefix('torch.')}); refusing to load broken weights")


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
    ``dtype`` (floating point tensors only), checked to be finite (:func:`check_finite`, also after
    the cast: 1e5 is inf in float16) and moved to ``device`` one at a time and *assigned* to the
    module, so no second full copy of the weights is ever allocated. Buffers that the module
    computes itself (non-persistent) are rebuilt by the caller.
    """
    own = module.state_dict()
    check_state_dict({k: v.shape for k, v in own.items()}, state_dict, what=what)
    from .backend import small_tensor_threads

    converted = {}
    largest = max((t.numel() * t.element_size() for t in own.values()), default=0)
    with small_tensor_threads(largest):  # a small model's weights: one thread (see the backend)
        for key, tensor in state_dict.items():
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype=dtype)
            check_finite(key, tensor, what=what)
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

    The folder is built under a temporary name beside ``directory`` and renamed into place when
    complete, so an interrupt or a full disk leaves no ``directory`` (or the empty one there was),
    and the same call can simply be repeated.

    Raises:
        FileExistsError: ``directory`` exists and is not empty (nothing is overwritten).
    """
    from huggingface_hub import save_torch_state_dict

    if getattr(module, "quantization", None):
        raise ValueError(f"this model holds {module.quantization} weights, made for generation only; save the model "
                         "before quantizing it (quantize after loading)")
    directory = Path(directory)
    if directory.exists() and not (directory.is_dir() and not any(directory.iterdir())):
        existing = sorted(p.name for p in directory.glob("*.safetensors*")) if directory.is_dir() else []
        if existing or (directory / "config.json").exists():
            raise FileExistsError(f"{directory} already holds a saved model ({', '.join(existing) or 'config.json'}); "
                                  "choose a new or empty directory")
        raise FileExistsError(f"{directory} exists and is not empty; choose a new or empty directory")
    dtype = next(module.parameters()).dtype
    payload = {"model_type": model_type, "dtype": str(dtype).removeprefix("torch."), **dataclasses.asdict(config)}
    state = module.state_dict() if state_dict is None else {k: v.contiguous() for k, v in state_dict.items()}
    with atomic_directory(directory) as tmp:
        atomic_write(tmp / "config.json", json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
        save_torch_state_dict(state, tmp, max_shard_size=max_shard_size)  # writes in place, inside tmp
    return directory


def read_json(path: str | os.PathLike, *, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse the JSON file ``path`` of at most ``max_bytes`` (a regular file; never a device or FIFO).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: too large, not a regular file, not UTF-8 or not JSON; the message names ``what``
            and the path (and the line and column of a syntax error), never the contents.
    """
    data = read_bounded(path, max_bytes, what=what)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path} is not UTF-8 text (bad byte at offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err.msg} at line {err.lineno}, "
                         f"column {err.colno})") from None


def snapshot_sandbox(directory: str | os.PathLike) -> Path:
    """The folder that symlinks inside ``directory`` may point into.

    For a Hugging Face cache snapshot (``.../models--org--name/snapshots/<commit>``, whose files link
    to ``../../blobs/``) or a folder in one, that is the repo's cache folder; for any other folder,
    the folder itself.
    """
    directory = Path(directory)
    for folder in (resolved := directory.resolve(), *resolved.parents):  # also a subfolder of a snapshot
        parent = folder.parent
        if parent.name == "snapshots" and parent.parent.name.startswith(("models--", "datasets--", "spaces--")):
            return parent.parent
    return directory


def read_config(directory: str | os.PathLike, config_cls: type, *, model_type: str,
                sandbox: str | os.PathLike | None = None, **overrides: Any) -> Any:
    """The ``config_cls`` stored in ``directory/config.json`` by :func:`save_pretrained` (read
    bounded, and only if it resolves inside ``sandbox``, default :func:`snapshot_sandbox`)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {path.parent}: not a saved {model_type} model")
    path = resolve_inside(directory, "config.json", what=f"{model_type} model folder",
                          sandbox=snapshot_sandbox(directory) if sandbox is None else sandbox)
    raw = read_json(path, what="model config")
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a JSON {type(raw).__name__}, not an object: not a saved {model_type} model")
    if raw.get("model_type") != model_type:
        raise ValueError(f"{path} describes a {raw.get('model_type')!r} model, expected {model_type!r}")
    names = {f.name for f in dataclasses.fields(config_cls)}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names}
    return config_cls(**{**fields, **overrides})


def weight_files(directory: str | os.PathLike, *, sandbox: str | os.PathLike | None = None) -> list[Path]:
    """The safetensors files of a model saved by :func:`save_pretrained`: ``model.safetensors``, or
    every shard named in ``model.safetensors.index.json``.

    Each shard name must be a relative ``.safetensors`` name that stays inside ``directory`` (symlinks
    may lead anywhere inside ``sandbox``, default :func:`snapshot_sandbox`); pickle files
    (``.bin``, ``.pt``) are refused, so nothing here can run code.

    Raises:
        rudalle_pipe.files.UnsafePathError: a name leaves the folder (the message names the entry).
        ValueError: a malformed index or a name that is not ``.safetensors``.
        FileNotFoundError: a listed file is missing.
    """
    directory = Path(directory)
    sandbox = snapshot_sandbox(directory) if sandbox is None else Path(sandbox)
    index = directory / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        index = resolve_inside(directory, index.name, what="model folder", sandbox=sandbox)
        raw = read_json(index, what="weights index")
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map' object mapping tensor names to .safetensors files")
        names = sorted(set(weight_map.values()), key=str)
    else:
        names = ["model.safetensors"]
    files = []
    for name in names:
        path = resolve_inside(directory, name, what=str(index), sandbox=sandbox)
        if not name.endswith(".safetensors"):
            raise ValueError(f"{index}: the weights file {name!r} is not a .safetensors file; only safetensors "
                             "shards are loaded (pickled .bin/.pt files could run code)")
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (listed by the saved model in {directory})")
        files.append(path)
    return files


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                   "xavier_normal_", "orthogonal_", "constant_", "ones_", "zeros_")


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Build modules on the meta device without their random initialisation (``torch.nn.init`` does nothing
    meanwhile): the weights are loaded right after, and initialising meta tensors goes through PyTorch's
    reference decompositions, whose first use imports ``torch._dynamo`` (1-2 s of start-up, for nothing)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS if hasattr(torch.nn.init, name)}
    for name in saved:
        setattr(torch.nn.init, name, _keep)
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


def load_pretrained(
    module_cls: type[M], config_cls: type, directory: str | os.PathLike, *, model_type: str,
    device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32,
    sandbox: str | os.PathLike | None = None, **overrides: Any,
) -> M:
    """Build ``module_cls(config)`` on the meta device and load the (possibly sharded) safetensors
    written by :func:`save_pretrained`; returns the module in eval mode.

    ``sandbox``: the folder every file must resolve into (see :func:`weight_files`); default the
    folder itself, or the repo cache folder for a Hugging Face cache snapshot.
    """
    directory = Path(directory)
    config = read_config(directory, config_cls, model_type=model_type, sandbox=sandbox, **overrides)
    state_dict: dict[str, torch.Tensor] = {}
    for path in weight_files(directory, sandbox=sandbox):
        state_dict.update(read_checkpoint(path))
    with on_meta():
        module = module_cls(config)
    load_state_dict_lazily(module, state_dict, what=str(directory), dtype=dtype, device=device)
    return module.eval()
