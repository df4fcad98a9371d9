"""Image prompts for ``rudalle-pipe generate``: ``--image-prompt IMG`` with ``--borders`` or ``--mask``,
``--crop-first`` and ``--paste-back [--feather N]``.

Everything is checked before any model loads (:func:`check_image_prompt_args`): the flag
combination, the ``--borders`` spec and its range on the pipeline's VQGAN grid, that the image (and
the mask) decode, that the mask is the image's size, and that the prompt keeps at least one code and
leaves at least one to generate. The prompt itself is encoded once the VQGAN is loaded
(:func:`build_prompt`). With ``--paste-back`` the kept pixels are put back into the decoded
candidates (:func:`rudalle_pipe.inpaint.paste_back`) *before* CLIP reranking, upscaling and the
contact sheet, so all of those see the pasted pictures.
"""
from __future__ import annotations

import argparse
import hashlib
import io
from dataclasses import dataclass
from typing import Optional, Union

__all__ = ["PromptSpec", "add_image_prompt_args", "parse_borders", "check_image_prompt_args", "build_prompt",
           "apply_paste_back", "prompt_record"]

_MAX_FILE_BYTES = 256 * 2**20  # an image file larger than this is refused before decoding


@dataclass
class PromptSpec:
    """What ``--image-prompt`` asks for, checked; ``image`` and ``mask`` are decoded PIL images."""

    file: str  # as typed
    sha256: str  # of the file's bytes
    image: object  # PIL.Image.Image, as decoded
    borders: Optional[Union[int, dict[str, int]]]
    mask_file: Optional[str]
    mask_sha256: Optional[str]
    mask: object  # PIL.Image.Image of mode L or 1, or None
    crop_first: bool
    paste_back: bool
    feather: int
    kept: int  # codes the prompt keeps


def add_image_prompt_args(p: argparse.ArgumentParser) -> None:
    """The image-prompt flags of ``generate``."""
    p.add_argument("--image-prompt", default=None, metavar="IMG",
                   help="keep parts of this picture and generate the rest; needs --borders or --mask")
    p.add_argument("--borders", default=None, metavar="SPEC",
                   help="keep strips along the edges, in codes (8 px at 256 px): up=4,left=2 (keys up, down, "
                        "left, right; missing keys are 0) or one int for all four sides")
    p.add_argument("--mask", default=None, metavar="MASK",
                   help="inpainting: a mask image (mode L or 1) the size of IMG; white (255) keeps, anything else "
                        "is generated (a code is kept only when its whole 8x8 patch is white)")
    p.add_argument("--crop-first", action="store_true",
                   help="with --borders: encode each strip on its own, so kept codes never see the pixels to be "
                        "generated (the original ruDALL-E's behaviour)")
    p.add_argument("--paste-back", action="store_true",
                   help="put the kept pixels of IMG back into each decoded candidate, before reranking and "
                        "upscaling")
    p.add_argument("--feather", type=int, default=None, metavar="N",
                   help="with --paste-back: blend width in px on the generated side (default: 4; 0 = hard cut)")


def parse_borders(text: str) -> Union[int, dict[str, int]]:
    """``"4"`` -> 4; ``"up=4,left=2"`` -> ``{"up": 4, "left": 2}``; raises :class:`UsageError` naming
    ``--borders`` and the valid keys. Ranges are checked against the grid by the caller."""
    from .cli import UsageError
    from .image_prompts import BORDER_KEYS

    hint = f"valid keys: {', '.join(BORDER_KEYS)}; e.g. --borders up=4,left=2 or --borders 4"
    spec = text.strip()
    try:
        return int(spec)
    except ValueError:
        pass
    borders: dict[str, int] = {}
    for part in spec.split(","):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep:
            raise UsageError(f"--borders {text!r}: {part.strip()!r} is not KEY=INT; {hint}")
        if key not in BORDER_KEYS:
            raise UsageError(f"--borders {text!r}: unknown key {key!r}; {hint}")
        if key in borders:
            raise UsageError(f"--borders {text!r}: key {key!r} given twice; {hint}")
        try:
            borders[key] = int(value)
        except ValueError:
            raise UsageError(f"--borders {text!r}: {key}={value!r} is not an int; {hint}") from None
    return borders


def _open_image(flag: str, path: str):
    """``(image, sha256)``: the file at ``path`` decoded by PIL; :class:`UsageError` naming ``flag``."""
    from PIL import Image, UnidentifiedImageError

    from .cli import UsageError, _one_line
    from .files import read_bounded

    try:
        data = read_bounded(path, _MAX_FILE_BYTES, what=flag)
    except (OSError, ValueError) as err:
        raise UsageError(f"{flag} {path}: cannot read it ({_one_line(err)})") from err
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            image = opened.copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise UsageError(f"{flag} {path}: not a picture PIL can decode ({_one_line(err)})") from err
    return image, hashlib.sha256(data).hexdigest()


def check_image_prompt_args(args: argparse.Namespace, source) -> Optional[PromptSpec]:
    """Check the image-prompt flags against ``source`` (the ``--model``, read without weights); ``None``
    without ``--image-prompt``. Raises :class:`UsageError` (exit 2) naming the flag as typed."""
    import torch

    from .checks import check_int
    from .cli import UsageError, _one_line
    from .image_prompts import _check_kept, _parse_borders, keep_pixels
    from .inpaint import MAX_FEATHER

    given = [flag for flag, value in (("--borders", args.borders), ("--mask", args.mask),
                                      ("--crop-first", args.crop_first), ("--paste-back", args.paste_back),
                                      ("--feather", args.feather is not None)) if value]
    if args.image_prompt is None:
        if given:
            raise UsageError(f"{given[0]} needs --image-prompt IMG")
        return None
    if (args.borders is None) == (args.mask is None):
        raise UsageError("--image-prompt needs exactly one of --borders SPEC (keep edge strips) or --mask MASK "
                         f"(inpainting), got {'both' if args.borders is not None else 'neither'}")
    if args.crop_first and args.borders is None:
        raise UsageError("--crop-first only applies to --borders (a --mask prompt encodes the whole picture)")
    if args.feather is not None and not args.paste_back:
        raise UsageError("--feather only applies with --paste-back")
    feather = 4 if args.feather is None else args.feather
    try:
        check_int("--feather", feather, low=0, high=MAX_FEATHER)
    except (TypeError, ValueError) as err:
        raise UsageError(_one_line(err)) from err
    side = source.vae_resolution // source.vae_factor
    borders = None
    if args.borders is not None:
        borders = parse_borders(args.borders)
        try:
            amounts = _parse_borders(borders, side)
        except (TypeError, ValueError) as err:
            raise UsageError(f"--borders {args.borders!r}: {_one_line(err)}") from err
        keep = torch.zeros(side, side, dtype=torch.bool)
        keep[:amounts["up"]] = True
        keep[side - amounts["down"]:] = True
        keep[:, :amounts["left"]] = True
        keep[:, side - amounts["right"]:] = True
        kept = int(keep.sum())
        what = f"--borders {args.borders!r}"
    image, sha = _open_image("--image-prompt", args.image_prompt)
    mask = mask_sha = None
    if args.mask is not None:
        mask, mask_sha = _open_image("--mask", args.mask)
        if mask.mode not in ("L", "1"):
            raise UsageError(f"--mask {args.mask}: mode {mask.mode!r}; a mask must be grayscale (mode L or 1, "
                             "white = keep): save it as a grayscale PNG")
        try:
            pixels = keep_pixels(mask, image.size, source.vae_resolution)
        except (TypeError, ValueError) as err:
            raise UsageError(f"--mask {args.mask}: {_one_line(err)} (--image-prompt {args.image_prompt})") from err
        f = source.vae_factor
        kept = int(pixels.reshape(side, f, side, f).all(axis=(1, 3)).sum())
        what = f"--mask {args.mask}"
    try:
        _check_kept(kept, side * side)
    except ValueError as err:
        raise UsageError(f"{what}: {_one_line(err)}") from err
    return PromptSpec(args.image_prompt, sha, image, borders, args.mask, mask_sha, mask, args.crop_first,
                      args.paste_back, feather, kept)


def build_prompt(spec: PromptSpec, vae):
    """The :class:`~rudalle_pipe.ImagePrompt` of ``spec`` (encodes the picture with ``vae``)."""
    from .image_prompts import ImagePrompt

    if spec.borders is not None:
        return ImagePrompt.from_borders(spec.image, vae, spec.borders, crop_first=spec.crop_first)
    return ImagePrompt.from_mask(spec.image, vae, spec.mask)


def apply_paste_back(images: list, spec: PromptSpec, prompt) -> list:
    """``images`` with the kept pixels pasted back when ``--paste-back`` was given (else unchanged):
    the prompt's kept codes for ``--borders``, the mask's kept pixels for ``--mask``."""
    if not spec.paste_back:
        return images
    from .inpaint import paste_back

    return paste_back(images, spec.image, prompt if spec.mask is None else spec.mask, feather=spec.feather)


def prompt_record(spec: PromptSpec, prompt) -> dict:
    """The ``image_prompt`` entry of results.json."""
    record: dict = {"file": spec.file, "sha256": spec.sha256, "kept": prompt.num_kept, "side": prompt.side}
    if spec.borders is not None:
        record["borders"] = spec.borders
    else:
        record["mask"] = {"file": spec.mask_file, "sha256": spec.mask_sha256}
    record.update(crop_first=spec.crop_first, paste_back=spec.paste_back,
                  feather=spec.feather if spec.paste_back else None)
    return record
