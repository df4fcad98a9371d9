"""convert_emoji_to_rgba: flood fill from the border, enclosed white kept, feathered edge, bad input."""
from collections import deque

import numpy as np
import pytest
from PIL import Image

from rudalle_pipe import convert_emoji_to_rgba, show
from rudalle_pipe.show import CHECKER_COLORS

SIZE = 64
CENTRE = 31.5
OUTER = 26  # the outline's outer radius
INNER = 22  # the yellow disc's radius (outline 4 px wide)
EYES = ((24, 22), (24, 41))  # (row, col) centres of the white eyes, radius 4
YELLOW, BLACK, WHITE = (250, 200, 20), (0, 0, 0), (255, 255, 255)


def make_emoji(noisy: bool = False, size: int = SIZE) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """A yellow disc, black outline and white enclosed eyes on white (or off-white noise); hard edges.
    Returns the image, the outside mask (beyond the outline) and the eyes mask."""
    scale = size / SIZE
    ys, xs = np.indices((size, size))
    r = np.hypot(ys - CENTRE * scale, xs - CENTRE * scale)
    outside = r > OUTER * scale
    eyes = np.zeros((size, size), bool)
    for ey, ex in EYES:
        eyes |= np.hypot(ys - ey * scale, xs - ex * scale) <= 4 * scale
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BLACK
    img[r <= INNER * scale] = YELLOW
    img[eyes] = WHITE
    if noisy:  # off-white: every channel in [230, 255], independently per channel
        noise = np.random.default_rng(1).integers(230, 256, (size, size, 3), dtype=np.uint8)
        img[outside] = noise[outside]
    else:
        img[outside] = WHITE
    return Image.fromarray(img), outside, eyes


def chessboard_distance(outside: np.ndarray) -> np.ndarray:
    """Brute force: each pixel's chessboard distance to the nearest ``outside`` pixel (0 on it)."""
    oy, ox = np.nonzero(outside)
    ys, xs = np.indices(outside.shape)
    d = np.maximum(np.abs(ys[..., None] - oy), np.abs(xs[..., None] - ox))
    return d.min(axis=-1)


@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("feather", [0, 1, 2, 3])
def test_outside_transparent_inside_opaque_and_feathered_edge(noisy, feather):
    image, outside, eyes = make_emoji(noisy)
    (rgba,) = convert_emoji_to_rgba([image], feather=feather)
    assert rgba.mode == "RGBA" and rgba.size == image.size
    out = np.asarray(rgba)
    assert np.array_equal(out[..., :3], np.asarray(image))  # colour channels unchanged
    alpha = out[..., 3]
    assert (alpha[outside] == 0).all()
    assert (alpha[eyes] == 255).all()  # white but enclosed by the outline: stays opaque
    distance = chessboard_distance(outside)
    expected = np.where(distance > feather, 255, np.round(255 * distance / (feather + 1))).astype(np.uint8)
    assert np.array_equal(alpha, expected)
    soft = (alpha > 0) & (alpha < 255)
    if feather:
        assert soft.any() and (distance[soft] <= feather).all()
        assert set(np.unique(alpha[soft])) == {round(255 * k / (feather + 1)) for k in range(1, feather + 1)}
    else:
        assert not soft.any()
    assert (alpha[distance > feather] == 255).all()  # the disc and outline past the ramp


def test_several_images_of_different_sizes():
    small, _, _ = make_emoji()
    wide = Image.new("RGB", (40, 20), WHITE)
    out = convert_emoji_to_rgba([small, wide, small])
    assert [im.size for im in out] == [small.size, (40, 20), small.size]
    assert np.asarray(out[1])[..., 3].max() == 0  # all white: all background
    assert np.array_equal(np.asarray(out[0]), np.asarray(out[2]))


def test_threshold_is_per_channel_distance_to_white():
    img = np.full((9, 9, 3), 255, np.uint8)
    img[:, :] = (225, 255, 240)  # min channel 225: near-white for threshold >= 30
    out30 = np.asarray(convert_emoji_to_rgba([Image.fromarray(img)], threshold=30, feather=0)[0])
    out29 = np.asarray(convert_emoji_to_rgba([Image.fromarray(img)], threshold=29, feather=0)[0])
    assert out30[..., 3].max() == 0 and out29[..., 3].min() == 255
    noisy, outside, _ = make_emoji(noisy=True)
    alpha = np.asarray(convert_emoji_to_rgba([noisy], threshold=0)[0])[..., 3]
    white_border = (np.asarray(noisy)[outside] == 255).all(axis=-1)
    assert (alpha[outside][~white_border] == 255).all()  # threshold 0: only pure white is background


def test_no_white_border_stays_opaque_and_a_gap_lets_the_fill_in():
    dark = Image.new("RGB", (12, 12), (10, 20, 30))
    assert np.asarray(convert_emoji_to_rgba([dark])[0])[..., 3].min() == 255
    img = np.full((12, 12, 3), 255, np.uint8)
    img[2:10, 2] = img[2:10, 9] = img[2, 2:10] = img[9, 2:10] = 0  # a closed square ring
    closed = np.asarray(convert_emoji_to_rgba([Image.fromarray(img)], feather=0)[0])[..., 3]
    assert (closed[3:9, 3:9] == 255).all()
    img[2, 5] = 255  # a one-pixel gap in the top side
    opened = np.asarray(convert_emoji_to_rgba([Image.fromarray(img)], feather=0)[0])[..., 3]
    assert (opened[3:9, 3:9] == 0).all()


def test_diagonal_gap_does_not_leak():
    """The fill is 4-connected: a ring of diagonal steps (a diamond) still encloses its inside."""
    img = np.full((11, 11, 3), 255, np.uint8)
    ys, xs = np.indices((11, 11))
    img[np.abs(ys - 5) + np.abs(xs - 5) == 4] = 0  # pixels touch only at corners
    alpha = np.asarray(convert_emoji_to_rgba([Image.fromarray(img)], feather=0)[0])[..., 3]
    assert (alpha[np.abs(ys - 5) + np.abs(xs - 5) < 4] == 255).all()
    assert (alpha[np.abs(ys - 5) + np.abs(xs - 5) > 4] == 0).all()


def reference_fill(white: np.ndarray) -> np.ndarray:
    """A plain BFS (4-neighbour) from the near-white border pixels."""
    h, w = white.shape
    seen = np.zeros_like(white)
    queue = deque((y, x) for y in range(h) for x in range(w)
                  if white[y, x] and (y in (0, h - 1) or x in (0, w - 1)))
    for y, x in queue:
        seen[y, x] = True
    while queue:
        y, x = queue.popleft()
        for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
            if 0 <= ny < h and 0 <= nx < w and white[ny, nx] and not seen[ny, nx]:
                seen[ny, nx] = True
                queue.append((ny, nx))
    return seen


@pytest.mark.parametrize("seed", range(6))
def test_flood_fill_matches_a_bfs_on_random_mazes(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(5, 40, 2)
    white = rng.random((h, w)) < 0.6
    img = np.where(white[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2)
    alpha = np.asarray(convert_emoji_to_rgba([Image.fromarray(img)], feather=0)[0])[..., 3]
    assert np.array_equal(alpha == 0, reference_fill(white))


def test_spiral_needs_many_passes():
    """Nested square walls with alternating gaps: the background winds through every ring."""
    n = 256
    img = np.full((n, n, 3), 255, np.uint8)
    c = n // 2
    for k, r in enumerate(range(4, c - 2, 4)):
        img[c - r, c - r:c + r + 1] = img[c + r, c - r:c + r + 1] = 0
        img[c - r:c + r + 1, c - r] = img[c - r:c + r + 1, c + r] = 0
        img[c - r if k % 2 else c + r, c] = 255  # the gap: top side on odd rings, bottom on even
    image = Image.fromarray(img)
    alpha = np.asarray(convert_emoji_to_rgba([image])[0])[..., 3]
    assert np.array_equal(alpha == 0, reference_fill(img[..., 0] == 255))
    assert alpha[c, c] == 0  # the centre is reached through every gap


def test_emoji_256px():
    image, outside, eyes = make_emoji(noisy=True, size=256)
    alpha = np.asarray(convert_emoji_to_rgba([image])[0])[..., 3]
    assert (alpha[outside] == 0).all() and (alpha[eyes] == 255).all()


def test_shows_on_a_checkerboard():
    image, outside, _ = make_emoji()
    grid = np.asarray(show(convert_emoji_to_rgba([image]), padding=0))
    assert grid.shape == (SIZE, SIZE, 3)
    assert tuple(grid[0, 0]) == CHECKER_COLORS[0] and tuple(grid[0, 8]) == CHECKER_COLORS[1]
    assert tuple(grid[int(CENTRE), int(CENTRE)]) == YELLOW


def test_bad_input():
    image, _, _ = make_emoji()
    with pytest.raises(TypeError, match="list of PIL images"):
        convert_emoji_to_rgba(image)
    with pytest.raises(ValueError, match="empty"):
        convert_emoji_to_rgba([])
    with pytest.raises(TypeError, match=r"images\[1\] is a ndarray"):
        convert_emoji_to_rgba([image, np.asarray(image)])
    with pytest.raises(ValueError, match=r"images\[1\] has mode 'RGBA'.*\['RGB'\].*convert"):
        convert_emoji_to_rgba([image, image.convert("RGBA")])
    with pytest.raises(ValueError, match=r"images\[0\] has mode 'L'"):
        convert_emoji_to_rgba([image.convert("L")])
    for bad in (-1, 255):
        with pytest.raises(ValueError, match=rf"threshold must be in \[0, 254\], got {bad}"):
            convert_emoji_to_rgba([image], threshold=bad)
    for bad in (30.0, True):
        with pytest.raises(TypeError, match="threshold must be an int"):
            convert_emoji_to_rgba([image], threshold=bad)
    for bad in (-1, 65):
        with pytest.raises(ValueError, match=rf"feather must be in \[0, 64\], got {bad}"):
            convert_emoji_to_rgba([image], feather=bad)
    with pytest.raises(TypeError, match="feather must be an int"):
        convert_emoji_to_rgba([image], feather=1.5)
