"""Finetuning data: ``(image, caption)`` pairs from a folder or a list, checked file by file, and their
token sequences with the VQGAN codes cached in ``codes.pt`` (see :mod:`rudalle_pipe.finetune`).

Every bad file is an error naming it (a missing ``captions.csv`` row, an empty caption, a file that
is not UTF-8 or not a picture, a CSV row with too few fields, a name leading outside the folder), or
with ``skip_bad=True`` a logged warning per file that is then left out. The codes cache is written
atomically and rebuilt, with a warning, when it cannot be read.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from PIL import Image

from .. import files
from ..dalle import DalleModel
from ..checks import one_line
from ..images import DECODE_ERRORS, images_to_tensor, prepare_image  # prepare_image: re-exported
from ..tokenizer import YTTMTokenizer, prepare_text

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_SUFFIXES", "CAPTIONS_FILE", "MAX_CAPTIONS_BYTES", "load_pairs", "prepare_image", "encode_pairs"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTIONS_FILE = "captions.csv"
MAX_CAPTIONS_BYTES = 64 << 20  # captions.csv / <name>.txt size limit

ImageLike = Union[Image.Image, str, Path]
Data = Union[str, Path, Sequence[tuple[ImageLike, str]]]


def load_pairs(data: Data, *, caption: Optional[str] = None, skip_bad: bool = False) -> list[tuple[ImageLike, str]]:
    """The ``(image, caption)`` pairs of ``data``.

    Args:
        data: a folder, or a sequence of ``(PIL image or path, caption)``. In a folder the images
            (``IMAGE_SUFFIXES``, sorted by name) take their captions from, in order of preference:
            ``caption``; ``captions.csv`` (UTF-8, columns ``file`` and ``caption``, ``file`` relative
            to the folder, rows in training order, one row for every image of the folder); a
            ``<image stem>.txt`` (UTF-8) beside each image. Every image is decoded once here.
        caption: one caption for every image (overrides the files).
        skip_bad: skip (and log, one warning per file) images without a caption row or ``.txt``,
            with an empty caption, or that do not decode, and rows naming missing files; by default
            each of these is an error naming the file.

    Raises:
        ValueError / FileNotFoundError: naming the file (and the CSV line) that is wrong.
    """
    if isinstance(data, (str, Path)):
        folder = Path(data)
        if not folder.is_dir():
            raise FileNotFoundError(f"data folder {folder} does not exist")
        return _folder_pairs(folder, caption, skip_bad)
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a folder or a sequence of (image, caption) pairs, got {type(data).__name__}")
    pairs = []
    for i, item in enumerate(data):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"data[{i}] must be an (image, caption) pair, got {item!r:.80}")
        image, text = item
        if not isinstance(image, (Image.Image, str, Path)):
            raise TypeError(f"data[{i}][0] must be a PIL image or a path, got {type(image).__name__}")
        text = caption if caption is not None else text
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"data[{i}] has an empty or non-text caption: {text!r}")
        pairs.append((image, text))
    if not pairs:
        raise ValueError("data holds no (image, caption) pairs")
    return pairs


class _Problems:
    """Bad data files: raised at once, or (``skip_bad``) logged one by one and skipped."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad, self.skipped = skip_bad, []

    def __call__(self, error: Exception) -> None:
        if not self.skip_bad:
            raise error
        logger.warning("finetune: skipping: %s", error)
        self.skipped.append(str(error))


def _read_text(path: Path, what: str) -> str:
    """A UTF-8 text file (bounded size), or ``ValueError`` naming it."""
    try:
        return files.read_bounded(path, MAX_CAPTIONS_BYTES, what=what).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def _check_image(path: Path) -> None:
    """Decode ``path`` fully once, or raise ``ValueError`` naming it."""
    try:
        with Image.open(path) as image:
            image.load()
    except DECODE_ERRORS as err:
        raise ValueError(f"image {path} cannot be decoded ({one_line(err)})") from None


def _table_pairs(folder: Path, table: Path, images: list[Path], bad: _Problems) -> list[tuple[Path, str]]:
    """The pairs listed in ``captions.csv``; every image of the folder must have a row."""
    text = _read_text(table, "captions file")
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as err:
        raise ValueError(f"{table} is not a valid CSV file ({err})") from None
    header = [h.strip() for h in rows[0]] if rows else []
    missing = {"file", "caption"} - set(header)
    if missing:
        raise ValueError(f"{table} needs the columns 'file' and 'caption'; missing {sorted(missing)}")
    col_file, col_caption = header.index("file"), header.index("caption")
    pairs, listed = [], set()
    for n, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # a blank line
        if len(row) <= max(col_file, col_caption):
            bad(ValueError(f"{table} line {n}: {len(row)} field(s), expected the columns {header}"))
            continue
        name, text = row[col_file].strip(), row[col_caption].strip()
        path = files.resolve_inside(folder, name, what=f"{table} line {n}")  # never outside the folder
        listed.add(path)
        if not path.is_file():
            bad(FileNotFoundError(f"{table} line {n}: {path} does not exist"))
        elif not text:
            bad(ValueError(f"{table} line {n}: empty caption for {name}"))
        else:
            pairs.append((path, text))
    for image in images:
        if image not in listed:
            bad(ValueError(f"{table} has no row for {image.name} (every image of the folder needs one; remove the "
                           "image, add a row, or pass skip_bad=True / --skip-bad)"))
    return pairs


def _folder_pairs(folder: Path, caption: Optional[str], skip_bad: bool) -> list[tuple[ImageLike, str]]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    bad = _Problems(skip_bad)
    table = folder / CAPTIONS_FILE
    if caption is not None:
        if not caption.strip():
            raise ValueError("caption is empty")
        pairs = [(p, caption) for p in images]
    elif table.is_file():
        pairs = _table_pairs(folder, table, images, bad)
    else:
        missing = [p.name for p in images if not p.with_suffix(".txt").is_file()]
        if missing and not skip_bad:
            raise ValueError(f"no captions for {len(missing)} image(s) in {folder} (e.g. {missing[:3]}): add "
                             f"{CAPTIONS_FILE} (columns file,caption), a <name>.txt per image, or pass caption=")
        pairs = []
        for p in images:
            sidecar = p.with_suffix(".txt")
            try:
                if p.name in missing:
                    raise ValueError(f"no caption for {p} (no {sidecar.name})")
                if not (text := _read_text(sidecar, "caption file").strip()):
                    raise ValueError(f"caption file {sidecar} is empty")
            except ValueError as err:  # missing, empty, not UTF-8, not a regular file, too large
                bad(err)
                continue
            pairs.append((p, text))
    good = []
    for path, text in pairs:
        try:
            _check_image(path)
        except ValueError as err:
            bad(err)
            continue
        good.append((path, text))
    if bad.skipped:
        logger.warning("finetune: skipped %d bad file(s) in %s (skip_bad=True)", len(bad.skipped), folder)
    if not good:
        raise ValueError(f"no usable (image, caption) pairs in {folder}")
    return good


def _read_codes(cache: Path, key: str, n: int, positions: int) -> Optional[torch.Tensor]:
    """The cached codes ``(n, positions)`` of ``key`` in ``cache``, or None (missing, stale, or
    unreadable: a corrupt cache is logged and rebuilt, never an error)."""
    if not cache.is_file():
        return None
    try:
        stored = torch.load(cache, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torn zip, pickle or size errors alike
        logger.warning("finetune: the codes cache %s is unreadable (%s); encoding the images again", cache,
                       one_line(err))
        return None
    codes = stored.get("codes") if isinstance(stored, dict) else None
    if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dim() != 2:
        logger.warning("finetune: the codes cache %s holds no code table; encoding the images again", cache)
        return None
    if stored.get("key") != key or tuple(codes.shape) != (n, positions):
        logger.info("finetune: the codes cache %s is for other images or another VQGAN; encoding again", cache)
        return None
    logger.info("finetune: reusing the cached codes of %d images (%s)", n, cache)
    return codes


@torch.no_grad()
def encode_pairs(dalle: DalleModel, vae: Any, tokenizer: YTTMTokenizer, pairs: Sequence[tuple[ImageLike, str]],
                 *, cache: Optional[Path] = None, batch_size: int = 8) -> torch.Tensor:
    """Token sequences ``[N, text_seq_length + image_seq_length]`` int64 for the pairs: BOS, BPE ids,
    EOS and padding, then the VQGAN codes of the prepared image.

    The codes are cached in ``cache`` (a ``.pt`` file, written atomically) keyed by a hash of the
    prepared pixels and of the VQGAN's codebook, and reused when the key matches; an unreadable cache
    is rebuilt with a logged warning."""
    cfg = dalle.config
    size = cfg.image_tokens_per_dim * vae.downsample_factor
    images = [prepare_image(image, size) for image, _ in pairs]
    digest = hashlib.sha256()
    digest.update(vae.quantize.embed.weight.detach().float().cpu().numpy().tobytes())
    for image in images:
        digest.update(image.tobytes())
    key = digest.hexdigest()
    codes = _read_codes(cache, key, len(images), cfg.image_seq_length) if cache is not None else None
    if codes is None:
        device = next(vae.parameters()).device
        chunks = []
        for start in range(0, len(images), batch_size):
            x = images_to_tensor(images[start:start + batch_size]).to(device)  # (b, 3, size, size) in [0, 1]
            chunks.append(vae.get_codebook_indices(x).cpu())
        codes = torch.cat(chunks)  # (N, image_seq_length)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            stored = {"key": key, "codes": codes}
            files.atomic_write(cache, lambda f: torch.save(stored, f))
    text = torch.stack([tokenizer.encode_text(prepare_text(c), cfg.text_seq_length) for _, c in pairs])
    return torch.cat([text.long(), codes.long()], dim=1)
