"""rudalle_pipe: ruDALL-E text-to-image generation.

The chain mirrors the original package::

    tokenizer = get_tokenizer()
    dalle = get_rudalle_model("Malevich")
    vae = get_vae()
    out = generate_images("рыжий котик", tokenizer, dalle, vae, top_k=2048, top_p=0.995, num_images=8)
    best = cherry_pick_by_clip(out.images, "рыжий котик", get_clip(), top_n=4)
    big = super_resolution(best.images, get_realesrgan("x4"))
    show(big)
"""
import importlib
import logging
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

# Public name -> the module that defines it. Nothing heavy is imported until a name is used, so that
# `rudalle-pipe --help` (which imports rudalle_pipe.cli) starts without importing torch.
_LAZY = {
    "ClipBundle": "clip",
    "Pipeline": "pipeline",
    "RRDBNet": "realesrgan",
    "RRDBNetConfig": "realesrgan",
    "RerankOutput": "clip",
    "cherry_pick_by_clip": "clip",
    "rerank": "ranking",
    "convert_emoji_to_rgba": "emoji",
    "get_clip": "clip",
    "get_realesrgan": "realesrgan",
    "image_grid": "show",
    "list_pipelines": "pipeline",
    "load_pipeline": "pipeline",
    "save_pipeline": "pipeline",
    "shapes": "shapes",
    "show": "show",
    "super_resolution": "realesrgan",
    "DalleConfig": "dalle",
    "DalleModel": "dalle",
    "DalleOutput": "dalle",
    "GenerationOutput": "generation",
    "GenerationCancelled": "previews",
    "preview_images": "previews",
    "empty_text_ids": "sampling",
    "StaticDecoder": "static_decode",
    "quantize_int8": "quantize",
    "ImagePrompt": "image_prompts",
    "OutpaintOutput": "inpaint",
    "outpaint": "inpaint",
    "paste_back": "inpaint",
    "KVCache": "dalle",
    "WeightsNotFoundError": "hub",
    "YTTMTokenizer": "tokenizer",
    "build_masks": "masks",
    "col_mask": "masks",
    "conv_mask": "masks",
    "filter_logits": "generation",
    "generate_images": "generation",
    "get_rudalle_model": "loader",
    "get_tokenizer": "loader",
    "get_vae": "loader",
    "list_pretrained": "registry",
    "prepare_text": "tokenizer",
    "row_mask": "masks",
}

_SUBMODULES = {"shapes"}  # names that are modules themselves (``show`` is a function in module ``show``)
__all__ = list(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = importlib.import_module(f".{module}", __name__)
    value = value if name in _SUBMODULES else getattr(value, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing submodule ``rudalle_pipe.show`` binds the package attribute ``show`` to that module; the
    public name ``show`` is the function in it (as the eager imports had it), so that binding is skipped."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and name in _LAZY and name not in _SUBMODULES:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from . import shapes
    from .clip import ClipBundle, RerankOutput, cherry_pick_by_clip, get_clip
    from .dalle import DalleConfig, DalleModel, DalleOutput, KVCache
    from .emoji import convert_emoji_to_rgba
    from .generation import GenerationOutput, filter_logits, generate_images
    from .previews import GenerationCancelled, preview_images
    from .sampling import empty_text_ids
    from .static_decode import StaticDecoder
    from .quantize import quantize_int8
    from .hub import WeightsNotFoundError
    from .image_prompts import ImagePrompt
    from .inpaint import OutpaintOutput, outpaint, paste_back
    from .loader import get_rudalle_model, get_tokenizer, get_vae
    from .masks import build_masks, col_mask, conv_mask, row_mask
    from .ranking import rerank
    from .pipeline import Pipeline, list_pipelines, load_pipeline, save_pipeline
    from .realesrgan import RRDBNet, RRDBNetConfig, get_realesrgan, super_resolution
    from .registry import list_pretrained
    from .show import image_grid, show
    from .tokenizer import YTTMTokenizer, prepare_text
