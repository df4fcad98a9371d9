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
import logging

from . import shapes
from .clip import ClipBundle, RerankOutput, cherry_pick_by_clip, get_clip
from .dalle import DalleConfig, DalleModel, DalleOutput, KVCache
from .emoji import convert_emoji_to_rgba
from .generation import GenerationOutput, filter_logits, generate_images
from .previews import GenerationCancelled, preview_images
from .sampling import empty_text_ids
from .static_decode import StaticDecoder
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

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "ClipBundle",
    "Pipeline",
    "RRDBNet",
    "RRDBNetConfig",
    "RerankOutput",
    "cherry_pick_by_clip",
    "rerank",
    "convert_emoji_to_rgba",
    "get_clip",
    "get_realesrgan",
    "image_grid",
    "list_pipelines",
    "load_pipeline",
    "save_pipeline",
    "shapes",
    "show",
    "super_resolution",
    "DalleConfig",
    "DalleModel",
    "DalleOutput",
    "GenerationOutput",
    "GenerationCancelled",
    "preview_images",
    "empty_text_ids",
    "StaticDecoder",
    "ImagePrompt",
    "OutpaintOutput",
    "outpaint",
    "paste_back",
    "KVCache",
    "WeightsNotFoundError",
    "YTTMTokenizer",
    "build_masks",
    "col_mask",
    "conv_mask",
    "filter_logits",
    "generate_images",
    "get_rudalle_model",
    "get_tokenizer",
    "get_vae",
    "list_pretrained",
    "prepare_text",
    "row_mask",
]
