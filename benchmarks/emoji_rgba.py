"""Time of rudalle_pipe.convert_emoji_to_rgba (border flood fill + feathered alpha) on CPU.

Rerun from the repo root (with the package importable, e.g. `pip install -e .`):

    python benchmarks/emoji_rgba.py              # ~5 s

Cases: a 256 px emoji-like picture (a disc with an outline and enclosed white eyes on off-white
noise, 1 fill pass in each direction suffices), and the worst case for the alternating
row/column fill: nested square walls whose gaps alternate sides, so the background winds through
every ring (one pass per ring), at 256 and 512 px. Printed: the median of 5 calls per case, and
the ratio of the worst case to the emoji at the same size.
"""
from __future__ import annotations

import logging
import statistics
import time

import numpy as np
from PIL import Image, ImageDraw

from rudalle_pipe import convert_emoji_to_rgba

logger = logging.getLogger("benchmark")


def emoji(size: int) -> Image.Image:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(232, 256, (size, size, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    r = size * 0.4
    draw.ellipse([size / 2 - r, size / 2 - r, size / 2 + r, size / 2 + r], fill=(250, 200, 0), outline=(0, 0, 0),
                 width=max(2, size // 64))
    for cx in (0.4, 0.6):
        e = size * 0.06
        draw.ellipse([size * cx - e, size * 0.4 - e, size * cx + e, size * 0.4 + e], fill=(255, 255, 255),
                     outline=(0, 0, 0), width=2)
    return image


def spiral(size: int) -> Image.Image:
    img = np.full((size, size, 3), 255, np.uint8)
    c = size // 2
    for k, r in enumerate(range(4, c - 2, 4)):
        img[c - r, c - r:c + r + 1] = img[c + r, c - r:c + r + 1] = 0
        img[c - r:c + r + 1, c - r] = img[c - r:c + r + 1, c + r] = 0
        img[c - r if k % 2 else c + r, c] = 255
    return Image.fromarray(img)


def median_time(image: Image.Image, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        convert_emoji_to_rgba([image])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("%-22s %10s %12s", "case", "median s", "vs emoji")
    for size in (256, 512):
        base = median_time(emoji(size))
        logger.info("%-22s %10.4f %12s", f"emoji {size} px", base, "1.0x")
        worst = median_time(spiral(size))
        logger.info("%-22s %10.4f %11.1fx", f"spiral {size} px", worst, worst / base)


if __name__ == "__main__":
    main()
