"""The contact sheet of ``rudalle-pipe generate``: every candidate, large enough to judge, each labelled.

Each cell shows one candidate enlarged by a whole factor (nearest neighbour, so the pixels the model drew
stay visible as they are) to at least :data:`MIN_CELL` px, above a dark band with its label (index, rank
and score). Cells are laid out ``ceil(sqrt(n))`` per row by :func:`rudalle_pipe.show.image_grid`, on a
neutral grey: the padding and the empty cells of a short last row are grey, not black.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from .checks import check_int

__all__ = ["MIN_CELL", "LABEL_HEIGHT", "PADDING", "BACKGROUND", "sheet_columns", "cell_side", "sheet_size",
           "contact_sheet"]

MIN_CELL = 256  # px: the smallest side a candidate is shown at
FONT_SIZE = 16  # px
LABEL_LINES = 2
LABEL_HEIGHT = LABEL_LINES * (FONT_SIZE + 4) + 6  # px of the band under each candidate
PADDING = 4  # px between and around the cells
BACKGROUND = (128, 128, 128)  # neutral grey: padding and empty cells
LABEL_BAND, LABEL_TEXT = (40, 40, 40), (255, 255, 255)


def sheet_columns(count: int) -> int:
    """Candidates per row: ``ceil(sqrt(count))``."""
    check_int("count", count)
    return math.isqrt(count - 1) + 1 if count > 1 else 1


def cell_side(side: int) -> int:
    """Side of a candidate's picture on the sheet: ``side`` times the smallest whole factor that reaches
    :data:`MIN_CELL` (64 -> 256, 100 -> 300, 512 -> 512)."""
    check_int("side", side)
    return side * -(-MIN_CELL // side)


def sheet_size(count: int, side: int) -> tuple[int, int]:
    """``(width, height)`` in px of the sheet of ``count`` candidates of ``side`` x ``side`` px."""
    cols = min(sheet_columns(count), count)
    rows = -(-count // cols)
    cell = cell_side(side)
    return cols * cell + (cols + 1) * PADDING, rows * (cell + LABEL_HEIGHT) + (rows + 1) * PADDING


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)  # Pillow >= 10.1: a scalable font
    except TypeError:  # older Pillow: its small bitmap font
        return ImageFont.load_default()


def _cell(image: Image.Image, label: str, side: int) -> Image.Image:
    """One RGBA cell: the picture enlarged to ``side`` px over its label band (at most LABEL_LINES lines)."""
    cell = Image.new("RGBA", (side, side + LABEL_HEIGHT), LABEL_BAND + (255,))
    cell.paste(image.convert("RGB").resize((side, side), Image.NEAREST), (0, 0))
    draw = ImageDraw.Draw(cell)
    for i, line in enumerate(label.splitlines()[:LABEL_LINES]):
        draw.text((6, side + 4 + i * (FONT_SIZE + 4)), line, fill=LABEL_TEXT + (255,), font=_font())
    return cell


def contact_sheet(images: Sequence[Image.Image], labels: Sequence[str]) -> Image.Image:
    """An RGB sheet of ``images`` (all of one square size), each above its label (one or two lines), in
    the given order, ``sheet_columns(len(images))`` per row; its size is :func:`sheet_size`."""
    from .show import image_grid

    if len(labels) != len(images):
        raise ValueError(f"labels must give one label per image: {len(labels)} labels for {len(images)} images")
    if not images:
        raise ValueError("images is empty: a contact sheet needs at least one candidate")
    sizes = {image.size for image in images}
    if len(sizes) != 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
        raise ValueError(f"images must all be square and of one size, got sizes {sorted(sizes)}")
    side = cell_side(images[0].width)
    cells = [_cell(image, label, side) for image, label in zip(images, labels)]
    # opaque RGBA cells composited onto BACKGROUND: the padding and any empty cell come out grey
    return image_grid(cells, nrow=sheet_columns(len(cells)), padding=PADDING, background=BACKGROUND)
