"""Checks shared by the stages that take lists of PIL images (rerank, upscale, show)."""
from __future__ import annotations

from typing import Iterable, Sequence

from PIL import Image

__all__ = ["check_images"]


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
