"""Procedural captioned shapes: a tiny text-to-image dataset and an attribute detector.

Every scene is ONE object on a plain background, described by five attributes (``SHAPES``,
``COLORS``, ``SIZES``, ``POSITIONS``, ``BACKGROUNDS``) and a lowercase Russian caption whose
adjectives agree with the noun ("большая жёлтая звезда слева на сером фоне"). Images are RGB
``uint8`` PIL images, anti-aliased by drawing at 4-8x and box-downsampling; ``render(scene, 256)``
is the same geometry as ``render(scene, 64)``, only finer. The (colour, shape) pairs in
``HELD_OUT_PAIRS`` never appear in the ``"train"`` split, to test compositional generalisation.

``detect`` reads the attributes back from an image (a generated one, or a render): background
from the border, object colour by majority palette vote, shape by fitting each shape's template
(sharp or blurred) to the object's area and centroid, size by area, position by the template's
centre. It tolerates mild blur, noise and colour shifts, as in images from a small generator.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

__all__ = [
    "SHAPES", "COLORS", "SIZES", "POSITIONS", "BACKGROUNDS", "HELD_OUT_PAIRS", "SPLITS",
    "WORD_ORDERS", "Scene", "Jitter", "sample_scene", "render", "caption", "parse_caption", "make_example",
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
# Held out of "train": each colour and shape still appears there with other partners, and every
# word form a held-out caption needs is seen in training (звезда is the only feminine noun, so a
# held-out (colour, звезда) pair would make that colour's feminine form unseen).
HELD_OUT_PAIRS = (("оранжевый", "квадрат"), ("синий", "круг"), ("жёлтый", "ромб"), ("зелёный", "треугольник"))
SPLITS = ("train", "heldout", "all")

_EXTENT = {"маленький": 0.32, "большой": 0.50}  # longer bbox side, fraction of the canvas
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
    """Anti-aliased coverage [size, size] float32 in [0, 1] of polygon ``pts`` (pixel units).

    Only the polygon's pixel bbox (plus one pixel, as PIL fills edges inclusively) is drawn at
    ``supersample`` x and box-downsampled; the result equals drawing the whole canvas.
    """
    x0, y0 = np.clip(np.floor(pts.min(0)).astype(int) - 1, 0, size)
    x1, y1 = np.clip(np.ceil(pts.max(0)).astype(int) + 1, 0, size)
    out = np.zeros((size, size), np.float32)
    if x1 <= x0 or y1 <= y0:
        return out
    crop = Image.new("L", ((x1 - x0) * supersample, (y1 - y0) * supersample), 0)
    ImageDraw.Draw(crop).polygon([tuple(p) for p in (pts - (x0, y0)) * supersample], fill=255)
    out[y0:y1, x0:x1] = np.asarray(crop.resize((x1 - x0, y1 - y0), Image.BOX), np.float32) / 255.0
    return out


# Variety within a caption (``render(..., variant=k)``): every draw stays inside what the caption
# says and what ``detect`` reads back (checked on 2000 varied renders by the tests and the benchmark).
JITTER_SHIFT = 0.04  # bbox-centre offset per axis, fraction of the canvas (class centres are 0.23 apart)
JITTER_SCALE = 0.08  # extent multiplied by 1 +- this (small 0.32 vs large 0.50 stay far apart)
JITTER_DEGREES = 10.0  # rotation +- this, about the bbox centre
JITTER_OBJECT = 14  # per-channel object colour shift +- this (palette colours are >= 105 apart)
JITTER_BACKGROUND = 8  # per-channel background shade shift +- this
_MARGIN = 0.02  # a jittered object is moved back inside [margin, 1 - margin] of the canvas


@dataclass(frozen=True)
class Jitter:
    """One draw of the within-caption variety: offsets ``dx, dy`` (canvas fractions), ``scale``,
    rotation ``degrees`` and integer RGB shifts of the object and background colours."""

    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    degrees: float = 0.0
    object_shift: tuple[int, int, int] = (0, 0, 0)
    background_shift: tuple[int, int, int] = (0, 0, 0)

    @classmethod
    def of(cls, scene: Scene, variant: int) -> "Jitter":
        """The jitter of ``variant`` (an int >= 0) of ``scene``: a pure function of both."""
        if isinstance(variant, bool) or not isinstance(variant, int) or variant < 0:
            raise ValueError(f"variant must be an int >= 0 (or None for the plain render), got {variant!r}")
        key = f"{scene.shape}|{scene.color}|{scene.size}|{scene.position}|{scene.background}|{variant}"
        rng = random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
        u = lambda r: rng.uniform(-r, r)  # noqa: E731
        return cls(u(JITTER_SHIFT), u(JITTER_SHIFT), 1 + u(JITTER_SCALE), u(JITTER_DEGREES),
                   tuple(rng.randint(-JITTER_OBJECT, JITTER_OBJECT) for _ in range(3)),
                   tuple(rng.randint(-JITTER_BACKGROUND, JITTER_BACKGROUND) for _ in range(3)))


def _placed_outline(scene: Scene, jitter: Jitter) -> np.ndarray:
    """The object's polygon [V, 2] on the unit canvas (x, y; y down) after ``jitter``."""
    pts = _OUTLINES[scene.shape] * _EXTENT[scene.size] * jitter.scale
    if jitter.degrees:
        a = np.deg2rad(jitter.degrees)
        pts = pts @ np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    pts = pts + np.array(_CENTRES[scene.position]) + (jitter.dx, jitter.dy)
    low, high = pts.min(0), pts.max(0)  # move back inside the margins (never resized)
    return pts + np.clip(_MARGIN - low, 0, None) - np.clip(high - (1 - _MARGIN), 0, None)


def _shifted(rgb: tuple[int, int, int], shift: tuple[int, int, int]) -> np.ndarray:
    return np.clip(np.array(rgb, np.float32) + np.array(shift, np.float32), 0, 255)


def render(scene: Scene, size: int = 64, *, variant: int | None = None) -> Image.Image:
    """Render ``scene`` as an RGB PIL image ``size x size`` (uint8 channels R, G, B).

    ``variant=None`` draws the plain picture: the class's exact centre, extent and colours.
    ``variant=k`` (int >= 0) draws variation ``k`` of the scene (:meth:`Jitter.of`): a small shift,
    scale and rotation, and slightly shifted object and background colours; a pure function of
    ``(scene, k)``. The geometry is defined on the unit canvas, so every ``size`` shows the same
    picture; edges are anti-aliased by drawing at 4-8x and box-downsampling.
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be a Scene, got {type(scene).__name__}")
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16, got {size!r}")
    jitter = Jitter() if variant is None else Jitter.of(scene, variant)
    pts = _placed_outline(scene, jitter) * size
    alpha = _coverage(pts, size, supersample=max(4, -(-512 // size)))[..., None]  # (H, W, 1)
    obj = _shifted(COLORS[scene.color], jitter.object_shift)
    bg = _shifted(BACKGROUNDS[scene.background], jitter.background_shift)
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
_BACKGROUND_FORMS = {"чёрный": "чёрном", "серый": "сером", "белый": "белом", "синий": "синем"}  # на _ фоне
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
def make_example(seed: int, split: str = "train", sizes: Sequence[int] = (64,), *, varied: bool = True) -> dict:
    """Scene, caption (random word order) and renders, all determined by ``seed``.

    With ``varied`` (default) the renders are a random variation of the scene (``render(...,
    variant=...)``), the same one at every size; ``varied=False`` gives the plain render.

    Returns ``{"scene": Scene, "caption": str, "variant": int | None, size: PIL.Image for each size}``.
    """
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    rng = random.Random(seed)
    scene = sample_scene(rng, split)
    example: dict = {"scene": scene, "caption": caption(scene, rng)}
    example["variant"] = rng.randrange(2**31) if varied else None
    for size in sizes:
        example[size] = render(scene, size, variant=example["variant"])
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
_BLURS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)  # Gaussian sigmas (px) tried on each template, for blurry inputs


def _blur_matrix(sigma: float, n: int = _ANALYSIS) -> np.ndarray:
    """[n, n] matrix B with B @ a @ B.T = Gaussian blur of a (zero padding; identity for 0)."""
    if sigma == 0:
        return np.eye(n, dtype=np.float32)
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2) * (abs(offsets) <= 3 * sigma)
    return (kernel / kernel.sum(1, keepdims=True)[n // 2]).astype(np.float32)


_BLUR_STACK = np.stack([_blur_matrix(s) for s in _BLURS])  # (B, 64, 64)


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
    """Largest 8-connected component of a bool mask [H, W] (breadth-first search on flat indices)."""
    h, w = mask.shape
    padded = np.pad(mask, 1).ravel()  # a zero frame: neighbours of a pixel never wrap around
    steps = [dy * (w + 2) + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    unseen, best = set(np.flatnonzero(padded).tolist()), []
    while unseen:
        queue = [unseen.pop()]
        for pixel in queue:  # the list grows while it is walked
            for step in steps:
                if pixel + step in unseen:
                    unseen.remove(pixel + step)
                    queue.append(pixel + step)
        if len(queue) > len(best):
            best = queue
    out = np.zeros(padded.shape, bool)
    out[best] = True
    return out.reshape(h + 2, w + 2)[1:-1, 1:-1]


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of a bool mask [H, W] by a (2 radius + 1)^2 square."""
    padded, (h, w), k = np.pad(mask, radius), mask.shape, 2 * radius + 1
    return np.any([padded[dy:dy + h, dx:dx + w] for dy in range(k) for dx in range(k)], axis=0)


def _fit_templates(alpha: np.ndarray, region: np.ndarray, area: float,
                   centroid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Place every shape with the object's area and centroid, blurred by each of ``_BLURS``.

    Returns (best soft IoU inside ``region`` per shape [S], bbox centre (x, y) px per shape [S, 2]).
    """
    sharp, centres = [], []
    for shape in SHAPES:
        unit_area, unit_centroid = _AREA_CENTROID[shape]
        scale = np.sqrt(area / unit_area)
        pts = (_OUTLINES[shape] - unit_centroid) * scale + centroid
        sharp.append(_coverage(pts, _ANALYSIS, supersample=4))
        centres.append(centroid - unit_centroid * scale)
    blur, blur_t = _BLUR_STACK[None], _BLUR_STACK.transpose(0, 2, 1)[None]  # (1, B, 64, 64)
    blurred = blur @ np.stack(sharp)[:, None] @ blur_t  # (S, B, 64, 64)
    blurred *= region
    inter = np.minimum(blurred, alpha).sum((2, 3))  # (S, B)
    union = np.maximum(blurred, alpha).sum((2, 3))  # (S, B)
    return (inter / np.maximum(union, 1e-6)).max(1), np.stack(centres)


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
    d_ref = float(np.percentile(dist, 99.5))  # contrast of the most object-like pixels
    floor = float(np.median(np.linalg.norm(border - bg_rgb, axis=-1)))  # noise level
    if d_ref < _MIN_CONTRAST:
        return Detection(None, None, None, None, background, 0.0)
    # 2. object: largest component far from the background; colour by majority palette vote
    component = _largest_component(dist > 0.5 * d_ref)
    core = component & (dist > 0.75 * d_ref)
    core = core if core.any() else component
    votes = np.bincount(_nearest(COLORS, rgb[core]), minlength=len(COLORS))
    color = list(COLORS)[int(votes.argmax())]
    measured, palette = float(np.median(dist[core])), float(np.linalg.norm(np.array(COLORS[color]) - bg_rgb))
    contrast = float(np.clip(palette, measured, 1.5 * measured))  # blur lowers the measured contrast
    region = _dilate(component, 3)  # room for blurred edges
    alpha = np.clip((dist - floor) / max(contrast - floor, 1.0), 0, 1) * region  # (64, 64) coverage
    area = float(alpha.sum())
    if area < 1.0:  # border noise as strong as the object: nothing to measure
        return Detection(None, color, None, None, background, 0.0)
    ys, xs = np.mgrid[:_ANALYSIS, :_ANALYSIS] + 0.5
    centroid = np.array([(alpha * xs).sum(), (alpha * ys).sum()]) / area  # (x, y) px
    # 3. shape: template with the same area and centroid that overlaps best
    ious, centres = _fit_templates(alpha, region, area, centroid)
    best = int(ious.argmax())
    shape, iou, centre = SHAPES[best], float(ious[best]), centres[best]
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


def score(images: Sequence[Image.Image], scenes: Sequence[Scene], *,
          progress: bool = False) -> dict[str, float]:
    """Detector accuracy of ``images`` against their intended ``scenes``.

    Returns the fraction correct per attribute plus ``"all"`` (every attribute right) and ``"count"``.
    """
    if len(images) != len(scenes) or not images:
        raise ValueError(f"need as many images as scenes (and at least one), "
                         f"got {len(images)} and {len(scenes)}")
    hits = {a: 0 for a in (*_ATTRIBUTES, "all")}
    for image, scene in tqdm(zip(images, scenes), total=len(images), disable=not progress, desc="detect"):
        matches = attribute_matches(detect(image), scene)
        for a, ok in matches.items():
            hits[a] += ok
        hits["all"] += all(matches.values())
    return {**{a: n / len(images) for a, n in hits.items()}, "count": float(len(images))}
