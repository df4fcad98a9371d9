"""Procedural captioned shapes: a tiny text-to-image dataset and an attribute detector.

Every scene is ONE object on a plain background, described by five attributes (``SHAPES``,
``COLORS``, ``SIZES``, ``POSITIONS``, ``BACKGROUNDS``) and a lowercase Russian caption whose
adjectives agree with the noun ("большая жёлтая звезда слева на сером фоне"). Images are RGB
``uint8`` PIL images, anti-aliased by drawing at 4-8x and box-downsampling; ``render(scene, 256)``
is the same geometry as ``render(scene, 64)``, only finer. The (colour, shape) pairs in
``HELD_OUT_PAIRS`` never appear in the ``"train"`` split, to test compositional generalisation.

``detect`` reads the attributes back from an image (a generated one, or a render): background
from the border, object colour by majority palette vote, shape by fitting each shape's template
to the object's area and centroid, size by area, position by the template's centre.
"""
from __future__ import annotations

import hashlib
import random
import re
from collections import deque
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

__all__ = [
    "SHAPES", "COLORS", "SIZES", "POSITIONS", "BACKGROUNDS", "HELD_OUT_PAIRS", "SPLITS",
    "WORD_ORDERS", "Scene", "sample_scene", "render", "caption", "parse_caption", "make_example",
    "ShapesDataset", "Detection", "detect", "attribute_matches", "score",
]

# ---------------------------------------------------------------- vocabulary and geometry
SHAPES = ("круг", "квадрат", "треугольник", "ромб", "звезда")
COLORS: dict[str, tuple[int, int, int]] = {  # object colours, RGB; pairwise >= 105 apart
    "красный": (225, 25, 25), "оранжевый": (255, 135, 0), "жёлтый": (250, 235, 30),
    "зелёный": (30, 175, 50), "голубой": (95, 205, 255), "синий": (25, 55, 215),
    "фиолетовый": (150, 45, 200), "белый": (245, 245, 245),
}
SIZES = ("маленький", "большой")
POSITIONS = ("слева", "справа", "сверху", "снизу", "в центре")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {  # >= 112 from every allowed object colour
    "чёрный": (15, 15, 15), "серый": (128, 128, 128), "белый": (245, 245, 245), "синий": (25, 40, 150),
}
HELD_OUT_PAIRS = (("красный", "звезда"), ("синий", "круг"), ("жёлтый", "ромб"), ("зелёный", "треугольник"))
SPLITS = ("train", "heldout", "all")

_EXTENT = {"маленький": 0.25, "большой": 0.45}  # longer bbox side, fraction of the canvas
_CENTRES = {"слева": (0.27, 0.5), "справа": (0.73, 0.5), "сверху": (0.5, 0.27),
            "снизу": (0.5, 0.73), "в центре": (0.5, 0.5)}  # bbox centre (x, y), y down


def _unit_outline(shape: str) -> np.ndarray:
    """Polygon [V, 2] (x, y; y down) of ``shape``, bbox centred at 0 with longer side 1."""
    if shape == "круг":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "квадрат":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
    elif shape == "ромб":  # taller than wide, so it never reads as a turned square
        pts = np.array([[0, -1], [0.7, 0], [0, 1], [-0.7, 0]], dtype=float)
    elif shape == "треугольник":  # equilateral, pointing up
        pts = np.array([[0, -np.sqrt(3) / 2], [1, np.sqrt(3) / 2], [-1, np.sqrt(3) / 2]])
    else:  # five-pointed star, a point up, inner/outer radius 0.45
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    lo, hi = pts.min(0), pts.max(0)
    return (pts - (lo + hi) / 2) / (hi - lo).max()


def _area_centroid(pts: np.ndarray) -> tuple[float, np.ndarray]:
    """Shoelace area and area centroid (x, y) of a simple polygon [V, 2]."""
    x, y = pts[:, 0], pts[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    return abs(area), np.array([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6 * area)


_OUTLINES = {s: _unit_outline(s) for s in SHAPES}
_AREA_CENTROID = {s: _area_centroid(p) for s, p in _OUTLINES.items()}


# ---------------------------------------------------------------- scenes and splits
def _check_choice(what: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid: {list(choices)}")


@dataclass(frozen=True)
class Scene:
    """One object on a plain background; every field is a Russian word from the constants."""

    shape: str  # one of SHAPES
    color: str  # a key of COLORS
    size: str  # one of SIZES
    position: str  # one of POSITIONS
    background: str  # a key of BACKGROUNDS, never equal to ``color``

    def __post_init__(self) -> None:
        for what, choices in (("shape", SHAPES), ("color", COLORS), ("size", SIZES),
                              ("position", POSITIONS), ("background", BACKGROUNDS)):
            _check_choice(what, getattr(self, what), tuple(choices))
        if self.background == self.color:
            valid = [b for b in BACKGROUNDS if b != self.color]
            raise ValueError(f"background {self.background!r} equals the object colour; "
                             f"valid backgrounds for a {self.color!r} object: {valid}")


def _pairs(split: str) -> list[tuple[str, str]]:
    """(colour, shape) pairs allowed in ``split``."""
    _check_choice("split", split, SPLITS)
    everything = [(c, s) for c in COLORS for s in SHAPES]
    if split == "train":
        return [p for p in everything if p not in HELD_OUT_PAIRS]
    return list(HELD_OUT_PAIRS) if split == "heldout" else everything


def sample_scene(rng: random.Random, split: str = "train") -> Scene:
    """Draw a scene: (colour, shape) uniform over the split's pairs, the rest uniform."""
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    color, shape = rng.choice(_pairs(split))
    size, position = rng.choice(SIZES), rng.choice(POSITIONS)
    background = rng.choice([b for b in BACKGROUNDS if b != color])
    return Scene(shape, color, size, position, background)


# ---------------------------------------------------------------- rendering
def _coverage(pts: np.ndarray, size: int, supersample: int) -> np.ndarray:
    """Anti-aliased coverage [size, size] float32 in [0, 1] of polygon ``pts`` (pixel units)."""
    big = Image.new("L", (size * supersample, size * supersample), 0)
    ImageDraw.Draw(big).polygon([tuple(p) for p in pts * supersample], fill=255)
    return np.asarray(big.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Render ``scene`` as an RGB PIL image ``size x size`` (uint8 channels R, G, B).

    The geometry is defined on the unit canvas, so every ``size`` shows the same picture;
    edges are anti-aliased by drawing at 4-8x and box-downsampling.
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be a Scene, got {type(scene).__name__}")
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16, got {size!r}")
    pts = (np.array(_CENTRES[scene.position]) + _OUTLINES[scene.shape] * _EXTENT[scene.size]) * size
    alpha = _coverage(pts, size, supersample=max(4, -(-512 // size)))[..., None]  # (H, W, 1)
    obj, bg = np.array(COLORS[scene.color], np.float32), np.array(BACKGROUNDS[scene.background], np.float32)
    rgb = bg * (1 - alpha) + obj * alpha  # (H, W, 3) in [0, 255]
    return Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")


# ---------------------------------------------------------------- captions
_FEMININE = {"звезда"}
_SIZE_FORMS = {"маленький": ("маленький", "маленькая"), "большой": ("большой", "большая")}  # (m, f)
_COLOR_FORMS = {
    "красный": ("красный", "красная"), "оранжевый": ("оранжевый", "оранжевая"),
    "жёлтый": ("жёлтый", "жёлтая"), "зелёный": ("зелёный", "зелёная"),
    "голубой": ("голубой", "голубая"), "синий": ("синий", "синяя"),
    "фиолетовый": ("фиолетовый", "фиолетовая"), "белый": ("белый", "белая"),
}
_BACKGROUND_FORMS = {"чёрный": "чёрном", "серый": "сером", "белый": "белом", "синий": "синем"}  # "на ... фоне"
WORD_ORDERS = (  # WORD_ORDERS[0] is the canonical order
    "{size} {color} {shape} {position} на {background} фоне",
    "на {background} фоне {size} {color} {shape} {position}",
    "{position} {size} {color} {shape} на {background} фоне",
    "{size} {color} {shape} на {background} фоне {position}",
    "{position} на {background} фоне {size} {color} {shape}",
)


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """Lowercase Russian caption of ``scene``; canonical order without ``rng``, else a random one."""
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be a Scene, got {type(scene).__name__}")
    if rng is not None and not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random or None, got {type(rng).__name__}")
    gender = int(scene.shape in _FEMININE)
    order = WORD_ORDERS[0] if rng is None else rng.choice(WORD_ORDERS)
    return order.format(size=_SIZE_FORMS[scene.size][gender], color=_COLOR_FORMS[scene.color][gender],
                        shape=scene.shape, position=scene.position,
                        background=_BACKGROUND_FORMS[scene.background])


def _norm(word: str) -> str:
    return word.lower().replace("ё", "е")


_LEXICON: dict[str, tuple[str, str]] = {  # normalised word form -> (attribute, value)
    **{_norm(s): ("shape", s) for s in SHAPES},
    **{_norm(f): ("size", s) for s, forms in _SIZE_FORMS.items() for f in forms},
    **{_norm(f): ("color", c) for c, forms in _COLOR_FORMS.items() for f in forms},
    **{_norm(f): ("background", b) for b, f in _BACKGROUND_FORMS.items()},
    **{_norm(p.split()[-1]): ("position", p) for p in POSITIONS},
}


def parse_caption(text: str) -> Scene:
    """Read a scene back from a caption in any of ``WORD_ORDERS`` (case and ё/е insensitive).

    Words outside the vocabulary are ignored; a missing or contradictory attribute is a ValueError.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    found: dict[str, set[str]] = {}
    for word in re.findall(r"[а-яё]+", text.lower()):
        if _norm(word) in _LEXICON:
            attr, value = _LEXICON[_norm(word)]
            found.setdefault(attr, set()).add(value)
    names = [f.name for f in fields(Scene)]
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"caption {text!r} names no {missing}; known words: {sorted(_LEXICON)}")
    clashes = {n: sorted(v) for n, v in found.items() if len(v) > 1}
    if clashes:
        raise ValueError(f"caption {text!r} is contradictory: {clashes}")
    return Scene(**{n: next(iter(found[n])) for n in names})


# ---------------------------------------------------------------- examples and dataset
def make_example(seed: int, split: str = "train", sizes: Sequence[int] = (64,)) -> dict:
    """Scene, caption (random word order) and renders, all determined by ``seed``.

    Returns ``{"scene": Scene, "caption": str, size: PIL.Image for each size in sizes}``.
    """
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    rng = random.Random(seed)
    scene = sample_scene(rng, split)
    example: dict = {"scene": scene, "caption": caption(scene, rng)}
    for size in sizes:
        example[size] = render(scene, size)
    return example


def _item_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:8], "little")


class ShapesDataset(torch.utils.data.Dataset):
    """``num_examples`` captioned shapes; item ``i`` depends only on ``(seed, i)``.

    Items are ``(image, caption)``: image float32 tensor [3, size, size] in [0, 1] (RGB).
    """

    def __init__(self, num_examples: int, *, seed: int = 0, split: str = "train", size: int = 64) -> None:
        if not isinstance(num_examples, int) or num_examples < 1:
            raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
        _check_choice("split", split, SPLITS)
        if not isinstance(size, int) or size < 16:
            raise ValueError(f"size must be an int >= 16, got {size!r}")
        self.num_examples, self.seed, self.split, self.size = num_examples, seed, split, size

    def __len__(self) -> int:
        return self.num_examples

    def _example(self, index: int, sizes: Sequence[int]) -> dict:
        if not -self.num_examples <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        return make_example(_item_seed(self.seed, index % self.num_examples), self.split, sizes)

    def scene(self, index: int) -> Scene:
        """The scene of item ``index``."""
        return self._example(index, ())["scene"]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        example = self._example(index, (self.size,))
        pixels = torch.from_numpy(np.array(example[self.size]))  # (H, W, 3) uint8
        return pixels.permute(2, 0, 1).float() / 255.0, example["caption"]  # (3, H, W) in [0, 1]


# ---------------------------------------------------------------- detector
_ANALYSIS = 64  # images are resized to this side before analysis
_MIN_CONTRAST = 40.0  # RGB distance from the background below which nothing counts as an object
_BLURS = (0.0, 0.6, 1.2, 1.8)  # Gaussian sigmas (analysis px) tried on each template: blurry inputs


def _blur_matrix(sigma: float, n: int = _ANALYSIS) -> np.ndarray:
    """[n, n] matrix B with B @ a @ B.T = Gaussian blur of a (zero padding; identity for 0)."""
    if sigma == 0:
        return np.eye(n, dtype=np.float32)
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2) * (abs(offsets) <= 3 * sigma)
    return (kernel / kernel.sum(1, keepdims=True)[n // 2]).astype(np.float32)


_BLUR_MATRICES = [_blur_matrix(s) for s in _BLURS]


@dataclass(frozen=True)
class Detection:
    """Attributes read from an image; a field is None when no object was found.

    Unlike ``Scene`` any combination is allowed (e.g. colour equal to background).
    """

    shape: str | None
    color: str | None
    size: str | None
    position: str | None
    background: str | None
    confidence: float  # soft IoU in [0, 1] between the object and the best-fitting shape template

    def to_scene(self) -> Scene:
        """The detection as a ``Scene`` (ValueError if it is not a valid one)."""
        return Scene(self.shape, self.color, self.size, self.position, self.background)


def _nearest(palette: dict[str, tuple[int, int, int]], pixels: np.ndarray) -> np.ndarray:
    """Index into ``palette`` of the nearest colour for each pixel [N, 3]."""
    table = np.array(list(palette.values()), np.float32)  # (K, 3)
    return np.linalg.norm(pixels[:, None, :] - table[None], axis=-1).argmin(1)  # (N,)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 8-connected component of a bool mask [H, W]."""
    h, w = mask.shape
    labels = np.zeros(mask.shape, np.int32)
    best, best_size, label = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0], queue, count = label, deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            count += 1
            for yy in range(max(y - 1, 0), min(y + 2, h)):
                for xx in range(max(x - 1, 0), min(x + 2, w)):
                    if mask[yy, xx] and not labels[yy, xx]:
                        labels[yy, xx] = label
                        queue.append((yy, xx))
        if count > best_size:
            best, best_size = label, count
    return labels == best


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation of a bool mask [H, W]."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)


def _fit_template(shape: str, alpha: np.ndarray, area: float, centroid: np.ndarray) -> tuple[float, np.ndarray]:
    """Place ``shape`` with the object's area and centroid; return (soft IoU, bbox centre px)."""
    unit_area, unit_centroid = _AREA_CENTROID[shape]
    scale = np.sqrt(area / unit_area)
    pts = (_OUTLINES[shape] - unit_centroid) * scale + centroid
    sharp = _coverage(pts, _ANALYSIS, supersample=4)
    iou = 0.0
    for blur in _BLUR_MATRICES:  # the best of a few blur levels, so blurry inputs fit too
        template = blur @ sharp @ blur.T  # (64, 64)
        iou = max(iou, np.minimum(alpha, template).sum() / max(np.maximum(alpha, template).sum(), 1e-6))
    return float(iou), centroid - unit_centroid * scale


def detect(image: Image.Image) -> Detection:
    """Read the five attributes of a single-object image (square, any size, any PIL mode)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if image.width != image.height or image.width < 16:
        raise ValueError(f"image must be square with side >= 16, got {image.width}x{image.height}")
    image = image.convert("RGB")
    if image.width != _ANALYSIS:
        resample = Image.BOX if image.width > _ANALYSIS else Image.BICUBIC
        image = image.resize((_ANALYSIS, _ANALYSIS), resample)
    rgb = np.asarray(image, np.float32)  # (64, 64, 3) in [0, 255]
    # 1. background: median of a 2-pixel border, matched to the palette
    border = np.concatenate([rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3),
                             rgb[:, :2].reshape(-1, 3), rgb[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = list(BACKGROUNDS)[_nearest(BACKGROUNDS, bg_rgb[None])[0]]
    dist = np.linalg.norm(rgb - bg_rgb, axis=-1)  # (64, 64)
    d_ref = float(np.percentile(dist, 99.5))
    if d_ref < _MIN_CONTRAST:
        return Detection(None, None, None, None, background, 0.0)
    # 2. object: largest component far from the background; colour by majority palette vote
    component = _largest_component(dist > 0.5 * d_ref)
    core = component & (dist > 0.75 * d_ref)
    votes = np.bincount(_nearest(COLORS, rgb[core]), minlength=len(COLORS))
    color = list(COLORS)[int(votes.argmax())]
    contrast = max(float(np.median(dist[core])), float(np.linalg.norm(np.array(COLORS[color]) - bg_rgb)))
    alpha = np.clip(dist / contrast, 0, 1) * _dilate(component)  # (64, 64) coverage
    area = float(alpha.sum())
    ys, xs = np.mgrid[:_ANALYSIS, :_ANALYSIS] + 0.5
    centroid = np.array([(alpha * xs).sum(), (alpha * ys).sum()]) / area  # (x, y) px
    # 3. shape: template with the same area and centroid that overlaps best
    fits = {s: _fit_template(s, alpha, area, centroid) for s in SHAPES}
    shape = max(fits, key=lambda s: fits[s][0])
    iou, centre = fits[shape]
    # 4. size: nearer (in log area) of the shape's two sizes; position: nearest bbox centre
    unit_area = _AREA_CENTROID[shape][0]
    log_areas = {s: np.log(unit_area * (_EXTENT[s] * _ANALYSIS) ** 2) for s in SIZES}
    size = min(SIZES, key=lambda s: abs(np.log(area) - log_areas[s]))
    position = min(POSITIONS, key=lambda p: np.linalg.norm(centre / _ANALYSIS - _CENTRES[p]))
    return Detection(shape, color, size, position, background, iou)


_ATTRIBUTES = ("shape", "color", "size", "position", "background")


def attribute_matches(detected: Detection | Scene, target: Scene) -> dict[str, bool]:
    """Per attribute, whether ``detected`` agrees with ``target``."""
    if not isinstance(target, Scene):
        raise TypeError(f"target must be a Scene, got {type(target).__name__}")
    return {a: getattr(detected, a) == getattr(target, a) for a in _ATTRIBUTES}


def score(images: Sequence[Image.Image], scenes: Sequence[Scene], *, progress: bool = False) -> dict[str, float]:
    """Detector accuracy of ``images`` against their intended ``scenes``.

    Returns the fraction correct per attribute plus ``"all"`` (every attribute right) and ``"count"``.
    """
    if len(images) != len(scenes) or not images:
        raise ValueError(f"need as many images as scenes (and at least one), got {len(images)} and {len(scenes)}")
    hits = {a: 0 for a in (*_ATTRIBUTES, "all")}
    for image, scene in tqdm(zip(images, scenes), total=len(images), disable=not progress, desc="detect"):
        matches = attribute_matches(detect(image), scene)
        for a, ok in matches.items():
            hits[a] += ok
        hits["all"] += all(matches.values())
    return {**{a: n / len(images) for a, n in hits.items()}, "count": float(len(images))}
