"""The rudalle-pipe command line on tiny random pipelines, offline: the whole chain, refusing to
overwrite, one-line errors with the documented exit codes, and the `models` listing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, add_to_hub_cache
from rudalle_pipe import contact_sheet
from rudalle_pipe.cli import EXIT_FAILURE, EXIT_USAGE, main
from rudalle_pipe.pipeline import load_pipeline, save_pipeline
from tiny import SIDE, tiny_pipeline

TEXT = "рыжий котик"
SIZE = SIDE * 8  # the tiny VQGAN decodes 4x4 codes to 32x32 images


@pytest.fixture(scope="module")
def pipe_dir(fixtures_dir, tmp_path_factory) -> Path:
    """A saved pipeline with tokenizer, generator, VQGAN, CLIP and an x4 upscaler."""
    tmp = tmp_path_factory.mktemp("pipe")
    return save_pipeline(tiny_pipeline(fixtures_dir, tmp), tmp / "tiny")


@pytest.fixture(scope="module")
def bare_dir(fixtures_dir, tmp_path_factory) -> Path:
    """A saved pipeline without CLIP and without upscaler."""
    tmp = tmp_path_factory.mktemp("bare")
    return save_pipeline(tiny_pipeline(fixtures_dir, tmp, clip=False, upscaler=False), tmp / "bare")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(directory: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def test_generate_end_to_end(pipe_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["generate", TEXT, "--model", pipe_dir, "--num-images", 3, "--rerank", 2, "--upscale", "x4",
            "--seed", 1, "--out", out, "--no-progress", "--device", "cpu"]  # recorded below: not the default
    code, stdout, stderr = run(capsys, *argv)
    assert code == 0, stderr
    assert stderr == ""
    assert "wrote 2 images" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["contact_sheet.png", "image_000.png", "image_001.png",
                                                     "results.json"]
    results = json.loads((out / "results.json").read_text("utf-8"))
    assert TEXT in (out / "results.json").read_text("utf-8")  # ensure_ascii=False: readable Russian
    assert results["text"] == TEXT and results["model"] == str(pipe_dir) and results["model_kind"] == "directory"
    assert results["settings"] == {"top_k": 50, "top_p": 0.995, "temperature": 1.0, "num_images": 3, "seed": 1,
                                   "batch_size": 8, "guidance_scale": 1.0, "negative_prompt": None,
                                   "rerank": 2, "rank_by": "clip", "rank_weight": None,
                                   "upscale": "x4", "device": "cpu", "dtype": "float32"}
    assert results["prompts"] == [TEXT]
    assert set(results["timings_s"]) == {"load", "generate", "rerank", "upscale", "save", "total"}

    # the same chain through the library gives the same numbers and pixels
    pipe = load_pipeline(pipe_dir)
    from rudalle_pipe.clip import cherry_pick_by_clip
    from rudalle_pipe.generation import generate_images
    from rudalle_pipe.realesrgan import super_resolution

    gen = generate_images(TEXT, pipe.tokenizer, pipe.dalle, pipe.vae, top_k=50, top_p=0.995, num_images=3, seed=1,
                          progress=False)
    ranked = cherry_pick_by_clip(gen.images, TEXT, pipe.clip, progress=False, perplexities=gen.perplexities)
    candidates = results["candidates"]
    assert [c["seed"] for c in candidates] == [1, 2, 3]
    assert [c["perplexity"] for c in candidates] == pytest.approx(gen.perplexities, rel=1e-6)
    for rank, (i, clip_score, combined) in enumerate(zip(ranked.indices, ranked.clip_scores, ranked.combined)):
        assert candidates[i]["rank"] == rank + 1 and candidates[i]["prompt_index"] == 0  # every candidate scored
        assert candidates[i]["clip_score"] == pytest.approx(clip_score, abs=1e-6)
        assert candidates[i]["combined"] == pytest.approx(combined, abs=1e-5)
    images = results["images"]
    assert [im["file"] for im in images] == ["image_000.png", "image_001.png"]
    assert [im["index"] for im in images] == ranked.indices[:2] and [im["rank"] for im in images] == [1, 2]
    assert [im["prompt"] for im in images] == [TEXT, TEXT]
    assert [im["clip_score"] for im in images] == pytest.approx(ranked.scores[:2], abs=1e-6)
    assert images[0]["clip_score"] >= images[1]["clip_score"]
    for im in images:
        assert im["seed"] == 1 + im["index"]
        assert im["perplexity"] == candidates[im["index"]]["perplexity"]
        assert im["size"] == [4 * SIZE, 4 * SIZE]
        with Image.open(out / im["file"]) as saved:
            assert saved.format == "PNG" and saved.size == (4 * SIZE, 4 * SIZE)
            expected = super_resolution([gen.images[im["index"]]], pipe.upscaler, progress=False)[0]
            assert np.array_equal(np.asarray(saved), np.asarray(expected))
    with Image.open(out / "contact_sheet.png") as sheet:  # 3 candidates, 2 per row, each at least 256 px
        cell, pad, band = contact_sheet.cell_side(SIZE), contact_sheet.PADDING, contact_sheet.LABEL_HEIGHT
        assert cell >= 256 and sheet.size == (2 * cell + 3 * pad, 2 * (cell + band) + 3 * pad)
        pixels = np.asarray(sheet.convert("RGB"))
    for k in range(3):  # candidate k, in index order, enlarged by whole pixels
        top, left = pad + (k // 2) * (cell + band + pad), pad + (k % 2) * (cell + pad)
        expected = np.asarray(gen.images[k].resize((cell, cell), Image.NEAREST))
        assert np.array_equal(pixels[top:top + cell, left:left + cell], expected)
    top, left = pad + cell + band + pad, pad + cell + pad  # the fourth cell is empty: neutral grey
    assert (pixels[top:top + cell + band, left:left + cell] == contact_sheet.BACKGROUND).all()

    # a second run refuses before doing any work and leaves every file alone
    before = snapshot(out)
    code, stdout, stderr = run(capsys, *argv)
    assert code == EXIT_FAILURE
    assert stderr.count("\n") == 1 and "image_000.png" in stderr and "--overwrite" in stderr
    assert snapshot(out) == before

    code, _, stderr = run(capsys, *argv, "--overwrite")
    assert code == 0, stderr
    after = snapshot(out)
    assert after.keys() == before.keys()
    assert all(after[name][1] != before[name][1] for name in after)  # rewritten ...
    assert after["image_000.png"][0] == before["image_000.png"][0]  # ... with the same images


def test_no_rerank_no_upscale_keeps_generation_order(pipe_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = run(capsys, "generate", TEXT, "--model", pipe_dir, "--num-images", 2, "--rerank", 0,
                          "--upscale", "none", "--seed", 7, "--out", out, "--no-progress")
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text("utf-8"))
    assert [(im["index"], im["seed"], im["clip_score"], im["size"]) for im in results["images"]] == [
        (0, 7, None, [SIZE, SIZE]), (1, 8, None, [SIZE, SIZE])]
    assert results["settings"]["rerank"] == 0 and results["settings"]["upscale"] == "none"


def test_defaults_follow_what_the_pipeline_has(bare_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = run(capsys, "generate", TEXT, "--model", bare_dir, "--num-images", 2, "--out", out,
                          "--no-progress")
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text("utf-8"))  # no CLIP: ranked by perplexity
    assert results["settings"]["rerank"] == 2 and results["settings"]["upscale"] == "none"
    assert results["settings"]["rank_by"] == "perplexity"
    assert results["settings"]["seed"] is None and len({im["seed"] for im in results["images"]}) == 2
    assert [im["clip_score"] for im in results["images"]] == [None, None]
    assert [im["combined"] for im in results["images"]] == [None, None]
    assert [im["rank"] for im in results["images"]] == [1, 2]
    ppl = [im["perplexity"] for im in results["images"]]
    assert ppl == sorted(ppl) and sorted(im["index"] for im in results["images"]) == [0, 1]


@pytest.mark.parametrize("extra, message", [
    (["--upscale", "x8"], "--upscale x8: pipeline '{dir}' has no such upscaler; available: x4, none"),
    (["--top-p", "1.5"], "--top-p must be a finite number in (0, 1], got 1.5"),
    (["--top-k", "51"], "--top-k must be in [1, 50]"),
    (["--temperature", "0"], "--temperature must be a finite number > 0, got 0.0"),
    (["--num-images", "0"], "--num-images must be in [1, 4096], got 0"),
    (["--num-images", "2", "--rerank", "3"], "--rerank must be in [0, --num-images=2]"),
    (["--seed", "-1"], "--seed must be in [0, "),
    (["--top-p", "abc"], "argument --top-p: invalid float value: 'abc'"),
    (["--upscale", "x3"], "argument --upscale: invalid choice: 'x3'"),
    (["--device", "tpu9"], "--device 'tpu9' is not a device this torch can run on; valid choices: cpu"),
    (["--rank-by", "ppl"], "argument --rank-by: invalid choice: 'ppl' (choose from"),
    (["--rerank", "0", "--rank-by", "clip"], "--rank-by has no effect with --rerank 0"),
    (["--rerank", "0", "--rank-weight", "0.5"], "--rank-weight has no effect with --rerank 0"),
    (["--rank-weight", "0.5"], "--rank-weight is CLIP's share of the combined score; it needs --rank-by combined "
                               "(ranking by clip here)"),
    (["--rank-by", "combined", "--rank-weight", "1.5"], "--rank-weight must be a finite number in [0, 1], got 1.5"),
    (["--rank-by", "combined", "--rank-weight", "nan"], "--rank-weight must be a finite number in [0, 1], got nan"),
])
def test_usage_errors_are_one_line_exit_2(pipe_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "generate", TEXT, "--model", pipe_dir, "--out", out, *extra)
    assert code == EXIT_USAGE
    assert stderr.startswith("rudalle-pipe: error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert message.format(dir=pipe_dir) in stderr
    assert stdout == "" and not out.exists()


def test_hub_model_loads_the_requested_upscaler(pipe_dir, tmp_path, capsys, monkeypatch):
    """A Hub preset gets the --upscale factor passed to load_pipeline (which calls get_realesrgan);
    the loading itself is faked with the tiny pipeline, the rest of the chain is real."""
    import rudalle_pipe.pipeline
    from tiny import tiny_upscaler

    calls = []

    def fake_load(name, **kwargs):
        calls.append((name, kwargs))
        pipe = load_pipeline(pipe_dir, clip=False, upscaler=False)
        pipe.upscaler = tiny_upscaler(scale=int(kwargs["upscaler"][1:]))
        return pipe

    monkeypatch.setattr(rudalle_pipe.pipeline, "load_pipeline", fake_load)
    out = tmp_path / "out"
    code, _, stderr = run(capsys, "generate", TEXT, "--model", "Malevich", "--top-k", 50, "--num-images", 1,
                          "--rerank", 0, "--upscale", "x8", "--out", out, "--no-progress", "--cache-dir", tmp_path,
                          "--device", "cpu")  # asserted below, so not left to the machine's default
    assert code == 0, stderr
    assert calls == [("Malevich", {"device": "cpu", "dtype": torch.float32, "cache_dir": str(tmp_path),
                                   "clip": False, "upscaler": "x8"})]
    results = json.loads((out / "results.json").read_text("utf-8"))
    assert results["images"][0]["size"] == [8 * SIZE, 8 * SIZE] and results["settings"]["upscale"] == "x8"
    code, _, stderr = run(capsys, "generate", TEXT, "--model", "Malevich", "--top-k", 8193, "--out", out)
    assert code == EXIT_USAGE and "--top-k must be in [1, 8192]" in stderr  # checked before loading
    assert len(calls) == 1


def test_bundled_demo_is_the_default_model(bare_dir, tmp_path, capsys, monkeypatch):
    import rudalle_pipe.pipeline

    bundled = tmp_path / "weights"
    bundled.mkdir()
    (bundled / "demo").symlink_to(bare_dir, target_is_directory=True)
    monkeypatch.setattr(rudalle_pipe.pipeline, "BUNDLED_DIR", bundled)
    out = tmp_path / "out"
    code, _, stderr = run(capsys, "generate", TEXT, "--num-images", 1, "--out", out, "--no-progress")
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text("utf-8"))
    assert (results["model"], results["model_kind"]) == ("demo", "bundled")
    code, stdout, _ = run(capsys, "models")
    assert code == 0 and "default --model: demo" in stdout
    assert any(line.split()[:3] == ["demo", "pipeline", "(bundled)"] for line in stdout.splitlines())


def test_rank_by_clip_needs_a_clip(bare_dir, tmp_path, capsys):
    for by in ("clip", "combined"):
        code, _, stderr = run(capsys, "generate", TEXT, "--model", bare_dir, "--rank-by", by, "--out", tmp_path / "o")
        assert code == EXIT_USAGE and stderr.count("\n") == 1
        assert f"--rank-by {by}: pipeline '{bare_dir}' has no CLIP reranker; use --rank-by perplexity" in stderr
    code, _, stderr = run(capsys, "generate", TEXT, "--model", bare_dir, "--upscale", "x4", "--out", tmp_path / "o")
    assert code == EXIT_USAGE and "available: none" in stderr


def test_unknown_model_lists_valid_names(tmp_path, capsys):
    code, _, stderr = run(capsys, "generate", TEXT, "--model", "Picasso", "--out", tmp_path / "o")
    assert code == EXIT_USAGE and stderr.count("\n") == 1
    assert "unknown model 'Picasso'" in stderr and "Malevich, Malevich_v2, Emojich" in stderr
    code, _, stderr = run(capsys, "generate", TEXT, "--model", tmp_path, "--out", tmp_path / "o")
    assert code == EXIT_USAGE and "directory without pipeline.json" in stderr


def test_missing_weights_offline(offline_hub, tmp_path, capsys):
    argv = ["generate", TEXT, "--model", "Malevich", "--out", tmp_path / "o", "--no-progress"]
    code, stdout, stderr = run(capsys, *argv)
    assert code == EXIT_FAILURE
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert "'bpe.model'" in stderr and "shonenkov/rudalle-utils" in stderr and "HF_HUB_OFFLINE" in stderr
    assert "`rudalle-pipe models` shows what is cached" in stderr
    assert not (tmp_path / "o").exists()
    code, _, stderr = run(capsys, *argv, "-v")  # -v: the traceback, then the same one-line message
    assert code == EXIT_FAILURE and "Traceback" in stderr and "WeightsNotFoundError" in stderr
    assert stderr.splitlines()[-1].startswith("rudalle-pipe: error: Need 'bpe.model'")


def test_out_must_be_a_directory(pipe_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, stderr = run(capsys, "generate", TEXT, "--model", pipe_dir, "--out", tmp_path / "file")
    assert code == EXIT_FAILURE and "is not a directory" in stderr
    assert (tmp_path / "file").read_text() == "x"


def test_models_lists_presets_and_cache_state(offline_hub, fixtures_dir, capsys):
    add_to_hub_cache(offline_hub, "shonenkov/rudalle-utils", {"bpe.model": fixtures_dir / "tokenizer" / "bpe.model"})
    for argv in (["models"], ["models", "--cache-dir", str(offline_hub)]):
        code, stdout, stderr = run(capsys, *argv)
        assert code == 0 and stderr == ""
        rows = {line.split()[0]: line.split() for line in stdout.splitlines() if line.split()}
        for name in ("Malevich", "Malevich_v2", "Emojich", "Surrealist_XL", "Kandinsky", "vqgan", "vqgan_dwt",
                     "x2", "x4", "x8", "clip"):
            assert rows[name][-1] == "no", rows[name]
        assert rows["tokenizer"][1:] == ["tokenizer", "shonenkov/rudalle-utils", "bpe.model", "yes"]
        assert rows["Malevich"][2:4] == ["sberbank-ai/rudalle-Malevich", "pytorch_model_v3.bin"]
        assert rows["clip"][2] == "laion/CLIP-ViT-B-32-xlm-roberta-base-laion5B-s13B-b90k"
        assert str(offline_hub) in stdout and "default --model:" in stdout


def test_help_and_missing_verb(capsys):
    code, stdout, _ = run(capsys, "generate", "--help")
    assert code == 0 and "--rerank N" in stdout and "--upscale {x2,x4,x8,none}" in stdout
    assert "--rank-by {clip,perplexity,combined}" in stdout and "--rank-weight W" in stdout
    code, _, stderr = run(capsys)
    assert code == EXIT_USAGE and stderr.count("\n") == 1 and "COMMAND" in stderr


@pytest.mark.slow
def test_python_dash_m_entry_point(bare_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "rudalle_pipe", "generate", TEXT, "--model", str(bare_dir), "--num-images", "2",
            "--seed", "3", "--out", str(out), "--no-progress"]
    done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [im["seed"] for im in json.loads((out / "results.json").read_text("utf-8"))["images"]] == [3, 4]
    assert "wrote 2 images" in done.stdout
    again = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == EXIT_FAILURE
    assert again.stderr.count("\n") == 1 and again.stderr.startswith("rudalle-pipe: error: ")
    assert "image_000.png" in again.stderr
