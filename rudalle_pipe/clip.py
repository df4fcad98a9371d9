"""CLIP reranking of generated images ("cherry picking"), built on open_clip.

The original ruDALL-E ranked its candidates with ruCLIP. This module does the same job with any
`open_clip <https://github.com/mlfoundations/open_clip>`_ model:

* :func:`get_clip` builds an open_clip model, its eval image transform and its tokenizer from a
  built-in architecture name plus a pretrained tag, a local checkpoint file, an ``hf-hub:org/repo``
  name or a ``local-dir:/path`` folder. Every download goes through huggingface_hub and honours
  ``cache_dir`` and ``HF_HUB_OFFLINE``.
* :func:`cherry_pick_by_clip` scores PIL images against a text by cosine similarity and returns
  them best first (it and :class:`RerankOutput` live in :mod:`rudalle_pipe.ranking`, which also ranks
  by perplexity; they are re-exported here).
* :class:`YTTMClipTokenizer` lets a CLIP text tower read ruDALL-E's own YouTokenToMe BPE ids (the
  embedded demo CLIP does): a ``local-dir:`` / ``hf-hub:`` folder whose ``open_clip_config.json``
  has a ``"rudalle_pipe": {"tokenizer": "bpe.model", "context_length": N}`` entry gets it instead of
  open_clip's tokenizer. :func:`save_clip` writes that layout.

The default model, ``xlm-roberta-base-ViT-B-32`` / ``laion5b_s13b_b90k``, has a multilingual text
tower, so Russian prompts work without translation. open_clip is imported lazily: it is heavy.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from .files import atomic_directory, atomic_write, resolve_inside
from .hub import (WeightsNotFoundError, check_finite, download, load_state_dict_lazily, offline_if_unreachable,
                  offline_reason, read_checkpoint, read_json, snapshot_sandbox)
from .ranking import RerankOutput, cherry_pick_by_clip  # reranking lives in ranking.py; old import path

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_CLIP_PRETRAINED",
    "ClipBundle",
    "get_clip",
    "YTTMClipTokenizer",
    "save_clip",
    "RerankOutput",
    "cherry_pick_by_clip",
]

DEFAULT_CLIP_MODEL = "xlm-roberta-base-ViT-B-32"  # ViT-B/32 image tower, XLM-RoBERTa-base text tower
DEFAULT_CLIP_PRETRAINED = "laion5b_s13b_b90k"  # LAION-5B weights: hub repo laion/CLIP-ViT-B-32-xlm-roberta-base-laion5B-s13B-b90k

_SCHEMAS = ("hf-hub:", "local-dir:")  # names that carry their own config and weights


@dataclass
class ClipBundle:
    """An open_clip model with the pieces needed to use it."""

    model: torch.nn.Module = field(repr=False)  # open_clip CLIP / CustomTextCLIP in eval mode
    preprocess: Callable[[Image.Image], torch.Tensor] = field(repr=False)  # PIL -> float (3, S, S), normalized
    tokenizer: Callable[..., torch.Tensor] = field(repr=False)  # list[str] -> int64 (T, context_length)
    name: str  # architecture name, or "hf-hub:org/repo" / "local-dir:/path"
    pretrained: str | None  # pretrained tag, checkpoint path, or None (random weights / schema name)
    model_cfg: dict[str, Any] | None = field(default=None, repr=False)  # open_clip model config (for save_clip)


# ---------------------------------------------------------------------------------------------
# ruDALL-E's BPE as a CLIP tokenizer
# ---------------------------------------------------------------------------------------------

_CONFIG_KEY = "rudalle_pipe"  # entry of open_clip_config.json naming a YTTM tokenizer file


class YTTMClipTokenizer:
    """Callable ``texts -> int64 [N, context_length]`` from a ruDALL-E :class:`YTTMTokenizer`.

    Each text is lowercased and stripped (as the pipeline does before generation), encoded as
    ``[bos=2] + bpe ids + [eos=3]`` and right-padded with ``pad=0``. A text too long for
    ``context_length`` keeps its first ``context_length - 1`` tokens and still ends with EOS, so a
    text tower configured with ``pool_type="eos", eos_id=3`` always pools the last real token.
    """

    def __init__(self, bpe: Any, context_length: int) -> None:
        from .tokenizer import YTTMTokenizer

        if not isinstance(bpe, YTTMTokenizer):
            raise TypeError(f"bpe must be a rudalle_pipe.tokenizer.YTTMTokenizer, got {type(bpe).__name__}")
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2 (room for BOS and EOS), got {context_length!r}")
        self.bpe = bpe
        self.context_length = context_length

    @classmethod
    def from_file(cls, path: str | os.PathLike, context_length: int) -> "YTTMClipTokenizer":
        """Read a yttm ``bpe.model`` file (see :meth:`YTTMTokenizer.from_file`)."""
        from .tokenizer import YTTMTokenizer

        return cls(YTTMTokenizer.from_file(path), context_length)

    @property
    def vocab_size(self) -> int:
        """Number of token ids; the text tower's ``vocab_size`` must be at least this."""
        return self.bpe.vocab_size

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids, int64 ``[N, context_length]`` (N = 1 for a single str)."""
        from .tokenizer import prepare_text

        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts must be a str or a list of str, got {texts!r}")
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)  # (N, L), pad 0
        for row, text in enumerate(texts):
            body = self.bpe.encode(prepare_text(text))[: self.context_length - 2]
            ids = [self.bpe.bos_id, *body, self.bpe.eos_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, context_length={self.context_length})"


def _local_dir(name: str, sandbox: str | os.PathLike | None) -> tuple[Path, Path]:
    """``(folder, sandbox)`` of a ``local-dir:`` name; the sandbox defaults to :func:`snapshot_sandbox`."""
    folder = Path(name[len("local-dir:"):])
    return folder, (Path(sandbox) if sandbox is not None else snapshot_sandbox(folder))


def _local_config(name: str, sandbox: str | os.PathLike | None) -> dict[str, Any]:
    """The ``open_clip_config.json`` of a ``local-dir:`` folder, read bounded and inside the folder
    (before open_clip reads it)."""
    folder, fence = _local_dir(name, sandbox)
    config = read_json(resolve_inside(folder, "open_clip_config.json", what=name, sandbox=fence),
                       what="open_clip config")
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ValueError(f"{folder / 'open_clip_config.json'} has no 'model_cfg' object")
    return config


def _schema_tokenizer(name: str, cache_dir: str | None, sandbox: str | os.PathLike | None = None
                      ) -> YTTMClipTokenizer | None:
    """The YTTM tokenizer named by a schema name's ``open_clip_config.json``, or None if it names none.

    The named file must stay inside the folder (no absolute path, no ``..``, no symlink out); the
    error names the entry, never the contents of any file."""
    if name.startswith("local-dir:"):
        folder, fence = _local_dir(name, sandbox)
        config = _local_config(name, sandbox)
    elif name.startswith("hf-hub:"):
        repo_id = name[len("hf-hub:"):]
        config_path = download(repo_id, "open_clip_config.json", cache_dir=cache_dir)
        folder, fence = config_path.parent, snapshot_sandbox(config_path.parent)
        config = read_json(config_path, what="open_clip config")
    else:
        return None
    entry = config.get(_CONFIG_KEY) if isinstance(config, dict) else None
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("tokenizer"), str):
        raise ValueError(f"{name!r}: open_clip_config.json entry {_CONFIG_KEY!r} must be "
                         f'{{"tokenizer": "bpe.model", "context_length": N}}')
    context_length = entry.get("context_length", config["model_cfg"]["text_cfg"].get("context_length"))
    what = f"{name!r}: open_clip_config.json entry {_CONFIG_KEY!r}"
    path = resolve_inside(folder, entry["tokenizer"], what=what, sandbox=fence)  # refuses before any download
    if name.startswith("hf-hub:"):
        download(name[len("hf-hub:"):], entry["tokenizer"], cache_dir=cache_dir)
        path = resolve_inside(folder, entry["tokenizer"], what=what, sandbox=fence)
    if not path.is_file():
        raise ValueError(f"{what}: the tokenizer file {entry['tokenizer']!r} does not exist in {folder}")
    return YTTMClipTokenizer.from_file(path, context_length)


# open_clip's preference among the weights of a local-dir: folder; other names are not loaded
_LOCAL_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                  "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                  "model.pth")


def _local_weights(name: str, sandbox: str | os.PathLike | None) -> Path:
    """The weights file of a ``local-dir:`` folder (open_clip's preferred names, first found),
    resolved inside the folder."""
    folder, fence = _local_dir(name, sandbox)
    for candidate in _LOCAL_WEIGHTS:
        if (folder / candidate).exists() or (folder / candidate).is_symlink():
            return resolve_inside(folder, candidate, what=name, sandbox=fence)
    raise ValueError(f"{name!r}: no CLIP weights in {folder}; expected one of {', '.join(_LOCAL_WEIGHTS)}")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _validate_source(name: str, pretrained: str | None) -> tuple[str, str | None]:
    """Check ``name``/``pretrained`` and classify the weights source.

    Returns:
        ``(kind, pretrained)`` with kind one of ``"schema"`` (hf-hub:/local-dir: name),
        ``"tag"``, ``"file"`` or ``"random"``; ``pretrained`` is None for schema names.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}: {name!r}")
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f"pretrained must be a str, a path or None, got {type(pretrained).__name__}")
    pretrained = None if pretrained is None else str(pretrained)

    if name.startswith(_SCHEMAS):
        target = name.split(":", 1)[1]
        if not target:
            raise ValueError(f"name {name!r} has an empty repo id / folder after the prefix")
        if name.startswith("local-dir:") and not (Path(target) / "open_clip_config.json").exists():
            raise ValueError(f"name {name!r}: {Path(target) / 'open_clip_config.json'} does not exist")
        if pretrained not in (None, DEFAULT_CLIP_PRETRAINED):
            raise ValueError(
                f"name {name!r} carries its own weights; pretrained={pretrained!r} would be ignored. "
                "Pass pretrained=None, or use an architecture name with pretrained=<tag or file>."
            )
        return "schema", None

    import open_clip  # after the schema names: a local-dir: ResNet CLIP is built without it (see _build)

    models = open_clip.list_models()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=5, cutoff=0.5)
        raise ValueError(
            f"unknown open_clip model {name!r}. "
            + (f"Did you mean one of {close}? " if close else "")
            + f"Some valid names: {[DEFAULT_CLIP_MODEL, 'xlm-roberta-large-ViT-H-14', 'ViT-B-32', 'ViT-L-14']} "
            f"(all {len(models)}: open_clip.list_models()); or 'hf-hub:org/repo'."
        )
    if pretrained is None:
        return "random", None
    if open_clip.get_pretrained_cfg(name, pretrained):
        return "tag", pretrained
    if Path(pretrained).is_file():
        return "file", pretrained
    raise ValueError(
        f"pretrained={pretrained!r} is neither a pretrained tag of {name!r} nor an existing file. "
        f"Tags for {name!r}: {open_clip.list_pretrained_tags_by_model(name)}; or pass a path to a "
        ".pt/.bin/.safetensors checkpoint, or pretrained=None for random weights."
    )


def _fetch(name: str, kind: str, pretrained: str | None, cache_dir: str | None,
           sandbox: str | os.PathLike | None = None) -> dict[str, Any]:
    """Make sure the config and weights are on disk (in ``cache_dir``); return the model config.

    open_clip itself only *warns* when an ``hf-hub:`` repo has no weights and silently builds a
    random model, so the weights are fetched here first, where a missing file raises.
    """
    import open_clip
    from open_clip.pretrained import download_pretrained, download_pretrained_from_hf

    if name.startswith("hf-hub:"):
        repo_id = name[len("hf-hub:"):]
        config = read_json(download(repo_id, "open_clip_config.json", cache_dir=cache_dir), what="open_clip config")
        if not isinstance(config, dict):
            raise ValueError(f"open_clip_config.json of {name!r} is not a JSON object")
        if "model_cfg" not in config:
            raise ValueError(f"open_clip_config.json of {name!r} has no 'model_cfg' entry")
        try:  # tries open_clip_model.safetensors, then open_clip_pytorch_model.bin
            download_pretrained_from_hf(repo_id, cache_dir=cache_dir)
        except FileNotFoundError as err:  # open_clip's message hides the hub error type; keep it
            raise FileNotFoundError(f"no open_clip weights in {name!r}: {err}") from err
        return config["model_cfg"]
    if name.startswith("local-dir:"):
        return _local_config(name, sandbox)["model_cfg"]
    if kind == "tag":
        download_pretrained(open_clip.get_pretrained_cfg(name, pretrained), cache_dir=cache_dir)
    model_cfg = open_clip.get_model_config(name)  # built-in: no download
    if model_cfg is None:
        raise ValueError(f"no open_clip config found for {name!r}")
    return model_cfg


def _hf_text_tower_override(model_cfg: dict[str, Any], cache_dir: str | None, name: str = "",
                            sandbox: str | os.PathLike | None = None) -> dict[str, Any]:
    """Point a Hugging Face text tower at a local copy of its ``config.json``.

    open_clip builds such towers (XLM-RoBERTa for the default model) with
    ``AutoConfig.from_pretrained(name)``, which ignores ``cache_dir``. The config is fetched here
    through ``cache_dir`` and its snapshot folder is passed instead. The tower's weights always
    come from the CLIP checkpoint (or stay random for ``pretrained=None``), never from the base
    model repo.

    In the config of a ``local-dir:`` folder, ``hf_model_name`` is a Hub repo id or a folder inside
    it (never an absolute path, ``..`` or a folder elsewhere).

    Returns:
        ``{"text_cfg": ...}`` keyword overrides for ``open_clip.create_model``, or ``{}``.
    """
    text_cfg = model_cfg.get("text_cfg", {})
    hf_name = text_cfg.get("hf_model_name")
    if not hf_name:
        return {}
    if name.startswith("local-dir:"):
        folder, fence = _local_dir(name, sandbox)
        inside = resolve_inside(folder, hf_name, what=f"{name!r}: open_clip_config.json text_cfg.hf_model_name",
                                sandbox=fence)
        if inside.is_dir():
            return {"text_cfg": {**text_cfg, "hf_model_name": str(inside), "hf_model_pretrained": False}}
    elif Path(hf_name).is_dir():
        return {}
    local_dir = download(hf_name, "config.json", cache_dir=cache_dir).parent
    return {"text_cfg": {**text_cfg, "hf_model_name": str(local_dir), "hf_model_pretrained": False}}


def _how_to_fetch(
    name: str, kind: str, pretrained: str | None, cache_dir: str | None, model_cfg: dict[str, Any] | None
) -> list[str]:
    """``hf download`` commands that put every file :func:`get_clip` needs into the cache."""
    import open_clip

    suffix = f" --cache-dir {cache_dir}" if cache_dir else ""
    commands = []
    if name.startswith("hf-hub:"):
        commands.append(f"hf download {name[len('hf-hub:'):]} open_clip_config.json "
                        f"open_clip_pytorch_model.bin{suffix}")
    elif kind == "tag":
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if cfg.get("hf_hub"):
            repo_id, filename = os.path.split(cfg["hf_hub"])
            commands.append(f"hf download {repo_id} {filename or 'open_clip_pytorch_model.bin'}{suffix}")
        elif cfg.get("url"):
            commands.append(f"download {cfg['url']} and pass the file as pretrained=<path>")
    if model_cfg is None and not name.startswith("hf-hub:"):
        model_cfg = open_clip.get_model_config(name)
    hf_name = (model_cfg or {}).get("text_cfg", {}).get("hf_model_name")
    if hf_name:
        commands.append(f"hf download {hf_name} --include '*.json' '*.model'{suffix}  (text tower config and tokenizer)")
    return commands


class _QuietRandomInit(logging.Filter):
    """Drops open_clip's root-logger warning "No pretrained weights loaded ... initialized randomly"
    while a ``local-dir:`` model is built without weights, which :func:`get_clip` loads right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def get_clip(
    name: str = DEFAULT_CLIP_MODEL,
    pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    sandbox: str | os.PathLike | None = None,
) -> ClipBundle:
    """Build an open_clip model, its eval transform and tokenizer, in eval mode on ``device``.

    Weights are never unpickled unsafely (``weights_only=True`` on every path, also with the oldest
    open_clip that setup.cfg allows), and a tensor holding NaN/inf is refused by name. A
    ``local-dir:`` folder is a sandbox: its config, tokenizer and weights must resolve inside it.

    Args:
        name: an open_clip architecture (``open_clip.list_models()``), ``"hf-hub:org/repo"`` (a
            Hub repo holding ``open_clip_config.json`` and weights) or ``"local-dir:/path"``.
        pretrained: for architecture names, a pretrained tag
            (``open_clip.list_pretrained_tags_by_model(name)``), a path to a ``.pt``/``.bin``/
            ``.safetensors`` checkpoint of that architecture, or None for random weights (tests,
            training). Schema names carry their own weights and take None or the default.
        device: where the model lives; weights stay fp32.
        cache_dir: Hugging Face cache folder for every download (default: the HF cache).
        sandbox: for ``local-dir:`` names, the folder its files may resolve into through symlinks
            (default: the folder itself, or the repo folder of a Hugging Face cache snapshot).

    Raises:
        ValueError: unknown model name or tag, or a local checkpoint that does not fit ``name``.
        WeightsNotFoundError: the files are not cached and cannot be downloaded (offline); the
            message lists the ``hf download`` commands that fetch them.
    """
    kind, pretrained = _validate_source(name, pretrained)
    cache_dir = None if cache_dir is None else str(cache_dir)
    with offline_if_unreachable():  # open_clip and transformers call huggingface_hub themselves
        return _build(name, kind, pretrained, device=device, cache_dir=cache_dir, sandbox=sandbox)


def _build(name: str, kind: str, pretrained: str | None, *, device, cache_dir: str | None, sandbox) -> ClipBundle:
    """:func:`get_clip` after the arguments are checked: fetch, build, load, check."""
    if name.startswith("local-dir:"):
        bundle = _build_resnet_clip(name, device=device, sandbox=sandbox)
        if bundle is not None:
            return bundle
    import open_clip

    model_cfg = None
    try:
        model_cfg = _fetch(name, kind, pretrained, cache_dir, sandbox)
        overrides = _hf_text_tower_override(model_cfg, cache_dir, name, sandbox)
        tokenizer = _schema_tokenizer(name, cache_dir, sandbox) or open_clip.get_tokenizer(name, cache_dir=cache_dir)
    except OSError as err:
        reason = offline_reason()
        steps = "\n  ".join(_how_to_fetch(name, kind, pretrained, cache_dir, model_cfg))
        alternative = (
            ", or put the repo files in a folder and pass name='local-dir:<folder>'"
            if kind == "schema" else ", or pass a local checkpoint file as pretrained=<path>"
        )
        raise WeightsNotFoundError(
            f"CLIP model {name!r} (pretrained={pretrained!r}) needs files that are not in the cache "
            f"({cache_dir or 'default Hugging Face cache'}) and {reason}. On a machine with network "
            f"access run\n  {steps}\nand copy the cache here{alternative}. "
            f"Cause: {type(err).__name__}: {err}"
        ) from err

    if kind == "random":
        logger.warning("CLIP %s built with random weights (pretrained=None)", name)
    local = _local_weights(name, sandbox) if name.startswith("local-dir:") else None
    what = str(local or pretrained or name)
    quiet = _QuietRandomInit() if local is not None else None  # the weights come right after, from `local`
    root = logging.getLogger()
    if quiet is not None:
        root.addFilter(quiet)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained,
            load_weights=local is None,  # a local-dir: checkpoint is loaded below, from the file chosen here
            device=device,
            cache_dir=cache_dir,
            pretrained_text=False,  # never fetch base text-tower weights; the CLIP checkpoint has them
            require_pretrained=kind != "random" and local is None,
            weights_only=True,
            **overrides,
        )
        if local is not None:
            open_clip.load_checkpoint(model, str(local), strict=True, weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the checkpoint and architecture named
        if kind == "file" or local is not None:
            raise ValueError(
                f"could not load the CLIP checkpoint {what!r} into architecture "
                f"{name!r}: {type(err).__name__}: {err}"
            ) from err
        raise
    finally:
        if quiet is not None:
            root.removeFilter(quiet)
    for key, tensor in model.state_dict().items():
        check_finite(key, tensor, what=what)
    model.eval()
    logger.info("loaded CLIP %s (pretrained=%s) on %s", name, pretrained, device)
    return ClipBundle(model=model, preprocess=preprocess, tokenizer=tokenizer, name=name, pretrained=pretrained,
                      model_cfg=model_cfg)


def _build_resnet_clip(name: str, *, device, sandbox) -> ClipBundle | None:
    """A ``local-dir:`` CLIP built by :mod:`rudalle_pipe.clip_resnet`, without importing open_clip (about 2 s on
    a small CPU), when the folder holds that architecture with a YTTM tokenizer and safetensors weights, as the
    bundled demo does; None otherwise (open_clip builds it)."""
    from . import clip_resnet

    config = _local_config(name, sandbox)
    why = clip_resnet.unsupported(config)
    local = None if why else _local_weights(name, sandbox)
    if why or local.suffix != ".safetensors":
        logger.debug("CLIP %s is built by open_clip: %s", name, why or f"{local.name} is not safetensors")
        return None
    tokenizer = _schema_tokenizer(name, None, sandbox)
    if tokenizer is None:
        logger.debug("CLIP %s is built by open_clip: it uses open_clip's tokenizer", name)
        return None
    model = clip_resnet.ResNetCLIP(config["model_cfg"], config["preprocess_cfg"])
    try:
        load_state_dict_lazily(model, read_checkpoint(local), what=str(local), dtype=torch.float32, device=device)
    except ValueError as err:
        raise ValueError(f"could not load the CLIP checkpoint {str(local)!r} into architecture {name!r}: "
                         f"{err}") from err
    preprocess = clip_resnet.Preprocess(model.visual.image_size, config["preprocess_cfg"]["mean"],
                                        config["preprocess_cfg"]["std"])
    logger.info("loaded CLIP %s (ResNet, without open_clip) on %s", name, device)
    return ClipBundle(model=model.to(device).eval(), preprocess=preprocess, tokenizer=tokenizer, name=name,
                      pretrained=None, model_cfg=config["model_cfg"])


def save_clip(
    bundle: ClipBundle,
    directory: str | os.PathLike,
    model_cfg: dict[str, Any] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``bundle`` in open_clip's ``local-dir:`` / ``hf-hub:`` layout, readable by :func:`get_clip`.

    Files: ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``: image size, mean, std) and
    ``open_clip_model.safetensors``; for a :class:`YTTMClipTokenizer` also ``bpe.model`` and the
    ``"rudalle_pipe"`` config entry naming it.

    Args:
        model_cfg: open_clip's model config; default ``bundle.model_cfg``, else the config open_clip
            knows for ``bundle.name``.
        dtype: cast floating-point weights to this (e.g. ``torch.float16`` to halve the file);
            :func:`get_clip` loads them back into an fp32 model. Default: keep them as they are.

    The folder is written atomically (built under a temporary name, renamed when complete).

    Raises:
        FileExistsError: ``directory`` exists and is not empty.
        ValueError: no model config is known for ``bundle``.
    """
    import open_clip
    from safetensors.torch import save_file

    if not isinstance(bundle, ClipBundle):
        raise TypeError(f"bundle must be a ClipBundle, got {type(bundle).__name__}")
    directory = Path(directory)
    if directory.exists() and not (directory.is_dir() and not any(directory.iterdir())):
        raise FileExistsError(f"{directory} exists and is not empty (it may hold a saved CLIP); "
                              "choose a new or empty directory")
    model_cfg = model_cfg or bundle.model_cfg or open_clip.get_model_config(bundle.name)
    if model_cfg is None:
        raise ValueError(f"open_clip does not know the architecture {bundle.name!r}; pass model_cfg=")
    visual = bundle.model.visual
    preprocess_cfg = dict(getattr(visual, "preprocess_cfg", None) or {})  # size, mean, std, interpolation...
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    preprocess_cfg.update(
        size=size,
        mean=list(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN),
        std=list(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD),
    )
    config: dict[str, Any] = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
             for k, v in bundle.model.state_dict().items()}
    with atomic_directory(directory) as tmp:
        if isinstance(bundle.tokenizer, YTTMClipTokenizer):
            bundle.tokenizer.bpe.save(tmp / "bpe.model")
            config[_CONFIG_KEY] = {"tokenizer": "bpe.model", "context_length": bundle.tokenizer.context_length}
        save_file(state, str(tmp / "open_clip_model.safetensors"))  # in place, inside the temporary folder
        atomic_write(tmp / "open_clip_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return directory
