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
from typing import Sequence

from PIL import Image

from .checks import check_int
from .files import atomic_write
from .images import check_images

logger = logging.getLogger(__name__)

__all__ = ["image_grid", "show"]

_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")  # modes the grid accepts (converted to the grid's mode)


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


def image_grid(
    images: Sequence[Image.Image],
    *,
    nrow: int = 4,
    size: int | tuple[int, int] | None = None,
    padding: int = 2,
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

    Returns:
        The grid, ``cols * w + (cols + 1) * padding`` wide and ``rows * h + (rows + 1) * padding``
        high with ``cols = min(nrow, len(images))`` and ``rows = ceil(len(images) / cols)``. Its mode is
        "L" if every image is "L", "RGBA" (transparent background) if any image has alpha, else
        "RGB" (black background).
    """
    images = _check_images(images)
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
    return grid


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
) -> Image.Image:
    """Show ``images`` as a grid in a notebook and optionally save them; returns the grid.

    Inside a Jupyter kernel the grid is displayed with ``IPython.display.display``; anywhere else
    nothing is shown or printed. (In a notebook, end the line with ``;`` or assign the result, or the
    returned grid is displayed a second time as the cell's value.)

    Args:
        images, nrow, size, padding: as in :func:`image_grid`.
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
    grid = image_grid(images, nrow=nrow, size=size, padding=padding)
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
