"""Out-of-vocabulary prompts: a pipeline's word list (pipeline.json "vocabulary"), the tokenizer's
unknown_words, the warning of generate_images and its one line in the CLI; offline, tiny models."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rudalle_pipe.cli import main
from rudalle_pipe.generation import generate_images
from rudalle_pipe.pipeline import load_pipeline, save_pipeline
from rudalle_pipe.tokenizer import MAX_VOCABULARY_WORDS, YTTMTokenizer, check_word_list, text_words
from tiny import tiny_pipeline

WORDS = ["красный", "квадрат", "слева", "на", "белом", "фоне"]


@pytest.fixture(scope="module")
def tokenizer(fixtures_dir) -> YTTMTokenizer:
    return YTTMTokenizer.from_file(Path(fixtures_dir) / "tokenizer" / "bpe.model")


@pytest.fixture(scope="module")
def vocab_dir(fixtures_dir, tmp_path_factory) -> Path:
    """A saved tiny pipeline (no CLIP, no upscaler) that carries a vocabulary."""
    tmp = tmp_path_factory.mktemp("vocab")
    pipe = tiny_pipeline(fixtures_dir, tmp, clip=False, upscaler=False)
    pipe.tokenizer.vocabulary = WORDS
    return save_pipeline(pipe, tmp / "pipe")


def test_text_words_and_unknown_words(tokenizer):
    assert text_words("  Красный КВАДРАТ, слева-на белом фоне! 3д ") == [
        "красный", "квадрат", "слева", "на", "белом", "фоне", "3д"]
    assert tokenizer.vocabulary is None and tokenizer.unknown_words("рыжий котик") == []  # no list: nothing flagged
    tokenizer.vocabulary = WORDS
    try:
        assert tokenizer.vocabulary == frozenset(WORDS)
        assert tokenizer.unknown_words("Рыжий котик слева, рыжий КОТИК на жёлтом фоне") == ["рыжий", "котик", "жёлтом"]
        assert tokenizer.unknown_words("красный квадрат слева на белом фоне") == []
        with pytest.raises(TypeError, match="text must be a str"):
            tokenizer.unknown_words(5)
    finally:
        tokenizer.vocabulary = None


@pytest.mark.parametrize("words, error, pattern", [
    ("красный квадрат", TypeError, "vocabulary must be a list of lowercase words, got str"),
    ({"красный": 1}, TypeError, "vocabulary must be a list of lowercase words, got dict"),
    (["красный", 5], TypeError, r"vocabulary\[1\] must be a str, got int"),
    (["красный", "Квадрат"], ValueError, r"vocabulary\[1\] = 'Квадрат' is not one lowercase word"),
    (["в центре"], ValueError, r"vocabulary\[0\] = 'в центре' is not one lowercase word"),
    (["квадрат,"], ValueError, "is not one lowercase word"),
    ([""], ValueError, "is not one lowercase word"),
    (["а" * 65], ValueError, "at most 64 characters"),
    (["а"] * (MAX_VOCABULARY_WORDS + 1), ValueError, f"at most {MAX_VOCABULARY_WORDS} are allowed"),
])
def test_bad_word_lists(tokenizer, words, error, pattern):
    with pytest.raises(error, match=pattern):
        check_word_list(words)
    with pytest.raises(error, match=pattern):
        tokenizer.vocabulary = words
    assert tokenizer.vocabulary is None


def test_pipeline_json_round_trip(vocab_dir, tmp_path):
    meta = json.loads((vocab_dir / "pipeline.json").read_text("utf-8"))
    assert meta["vocabulary"] == sorted(WORDS)
    pipe = load_pipeline(vocab_dir, clip=False, upscaler=False)
    assert pipe.tokenizer.vocabulary == frozenset(WORDS)
    again = save_pipeline(pipe, tmp_path / "again")
    assert (again / "pipeline.json").read_bytes() == (vocab_dir / "pipeline.json").read_bytes()
    pipe.tokenizer.vocabulary = None
    bare = save_pipeline(pipe, tmp_path / "bare")
    assert "vocabulary" not in json.loads((bare / "pipeline.json").read_text("utf-8"))
    assert load_pipeline(bare, clip=False, upscaler=False).tokenizer.vocabulary is None


@pytest.mark.parametrize("value, pattern", [
    ("квадрат", "'vocabulary' must be a list of lowercase words, got str"),
    (["квадрат", "Круг"], r"'vocabulary'\[1\] = 'Круг' is not one lowercase word"),
])
def test_bad_vocabulary_in_pipeline_json_fails_before_loading_weights(vocab_dir, tmp_path, monkeypatch, value,
                                                                      pattern):
    import shutil

    import rudalle_pipe.pipeline

    folder = Path(shutil.copytree(vocab_dir, tmp_path / "pipe"))
    meta = json.loads((folder / "pipeline.json").read_text("utf-8")) | {"vocabulary": value}
    (folder / "pipeline.json").write_text(json.dumps(meta, ensure_ascii=False), "utf-8")

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before pipeline.json was checked")

    monkeypatch.setattr(rudalle_pipe.pipeline.DalleModel, "from_pretrained", no_weights)
    with pytest.raises((TypeError, ValueError), match=pattern) as info:
        load_pipeline(folder, clip=False, upscaler=False)
    assert "pipeline.json" in str(info.value)


def test_generate_images_warns_naming_unknown_words_and_prompt(vocab_dir, caplog):
    pipe = load_pipeline(vocab_dir, clip=False, upscaler=False)
    args = dict(top_k=10, top_p=1.0, num_images=1, seed=0, progress=False)
    with caplog.at_level(logging.WARNING, logger="rudalle_pipe"):
        generate_images("Рыжий котик слева, рыжий", pipe.tokenizer, pipe.dalle, pipe.vae, **args)
    [record] = caplog.records
    assert record.levelno == logging.WARNING and record.name == "rudalle_pipe.generation"
    assert record.getMessage() == ("prompt 'Рыжий котик слева, рыжий' has words the generator was not trained on: "
                                   "рыжий, котик")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rudalle_pipe"):
        generate_images("красный квадрат слева", pipe.tokenizer, pipe.dalle, pipe.vae, **args)
    assert caplog.records == []
    with caplog.at_level(logging.WARNING, logger="rudalle_pipe"):  # a prompt list: one line per prompt that needs it
        generate_images(["синий круг", "красный квадрат", "круг слева"], pipe.tokenizer, pipe.dalle, pipe.vae, **args)
    assert [r.getMessage() for r in caplog.records] == [
        "prompt 'синий круг' has words the generator was not trained on: синий, круг",
        "prompt 'круг слева' has words the generator was not trained on: круг"]


def test_cli_prints_the_warning_as_one_line(vocab_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["generate", "рыжий\nкотик слева", "--model", str(vocab_dir), "--num-images", "1", "--seed", "0",
                 "--out", str(out), "--no-progress"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert stderr.startswith("WARNING rudalle_pipe.generation: prompt 'рыжий\\nкотик слева' has words the generator "
                             "was not trained on: рыжий, котик")
    assert "wrote 1 image" in stdout
    code = main(["generate", "красный квадрат", "--model", str(vocab_dir), "--num-images", "1", "--seed", "0",
                 "--out", str(tmp_path / "out2"), "--no-progress"])
    assert code == 0 and capsys.readouterr().err == ""
