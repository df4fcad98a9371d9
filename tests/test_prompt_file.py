"""``rudalle-pipe generate --prompts FILE``: checking the file, seeds, resume, and 2 processes = 1 process."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from rudalle_pipe import cli_generate
from rudalle_pipe.cli import EXIT_USAGE, main
from rudalle_pipe.prompt_file import PromptSpec, assign_seeds, prompt_folder, read_prompts
from test_distributed import ACCELERATE_2, run

PROMPTS = "красный круг\nсиний квадрат\n\nзелёный треугольник\nжёлтая звезда\n"
FAST = ["--model", "demo", "--num-images", "2", "--upscale", "none", "--no-progress", "--device", "cpu"]


def tree(out: Path) -> dict[str, bytes]:
    """Every output that must not depend on the process count (per-prompt results.json hold timings)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("results.json", "run.json")}


def test_prompt_files_are_checked_line_by_line(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text(PROMPTS, encoding="utf-8")
    specs = read_prompts(text, num_images=3, guidance_scale=1.0, negative_prompt=None)
    assert [(s.index, s.line, s.text) for s in specs] == [(0, 1, "красный круг"), (1, 2, "синий квадрат"),
                                                          (2, 4, "зелёный треугольник"), (3, 5, "жёлтая звезда")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"text": "круг", "num_images": 2, "seed": 100}\n{"text": "квадрат", "guidance_scale": 3, '
                     '"negative_prompt": "красный"}\n{"text": "звезда"}\n', encoding="utf-8")
    specs = read_prompts(jsonl, num_images=4, guidance_scale=1.0, negative_prompt=None)
    assert specs[1] == PromptSpec(1, 2, "квадрат", 4, None, "красный", 3)
    # a prompt's own seed stays its own; the others count images from the base seed, never a rank
    assert assign_seeds(specs, 7) == [100, 7 + 2, 7 + 2 + 4]
    assert prompt_folder(specs[0], 3) == "0000-круг" and prompt_folder(specs[2], 12345) == "00002-звезда"
    bad = {'{"text": "круг", "num_images": 0}': r"p\.jsonl:2: num_images must be in \[1, 4096\], got 0",
           '{"text": "круг", "colour": "red"}': r":2: unknown keys \['colour'\]; valid: \['text'",
           '{"text": ""}': r":2: 'text' must be a non-empty string, got ''",
           '{"text": "круг", "negative_prompt": "синий"}': r":2: negative_prompt 'синий' has no effect without guidance",
           '{"text": "круг", "guidance_scale": "high"}': r":2: guidance_scale must be a finite number, got 'high'",
           '{"text": "круг", "seed": -1}': r":2: seed must be in \[0, ",
           '["круг"]': r":2: expected a JSON object",
           '{"text": "круг"': r":2: not a JSON object"}
    for line, message in bad.items():
        jsonl.write_text('{"text": "ok"}\n' + line + "\n", encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            read_prompts(jsonl, num_images=1, guidance_scale=1.0, negative_prompt=None)


def test_a_bad_prompt_file_stops_before_any_model_loads(tmp_path, capsys, monkeypatch):
    from rudalle_pipe import pipeline

    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "круг"}\n{"text": "квадрат", "num_images": 2.5}\n', encoding="utf-8")
    code = main(["generate", "--prompts", str(prompts), "--out", str(tmp_path / "out"), *FAST])
    assert code == EXIT_USAGE
    assert "p.jsonl:2: num_images must be an int [1, 4096], got 2.5 (float)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["generate", "круг", "--prompts", str(prompts), *FAST]) == EXIT_USAGE  # TEXT or --prompts
    assert "not both" in capsys.readouterr().err
    # a folder holding the user's files (and no run.json) is never written into
    prompts.write_text('{"text": "круг"}\n', encoding="utf-8")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["generate", "--prompts", str(prompts), "--out", str(mine), *FAST]) == 1
    assert "is not empty and holds no run.json" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_an_interrupted_prompt_run_resumes_to_the_same_bytes(tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    straight = tmp_path / "straight"
    assert main(["generate", "--prompts", str(prompts), "--out", str(straight), *FAST]) == 0  # no --seed
    base = json.loads((straight / "run.json").read_text())["base_seed"]
    # the same run, stopped while drawing the third prompt; a half-written image is left there, as a kill would
    resumed = tmp_path / "resumed"
    real, calls = cli_generate.run_chain, []

    def stopping(*args, **kwargs):
        calls.append(args[4])
        if len(calls) == 3:
            args[4].mkdir(parents=True)
            (args[4] / "image_000.png").write_bytes(b"\x89PNG half")
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cli_generate, "run_chain", stopping)
    assert main(["generate", "--prompts", str(prompts), "--out", str(resumed), "--seed", str(base), *FAST]) == 130
    assert len((resumed / "results.jsonl").read_text().splitlines()) == 2  # the two finished prompts
    monkeypatch.setattr(cli_generate, "run_chain", real)
    # the rerun (without --seed: it reuses the recorded base seed) redoes prompts 2 and 3 only
    done = []
    monkeypatch.setattr(cli_generate, "run_chain", lambda *a, **k: (done.append(a[4].name), real(*a, **k))[1])
    assert main(["generate", "--prompts", str(prompts), "--out", str(resumed), *FAST]) == 0
    assert done == ["0002-зелёный-треугольник", "0003-жёлтая-звезда"]
    assert tree(resumed) == tree(straight)
    assert json.loads((resumed / "run.json").read_text())["base_seed"] == base
    assert "wrote 4 images for 2 of 4 prompts to" in capsys.readouterr().out
    # a third run finds nothing to do and says so, drawing nothing
    done.clear()
    assert main(["generate", "--prompts", str(prompts), "--out", str(resumed), *FAST]) == 0
    assert done == [] and "nothing to do" in capsys.readouterr().out and tree(resumed) == tree(straight)
    # another setting in the same folder is refused, naming it
    code = main(["generate", "--prompts", str(prompts), "--out", str(resumed), *FAST, "--num-images", "3"])
    assert code == 1 and "'num_images': (2, 3)" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_write_the_same_images_and_manifest_as_one(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "красный круг"}\n{"text": "синий квадрат", "num_images": 3}\n'
                       '{"text": "зелёный треугольник", "seed": 42}\n{"text": "жёлтая звезда", "num_images": 1}\n'
                       '{"text": "белый круг", "guidance_scale": 2.0, "negative_prompt": "чёрный"}\n', encoding="utf-8")
    argv = ["-m", "rudalle_pipe", "generate", "--prompts", str(prompts), "--seed", "11", *FAST]
    run([sys.executable, *argv, "--out", str(tmp_path / "one")], tmp_path)
    run([*ACCELERATE_2, *argv, "--out", str(tmp_path / "two")], tmp_path)
    one, two = tree(tmp_path / "one"), tree(tmp_path / "two")
    assert json.loads((tmp_path / "one" / "run.json").read_text())["world_size"] == 1
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    assert sum(name.endswith("image_000.png") for name in one) == 5
    assert one.keys() == two.keys() and all(one[k] == two[k] for k in one)
    manifest = [json.loads(line) for line in (tmp_path / "two" / "results.jsonl").read_text().splitlines()]
    # base + the images of every prompt before (an own seed too); prompt 2 keeps its own
    assert [m["seed"] for m in manifest] == [11, 13, 42, 18, 19]
