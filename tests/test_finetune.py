"""Finetuning: data loading, LoRA/freezing, the loss going down, resume, HF-layout checkpoints, the CLI verb."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rudalle_pipe import finetune as ft
from rudalle_pipe.generation import generate_images
from rudalle_pipe.loader import get_rudalle_model
from rudalle_pipe.tokenizer import YTTMTokenizer

from tiny import SIDE, tiny_dalle, tiny_vae

SIZE = SIDE * 8  # the tiny generator's picture side (4 codes x 8 px)
COLOURS = [(230, 40, 40), (40, 200, 60), (40, 60, 230), (240, 220, 30)]


def _pictures(n: int = 4, size: tuple[int, int] = (48, 40)) -> list[Image.Image]:
    """Non-square pictures: a coloured disc-ish block on grey (each a different colour)."""
    out = []
    for i in range(n):
        image = Image.new("RGB", size, (128, 128, 128))
        image.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), COLOURS[i % len(COLOURS)]),
                    (size[0] // 4, size[1] // 4))
        out.append(image)
    return out


@pytest.fixture
def tokenizer(fixtures_dir) -> YTTMTokenizer:
    return YTTMTokenizer.from_file(Path(fixtures_dir) / "tokenizer" / "bpe.model")


@pytest.fixture
def pairs() -> list[tuple[Image.Image, str]]:
    return list(zip(_pictures(), ["красный квадрат", "зелёный квадрат", "синий квадрат", "жёлтый квадрат"]))


def _fast(**kw) -> dict:
    return {"steps": 8, "lr": 3e-3, "batch_size": 2, "checkpoint_every": 4, "log_every": 1, "progress": False,
            **kw}


# ------------------------------------------------------------------------------------------ data
def test_load_pairs_from_folders(tmp_path):
    images = _pictures(3)
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    with pytest.raises(ValueError, match=r"no captions for 3 image.*captions.csv.*caption="):
        ft.load_pairs(tmp_path)
    # one caption for all
    assert [c for _, c in ft.load_pairs(tmp_path, caption="кот")] == ["кот"] * 3
    # sidecar .txt files
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"подпись {i}\n", encoding="utf-8")
    got = ft.load_pairs(tmp_path)
    assert [(Path(p).name, c) for p, c in got] == [(f"{i}.png", f"подпись {i}") for i in range(3)]
    # captions.csv wins over sidecars, and its order is kept; every image needs a row (skip_bad skips)
    with open(tmp_path / "captions.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["file", "caption"], ["2.png", "два"], ["0.png", "ноль"], ["1.png", "один"]])
    assert [(Path(p).name, c) for p, c in ft.load_pairs(tmp_path)] == [("2.png", "два"), ("0.png", "ноль"),
                                                                       ("1.png", "один")]
    with open(tmp_path / "captions.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["file", "caption"], ["2.png", "два"], ["0.png", "ноль"]])
    with pytest.raises(ValueError, match=r"captions.csv has no row for 1.png"):
        ft.load_pairs(tmp_path)
    got = ft.load_pairs(tmp_path, skip_bad=True)
    assert [(Path(p).name, c) for p, c in got] == [("2.png", "два"), ("0.png", "ноль")]
    (tmp_path / "captions.csv").write_text("name,text\n0.png,x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"columns 'file' and 'caption'; missing \['caption', 'file'\]"):
        ft.load_pairs(tmp_path)
    (tmp_path / "captions.csv").write_text("file,caption\nmissing.png,x\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="line 2.*missing.png"):
        ft.load_pairs(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ft.load_pairs(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no images \(.png"):
        ft.load_pairs(empty)


def test_load_pairs_from_lists_checks_items(pairs):
    assert ft.load_pairs(pairs) == pairs
    assert [c for _, c in ft.load_pairs(pairs, caption="один")] == ["один"] * 4
    with pytest.raises(ValueError, match=r"data\[1\] must be an \(image, caption\) pair"):
        ft.load_pairs([pairs[0], "oops"])
    with pytest.raises(ValueError, match=r"data\[0\] has an empty"):
        ft.load_pairs([(pairs[0][0], "  ")])
    with pytest.raises(TypeError, match=r"data\[0\]\[0\] must be a PIL image or a path, got int"):
        ft.load_pairs([(3, "x")])
    with pytest.raises(ValueError, match="no \\(image, caption\\) pairs"):
        ft.load_pairs([])


def test_prepare_image_resizes_the_short_side_and_centre_crops():
    image = Image.new("RGB", (60, 30), (0, 0, 0))
    image.paste(Image.new("RGB", (20, 30), (255, 255, 255)), (20, 0))  # a white middle third
    out = ft.prepare_image(image, 16)
    assert out.size == (16, 16) and out.mode == "RGB"
    pixels = torch.from_numpy(np.array(out)).float()
    # 60x30 -> 32x16, crop columns 8..24: white in the middle 10 or so columns, black at the edges
    assert pixels[:, 0].max() < 40 and pixels[:, -1].max() < 40 and pixels[:, 8].min() > 215
    grey = Image.new("L", (10, 10), 7)
    assert ft.prepare_image(grey, 8).mode == "RGB"


def test_codes_are_cached_by_pixels_and_vqgan(tmp_path, tokenizer, pairs, monkeypatch):
    dalle, vae = tiny_dalle(), tiny_vae()
    cache = tmp_path / "codes.pt"
    ids = ft.encode_pairs(dalle, vae, tokenizer, pairs, cache=cache)
    assert ids.shape == (4, dalle.config.total_seq_length) and ids.dtype == torch.int64
    assert torch.equal(ids[:, dalle.config.text_seq_length:],
                       vae.get_codebook_indices(torch.stack([
                           torch.from_numpy(np.array(ft.prepare_image(im, SIZE))).permute(2, 0, 1)
                           for im, _ in pairs]).float() / 255))
    monkeypatch.setattr(vae, "get_codebook_indices", lambda x: (_ for _ in ()).throw(AssertionError("re-encoded")))
    assert torch.equal(ft.encode_pairs(dalle, vae, tokenizer, pairs, cache=cache), ids)  # from the cache
    changed = [(pairs[0][0].rotate(90), pairs[0][1]), *pairs[1:]]
    with pytest.raises(AssertionError, match="re-encoded"):  # other pixels: the cache does not apply
        ft.encode_pairs(dalle, vae, tokenizer, changed, cache=cache)


# ---------------------------------------------------------------------------------- finetuning
def test_finetune_lowers_the_loss_saves_and_generates(tmp_path, tokenizer, pairs):
    dalle, vae = tiny_dalle(), tiny_vae()
    result = ft.finetune(dalle, vae, tokenizer, pairs, out_dir=tmp_path / "run", **_fast(steps=12))
    assert result.loss_after < result.loss_before - 0.5
    assert len(result.losses) == 12 and result.trainable_parameters == sum(p.numel() for p in dalle.parameters())
    with open(tmp_path / "run" / "loss_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["loss_after"] == pytest.approx(result.loss_after)
    # HF-layout checkpoints of the last two saves, and the final model, load with the normal API
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-12", "step-8"]
    loaded = get_rudalle_model(str(result.path))
    for (key, a), b in zip(result.model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), key
    out = generate_images("красный квадрат", tokenizer, loaded, vae, top_k=8, top_p=0.99, num_images=2, seed=0,
                          progress=False)
    assert len(out.images) == 2 and out.images[0].size == (SIZE, SIZE)
    with pytest.raises(FileExistsError, match="has finished"):
        ft.finetune(tiny_dalle(), vae, tokenizer, pairs, out_dir=tmp_path / "run", **_fast())


def test_finetune_from_a_folder_with_one_caption(tmp_path, tokenizer):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i, image in enumerate(_pictures(3, size=(40, 64))):
        image.save(folder / f"p{i}.jpg")
    result = ft.finetune(tiny_dalle(), tiny_vae(), tokenizer, folder, caption="квадрат на сером фоне",
                         out_dir=tmp_path / "run", **_fast(steps=6, keep_checkpoints=0))
    assert result.loss_after < result.loss_before
    assert not list((tmp_path / "run").glob("step-*"))  # keep_checkpoints=0: none kept


def test_lora_trains_only_adapters_and_merges(tmp_path, tokenizer, pairs):
    base = tiny_dalle()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    result = ft.finetune(tiny_dalle(), tiny_vae(), tokenizer, pairs, out_dir=tmp_path / "run",
                         **_fast(steps=10, lr=1e-2, train=("attention",), lora_rank=2))
    cfg = base.config
    h = cfg.hidden_size
    per_layer = 2 * (h + 3 * h) + 2 * (h + h)  # qkv: A (2, h) + B (3h, 2); dense: A (2, h) + B (h, 2)
    assert result.trainable_parameters == cfg.num_layers * per_layer
    assert result.loss_after < result.loss_before
    after = result.model.state_dict()
    assert set(after) == set(before)  # merged: the plain layout again
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"transformer.layers.{i}.attention.{n}.weight" for i in range(cfg.num_layers)
                       for n in ("query_key_value", "dense")}
    loaded = get_rudalle_model(str(result.path))
    assert all(torch.equal(after[k], v) for k, v in loaded.state_dict().items())


def test_freezing_trains_only_the_chosen_parts(tmp_path, tokenizer, pairs):
    base = tiny_dalle()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    result = ft.finetune(tiny_dalle(), tiny_vae(), tokenizer, pairs, out_dir=tmp_path / "run",
                         **_fast(steps=4, train=("mlp", "layernorm"), gradient_checkpointing=True,
                                 optimizer="adafactor"))
    changed = {k for k, v in result.model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(".mlp." in k or "layernorm" in k for k in changed)
    assert any("layernorm" in k for k in changed) and any(".mlp." in k for k in changed)


def test_resume_continues_from_the_saved_step(tmp_path, tokenizer, pairs, monkeypatch):
    kwargs = _fast(steps=8, checkpoint_every=3)
    straight = ft.finetune(tiny_dalle(), tiny_vae(), tokenizer, pairs, out_dir=tmp_path / "a", **kwargs)
    from rudalle_pipe.train import common

    real = common.batch_indices

    def failing(step, *args, **kw):
        if step == 5:
            raise KeyboardInterrupt("stopped at step 5")
        return real(step, *args, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(common, "batch_indices", failing)
        with pytest.raises(KeyboardInterrupt):
            ft.finetune(tiny_dalle(), tiny_vae(), tokenizer, pairs, out_dir=tmp_path / "b", **kwargs)
    state = json.loads((tmp_path / "b" / "checkpoint" / "progress.json").read_text())
    assert state["step"] == 3 and (tmp_path / "b" / "step-3" / "model.safetensors").is_file()
    resumed = ft.finetune(tiny_dalle(), tiny_vae(), tokenizer, pairs, out_dir=tmp_path / "b", **kwargs)
    assert len(resumed.losses) == 5  # steps 4..8 only
    for (key, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), key
    with open(tmp_path / "b" / "loss_log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 9))
    # another setting in the same out_dir is refused, nothing is overwritten
    (tmp_path / "c").mkdir()
    with monkeypatch.context() as patch:
        patch.setattr(common, "batch_indices", failing)
        with pytest.raises(KeyboardInterrupt):
            ft.finetune(tiny_dalle(), tiny_vae(), tokenizer, pairs, out_dir=tmp_path / "c", **kwargs)
    with pytest.raises(ValueError, match=r"other settings \{'lr'"):
        ft.finetune(tiny_dalle(), tiny_vae(), tokenizer, pairs, out_dir=tmp_path / "c", **{**kwargs, "lr": 1e-3})


def test_bad_options_are_named(tmp_path, tokenizer, pairs):
    dalle, vae = tiny_dalle(), tiny_vae()
    with pytest.raises(TypeError, match=r"unknown finetune options \['step'\]; valid: \[.*'steps'"):
        ft.finetune(dalle, vae, tokenizer, pairs, out_dir=tmp_path, step=3)
    with pytest.raises(ValueError, match=r"train must name parts from \['all', 'attention'.*got \['attn'\]"):
        ft.FinetuneConfig(train=("attn",))
    with pytest.raises(ValueError, match="lora_rank=4 adapts attention/MLP linears, but train=\\['head'\\]"):
        ft.FinetuneConfig(train="head", lora_rank=4)
    with pytest.raises(ValueError, match="optimizer must be one of \\['adamw', 'adafactor', 'adamw8bit'\\]"):
        ft.FinetuneConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="mixed_precision must be"):
        ft.FinetuneConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match=r"steps must be in \[1, 10000000\], got 0"):
        ft.FinetuneConfig(steps=0)
    with pytest.raises(ValueError, match=r"torch.float16 weights .* mixed_precision='no'"):
        ft.finetune(tiny_dalle().half(), vae, tokenizer, pairs, out_dir=tmp_path / "h", **_fast())
    assert not (tmp_path / "h").exists()


# ------------------------------------------------------------------------------------------- CLI
def test_cli_finetune_then_generate(tmp_path, fixtures_dir, capsys):
    from rudalle_pipe.cli import main
    from rudalle_pipe.pipeline import load_pipeline, save_pipeline
    from tiny import tiny_pipeline

    base = save_pipeline(tiny_pipeline(fixtures_dir, tmp_path, clip=False, upscaler=False), tmp_path / "base")
    folder = tmp_path / "pics"
    folder.mkdir()
    for i, image in enumerate(_pictures(2)):
        image.save(folder / f"{i}.png")
    out = tmp_path / "run"
    assert main(["finetune", str(folder), "--out", str(out), "--model", str(base), "--steps", "3"]) == 1
    assert "no captions for 2 image(s)" in capsys.readouterr().err
    assert main(["finetune", str(folder), "--out", str(out), "--model", str(base), "--train", "attn"]) == 2
    assert "train must name parts from ['all', 'attention'" in capsys.readouterr().err
    assert main(["finetune", str(folder), "--out", str(out), "--model", str(base), "--caption", "квадрат",
                 "--steps", "4", "--lr", "3e-3", "--batch-size", "2", "--lora-rank", "2", "--train",
                 "attention,mlp", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"pipeline: {out / 'pipeline'}" in printed and "loss" in printed
    finetuned = load_pipeline(out / "pipeline")
    assert all(torch.equal(a, b) for a, b in zip(finetuned.dalle.state_dict().values(),
                                                 get_rudalle_model(str(out / "final")).state_dict().values()))
    assert main(["generate", "квадрат", "--model", str(out / "pipeline"), "--num-images", "2", "--seed", "0",
                 "--out", str(tmp_path / "gen"), "--no-progress"]) == 0
    assert len(list((tmp_path / "gen").glob("image_*.png"))) == 2
    # finished: a rerun refuses instead of overwriting
    assert main(["finetune", str(folder), "--out", str(out), "--model", str(base), "--caption", "квадрат"]) == 1
    assert "exists: this run has finished" in capsys.readouterr().err


def test_memory_estimate_counts_parameters_and_options():
    from rudalle_pipe import DalleConfig
    from rudalle_pipe.registry import PRETRAINED

    tiny = tiny_dalle()
    full = ft.estimate_memory(tiny.config, ft.FinetuneConfig())
    assert full["parameters_total_m"] * 1e6 == pytest.approx(sum(p.numel() for p in tiny.parameters()))
    assert full["frozen_weights_gib"] == 0 and full["optimizer_gib"] == pytest.approx(full["trainable_weights_grads_gib"])
    # Malevich on a 16 GB card: full AdamW does not fit, LoRA + checkpointing does, by a wide margin
    malevich = DalleConfig(**PRETRAINED["Malevich"].config)
    adamw = ft.estimate_memory(malevich, ft.FinetuneConfig())
    lora = ft.estimate_memory(malevich, ft.FinetuneConfig(lora_rank=16, train=("attention", "mlp"),
                                                          gradient_checkpointing=True))
    assert 1300 < adamw["parameters_total_m"] < 1320 and adamw["total_gib"] > 16 > 4 > lora["total_gib"]
    assert lora["parameters_trainable_m"] == pytest.approx(24 * 16 * (2048 + 3 * 2048 + 2048 + 2048
                                                                       + 2048 + 4 * 2048 + 4 * 2048 + 2048) / 1e6)
    ckpt = ft.estimate_memory(malevich, ft.FinetuneConfig(gradient_checkpointing=True, optimizer="adamw8bit"))
    assert ckpt["activations_gib"] < adamw["activations_gib"] / 5 and ckpt["optimizer_gib"] == adamw["optimizer_gib"] / 4
