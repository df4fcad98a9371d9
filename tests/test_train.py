"""Training code: the BPE trainer against youtokentome, short runs of the VQGAN and generator stages
(the loss goes down, an interrupted run resumes to the same weights) and the whole demo on tiny configs."""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import import_reference
from rudalle_pipe.hub import save_pretrained
from rudalle_pipe.tokenizer import YTTMTokenizer
from rudalle_pipe.train import dalle as dalle_stage
from rudalle_pipe.train import vqgan as vqgan_stage
from rudalle_pipe.train.bpe import learn_bpe, train_bpe
from rudalle_pipe.train import common
from rudalle_pipe.train.common import LoopConfig, batch_indices
from rudalle_pipe.train.scenes import all_captions, all_scenes, render_scenes
from rudalle_pipe.vae import VQGAN, VQGANConfig

TINY_VQGAN = VQGANConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(), z_channels=8,
                         embed_dim=8, n_embed=16, resolution=16)  # 16 px -> 8 x 8 codes


def _captions(n_scenes: int = 40, split: str = "train") -> list[str]:
    return [c for scene in all_scenes(split)[::7][:n_scenes] for c in all_captions(scene)]


def _losses(out_dir: Path) -> list[float]:
    with open(out_dir / "loss_log.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def _raise_at(owner, attr: str, step_to_fail: int, monkeypatch) -> None:
    """Make ``owner.attr`` (called with the step as its first int argument: ``dalle_stage.batch_rows``,
    ``common.Shard.indices``) raise at ``step_to_fail``, as an interrupted get_batch would."""
    original = getattr(owner, attr)

    def failing(*args, **kwargs):
        step = next(a for a in args if isinstance(a, int))
        if step == step_to_fail:
            raise KeyboardInterrupt(f"interrupted at step {step}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, failing)


# ----------------------------------------------------------------------------- data helpers


def test_scene_enumeration_and_batches():
    train, held = all_scenes("train"), all_scenes("heldout")
    assert len(set(train)) == len(train) and len(set(held)) == len(held)
    assert not {(s.color, s.shape) for s in train} & {(s.color, s.shape) for s in held}
    assert len(set(all_captions(train[0]))) == 5
    assert torch.equal(batch_indices(7, 10, 4), batch_indices(7, 10, 4))
    epoch = torch.cat([batch_indices(s, 12, 4) for s in range(3)])  # one epoch covers every item once
    assert sorted(epoch.tolist()) == list(range(12))
    with pytest.raises(ValueError, match="split"):
        all_scenes("test")


# ----------------------------------------------------------------------------- stage 1: BPE


def test_bpe_matches_youtokentome(tmp_path):
    yttm = import_reference("youtokentome")
    texts = _captions()
    path = train_bpe(texts, 90, tmp_path / "bpe.model")
    ours = YTTMTokenizer.from_file(path)
    assert ours.vocab_size == 90
    reference = yttm.BPE(str(path))
    probes = texts + _captions(20, "heldout") + ["красная звезда xyz ёж", "  на\tфоне\n", "", "ъъъ фоне"]
    assert [ours.encode(t) for t in probes] == reference.encode(probes, output_type=yttm.OutputType.ID)
    for text in texts[:50]:
        assert ours.decode_text(ours.encode_text(text, 64)) == text
        assert reference.decode([ours.encode(text)])[0] == text


def test_bpe_is_deterministic_and_checks_input(tmp_path):
    texts = _captions(20)
    a, b = learn_bpe(texts, 70), learn_bpe(list(reversed(texts)), 70)
    assert a._merges == b._merges and a._chars == b._chars  # order of the texts does not matter
    assert len(a.encode(texts[0])) < len(texts[0])  # merges shorten the encoding
    with pytest.raises(ValueError, match="vocab_size=10 is too small"):
        learn_bpe(texts, 10)
    with pytest.raises(ValueError, match="no words"):
        learn_bpe(["", "  "], 100)
    with pytest.raises(TypeError):
        learn_bpe("a single string", 100)


# ----------------------------------------------------------------------------- stage 2: VQGAN


def _vqgan_config(steps: int = 8, **kw) -> vqgan_stage.VQGANTrainConfig:
    loop = LoopConfig(steps=steps, lr=3e-3, warmup_steps=0, checkpoint_every=2, log_every=1)
    kw = {"ae_steps": 2, "kmeans_images": 4, "kmeans_iters": 3, "decoder_steps": 2, **kw}
    return vqgan_stage.VQGANTrainConfig(model=TINY_VQGAN, loop=loop, batch_size=4, eval_images=4,
                                        restart_every=3, usage_decay=0.3, **kw)


@pytest.fixture(scope="module")
def renders16() -> torch.Tensor:
    # (8, 3, 16, 16) uint8; a spread of scenes in which a code dies within the stage test's 8 steps, so that the
    # test sees a restart (with every 50th scene none died, once small objects became 32% of the picture)
    return render_scenes(all_scenes("train")[::37][:8], 16)


@pytest.mark.slow
def test_vqgan_stage_trains_and_saves(tmp_path, renders16):
    final = vqgan_stage.train(tmp_path, config=_vqgan_config(max_images=4, ae_steps=0), progress=False,
                              images=renders16, eval_images=renders16[:4])
    losses = _losses(tmp_path)
    assert len(losses) == 8 and losses[-1] < losses[0]
    vae = vqgan_stage.load_trained(final)
    # proj reproduces the training-time cosine argmax: codes of a render = nearest unit codebook rows
    x = renders16[:2].float() / 255
    h = torch.nn.functional.normalize(vae.quant_conv(vae.encoder(2 * x - 1)), dim=1)
    expected = torch.einsum("bdyx,kd->bkyx", h, vae.quantize.embed.weight).argmax(1).flatten(1)
    assert torch.equal(vae.get_codebook_indices(x), expected)
    assert torch.allclose(vae.quantize.embed.weight.norm(dim=1), torch.ones(16), atol=1e-5)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # the reported metrics, recomputed here from the saved model and the evaluation images
    x = renders16[:4].float() / 255  # (4, 3, 16, 16)
    with torch.no_grad():
        codes = vae.get_codebook_indices(x)
        mse = (vae.decode(codes) - x).pow(2).flatten(1).mean(dim=1)  # (4,)
    assert metrics["heldout_psnr_db"] == pytest.approx(float((-10 * mse.log10()).mean()), abs=1e-3)
    assert metrics["heldout_codes_used"] == len(codes.unique())
    # and training helped: the same architecture and seed untrained gives 8.6 dB with 8 of 16 codes in use;
    # these 8 steps measured 12.9 dB with 15 codes and 1 restart (dead-code restarts spread the usage)
    torch.manual_seed(0)
    untrained_psnr, untrained_used = vqgan_stage.reconstruction_psnr(VQGAN(TINY_VQGAN).eval(), renders16[:4])
    assert metrics["heldout_psnr_db"] > untrained_psnr + 1.5, (metrics["heldout_psnr_db"], untrained_psnr)
    assert metrics["heldout_codes_used"] >= 10 > untrained_used
    assert metrics["codes_restarted"] > 0  # dead codes were moved onto encoder outputs
    assert vqgan_stage.train(tmp_path, config=_vqgan_config(), progress=False) == final  # finished: skipped


@pytest.mark.slow
def test_vqgan_autoencoder_phase_then_kmeans_codebook(tmp_path, renders16, monkeypatch):
    calls = []
    original = vqgan_stage.VQGANTrainer._kmeans_init

    def spy(self, images, seed, iters):
        calls.append(len(images))
        before = self.vae.quantize.embed.weight.clone()
        original(self, images, seed, iters)
        after = self.vae.quantize.embed.weight
        assert not torch.equal(before, after)
        assert torch.allclose(after.norm(dim=1), torch.ones(16), atol=1e-5)  # unit centroids
        # every centroid is the nearest code of some encoder output: k-means leaves no code unused
        with torch.no_grad():
            h = torch.nn.functional.normalize(
                self.vae.quant_conv(self.vae.encoder(images.float() / 127.5 - 1)), dim=1)
        codes = torch.einsum("bdyx,kd->bkyx", h, after).argmax(1)
        assert codes.unique().numel() == 16

    monkeypatch.setattr(vqgan_stage.VQGANTrainer, "_kmeans_init", spy)
    config = _vqgan_config(steps=6, ae_steps=3, kmeans_images=8)
    vqgan_stage.train(tmp_path, config=config, progress=False, images=renders16, eval_images=renders16[:2])
    assert calls == [8]  # once, at the switch from autoencoder to VQ
    with pytest.raises(ValueError, match=r"ae_steps must be in \[0, loop.steps=6\), got 6"):
        _vqgan_config(steps=6, ae_steps=6)


@pytest.mark.slow
def test_vqgan_resume_gives_the_same_weights(tmp_path, renders16, monkeypatch):
    config = _vqgan_config(steps=6)
    straight = vqgan_stage.load_trained(vqgan_stage.train(tmp_path / "a", config=config, progress=False,
                                                          images=renders16, eval_images=renders16[:2]))
    with monkeypatch.context() as patch:
        # the checkpoint of step 2 survives; restarts happen at step 2 and 5
        _raise_at(common.Shard, "indices", 3, patch)
        with pytest.raises(KeyboardInterrupt):
            vqgan_stage.train(tmp_path / "b", config=config, progress=False, images=renders16,
                              eval_images=renders16[:2])
    assert not (tmp_path / "b" / "final").exists()
    resumed = vqgan_stage.load_trained(vqgan_stage.train(tmp_path / "b", config=config, progress=False,
                                                         images=renders16, eval_images=renders16[:2]))
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


# ----------------------------------------------------------------------------- stage 3: generator


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A BPE model over the captions and a random tiny VQGAN (16 px, 8 x 8 codes)."""
    root = tmp_path_factory.mktemp("inputs")
    bpe_path = train_bpe([c for s in all_scenes("train") for c in all_captions(s)], 128, root / "bpe.model")
    torch.manual_seed(0)
    vae = VQGAN(TINY_VQGAN)
    save_pretrained(vae, vae.config, root / "vae", model_type="vqgan")
    return bpe_path, root / "vae"


def _dalle_config(steps: int = 8) -> dalle_stage.DalleTrainConfig:
    return dalle_stage.DalleTrainConfig(num_layers=2, hidden_size=32, num_attention_heads=2, text_seq_length=18,
                                        loop=LoopConfig(steps=steps, lr=3e-3, checkpoint_every=2, log_every=1),
                                        batch_size=8, max_scenes=8, eval_scenes=2)


@pytest.mark.slow
def test_dalle_stage_trains_and_saves(tmp_path, stage_inputs):
    from rudalle_pipe import DalleModel

    bpe_path, vae_dir = stage_inputs
    config = _dalle_config()
    final = dalle_stage.train(tmp_path, config=config, progress=False, tokenizer_path=bpe_path, vae_dir=vae_dir)
    losses = _losses(tmp_path)
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5
    model = DalleModel.from_pretrained(final)
    assert model.config.vocab_size == 128 + 18 and model.config.image_vocab_size == 16
    assert model.config.image_tokens_per_dim == 8
    codes = torch.load(tmp_path / "codes.pt", weights_only=True)["codes"]
    assert codes.shape == (8 * config.variants, 64) and codes.dtype == torch.int16
    # row k of scene s is the VQGAN's code grid of variation k of s, and variations differ
    from rudalle_pipe.train.vqgan import load_trained

    scenes = all_scenes("train")[:8]
    variants = [k for _ in scenes for k in range(config.variants)]
    vae = load_trained(vae_dir)
    expect = dalle_stage.encode_dataset(vae, render_scenes([s for s in scenes for _ in range(config.variants)],
                                                           vae.config.resolution, variants=variants))
    assert torch.equal(codes, expect)
    assert len({tuple(r.tolist()) for r in codes[: config.variants]}) > 1
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    held = metrics["heldout"]  # the original's weighting of its two parts (image weight 7)
    assert held["loss"] == pytest.approx((held["loss_text"] + 7 * held["loss_image"]) / 8, rel=1e-5)
    # the held-out loss, recomputed: captions and renders of held-out scenes the model never saw
    tokenizer = YTTMTokenizer.from_file(bpe_path)
    held_scenes = all_scenes("heldout")[::75][:2]
    held_ids = torch.cat([dalle_stage.tokenize_captions(tokenizer, [all_captions(s)[:1] for s in held_scenes],
                                                        config.text_seq_length)[:, 0],
                          dalle_stage.encode_dataset(vae, render_scenes(held_scenes, vae.config.resolution,
                                                                        variants=[0 if config.variants else None] * 2)
                                                          ).long()], dim=1)
    with torch.no_grad():
        assert float(model(held_ids, return_loss=True).loss) == pytest.approx(held["loss"], rel=1e-4)
        torch.manual_seed(config.seed)  # the same architecture and initial weights, untrained
        untrained = float(DalleModel(model.config).eval()(held_ids, return_loss=True).loss)
    assert held["loss"] < untrained - 0.5, (held, untrained)  # generalises beyond the training scenes


@pytest.mark.slow
def test_dalle_resume_gives_the_same_weights(tmp_path, stage_inputs, monkeypatch):
    from rudalle_pipe import DalleModel

    bpe_path, vae_dir = stage_inputs
    config = _dalle_config(steps=5)
    kwargs = dict(config=config, progress=False, tokenizer_path=bpe_path, vae_dir=vae_dir)
    straight = DalleModel.from_pretrained(dalle_stage.train(tmp_path / "a", **kwargs))
    with monkeypatch.context() as patch:
        _raise_at(dalle_stage, "batch_rows", 3, patch)
        with pytest.raises(KeyboardInterrupt):
            dalle_stage.train(tmp_path / "b", **kwargs)
    resumed = DalleModel.from_pretrained(dalle_stage.train(tmp_path / "b", **kwargs))
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key  # dropout draws from the torch RNG that the checkpoint restores


# ----------------------------------------------------------------------------- the demo


@pytest.mark.slow
def test_train_demo_quick_end_to_end(tmp_path, monkeypatch):
    from rudalle_pipe.pipeline import load_pipeline
    from rudalle_pipe.train import demo

    pipeline_dir = demo.train_demo(tmp_path, quick=True, progress=False)
    meta = json.loads((pipeline_dir / "pipeline.json").read_text())
    assert meta == {"format": "rudalle_pipe.pipeline", "version": 1, "name": "demo",
                    "vocabulary": demo.demo_vocabulary()}
    assert {"звезда", "жёлтая", "слева", "фоне"} <= set(meta["vocabulary"]) and "котик" not in meta["vocabulary"]
    pipe = load_pipeline(pipeline_dir)
    assert pipe.dalle.dtype == torch.float32 and pipe.dalle.config.image_vocab_size == pipe.vae.num_tokens
    from safetensors import safe_open

    with safe_open(str(pipeline_dir / "dalle" / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16  # shipped in fp16
    timings = json.loads((tmp_path / "timings.json").read_text())
    stages = timings["stages"]
    assert {"tokenizer", "vqgan", "dalle", "package"} <= set(stages)
    assert all(v >= 0 for v in stages.values())  # the total is the stages' sum (each rounded to 0.1 s)
    assert timings["total_s"] == pytest.approx(sum(stages.values()), abs=0.05 * len(stages))
    assert timings["pipeline_mb"] <= 30
    # a rerun skips every finished stage and rebuilds the same pipeline
    before = (pipeline_dir / "dalle" / "model.safetensors").read_bytes()
    demo.train_demo(tmp_path, quick=True, progress=False)
    assert (pipeline_dir / "dalle" / "model.safetensors").read_bytes() == before
    # install refuses to overwrite without the flag
    monkeypatch.setattr(demo, "BUNDLED_DIR", tmp_path / "weights")
    demo.install(pipeline_dir)
    with pytest.raises(FileExistsError, match="overwrite"):
        demo.install(pipeline_dir)
    assert (demo.install(pipeline_dir, overwrite=True) / "pipeline.json").is_file()


@pytest.mark.slow
def test_training_command_resumes_after_an_interruption(tmp_path, monkeypatch):
    """`python -m rudalle_pipe.train demo --quick`: stopped inside the generator stage, the same command
    continues from the generator's last checkpoint (finished stages are not trained again)."""
    from rudalle_pipe.train.__main__ import main

    argv = ["demo", "--out", str(tmp_path), "--quick", "--no-progress"]
    with monkeypatch.context() as patch:
        _raise_at(dalle_stage, "batch_rows", 3, patch)  # the generator's checkpoint of step 2 survives
        with pytest.raises(KeyboardInterrupt):
            main(argv)
    assert (tmp_path / "vqgan" / "final").is_dir() and not (tmp_path / "dalle" / "final").exists()
    vqgan_log = (tmp_path / "vqgan" / "loss_log.csv").read_text()
    assert main(argv) == 0
    assert (tmp_path / "vqgan" / "loss_log.csv").read_text() == vqgan_log  # not retrained
    with open(tmp_path / "dalle" / "loss_log.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [1, 2, 3, 4]  # rows 1-2 from the first run, 3-4 after the resume
    from rudalle_pipe.train.demo import QUICK_CONFIG

    losses = _losses(tmp_path / "dalle")
    assert losses[-1] < losses[0]
    ae = _losses(tmp_path / "vqgan")[: QUICK_CONFIG.vqgan.ae_steps]  # the autoencoder phase (VQ adds its loss after)
    assert len(ae) >= 2 and ae[-1] < ae[0]
    assert (tmp_path / "pipeline" / "pipeline.json").is_file()


def test_generator_loss_adds_the_first_image_code():
    from rudalle_pipe import DalleConfig, DalleModel

    torch.manual_seed(0)
    cfg = DalleConfig(num_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=40, image_vocab_size=16,
                      text_seq_length=6, image_tokens_per_dim=2)
    model = DalleModel(cfg).eval()
    ids = torch.cat([torch.randint(1, 30, (3, 6)), torch.randint(0, 16, (3, 4))], dim=1)
    out = model(ids, return_loss=True)
    assert torch.equal(dalle_stage.generator_loss(model, ids, first_code=False), out.loss)  # the original
    first = torch.nn.functional.cross_entropy(out.logits[:, 5, 40:], ids[:, 6])  # image head, last text position
    expected = (out.loss_text + 7 * (out.loss_image * 3 + first) / 4) / 8
    assert torch.allclose(dalle_stage.generator_loss(model, ids), expected)
    # only the added term trains the image head's logits at the last text position
    model.zero_grad()
    dalle_stage.generator_loss(model, ids, first_code=False).backward()
    head = model.to_logits[1].weight
    without = head.grad[40:].clone()
    model.zero_grad()
    dalle_stage.generator_loss(model, ids).backward()
    assert not torch.allclose(head.grad[40:], without)


@pytest.mark.slow
def test_decoder_refinement_keeps_every_code(tmp_path, renders16):
    torch.manual_seed(0)
    vae = vqgan_stage.sync_proj(VQGAN(TINY_VQGAN).eval())
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    codes = vae.get_codebook_indices(renders16.float() / 255)
    refined = vqgan_stage.refine_decoder(vae, renders16, _vqgan_config(decoder_steps=6), tmp_path, progress=False)
    after = refined.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    assert torch.equal(refined.get_codebook_indices(renders16.float() / 255), codes)  # the generator's data stays valid
    assert not any(p.requires_grad for p in refined.parameters())
    assert len(_losses(tmp_path)) == 6


def test_edge_weighted_loss_counts_errors_at_outlines_more():
    x = torch.full((1, 3, 32, 32), -0.5)
    x[:, :, 12:20, 12:20] = 0.8  # a square on a flat background
    weights = vqgan_stage._edge_weights(x, 30.0)  # (1, 1, 32, 32), from the target's edges only
    assert weights.shape == (1, 1, 32, 32)
    assert torch.allclose(weights.mean(), torch.tensor(1.0))
    assert weights[0, 0, 12, 12] > 4 * weights[0, 0, 0, 0]  # a corner of the square vs the far background
    assert torch.allclose(vqgan_stage._edge_weights(torch.zeros(2, 3, 8, 8), 30.0), torch.ones(2, 1, 8, 8))
    # a missed outline and a false speck on flat background both cost more than under the plain loss
    on_edge, speck = x.clone(), x.clone()
    on_edge[:, :, 12, 12] -= 0.5
    speck[:, :, 2, 29] += 0.5
    assert vqgan_stage._edge_weights(x, 30.0, speck)[0, 0, 2, 29] > 4 * weights[0, 0, 2, 29]
    for output in (on_edge, speck):
        plain = (output - x).abs().mean() + (output - x).pow(2).mean()
        assert torch.allclose(vqgan_stage._reconstruction_loss(output, x), plain)  # weight 0: L1 + MSE
        assert vqgan_stage._reconstruction_loss(output, x, 30.0) > 4 * plain
    smooth = x.clone()
    smooth[:, :, 0:4, 0:4] += 0.02  # a faint flat error, under the edge threshold, weighs less than plain
    assert vqgan_stage._reconstruction_loss(smooth, x, 30.0) < vqgan_stage._reconstruction_loss(smooth, x)
    per_image = vqgan_stage._reconstruction_loss(torch.cat([on_edge, smooth]), torch.cat([x, x]), 30.0, per_image=True)
    assert per_image.shape == (2,) and per_image[0] > per_image[1]
    with pytest.raises(ValueError, match="decoder_edge_weight"):
        _vqgan_config(decoder_edge_weight=-1.0)


def test_dalle_batches_drop_captions_and_pair_each_render_with_its_scene():
    """Rows pair every render with a caption of its own scene; a caption_dropout share of rows gets the
    empty text (all pads); batches are a pure function of the step (resume sees the same data)."""
    from rudalle_pipe.generation import empty_text_ids

    S, K, V, T = 6, 3, 2, 5
    texts = torch.arange(1, S * V * T + 1).view(S, V, T) % 97 + 1  # no zeros: a dropped row is recognisable
    codes = (torch.arange(S * K)[:, None] * 10 + torch.arange(4)).to(torch.int16)  # row r starts with 10 r
    config = dalle_stage.DalleTrainConfig(batch_size=16, caption_dropout=0.25, variants=K)
    rows = torch.cat([dalle_stage.batch_rows(step, texts=texts, codes=codes, config=config) for step in range(200)])
    text, image = rows[:, :T], rows[:, T:]
    dropped = (text == empty_text_ids(T)).all(1)
    assert torch.equal(empty_text_ids(T), torch.zeros(T, dtype=torch.long))
    assert 0.2 < dropped.float().mean() < 0.3  # 3200 rows
    render = image[:, 0] // 10  # which render each row holds
    for t, r in zip(text[~dropped], render[~dropped]):
        assert any(torch.equal(t, texts[int(r) // K, v]) for v in range(V))  # a caption of the render's scene
    assert len(set(render.tolist())) == S * K  # every render is used
    again = dalle_stage.batch_rows(7, texts=texts, codes=codes, config=config)
    assert torch.equal(again, rows[7 * 16: 8 * 16])
    none = replace(config, caption_dropout=0.0)
    assert not (dalle_stage.batch_rows(3, texts=texts, codes=codes, config=none)[:, :T] == 0).all(1).any()
    with pytest.raises(ValueError, match="caption_dropout"):
        replace(config, caption_dropout=1.0)
    with pytest.raises(ValueError, match="18 rows; 6 scenes x 4 renders"):
        dalle_stage.batch_rows(0, texts=texts, codes=codes, config=replace(config, variants=4))
