"""The demo's training data: every scene of a split, its captions in every word order, and renders.

The shapes world (:mod:`rudalle_pipe.shapes`) is small enough to list whole: the stages of
:mod:`rudalle_pipe.train` sample their batches from these lists with :class:`rudalle_pipe.train.common.Shard`.
"""
from __future__ import annotations

import itertools
import random
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..checks import check_int

__all__ = ["all_scenes", "all_captions", "with_variants", "render_scenes"]


def all_scenes(split: str = "train") -> list:
    """Every distinct :class:`rudalle_pipe.shapes.Scene` of ``split``, in a fixed order."""
    from .. import shapes

    if split not in shapes.SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {list(shapes.SPLITS)}")
    pairs = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES]
    if split != "all":
        pairs = [p for p in pairs if (p in shapes.HELD_OUT_PAIRS) == (split == "heldout")]
    return [shapes.Scene(s, c, size, pos, bg) for (c, s), size, pos, bg
            in itertools.product(pairs, shapes.SIZES, shapes.POSITIONS, shapes.BACKGROUNDS) if bg != c]


class _Pick(random.Random):
    """A ``random.Random`` whose ``choice`` returns element ``index``: selects a caption word order."""

    def __init__(self, index: int) -> None:
        super().__init__(0)
        self.index = index

    def choice(self, seq: Sequence) -> Any:  # type: ignore[override]
        return seq[self.index % len(seq)]


def all_captions(scene: Any) -> list[str]:
    """The caption of ``scene`` in every word order of ``shapes.WORD_ORDERS`` (canonical first)."""
    from .. import shapes

    return [shapes.caption(scene, _Pick(i)) for i in range(len(shapes.WORD_ORDERS))]


def with_variants(scenes: Sequence[Any], variants: int) -> tuple[list, list[int | None]]:
    """Each scene ``variants`` times with variation indices ``0..variants-1`` (scene-major), for
    :func:`render_scenes`; ``variants=0`` gives each scene once, plain (variation None)."""
    check_int("variants", variants, low=0, high=1024)
    if variants == 0:
        return list(scenes), [None] * len(scenes)
    return [s for s in scenes for _ in range(variants)], [k for _ in scenes for k in range(variants)]


def render_scenes(scenes: Sequence[Any], size: int = 64, *, variants: Sequence[int | None] | None = None,
                  progress: bool = False) -> torch.Tensor:
    """Render ``scenes`` to a uint8 tensor (N, 3, size, size), RGB (divide by 255 for [0, 1]).

    ``variants`` (one per scene, see :func:`with_variants`) selects each render's variation
    (``shapes.render(..., variant=)``); None renders every scene plain."""
    import numpy as np

    from .. import shapes

    variants = [None] * len(scenes) if variants is None else list(variants)
    if len(variants) != len(scenes):
        raise ValueError(f"variants has {len(variants)} entries for {len(scenes)} scenes")
    out = torch.empty(len(scenes), 3, size, size, dtype=torch.uint8)
    for i, (scene, variant) in enumerate(tqdm(list(zip(scenes, variants)), desc=f"render {size}px",
                                              disable=not progress)):
        out[i] = torch.from_numpy(np.array(shapes.render(scene, size, variant=variant))).permute(2, 0, 1)
    return out
