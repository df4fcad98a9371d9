"""The contact sheet of `rudalle-pipe generate`: cells large enough to judge, labelled, grey where empty."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rudalle_pipe.contact_sheet import (BACKGROUND, LABEL_HEIGHT, MIN_CELL, PADDING, cell_side, contact_sheet,
                                        sheet_columns, sheet_size)


def _candidates(n: int, side: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(n)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def _cell_origin(k: int, cols: int, cell: int) -> tuple[int, int]:
    return PADDING + (k // cols) * (cell + LABEL_HEIGHT + PADDING), PADDING + (k % cols) * (cell + PADDING)


@pytest.mark.parametrize("side,cell", [(64, 256), (32, 256), (100, 300), (256, 256), (512, 512)])
def test_cells_are_at_least_256_px_by_whole_factors(side, cell):
    assert cell_side(side) == cell >= MIN_CELL and cell % side == 0


def test_eight_candidates_labelled_with_a_grey_empty_cell():
    images = _candidates(8)
    labels = [f"#{k}  rank {8 - k}/8\nclip {0.1 * k:.3f}" for k in range(8)]
    sheet = contact_sheet(images, labels)
    cols, cell = sheet_columns(8), cell_side(64)
    assert cols == 3 and sheet.mode == "RGB" and sheet.size == sheet_size(8, 64) == (
        3 * cell + 4 * PADDING, 3 * (cell + LABEL_HEIGHT) + 4 * PADDING)
    pixels = np.asarray(sheet)
    bands = []
    for k, image in enumerate(images):
        top, left = _cell_origin(k, cols, cell)
        expected = np.asarray(image.resize((cell, cell), Image.NEAREST))
        assert np.array_equal(pixels[top:top + cell, left:left + cell], expected)  # the picture, pixel for pixel
        band = pixels[top + cell:top + cell + LABEL_HEIGHT, left:left + cell]
        assert (band > 200).all(axis=-1).sum() > 50  # white text drawn on the dark band
        bands.append(band)
    assert not np.array_equal(bands[0], bands[1])  # each cell carries its own label
    top, left = _cell_origin(8, cols, cell)  # the ninth cell of the 3 x 3 grid is empty
    assert (pixels[top:top + cell + LABEL_HEIGHT, left:left + cell] == BACKGROUND).all()
    assert (pixels[:PADDING] == BACKGROUND).all()  # and the padding is the same neutral grey


def test_one_candidate_and_bad_input():
    sheet = contact_sheet(_candidates(1, 256), ["#0"])
    assert sheet.size == (256 + 2 * PADDING, 256 + LABEL_HEIGHT + 2 * PADDING)
    with pytest.raises(ValueError, match="one label per image: 1 labels for 2 images"):
        contact_sheet(_candidates(2), ["#0"])
    with pytest.raises(ValueError, match="at least one candidate"):
        contact_sheet([], [])
    with pytest.raises(ValueError, match=r"square and of one size, got sizes \[\(32, 32\), \(64, 64\)\]"):
        contact_sheet(_candidates(1, 64) + _candidates(1, 32), ["a", "b"])
