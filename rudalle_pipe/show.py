"""Looking at results: :func:`image_grid` lays PIL images out in a grid and :func:`show` displays it
inline in a notebook and optionally saves the grid and every image as PNG.

Nothing here prints or opens a window: outside a Jupyter/IPython kernel :func:`show` only returns
the grid (and writes files when asked to). IPython is never imported unless it is already loaded.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageColor

from .checks import check_int
from .files import atomic_write
from .images import check_images

logger = logging.getLogger(__name__)

__all__ = ["image_grid", "show", "checkerboard"]

_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")  # modes the grid accepts (converted to the grid's mode)
CHECKERBOARD = "checkerboard"
CHECKER_COLORS = ((255, 255, 255), (204, 204, 204))  # white and light grey, the usual "transparent" look
CHECKER_SQUARE = 8  # pixels per checkerboard square

Background = Union[str, tuple[int, int, int], None]


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("LA", "RGBA") or (image.mode == "P" and "transparency" in image.info)


def _check_images(images: Sequence[Image.Image]) -> list[Image.Image]:
    """Raise TypeError/ValueError naming the bad argument; return the images as a list."""
    images = check_images(images, modes=_MODES)
    for i, image in enumerate(images):
        if image.width < 1 or image.height < 1:
            raise ValueError(f"images[{i}] is empty ({image.width}x{image.height})")
    return images


def _cell_size(images: list[Image.Image], size: int | tuple[int, int] | None) -> tuple[int, int]:
    """``(width, height)`` of one grid cell."""
    if size is None:
        return images[0].size
    if isinstance(size, tuple) and len(size) == 2:
        for value in size:
            check_int("size", value, low=1)
        return size
    check_int("size", size, low=1)
    return size, size


def _check_background(background: Background) -> Background:
    """``background`` as ``"checkerboard"``, an RGB tuple or None; raise naming the valid choices."""
    choices = '"checkerboard", a colour name or "#rrggbb" string, an (r, g, b) tuple of ints 0..255, or None'
    if background is None or (isinstance(background, str) and background == CHECKERBOARD):
        return background
    if isinstance(background, str):
        try:
            return ImageColor.getrgb(background)[:3]
        except ValueError:
            raise ValueError(f"background must be {choices}; got the unknown colour {background!r}") from None
    if isinstance(background, tuple) and len(background) == 3:
        for i, value in enumerate(background):
            check_int(f"background[{i}]", value, low=0, high=255)
        return background
    raise TypeError(f"background must be {choices}; got {background!r} ({type(background).__name__})")


def checkerboard(size: tuple[int, int], *, square: int = CHECKER_SQUARE,
                 colors: tuple[tuple[int, int, int], tuple[int, int, int]] = CHECKER_COLORS) -> Image.Image:
    """An "RGB" checkerboard of ``size = (width, height)``: ``square x square`` squares, ``colors[0]``
    in the top-left one, alternating along rows and columns."""
    width, height = size
    ys, xs = np.indices((height, width))
    odd = ((ys // square + xs // square) % 2).astype(bool)
    pixels = np.where(odd[..., None], np.array(colors[1], np.uint8), np.array(colors[0], np.uint8))
    return Image.fromarray(pixels.astype(np.uint8))


def _flatten(grid: Image.Image, background: Background) -> Image.Image:
    """An "RGBA" ``grid`` composited over ``background`` (an "RGB" result); other grids unchanged."""
    if background is None or grid.mode != "RGBA":
        return grid
    if isinstance(background, str):  # "checkerboard": colours were resolved to tuples by the check
        base = checkerboard(grid.size)
    else:
        base = Image.new("RGB", grid.size, background)
    return Image.alpha_composite(base.convert("RGBA"), grid).convert("RGB")


def image_grid(
    images: Sequence[Image.Image],
    *,
    nrow: int = 4,
    size: int | tuple[int, int] | None = None,
    padding: int = 2,
    background: Background = None,
) -> Image.Image:
    """Lay ``images`` out row by row, ``nrow`` images per row (like torchvision's ``make_grid``).

    Args:
        images: one or more PIL images in mode "RGB", "RGBA", "L", "LA", "P" or "1", any sizes.
        nrow: images per row (>= 1). With fewer images than ``nrow`` the grid is one row of
            ``len(images)`` cells; a short last row is padded with empty (background) cells.
        size: cell size: ``None`` uses the first image's size, an int ``s`` gives ``s x s`` cells,
            a tuple is ``(width, height)``. Images of another size are resized (bicubic, aspect
            ratio not kept) to the cell size; none is cropped.
        padding: pixels of background between cells and around the border (>= 0).
        background: what a grid with transparency (any image with alpha) is composited onto:
            ``None`` (the default here) keeps the "RGBA" grid with its transparency;
            ``"checkerboard"`` draws it over white/light-grey 8 px squares (aligned to the grid's
            top-left corner); a colour name or ``"#rrggbb"`` string (anything ``PIL.ImageColor``
            knows) or an ``(r, g, b)`` tuple of ints 0..255 draws it over that colour. Composited
            grids are "RGB"; the transparent padding shows the background too. Grids without alpha
            ("L"/"RGB") are never changed by it.

    Returns:
        The grid, ``cols * w + (cols + 1) * padding`` wide and ``rows * h + (rows + 1) * padding``
        high with ``cols = min(nrow, len(images))`` and ``rows = ceil(len(images) / cols)``. Its mode is
        "L" if every image is "L"; if any image has alpha it is "RGBA" (transparent background) with
        ``background=None``, else "RGB" composited onto ``background``; otherwise "RGB" (black
        background).
    """
    images = _check_images(images)
    background = _check_background(background)
    check_int("nrow", nrow, low=1)
    check_int("padding", padding, low=0)
    width, height = _cell_size(images, size)
    if all(image.mode == "L" for image in images):
        mode = "L"
    else:
        mode = "RGBA" if any(_has_alpha(image) for image in images) else "RGB"
    cols = min(nrow, len(images))
    rows = -(-len(images) // cols)
    grid = Image.new(mode, (cols * width + (cols + 1) * padding, rows * height + (rows + 1) * padding))
    for i, image in enumerate(images):
        cell = image.convert(mode)
        if cell.size != (width, height):
            cell = cell.resize((width, height), Image.Resampling.BICUBIC)
        row, col = divmod(i, cols)
        grid.paste(cell, (padding + col * (width + padding), padding + row * (height + padding)))
    return _flatten(grid, background)


def _in_notebook() -> bool:
    """True inside a Jupyter/IPython kernel (not a terminal IPython). Never imports IPython."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    if get_ipython is None:
        return False
    try:
        shell = get_ipython()
    except Exception:  # noqa: BLE001 - a broken/foreign IPython just means "not a notebook"
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


def show(
    images: Sequence[Image.Image],
    *,
    nrow: int = 4,
    save_dir: str | os.PathLike | None = None,
    size: int | tuple[int, int] | None = None,
    prefix: str = "image",
    padding: int = 2,
    overwrite: bool = False,
    background: Background = CHECKERBOARD,
) -> Image.Image:
    """Show ``images`` as a grid in a notebook and optionally save them; returns the grid.

    Inside a Jupyter kernel the grid is displayed with ``IPython.display.display``; anywhere else
    nothing is shown or printed. (In a notebook, end the line with ``;`` or assign the result, or the
    returned grid is displayed a second time as the cell's value.)

    Args:
        images, nrow, size, padding: as in :func:`image_grid`.
        background: as in :func:`image_grid`, but the default here is ``"checkerboard"``, so RGBA
            images (e.g. from :func:`rudalle_pipe.convert_emoji_to_rgba`) are shown, returned and saved
            as ``grid.png`` on a checkerboard; pass a colour to use that instead, or ``None`` to keep
            the transparency in the returned and saved grid. The single images are always saved as
            they are (RGBA images keep their alpha).
        save_dir: if given, the directory (created if missing) receives ``grid.png`` and every image
            at its own size as ``{prefix}_{i:03d}.png``, all PNG.
        prefix: file name prefix of the single images.
        overwrite: replace existing files. Without it every target is checked before anything is
            written, and an existing one raises ``FileExistsError`` naming it. Every file is written
            atomically (a temporary name, then a rename); without ``overwrite`` a failure (full disk,
            Ctrl-C) removes the files this call already wrote.

    Returns:
        The grid as a PIL image (see :func:`image_grid`).
    """
    grid = image_grid(images, nrow=nrow, size=size, padding=padding, background=background)
    if save_dir is not None:
        if not isinstance(prefix, str) or not prefix or any(sep in prefix for sep in ("/", "\\")):
            raise ValueError(f"prefix must be a non-empty file name part without slashes, got {prefix!r}")
        directory = Path(save_dir)
        targets = [directory / "grid.png"] + [directory / f"{prefix}_{i:03d}.png" for i in range(len(images))]
        if not overwrite:
            for path in targets:
                if path.exists():
                    raise FileExistsError(f"{path} already exists; pass overwrite=True or choose another save_dir")
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        try:
            for path, image in zip(targets, [grid, *images]):
                atomic_write(path, lambda f, image=image: image.save(f, format="PNG"), overwrite=overwrite)
                written.append(path)
        except BaseException:  # a full disk or Ctrl-C: remove the files this call created
            if not overwrite:
                for path in written:
                    path.unlink(missing_ok=True)
            raise
        logger.info("saved %s and %d images to %s", targets[0].name, len(images), directory)
    if _in_notebook():
        importlib.import_module("IPython.display").display(grid)
    return grid
