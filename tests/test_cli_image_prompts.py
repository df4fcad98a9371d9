"""``rudalle-pipe generate --image-prompt`` on a tiny saved pipeline (4x4 codes, 32 px), offline:
--borders / --mask reach generate_images as the right ImagePrompt and keep its codes, --paste-back
restores the kept pixels in the written images, results.json records the prompt, and every bad
combination exits 2 before any model loads."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rudalle_pipe.generation as generation
import rudalle_pipe.pipeline as pipeline
from rudalle_pipe.cli import EXIT_USAGE, main
from rudalle_pipe.image_prompts import keep_pixels
from rudalle_pipe.images import prepare_image
from rudalle_pipe.pipeline import save_pipeline
from tiny import SIDE, tiny_pipeline

TEXT = "рыжий котик"
SIZE = SIDE * 8  # 32 px


@pytest.fixture(scope="module")
def pipe_dir(fixtures_dir, tmp_path_factory) -> Path:
    """A saved pipeline with tokenizer, generator, VQGAN, CLIP and an x4 upscaler."""
    tmp = tmp_path_factory.mktemp("pipe")
    return save_pipeline(tiny_pipeline(fixtures_dir, tmp), tmp / "tiny")


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    """A 48x40 RGB picture (not square, not the model's size: the CLI resizes and crops it)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("pic") / "picture.png"
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory) -> Path:
    """A 48x40 mask keeping everything but a 24x20 hole in the middle."""
    mask = Image.new("L", (48, 40), 255)
    mask.paste(0, (12, 10, 36, 30))
    path = tmp_path_factory.mktemp("mask") / "mask.png"
    mask.save(path)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def captured(monkeypatch):
    """Records the image_prompt and the output of every generate_images call (the real one runs)."""
    calls = []
    real = generation.generate_images

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append((kwargs.get("image_prompt"), result))
        return result

    monkeypatch.setattr(generation, "generate_images", spy)
    return calls


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def base(pipe_dir, out):
    return ["generate", TEXT, "--model", pipe_dir, "--num-images", 3, "--rerank", 0, "--upscale", "none",
            "--seed", 3, "--out", out, "--no-progress"]


def test_borders_keep_the_prompt_codes(pipe_dir, picture, tmp_path, capsys, captured):
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, *base(pipe_dir, out), "--image-prompt", picture, "--borders", "up=1,left=2")
    assert code == 0, stderr
    assert "wrote 3 images" in stdout
    [(prompt, gen)] = captured
    expected = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    expected[:1] = True
    expected[:, :2] = True
    assert torch.equal(prompt.mask_grid(), expected) and prompt.num_kept == 1 * 4 + 3 * 2
    assert torch.equal(gen.codes[:, prompt.mask], prompt.codes[prompt.mask].expand(3, -1))  # kept in every candidate
    results = json.loads((out / "results.json").read_text("utf-8"))
    assert results["image_prompt"] == {"file": str(picture), "sha256": sha256(picture), "kept": 10, "side": SIDE,
                                       "borders": {"up": 1, "left": 2}, "crop_first": False, "paste_back": False,
                                       "feather": None}


def test_borders_one_int_and_crop_first(pipe_dir, picture, tmp_path, capsys, captured):
    code, _, stderr = run(capsys, *base(pipe_dir, tmp_path / "out"), "--image-prompt", picture, "--borders", "1",
                          "--crop-first")
    assert code == 0, stderr
    [(prompt, gen)] = captured
    expected = torch.ones(SIDE, SIDE, dtype=torch.bool)
    expected[1:-1, 1:-1] = False
    assert torch.equal(prompt.mask_grid(), expected)
    from rudalle_pipe.image_prompts import ImagePrompt

    vae = pipeline.load_pipeline(pipe_dir, clip=False, upscaler=False).vae
    with Image.open(picture) as image:
        reference = ImagePrompt.from_borders(image, vae, 1, crop_first=True)
    assert torch.equal(prompt.codes, reference.codes)  # each strip encoded on its own
    results = json.loads((tmp_path / "out" / "results.json").read_text("utf-8"))
    assert results["image_prompt"]["borders"] == 1 and results["image_prompt"]["crop_first"] is True


def test_mask_with_paste_back_restores_kept_pixels(pipe_dir, picture, mask_file, tmp_path, capsys, captured):
    out = tmp_path / "out"
    code, _, stderr = run(capsys, *base(pipe_dir, out), "--image-prompt", picture, "--mask", mask_file,
                          "--paste-back", "--feather", 0)
    assert code == 0, stderr
    [(prompt, gen)] = captured
    with Image.open(mask_file) as mask, Image.open(picture) as image:
        keep = keep_pixels(mask, image.size, SIZE)
        prepared = np.asarray(prepare_image(image, SIZE))
    assert 0 < prompt.num_kept < SIDE * SIDE
    assert keep.sum() > 0 and (~keep).sum() > 0
    for i in range(3):
        with Image.open(out / f"image_{i:03d}.png") as saved:
            pixels = np.asarray(saved.convert("RGB"))
        assert pixels.shape == (SIZE, SIZE, 3)
        assert np.array_equal(pixels[keep], prepared[keep])  # exactly the prepared input where kept
        decoded = np.asarray(gen.images[i])
        assert np.array_equal(pixels[~keep], decoded[~keep])  # feather 0: the rest is the generated image
        assert not np.array_equal(decoded[keep], prepared[keep])  # the VQGAN round trip alone is lossy
    results = json.loads((out / "results.json").read_text("utf-8"))
    assert results["image_prompt"] == {"file": str(picture), "sha256": sha256(picture), "kept": prompt.num_kept,
                                       "side": SIDE, "mask": {"file": str(mask_file), "sha256": sha256(mask_file)},
                                       "crop_first": False, "paste_back": True, "feather": 0}


def test_paste_back_happens_before_rerank_and_upscale(pipe_dir, picture, tmp_path, capsys, captured, monkeypatch):
    """With --borders the whole kept codes are restored; CLIP and the upscaler both get the pasted images."""
    import rudalle_pipe.clip as clip
    import rudalle_pipe.realesrgan as realesrgan
    from rudalle_pipe.inpaint import paste_back

    seen = {}
    for module, name in ((clip, "cherry_pick_by_clip"), (realesrgan, "super_resolution")):
        def spy(images, *args, _real=getattr(module, name), _name=name, **kwargs):
            seen[_name] = [np.asarray(im).copy() for im in images]
            return _real(images, *args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    out = tmp_path / "out"
    argv = [a if a not in ("none", 0) else {"none": "x4", 0: 3}[a] for a in base(pipe_dir, out)]
    code, _, stderr = run(capsys, *argv, "--image-prompt", picture, "--borders", "down=2", "--paste-back")
    assert code == 0, stderr
    [(prompt, gen)] = captured
    with Image.open(picture) as image:
        pasted = [np.asarray(im) for im in paste_back(gen.images, image, prompt, feather=4)]
    assert all(not np.array_equal(p, np.asarray(g)) for p, g in zip(pasted, gen.images))  # the paste changes them
    assert all(np.array_equal(a, b) for a, b in zip(seen["cherry_pick_by_clip"], pasted))  # all 3, in order
    results = json.loads((out / "results.json").read_text("utf-8"))
    order = [im["index"] for im in results["images"]]
    assert all(np.array_equal(a, pasted[i]) for a, i in zip(seen["super_resolution"], order))  # the kept, ranked
    assert results["image_prompt"]["feather"] == 4 and results["settings"]["rerank"] == 3


def test_without_image_prompt_results_have_no_entry(pipe_dir, tmp_path, capsys, captured):
    code, _, stderr = run(capsys, *base(pipe_dir, tmp_path / "out"))
    assert code == 0, stderr
    assert captured[0][0] is None
    assert "image_prompt" not in json.loads((tmp_path / "out" / "results.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "text.png").write_text("not a picture")
    Image.new("L", (20, 20), 255).save(tmp / "small_mask.png")
    Image.new("RGB", (48, 40), (255, 255, 255)).save(tmp / "rgb_mask.png")
    Image.new("L", (48, 40), 255).save(tmp / "white_mask.png")
    Image.new("L", (48, 40), 0).save(tmp / "black_mask.png")
    return {name: tmp / name for name in ("text.png", "small_mask.png", "rgb_mask.png", "white_mask.png",
                                          "black_mask.png")} | {"missing.png": tmp / "missing.png"}


BAD = [  # (extra argv, what stderr names); IMG = the picture, MASK = the good mask, other names from bad_files
    (["--borders", "2"], "--borders needs --image-prompt"),
    (["--mask", "MASK"], "--mask needs --image-prompt"),
    (["--paste-back"], "--paste-back needs --image-prompt"),
    (["--image-prompt", "IMG"], "exactly one of --borders"),
    (["--image-prompt", "IMG", "--borders", "1", "--mask", "MASK"], "exactly one of --borders"),
    (["--image-prompt", "IMG", "--mask", "MASK", "--crop-first"], "--crop-first only applies to --borders"),
    (["--image-prompt", "IMG", "--borders", "1", "--feather", "2"], "--feather only applies with --paste-back"),
    (["--image-prompt", "IMG", "--borders", "1", "--paste-back", "--feather", "99"], "--feather must be in [0, 32]"),
    (["--image-prompt", "IMG", "--borders", "top=2"], "unknown key 'top'; valid keys: up, down, left, right"),
    (["--image-prompt", "IMG", "--borders", "up=x"], "--borders 'up=x': up='x' is not an int"),
    (["--image-prompt", "IMG", "--borders", "up=1,up=2"], "key 'up' given twice"),
    (["--image-prompt", "IMG", "--borders", "up"], "'up' is not KEY=INT"),
    (["--image-prompt", "IMG", "--borders", "4"], "--borders '4': borders['up']"),
    (["--image-prompt", "IMG", "--borders", "left=-1"], "--borders 'left=-1'"),
    (["--image-prompt", "IMG", "--borders", "0"], "keeps none of the 16 codes"),
    (["--image-prompt", "IMG", "--borders", "up=2,down=2"], "keeps all 16 codes"),
    (["--image-prompt", "missing.png", "--borders", "1"], "--image-prompt"),
    (["--image-prompt", "text.png", "--borders", "1"], "not a picture PIL can decode"),
    (["--image-prompt", "IMG", "--mask", "text.png"], "--mask"),
    (["--image-prompt", "IMG", "--mask", "small_mask.png"], "must be the same size"),
    (["--image-prompt", "IMG", "--mask", "rgb_mask.png"], "mode L or 1"),
    (["--image-prompt", "IMG", "--mask", "white_mask.png"], "keeps all 16 codes"),
    (["--image-prompt", "IMG", "--mask", "black_mask.png"], "keeps none of the 16 codes"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(extra) for extra, _ in BAD])
def test_bad_combinations_exit_2_before_loading(pipe_dir, picture, mask_file, bad_files, tmp_path, capsys,
                                                monkeypatch, extra, message):
    def refuse(*args, **kwargs):
        raise AssertionError("load_pipeline must not run")

    monkeypatch.setattr(pipeline, "load_pipeline", refuse)
    names = {"IMG": picture, "MASK": mask_file, **bad_files}
    argv = [names.get(a, a) for a in extra]
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, *base(pipe_dir, out), *argv)
    assert code == EXIT_USAGE, stderr
    assert stdout == "" and stderr.count("\n") == 1 and message in stderr, stderr
    assert not out.exists()


# ------------------------------------------------------------------------------------- outpaint
def test_outpaint_writes_panoramas_atomically_and_overwrite_safe(pipe_dir, picture, tmp_path, capsys):
    from rudalle_pipe.inpaint import outpaint

    out = tmp_path / "out"
    argv = ["outpaint", picture, TEXT, "--model", pipe_dir, "--right", 1, "--steps", 2, "--num-images", 2,
            "--seed", 5, "--top-k", 20, "--out", out, "--no-progress", "--device", "cpu"]  # recorded below
    code, stdout, stderr = run(capsys, *argv)
    assert code == 0, stderr
    assert "wrote 2 panoramas" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["image_000.png", "image_001.png", "results.json"]
    pipe = pipeline.load_pipeline(pipe_dir, clip=False, upscaler=False)
    with Image.open(picture) as image:
        expected = outpaint(image, TEXT, pipe.tokenizer, pipe.dalle, pipe.vae, right=1, steps=2, top_k=20,
                            top_p=0.995, num_images=2, seed=5)
    for i in range(2):
        with Image.open(out / f"image_{i:03d}.png") as saved:
            assert saved.size == (SIZE + 2 * 8, SIZE)
            assert np.array_equal(np.asarray(saved), np.asarray(expected.stitched[i]))
    results = json.loads((out / "results.json").read_text("utf-8"))
    assert results["input"] == {"file": str(picture), "sha256": sha256(picture)}
    assert results["settings"] == {"direction": "right", "k": 1, "steps": 2, "num_images": 2, "top_k": 20,
                                    "top_p": 0.995, "temperature": 1.0, "seed": 5, "device": "cpu",
                                    "dtype": "float32"}
    assert [im["seeds"] for im in results["images"]] == expected.seeds == [[5, 7], [6, 8]]

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, stderr = run(capsys, *argv)  # refused, nothing touched
    assert code == 1 and "--overwrite" in stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    argv[argv.index("--num-images") + 1] = 1
    code, _, stderr = run(capsys, *argv, "--overwrite")
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["image_000.png", "results.json"]  # the stale image removed


def test_outpaint_down(pipe_dir, picture, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = run(capsys, "outpaint", picture, TEXT, "--model", pipe_dir, "--down", 3, "--seed", 1,
                          "--out", out, "--no-progress")
    assert code == 0, stderr
    with Image.open(out / "image_000.png") as saved:
        assert saved.size == (SIZE, SIZE + 3 * 8)
    assert json.loads((out / "results.json").read_text("utf-8"))["settings"]["direction"] == "down"


OUTPAINT_BAD = [
    (["IMG", "--right", "4"], "--right (codes, grid 4x4) must be in [1, 3], got 4"),
    (["IMG", "--down", "0"], "--down (codes, grid 4x4) must be in [1, 3], got 0"),
    (["IMG", "--right", "1", "--down", "1"], "not allowed with argument --right"),
    (["IMG"], "one of the arguments --right --down is required"),
    (["IMG", "--right", "1", "--steps", "0"], "--steps must be in [1, 64]"),
    (["IMG", "--right", "1", "--steps", "65"], "--steps must be in [1, 64]"),
    (["IMG", "--right", "1", "--top-p", "2"], "--top-p"),
    (["IMG", "--right", "1", "--num-images", "0"], "--num-images"),
    (["IMG", "--right", "1", "--steps", "3", "--seed", str(2**63 - 3)], "--seed (uses S .. S + --steps * --num-images"),
    (["missing.png", "--right", "1"], "IMG"),
    (["text.png", "--right", "1"], "not a picture PIL can decode"),
]


@pytest.mark.parametrize("extra, message", OUTPAINT_BAD, ids=[" ".join(extra) for extra, _ in OUTPAINT_BAD])
def test_outpaint_bad_values_exit_2_before_loading(pipe_dir, picture, bad_files, tmp_path, capsys, monkeypatch,
                                                   extra, message):
    def refuse(*args, **kwargs):
        raise AssertionError("load_pipeline must not run")

    monkeypatch.setattr(pipeline, "load_pipeline", refuse)
    names = {"IMG": picture, **bad_files}
    img, *flags = [names.get(a, a) for a in extra]
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "outpaint", img, TEXT, "--model", pipe_dir, "--out", out, *flags)
    assert code == EXIT_USAGE, stderr
    assert stdout == "" and stderr.count("\n") == 1 and message in stderr, stderr
    assert not out.exists()
