"""Crash-proof training state on disk: checkpoints, the loss log, and model exports that rotate.

Every file here is written so that an interrupt (Ctrl-C, a killed job, a full disk) at any moment
leaves either the old state or the new one, never a torn mix:

* **Checkpoints** (:func:`save_checkpoint`) are written by ``Accelerator.save_state`` into the
  temporary folder ``out_dir/.checkpoint-new.tmp``; ``progress.json`` (the step and a manifest of
  every file with its size) is written last, as the completion marker, and fsynced; then the folder
  is swapped into place: ``checkpoint`` -> ``checkpoint-previous``, new -> ``checkpoint``, and the
  previous one is removed. A complete checkpoint exists at every instant after the first save.
  :func:`load_checkpoint` trusts only folders whose marker and manifest match their files, and falls
  back from ``checkpoint`` to ``checkpoint-previous`` with a logged warning.
* **The loss log** (``loss_log.csv``, columns ``step,loss,lr,seconds``) is appended row by row; a
  resume rewrites it atomically without the rows after the resumed step (a torn last row is dropped).
  A ``loss_log.csv`` with other columns or unreadable rows was not written here: it is never changed,
  and the run stops with an error naming it.
* **Model exports** (``step-<N>`` folders of finetuning) carry the marker file :data:`EXPORT_MARKER`
  (written last); :func:`rotate_exports` deletes only folders holding it, so a user's own
  ``step-0/`` or ``step-notes/`` is never touched.

Under ``accelerate launch`` every process calls these functions; ``save_state`` runs everywhere,
file moves and log writes happen on the main process between ``wait_for_everyone`` barriers.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from .. import files

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT", "PREVIOUS", "MARKER", "EXPORT_MARKER", "LOG_HEADER", "save_checkpoint",
           "load_checkpoint", "check_pickles", "has_checkpoint", "check_state_dir", "read_log", "prepare_log", "write_log_row",
           "write_export", "rotate_exports", "foreign_exports"]

CHECKPOINT, PREVIOUS, NEW = "checkpoint", "checkpoint-previous", ".checkpoint-new.tmp"
MARKER = "progress.json"  # completion marker of a checkpoint, written last
EXPORT_MARKER = ".rudalle_pipe_export.json"  # ownership marker of a step-<N> export, written last
LOG_NAME, LOG_HEADER = "loss_log.csv", ["step", "loss", "lr", "seconds"]
_TRASH = re.compile(r"^\.checkpoint-(new|old\.[0-9a-f]{12})\.tmp$")  # our temporary folders only


# ------------------------------------------------------------------------------------ checkpoints
def _manifest(directory: Path) -> dict[str, int]:
    """``{relative POSIX path: size in bytes}`` of every regular file under ``directory``."""
    return {p.relative_to(directory).as_posix(): p.stat().st_size
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MARKER}


def _verify(directory: Path) -> int:
    """The step of the complete checkpoint ``directory``; ``ValueError`` saying what is wrong otherwise."""
    try:
        state = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no {MARKER} (the save was interrupted)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"unreadable {MARKER} ({err})") from None
    step, listed = (state.get("step"), state.get("files")) if isinstance(state, dict) else (None, None)
    if not isinstance(step, int) or not isinstance(listed, dict) or not listed:
        raise ValueError(f"{MARKER} has no step and file manifest (an older format or a torn save)")
    found = _manifest(directory)
    if found != listed:
        differ = sorted(k for k in set(found) | set(listed) if found.get(k) != listed.get(k))
        raise ValueError(f"its files do not match {MARKER} ({', '.join(differ[:4])})")
    return step


def _remove(directory: Path) -> None:
    """Remove one of our folders: renamed to a temporary name first, so a crash in the middle of the
    removal never leaves a half-deleted folder under a real name."""
    trash = directory.parent / f".checkpoint-old.{uuid.uuid4().hex[:12]}.tmp"
    os.rename(directory, trash)
    shutil.rmtree(trash)


def check_state_dir(out_dir: Path) -> None:
    """Before training: refuse folders named like ours that this package did not write, and remove
    temporary folders left by an earlier interrupted save (main process only)."""
    for name in (CHECKPOINT, PREVIOUS):
        path = out_dir / name
        if path.exists() and not (path.is_dir() and (path / MARKER).is_file()):
            raise FileExistsError(f"{path} exists but holds no {MARKER}: not a checkpoint written by rudalle_pipe "
                                  "(or one an older version left torn); move it away or choose another out_dir")
    for entry in out_dir.iterdir():
        if _TRASH.match(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)


def has_checkpoint(out_dir: Path) -> bool:
    """True when ``out_dir`` holds a checkpoint folder (complete or not) that a run would resume from."""
    return any((out_dir / name).is_dir() for name in (CHECKPOINT, PREVIOUS))


def check_pickles(directory: Path) -> None:
    """Prove that every pickle-based file of the checkpoint ``directory`` holds only tensors and plain
    data, by reading it with ``torch.load(weights_only=True)`` (memory-mapped, so nothing large is
    read twice) before ``Accelerator.load_state`` reads it again.

    accelerate before 1.2, and any accelerate on torch before 2.4, reads ``optimizer.bin``,
    ``scheduler.bin`` and the RNG ``.pkl`` files with a full unpickle; a file that passes this check
    holds nothing that a full unpickle could execute. The safe types accelerate itself allows (numpy
    arrays in the RNG state) are allowed here too.

    Raises:
        ValueError: a file holds something else (a hostile or foreign file), naming it.
    """
    import torch

    try:
        from accelerate.utils.other import TORCH_SAFE_GLOBALS as safe
    except ImportError:  # older accelerate: torch's own allow-list only
        safe = []
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    if allow is None and hasattr(torch.serialization, "add_safe_globals"):  # torch 2.4: as accelerate does
        torch.serialization.add_safe_globals(list(safe))
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.suffix in (".safetensors", ".json"):
            continue
        try:
            with (allow(list(safe)) if allow is not None else contextlib.nullcontext()):
                try:
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as err:
                    if "mmap" not in str(err):
                        raise
                    torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any refusal means: do not let accelerate unpickle it
            raise ValueError(f"{path} is not a plain tensor/data pickle (torch.load(weights_only=True) refused "
                             f"it: {type(err).__name__}); it is never unpickled") from err


def load_checkpoint(accelerator: Any, out_dir: Path, name: str) -> int:
    """Load the newest complete checkpoint into the prepared objects of ``accelerator``; return its
    step (0 when there is none). Incomplete ones are skipped with a warning; one that fails to load
    is skipped for the next (a later ``load_state`` replaces everything the failed one touched).

    Raises:
        RuntimeError: every complete checkpoint failed to load (the model may be half-loaded).
    """
    failed = []
    for folder in (out_dir / CHECKPOINT, out_dir / PREVIOUS):
        if not folder.exists():
            continue
        try:
            step = _verify(folder)
        except ValueError as err:
            logger.warning("%s: ignoring the checkpoint %s: %s", name, folder, err)
            continue
        try:
            check_pickles(folder)  # a hostile or corrupt file is never given to a full unpickle
            accelerator.load_state(str(folder))
        except Exception as err:  # noqa: BLE001 - a corrupt file of any kind: try the previous one
            logger.warning("%s: the checkpoint %s does not load (%s); trying the previous one", name, folder, err)
            failed.append(f"{folder} ({err})")
            continue
        if folder.name == PREVIOUS:
            logger.warning("%s: resuming from the previous checkpoint %s (step %d)", name, folder, step)
        return step
    if failed:
        raise RuntimeError(f"{name}: no checkpoint in {out_dir} loads: {'; '.join(failed)}; delete them to start "
                           "over")
    return 0


def save_checkpoint(accelerator: Any, out_dir: Path, step: int, extra: dict[str, Any],
                    before_commit: Optional[Callable[[], None]] = None) -> None:
    """Save the training state of ``step`` atomically (see the module docstring); call on every process.

    ``before_commit`` runs on the main process after the state is written and before it becomes
    the current checkpoint (an export that fails or is interrupted leaves the older checkpoint current).
    """
    new = out_dir / NEW
    if accelerator.is_main_process and new.exists():
        shutil.rmtree(new)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(new))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if before_commit is not None:
            before_commit()
        files.fsync_tree(new)
        marker = {"step": step, **extra, "files": _manifest(new)}
        files.atomic_write(new / MARKER, json.dumps(marker, indent=2, default=str) + "\n")
        current, previous = out_dir / CHECKPOINT, out_dir / PREVIOUS
        if current.exists():
            if previous.exists():
                _remove(previous)
            os.rename(current, previous)
        os.rename(new, current)
        files.fsync_dir(out_dir)  # make the renames durable
        if previous.exists():
            _remove(previous)
    accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------- loss log
def _parse_row(row: list[str]) -> Optional[int]:
    """The step of a well-formed loss-log row, else None."""
    if len(row) != len(LOG_HEADER):
        return None
    try:
        step = int(row[0])
        [float(v) for v in row[1:]]
    except ValueError:
        return None
    return step if step >= 1 else None


def read_log(out_dir: Path) -> Optional[list[list[str]]]:
    """The rows of ``out_dir/loss_log.csv`` (header first; a torn last row dropped), or None when it
    does not exist. Reads only.

    Raises:
        ValueError: the file was not written by this package (other columns, unreadable rows).
    """
    path = out_dir / LOG_NAME
    if not path.exists():
        return None
    foreign = (f"{path} was not written by rudalle_pipe (expected the columns {','.join(LOG_HEADER)} and one "
               "row per logged step); it is left unchanged: move it away or choose another out_dir")
    try:
        text = files.read_bounded(path, 1 << 30, what="loss log").decode("utf-8")
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except (UnicodeDecodeError, csv.Error, ValueError) as err:
        raise ValueError(f"{foreign} ({err})") from None
    if not rows or rows[0] != LOG_HEADER:
        raise ValueError(foreign)
    if len(rows) > 1 and not text.endswith("\n"):
        rows = rows[:-1]  # a row torn by an interrupt: only ever the last one, without its line end
    bad = [n for n, row in enumerate(rows[1:], start=2) if _parse_row(row) is None]
    if bad:
        raise ValueError(f"{foreign} (row {bad[0]} is not step,loss,lr,seconds)")
    return rows


def prepare_log(out_dir: Path, start: int) -> Path:
    """Create ``loss_log.csv`` or cut it back to the rows of steps ``<= start`` (atomically: an
    interrupt leaves the old file or the new one); main process only. Returns its path.

    Raises:
        ValueError: the file was not written by this package; it is left unchanged.
    """
    path = out_dir / LOG_NAME
    rows = read_log(out_dir)
    kept = [LOG_HEADER] + [r for r in (rows or [])[1:] if int(r[0]) <= start]
    if rows is None or kept != rows or not path.read_bytes().endswith(b"\n"):
        buffer = io.StringIO()
        csv.writer(buffer).writerows(kept)
        files.atomic_write(path, buffer.getvalue())
    return path


def write_log_row(log_file: Any, row: list[Any]) -> None:
    """Append one ``step,loss,lr,seconds`` row to the open loss log and flush it."""
    csv.writer(log_file).writerow(row)
    log_file.flush()


# ----------------------------------------------------------------------------------- exports
_EXPORT_NAME = re.compile(r"^step-([0-9]{1,12})$")


def _export_step(path: Path) -> Optional[int]:
    """N when ``path`` is a ``step-<N>`` folder written by :func:`write_export`, else None."""
    match = _EXPORT_NAME.match(path.name)
    if not match or path.is_symlink() or not path.is_dir():
        return None
    try:
        marker = json.loads((path / EXPORT_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    step = int(match.group(1))
    return step if isinstance(marker, dict) and marker.get("step") == step else None


def write_export(out_dir: Path, step: int, write: Callable[[Path], None]) -> Path:
    """Build ``out_dir/step-<step>`` atomically with ``write(folder)`` plus the marker (last).

    An export of the same step written earlier by this package (a resumed run saving the step again)
    is replaced; any other existing ``step-<step>`` raises ``FileExistsError`` and is left alone.
    """
    target = out_dir / f"step-{step}"
    if target.exists() or target.is_symlink():
        if _export_step(target) != step:
            raise FileExistsError(f"{target} exists and was not written by rudalle_pipe; move it away or "
                                  "choose another out_dir")
        _remove(target)
    with files.atomic_directory(target) as tmp:
        write(tmp)
        files.atomic_write(tmp / EXPORT_MARKER, json.dumps({"step": step}) + "\n")
    return target


def rotate_exports(out_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` exports written by :func:`write_export` (others are never
    touched); returns the deleted folders."""
    ours = sorted((s, p) for p in out_dir.iterdir() if (s := _export_step(p)) is not None)
    doomed = [p for _, p in ours[:max(0, len(ours) - keep)]]
    for path in doomed:
        _remove(path)
    return doomed


def foreign_exports(out_dir: Path, wanted: Callable[[int], bool]) -> list[Path]:
    """The ``step-<N>`` entries with ``wanted(N)`` that exist but were not written by this package
    (an export would have to replace them)."""
    found = []
    for path in sorted(out_dir.iterdir()) if out_dir.is_dir() else []:
        match = _EXPORT_NAME.match(path.name)
        if match and wanted(int(match.group(1))) and _export_step(path) is None:
            found.append(path)
    return found
