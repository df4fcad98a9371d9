"""Image helpers shared by every stage: checks of PIL image lists (rerank, upscale, show), the one
resize-and-centre-crop that brings pictures to the VQGAN's resolution (finetuning and image prompts),
and the one PIL -> tensor conversion that feeds the VQGAN's encoder."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .checks import one_line

__all__ = ["check_images", "DECODE_ERRORS", "resize_and_crop", "prepare_image", "images_to_tensor"]

DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on bad files


def check_images(images: Sequence[Image.Image], *, modes: Iterable[str] | None = None,
                 hint: str = "") -> list[Image.Image]:
    """Return ``images`` as a list, or raise naming the problem.

    Raises:
        TypeError: ``images`` is not a sequence (a single image counts as a mistake), or an element
            is not a ``PIL.Image.Image`` (its index and type are named).
        ValueError: the list is empty, or an image's mode is not in ``modes`` (with ``hint`` added).
    """
    if isinstance(images, (Image.Image, str, bytes)) or not isinstance(images, Sequence):
        raise TypeError(f"images must be a list of PIL images, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images is empty: pass at least one PIL image")
    allowed = list(modes) if modes is not None else None
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"images[{i}] is a {type(image).__name__}, expected a PIL.Image.Image")
        if allowed is not None and image.mode not in allowed:
            raise ValueError(f"images[{i}] has mode {image.mode!r}; supported modes: {allowed}{hint}")
    return list(images)


def resize_and_crop(image: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    """``size x size``, same mode: the shorter side resized to ``size`` with ``resample``, then the
    centre cropped (an offset of ``(extra) // 2`` from the top/left). An image already ``size x size``
    is returned unchanged (a copy)."""
    w, h = image.size
    if (w, h) == (size, size):
        return image.copy()
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def prepare_image(image: Union[Image.Image, str, Path], size: int) -> Image.Image:
    """RGB ``size x size``: the shorter side resized to ``size`` (bicubic), then centre-cropped
    (:func:`resize_and_crop`). ``image`` is a PIL image or a path.

    Raises ``ValueError`` naming the file when a path does not decode."""
    if not isinstance(image, Image.Image):
        try:
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        except DECODE_ERRORS as err:
            raise ValueError(f"image {image} cannot be decoded ({one_line(err)})") from None
    return resize_and_crop(image.convert("RGB"), size)


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB PIL images of one size -> float32 ``(B, 3, H, W)`` in ``[0, 1]`` (pixel / 255), the input
    of ``VQGAN.get_codebook_indices``."""
    batch = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images])
    return batch.float() / 255.0
