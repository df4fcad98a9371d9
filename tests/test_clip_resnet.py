"""The ResNet CLIP built without open_clip (rudalle_pipe.clip_resnet) against open_clip itself: same keys, same
features, same preprocessing; open_clip still builds every folder that asks for anything else."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.model import set_model_preprocess_cfg
from PIL import Image

from rudalle_pipe import clip as clip_module
from rudalle_pipe.clip import ClipBundle, YTTMClipTokenizer, get_clip, save_clip
from rudalle_pipe.clip_resnet import Preprocess, ResNetCLIP, unsupported

DEMO_CLIP = Path(clip_module.__file__).parent / "weights" / "demo" / "clip"
PROMPTS = ["большой красный круг в центре на сером фоне", "звезда", "", "слово " * 40]


def _by_open_clip(monkeypatch, name: str) -> ClipBundle:
    """What get_clip built before clip_resnet existed: open_clip's own model and transform."""
    monkeypatch.setattr(clip_module, "_build_resnet_clip", lambda *a, **k: None)
    bundle = get_clip(name, None)
    monkeypatch.undo()
    assert type(bundle.model) is open_clip.CLIP
    return bundle


def _images(seed: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    sizes = [(64, 64), (80, 64), (64, 101), (33, 47), (47, 33), (256, 256), (301, 200)]  # (w, h); odd crops too
    out = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for w, h in sizes]
    return out + [out[1].convert("RGBA"), out[2].convert("L")]


def _assert_same(ours: ClipBundle, theirs: ClipBundle, seed: int = 0) -> None:
    assert isinstance(ours.model, ResNetCLIP)
    assert {k: v.shape for k, v in ours.model.state_dict().items()} == \
        {k: v.shape for k, v in theirs.model.state_dict().items()}
    images = _images(seed)
    for image in images:
        assert torch.equal(ours.preprocess(image), theirs.preprocess(image)), image.size
    pixels = torch.stack([theirs.preprocess(image) for image in images])
    tokens = ours.tokenizer(PROMPTS)
    assert torch.equal(tokens, theirs.tokenizer(PROMPTS))
    with torch.no_grad():
        want_i, want_t = theirs.model.encode_image(pixels), theirs.model.encode_text(tokens)
        torch.testing.assert_close(ours.model.encode_image(pixels), want_i, rtol=1e-5, atol=1e-5 * want_i.abs().max())
        torch.testing.assert_close(ours.model.encode_text(tokens), want_t, rtol=1e-5, atol=1e-5 * want_t.abs().max())
        for a, b in zip(ours.model(pixels, tokens), theirs.model(pixels, tokens)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_demo_clip_is_built_without_open_clip_and_matches_it(monkeypatch):
    ours = get_clip(f"local-dir:{DEMO_CLIP}", None)
    _assert_same(ours, _by_open_clip(monkeypatch, f"local-dir:{DEMO_CLIP}"))
    assert ours.model.visual.image_size == 64 and not ours.model.training


def test_the_first_command_imports_neither_open_clip_nor_torchvision(tmp_path):
    body = ("import sys\nfrom rudalle_pipe.cli import main\n"
            f"sys.argv = ['rudalle-pipe', 'generate', 'большой красный круг', '--num-images', '2', '--seed', '0', "
            f"'--out', {str(tmp_path / 'out')!r}, '--no-progress']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('LOADED:' + ','.join(m for m in ('open_clip', 'torchvision', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, check=True)
    assert done.stdout.rsplit("LOADED:", 1)[1].strip() == ""
    ranked = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))["images"]
    assert len(ranked) == 2 and all("clip" in json.dumps(entry) for entry in ranked)  # CLIP did rank them


def _random_folder(tmp_path: Path, model_cfg: dict, preprocess: dict, seed: int) -> str:
    """A random open_clip CLIP of ``model_cfg`` with the demo's YTTM tokenizer, saved by save_clip."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(model_cfg["embed_dim"], model_cfg["vision_cfg"], model_cfg["text_cfg"],
                           quick_gelu=model_cfg.get("quick_gelu", False))
    with torch.no_grad():  # BatchNorm statistics and the zero-initialised bn3 are not left at their defaults
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1), module.running_var.uniform_(0.5, 2), module.weight.normal_(1, .2)
    set_model_preprocess_cfg(model, preprocess)
    tokenizer = YTTMClipTokenizer.from_file(DEMO_CLIP / "bpe.model", model_cfg["text_cfg"]["context_length"])
    bundle = ClipBundle(model=model.eval(), preprocess=open_clip.image_transform(
        preprocess["size"], is_train=False, mean=preprocess["mean"], std=preprocess["std"]), tokenizer=tokenizer,
        name="random", pretrained=None, model_cfg=model_cfg)
    return f"local-dir:{save_clip(bundle, tmp_path / f'clip{seed}')}"


PREPROCESS = {"size": 64, "mean": [0.48, 0.45, 0.4], "std": [0.27, 0.26, 0.28], "interpolation": "bicubic",
              "resize_mode": "shortest"}


@pytest.mark.parametrize("vision, text, quick_gelu", [
    ({"layers": [2, 1, 1, 2], "width": 32, "image_size": 64, "head_width": 16},
     {"pool_type": "argmax", "mlp_ratio": 2.0, "heads": 2, "layers": 3}, True),
    ({"layers": [1, 2, 1, 1], "width": 16, "image_size": 96},
     {"pool_type": "eos", "eos_id": 3, "pad_id": 0, "heads": 4, "layers": 1}, False),
])
def test_random_resnet_clips_match_open_clip(monkeypatch, tmp_path, vision, text, quick_gelu):
    preprocess = {**PREPROCESS, "size": vision["image_size"]}
    model_cfg = {"embed_dim": 48, "quick_gelu": quick_gelu, "vision_cfg": vision,
                 "text_cfg": {"context_length": 12, "vocab_size": 128, "width": 64, **text}}
    name = _random_folder(tmp_path, model_cfg, preprocess, seed=len(vision["layers"]) + vision["width"])
    _assert_same(get_clip(name, None), _by_open_clip(monkeypatch, name), seed=1)


def test_anything_else_is_left_to_open_clip(tmp_path):
    demo = json.loads((DEMO_CLIP / "open_clip_config.json").read_text(encoding="utf-8"))
    assert unsupported(demo) == ""
    changes = {
        "a ViT image tower": lambda c: c["model_cfg"]["vision_cfg"].update(layers=2, patch_size=8),
        "an attentional pooler": lambda c: c["model_cfg"]["vision_cfg"].update(attentional_pool=True),
        "a Hugging Face text tower": lambda c: c["model_cfg"]["text_cfg"].update(hf_model_name="xlm-roberta-base"),
        "squashed resizing": lambda c: c["preprocess_cfg"].update(resize_mode="squash"),
        "no mean": lambda c: c["preprocess_cfg"].pop("mean"),
        "a logit bias": lambda c: c["model_cfg"].update(init_logit_bias=-10.0),
    }
    for what, change in changes.items():
        config = json.loads(json.dumps(demo))
        change(config)
        assert unsupported(config), what
        with pytest.raises(ValueError, match="cannot build this config"):
            ResNetCLIP(config["model_cfg"], config["preprocess_cfg"])
    # a folder open_clip must build: same weights, squashed resizing -> open_clip's class, still loadable
    folder = tmp_path / "squash"
    folder.mkdir()
    for file in DEMO_CLIP.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads(json.dumps(demo))
    config["preprocess_cfg"]["resize_mode"] = "squash"
    (folder / "open_clip_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert type(get_clip(f"local-dir:{folder}", None).model) is open_clip.CLIP


def test_weights_that_do_not_fit_name_the_file_and_the_architecture(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    folder.mkdir()
    for file in DEMO_CLIP.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    state = load_file(str(DEMO_CLIP / "open_clip_model.safetensors"))
    del state["visual.attnpool.c_proj.bias"]
    state["ln_final.weight"][0] = float("nan")
    save_file(state, str(folder / "open_clip_model.safetensors"))
    with pytest.raises(ValueError, match=r"open_clip_model\.safetensors.*into architecture.*local-dir:.*broken.*"
                                         r"visual\.attnpool\.c_proj\.bias"):
        get_clip(f"local-dir:{folder}", None)
    state["visual.attnpool.c_proj.bias"] = torch.zeros(96)
    save_file(state, str(folder / "open_clip_model.safetensors"))
    with pytest.raises(ValueError, match=r"ln_final\.weight"):
        get_clip(f"local-dir:{folder}", None)


def test_preprocess_matches_open_clip_at_other_sizes():
    transform = open_clip.image_transform(48, is_train=False, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
    ours = Preprocess(48, [0.5, 0.4, 0.3], [0.2, 0.3, 0.25])
    for image in _images(2) + [Image.new("P", (100, 49)), Image.new("RGB", (48, 300), "red")]:
        assert torch.equal(ours(image), transform(image)), (image.size, image.mode)
