"""Registry of pretrained weights: name -> Hugging Face Hub repo, file and architecture config.

Architectures live in the component modules (``DalleConfig``, ``VQGANConfig``, ...); this table
only says where each set of weights lives and which config overrides it needs. The factories in
:mod:`rudalle_pipe.loader` join the two. Nothing here downloads.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Collection, Mapping, Optional

logger = logging.getLogger(__name__)

__all__ = ["Pretrained", "PRETRAINED", "list_pretrained", "get_pretrained", "local_folder"]

UTILS_REPO = "shonenkov/rudalle-utils"


@dataclass(frozen=True)
class Pretrained:
    """Where one set of weights lives on the Hub and which config it needs."""

    kind: str  # "dalle", "vae", "tokenizer" or "realesrgan"
    repo_id: str  # Hugging Face Hub repository
    filename: str  # file inside the repository
    config: Mapping[str, Any] = field(default_factory=dict)  # overrides of the kind's config dataclass
    description: str = ""  # one line for list_pretrained()
    fallback_repo_ids: tuple[str, ...] = ()  # older names tried when repo_id is unreachable


def _frozen(**kwargs: Any) -> Mapping[str, Any]:
    return MappingProxyType(dict(kwargs))


_MALEVICH_V3 = _frozen(num_layers=24, hidden_size=2048, num_attention_heads=16, hf_version="v3")
_MALEVICH_V2 = _frozen(num_layers=24, hidden_size=2048, num_attention_heads=16, hf_version="v2")

PRETRAINED: Mapping[str, Pretrained] = MappingProxyType({
    # generators (1.3B unless noted), fp16 files in the original DalleModel layout
    "Malevich": Pretrained("dalle", "sberbank-ai/rudalle-Malevich", "pytorch_model_v3.bin", _MALEVICH_V3,
                           "ruDALL-E Malevich (XL) 1.3B, v3 weights"),
    "Malevich_v2": Pretrained("dalle", "sberbank-ai/rudalle-Malevich", "pytorch_model_v2.bin", _MALEVICH_V2,
                              "ruDALL-E Malevich 1.3B, earlier v2 weights"),
    "Emojich": Pretrained("dalle", "sberbank-ai/rudalle-Emojich", "pytorch_model.bin", _MALEVICH_V2,
                          "Malevich finetuned on emoji, v2 layout"),
    "Surrealist_XL": Pretrained("dalle", "shonenkov-AI/rudalle-xl-surrealist", "pytorch_model.bin", _MALEVICH_V3,
                                "Malevich finetuned on surrealist art, v3 layout"),
    "Kandinsky": Pretrained("dalle", "shonenkov-AI/Kandinsky", "pytorch_model.bin",
                            _frozen(num_layers=64, hidden_size=3840, num_attention_heads=60, hf_version="v3"),
                            "ruDALL-E Kandinsky (XXL) 12B, v3 layout",
                            fallback_repo_ids=("sberbank-ai/rudalle-Kandinsky",)),
    # shared utilities
    "tokenizer": Pretrained("tokenizer", UTILS_REPO, "bpe.model", description="YouTokenToMe BPE, 16384 ids"),
    "vqgan": Pretrained("vae", UTILS_REPO, "vqgan.gumbelf8-sber.model.ckpt",
                        description="Sber VQGAN, gumbel, f=8, 8192 codes, 256 px"),
    "vqgan_dwt": Pretrained("vae", UTILS_REPO, "vqgan.gumbelf8-sber-dwt.model.ckpt", _frozen(dwt=True, out_ch=12),
                            "Sber VQGAN with the 512 px DWT decoder"),
    "x2": Pretrained("realesrgan", UTILS_REPO, "RealESRGAN_x2.pth", _frozen(scale=2), "Real-ESRGAN x2"),
    "x4": Pretrained("realesrgan", UTILS_REPO, "RealESRGAN_x4.pth", _frozen(scale=4), "Real-ESRGAN x4"),
    "x8": Pretrained("realesrgan", UTILS_REPO, "RealESRGAN_x8.pth", _frozen(scale=8), "Real-ESRGAN x8"),
})

KINDS = ("dalle", "vae", "tokenizer", "realesrgan")


def list_pretrained(kind: str | None = None) -> list[str]:
    """Names of the registered weights, optionally only those of one ``kind``
    (``"dalle"``, ``"vae"``, ``"tokenizer"``, ``"realesrgan"``)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    return [name for name, entry in PRETRAINED.items() if kind is None or entry.kind == kind]


def get_pretrained(name: str, kind: str) -> Pretrained:
    """The registry entry ``name`` of ``kind``; ``ValueError`` listing the valid names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    entry = PRETRAINED.get(name)
    if entry is None or entry.kind != kind:
        valid = list_pretrained(kind)
        raise ValueError(f"unknown {kind} model {name!r}. Available: {', '.join(valid)}")
    return entry


def local_folder(name: str, marker: str, *, registered: Collection[str], what: str) -> Optional[Path]:
    """The folder ``name`` means when it is an explicit path, else None (then it is a registered name).

    An explicit path wins over a bundled pipeline or a Hub preset of the same name. ``name`` is one
    when it holds a path separator (``./demo``, ``out/pipeline``), starts with ``~`` or ``.``, or
    is an existing folder holding ``marker`` (``pipeline.json``, ``config.json``). When it is also
    in ``registered``, a warning says that the folder is used.
    """
    separators = {"/", os.sep, os.altsep} - {None}
    explicit = any(sep in name for sep in separators) or name.startswith(("~", "."))
    path = Path(name).expanduser()
    if not explicit and not (path / marker).is_file():
        return None
    if name in registered:
        logger.warning("%r is both a folder here (%s) and a registered %s; using the folder. Rename or move "
                       "the folder to get the registered one.", name, path.resolve(), what)
    return path
