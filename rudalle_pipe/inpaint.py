"""After image-prompted generation: paste the kept pixels back, and outpaint (extend a picture).

- :func:`paste_back`: the VQGAN round trip changes even the kept regions (its codes are a lossy
  summary), so after decoding the kept pixels are put back exactly, blended into the generated side
  over ``feather`` pixels.
- :func:`outpaint`: shift a picture's code grid right (or down) by ``k`` codes and generate the freed
  strip, ``steps`` times, stitching a panorama.

Raster order: the model generates codes row by row, left to right. A strip on the right (or at the
bottom) is generated after the kept codes on its row (or above it), so every new code is conditioned
on the kept picture. A strip on the left (or top) would come first in raster order and see almost
nothing of the kept picture, so ``left``/``up`` are refused with that explanation; flip the picture,
outpaint right/down and flip the result back if you need them (the captions' words such as
"слева"/"справа" then also flip, the model's text semantics are not flip-invariant).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .checks import MAX_IMAGES, MAX_OUTPAINT_STEPS, check_count, check_int
from .generation import check_sampling_args, generate_images, seeds_for
from .image_prompts import ImagePrompt, MaskLike, _check_pil, _encode, _grid_side, keep_pixels
from .images import check_images, images_to_tensor, prepare_image

logger = logging.getLogger(__name__)

__all__ = ["paste_back", "outpaint", "OutpaintOutput", "MAX_FEATHER", "MAX_OUTPAINT_STEPS"]

MAX_FEATHER = 32  # px; 4 codes at 256 px: wider blends smear generated detail for no visible gain


# ------------------------------------------------------------------------------------- paste-back


def paste_back(result_images: Sequence[Image.Image], prompt_image: Image.Image,
               mask: Union[MaskLike, ImagePrompt], *, feather: int = 4) -> list[Image.Image]:
    """Put the kept pixels of ``prompt_image`` back into generated pictures.

    Args:
        result_images: generated pictures, mode ``RGB``, all the same square size ``S x S`` (the
            VQGAN's output, e.g. ``generate_images(...).images``).
        prompt_image: the picture the prompt was made from, any size and mode; brought to ``S x S``
            RGB by :func:`~rudalle_pipe.images.prepare_image` (the helper the prompt used).
        mask: what was kept, one of:

            - a PIL image of mode ``L`` or ``1`` the size of ``prompt_image`` (255 = keep), or a bool
              array/tensor ``[height, width]`` (True = keep); resized to ``S`` exactly as
              :meth:`ImagePrompt.from_mask` resizes it (a pixel is kept only when every source pixel
              under it is);
            - an :class:`~rudalle_pipe.ImagePrompt`: its code mask, each code one ``S/side`` px
              square patch (``side`` must divide ``S``).

            It must keep at least one pixel. A pixel mask restores exactly the pixels it keeps, also
            those inside a patch that :meth:`ImagePrompt.from_mask` generated (a patch with one
            unkept pixel is generated whole); pass the prompt to restore whole kept codes only.
        feather: blend width in pixels, an int in ``[0, MAX_FEATHER]`` (32).

    Semantics, per pixel ``p`` with ``d(p)`` its Euclidean distance in pixels to the nearest kept
    pixel (0 on kept pixels): the input's weight is ``w = max(0, 1 - d / (feather + 1))`` and the
    output is ``round(w * input + (1 - w) * result)``. So kept pixels equal the input exactly
    (``w = 1``); generated pixels at distance ``1..feather`` from the seam ramp linearly from
    ``feather / (feather + 1)`` down to ``1 / (feather + 1)`` of the input; generated pixels farther
    away are unchanged (``w = 0``). ``feather=0`` is a hard cut. The seam always lies on the
    generated side, so nothing of the input is lost.

    Returns:
        new ``S x S`` RGB images, one per result, in order.

    Example::

        prompt = ImagePrompt.from_mask(picture, vae, mask)
        out = generate_images(text, tokenizer, dalle, vae, top_k=1024, top_p=0.99, num_images=4,
                              image_prompt=prompt)
        fixed = paste_back(out.images, picture, mask, feather=4)  # or paste_back(..., prompt)
    """
    results = check_images(result_images, modes=("RGB",), hint=" (generated pictures are RGB)")
    _check_pil(prompt_image, "prompt_image")
    feather = check_int("feather", feather, low=0, high=MAX_FEATHER)
    size = results[0].size
    for i, image in enumerate(results):
        if image.size != size:
            raise ValueError(f"result_images[{i}] is {image.size[0]}x{image.size[1]} px but result_images[0] is "
                             f"{size[0]}x{size[1]} px; all results must have one size")
    if size[0] != size[1]:
        raise ValueError(f"result images must be square (the VQGAN's output), got {size[0]}x{size[1]} px")
    side_px = size[0]
    keep = _keep_mask(mask, prompt_image.size, side_px)
    if not keep.any():
        raise ValueError("the mask keeps no pixel, so there is nothing to paste back (white/True = keep; "
                         "is the mask inverted?)")
    weight = _input_weight(keep, feather)[..., None]  # (S, S, 1) in [0, 1]
    source = np.asarray(prepare_image(prompt_image, side_px), dtype=np.float64)  # (S, S, 3)
    out = []
    for image in results:
        generated = np.asarray(image, dtype=np.float64)
        blended = np.rint(weight * source + (1.0 - weight) * generated).astype(np.uint8)
        out.append(Image.fromarray(blended, "RGB"))
    logger.info("pasted back %d kept pixels of %d into %d images (feather=%d)", int(keep.sum()), keep.size,
                len(out), feather)
    return out


def _keep_mask(mask: Union[MaskLike, ImagePrompt], image_size: tuple[int, int], size: int) -> np.ndarray:
    """The kept pixels ``(size, size)`` bool of a pixel mask or of an :class:`ImagePrompt`'s codes."""
    if isinstance(mask, ImagePrompt):
        if size % mask.side:
            raise ValueError(f"the image prompt's {mask.side}x{mask.side} grid does not divide the "
                             f"{size}x{size} px results: each code must be a whole number of pixels")
        patch = size // mask.side
        grid = mask.mask_grid().numpy()
        return np.repeat(np.repeat(grid, patch, axis=0), patch, axis=1)
    return keep_pixels(mask, image_size, size)


def _input_weight(keep: np.ndarray, feather: int) -> np.ndarray:
    """``max(0, 1 - d / (feather + 1))`` with ``d`` the Euclidean distance to the nearest True of
    ``keep`` (``(H, W)`` bool); exact for ``d <= feather`` by checking every offset in that disc."""
    height, width = keep.shape
    dist = np.where(keep, 0.0, np.inf)
    for dy in range(-feather, feather + 1):
        for dx in range(-feather, feather + 1):
            d = float(np.hypot(dy, dx))
            if d == 0.0 or d > feather:
                continue
            # shifted[y, x] = keep[y + dy, x + dx], False outside the picture
            shifted = np.zeros_like(keep)
            shifted[max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)] = \
                keep[max(0, dy):height - max(0, -dy), max(0, dx):width - max(0, -dx)]
            np.minimum(dist, np.where(shifted, d, np.inf), out=dist)
    return np.clip(1.0 - dist / (feather + 1), 0.0, 1.0)


# -------------------------------------------------------------------------------------- outpainting


@dataclass
class OutpaintOutput:
    """Result of :func:`outpaint` for ``N = num_images`` independent chains of ``steps`` steps.

    images: the last step's generated picture of each chain, ``N`` RGB images of the VQGAN's size.
    codes: ``[N, steps, side * side]`` LongTensor, every step's codes (row-major grid).
    stitched: ``N`` RGB panoramas; see :func:`outpaint` for the layout.
    seeds: ``[N][steps]`` the seed of each generation; ``generate_images(..., seed=s, num_images=1,
        image_prompt=...)`` reproduces a step.
    input_codes: ``[side * side]`` codes of the input picture.
    """

    images: list[Image.Image]
    codes: torch.Tensor
    stitched: list[Image.Image]
    seeds: list[list[int]] = field(default_factory=list)
    input_codes: Optional[torch.Tensor] = None


def outpaint(image: Image.Image, text: str, tokenizer, dalle, vae, *, right: Optional[int] = None,
             down: Optional[int] = None, left: Optional[int] = None, up: Optional[int] = None,
             steps: int = 1, top_k: int, top_p: float, num_images: int = 1, temperature: float = 1.0,
             seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
             progress: bool = False) -> OutpaintOutput:
    """Extend ``image`` to the right (or downwards) by ``k`` codes per step, ``steps`` times.

    Each step shifts the current code grid by ``k`` columns to the left (``right=k``) or ``k`` rows
    up (``down=k``), keeps the ``side - k`` shifted columns (rows) and generates the freed strip with
    ``generate_images(text, ..., image_prompt=ImagePrompt.from_codes(shifted, mask))``. The next
    step starts from the codes just generated.

    Args:
        image: a PIL image, brought to the VQGAN's resolution ``R`` by
            :func:`~rudalle_pipe.images.prepare_image` and encoded.
        text, tokenizer, dalle, vae, top_k, top_p, temperature, progress: as for
            :func:`~rudalle_pipe.generate_images`.
        right / down: ``k``, an int in ``[1, side - 1]`` (codes; ``R / side`` px each). Give exactly
            one. ``left``/``up`` are refused (see the module docstring: in raster order a left/top
            strip would be generated before the kept codes it should continue).
        steps: how many strips to add, in ``[1, MAX_OUTPAINT_STEPS]`` (64).
        num_images: independent chains, in ``[1, 4096]``.
        seed / generator: as for ``generate_images``; chain ``i``'s step ``j`` uses seed
            ``seed + j * num_images + i`` (or the ``(j * num_images + i)``-th seed drawn from
            ``generator``). Each step is one ``num_images=1`` call.

    Stitching: the panorama is the input picture's own pixels (prepared at the decoded size ``P``,
    which is ``R`` except for a decoder that upsamples, e.g. the DWT one gives ``2R``) followed, for
    each step, by the decoded new strip (the last ``k * P / side`` px columns, or rows, of that step's
    picture). So for ``right=k`` it is ``P + steps * k * P / side`` px wide and ``P`` high. The seams
    are hard cuts: the old part is not re-decoded, so it is the input exactly (use
    :func:`paste_back` on a step's picture for a feathered seam).

    Returns:
        :class:`OutpaintOutput`.
    """
    _check_pil(image, "image")
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    for name, value in (("left", left), ("up", up)):
        if value is not None:
            raise ValueError(
                f"{name}={value!r} is not supported: the model generates codes in raster order (rows top to bottom, "
                f"each left to right), so a {'left' if name == 'left' else 'top'} strip would be generated "
                "before, and without seeing, most of the kept picture. Use right= or down= (flip the image for "
                "left/up, and mind that captions' 'слева'/'справа' flip too)")
    given = {name: value for name, value in (("right", right), ("down", down)) if value is not None}
    if len(given) != 1:
        raise ValueError("give exactly one of right= or down= (the number of codes to add), "
                         f"got {sorted(given) or 'none'}")
    (direction, k), = given.items()
    side = _grid_side(vae)
    if dalle.config.image_tokens_per_dim != side:
        raise ValueError(f"the VQGAN's grid is {side}x{side} but the model generates "
                         f"{dalle.config.image_tokens_per_dim}x{dalle.config.image_tokens_per_dim} codes")
    k = check_int(direction, k, low=1, high=side - 1)
    steps = check_int("steps", steps, low=1, high=MAX_OUTPAINT_STEPS)
    num_images = check_count("num_images", num_images, high=MAX_IMAGES)
    check_sampling_args(top_k=top_k, top_p=top_p, temperature=temperature, vocab=dalle.config.image_vocab_size,
                        num_images=1, seed=seed)
    all_seeds = seeds_for(steps * num_images, seed, generator)  # checks seed + steps * num_images too

    resolution = vae.config.resolution
    prepared = prepare_image(image, resolution)
    input_codes = _encode(vae, images_to_tensor([prepared])).view(side, side)
    keep = torch.zeros(side, side, dtype=torch.bool)
    if direction == "right":
        keep[:, : side - k] = True
    else:
        keep[: side - k] = True
    logger.info("outpainting %s by %d codes, %d steps, %d images, for %r", direction, k, steps, num_images, text)

    last_images, all_codes, panoramas, chain_seeds = [], [], [], []
    for i in range(num_images):
        grid = input_codes
        strips, codes, seeds = [], [], []
        for j in range(steps):
            shifted = torch.zeros_like(grid)
            if direction == "right":
                shifted[:, : side - k] = grid[:, k:]
            else:
                shifted[: side - k] = grid[k:]
            prompt = ImagePrompt.from_codes(shifted.reshape(-1), keep.reshape(-1))
            s = all_seeds[j * num_images + i]
            out = generate_images(text, tokenizer, dalle, vae, top_k=top_k, top_p=top_p, num_images=1,
                                  temperature=temperature, seed=s, progress=progress, image_prompt=prompt)
            grid = out.codes[0].cpu().view(side, side)
            frame = out.images[0]
            px = frame.width  # R, or 2R with a decoder that upsamples (the Sber VQGAN's DWT decoder)
            if not strips:
                strips.append(prepared if px == resolution else prepare_image(image, px))
            strip_px = k * px // side
            box = (px - strip_px, 0, px, px) if direction == "right" else (0, px - strip_px, px, px)
            strips.append(frame.crop(box))
            codes.append(grid.reshape(-1))
            seeds.append(s)
        last_images.append(frame)
        all_codes.append(torch.stack(codes))
        panoramas.append(_stitch(strips, direction))
        chain_seeds.append(seeds)
    return OutpaintOutput(images=last_images, codes=torch.stack(all_codes), stitched=panoramas,
                          seeds=chain_seeds, input_codes=input_codes.reshape(-1))


def _stitch(parts: list[Image.Image], direction: str) -> Image.Image:
    """Concatenate RGB ``parts`` left to right (``right``) or top to bottom (``down``)."""
    arrays = [np.asarray(p.convert("RGB")) for p in parts]
    return Image.fromarray(np.concatenate(arrays, axis=1 if direction == "right" else 0), "RGB")
