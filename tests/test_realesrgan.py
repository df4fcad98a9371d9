"""Tests of rudalle_pipe.realesrgan: parity with the original, loading, the Hub path and tiling."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from rudalle_pipe import hub
from rudalle_pipe.realesrgan import (
    REALESRGAN_MODELS,
    RRDBNet,
    RRDBNetConfig,
    _tile_span,
    get_realesrgan,
    infer_rrdbnet_config,
    list_realesrgan,
    load_rrdbnet,
    super_resolution,
    unwrap_realesrgan_state_dict,
)

TINY = dict(num_feat=16, num_block=2, num_grow_ch=8)  # the fixture checkpoints' sizes


# ----------------------------------------------------------------------------- parity and structure


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_parity_with_original(fixtures_dir, scale):
    cases = load_file(fixtures_dir / "realesrgan" / "cases.safetensors")
    model = get_realesrgan(f"x{scale}", checkpoint_path=fixtures_dir / "realesrgan" / f"RealESRGAN_x{scale}.pth", **TINY)
    with torch.inference_mode():
        out = model(cases["input"])  # (1, 3, 24s, 20s)
    expected = cases[f"output_x{scale}"]
    assert out.shape == expected.shape == (1, 3, 24 * scale, 20 * scale)
    # measured max abs diff: 0.0 for x2, x4 and x8
    assert torch.allclose(out, expected, atol=1e-4, rtol=0), (out - expected).abs().max().item()


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_state_dict_matches_manifest(fixtures_dir, scale):
    manifest = json.loads((fixtures_dir / "manifests" / f"realesrgan_x{scale}.json").read_text())
    with torch.device("meta"):
        model = RRDBNet(REALESRGAN_MODELS[f"x{scale}"].config)
    found = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()}
    assert found == manifest


@pytest.mark.parametrize(
    "config",
    [
        RRDBNetConfig(num_block=23, scale=4),  # RealESRGAN_x4plus
        RRDBNetConfig(num_block=6, scale=4),  # RealESRGAN_x4plus_anime_6B
        RRDBNetConfig(scale=2),  # RealESRGAN_x2plus (pixel-unshuffle 2)
        RRDBNetConfig(num_feat=32, num_block=3, num_grow_ch=16, scale=1),
        RRDBNetConfig(num_feat=16, num_block=2, num_grow_ch=8, scale=8),
        RRDBNetConfig(num_in_ch=1, num_out_ch=1, num_block=1, scale=2),
    ],
)
def test_infer_config_from_state_dict(config):
    with torch.device("meta"):
        state_dict = RRDBNet(config).state_dict()
    assert infer_rrdbnet_config(state_dict) == config


def test_infer_config_rejects_other_layouts():
    with pytest.raises(ValueError, match="not an RRDBNet"):
        infer_rrdbnet_config({"model.0.weight": torch.zeros(64, 3, 3, 3)})  # old ESRGAN layout
    with torch.device("meta"):
        state_dict = dict(RRDBNet(RRDBNetConfig(num_block=1)).state_dict())
    state_dict["conv_first.weight"] = torch.empty(64, 5, 3, 3, device="meta")
    with pytest.raises(ValueError, match="5 channels"):
        infer_rrdbnet_config(state_dict)


@pytest.mark.parametrize("wrapper", ["params_ema", "params", None])
def test_load_rrdbnet_infers_config_and_unwraps(tmp_path, wrapper):
    torch.manual_seed(0)
    model = RRDBNet(RRDBNetConfig(num_feat=8, num_block=2, num_grow_ch=4, scale=2)).eval()
    state = model.state_dict()
    torch.save({wrapper: state} if wrapper else state, tmp_path / "w.pth")
    loaded = load_rrdbnet(tmp_path / "w.pth", dtype=torch.float64)
    assert loaded.config == model.config
    assert next(loaded.parameters()).dtype == torch.float64 and not loaded.training
    x = torch.rand(2, 3, 10, 6)
    with torch.inference_mode():
        assert torch.allclose(loaded(x.double()).float(), model(x), atol=1e-5)


def test_unwrap_prefers_params_ema():
    a, b = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    assert unwrap_realesrgan_state_dict({"params_ema": a, "params": b})["w"].item() == 0
    assert unwrap_realesrgan_state_dict({"params": b})["w"].item() == 1
    with pytest.raises(ValueError, match="dict of tensors"):
        unwrap_realesrgan_state_dict({"params": [1, 2]})


def test_wrong_config_names_bad_keys(fixtures_dir):
    with pytest.raises(ValueError, match="mis-shaped keys"):
        get_realesrgan("x4", checkpoint_path=fixtures_dir / "realesrgan" / "RealESRGAN_x4.pth", **TINY | {"num_feat": 8})
    with pytest.raises(ValueError, match="missing keys.*conv_up3"):
        get_realesrgan("x8", checkpoint_path=fixtures_dir / "realesrgan" / "RealESRGAN_x4.pth", **TINY)


def test_registry_and_factory_errors():
    assert list_realesrgan() == ["x2", "x4", "x8"]
    entry = REALESRGAN_MODELS["x8"]
    assert (entry.repo_id, entry.filename) == ("shonenkov/rudalle-utils", "RealESRGAN_x8.pth")
    assert (entry.config.num_feat, entry.config.num_block, entry.config.num_grow_ch) == (64, 23, 32)
    with pytest.raises(ValueError, match=r"'x3'.*\['x2', 'x4', 'x8'\]"):
        get_realesrgan("x3")
    with pytest.raises(TypeError, match=r"\['scale'\].*num_feat"):
        get_realesrgan("x4", checkpoint_path="unused.pth", scale=2)
    with pytest.raises(ValueError, match="scale=3.*1, 2, 4, 8"):
        RRDBNetConfig(scale=3)
    with pytest.raises(ValueError, match="num_block"):
        RRDBNetConfig(num_block=0)


def test_forward_rejects_odd_size_for_x2():
    model = RRDBNet(RRDBNetConfig(num_feat=8, num_block=1, num_grow_ch=4, scale=2))
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.rand(1, 3, 9, 8))


# ----------------------------------------------------------------------------- Hub path (offline)


def _offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_get_realesrgan_from_offline_hub_cache(tmp_path, monkeypatch):
    _offline(monkeypatch)
    torch.manual_seed(0)
    model = RRDBNet(RRDBNetConfig(num_feat=8, num_block=1, num_grow_ch=4, scale=4))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--shonenkov--rudalle-utils"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    torch.save({"params_ema": model.state_dict()}, repo / "snapshots" / commit / "RealESRGAN_x4.pth")

    loaded = get_realesrgan("x4", cache_dir=tmp_path, num_feat=8, num_block=1, num_grow_ch=4)
    x = torch.rand(1, 3, 8, 8)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(hub.WeightsNotFoundError, match="RealESRGAN_x8.pth"):
        get_realesrgan("x8", cache_dir=tmp_path, num_feat=8, num_block=1, num_grow_ch=4)


# ----------------------------------------------------------------------------- tiling


class NearestUpscaler(nn.Module):
    """A receptive-field-free upscaler: identity 1x1 conv, then nearest x``scale``."""

    def __init__(self, scale: int, input_multiple: int = 1) -> None:
        super().__init__()
        self.scale, self.input_multiple = scale, input_multiple
        self.mix = nn.Conv2d(3, 3, 1)
        nn.init.dirac_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        assert x.shape[2] % self.input_multiple == 0 and x.shape[3] % self.input_multiple == 0
        return F.interpolate(self.mix(x), scale_factor=self.scale, mode="nearest")


def _random_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(Image.new(mode, (1, 1)).getbands())
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode)


@pytest.mark.parametrize(
    "length,tile,overlap,multiple,expected",
    [
        (67, 32, 8, 1, (28, 3)),
        (83, 32, 8, 1, (27, 4)),
        (286, 192, 24, 1, (155, 2)),  # a 256 px image with 15 px pads: 2 tiles of 155, not of 192
        (100, 40, 10, 4, (36, 4)),  # overlap rounds up to 12: 3 tiles of 40 would cover only 96
        (100, 40, 9, 4, (36, 4)),
        (30, 32, 8, 1, (30, 1)),
        (1054, 192, 24, 2, (172, 7)),
    ],
)
def test_tile_span_covers_with_overlap(length, tile, overlap, multiple, expected):
    size, starts = _tile_span(length, tile, overlap, multiple)
    assert (size, len(starts)) == expected
    assert size <= tile and starts[0] == 0 and starts[-1] + size == length
    assert all(s % multiple == 0 for s in starts + [size])
    assert all(0 < b - a <= size - overlap for a, b in zip(starts, starts[1:]))  # overlap >= `overlap`


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
@pytest.mark.parametrize("scale,multiple", [(4, 1), (2, 2)])
def test_tiled_pointwise_upscaler_equals_nearest_resize(mode, scale, multiple):
    """With no receptive field, any correct tiling, blending and cropping gives exactly a nearest resize."""
    image = _random_image(mode, (53, 37), seed=1)  # W=53, H=37: not multiples of anything
    upscaler = NearestUpscaler(scale, multiple)
    (out,) = super_resolution([image], upscaler, tile_size=32, tile_overlap=8, batch_size=3, progress=False)
    assert out.mode == mode and out.size == (53 * scale, 37 * scale)
    assert np.array_equal(np.asarray(out), np.asarray(image.resize(out.size, Image.NEAREST)))
    planes = 2 if "A" in mode else 1
    assert len(upscaler.calls) == math.ceil(planes * 12 / 3)  # 3 x 4 tiles of the 67 x 83 padded image
    assert all(b <= 3 and h <= 32 and w <= 32 for b, _, h, w in upscaler.calls)  # memory bounded by tile size


def test_constant_alpha_is_copied_not_upscaled():
    upscaler = NearestUpscaler(4)
    image = _random_image("RGB", (30, 20), seed=6)
    image.putalpha(255)
    (out,) = super_resolution([image], upscaler, tile_size=None, progress=False)
    assert upscaler.calls == [(1, 3, 50, 60)]  # colour only
    assert out.mode == "RGBA" and np.all(np.asarray(out)[:, :, 3] == 255)


@pytest.mark.parametrize("scale", [1, 2, 8])
def test_real_rrdbnet_odd_sizes(scale):
    torch.manual_seed(0)
    model = RRDBNet(RRDBNetConfig(num_feat=8, num_block=1, num_grow_ch=4, scale=scale))
    image = _random_image("RGB", (53, 37), seed=7)
    for tile in (32, None):
        (out,) = super_resolution([image], model, tile_size=tile, tile_overlap=8, progress=False)
        assert out.size == (53 * scale, 37 * scale) and out.mode == "RGB"


def test_untiled_runs_whole_image_once():
    upscaler = NearestUpscaler(4)
    images = [_random_image("RGB", (53, 37), seed=2), _random_image("RGB", (20, 20), seed=3)]
    outs = super_resolution(images, upscaler, tile_size=None, progress=False)
    assert upscaler.calls == [(1, 3, 67, 83), (1, 3, 50, 50)]  # 15 px reflect pad on each side
    assert [o.size for o in outs] == [(212, 148), (80, 80)]


def _field_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Synthetic images ``[n, 3, size, size]`` in [0, 1]: flat regions with soft edges (sigmoid of sinusoids)."""
    yy, xx = torch.meshgrid(torch.arange(size) / 32, torch.arange(size) / 32, indexing="ij")
    field = torch.zeros(n, 3, size, size)
    for _ in range(3):
        freq = torch.randn(n, 3, 2, 1, 1, generator=generator) * 3
        phase = torch.rand(n, 3, 1, 1, generator=generator) * 2 * math.pi
        field += torch.sin(freq[:, :, 0] * xx + freq[:, :, 1] * yy + phase)
    return torch.sigmoid(20 * field)


def _bicubic_down4(hr: torch.Tensor) -> torch.Tensor:
    return F.interpolate(hr, scale_factor=0.25, mode="bicubic", antialias=True).clamp(0, 1)


@pytest.fixture(scope="module")
def trained_x4() -> RRDBNet:
    """A tiny x4 RRDBNet trained for 300 Adam steps (~5-10 s on 2 idle cores) to undo bicubic x1/4."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = RRDBNet(RRDBNetConfig(num_feat=16, num_block=1, num_grow_ch=8, scale=4))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        hr = _field_images(4, 64, generator)  # (4, 3, 64, 64)
        loss = F.mse_loss(model(_bicubic_down4(hr)), hr)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def _as_float(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) / 255


@pytest.mark.slow
def test_trained_model_tiled_matches_untiled_and_beats_bicubic(trained_x4):
    hr = _field_images(1, 4 * 64, torch.Generator().manual_seed(1))[:, :, : 4 * 37, : 4 * 53]  # (1, 3, 148, 212)
    lr = _to_pil(_bicubic_down4(hr)[0])  # 53 x 37
    tiled = super_resolution([lr], trained_x4, tile_size=32, tile_overlap=8, batch_size=3, progress=False)[0]
    whole = super_resolution([lr], trained_x4, tile_size=None, progress=False)[0]
    assert tiled.size == whole.size == (212, 148)
    diff = np.abs(_as_float(tiled) - _as_float(whole))
    # The tiny net sees ~18 px of context, so 8 px overlaps cut some of it off near tile edges; the
    # sin^2 blend keeps that small. Measured: max 6/255, mean 0.0007 (mean |whole - bicubic| is 0.03).
    assert diff.max() <= 8 / 255 and diff.mean() < 0.002, (diff.max() * 255, diff.mean())
    # Control: without overlap the tile edges show (measured max 108/255), so the bound above has teeth.
    seamy = super_resolution([lr], trained_x4, tile_size=32, tile_overlap=0, batch_size=3, progress=False)[0]
    assert np.abs(_as_float(seamy) - _as_float(whole)).max() > 30 / 255
    target = _as_float(_to_pil(hr[0]))
    mse = {name: ((_as_float(img) - target) ** 2).mean()
           for name, img in [("tiled", tiled), ("whole", whole), ("bicubic", lr.resize((212, 148), Image.BICUBIC))]}
    # measured MSE: tiled 0.0066, whole 0.0066, bicubic 0.0108
    assert mse["tiled"] < 0.85 * mse["bicubic"] and mse["whole"] < 0.85 * mse["bicubic"], mse


@pytest.mark.slow
def test_trained_model_gray_and_alpha_go_through_the_network(trained_x4):
    rgb = _random_image("RGB", (21, 19), seed=4)
    gray = rgb.convert("L")
    rgba = rgb.copy()
    rgba.putalpha(gray)
    kw = dict(tile_size=16, tile_overlap=4, progress=False)
    out_rgba, out_gray, out_rgb, out_gray_rgb = super_resolution([rgba, gray, rgb, gray.convert("RGB")], trained_x4, **kw)
    assert (out_rgba.mode, out_gray.mode) == ("RGBA", "L") and out_rgba.size == out_gray.size == (84, 76)
    assert np.array_equal(np.asarray(out_rgba)[:, :, :3], np.asarray(out_rgb))  # colour as if no alpha
    assert np.array_equal(np.asarray(out_rgba)[:, :, 3], np.asarray(out_gray))  # alpha upscaled like gray
    # gray = mean of the 3 outputs (mean before clamping, so compare where no channel saturates)
    three = np.asarray(out_gray_rgb, dtype=np.float64)  # (76, 84, 3)
    inside = (three.min(axis=2) > 0) & (three.max(axis=2) < 255)
    assert inside.mean() > 0.5
    assert np.abs(np.asarray(out_gray, dtype=np.float64) - three.mean(axis=2))[inside].max() <= 1.0


@pytest.mark.slow
def test_uses_upscaler_dtype(trained_x4):
    model64 = RRDBNet(trained_x4.config).double()
    model64.load_state_dict(trained_x4.state_dict())
    image = _random_image("RGB", (24, 20), seed=5)
    a = super_resolution([image], trained_x4, tile_size=None, progress=False)[0]
    b = super_resolution([image], model64, tile_size=None, progress=False)[0]
    assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(images=[]), ValueError, "empty"),
        (dict(images=[Image.new("RGB", (8, 8)), np.zeros((8, 8, 3))]), TypeError, r"images\[1\] is a ndarray"),
        (dict(images=Image.new("RGB", (8, 8))), TypeError, "list of PIL images"),
        (dict(images=[Image.new("P", (8, 8))]), ValueError, r"mode 'P'.*'RGB', 'RGBA', 'L', 'LA'"),
        (dict(images=[Image.new("CMYK", (8, 8))]), ValueError, "mode 'CMYK'"),
        (dict(tile_size=16, tile_overlap=16), ValueError, r"tile_size \(16\).*tile_overlap \(16\)"),
        (dict(upscaler=NearestUpscaler(2, input_multiple=2), tile_size=16, tile_overlap=15), ValueError,
         r"tile_overlap \(15, rounded up to a multiple of 2\)"),
        (dict(tile_overlap=-1), ValueError, "tile_overlap must be >= 0, got -1"),
        (dict(batch_size=0), ValueError, "batch_size must be >= 1, got 0"),
        (dict(border_pad=-2), ValueError, "border_pad"),
        (dict(upscaler=nn.Conv2d(3, 3, 1)), TypeError, "scale"),
        (dict(upscaler=NearestUpscaler(2, input_multiple=2), tile_size=97), ValueError, "multiple of 2"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(images=[Image.new("RGB", (8, 8))], upscaler=NearestUpscaler(4), progress=False) | kwargs
    images, upscaler = args.pop("images"), args.pop("upscaler")
    with pytest.raises(error, match=match):
        super_resolution(images, upscaler, **args)
