"""ruDALL-E text tokenizer: a pure-Python reader of YouTokenToMe (yttm) BPE models.

ruDALL-E tokenizes prompts with a yttm BPE model (``bpe.model``, vocab 16384). The youtokentome
package ships no wheels and needs Cython and a C++ compiler to install, so this module
reimplements the parts the pipeline needs: loading the model file, encoding and decoding. Its ids
are identical to ``yttm.BPE(path).encode([text], output_type=yttm.OutputType.ID)[0]``.

The ``bpe.model`` text format, one record per line::

    <n_chars> <n_merges>
    <unicode code point> <id>        # n_chars lines: the alphabet, including U+2581 '▁'
    <left id> <right id> <new id>    # n_merges lines, in priority order (first = merged first)
    <unk id> <pad id> <bos id> <eos id>

How yttm encodes a text:

1. Split on whitespace: the ASCII whitespace characters (space, \\t, \\n, \\v, \\f, \\r) and
   U+2581 itself. Other Unicode spaces (U+00A0, U+2000, ...) are ordinary characters.
2. Each word becomes ``['▁'] + its characters``; each maximal run of characters missing from the
   alphabet becomes a single unknown token, which is emitted as ``unk_id`` and never merged.
3. Merges are applied greedily: repeatedly merge the adjacent pair with the lowest merge rank,
   leftmost first, until no adjacent pair has a merge rule.

Decoding maps each id to its string, turns the leading '▁' of a piece into a space, and drops one
leading space from the whole result.
"""
from __future__ import annotations

import heapq
import logging
import operator
import os
import re
from pathlib import Path
from typing import Iterable, Sequence, Union

import torch

logger = logging.getLogger(__name__)

SPACE_TOKEN = "\u2581"  # '▁', the word-start marker that yttm prepends to every word
_WORD_SEPARATORS = re.compile("[ \t\n\v\f\r\u2581]+")  # C isspace() plus '▁', as in yttm
_SPECIAL_IDS = {"unk": 1, "pad": 0, "bos": 2, "eos": 3}  # the ids ruDALL-E's model was trained with
_N_SPECIAL = len(_SPECIAL_IDS)
_UNKNOWN = -1  # internal marker for a run of unknown characters; no merge rule can match it
_WORD_CACHE_SIZE = 1 << 16  # words whose ids are kept; the cache is emptied when it is full
MAX_BPE_BYTES = 64 * 2**20  # largest bpe.model read (ruDALL-E's, 16384 ids, is about 200 KB)


MAX_VOCABULARY_WORDS = 100_000  # largest word list a pipeline may carry (the demo's is a few dozen)
MAX_WORD_CHARS = 64  # longest word in such a list
_WORD = re.compile(r"[^\W_]+")  # a word: a maximal run of Unicode letters and digits


def prepare_text(text: str) -> str:
    """The pipeline's text normalisation before tokenizing: lowercase, then strip whitespace."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return text.lower().strip()


def text_words(text: str) -> list[str]:
    """The words of ``prepare_text(text)`` in order (repeats kept): maximal runs of Unicode letters
    and digits, so punctuation and hyphens separate words; "ё" and "е" stay different letters, as
    they are different tokens."""
    return _WORD.findall(prepare_text(text))


def check_word_list(words: object, *, what: str = "vocabulary") -> frozenset[str]:
    """``words`` as a frozenset, or a TypeError/ValueError naming ``what``: a list (or set) of at most
    :data:`MAX_VOCABULARY_WORDS` str, each one lowercase word (exactly one :func:`text_words` word,
    at most :data:`MAX_WORD_CHARS` characters)."""
    if not isinstance(words, (list, tuple, set, frozenset)):
        raise TypeError(f"{what} must be a list of lowercase words, got {type(words).__name__}")
    if len(words) > MAX_VOCABULARY_WORDS:
        raise ValueError(f"{what} has {len(words)} words; at most {MAX_VOCABULARY_WORDS} are allowed")
    for i, word in enumerate(sorted(words) if isinstance(words, (set, frozenset)) else words):
        if not isinstance(word, str):
            raise TypeError(f"{what}[{i}] must be a str, got {type(word).__name__}")
        if len(word) > MAX_WORD_CHARS or text_words(word) != [word]:
            raise ValueError(f"{what}[{i}] = {word[:MAX_WORD_CHARS + 1]!r} is not one lowercase word (letters and "
                             f"digits only, at most {MAX_WORD_CHARS} characters)")
    return frozenset(words)


class YTTMTokenizer:
    """A YouTokenToMe BPE model with the special ids pad=0, unk=1, bos=2, eos=3.

    Build it with :meth:`from_file`. ``chars`` maps each alphabet character to its id (in file
    order); ``merges`` lists ``(left_id, right_id, new_id)`` rules, highest priority first.

    ``vocabulary`` is the set of words the generator was trained on (a pipeline's ``pipeline.json``
    ``"vocabulary"`` entry), or None when unknown (the default; the Hub checkpoints). Setting it checks
    the words (:func:`check_word_list`); :meth:`unknown_words` lists a prompt's words outside it.
    """

    pad_id: int = 0
    unk_id: int = 1
    bos_id: int = 2
    eos_id: int = 3

    def __init__(self, chars: dict[str, int], merges: Sequence[tuple[int, int, int]]) -> None:
        self.vocab_size = _N_SPECIAL + len(chars) + len(merges)
        self._chars = dict(chars)
        self._merges = [tuple(m) for m in merges]
        error = _check_vocabulary(self._chars, self._merges, self.vocab_size)
        if error is not None:
            raise ValueError(f"invalid BPE vocabulary: {error[1]}")
        self._space_id = self._chars[SPACE_TOKEN]
        # (left, right) -> (rank, new id); the rank is the merge's priority, lower merges first
        self._merge_rank = {(x, y): (rank, z) for rank, (x, y, z) in enumerate(self._merges)}
        # id -> the text of that token, with its leading '▁' already turned into a space
        spelling: dict[int, str] = {i: ch for ch, i in self._chars.items()}
        for x, y, z in self._merges:
            spelling[z] = spelling[x] + spelling[y]
        self._pieces = [""] * self.vocab_size
        for i, s in spelling.items():
            self._pieces[i] = " " + s[1:] if s.startswith(SPACE_TOKEN) else s
        self._word_cache: dict[str, tuple[int, ...]] = {}  # prompts repeat words; words encode independently
        self._vocabulary: frozenset[str] | None = None

    @property
    def vocabulary(self) -> frozenset[str] | None:
        """The words the generator was trained on, or None (unknown: nothing is flagged)."""
        return self._vocabulary

    @vocabulary.setter
    def vocabulary(self, words: Iterable[str] | None) -> None:
        self._vocabulary = None if words is None else check_word_list(words)

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``prepare_text(text)`` (:func:`text_words`) that are not in :attr:`vocabulary`,
        in order of first appearance, each once; ``[]`` when there is no vocabulary."""
        if self._vocabulary is None:
            if not isinstance(text, str):
                raise TypeError(f"text must be a str, got {type(text).__name__}")
            return []
        return list(dict.fromkeys(w for w in text_words(text) if w not in self._vocabulary))

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike]) -> "YTTMTokenizer":
        """Read a yttm ``bpe.model`` file.

        Raises FileNotFoundError if ``path`` does not exist and ValueError, naming the file and
        line (never echoing its contents), if it is malformed, truncated, uses special ids other than
        pad=0 unk=1 bos=2 eos=3, is not a regular file (``/dev/zero``, a FIFO) or is larger than
        :data:`MAX_BPE_BYTES`.
        """
        from .files import read_bounded

        path = Path(path)
        raw = read_bounded(path, MAX_BPE_BYTES, what="BPE model")
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not a YouTokenToMe bpe.model (non-ASCII byte at offset {e.start})") from None
        chars, merges = _parse_model(text.splitlines(), path)
        logger.debug("loaded BPE model %s: %d chars, %d merges", path, len(chars), len(merges))
        return cls(chars, merges)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the model in yttm's ``bpe.model`` format (readable by youtokentome and :meth:`from_file`),
        atomically: ``path`` holds the old file or the complete new one, never a torn one."""
        from .files import atomic_write

        lines = [f"{len(self._chars)} {len(self._merges)}"]
        lines += [f"{ord(ch)} {i}" for ch, i in self._chars.items()]
        lines += [f"{x} {y} {z}" for x, y, z in self._merges]
        lines.append(" ".join(str(_SPECIAL_IDS[k]) for k in ("unk", "pad", "bos", "eos")))
        atomic_write(path, ("\n".join(lines) + "\n").encode("ascii"))

    def __repr__(self) -> str:
        name, n_chars, n_merges = type(self).__name__, len(self._chars), len(self._merges)
        return f"{name}(vocab_size={self.vocab_size}, chars={n_chars}, merges={n_merges})"

    def _encode_word(self, word: str) -> tuple[int, ...]:
        """BPE ids of one whitespace-free word, cached."""
        ids = self._word_cache.get(word)
        if ids is None:
            ids = self._merge_word(word)
            if len(self._word_cache) >= _WORD_CACHE_SIZE:
                self._word_cache.clear()
            self._word_cache[word] = ids
        return ids

    def _merge_word(self, word: str) -> tuple[int, ...]:
        """BPE ids of one whitespace-free word (the '▁' word marker is added here)."""
        tokens = [self._space_id]  # a token id per node, None once merged into its left neighbour
        for ch in word:
            i = self._chars.get(ch)
            if i is not None:
                tokens.append(i)
            elif "\ud800" <= ch <= "\udfff":
                raise ValueError(f"text contains a lone surrogate {ch!r} in word {word!r}; it is not valid Unicode")
            elif tokens[-1] != _UNKNOWN:  # a run of unknown characters is a single token
                tokens.append(_UNKNOWN)
        n = len(tokens)
        prev = list(range(-1, n - 1))  # doubly linked list over the nodes that are still alive
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        # min-heap of (rank, position): lowest rank first, then leftmost, exactly as yttm does
        heap = [(self._merge_rank[p][0], pos) for pos, p in enumerate(zip(tokens, tokens[1:])) if p in self._merge_rank]
        heapq.heapify(heap)

        def push(pos: int) -> None:
            rule = self._merge_rank.get((tokens[pos], tokens[nxt[pos]]))
            if rule is not None:
                heapq.heappush(heap, (rule[0], pos))

        while heap:
            rank, p1 = heapq.heappop(heap)
            p2 = nxt[p1]
            x, y, z = self._merges[rank]
            if p2 == -1 or tokens[p1] != x or tokens[p2] != y:
                continue  # stale entry: one side was merged away since it was pushed
            p0, p3 = prev[p1], nxt[p2]
            tokens[p1], tokens[p2] = z, None
            nxt[p1], nxt[p2] = p3, -1
            if p3 != -1:
                prev[p3] = p1
                push(p1)
            if p0 != -1:
                push(p0)
        out = []
        pos = 0  # the first node never dies: merges keep the left position
        while pos != -1:
            out.append(self.unk_id if tokens[pos] == _UNKNOWN else tokens[pos])
            pos = nxt[pos]
        return tuple(out)

    def encode(self, text: str) -> list[int]:
        """Raw BPE ids of ``text``, without BOS/EOS; ``yttm.BPE.encode`` with ``OutputType.ID``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        for word in _WORD_SEPARATORS.split(text):
            if word:
                ids.extend(self._encode_word(word))
        return ids

    def encode_text(self, text: str, text_seq_length: int) -> torch.LongTensor:
        """``[bos] + encode(text) + [eos]``, right-padded with pad_id or cut to ``text_seq_length``.

        Returns an int64 tensor of shape ``[text_seq_length]``. Cutting drops the EOS, as in the
        original ``YTTMTokenizerWrapper.encode_text``. The text is used as given: lowercase and
        strip it with :func:`prepare_text` first, as the pipeline does.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if isinstance(text_seq_length, bool) or not isinstance(text_seq_length, int):
            raise TypeError(f"text_seq_length must be an int, got {type(text_seq_length).__name__}")
        if text_seq_length < 2:
            raise ValueError(f"text_seq_length must be >= 2 (room for BOS and EOS), got {text_seq_length}")
        ids = [self.bos_id] + self.encode(text) + [self.eos_id]
        ids = ids[:text_seq_length] + [self.pad_id] * (text_seq_length - len(ids))
        return torch.tensor(ids, dtype=torch.long)  # (text_seq_length,)

    def decode_text(self, ids: Union[torch.Tensor, Iterable[int]]) -> str:
        """Text of a 1-D tensor or sequence of ids, skipping pad, unk, bos and eos (ids 0-3).

        Matches the original wrapper (``yttm.BPE.decode`` with ``ignore_ids=[0, 1, 2, 3]``):
        pieces are concatenated, a word-start '▁' becomes a space, and one leading space is
        dropped. Raises ValueError for ids outside ``[0, vocab_size)``.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"ids must be a 1-D tensor, got shape {tuple(ids.shape)}")
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise TypeError(f"ids must be an integer tensor, got dtype {ids.dtype}")
            ids = ids.tolist()
        elif isinstance(ids, (str, bytes)):
            raise TypeError(f"ids must be a tensor or a sequence of ints, got {type(ids).__name__}")
        pieces = []
        for i in ids:
            i = operator.index(i)  # TypeError for floats and other non-integers
            if 0 <= i < _N_SPECIAL:
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is out of range: valid ids are 0..{self.vocab_size - 1}")
            piece = self._pieces[i]
            if not pieces and piece.startswith(" "):
                piece = piece[1:]  # yttm drops the space before the first word
            pieces.append(piece)
        return "".join(pieces)


def _check_vocabulary(chars: dict[str, int], merges: Sequence[tuple[int, ...]], vocab_size: int):
    """First problem as ``(index, message)``, ``index`` counting chars then merges (None: no single entry); or None."""
    if SPACE_TOKEN not in chars:
        return None, f"the alphabet lacks the word-start character U+2581 {SPACE_TOKEN!r}"
    for ch in chars:
        if not isinstance(ch, str) or len(ch) != 1:
            return None, f"alphabet entries must be single characters, got {ch!r}"
    defined: set[int] = set()
    entries = [(i, "character id") for i in chars.values()] + [(m[2], "merge id") for m in merges]
    for index, (i, what) in enumerate(entries):
        if index >= len(chars):  # a merge: both halves must already exist
            x, y, _ = merges[index - len(chars)]
            for half in (x, y):
                if half not in defined:
                    return index, f"merge uses token id {half}, which is not defined before it"
        if not _N_SPECIAL <= i < vocab_size:
            return index, f"{what} {i} is out of range: valid ids are {_N_SPECIAL}..{vocab_size - 1}"
        if i in defined:
            return index, f"{what} {i} is defined twice"
        defined.add(i)
    pairs = set()
    for index, (x, y, _) in enumerate(merges):
        if (x, y) in pairs:
            return len(chars) + index, f"merge of the pair ({x}, {y}) appears twice"
        pairs.add((x, y))
    return None


def _parse_model(lines: list[str], path: Path) -> tuple[dict[str, int], list[tuple[int, int, int]]]:
    """Parse the lines of a bpe.model into (chars, merges); ValueError naming file and line on errors."""
    while lines and not lines[-1].strip():
        lines = lines[:-1]  # trailing blank lines are harmless

    def fields(lineno: int, count: int, what: str) -> list[int]:
        if lineno > len(lines):
            raise ValueError(
                f"{path}: file is truncated: expected {what} at line {lineno}, but it has {len(lines)} lines"
            )
        parts = lines[lineno - 1].split()
        if len(parts) != count or not all(p.isdigit() for p in parts):
            found = f"{len(parts)} fields" if len(parts) != count else "a field that is not a non-negative integer"
            raise ValueError(f"{path}, line {lineno}: expected {what} ({count} non-negative integers), found {found}")
        return [int(p) for p in parts]

    n_chars, n_merges = fields(1, 2, "'<n_chars> <n_merges>'")
    chars: dict[str, int] = {}
    for k in range(n_chars):
        code_point, i = fields(2 + k, 2, "'<code point> <id>'")
        if code_point > 0x10FFFF:
            raise ValueError(f"{path}, line {2 + k}: {code_point} is not a Unicode code point (max {0x10FFFF})")
        if chr(code_point) in chars:
            raise ValueError(f"{path}, line {2 + k}: character U+{code_point:04X} is listed twice")
        chars[chr(code_point)] = i
    merges = [tuple(fields(2 + n_chars + k, 3, "'<left id> <right id> <new id>'")) for k in range(n_merges)]
    special_line = 2 + n_chars + n_merges
    found = fields(special_line, 4, "'<unk id> <pad id> <bos id> <eos id>'")
    expected = [_SPECIAL_IDS[k] for k in ("unk", "pad", "bos", "eos")]
    if found != expected:
        raise ValueError(
            f"{path}, line {special_line}: special ids (unk, pad, bos, eos) are {tuple(found)}; "
            f"ruDALL-E models use {tuple(expected)}"
        )
    if len(lines) > special_line:
        raise ValueError(f"{path}, line {special_line + 1}: unexpected content after the special ids line")
    error = _check_vocabulary(chars, merges, _N_SPECIAL + n_chars + n_merges)
    if error is not None:
        index, message = error
        where = f"{path}" if index is None else f"{path}, line {2 + index}"
        raise ValueError(f"{where}: {message}")
    return chars, merges
