"""``rudalle-pipe generate`` ranking flags (--rank-by, --rank-weight), several TEXT prompts, and the
scores in results.json; tiny saved pipelines, offline."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import rudalle_pipe.generation as generation
import rudalle_pipe.pipeline as pipeline
from rudalle_pipe import contact_sheet
from rudalle_pipe.cli import EXIT_FAILURE, EXIT_USAGE, main
from rudalle_pipe.pipeline import load_pipeline, save_pipeline
from tiny import tiny_pipeline

TEXT, OTHER = "рыжий котик", "синий круг"


@pytest.fixture(scope="module")
def pipe_dir(fixtures_dir, tmp_path_factory) -> Path:
    """A saved pipeline with CLIP, without upscaler."""
    tmp = tmp_path_factory.mktemp("pipe")
    return save_pipeline(tiny_pipeline(fixtures_dir, tmp, upscaler=False), tmp / "tiny")


@pytest.fixture(scope="module")
def library(pipe_dir):
    return load_pipeline(pipe_dir, upscaler=False)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def results_of(out: Path) -> dict:
    return json.loads((out / "results.json").read_text("utf-8"))


def generate(pipe, text, seed, n):
    return generation.generate_images(text, pipe.tokenizer, pipe.dalle, pipe.vae, top_k=50, top_p=0.995,
                                      num_images=n, seed=seed, progress=False)


def test_rank_by_perplexity_skips_clip_and_sorts_ascending(pipe_dir, library, tmp_path, capsys, monkeypatch):
    loads = []
    real = pipeline.load_pipeline
    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: loads.append(k) or real(*a, **k))
    out = tmp_path / "out"
    code, _, stderr = run(capsys, "generate", TEXT, "--model", pipe_dir, "--num-images", 4, "--rerank", 3,
                          "--rank-by", "perplexity", "--seed", 2, "--out", out, "--no-progress")
    assert code == 0, stderr
    assert [k["clip"] for k in loads] == [False]  # the CLIP is not loaded for perplexity ranking
    results = results_of(out)
    ppl = generate(library, TEXT, 2, 4).perplexities
    order = sorted(range(4), key=lambda i: ppl[i])
    assert [im["index"] for im in results["images"]] == order[:3]
    assert [im["rank"] for im in results["images"]] == [1, 2, 3]
    assert [c["rank"] for c in results["candidates"]] == [order.index(i) + 1 for i in range(4)]
    assert [c["perplexity"] for c in results["candidates"]] == pytest.approx(ppl, rel=1e-6)
    assert all(c["clip_score"] is None and c["combined"] is None for c in results["candidates"])
    assert results["settings"]["rank_by"] == "perplexity" and results["settings"]["rank_weight"] is None


def test_rank_by_combined_weight_endpoints(pipe_dir, tmp_path, capsys):
    runs = {}
    for name, extra in (("clip", ["--rank-by", "clip"]), ("ppl", ["--rank-by", "perplexity"]),
                        ("w1", ["--rank-by", "combined", "--rank-weight", 1]),
                        ("w0", ["--rank-by", "combined", "--rank-weight", 0]), ("half", ["--rank-by", "combined"])):
        out = tmp_path / name
        code, _, stderr = run(capsys, "generate", TEXT, "--model", pipe_dir, "--num-images", 6, "--seed", 0,
                              "--out", out, "--no-progress", *extra)
        assert code == 0, stderr
        runs[name] = results_of(out)
    order = {name: [im["index"] for im in r["images"]] for name, r in runs.items()}
    assert order["clip"] != order["ppl"]  # otherwise the endpoints prove nothing
    assert order["w1"] == order["clip"] and order["w0"] == order["ppl"]
    half = runs["half"]
    assert half["settings"]["rank_by"] == "combined" and half["settings"]["rank_weight"] is None  # default 0.5
    combined = [im["combined"] for im in half["images"]]
    assert combined == sorted(combined, reverse=True)
    cands = half["candidates"]
    clip = np.array([c["clip_score"] for c in cands])
    neg_log = -np.log([c["perplexity"] for c in cands])
    expected = 0.5 * (clip - clip.mean()) / clip.std() + 0.5 * (neg_log - neg_log.mean()) / neg_log.std()
    assert [c["combined"] for c in cands] == pytest.approx(expected.tolist(), abs=1e-4)
    assert runs["w1"]["settings"]["rank_weight"] == 1.0
    assert [c["combined"] for c in runs["clip"]["candidates"]] == pytest.approx([c["combined"] for c in cands])


def test_several_prompts(pipe_dir, library, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "generate", TEXT, OTHER, "--model", pipe_dir, "--num-images", 3,
                               "--rerank", 2, "--seed", 5, "--out", out, "--no-progress")
    assert code == 0, stderr
    assert "wrote 4 images" in stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "contact_sheet.png", "prompt00_image_000.png", "prompt00_image_001.png", "prompt01_image_000.png",
        "prompt01_image_001.png", "results.json"]
    results = results_of(out)
    assert results["prompts"] == [TEXT, OTHER] and results["text"] is None
    cands = results["candidates"]
    assert [(c["prompt_index"], c["seed"]) for c in cands] == [(0, 5), (0, 6), (0, 7), (1, 8), (1, 9), (1, 10)]
    for i, text in enumerate((TEXT, OTHER)):  # seed + i * num_images + j, as generate_images documents
        gen = generate(library, text, 5 + 3 * i, 3)
        assert [c["perplexity"] for c in cands[3 * i:3 * i + 3]] == pytest.approx(gen.perplexities, rel=1e-6)
        mine = sorted(cands[3 * i:3 * i + 3], key=lambda c: c["rank"])  # ranked within the prompt
        assert [c["rank"] for c in mine] == [1, 2, 3]
        assert [c["clip_score"] for c in mine] == sorted([c["clip_score"] for c in mine], reverse=True)
        images = [im for im in results["images"] if im["prompt_index"] == i]
        assert [im["file"] for im in images] == [f"prompt{i:02d}_image_000.png", f"prompt{i:02d}_image_001.png"]
        assert [im["index"] for im in images] == [c["index"] for c in mine[:2]]
        assert all(im["prompt"] == text for im in images)
        for im in images:
            with Image.open(out / im["file"]) as saved:
                expected = gen.images[im["index"] - 3 * i]
                assert np.array_equal(np.asarray(saved), np.asarray(expected))
    with Image.open(out / "contact_sheet.png") as sheet:  # all 6 candidates, 3 per row
        assert sheet.size == contact_sheet.sheet_size(6, 32)


def test_overwrite_replaces_only_what_a_run_wrote(pipe_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["generate", "--model", pipe_dir, "--num-images", 2, "--seed", 1, "--out", out, "--no-progress"]
    code, _, stderr = run(capsys, *base[:1], TEXT, OTHER, *base[1:])
    assert code == 0, stderr
    (out / "notes.txt").write_text("mine")
    code, _, stderr = run(capsys, *base[:1], TEXT, *base[1:])
    assert code == EXIT_FAILURE and "results.json already exists" in stderr and "--overwrite" in stderr
    code, _, stderr = run(capsys, *base[:1], TEXT, *base[1:], "--overwrite")  # one prompt replaces two
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["contact_sheet.png", "image_000.png", "image_001.png",
                                                     "notes.txt", "results.json"]
    (out / "prompt01_image_000.png").write_bytes(b"a user's file with a run's name")  # no results.json lists it
    code, _, stderr = run(capsys, *base[:1], TEXT, OTHER, *base[1:], "--overwrite")
    assert code == EXIT_FAILURE and "prompt01_image_000.png exists and no results.json" in stderr
    assert (out / "prompt01_image_000.png").read_bytes() == b"a user's file with a run's name"
    assert (out / "notes.txt").read_text() == "mine" and (out / "image_000.png").exists()


@pytest.mark.parametrize("texts, extra, message", [
    ([TEXT, ""], [], "TEXT 2 is empty"),
    ([TEXT, OTHER], ["--num-images", 2049], "--num-images (2049) x 2 TEXTs must be in [1, 4096], got 4098"),
    ([TEXT, OTHER, TEXT], ["--num-images", 4, "--seed", 2**63 - 1 - 8],
     f"--seed must be in [0, {2**63 - 1 - 12}]"),
])
def test_several_prompts_usage_errors(pipe_dir, tmp_path, capsys, monkeypatch, texts, extra, message):
    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "generate", *texts, "--model", pipe_dir, "--out", out, *extra)
    assert code == EXIT_USAGE and stderr.count("\n") == 1 and message in stderr, stderr
    assert stdout == "" and not out.exists()


def test_non_finite_perplexity_cannot_rank_by_perplexity(pipe_dir, tmp_path, capsys, monkeypatch):
    real = generation.generate_images

    def with_nan(*args, **kwargs):
        gen = real(*args, **kwargs)
        gen.perplexities[1] = float("nan")
        return gen

    monkeypatch.setattr(generation, "generate_images", with_nan)
    out = tmp_path / "out"
    argv = ["generate", TEXT, "--model", pipe_dir, "--num-images", 2, "--out", out, "--no-progress"]
    code, _, stderr = run(capsys, *argv, "--rank-by", "perplexity")
    assert code == EXIT_FAILURE and stderr.splitlines()[-1] == (
        f"rudalle-pipe: error: the generator gave a non-finite perplexity for a candidate of prompt 0 ({TEXT!r}), "
        "so it cannot rank by perplexity; use --rank-by clip")
    assert not out.exists()
    code, _, stderr = run(capsys, *argv, "--rank-by", "clip")  # CLIP ranks; that candidate has no perplexity
    assert code == 0, stderr
    cands = results_of(out)["candidates"]
    assert cands[1]["perplexity"] is None and all(c["combined"] is None for c in cands)
    assert sorted(c["rank"] for c in cands) == [1, 2]


def test_guidance_flags_reach_generate_images(pipe_dir, library, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = run(capsys, "generate", TEXT, "--model", pipe_dir, "--num-images", 2, "--seed", 3,
                          "--guidance-scale", 3, "--negative-prompt", OTHER, "--rerank", 0, "--out", out,
                          "--no-progress")
    assert code == 0, stderr
    results = results_of(out)
    assert results["settings"]["guidance_scale"] == 3.0 and results["settings"]["negative_prompt"] == OTHER
    guided = generation.generate_images(TEXT, library.tokenizer, library.dalle, library.vae, top_k=50, top_p=0.995,
                                        num_images=2, seed=3, progress=False, guidance_scale=3.0,
                                        negative_prompt=OTHER)
    plain = generate(library, TEXT, 3, 2)
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(guided.images, plain.images))
    assert [c["perplexity"] for c in results["candidates"]] == pytest.approx(guided.perplexities, rel=1e-6)
    for im in results["images"]:
        with Image.open(out / im["file"]) as saved:
            assert np.array_equal(np.asarray(saved), np.asarray(guided.images[im["index"]]))
    code, _, stderr = run(capsys, "generate", TEXT, "--model", pipe_dir, "--num-images", 2, "--seed", 3,
                          "--rerank", 0, "--out", tmp_path / "plain", "--no-progress")
    assert code == 0, stderr
    settings = results_of(tmp_path / "plain")["settings"]
    assert settings["guidance_scale"] == 1.0 and settings["negative_prompt"] is None


@pytest.mark.parametrize("extra, message", [
    (["--negative-prompt", OTHER], f"--negative-prompt {OTHER!r} has no effect without guidance (--guidance-scale 1)"),
    (["--guidance-scale", "2", "--negative-prompt", "  "], "--negative-prompt is blank"),
    (["--guidance-scale", "0"], "--guidance-scale must be a finite number in (0, "),
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number in (0, "),
    (["--guidance-scale", "1e9"], "--guidance-scale must be a finite number in (0, "),
    (["--guidance-scale", "x"], "argument --guidance-scale: invalid float value: 'x'"),
])
def test_guidance_usage_errors(pipe_dir, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "generate", TEXT, "--model", pipe_dir, "--out", out, *extra)
    assert code == EXIT_USAGE and stderr.count("\n") == 1 and message in stderr, stderr
    assert stdout == "" and not out.exists()
