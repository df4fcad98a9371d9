"""Tests of the pure-Python YTTM tokenizer: fixture cases of the original, parity with youtokentome."""
from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import pytest
import torch

from conftest import import_reference
from rudalle_pipe.tokenizer import YTTMTokenizer, prepare_text

CYR_LOWER = "абвгдеёжзийклмнопрстуфхцчшщъыьэюя"
CYR_UPPER = CYR_LOWER.upper()
LATIN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
DIGITS = "0123456789"
PUNCT = ".,!?-:;()\"'«»—…/#%&*+="
EMOJI = ["🦔", "😀", "🐱", "❤️", "👍🏽", "🇷🇺", "🌲"]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\v", "\f", " \t\n ", "\u2581"]
ODD_CHARS = ["\u00a0", "\u2000", "\u3000", "\x1c", "\x85", "\x00", "\u200b", "\ufeff"]  # not yttm separators
WORDS = (
    "рыжий котик кот собака лиса в лесу озеро горах а рядом красивый олень пьёт воду ёжик тумане "
    "старый дом зелёный круг на синем фоне красный дракон летит над городом ночью звёзды небо "
    "портрет девушки картина маслом море закат пляж пальмы яблоко стол книга машина дорога снег "
    "зимний вечер мост река облака солнце цветы поле трава птица ворона медведь берёза сосна "
    "москва кремль улица фонарь аптека человек робот космос планета луна"
).split()
SYLLABLES = [c + v for c in "бвгджзклмнпрстфхцчшщ" for v in "аеёиоуыэюя"]


def random_word(rng: random.Random, odd: bool = True) -> str:
    """A Russian-looking word: a real one, a made-up one from syllables, or (if ``odd``) one with emoji etc."""
    kind = rng.random()
    if kind < 0.45:
        word = rng.choice(WORDS)
    elif kind < 0.75:
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))
    elif kind < 0.85:
        word = "".join(rng.choice(LATIN) for _ in range(rng.randint(1, 8)))
    else:
        pool = [CYR_LOWER, CYR_UPPER, LATIN, DIGITS, PUNCT]
        word = "".join(rng.choice(rng.choice(pool)) for _ in range(rng.randint(1, 10)))
    r = rng.random()
    if r < 0.1:
        word = word.capitalize()
    elif r < 0.15:
        word = word.upper()
    if rng.random() < 0.15:
        word += rng.choice(PUNCT)
    if odd and rng.random() < 0.05:
        word = rng.choice(EMOJI + ODD_CHARS) + word
    if odd and rng.random() < 0.05:
        pos = rng.randint(0, len(word))
        word = word[:pos] + rng.choice(EMOJI + ODD_CHARS + list(DIGITS)) + word[pos:]
    return word


def random_text(rng: random.Random) -> str:
    """Mostly words separated by whitespace runs; also empty, whitespace-only, char soup and long texts."""
    kind = rng.random()
    if kind < 0.03:
        return ""
    if kind < 0.06:
        return "".join(rng.choice(SPACES) for _ in range(rng.randint(1, 4)))
    if kind < 0.16:
        soup = CYR_LOWER + CYR_UPPER + LATIN + DIGITS + PUNCT + "".join(EMOJI + SPACES + ODD_CHARS)
        return "".join(rng.choice(soup) for _ in range(rng.randint(1, 40)))
    n_words = rng.randint(150, 400) if kind < 0.19 else rng.randint(1, 15)
    parts = [rng.choice(SPACES) if rng.random() < 0.3 else ""]  # sometimes leading whitespace
    for _ in range(n_words):
        parts += [random_word(rng), " " if rng.random() < 0.8 else rng.choice(SPACES)]
    if rng.random() < 0.6:
        parts.pop()  # sometimes trailing whitespace
    return "".join(parts)


@pytest.fixture(scope="module")
def fixture_model(fixtures_dir: Path) -> Path:
    return fixtures_dir / "tokenizer" / "bpe.model"


@pytest.fixture(scope="module")
def tokenizer(fixture_model: Path) -> YTTMTokenizer:
    return YTTMTokenizer.from_file(fixture_model)


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> Path:
    """A yttm BPE model with 1500 tokens, trained on a generated Russian/Latin corpus without emoji."""
    yttm = import_reference("youtokentome")
    rng = random.Random(1234)
    lines = []
    for _ in range(6000):
        line = " ".join(random_word(rng, odd=False) for _ in range(rng.randint(3, 12)))
        lines.append(line.lower() if rng.random() < 0.7 else line)
    folder = tmp_path_factory.mktemp("bpe")
    (folder / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    yttm.BPE.train(data=str(folder / "corpus.txt"), model=str(folder / "bpe.model"), vocab_size=1500, n_threads=1)
    return folder / "bpe.model"


# --- the original wrapper's outputs -------------------------------------------------------------


def test_fixture_cases(tokenizer: YTTMTokenizer, fixtures_dir: Path) -> None:
    data = json.loads((fixtures_dir / "tokenizer" / "cases.json").read_text(encoding="utf-8"))
    assert len(data["cases"]) == 16
    assert tokenizer.vocab_size == data["vocab_size"] == 229
    for case in data["cases"]:
        ids = tokenizer.encode_text(case["text"], case["text_seq_length"])
        assert ids.dtype == torch.long and ids.shape == (case["text_seq_length"],)
        assert ids.tolist() == case["ids"], case["text"]
        assert tokenizer.decode_text(ids) == case["decoded"], case["text"]
        assert tokenizer.decode_text(case["ids"]) == case["decoded"], case["text"]


def test_special_ids_and_padding(tokenizer: YTTMTokenizer) -> None:
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    raw = tokenizer.encode("рыжий котик")
    assert tokenizer.encode_text("рыжий котик", len(raw) + 4).tolist() == [2, *raw, 3, 0, 0]
    assert tokenizer.encode_text("рыжий котик", len(raw) + 2).tolist() == [2, *raw, 3]
    assert tokenizer.encode_text("рыжий котик", len(raw) + 1).tolist() == [2, *raw]  # cut drops EOS
    assert tokenizer.encode_text("рыжий котик", 2).tolist() == [2, raw[0]]


def test_prepare_text() -> None:
    assert prepare_text("  Рыжий КОТИК\t\n") == "рыжий котик"
    assert prepare_text("ЁЖИК") == "ёжик"
    with pytest.raises(TypeError, match="bytes"):
        prepare_text(b"text")


# --- parity with youtokentome -------------------------------------------------------------------


def check_parity(model_path: Path, seed: int, n_texts: int) -> None:
    yttm = import_reference("youtokentome")
    reference = yttm.BPE(str(model_path), n_threads=1)
    ours = YTTMTokenizer.from_file(model_path)
    assert ours.vocab_size == reference.vocab_size()
    rng = random.Random(seed)
    texts = [random_text(rng) for _ in range(n_texts)]
    assert sum(len(t) > 1000 for t in texts) > 50 and texts.count("") > 50
    expected = reference.encode(texts, output_type=yttm.OutputType.ID)
    n_unk = 0
    for text, want in zip(texts, expected):
        got = ours.encode(text)
        assert got == want, repr(text)
        n_unk += got.count(ours.unk_id)
    assert n_unk > 1000  # unknown characters were exercised
    assert max(max(ids, default=0) for ids in expected) > 0.9 * ours.vocab_size  # so were late merges

    # decoding as the original wrapper does it: bos + ids + eos + padding, ignoring ids 0-3
    padded = [[2, *ids, 3, 0, 0] for ids in expected]
    decoded = reference.decode(padded, ignore_ids=[0, 1, 2, 3])
    for ids, want in zip(padded, decoded):
        assert ours.decode_text(ids) == want
        assert ours.decode_text(torch.tensor(ids)) == want
    # and arbitrary id sequences, e.g. ones that start with a bare '▁' or with unk
    sequences = [[rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 30))] for _ in range(2000)]
    for ids, want in zip(sequences, reference.decode(sequences, ignore_ids=[0, 1, 2, 3])):
        assert ours.decode_text(ids) == want


@pytest.mark.slow
def test_parity_with_youtokentome_fixture_model(fixture_model: Path) -> None:
    check_parity(fixture_model, seed=0, n_texts=10_000)


@pytest.mark.slow
def test_parity_with_youtokentome_trained_model(trained_model: Path) -> None:
    check_parity(trained_model, seed=1, n_texts=10_000)


def test_save_round_trip(trained_model: Path, tmp_path: Path) -> None:
    yttm = import_reference("youtokentome")
    original = YTTMTokenizer.from_file(trained_model)
    original.save(tmp_path / "copy.model")
    assert (tmp_path / "copy.model").read_text() == trained_model.read_text()
    copy = YTTMTokenizer.from_file(tmp_path / "copy.model")
    reference = yttm.BPE(str(tmp_path / "copy.model"))  # youtokentome reads what we write
    rng = random.Random(7)
    texts = [random_text(rng) for _ in range(300)]
    for text, want in zip(texts, reference.encode(texts, output_type=yttm.OutputType.ID)):
        assert copy.encode(text) == original.encode(text) == want
        assert copy.encode_text(text, 64).equal(original.encode_text(text, 64))


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [None, b"bytes", 5, ["list"]])
def test_non_str_text(tokenizer: YTTMTokenizer, text) -> None:
    with pytest.raises(TypeError, match=type(text).__name__):
        tokenizer.encode(text)
    with pytest.raises(TypeError, match=type(text).__name__):
        tokenizer.encode_text(text, 16)


def test_pickle_and_cache(tokenizer: YTTMTokenizer) -> None:
    text = "рыжий котик и рыжий кот"
    first = tokenizer.encode(text)
    assert tokenizer.encode(text) == first  # second call is served from the word cache
    copy = pickle.loads(pickle.dumps(tokenizer))  # e.g. for DataLoader workers
    assert copy.encode(text) == first and copy.vocab_size == tokenizer.vocab_size


def test_lone_surrogate(tokenizer: YTTMTokenizer) -> None:
    with pytest.raises(ValueError, match="surrogate"):
        tokenizer.encode("кот\ud800")


@pytest.mark.parametrize(
    "length, error", [(1, ValueError), (0, ValueError), (-5, ValueError), (8.0, TypeError), (True, TypeError)]
)
def test_bad_text_seq_length(tokenizer: YTTMTokenizer, length, error) -> None:
    with pytest.raises(error, match="text_seq_length"):
        tokenizer.encode_text("кот", length)


def test_bad_decode_input(tokenizer: YTTMTokenizer) -> None:
    assert tokenizer.decode_text([]) == ""
    with pytest.raises(ValueError, match="229"):
        tokenizer.decode_text([5, 229])
    with pytest.raises(ValueError, match="-1"):
        tokenizer.decode_text(torch.tensor([5, -1]))
    with pytest.raises(ValueError, match="1-D"):
        tokenizer.decode_text(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="float"):
        tokenizer.decode_text(torch.tensor([5.0]))
    with pytest.raises(TypeError):
        tokenizer.decode_text([5, 6.5])
    with pytest.raises(TypeError, match="str"):
        tokenizer.decode_text("кот")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        YTTMTokenizer.from_file(tmp_path / "nope.model")


def _edit(lines: list[str], index: int, new: str | None) -> list[str]:
    lines = list(lines)
    if new is None:
        del lines[index]
    else:
        lines[index] = new
    return lines


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda ls: [], "truncated.*line 1"),
        (lambda ls: ls[:100], "truncated.*line 101"),
        (lambda ls: ls[:-1], "truncated.*line 227"),
        (lambda ls: _edit(ls, 0, "27"), "line 1: expected"),
        (lambda ls: _edit(ls, 5, "1086 x"), "line 6: expected"),
        (lambda ls: _edit(ls, 40, "4 11"), "line 41: expected"),
        (lambda ls: _edit(ls, 40, "4 -11 31"), "line 41: expected"),
        (lambda ls: _edit(ls, -1, "0 1 2 3"), "line 227: special ids"),
        (lambda ls: ls + ["5 6 7"], "line 228: unexpected content"),
        (lambda ls: _edit(ls, 2, "1089 5"), "line 6: character id 5 is defined twice"),
        (lambda ls: _edit(ls, 2, "1086 11"), "line 6: character U\\+043E is listed twice"),
        (lambda ls: _edit(ls, 2, "1089 9999"), "line 3: character id 9999 is out of range"),
        (lambda ls: _edit(ls, 28, "4 200 31"), "line 29: merge uses token id 200"),
        (lambda ls: _edit(ls, 29, "4 11 32"), "line 30: merge of the pair \\(4, 11\\) appears twice"),
        (lambda ls: _edit(ls, 21, "9602 4"), "U\\+2581"),
    ],
)
def test_malformed_model_file(fixture_model: Path, tmp_path: Path, edit, message: str) -> None:
    lines = fixture_model.read_text().splitlines()
    assert lines[21] == "9601 4" and lines[28] == "4 11 31"  # the edits above rely on this layout
    bad = tmp_path / "bad.model"
    bad.write_text("\n".join(edit(lines)) + "\n")
    with pytest.raises(ValueError, match=message) as info:
        YTTMTokenizer.from_file(bad)
    assert str(bad) in str(info.value)


def test_non_ascii_model_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x80\x81 binary")
    with pytest.raises(ValueError, match="bad.model"):
        YTTMTokenizer.from_file(bad)
