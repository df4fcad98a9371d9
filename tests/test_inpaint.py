"""Paste-back (kept pixels exactly restored, feathered seam) and outpainting (code shift, new strip,
panorama stitching, seeds) on the embedded demo model, plus bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

from rudalle_pipe import ImagePrompt, OutpaintOutput, generate_images, outpaint, paste_back, shapes
from rudalle_pipe.images import prepare_image
from rudalle_pipe.inpaint import MAX_FEATHER, MAX_OUTPAINT_STEPS
from rudalle_pipe.pipeline import load_pipeline

SIZE, SIDE, PATCH = 64, 8, 8  # the demo VQGAN: 64 px, an 8x8 grid of 8x8 px patches
SAMPLING = dict(top_k=64, top_p=0.99)


@pytest.fixture(scope="module")
def demo():
    return load_pipeline("demo", clip=False, upscaler=False)


def _scene(background="синий", position="слева", size="маленький"):
    scene = shapes.Scene("круг", "красный", size, position, background)
    return shapes.render(scene, SIZE), shapes.caption(scene)


def _noise(size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


# ------------------------------------------------------------------------------------- paste-back


def test_paste_back_restores_kept_pixels_exactly_after_generation(demo):
    image, caption = _scene(size="большой", position="в центре")
    keep = np.ones((SIZE, SIZE), dtype=bool)
    keep[16:48, 16:48] = False  # a hole over the object: 4x4 codes generated
    prompt = ImagePrompt.from_mask(image, demo.vae, keep)
    out = generate_images(caption, demo.tokenizer, demo.dalle, demo.vae, num_images=3, seed=5,
                          image_prompt=prompt, progress=False, **SAMPLING)
    source = np.asarray(image, dtype=int)
    before = np.abs(np.asarray(out.images[0], dtype=int) - source)[keep].max()
    assert before > 0  # the VQGAN round trip does change the kept pixels: that is what paste-back is for
    for given in (keep, Image.fromarray(keep.astype(np.uint8) * 255, "L"), prompt):
        pasted = paste_back(out.images, image, given, feather=3)
        assert len(pasted) == 3
        for result, generated in zip(pasted, out.images):
            assert result.mode == "RGB" and result.size == (SIZE, SIZE)
            diff = np.asarray(result, dtype=int) - source
            assert np.abs(diff[keep]).max() == 0  # kept pixels identical to the input
            # farther than the feather from every kept pixel: the generated pixels, untouched
            far = np.zeros_like(keep)
            far[20:44, 20:44] = True
            assert np.array_equal(np.asarray(result)[far], np.asarray(generated)[far])


@pytest.mark.parametrize("feather", [0, 1, 4, MAX_FEATHER])
def test_feather_is_a_linear_ramp_on_the_generated_side(feather):
    white = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))  # the input
    black = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))  # a "generated" picture
    keep = np.zeros((SIZE, SIZE), dtype=bool)
    keep[:, :20] = True  # the left 20 columns kept: a straight vertical seam
    row = np.asarray(paste_back([black], white, keep, feather=feather)[0])[:, :, 0]
    assert (row == row[0]).all()  # every row the same
    d = np.arange(SIZE) - 19  # distance of column x to the nearest kept column
    expected = np.where(d <= 0, 255, np.rint(255 * np.clip(1 - d / (feather + 1), 0, 1)))
    assert np.array_equal(row[0], expected.astype(np.uint8))
    if feather:
        ramp = row[0, 20:20 + feather].astype(int)
        assert (np.diff(ramp) < 0).all() and 0 < ramp.min() and ramp.max() < 255
    assert (row[0, 20 + feather:] == 0).all()  # beyond the feather: unchanged


def test_feather_distance_is_euclidean_around_a_corner():
    keep = np.zeros((SIZE, SIZE), dtype=bool)
    keep[:10, :10] = True
    out = np.asarray(paste_back([Image.new("RGB", (SIZE, SIZE))], Image.new("RGB", (SIZE, SIZE), (255,) * 3),
                                keep, feather=4)[0])[:, :, 0]
    # (12, 12) is sqrt(3^2 + 3^2) = 4.24 > 4 from the kept corner (9, 9): unchanged; (11, 11) is 2.83
    assert out[12, 12] == 0 and out[11, 11] == round(255 * (1 - np.hypot(2, 2) / 5))


def test_image_prompt_mask_covers_whole_patches():
    mask = torch.zeros(SIDE * SIDE, dtype=torch.bool)
    mask[SIDE + 2] = True  # code (row 1, column 2)
    prompt = ImagePrompt.from_codes(torch.zeros(SIDE * SIDE, dtype=torch.long), mask)
    source, generated = _noise(seed=1), _noise(seed=2)
    out = np.asarray(paste_back([generated], source, prompt, feather=0)[0])
    expected = np.asarray(generated).copy()
    expected[8:16, 16:24] = np.asarray(source)[8:16, 16:24]
    assert np.array_equal(out, expected)
    # a 128 px result: each code is 16 px
    big = np.asarray(paste_back([_noise(128, 2)], _noise(128, 1), prompt, feather=0)[0])
    assert np.array_equal(big[16:32, 32:48], np.asarray(_noise(128, 1))[16:32, 32:48])
    assert np.array_equal(big[:16], np.asarray(_noise(128, 2))[:16])


def test_prompt_image_is_prepared_like_the_prompt():
    wide = Image.fromarray(np.random.default_rng(4).integers(0, 256, (50, 90, 3), dtype=np.uint8), "RGB")
    keep = np.ones((50, 90), dtype=bool)
    out = paste_back([_noise()], wide, keep, feather=0)[0]
    assert np.array_equal(np.asarray(out), np.asarray(prepare_image(wide, SIZE)))


@pytest.mark.parametrize("call, error, match", [
    (lambda: paste_back([_noise()], _noise(), np.ones((SIZE, SIZE), bool), feather=-1), ValueError, r"\[0, 32\]"),
    (lambda: paste_back([_noise()], _noise(), np.ones((SIZE, SIZE), bool), feather=MAX_FEATHER + 1),
     ValueError, "feather"),
    (lambda: paste_back([_noise()], _noise(), np.ones((SIZE, SIZE), bool), feather=True), TypeError, "feather"),
    (lambda: paste_back([_noise()], _noise(), np.ones((SIZE, SIZE), bool), feather=2.0), TypeError, "feather"),
    (lambda: paste_back(_noise(), _noise(), np.ones((SIZE, SIZE), bool)), TypeError, "list of PIL"),
    (lambda: paste_back([_noise(), _noise(32)], _noise(), np.ones((SIZE, SIZE), bool)), ValueError, "one size"),
    (lambda: paste_back([_noise().convert("L")], _noise(), np.ones((SIZE, SIZE), bool)), ValueError, "RGB"),
    (lambda: paste_back([_noise().crop((0, 0, 64, 32))], _noise(), np.ones((SIZE, SIZE), bool)), ValueError,
     "square"),
    (lambda: paste_back([_noise()], np.zeros((SIZE, SIZE, 3)), np.ones((SIZE, SIZE), bool)), TypeError,
     "prompt_image"),
    (lambda: paste_back([_noise()], _noise(), np.ones((SIZE, 32), bool)), ValueError, "same size"),
    (lambda: paste_back([_noise()], _noise(), Image.new("RGB", (SIZE, SIZE))), ValueError, "mode"),
    (lambda: paste_back([_noise()], _noise(), np.zeros((SIZE, SIZE), bool)), ValueError, "keeps no pixel"),
    (lambda: paste_back([_noise(60)], _noise(), ImagePrompt.from_codes(torch.zeros(64, dtype=torch.long),
                                                                       torch.arange(64) < 8)),
     ValueError, "8x8 grid"),
])
def test_paste_back_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# -------------------------------------------------------------------------------------- outpainting


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["right", "down"])
@pytest.mark.parametrize("k", [1, 3])
def test_outpaint_keeps_the_shifted_codes(demo, direction, k):
    image, caption = _scene()
    out = outpaint(image, caption, demo.tokenizer, demo.dalle, demo.vae, **{direction: k}, num_images=2,
                   seed=0, **SAMPLING)
    assert isinstance(out, OutpaintOutput)
    assert out.codes.shape == (2, 1, SIDE * SIDE) and len(out.images) == 2
    assert out.images[0].size == (SIZE, SIZE)
    old = out.input_codes.view(SIDE, SIDE)
    for codes in out.codes[:, 0]:
        grid = codes.view(SIDE, SIDE)
        if direction == "right":  # the first side-k columns are the old last side-k columns
            assert torch.equal(grid[:, : SIDE - k], old[:, k:])
        else:
            assert torch.equal(grid[: SIDE - k], old[k:])
    assert out.seeds == [[0], [1]]


@pytest.mark.slow
@pytest.mark.parametrize("background", ["синий", "чёрный", "белый"])
def test_new_strip_is_background_where_the_caption_puts_nothing(demo, background):
    # a small circle on the left; outpaint right by 2 codes (16 px): the caption puts nothing there.
    # Tolerance: the VQGAN reproduces a flat background within ~1 level; 8 levels per channel (3% of
    # the range) leaves room for codec noise, while a drawn object (contrast >= 40, shapes.detect's
    # threshold) covering even 1/5 of the strip would move the mean by >= 8.
    image, caption = _scene(background)
    colour = np.array(image.getpixel((SIZE - 1, 0)), dtype=float)
    out = outpaint(image, caption, demo.tokenizer, demo.dalle, demo.vae, right=2, num_images=4, seed=3,
                   **SAMPLING)
    for frame in out.images:
        strip = np.asarray(frame, dtype=float)[:, -16:].reshape(-1, 3)
        assert np.abs(strip.mean(0) - colour).max() < 8.0
        assert (np.abs(strip - colour).max(1) > 40).mean() < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("direction, k, steps", [("right", 2, 3), ("down", 3, 2), ("right", 7, 1)])
def test_stitched_panorama(demo, direction, k, steps):
    image, caption = _scene()
    out = outpaint(image, caption, demo.tokenizer, demo.dalle, demo.vae, **{direction: k}, steps=steps,
                   seed=11, **SAMPLING)
    pano = np.asarray(out.stitched[0])
    grow = SIZE + steps * k * PATCH
    assert pano.shape == ((SIZE, grow, 3) if direction == "right" else (grow, SIZE, 3))
    if direction == "down":
        pano = pano.transpose(1, 0, 2)  # columns <-> rows: check it like a right panorama
    assert np.array_equal(pano[:, :SIZE], np.asarray(image).transpose(*((0, 1, 2) if direction == "right"
                                                                          else (1, 0, 2))))
    assert out.codes.shape == (1, steps, SIDE * SIDE) and out.seeds == [[11 + j for j in range(steps)]]
    prev = out.input_codes.view(SIDE, SIDE)
    for j in range(steps):  # each step continues the previous one, and its strip is appended
        grid = out.codes[0, j].view(SIDE, SIDE)
        frame = np.asarray(demo.vae.decode(out.codes[0, j][None]).clamp(0, 1).mul(255).round().byte()[0]
                           .permute(1, 2, 0).numpy())
        if direction == "right":
            assert torch.equal(grid[:, : SIDE - k], prev[:, k:])
        else:
            assert torch.equal(grid[: SIDE - k], prev[k:])
            frame = frame.transpose(1, 0, 2)
        start = SIZE + j * k * PATCH
        assert np.array_equal(pano[:, start:start + k * PATCH], frame[:, -k * PATCH:])
        prev = grid
    assert out.images[0].size == (SIZE, SIZE)


def test_stitching_follows_an_upsampling_decoder(demo, monkeypatch):
    """A decoder that outputs 2R px (like the Sber VQGAN's DWT one): the panorama is stitched at 2R."""
    import rudalle_pipe.inpaint as inpaint

    real = inpaint.generate_images

    def doubled(*args, **kwargs):
        out = real(*args, **kwargs)
        out.images = [im.resize((2 * SIZE, 2 * SIZE), Image.NEAREST) for im in out.images]
        return out

    monkeypatch.setattr(inpaint, "generate_images", doubled)
    image, caption = _scene()
    out = outpaint(image.resize((90, 70)), caption, demo.tokenizer, demo.dalle, demo.vae, right=3, steps=2,
                   seed=1, **SAMPLING)
    pano = np.asarray(out.stitched[0])
    assert pano.shape == (2 * SIZE, 2 * SIZE + 2 * 3 * 2 * PATCH, 3)
    assert np.array_equal(pano[:, : 2 * SIZE], np.asarray(prepare_image(image.resize((90, 70)), 2 * SIZE)))
    assert np.array_equal(pano[:, -3 * 2 * PATCH:], np.asarray(out.images[0])[:, -3 * 2 * PATCH:])


@pytest.mark.slow
def test_outpaint_seeds_are_reproducible(demo):
    image, caption = _scene()
    args = (image, caption, demo.tokenizer, demo.dalle, demo.vae)
    a = outpaint(*args, right=2, steps=2, num_images=2, seed=7, **SAMPLING)
    b = outpaint(*args, right=2, steps=2, num_images=2, seed=7, **SAMPLING)
    assert torch.equal(a.codes, b.codes)
    # another seed, another strip: where the strip must continue an object cut at the edge (a plain
    # background strip can legitimately come out the same for every seed)
    cut = (_scene(position="справа", size="большой")[0], caption, demo.tokenizer, demo.dalle, demo.vae)
    c7 = outpaint(*cut, right=2, steps=2, num_images=2, seed=7, **SAMPLING)
    c8 = outpaint(*cut, right=2, steps=2, num_images=2, seed=8, **SAMPLING)
    assert not torch.equal(c7.codes, c8.codes)
    assert a.seeds == [[7, 9], [8, 10]]
    # chain 1, step 0 is generate_images with seed 8 on the shifted prompt
    shifted = torch.zeros(SIDE, SIDE, dtype=torch.long)
    shifted[:, :6] = a.input_codes.view(SIDE, SIDE)[:, 2:]
    keep = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    keep[:, :6] = True
    single = generate_images(caption, demo.tokenizer, demo.dalle, demo.vae, num_images=1, seed=8, progress=False,
                             image_prompt=ImagePrompt.from_codes(shifted.view(-1), keep.view(-1)), **SAMPLING)
    assert torch.equal(single.codes[0], a.codes[1, 0])
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(outpaint(*args, right=1, generator=g1, **SAMPLING).codes,
                       outpaint(*args, right=1, generator=g2, **SAMPLING).codes)


@pytest.mark.parametrize("kwargs, error, match", [
    ({}, ValueError, "exactly one of right= or down="),
    ({"right": 1, "down": 1}, ValueError, "exactly one"),
    ({"left": 2}, ValueError, "raster order"),
    ({"up": 2}, ValueError, "raster order"),
    ({"right": 0}, ValueError, r"right must be in \[1, 7\]"),
    ({"down": SIDE}, ValueError, r"down must be in \[1, 7\]"),
    ({"right": True}, TypeError, "right"),
    ({"right": 1.0}, TypeError, "right"),
    ({"right": 1, "steps": 0}, ValueError, "steps"),
    ({"right": 1, "steps": MAX_OUTPAINT_STEPS + 1}, ValueError, r"steps must be in \[1, 64\]"),
    ({"right": 1, "num_images": 0}, ValueError, "num_images"),
    ({"right": 1, "top_k": 0}, ValueError, "top_k"),
    ({"right": 1, "seed": -1}, ValueError, "seed"),
    ({"right": 1, "seed": 1, "generator": torch.Generator()}, ValueError, "not both"),
])
def test_outpaint_bad_input(demo, monkeypatch, kwargs, error, match):
    import rudalle_pipe.inpaint as inpaint

    def no_work(*args, **kw):
        raise AssertionError("slow work started before the arguments were checked")

    monkeypatch.setattr(inpaint, "_encode", no_work)
    monkeypatch.setattr(inpaint, "generate_images", no_work)
    image, caption = _scene()
    args = {**SAMPLING, **kwargs}
    with pytest.raises(error, match=match):
        outpaint(image, caption, demo.tokenizer, demo.dalle, demo.vae, **args)


def test_outpaint_refuses_non_pil_and_non_text(demo):
    image, caption = _scene()
    with pytest.raises(TypeError, match="PIL"):
        outpaint(np.asarray(image), caption, demo.tokenizer, demo.dalle, demo.vae, right=1, **SAMPLING)
    with pytest.raises(TypeError, match="text must be a str"):
        outpaint(image, None, demo.tokenizer, demo.dalle, demo.vae, right=1, **SAMPLING)
