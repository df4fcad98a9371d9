"""The output folder of ``rudalle-pipe generate``: what a run may replace, how much room it needs,
and writing its files so that a failed or interrupted run leaves nothing behind.

A run writes ``image_000.png``, ``image_001.png``, ... (``prompt00_image_000.png``, ... with several
prompts), ``contact_sheet.png`` and ``results.json``
(``outpaint`` writes no contact sheet: its record has no ``contact_sheet`` entry).
``results.json`` is the run's *completion record*: it lists every other file of the run and is moved
into place last, so its presence means the run finished.

* :func:`check_targets` (before any work) refuses a file with a target name that no previous
  ``results.json`` lists: it is the user's, and it is never replaced, not even with ``--overwrite``.
  Without ``--overwrite`` it also refuses a previous run's files.
* :func:`write_run` renders and writes every file under a temporary name first (each one fsynced;
  a full disk or Ctrl-C here leaves the folder as it was), then renames them into place, removing the
  previous run's stale files just before ``results.json``. If a failure strikes while files are
  being renamed, everything of this run and of the previous run is removed, so the folder never
  holds a mix of two runs or a file that no ``results.json`` lists; the user's files are never touched.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import uuid
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from .contact_sheet import sheet_size
from .files import atomic_write, fsync_dir, read_bounded, rename_into_place, temp_target

logger = logging.getLogger(__name__)

__all__ = ["RESULTS", "CONTACT_SHEET", "image_name", "png_bytes", "png_size_bound", "estimate_bytes",
           "check_targets", "write_run", "remove_unfinished_run"]

RESULTS = "results.json"
CONTACT_SHEET = "contact_sheet.png"
# the only names a run writes besides results.json
_RUN_FILE = re.compile(r"(?:prompt\d{2,}_)?image_\d{3,}\.png|contact_sheet\.png")
_MAX_RECORD_BYTES = 64 * 2**20  # a results.json of 4096 candidates is ~2 MB


def image_name(i: int, prompt: Optional[int] = None) -> str:
    """File name of the ``i``-th kept image (best first): ``image_000.png``; with several prompts, that of
    prompt ``prompt``: ``prompt00_image_000.png``."""
    return f"image_{i:03d}.png" if prompt is None else f"prompt{prompt:02d}_image_{i:03d}.png"


def png_bytes(image) -> bytes:
    """``image`` (PIL) encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_size_bound(width: int, height: int, channels: int = 3) -> int:
    """Upper bound of the size in bytes of an 8-bit PNG written by Pillow, whatever the content.

    The raw scanlines (a filter byte plus ``width * channels`` bytes per row) can grow by zlib's
    worst case (< 1/2048 for stored blocks), plus 12 bytes per IDAT chunk (one per 64 KiB) and the
    signature, IHDR and IEND; 1 KiB covers those with room to spare."""
    raw = height * (1 + width * channels)
    return raw + raw // 2048 + 12 * (raw // 65536 + 2) + 1024


def estimate_bytes(*, num_images: int, kept: int, side: int, scale: int, text: str) -> int:
    """Upper bound of what a run writes: ``kept`` RGB images of ``side * scale`` px, the contact sheet of
    ``num_images`` candidates of ``side`` px, and results.json (1 KiB per candidate, plus the text)."""
    images = kept * png_size_bound(side * scale, side * scale)
    sheet = png_size_bound(*sheet_size(num_images, side))
    record = 4096 + 2 * len(text.encode("utf-8", "surrogatepass")) + 1024 * num_images
    return images + sheet + record


def _previous_run(out: Path) -> frozenset[str]:
    """The files of the run recorded in ``out``: its results.json and the files that lists (empty
    without one); only names a run writes count, so an edited record never gets another file removed."""
    path = out / RESULTS
    if not path.exists() and not path.is_symlink():
        return frozenset()
    problem = f"{path} exists but is not a results.json written by rudalle-pipe"
    try:
        record = json.loads(read_bounded(path, _MAX_RECORD_BYTES, what=RESULTS).decode("utf-8"))
    except (OSError, ValueError) as err:  # ValueError: not JSON, not UTF-8, not a regular file, too large
        raise FileExistsError(f"{problem} ({err}); it is never replaced: move it away or choose another --out") from err
    entries = record.get("images") if isinstance(record, dict) else None
    sheet = record.get("contact_sheet", {}) if isinstance(record, dict) else None  # outpaint writes none
    if not isinstance(entries, list) or not isinstance(sheet, dict):
        raise FileExistsError(f"{problem} (no 'images' list, or a 'contact_sheet' that is not an object); it is "
                              "never replaced: move it away or choose another --out")
    names = [e.get("file") for e in entries if isinstance(e, dict)] + [sheet.get("file")]
    return frozenset({RESULTS, *(n for n in names if isinstance(n, str) and _RUN_FILE.fullmatch(n))})


def check_targets(out: Path, names: Sequence[str], *, overwrite: bool) -> frozenset[str]:
    """Check, before any work, that a run may write ``names`` (and results.json) into ``out``.

    Returns the files of the previous run (its results.json included) that this one replaces or
    removes; empty without ``overwrite``.

    Raises:
        NotADirectoryError: ``out`` is a file.
        FileExistsError: a target exists that no previous results.json lists (the user's file: never
            replaced); a results.json that is not a run's record; without ``overwrite``, any target.
    """
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    if not out.is_dir():
        return frozenset()
    previous = _previous_run(out)
    existing = [n for n in [*names, RESULTS] if (out / n).exists() or (out / n).is_symlink()]
    for name in existing:
        if name not in previous:
            raise FileExistsError(f"{out / name} exists and no results.json in {out} lists it, so it is not from "
                                  "an earlier run: it is never replaced, not even with --overwrite; move it away "
                                  "or choose another --out")
        if (out / name).is_dir():
            raise FileExistsError(f"{out / name} is a folder; move it away or choose another --out")
    if existing and not overwrite:
        raise FileExistsError(f"{out / existing[0]} already exists (from an earlier run); pass --overwrite to "
                              "replace that run's files, or choose another --out")
    return previous if overwrite else frozenset()


def write_run(out: Path, outputs: Iterable[tuple[str, Callable[[], bytes]]], previous: frozenset[str]) -> None:
    """Write a run's files into ``out`` (created if missing); results.json must come last.

    Args:
        outputs: ``(name, render)`` pairs; ``render()`` gives the file's bytes and is called only when
            that file is written, so one encoded image at a time is held in memory.
        previous: from :func:`check_targets`: the previous run's files, which may be replaced, and
            which are removed when this run does not write them (stale images of a larger run).

    On any exception (a full disk, ``KeyboardInterrupt``) everything this run wrote is removed, with
    the folders it created; see the module docstring for what happens to the previous run.
    """
    created = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    staged: dict[str, Path] = {}
    identity: dict[str, tuple[int, int]] = {}  # name -> (st_dev, st_ino) of its staged file
    stale_removed = False
    try:
        for name, render in outputs:  # 1. every file under a temporary name, fsynced
            staged[name] = out / f".{name}.{run_id}.tmp"
            atomic_write(staged[name], render(), overwrite=False)
            info = staged[name].stat()
            identity[name] = (info.st_dev, info.st_ino)
        if list(staged)[-1] != RESULTS:
            raise ValueError(f"write_run: {RESULTS} must be the last output, got {list(staged)}")
        for name, tmp in staged.items():  # 2. into place, the completion record last
            if name == RESULTS:
                for stale in sorted(previous - set(staged)):
                    stale_removed = True
                    (out / stale).unlink(missing_ok=True)
            rename_into_place(tmp, out / name, overwrite=name in previous)
        fsync_dir(out)  # the renames are durable: the run is complete
    except BaseException:
        # a file of this run in place is recognised by its inode (a rename or a hard link keeps it), so
        # a failure between the two steps of a rename is covered, and a user's file is never taken for one
        ours = [out / n for n, ident in identity.items() if _identity(out / n) == ident]
        _remove([*staged.values(), *ours])
        if previous and (ours or stale_removed):  # the previous run is no longer whole: a mix is worse than none
            _remove([out / RESULTS] + [out / n for n in sorted(previous)])  # its record first
            logger.warning("the run failed while its files were moved into place; the previous run's files "
                           "in %s were removed too (only the files its results.json listed)", out)
        for folder in created:  # innermost first; only if empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def remove_unfinished_run(folder: Path) -> None:
    """Remove what an interrupted run left in ``folder``: files with the names a run writes (images, the
    contact sheet, results.json) and the temporary files of those; any other file stays."""
    for path in folder.iterdir():
        name = temp_target(path.name) or path.name
        if (name == RESULTS or _RUN_FILE.fullmatch(name)) and path.is_file():
            path.unlink()


def _identity(path: Path) -> Optional[tuple[int, int]]:
    try:
        info = path.lstat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _remove(paths: Iterable[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
