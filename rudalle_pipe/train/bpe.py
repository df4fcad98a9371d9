"""Stage 1: a small, deterministic BPE trainer that writes the YouTokenToMe ``bpe.model`` format.

The algorithm mirrors how yttm tokenizes, so that :class:`rudalle_pipe.tokenizer.YTTMTokenizer` (and
youtokentome itself) encode with the trained model exactly as it was trained:

1. Split every text on whitespace (the separators yttm uses); each word becomes ``'▁' + word``.
2. The alphabet is every character seen (plus ``'▁'``), ids from 4 up, most frequent first
   (ties by code point); ids 0-3 are pad/unk/bos/eos.
3. Repeatedly merge the most frequent adjacent pair of tokens, counted over all words weighted by
   word frequency; ties go to the pair that is smallest by (left id, right id). Occurrences inside a
   word are merged left to right, as yttm's encoder does. Stop at ``vocab_size`` or when no pair
   occurs at least ``min_count`` times.
"""
from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterable

from .. import files
from ..tokenizer import _WORD_SEPARATORS, SPACE_TOKEN, YTTMTokenizer

logger = logging.getLogger(__name__)

__all__ = ["learn_bpe", "train_bpe"]

_N_SPECIAL = 4  # pad, unk, bos, eos


def _merge_pair(word: tuple[int, ...], pair: tuple[int, int], new_id: int) -> tuple[int, ...]:
    """Replace the non-overlapping occurrences of ``pair`` in ``word``, left to right."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_bpe(texts: Iterable[str], vocab_size: int, *, min_count: int = 2) -> YTTMTokenizer:
    """Learn a BPE vocabulary of at most ``vocab_size`` ids (specials included) from ``texts``.

    The texts are used as given (lowercase and strip them first, as the pipeline does).

    Raises:
        ValueError: ``vocab_size`` cannot hold the specials and the alphabet, or ``texts`` is empty.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of str, not a single str")
    words: Counter[str] = Counter()
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must hold str, got {type(text).__name__}")
        words.update(w for w in _WORD_SEPARATORS.split(text) if w)
    if not words:
        raise ValueError("texts hold no words; nothing to learn a BPE vocabulary from")
    char_counts: Counter[str] = Counter({SPACE_TOKEN: sum(words.values())})
    for word, n in words.items():
        for ch in word:
            char_counts[ch] += n
    alphabet = sorted(char_counts, key=lambda ch: (-char_counts[ch], ord(ch)))
    if vocab_size < _N_SPECIAL + len(alphabet):
        raise ValueError(f"vocab_size={vocab_size} is too small: the texts need {_N_SPECIAL} special ids plus "
                         f"{len(alphabet)} characters; use vocab_size >= {_N_SPECIAL + len(alphabet)}")
    chars = {ch: _N_SPECIAL + i for i, ch in enumerate(alphabet)}
    corpus = {tuple([chars[SPACE_TOKEN]] + [chars[c] for c in w]): n for w, n in words.items()}
    merges: list[tuple[int, int, int]] = []
    next_id = _N_SPECIAL + len(alphabet)
    while next_id < vocab_size:
        pairs: Counter[tuple[int, int]] = Counter()
        for word, n in corpus.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        pair = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[pair] < min_count:
            break
        merges.append((pair[0], pair[1], next_id))
        corpus = {_merge_pair(w, pair, next_id): n for w, n in corpus.items()}
        next_id += 1
    logger.info("BPE: %d words, %d characters, %d merges -> vocab %d", len(words), len(alphabet), len(merges),
                next_id)
    return YTTMTokenizer(chars, merges)


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | Path, *, min_count: int = 2) -> Path:
    """Learn a BPE vocabulary with :func:`learn_bpe` and write it to ``path`` (yttm ``bpe.model`` format).

    Returns ``path``. The vocabulary may be smaller than ``vocab_size`` when the texts run out of pairs
    seen ``min_count`` times; read the actual size with ``YTTMTokenizer.from_file(path).vocab_size``.
    """
    tokenizer = learn_bpe(texts, vocab_size, min_count=min_count)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.build.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:  # a torn bpe.model never appears under its name (the demo skips the stage when it exists)
        tokenizer.save(staging / path.name)
        files.atomic_write(path, (staging / path.name).read_bytes())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
