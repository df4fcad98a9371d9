"""Emoji with transparent backgrounds: the classic (non-neural) half of the original Emojich
``convert_emoji_to_rgba``.

The background is the near-white region connected to the image border, found by a flood fill from
every border pixel; only that region becomes transparent, so white enclosed by the drawing (eyes
inside an outline, a highlight) stays opaque. Foreground pixels within ``feather`` pixels of the
background get a linear alpha ramp, which softens the cut-out edge. numpy/PIL only (no OpenCV,
no scipy). The original's U-Net path is not implemented.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from PIL import Image

from .checks import check_int
from .images import check_images

logger = logging.getLogger(__name__)

__all__ = ["convert_emoji_to_rgba", "DEFAULT_THRESHOLD", "DEFAULT_FEATHER", "MAX_FEATHER"]

DEFAULT_THRESHOLD = 30  # a pixel is near-white when every channel is >= 255 - threshold (>= 225)
DEFAULT_FEATHER = 2  # pixels of alpha ramp at the edge of the background
MAX_FEATHER = 64


def _run_ids(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Ids ``1..n`` of the horizontal runs of True in a 2-D bool ``mask`` (0 outside the mask);
    a run never continues from one row into the next."""
    starts = mask.copy()
    starts[:, 1:] &= ~mask[:, :-1]
    ids = np.cumsum(starts, axis=None).reshape(mask.shape)
    ids[~mask] = 0
    return ids, int(starts.sum())


def _spread(filled: np.ndarray, ids: np.ndarray, count: int) -> np.ndarray:
    """Fill every run (of ``ids``) that holds a filled pixel."""
    hit = np.zeros(count + 1, dtype=bool)
    hit[ids[filled]] = True
    hit[0] = False
    return hit[ids]


def _background_mask(rgb: np.ndarray, threshold: int) -> np.ndarray:
    """``(H, W)`` bool, True on the near-white pixels 4-connected to the image border.

    The flood fill alternates two vectorised passes, one filling every horizontal run of near-white
    pixels that touches the filled set and one doing the same for vertical runs, until nothing
    changes; each pass crosses a whole run, so it needs about as many passes as the background has
    turns, not as many as it has pixels."""
    near_white = rgb.min(axis=2) >= 255 - threshold
    filled = np.zeros_like(near_white)
    filled[0, :] = near_white[0, :]
    filled[-1, :] = near_white[-1, :]
    filled[:, 0] |= near_white[:, 0]
    filled[:, -1] |= near_white[:, -1]
    row_ids, rows = _run_ids(near_white)
    col_ids, cols = _run_ids(np.ascontiguousarray(near_white.T))
    passes = 0
    while True:
        passes += 1
        grown = _spread(filled, row_ids, rows)
        grown = _spread(np.ascontiguousarray(grown.T), col_ids, cols).T
        if np.array_equal(grown, filled):
            break
        filled = grown
    logger.debug("background flood fill: %d passes, %d of %d pixels", passes, int(filled.sum()), filled.size)
    return filled


def _dilate(mask: np.ndarray) -> np.ndarray:
    """One step of 3x3 (8-neighbour) dilation of a 2-D bool array."""
    out = mask.copy()
    out[1:, :] |= mask[:-1, :]
    out[:-1, :] |= mask[1:, :]
    grown = out.copy()
    grown[:, 1:] |= out[:, :-1]
    grown[:, :-1] |= out[:, 1:]
    return grown


def _alpha(background: np.ndarray, feather: int) -> np.ndarray:
    """uint8 alpha: 0 on the background, ``round(255 * k / (feather + 1))`` on foreground pixels at
    chessboard distance ``k <= feather`` from it, 255 everywhere else."""
    alpha = np.full(background.shape, 255, dtype=np.uint8)
    alpha[background] = 0
    reached = background
    for k in range(1, feather + 1):
        grown = _dilate(reached)
        alpha[grown & ~reached] = round(255 * k / (feather + 1))
        reached = grown
    return alpha


def convert_emoji_to_rgba(
    images: Sequence[Image.Image],
    *,
    threshold: int = DEFAULT_THRESHOLD,
    feather: int = DEFAULT_FEATHER,
) -> list[Image.Image]:
    """Make the white background of emoji pictures transparent (the classic method).

    1. A pixel is *near-white* when each of its R, G, B values is ``>= 255 - threshold``.
    2. The *background* is the near-white pixels 4-connected (up/down/left/right) to a near-white
       pixel on the image border (a flood fill from the border). It gets alpha 0. Near-white regions
       enclosed by the drawing are not background and stay opaque; a region reached only through a
       diagonal gap is not background either. A gap in an outline lets the fill in, as with any flood
       fill.
    3. Foreground pixels at chessboard distance ``k`` (1..``feather``) from the background get alpha
       ``round(255 * k / (feather + 1))`` (for the default ``feather=2``: 85, then 170); all other
       pixels get 255. ``feather=0`` gives a hard edge (alpha only 0 or 255).

    The R, G, B channels are returned unchanged (not un-premultiplied or recoloured). An image with no
    near-white pixel on its border comes back fully opaque.

    Args:
        images: a list of PIL images in mode "RGB", any sizes (e.g. ``GenerationOutput.images``).
        threshold: int in ``[0, 254]``; how far from pure white (255) a channel may be and still count
            as background. 0 takes only pure white; the default 30 takes the off-white, slightly noisy
            backgrounds the Emojich models draw (every channel >= 225).
        feather: int in ``[0, 64]``; width in pixels of the soft alpha edge.

    Returns:
        One "RGBA" image per input, each the size of its input.

    Raises:
        TypeError: ``images`` is not a list of PIL images (the bad index is named), or ``threshold`` /
            ``feather`` is not an int.
        ValueError: an image is not "RGB" (its index and mode are named), the list is empty, or
            ``threshold`` / ``feather`` is out of range.
    """
    images = check_images(images, modes=("RGB",), hint="; convert with image.convert('RGB') first")
    check_int("threshold", threshold, low=0, high=254)
    check_int("feather", feather, low=0, high=MAX_FEATHER)
    out = []
    for image in images:
        rgb = np.asarray(image)
        alpha = _alpha(_background_mask(rgb, threshold), feather)
        out.append(Image.fromarray(np.dstack([rgb, alpha])))  # (H, W, 4) uint8 -> "RGBA"
    return out
