"""Image prompts: VQGAN codes of a picture that generation keeps, while the model draws the rest.

An :class:`ImagePrompt` holds a full code grid and a keep-mask over it. ``generate_images(...,
image_prompt=prompt)`` copies the kept codes in (never sampling them) and samples every other
position, in raster order, conditioned on the kept codes before it.

Constructors:

- :meth:`ImagePrompt.from_borders`: keep strips along the edges, like the original ruDALL-E's
  ``ImagePrompts(pil_image, borders, vae, crop_first=...)`` (same codes and kept positions);
- :meth:`ImagePrompt.from_mask`: keep the codes whose whole pixel patch a mask keeps (inpainting);
- :meth:`ImagePrompt.from_codes`: from codes and a mask directly.

Every picture is first brought to the VQGAN's resolution by :func:`rudalle_pipe.images.prepare_image`
(shorter side resized, bicubic, then centre-cropped), the same helper that finetuning uses.

A prompt must keep at least one code and leave at least one to generate: a mask that keeps nothing
is an error (drop ``image_prompt`` instead), and so is one that keeps everything (nothing to
generate; decode the codes with the VQGAN instead).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, Union

import numpy as np
import torch
from PIL import Image

from .checks import check_int
from .images import images_to_tensor, prepare_image, resize_and_crop

logger = logging.getLogger(__name__)

__all__ = ["ImagePrompt", "BORDER_KEYS"]

BORDER_KEYS = ("up", "down", "left", "right")

MaskLike = Union[Image.Image, np.ndarray, torch.Tensor]


@dataclass(frozen=True)
class ImagePrompt:
    """Codes to keep during generation.

    Attributes:
        codes: ``[side * side]`` LongTensor of VQGAN codes, row-major over the grid, all ``>= 0``.
            Only the kept positions matter (the others are whatever the constructor put there).
        mask: ``[side * side]`` bool tensor, True = keep this code (copy it in, never sample it).
        side: grid size in codes per side (32 for ruDALL-E: a 32x32 grid of 8x8 px patches at 256 px).

    Raises (on construction):
        TypeError/ValueError: shapes or dtypes are wrong, a code is negative, or the mask keeps
            every code or none.
    """

    codes: torch.Tensor
    mask: torch.Tensor
    side: int

    def __post_init__(self) -> None:
        side = check_int("side", self.side, low=1)
        n = side * side
        if not isinstance(self.codes, torch.Tensor) or self.codes.dtype != torch.long:
            got = self.codes.dtype if isinstance(self.codes, torch.Tensor) else type(self.codes).__name__
            raise TypeError(f"codes must be a LongTensor [{n}], got {got}")
        if not isinstance(self.mask, torch.Tensor) or self.mask.dtype != torch.bool:
            got = self.mask.dtype if isinstance(self.mask, torch.Tensor) else type(self.mask).__name__
            raise TypeError(f"mask must be a bool tensor [{n}], got {got}")
        if tuple(self.codes.shape) != (n,) or tuple(self.mask.shape) != (n,):
            raise ValueError(f"codes and mask must both have shape [{n}] (a {side}x{side} grid), got "
                             f"{tuple(self.codes.shape)} and {tuple(self.mask.shape)}")
        if n and int(self.codes.min()) < 0:
            raise ValueError(f"codes must be >= 0 (image vocabulary ids), got a minimum of {int(self.codes.min())}")
        _check_kept(self.num_kept, n)

    @property
    def num_kept(self) -> int:
        """How many codes are kept, in ``[1, side * side - 1]``."""
        return int(self.mask.sum())

    def mask_grid(self) -> torch.Tensor:
        """The keep-mask as a ``[side, side]`` bool grid (row, column)."""
        return self.mask.view(self.side, self.side)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_codes(cls, codes: torch.Tensor, mask: torch.Tensor) -> "ImagePrompt":
        """A prompt from ``codes [n]`` (any integer dtype, values ``>= 0``) and ``mask [n]`` (bool,
        True = keep); ``n`` must be a square (``side * side``). The tensors are copied to the CPU."""
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex() \
                or codes.dtype == torch.bool:
            got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise TypeError(f"codes must be an integer tensor [side * side], got {got}")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a bool tensor [side * side] (True = keep), got {got}")
        if codes.ndim != 1 or codes.numel() == 0:
            raise ValueError(f"codes must be a 1-d tensor [side * side], got shape {tuple(codes.shape)}")
        side = math.isqrt(codes.numel())
        if side * side != codes.numel():
            raise ValueError(f"codes must form a square grid, but {codes.numel()} is not a square (e.g. 1024 = 32x32)")
        return cls(codes=codes.detach().to("cpu", torch.long).clone(), mask=mask.detach().cpu().clone(), side=side)

    @classmethod
    def from_borders(cls, image: Image.Image, vae, borders: Union[int, Mapping[str, int]], *,
                     crop_first: bool = False) -> "ImagePrompt":
        """Keep strips of ``image`` along its edges, as the original ruDALL-E's ``ImagePrompts``.

        Args:
            image: a PIL image; brought to ``vae.config.resolution`` (256 px) by
                :func:`~rudalle_pipe.images.prepare_image`.
            vae: the VQGAN (:func:`rudalle_pipe.get_vae`); its grid is ``resolution / 8`` codes a side.
            borders: ``{"up": u, "down": d, "left": l, "right": r}`` (any subset; missing keys are 0)
                in code units (8 px at 256 px), each in ``[0, side - 1]``; or one int for all four.
                ``up`` keeps the top ``u`` rows, ``left`` the leftmost ``l`` columns, and so on.
            crop_first: False encodes the whole picture once and keeps the border codes. True
                encodes each border strip on its own (as the original: down, right, left, then up,
                a later strip overwriting the corners it shares with an earlier one), so the kept
                codes never see the pixels that will be generated; positions not kept hold 0.

        Returns:
            an :class:`ImagePrompt` with ``side = resolution / 8``.
        """
        _check_pil(image, "image")
        if not isinstance(crop_first, bool):
            raise TypeError(f"crop_first must be True or False, got {crop_first!r}")
        side = _grid_side(vae)
        amounts = _parse_borders(borders, side)
        keep = torch.zeros(side, side, dtype=torch.bool)
        up, down, left, right = (amounts[k] for k in BORDER_KEYS)
        keep[:up] = True
        keep[side - down:] = True
        keep[:, :left] = True
        keep[:, side - right:] = True
        n_kept = _check_kept(int(keep.sum()), side * side)  # before the slow encoding
        pixels = images_to_tensor([prepare_image(image, vae.config.resolution)])  # (1, 3, 8s, 8s) in [0, 1]
        if not crop_first:
            codes = _encode(vae, pixels).view(side, side)
        else:
            f = vae.downsample_factor
            codes = torch.zeros(side, side, dtype=torch.long)
            strips = {"down": (slice(side - down, side), slice(0, side)),
                      "right": (slice(0, side), slice(side - right, side)),
                      "left": (slice(0, side), slice(0, left)),
                      "up": (slice(0, up), slice(0, side))}
            for key in ("down", "right", "left", "up"):  # the original's order: later strips win at corners
                if amounts[key] == 0:
                    continue
                rows, cols = strips[key]
                strip = pixels[:, :, rows.start * f: rows.stop * f, cols.start * f: cols.stop * f]
                codes[rows, cols] = _encode(vae, strip).view(rows.stop - rows.start, cols.stop - cols.start)
        logger.info("image prompt from borders %s (crop_first=%s): %d of %d codes kept", amounts, crop_first,
                    n_kept, side * side)
        return cls(codes=codes.reshape(-1), mask=keep.reshape(-1), side=side)

    @classmethod
    def from_mask(cls, image: Image.Image, vae, mask: MaskLike) -> "ImagePrompt":
        """Keep the codes of ``image`` whose whole pixel patch ``mask`` keeps (inpainting).

        Args:
            image: a PIL image of any size.
            vae: the VQGAN; the grid is ``resolution / 8`` codes a side.
            mask: the same size as ``image``: a PIL image of mode ``L`` or ``1`` (white, 255, keeps;
                any other value generates) or a bool ``numpy`` array / tensor ``[height, width]``
                (True keeps).

        The rule: the image and the mask are brought to ``resolution`` px by the same
        resize-and-centre-crop; the mask by area averaging, so that a resized pixel is kept only
        when every source pixel under it is kept. A code is kept only when all the pixels of its
        ``8 x 8`` patch are kept; a patch with a single generated pixel is generated.
        """
        _check_pil(image, "image")
        side = _grid_side(vae)
        size = vae.config.resolution
        resized = keep_pixels(mask, image.size, size)  # (size, size) bool
        f = size // side
        keep = torch.from_numpy(resized.reshape(side, f, side, f).all(axis=(1, 3)).copy())  # (side, side)
        n_kept = _check_kept(int(keep.sum()), side * side)  # before the slow encoding
        codes = _encode(vae, images_to_tensor([prepare_image(image, size)]))
        logger.info("image prompt from a mask: %d of %d codes kept", n_kept, side * side)
        return cls(codes=codes.reshape(-1), mask=keep.reshape(-1), side=side)


# ---------------------------------------------------------------------- helpers


def _check_kept(kept: int, n: int) -> int:
    """``kept`` if in ``[1, n - 1]``; else a ``ValueError`` saying what to do instead."""
    if kept == 0:
        raise ValueError(f"the image prompt keeps none of the {n} codes: drop image_prompt to generate "
                         "the whole image, or keep at least one code")
    if kept == n:
        raise ValueError(f"the image prompt keeps all {n} codes, so there is nothing to generate: keep "
                         f"at most {n - 1} (or decode the codes with the VQGAN)")
    return kept


def _check_pil(image: object, name: str) -> None:
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name} must be a PIL.Image.Image, got {type(image).__name__} "
                        "(open files with PIL.Image.open first)")


def _grid_side(vae) -> int:
    """Codes per side of the VQGAN's grid at its resolution (32 for the Sber VQGAN at 256 px)."""
    resolution, f = vae.config.resolution, vae.downsample_factor
    if resolution % f:
        raise ValueError(f"the VQGAN's resolution {resolution} is not a multiple of its factor {f}")
    return resolution // f


def _encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Codes ``[h * w]`` (CPU, int64) of ``pixels (1, 3, 8h, 8w)`` in [0, 1] by deterministic argmax."""
    device = next(vae.parameters()).device
    return vae.get_codebook_indices(pixels.to(device))[0].cpu().long()


def _parse_borders(borders: Union[int, Mapping[str, int]], side: int) -> dict[str, int]:
    """``{"up", "down", "left", "right"}`` -> amounts in ``[0, side - 1]``; raises naming bad keys/values."""
    if isinstance(borders, Mapping):
        unknown = sorted(str(k) for k in borders if k not in BORDER_KEYS)
        if unknown:
            raise ValueError(f"unknown border key(s) {unknown}; valid keys: {list(BORDER_KEYS)}")
        amounts = {k: borders.get(k, 0) for k in BORDER_KEYS}
    elif isinstance(borders, int) and not isinstance(borders, bool):
        amounts = {k: borders for k in BORDER_KEYS}
    else:
        raise TypeError(f"borders must be a dict with keys {list(BORDER_KEYS)} or one int, "
                        f"got {type(borders).__name__}")
    for key, value in amounts.items():
        check_int(f"borders[{key!r}] (in codes of 8 px, grid {side}x{side})", value, low=0, high=side - 1)
    return amounts


def keep_pixels(mask: MaskLike, image_size: tuple[int, int], size: int) -> np.ndarray:
    """The kept pixels of ``mask`` (checked against ``image_size``, PIL's ``(width, height)``) at
    ``size x size``: bool ``(size, size)``, True = keep. The mask goes through the same
    resize-and-centre-crop as its image, by area averaging, so that a resized pixel is kept only when
    every source pixel under it is kept (shared by :meth:`ImagePrompt.from_mask` and paste-back)."""
    as_float = Image.fromarray(_mask_array(mask, image_size).astype(np.float32))  # mode F
    return np.asarray(resize_and_crop(as_float, size, Image.BOX)) >= 1.0 - 1e-4


def _mask_array(mask: MaskLike, size: tuple[int, int]) -> np.ndarray:
    """``mask`` as a bool array ``(height, width)`` (True = keep), checked against the image ``size``
    (``(width, height)``, PIL's order)."""
    width, height = size
    if isinstance(mask, Image.Image):
        if mask.mode not in ("L", "1"):
            raise ValueError(f"a mask image must have mode 'L' or '1' (white = keep), got mode {mask.mode!r}; "
                             "convert it with mask.convert('L')")
        if mask.size != size:
            raise ValueError(f"the mask is {mask.size[0]}x{mask.size[1]} px but the image is {width}x{height} px; "
                             "they must be the same size")
        return np.asarray(mask.convert("L")) == 255
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"mask must be a PIL image (mode 'L' or '1') or a bool array [height, width], "
                        f"got {type(mask).__name__}")
    if mask.dtype != np.bool_:
        raise TypeError(f"a mask array must be bool (True = keep), got dtype {mask.dtype}")
    if mask.shape != (height, width):
        raise ValueError(f"the mask array has shape {mask.shape} but the image needs [height, width] = "
                         f"({height}, {width}); they must be the same size")
    return mask
