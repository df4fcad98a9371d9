"""Captioned-shapes dataset and attribute detector (rudalle_pipe.shapes)."""
from __future__ import annotations

import io
import itertools
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from rudalle_pipe import shapes
from rudalle_pipe.shapes import (
    BACKGROUNDS, COLORS, HELD_OUT_PAIRS, POSITIONS, SHAPES, SIZES, WORD_ORDERS, Detection, Scene,
    ShapesDataset, attribute_matches, caption, detect, make_example, parse_caption, render,
    sample_scene, score,
)

ALL_SCENES = [Scene(*combo) for combo in itertools.product(SHAPES, COLORS, SIZES, POSITIONS, BACKGROUNDS)
              if combo[1] != combo[4]]


def _scenes(n: int, split: str = "all", seed: int = 0) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, split) for _ in range(n)]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


# ---------------------------------------------------------------- rendering
def test_make_example_is_deterministic():
    a, b = make_example(123, sizes=(64, 256)), make_example(123, sizes=(64, 256))
    assert a["scene"] == b["scene"] and a["caption"] == b["caption"]
    assert a[64].tobytes() == b[64].tobytes() and a[256].tobytes() == b[256].tobytes()
    assert parse_caption(a["caption"]) == a["scene"]
    assert len({make_example(seed)["caption"] for seed in range(20)}) > 10  # seeds matter


def test_variants_are_deterministic_varied_and_inside_their_ranges():
    scene = Scene("квадрат", "красный", "большой", "слева", "серый")
    plain = _pixels(render(scene, 64))
    assert np.array_equal(_pixels(render(scene, 64, variant=None)), plain)
    renders = [_pixels(render(scene, 64, variant=k)) for k in range(12)]
    assert np.array_equal(renders[3], _pixels(render(scene, 64, variant=3)))  # a pure function of (scene, k)
    assert len({r.tobytes() for r in renders}) == 12  # every variation differs
    for k, px in enumerate(renders):
        jitter = shapes.Jitter.of(scene, k)
        assert abs(jitter.dx) <= shapes.JITTER_SHIFT and abs(jitter.dy) <= shapes.JITTER_SHIFT
        assert abs(jitter.scale - 1) <= shapes.JITTER_SCALE and abs(jitter.degrees) <= shapes.JITTER_DEGREES
        assert max(map(abs, jitter.object_shift)) <= shapes.JITTER_OBJECT
        corner = px[0, 0] - np.array(BACKGROUNDS["серый"])  # the background shade moved by the shift
        assert np.array_equal(corner, np.array(jitter.background_shift, np.float32))
        assert not (px[:, :, 0] > 150).any(0)[:1].any() and not (px[:, :, 0] > 150).any(1)[:1].any()  # inside
    # the same variation at 64 and 256 px: the same picture, only finer
    fine = render(scene, 256, variant=5).resize((64, 64), Image.BOX)
    assert np.abs(_pixels(fine) - renders[5]).mean() < 3
    with pytest.raises(ValueError, match="variant must be an int >= 0"):
        render(scene, 64, variant=-1)
    with pytest.raises(ValueError, match="variant must be an int >= 0"):
        render(scene, 64, variant=True)


def test_make_example_is_varied_unless_asked_plain():
    a = make_example(7)
    assert isinstance(a["variant"], int) and a[64].tobytes() == render(a["scene"], 64, variant=a["variant"]).tobytes()
    plain = make_example(7, varied=False)
    assert plain["variant"] is None and plain[64].tobytes() == render(plain["scene"], 64).tobytes()
    assert plain["scene"] == a["scene"] and plain["caption"] == a["caption"]


def test_render_size_mode_and_colours():
    scene = Scene("круг", "жёлтый", "большой", "в центре", "синий")
    for size in (64, 256):
        image = render(scene, size)
        assert image.mode == "RGB" and image.size == (size, size)
        px = _pixels(image)
        assert tuple(px[0, 0]) == BACKGROUNDS["синий"]
        assert tuple(px[size // 2, size // 2]) == COLORS["жёлтый"]


def test_render_is_anti_aliased():
    for shape in SHAPES:
        px = _pixels(render(Scene(shape, "белый", "большой", "в центре", "чёрный")))
        colours = {tuple(p) for p in px.reshape(-1, 3)}
        assert len(colours) > (2 if shape == "квадрат" else 10), shape  # edges blend object and background
        blended = (px[..., 0] > 15) & (px[..., 0] < 245)
        assert blended.sum() > 20, shape


def test_shapes_stay_inside_canvas():
    for shape, size, position in itertools.product(SHAPES, SIZES, POSITIONS):
        for side in (64, 256):
            px = _pixels(render(Scene(shape, "белый", size, position, "чёрный"), side))
            ring = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
            assert (ring == BACKGROUNDS["чёрный"]).all(), (shape, size, position, side)
            assert (px != BACKGROUNDS["чёрный"]).any()


def test_sizes_and_positions_are_distinct():
    def area_and_centre(scene):
        alpha = (_pixels(render(scene)) != BACKGROUNDS["чёрный"]).any(-1)
        ys, xs = np.nonzero(alpha)
        return alpha.sum(), np.array([xs.mean(), ys.mean()])

    for shape in SHAPES:
        small, _ = area_and_centre(Scene(shape, "белый", "маленький", "в центре", "чёрный"))
        large, _ = area_and_centre(Scene(shape, "белый", "большой", "в центре", "чёрный"))
        assert large > 2 * small, shape  # nominal areas 0.32² vs 0.50² of the canvas (2.44x)
        _, left = area_and_centre(Scene(shape, "белый", "большой", "слева", "чёрный"))
        _, right = area_and_centre(Scene(shape, "белый", "большой", "справа", "чёрный"))
        _, top = area_and_centre(Scene(shape, "белый", "большой", "сверху", "чёрный"))
        _, bottom = area_and_centre(Scene(shape, "белый", "большой", "снизу", "чёрный"))
        assert right[0] - left[0] > 25 and bottom[1] - top[1] > 25, shape


def test_256_render_matches_64_render_when_downscaled():
    box, bicubic = [], []
    for scene in _scenes(100, seed=3):
        small, large = _pixels(render(scene, 64)), render(scene, 256)
        box.append(np.abs(_pixels(large.resize((64, 64), Image.BOX)) - small).mean())
        bicubic.append(np.abs(_pixels(large.resize((64, 64), Image.BICUBIC)) - small).mean())
    print(f"256->64 mean abs diff (0-255): box {np.mean(box):.3f} (max {np.max(box):.3f}), "
          f"bicubic {np.mean(bicubic):.3f} (max {np.max(bicubic):.3f})")
    assert np.max(box) < 1.0 and np.max(bicubic) < 2.0


def test_background_never_equals_colour():
    assert all(s.background != s.color for s in _scenes(2000))
    with pytest.raises(ValueError, match="белый"):
        Scene("круг", "белый", "большой", "слева", "белый")


# ---------------------------------------------------------------- captions
def test_canonical_captions_by_hand():
    expected = [  # (shape, colour, size, position, background), caption
        (("звезда", "жёлтый", "большой", "слева", "серый"), "большая жёлтая звезда слева на сером фоне"),
        (("круг", "синий", "маленький", "в центре", "чёрный"), "маленький синий круг в центре на чёрном фоне"),
        (("звезда", "синий", "маленький", "снизу", "белый"), "маленькая синяя звезда снизу на белом фоне"),
        (("треугольник", "голубой", "большой", "сверху", "синий"), "большой голубой треугольник сверху на синем фоне"),
        (("ромб", "фиолетовый", "маленький", "справа", "серый"), "маленький фиолетовый ромб справа на сером фоне"),
        (("квадрат", "зелёный", "большой", "снизу", "белый"), "большой зелёный квадрат снизу на белом фоне"),
        (("звезда", "белый", "маленький", "в центре", "синий"), "маленькая белая звезда в центре на синем фоне"),
    ]
    for attributes, text in expected:
        scene = Scene(*attributes)
        assert caption(scene) == text


def test_every_caption_agrees_in_gender():
    for scene in ALL_SCENES:
        text = caption(scene)
        assert text == text.lower() and "  " not in text
        words = text.split()
        size_word, color_word = words[0], words[1]
        assert words[2] == scene.shape
        if scene.shape == "звезда":
            assert size_word.endswith("ая") and color_word.endswith(("ая", "яя")), text
        else:
            assert size_word.endswith(("ий", "ой")) and color_word.endswith(("ый", "ой", "ий")), text
        assert text.endswith(" фоне") and words[-3] == "на" and words[-2].endswith(("ом", "ем")), text
        assert parse_caption(text) == scene


def test_word_orders_parse_back():
    scene = Scene("звезда", "жёлтый", "большой", "слева", "серый")
    rng = random.Random(0)
    variants = {caption(scene, rng) for _ in range(200)}
    assert len(variants) == len(WORD_ORDERS) >= 3
    assert "на сером фоне большая жёлтая звезда слева" in variants
    assert "слева большая жёлтая звезда на сером фоне" in variants
    assert parse_caption("БОЛЬШАЯ ЖЕЛТАЯ ЗВЕЗДА СЛЕВА, НА СЕРОМ ФОНЕ!") == scene  # case and е/ё
    rng = random.Random(1)
    for other in ALL_SCENES[::7]:
        assert parse_caption(caption(other, rng)) == other


def test_parse_caption_rejects_incomplete_or_contradictory_text():
    with pytest.raises(ValueError, match="background"):
        parse_caption("большая жёлтая звезда слева")
    with pytest.raises(ValueError, match="shape"):
        parse_caption("большая жёлтая слева на сером фоне")
    with pytest.raises(ValueError, match="contradictory"):
        parse_caption("большая жёлтая красная звезда слева на сером фоне")
    with pytest.raises(ValueError, match="белый"):  # valid words, invalid scene
        parse_caption("большой белый круг слева на белом фоне")
    with pytest.raises(TypeError):
        parse_caption(None)


# ---------------------------------------------------------------- splits and dataset
def test_splits_hold_out_pairs():
    assert len(HELD_OUT_PAIRS) >= 4
    assert all(c in COLORS and s in SHAPES for c, s in HELD_OUT_PAIRS)
    train = _scenes(3000, "train")
    train_pairs = {(s.color, s.shape) for s in train}
    assert not train_pairs & set(HELD_OUT_PAIRS)
    assert {c for c, _ in HELD_OUT_PAIRS} <= {s.color for s in train}
    assert {s for _, s in HELD_OUT_PAIRS} <= {s.shape for s in train}
    for color, shape in HELD_OUT_PAIRS:  # each held-out colour and shape keeps other partners
        assert any(c == color for c, _ in train_pairs) and any(s == shape for _, s in train_pairs)
    heldout = {(s.color, s.shape) for s in _scenes(300, "heldout")}
    assert heldout == set(HELD_OUT_PAIRS)
    assert {(s.color, s.shape) for s in _scenes(1000, "all")} & set(HELD_OUT_PAIRS)
    dataset = ShapesDataset(200, seed=5, split="train")
    assert not {(dataset.scene(i).color, dataset.scene(i).shape) for i in range(200)} & set(HELD_OUT_PAIRS)


def test_dataset_items():
    dataset = ShapesDataset(10, seed=7, split="all", size=64)
    image, text = dataset[3]
    assert len(dataset) == 10
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert parse_caption(text) == dataset.scene(3)
    again, text_again = ShapesDataset(10, seed=7, split="all", size=64)[3]
    assert torch.equal(image, again) and text == text_again
    assert torch.equal(dataset[-7][0], image)
    other_seed = ShapesDataset(10, seed=8, split="all")
    assert [other_seed.scene(i) for i in range(10)] != [dataset.scene(i) for i in range(10)]
    with pytest.raises(IndexError):
        dataset[10]
    images, texts = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert images.shape == (4, 3, 64, 64) and len(texts) == 4
    assert ShapesDataset(2, size=256)[0][0].shape == (3, 256, 256)


# ---------------------------------------------------------------- detector
def _report(name: str, result: dict[str, float]) -> None:
    print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "count")
          + f" (n={int(result['count'])})")


@pytest.mark.slow
def test_detector_on_64px_renders():
    scenes = _scenes(1000, seed=11)
    result = score([render(s, 64) for s in scenes], scenes)
    _report("detector 64px", result)
    assert result["all"] >= 0.99
    assert min(result[a] for a in ("shape", "color", "size", "position", "background")) >= 0.99


@pytest.mark.slow
def test_detector_on_256px_renders():
    scenes = _scenes(1000, seed=12)
    result = score([render(s, 256) for s in scenes], scenes)
    _report("detector 256px", result)
    assert result["all"] >= 0.99


@pytest.mark.slow
def test_detector_on_varied_renders():
    """Within-caption variety (shift, scale, rotation, colour shades) stays readable: >= 99%."""
    rng = random.Random(14)
    scenes = _scenes(1000, seed=14)
    variants = [rng.randrange(2**31) for _ in scenes]
    result = score([render(s, 64, variant=v) for s, v in zip(scenes, variants)], scenes)
    _report("detector 64px varied", result)
    assert result["all"] >= 0.99
    degraded = score([_degrade(render(s, 64, variant=v), i) for i, (s, v) in enumerate(zip(scenes[:300], variants))],
                     scenes[:300])
    _report("detector 64px varied blur+noise+jpeg", degraded)
    assert degraded["all"] >= 0.9


def _degrade(image: Image.Image, seed: int) -> Image.Image:
    """Mild Gaussian blur, Gaussian noise (sigma 8 of 255) and JPEG at quality 75."""
    blurred = _pixels(image.filter(ImageFilter.GaussianBlur(0.8)))
    noisy = blurred + np.random.default_rng(seed).normal(0, 8, blurred.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=75)
    return Image.open(buffer).convert("RGB")


@pytest.mark.slow
def test_detector_on_degraded_renders():
    scenes = _scenes(500, seed=13)
    result = score([_degrade(render(s, 64), i) for i, s in enumerate(scenes)], scenes)
    _report("detector 64px blur+noise+jpeg", result)
    assert result["all"] >= 0.9
    assert min(result[a] for a in ("color", "size", "position", "background")) >= 0.98


def test_detection_fields_and_matches():
    scene = Scene("ромб", "оранжевый", "маленький", "сверху", "чёрный")
    detection = detect(render(scene, 64))
    assert isinstance(detection, Detection) and detection.to_scene() == scene
    assert 0.9 < detection.confidence <= 1.0
    other = Scene("ромб", "красный", "маленький", "снизу", "чёрный")
    assert attribute_matches(detection, other) == {
        "shape": True, "color": False, "size": True, "position": False, "background": True}
    blank = detect(Image.new("RGB", (64, 64), BACKGROUNDS["серый"]))
    assert blank.background == "серый" and blank.shape is None and blank.confidence == 0.0
    with pytest.raises(ValueError):
        blank.to_scene()
    assert detect(render(scene, 64).convert("RGBA")) == detection  # any PIL mode


# ---------------------------------------------------------------- bad input
def test_bad_input():
    with pytest.raises(ValueError, match=r"shape 'овал'.*круг"):
        Scene("овал", "белый", "большой", "слева", "чёрный")
    with pytest.raises(ValueError, match="розовый"):
        Scene("круг", "розовый", "большой", "слева", "чёрный")
    with pytest.raises(ValueError, match="огромный"):
        Scene("круг", "белый", "огромный", "слева", "чёрный")
    with pytest.raises(ValueError, match="посередине"):
        Scene("круг", "белый", "большой", "посередине", "чёрный")
    with pytest.raises(ValueError, match=r"split 'test'.*heldout"):
        sample_scene(random.Random(0), "test")
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(5, split="val")
    with pytest.raises(ValueError, match="split"):
        make_example(0, split="valid")
    with pytest.raises(TypeError):
        sample_scene(0)
    with pytest.raises(ValueError, match="size"):
        render(ALL_SCENES[0], 8)
    with pytest.raises(TypeError, match="PIL"):
        detect(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(TypeError, match="PIL"):
        detect(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="square"):
        detect(Image.new("RGB", (64, 32)))
    with pytest.raises(ValueError, match="as many"):
        score([render(ALL_SCENES[0])], [])
    with pytest.raises(ValueError, match="num_examples"):
        ShapesDataset(0)


def test_module_constants_are_consistent():
    assert set(shapes.SPLITS) == {"train", "heldout", "all"}
    assert len(SHAPES) == 5 and len(COLORS) == 8 and len(SIZES) == 2 and len(POSITIONS) == 5
    assert len(BACKGROUNDS) == 4
    palette = np.array(list(COLORS.values()), np.float32)
    gaps = np.linalg.norm(palette[:, None] - palette[None], axis=-1) + np.eye(len(palette)) * 1e9
    assert gaps.min() > 100  # colours are well separated
    for color, rgb in COLORS.items():
        for background, bg in BACKGROUNDS.items():
            if color != background:
                assert np.linalg.norm(np.subtract(rgb, bg)) > 100, (color, background)


def test_every_held_out_caption_word_is_seen_in_training():
    """Held-out pairs test composition, not unseen words: every word of a held-out caption occurs
    in some training caption (word orders only permute the same words)."""
    from rudalle_pipe.shapes import BACKGROUNDS, COLORS, HELD_OUT_PAIRS, POSITIONS, SHAPES, SIZES, Scene, caption

    vocab = {True: set(), False: set()}
    for color, shape, size, position, background in itertools.product(COLORS, SHAPES, SIZES, POSITIONS,
                                                                      BACKGROUNDS):
        if background != color:
            held_out = (color, shape) in HELD_OUT_PAIRS
            vocab[held_out].update(caption(Scene(shape, color, size, position, background)).split())
    assert vocab[True] and vocab[True] <= vocab[False], vocab[True] - vocab[False]
