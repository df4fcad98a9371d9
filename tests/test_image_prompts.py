"""Image prompts: parity with the original ruDALL-E's ``ImagePrompts`` and ``generate_images(...,
image_prompts=...)`` on the shared fixtures, the whole-patch mask rule, seeds, perplexity, bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import rudalle_pipe.generation as generation
import rudalle_pipe.sampling as sampling
from rudalle_pipe import ImagePrompt, generate_images, get_rudalle_model
from rudalle_pipe.images import images_to_tensor, prepare_image
from rudalle_pipe.tokenizer import YTTMTokenizer
from rudalle_pipe.vae import VQGAN, VQGANConfig, load_vqgan
from tiny import IMAGE_VOCAB, SIDE, TEXT_LEN, tiny_dalle, tiny_vae

N = SIDE * SIDE
RES = SIDE * 8  # the tiny VQGAN's resolution: a 4x4 grid of 8x8 patches
TINY_DALLE = dict(num_layers=4, hidden_size=64, num_attention_heads=4)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def original(fixtures_dir):
    """The fixture VQGAN, input picture, cases and the original's outputs."""
    folder = fixtures_dir / "image_prompts"
    raw = json.loads((fixtures_dir / "vqgan" / "config.json").read_text())
    config = VQGANConfig(**raw["ddconfig"], n_embed=raw["n_embed"], embed_dim=raw["embed_dim"], dwt=raw["dwt"])
    vae = load_vqgan(fixtures_dir / "vqgan" / "model.ckpt", config)
    cases = {c["name"]: c for c in json.loads((folder / "cases.json").read_text())["cases"]}
    with Image.open(folder / "input.png") as opened:
        image = opened.convert("RGB")
    return vae, image, cases, load_file(folder / "cases.safetensors")


@pytest.fixture(scope="module")
def tiny():
    return tiny_dalle(), tiny_vae()


@pytest.fixture(scope="module")
def tokenizer(fixtures_dir):
    return YTTMTokenizer.from_file(fixtures_dir / "tokenizer" / "bpe.model")


def _picture(size=(RES, RES), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _prompt(keep_rows=1) -> ImagePrompt:
    torch.manual_seed(1)
    mask = torch.zeros(N, dtype=torch.bool)
    mask[: keep_rows * SIDE] = True
    mask[-1] = True
    return ImagePrompt.from_codes(torch.randint(0, IMAGE_VOCAB, (N,)), mask)


# ----------------------------------------------------------------------------- parity with the original

CASES = ["up4_left3", "down6_crop", "v2_up8"]


@pytest.mark.parametrize("name", CASES)
def test_from_borders_matches_original_image_prompts(original, name):
    vae, image, cases, expected = original
    case = cases[name]
    prompt = ImagePrompt.from_borders(image, vae, case["borders"], crop_first=case["crop_first"])
    mask = expected[f"{name}.prompt_mask"]
    assert prompt.side == 32 and prompt.codes.dtype == torch.long and prompt.codes.shape == (1024,)
    assert torch.equal(prompt.mask, mask)
    assert torch.equal(prompt.codes[mask], expected[f"{name}.prompt_codes"][mask])


def test_crop_first_encodes_strips_apart(original):
    """crop_first=True gives other codes than whole-image encoding near the inner strip edges."""
    vae, image, cases, expected = original
    borders = cases["down6_crop"]["borders"]
    whole = ImagePrompt.from_borders(image, vae, borders, crop_first=False)
    cropped = ImagePrompt.from_borders(image, vae, borders, crop_first=True)
    assert torch.equal(whole.mask, cropped.mask)
    assert not torch.equal(whole.codes[whole.mask], cropped.codes[cropped.mask])
    assert torch.equal(cropped.codes[~cropped.mask], torch.zeros(int((~cropped.mask).sum()), dtype=torch.long))


@pytest.mark.parametrize("name", CASES)
def test_greedy_generation_matches_original(original, tokenizer, fixtures_dir, name):
    vae, image, cases, expected = original
    case = cases[name]
    version = case["model"].split("_")[1]
    dalle = get_rudalle_model("Malevich" if version == "v3" else "Malevich_v2",
                              checkpoint_path=fixtures_dir / case["model"] / "pytorch_model.bin", **TINY_DALLE)
    prompt = ImagePrompt.from_borders(image, vae, case["borders"], crop_first=case["crop_first"])
    torch.manual_seed(0)  # a VQGAN with the generator's 8192 codes, only to decode
    decoder = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(), z_channels=32,
                                embed_dim=32, n_embed=8192, resolution=256)).eval()
    out = generate_images(case["text"], tokenizer, dalle, decoder, top_k=1, top_p=1.0, num_images=1, seed=0,
                          image_prompt=prompt, progress=False)
    assert torch.equal(out.codes[0], expected[f"{name}.codes"])
    assert out.images[0].size == (256, 256)


def test_int_borders_mean_all_four(original):
    vae, image, _, _ = original
    as_int = ImagePrompt.from_borders(image, vae, 3)
    as_dict = ImagePrompt.from_borders(image, vae, {"up": 3, "down": 3, "left": 3, "right": 3})
    assert torch.equal(as_int.mask, as_dict.mask) and torch.equal(as_int.codes, as_dict.codes)
    grid = as_int.mask_grid()
    assert grid[:3].all() and grid[-3:].all() and grid[:, :3].all() and grid[:, -3:].all()
    assert not grid[3:-3, 3:-3].any()
    assert as_int.num_kept == 1024 - 26 * 26


# ----------------------------------------------------------------------------- the shared image helper


def test_prompts_and_finetuning_share_one_resize_helper(tiny):
    import rudalle_pipe.finetune as ft
    import rudalle_pipe.train.finetune_data as fd

    assert ft.prepare_image is prepare_image and fd.prepare_image is prepare_image
    _, vae = tiny
    big = _picture((70, 45), seed=3)  # not square, not the VQGAN's size: resized and centre-cropped
    prompt = ImagePrompt.from_borders(big, vae, {"up": 1})
    assert torch.equal(prompt.codes, vae.get_codebook_indices(images_to_tensor([prepare_image(big, RES)]))[0])


def test_images_to_tensor_is_pixels_over_255():
    image = Image.fromarray(np.array([[[0, 51, 255]]], dtype=np.uint8))
    x = images_to_tensor([image])
    assert x.shape == (1, 3, 1, 1) and x.dtype == torch.float32
    assert torch.allclose(x.view(3), torch.tensor([0.0, 0.2, 1.0]))


# ----------------------------------------------------------------------------- the mask rule


def test_from_mask_keeps_a_code_only_when_its_whole_patch_is_kept(tiny):
    _, vae = tiny
    image = _picture()
    mask = np.full((RES, RES), 255, dtype=np.uint8)  # white: keep everything...
    mask[9, 9] = 0  # one black pixel inside patch (1, 1)
    mask[15, 16] = 254  # one almost-white pixel: patch (1, 2) is not wholly kept
    mask[24:32, 0:8] = 0  # all of patch (3, 0)
    expected = torch.ones(SIDE, SIDE, dtype=torch.bool)
    expected[1, 1] = expected[1, 2] = expected[3, 0] = False
    codes = vae.get_codebook_indices(images_to_tensor([image]))[0]
    for given in (Image.fromarray(mask, mode="L"), mask == 255, torch.from_numpy(mask == 255)):
        prompt = ImagePrompt.from_mask(image, vae, given)
        assert torch.equal(prompt.mask_grid(), expected)
        assert torch.equal(prompt.codes, codes)
    one_bit = Image.fromarray(mask == 255).convert("1")
    assert torch.equal(ImagePrompt.from_mask(image, vae, one_bit).mask_grid(), expected)


def test_from_mask_resizes_the_mask_with_the_image(tiny):
    _, vae = tiny
    image = _picture((2 * RES, 2 * RES))  # halved to the VQGAN's size
    mask = np.ones((2 * RES, 2 * RES), dtype=bool)
    mask[0, 0] = False  # one source pixel: the resized pixel (0, 0) averages it in, so patch (0, 0) goes
    mask[-17, -17] = False  # resized pixel (23, 23): patch (2, 2)
    prompt = ImagePrompt.from_mask(image, vae, mask)
    expected = torch.ones(SIDE, SIDE, dtype=torch.bool)
    expected[0, 0] = expected[2, 2] = False
    assert torch.equal(prompt.mask_grid(), expected)


def test_from_codes_round_trip():
    codes = torch.arange(N, dtype=torch.int32)
    mask = torch.arange(N) < 5
    prompt = ImagePrompt.from_codes(codes, mask)
    assert prompt.side == SIDE and prompt.codes.dtype == torch.long and prompt.num_kept == 5
    assert torch.equal(prompt.codes, codes.long()) and torch.equal(prompt.mask, mask)


# ----------------------------------------------------------------------------- generation


def test_kept_codes_are_copied_and_the_rest_depends_only_on_the_seed(tiny, tokenizer):
    dalle, vae = tiny
    prompt = _prompt()
    kwargs = dict(top_k=20, top_p=0.95, num_images=4, seed=7, image_prompt=prompt, progress=False)
    one = generate_images("кот", tokenizer, dalle, vae, batch_size=1, **kwargs)
    four = generate_images("кот", tokenizer, dalle, vae, batch_size=3, **kwargs)
    assert torch.equal(one.codes, four.codes)
    assert (one.codes[:, prompt.mask] == prompt.codes[prompt.mask]).all()
    assert len({tuple(c[~prompt.mask].tolist()) for c in one.codes}) == 4  # different seeds differ
    alone = generate_images("кот", tokenizer, dalle, vae, top_k=20, top_p=0.95, num_images=1, seed=9,
                            image_prompt=prompt, progress=False)
    assert torch.equal(alone.codes[0], one.codes[2])


def test_kept_positions_draw_no_randomness(tiny, tokenizer, monkeypatch):
    dalle, vae = tiny
    prompt = _prompt(keep_rows=2)
    calls = []
    real_draw = sampling._draw

    def counting_draw(logits, generators, **filters):
        calls.append(len(generators))
        return real_draw(logits, generators, **filters)

    monkeypatch.setattr(sampling, "_draw", counting_draw)
    generate_images("кот", tokenizer, dalle, vae, top_k=20, top_p=0.95, num_images=2, seed=0, batch_size=2,
                    image_prompt=prompt, progress=False)
    assert len(calls) == N - prompt.num_kept and set(calls) == {2}


def test_perplexity_is_over_generated_positions_only(tiny, tokenizer):
    dalle, vae = tiny
    prompt = _prompt(keep_rows=2)
    out = generate_images("кот", tokenizer, dalle, vae, top_k=10, top_p=1.0, num_images=2, seed=3,
                          image_prompt=prompt, progress=False)
    from rudalle_pipe.tokenizer import prepare_text

    text = tokenizer.encode_text(prepare_text("кот"), TEXT_LEN)
    for codes, ppl in zip(out.codes, out.perplexities):
        ids = torch.cat([text, codes[:-1]])[None]
        with torch.no_grad():
            logits = dalle(ids).logits[0, TEXT_LEN - 1 :, dalle.config.vocab_size :]  # (N, image vocab)
        per_token = (-logits.log_softmax(-1).gather(1, codes[:, None])[:, 0]).exp()  # (N,)
        assert ppl == pytest.approx(float(per_token[~prompt.mask].mean()), rel=1e-4)
        assert ppl != pytest.approx(float(per_token.mean()), rel=1e-3)  # the kept codes are left out


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def no_encoding(tiny, monkeypatch):
    """The tiny VQGAN, failing the test if anything gets encoded (checks must come first)."""
    _, vae = tiny
    monkeypatch.setattr(vae, "get_codebook_indices", lambda x: (_ for _ in ()).throw(AssertionError("encoded")))
    return vae


@pytest.mark.parametrize("borders, error, match", [
    ({"top": 1}, ValueError, r"unknown border key\(s\) \['top'\]; valid keys: \['up', 'down', 'left', 'right'\]"),
    ({"up": -1}, ValueError, r"borders\['up'\].*must be in \[0, 3\], got -1"),
    ({"left": 4}, ValueError, r"borders\['left'\].*must be in \[0, 3\], got 4"),
    (-2, ValueError, r"must be in \[0, 3\], got -2"),
    ({"up": 1.5}, TypeError, r"borders\['up'\].*must be an int"),
    (True, TypeError, "borders must be a dict"),
    ([1, 2], TypeError, "borders must be a dict"),
    (2, ValueError, "keeps all 16 codes, so there is nothing to generate"),
    ({"up": 3, "down": 1}, ValueError, "keeps all 16 codes"),
    (0, ValueError, "keeps none of the 16 codes: drop image_prompt"),
    ({}, ValueError, "keeps none"),
])
def test_bad_borders(no_encoding, borders, error, match):
    with pytest.raises(error, match=match):
        ImagePrompt.from_borders(_picture(), no_encoding, borders)


def test_crop_first_must_be_a_bool(no_encoding):
    with pytest.raises(TypeError, match="crop_first must be True or False, got 'yes'"):
        ImagePrompt.from_borders(_picture(), no_encoding, 1, crop_first="yes")


@pytest.mark.parametrize("make_mask, error, match", [
    (lambda: Image.new("L", (RES, RES + 8), 255), ValueError, r"mask is 32x40 px but the image is 32x32 px"),
    (lambda: np.ones((RES, RES - 1), dtype=bool), ValueError, r"shape \(32, 31\) .* \(32, 32\)"),
    (lambda: Image.new("RGB", (RES, RES)), ValueError, "mode 'L' or '1'.*got mode 'RGB'"),
    (lambda: np.ones((RES, RES), dtype=np.uint8), TypeError, "must be bool.*uint8"),
    (lambda: [[True] * RES] * RES, TypeError, "mask must be a PIL image .* got list"),
    (lambda: Image.new("L", (RES, RES), 255), ValueError, "keeps all 16 codes, so there is nothing to generate"),
    (lambda: np.zeros((RES, RES), dtype=bool), ValueError, "keeps none of the 16 codes: drop image_prompt"),
])
def test_bad_masks(no_encoding, make_mask, error, match):
    with pytest.raises(error, match=match):
        ImagePrompt.from_mask(_picture(), no_encoding, make_mask())


@pytest.mark.parametrize("image", [np.zeros((RES, RES, 3), dtype=np.uint8), "input.png", None])
def test_non_pil_images_are_refused(no_encoding, image):
    with pytest.raises(TypeError, match=f"image must be a PIL.Image.Image, got {type(image).__name__}"):
        ImagePrompt.from_borders(image, no_encoding, 1)
    with pytest.raises(TypeError, match="image must be a PIL.Image.Image"):
        ImagePrompt.from_mask(image, no_encoding, np.ones((RES, RES), dtype=bool))


@pytest.mark.parametrize("codes, mask, error, match", [
    (torch.zeros(N), torch.ones(N, dtype=torch.bool), TypeError, "codes must be an integer tensor"),
    (torch.zeros(N, dtype=torch.long), torch.ones(N), TypeError, "mask must be a bool tensor"),
    (torch.zeros(15, dtype=torch.long), torch.ones(15, dtype=torch.bool), ValueError, "15 is not a square"),
    (torch.zeros(N, dtype=torch.long), torch.ones(9, dtype=torch.bool), ValueError, r"shape \[16\].*\(9,\)"),
    (torch.full((N,), -1), torch.arange(N) < 3, ValueError, "codes must be >= 0.*-1"),
    (torch.zeros(N, dtype=torch.long), torch.ones(N, dtype=torch.bool), ValueError, "nothing to generate"),
])
def test_bad_codes(codes, mask, error, match):
    with pytest.raises(error, match=match):
        ImagePrompt.from_codes(codes, mask)


def test_generate_refuses_bad_prompts_before_sampling(tiny, tokenizer, monkeypatch):
    dalle, vae = tiny
    monkeypatch.setattr(generation, "sample_codes", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled")))
    args = dict(top_k=5, top_p=1.0, num_images=1, seed=0, progress=False)
    wrong_grid = ImagePrompt.from_codes(torch.zeros(25, dtype=torch.long), torch.arange(25) < 5)
    with pytest.raises(ValueError, match=r"grid is 5x5 codes but the generator makes 4x4"):
        generate_images("кот", tokenizer, dalle, vae, image_prompt=wrong_grid, **args)
    codes = torch.zeros(N, dtype=torch.long)
    codes[2] = IMAGE_VOCAB
    too_big = ImagePrompt.from_codes(codes, torch.arange(N) < 3)
    with pytest.raises(ValueError, match=rf"codes up to {IMAGE_VOCAB}, outside .* \[0, {IMAGE_VOCAB}\)"):
        generate_images("кот", tokenizer, dalle, vae, image_prompt=too_big, **args)
    with pytest.raises(TypeError, match="image_prompt must be an ImagePrompt.*got dict"):
        generate_images("кот", tokenizer, dalle, vae, image_prompt={"up": 1}, **args)
    codes[2] = 0
    codes[10] = 10**6  # a code outside the vocabulary at a position that is not kept is never used
    seen = {}

    def fake_sample(*a, **k):
        seen.update(k)
        return torch.zeros(1, N, dtype=torch.long), torch.ones(1)

    monkeypatch.setattr(generation, "sample_codes", fake_sample)
    prompt = ImagePrompt.from_codes(codes, torch.arange(N) < 3)
    generate_images("кот", tokenizer, dalle, vae, image_prompt=prompt, **args)
    assert torch.equal(seen["forced_codes"], prompt.codes) and torch.equal(seen["forced_mask"], prompt.mask)


def test_sample_codes_refuses_forcing_everything(tiny):
    dalle, _ = tiny
    text = torch.tensor([2, 5, 7, 3, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="forces all 16 positions: nothing is left to sample"):
        generation.sample_codes(dalle, text, seeds=[0], top_k=1, top_p=1.0, progress=False,
                                forced_codes=torch.zeros(N, dtype=torch.long),
                                forced_mask=torch.ones(N, dtype=torch.bool))
