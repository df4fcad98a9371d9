"""Tests for rudalle_pipe.vae: parity with the original Sber VQGAN, key layout, input checks."""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import import_reference
from rudalle_pipe.vae import VQGAN, InverseHaar2d, VQGANConfig, convert_vqgan_state_dict, load_vqgan

VARIANTS = ["vqgan", "vqgan_dwt"]

# A tiny random model: 2 levels (f=2), one attention level, 16 codes.
TINY = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16,
                   z_channels=8, n_embed=16, embed_dim=8)
TINY_DWT = replace(TINY, dwt=True, out_ch=12)


def _fixture_config(variant_dir: Path) -> VQGANConfig:
    """The original's config.json (ddconfig + n_embed/embed_dim/dwt) as a VQGANConfig."""
    raw = json.loads((variant_dir / "config.json").read_text())
    return VQGANConfig(**raw["ddconfig"], n_embed=raw["n_embed"], embed_dim=raw["embed_dim"], dwt=raw["dwt"])


@pytest.fixture(scope="module", params=VARIANTS)
def loaded(request, fixtures_dir):
    variant_dir = fixtures_dir / request.param
    model = load_vqgan(variant_dir / "model.ckpt", _fixture_config(variant_dir))
    return request.param, model, load_file(variant_dir / "cases.safetensors")


@pytest.fixture
def tiny_checkpoint(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny random model saved like the real file: Lightning dict, plus loss/discriminator keys."""
    torch.manual_seed(0)
    state = dict(VQGAN(TINY).state_dict())
    state["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    state["loss.logvar"] = torch.zeros(())
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 10}, path)
    return path, state


# ----------------------------------------------------------------------------- parity with the original


def test_decode_matches_original(loaded):
    variant, model, cases = loaded
    images = model.decode(cases["codes"])
    expected = cases["decoded"]  # (2, 3, 128, 128), or (2, 3, 256, 256) for DWT
    assert images.shape == expected.shape and images.dtype == torch.float32
    max_diff = (images - expected).abs().max().item()
    print(f"{variant}: decode max abs diff {max_diff:.3g}")  # measured: ~3e-6 for both variants
    assert torch.allclose(images, expected, rtol=0, atol=1e-4), max_diff


def test_encode_matches_original(loaded):
    _, model, cases = loaded
    codes = model.get_codebook_indices(cases["image"])
    assert codes.dtype == torch.int64
    assert torch.equal(codes, cases["encoded_codes"])


def test_model_properties(loaded):
    variant, model, _ = loaded
    assert not model.training
    assert model.downsample_factor == 8 and model.num_tokens == 1024
    assert model.decode_factor == (16 if variant == "vqgan_dwt" else 8)


# ----------------------------------------------------------------------------- full-size key layout


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_size_module_matches_manifest(variant, fixtures_dir):
    manifest = json.loads((fixtures_dir / "manifests" / f"{variant}.json").read_text())
    config = VQGANConfig(dwt=True, out_ch=12) if variant == "vqgan_dwt" else VQGANConfig()
    with torch.device("meta"):
        model = VQGAN(config)
        fake_file = {"state_dict": {k: torch.empty(shape, dtype=getattr(torch, dt))
                                    for k, (shape, dt) in manifest.items()}}
    converted = convert_vqgan_state_dict(fake_file, config)
    assert len(converted) == len(manifest)  # every real key has a place in the module
    found = {k: (tuple(v.shape), v.dtype) for k, v in converted.items()}
    wanted = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    assert found == wanted


# ----------------------------------------------------------------------------- inverse Haar


def test_inverse_haar_matches_pywavelets():
    pywt = import_reference("pywt")
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(2, 3, 5, 7, generator=gen)
    high = torch.randn(2, 3, 3, 5, 7, generator=gen)  # bands (lh, hl, hh) = pywt's (cH, cV, cD)
    out = InverseHaar2d()(low, high)
    ref = pywt.idwt2((low.numpy(), tuple(high[:, :, i].numpy() for i in range(3))), "db1", mode="zero",
                     axes=(-2, -1))
    assert out.shape == (2, 3, 10, 14)
    assert np.allclose(out.numpy(), ref, atol=1e-5)


# ----------------------------------------------------------------------------- tiny models: shapes, dtypes


def test_tiny_shapes_and_ranges():
    torch.manual_seed(0)
    model, dwt = VQGAN(TINY).eval(), VQGAN(TINY_DWT).eval()
    codes = model.get_codebook_indices(torch.rand(2, 3, 16, 24))  # non-square image: 8 x 12 code grid
    assert codes.shape == (2, 96) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < TINY.n_embed
    grid = torch.randint(0, TINY.n_embed, (2, 64))  # 8 x 8 grid
    images = model.decode(grid)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert dwt.decode(grid).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_module_still_decodes_and_encodes(dtype):
    torch.manual_seed(0)
    model = VQGAN(TINY).eval()
    grid = torch.randint(0, TINY.n_embed, (1, 16))
    reference = model.decode(grid)
    model.to(dtype)
    images = model.decode(grid)
    assert images.dtype == torch.float32
    assert torch.allclose(images, reference, atol=0.05)
    assert model.get_codebook_indices(torch.rand(1, 3, 8, 8)).shape == (1, 16)


# ----------------------------------------------------------------------------- loading and bad checkpoints


def test_load_tiny_checkpoint_drops_training_keys(tiny_checkpoint):
    path, state = tiny_checkpoint
    model = load_vqgan(path, TINY)
    assert "loss.logvar" not in model.state_dict()
    assert torch.equal(model.quantize.embed.weight, state["quantize.embed.weight"])


def test_convert_strips_model_prefix_and_keeps_unknown_keys():
    weight = torch.zeros(3)
    raw = {"state_dict": {"model.encoder.conv_in.bias": weight, "model.loss.logvar": weight,
                          "discriminator.main.0.weight": weight, "model.mystery.weight": weight}}
    assert convert_vqgan_state_dict(raw, TINY) == {"encoder.conv_in.bias": weight, "mystery.weight": weight}
    assert set(convert_vqgan_state_dict({"encoder.conv_in.bias": weight}, TINY)) == {"encoder.conv_in.bias"}


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("decoder.conv_out.bias"), r"missing keys \(1\): decoder\.conv_out\.bias"),
    (lambda s: s.update({"encoder.extra.weight": torch.zeros(2)}), r"unexpected keys \(1\): encoder\.extra\.weight"),
    (lambda s: s.update({"quant_conv.bias": torch.zeros(5)}), r"mis-shaped keys \(1\): quant_conv\.bias"),
])
def test_bad_checkpoint_keys_are_listed(tiny_checkpoint, tmp_path, change, message):
    _, state = tiny_checkpoint
    state = dict(state)
    change(state)
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError, match=message):
        load_vqgan(path, TINY)


def test_truncated_checkpoint(fixtures_dir, tmp_path):
    data = (fixtures_dir / "vqgan" / "model.ckpt").read_bytes()
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_vqgan(path, _fixture_config(fixtures_dir / "vqgan"))


def test_dwt_checkpoint_with_plain_config(fixtures_dir):
    config = _fixture_config(fixtures_dir / "vqgan_dwt")
    plain = replace(config, dwt=False, out_ch=3)
    with pytest.raises(ValueError, match="DWT .* config.dwt=False"):
        load_vqgan(fixtures_dir / "vqgan_dwt" / "model.ckpt", plain)


def test_not_a_state_dict():
    with pytest.raises(ValueError, match="not a VQGAN checkpoint"):
        convert_vqgan_state_dict({"epoch": 1}, TINY)


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def tiny_model() -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(TINY).eval()


@pytest.mark.parametrize("codes, error, message", [
    (torch.zeros(1, 15, dtype=torch.long), ValueError, "n=15 is not a perfect square"),
    (torch.full((1, 16), 16), ValueError, r"in \[0, 16\), got values in \[16, 16\]"),
    (torch.full((1, 16), -1), ValueError, r"in \[0, 16\), got values in \[-1, -1\]"),
    (torch.zeros(16, dtype=torch.long), ValueError, r"shape \(B, n\)"),
    (torch.zeros(1, 16), TypeError, "integer tensor"),
])
def test_bad_codes(tiny_model, codes, error, message):
    with pytest.raises(error, match=message):
        tiny_model.decode(codes)


@pytest.mark.parametrize("images, error, message", [
    (torch.rand(1, 4, 8, 8), ValueError, r"shape \(B, 3, H, W\) .* got \(1, 4, 8, 8\)"),
    (torch.rand(1, 1, 8, 8), ValueError, r"got \(1, 1, 8, 8\)"),
    (torch.rand(1, 3, 8, 7), ValueError, "multiples of 2"),
    (torch.rand(3, 8, 8), ValueError, r"got \(3, 8, 8\)"),
    (torch.rand(1, 3, 8, 8) * 255, ValueError, r"must be in \[0, 1\]"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), TypeError, "float tensor"),
])
def test_bad_images(tiny_model, images, error, message):
    with pytest.raises(error, match=message):
        tiny_model.get_codebook_indices(images)


# ----------------------------------------------------------------------------- config


def test_default_config_is_the_real_model():
    config = VQGANConfig()
    assert (config.ch, config.ch_mult, config.num_res_blocks, config.attn_resolutions) == (128, (1, 1, 2, 4), 2, (32,))
    assert (config.z_channels, config.resolution, config.n_embed, config.embed_dim) == (256, 256, 8192, 256)
    assert config.downsample_factor == 8 and not config.dwt and config.out_ch == 3
    assert VQGANConfig(ch_mult=[1, 2], resolution=16).ch_mult == (1, 2)  # lists from JSON become tuples
    with pytest.raises(AttributeError):
        config.ch = 64  # frozen


def test_norm_groups_sets_every_group_norm():
    small = dict(ch=48, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=16, embed_dim=16,
                 n_embed=8, resolution=16)
    norms = [m for m in VQGAN(VQGANConfig(**small, norm_groups=16)).modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 16 for m in norms)
    plain = VQGAN(VQGANConfig(**small, norm_groups=0))  # no normalisation layers at all
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in plain.modules())
    assert plain.decode(torch.zeros(1, 64, dtype=torch.long)).shape == (1, 3, 16, 16)
    assert len(plain.state_dict()) < len(VQGAN(VQGANConfig(**small, norm_groups=16)).state_dict())


@pytest.mark.parametrize("kwargs, message", [
    ({"ch": 0}, "ch must be a positive int, got 0"),
    ({"ch": 48}, r"divisible by 32.*\[48"),
    ({"ch_mult": ()}, "at least one level"),
    ({"ch_mult": (1, 0)}, "ch_mult must be a sequence of positive ints"),
    ({"attn_resolutions": 32}, "attn_resolutions must be a sequence"),
    ({"num_res_blocks": 0}, "num_res_blocks must be a positive int"),
    ({"n_embed": -1}, "n_embed must be a positive int"),
    ({"resolution": 100}, "resolution=100 must be divisible by the downsampling factor 8"),
    ({"embed_dim": 128}, re.escape("embed_dim (128) must equal z_channels (256)")),
    ({"double_z": True}, "double_z=True is not supported"),
    ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
    ({"dwt": True}, "dwt=True needs out_ch=12"),
    ({"norm_groups": -1}, r"norm_groups must be an int >= 0 \(0: no normalisation\), got -1"),
    ({"ch": 48, "norm_groups": 32}, r"divisible by 32 \(norm_groups\).*\[48"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VQGANConfig(**kwargs)
