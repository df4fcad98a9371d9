"""Safe file handling, in one place: every write atomic, every read inside its folder.

* :func:`atomic_write` writes a file under a temporary name in the same folder, fsyncs it, then
  renames it over the target, so a reader (or a rerun after Ctrl-C or a full disk) sees the old file
  or the new one, never a torn one. With ``overwrite=False`` an existing file is never replaced, even
  one that appeared meanwhile.
* :func:`atomic_directory` does the same for a folder (a saved model, a pipeline, a checkpoint): it
  is built under a temporary name and renamed into place only when complete.
* :func:`resolve_inside` turns a name read from a file (an index entry, a config field) into a path
  that is guaranteed to stay inside its folder: no absolute paths, no ``..``, no symlink leading out.
* :func:`read_bounded` reads a regular file of bounded size (never a device, a FIFO or a huge file).
* :func:`check_writable_dir` checks, before any slow work, that a folder can be created and written
  and has room for an estimated number of bytes.

Temporary names start with ``.`` and end with ``.tmp``; a crash can leave one behind, and it is
never mistaken for a real file.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import uuid
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator, Optional, Union

__all__ = ["atomic_write", "rename_into_place", "fsync_dir", "atomic_directory", "resolve_inside", "read_bounded",
           "check_writable_dir", "fsync_tree", "temp_target", "UnsafePathError"]

Payload = Union[bytes, str, Callable[[BinaryIO], None]]


class UnsafePathError(ValueError):
    """A name read from a file points outside the folder that holds it."""


def _temp_sibling(path: Path) -> Path:
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"


_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[0-9a-f]{12}\.tmp")  # what _temp_sibling makes


def temp_target(name: str) -> Optional[str]:
    """The name that the temporary file ``name`` was to become (nested temporaries unwrapped:
    ``..a.png.<id>.tmp.<id>.tmp`` -> ``a.png``), or None when ``name`` is not a temporary name."""
    match = _TEMP_NAME.fullmatch(name)
    if match is None:
        return None
    return temp_target(match["target"]) or match["target"]


def fsync_dir(directory: Union[str, os.PathLike]) -> None:
    """Make renames inside ``directory`` durable, e.g. after :func:`rename_into_place` (best effort:
    not every platform allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Union[str, os.PathLike], data: Payload, *, overwrite: bool = True,
                 encoding: str = "utf-8") -> Path:
    """Write ``data`` to ``path`` atomically and durably.

    Args:
        path: the target file; its folder must exist.
        data: bytes, a str (written with ``encoding``), or a callable ``write(f)`` that writes into an
            open binary file (e.g. ``lambda f: image.save(f, format="PNG")``).
        overwrite: replace an existing file. ``False`` raises ``FileExistsError`` instead, also when
            the file appeared while this one was being written.

    The temporary file is removed whatever goes wrong (``OSError`` such as a full disk, or
    ``KeyboardInterrupt``), and the target is then untouched.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    tmp = _temp_sibling(path)
    try:
        with open(tmp, "xb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode(encoding) if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        rename_into_place(tmp, path, overwrite=overwrite)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def rename_into_place(tmp: Union[str, os.PathLike], path: Union[str, os.PathLike], *, overwrite: bool) -> None:
    """Rename the finished file ``tmp`` to ``path`` in the same folder (the commit of a write).

    ``overwrite=False`` never replaces a file, even one that appeared meanwhile: it raises
    ``FileExistsError`` and leaves ``tmp`` in place. (A hard link does that atomically; on a file
    system without hard links the name is reserved with an exclusive create, then replaced.)
    """
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if the target exists: never replaces a file
    except FileExistsError:
        raise FileExistsError(f"{path} exists; refusing to overwrite it") from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        try:  # no hard links here (FAT, some network shares): reserve the name, then replace it
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            raise FileExistsError(f"{path} exists; refusing to overwrite it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def fsync_tree(directory: Union[str, os.PathLike]) -> None:
    """fsync every file and folder under ``directory`` (before renaming it into place)."""
    directory = Path(directory)
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


@contextlib.contextmanager
def atomic_directory(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it to ``path`` when the block succeeds.

    ``path`` must not exist (an empty folder is allowed and replaced). On any exception, including
    ``KeyboardInterrupt``, the temporary folder is removed and ``path`` is left as it was::

        with atomic_directory("out/model") as tmp:
            (tmp / "config.json").write_text(...)
    """
    path = Path(path)
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty folder; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if path.is_dir():
            path.rmdir()  # empty (checked above); rename cannot replace it on every platform
        try:
            os.rename(tmp, path)
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(f"{path} appeared while it was being written; refusing to replace it") from err
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def resolve_inside(root: Union[str, os.PathLike], name: object, *, what: str,
                   sandbox: Union[str, os.PathLike, None] = None) -> Path:
    """``root / name``, refusing any ``name`` that could leave ``root``.

    Args:
        root: the folder the name belongs to.
        name: a relative POSIX path read from a file (e.g. an index's ``weight_map`` value).
        what: where the name came from, for the error (e.g. ``"model.safetensors.index.json"``).
        sandbox: the folder symlinks may resolve into (default ``root``); a Hugging Face cache
            snapshot links into its repo's ``blobs/`` folder, so there it is the repo folder.

    Raises:
        UnsafePathError: ``name`` is not a str, is empty, absolute, holds ``..``, a backslash or a
            NUL, or resolves (through symlinks) outside ``sandbox``. The message names the entry,
            never the contents of any file.
    """
    if not isinstance(name, str) or not name.strip():
        raise UnsafePathError(f"{what}: the file name {name!r} is not a non-empty string")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name or "\x00" in name or name.startswith("~"):
        raise UnsafePathError(f"{what}: the file name {name!r} points outside {root}; only names relative "
                              "to that folder, without '..', are allowed")
    path = Path(root) / pure
    fence = Path(sandbox if sandbox is not None else root).resolve()
    if not path.resolve().is_relative_to(fence):
        raise UnsafePathError(f"{what}: the file name {name!r} resolves (through a symlink) outside {fence}")
    return path


def read_bounded(path: Union[str, os.PathLike], max_bytes: int, *, what: str) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` bytes.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: it is not a regular file (a device, a FIFO, a folder) or is larger than
            ``max_bytes``; the message names ``what`` and the path, never the contents.
    """
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{what} {path} is not a regular file")
        if info.st_size > max_bytes:
            raise ValueError(f"{what} {path} is {info.st_size} bytes; at most {max_bytes} are allowed")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ValueError(f"{what} {path} grew past {max_bytes} bytes while it was read")
    return data


def check_writable_dir(directory: Union[str, os.PathLike], *, needed_bytes: int = 0, what: str) -> None:
    """Check, without leaving anything behind, that ``directory`` exists or can be created, can be
    written, and has ``needed_bytes`` free.

    Raises:
        NotADirectoryError: ``directory`` or one of its parents is a file.
        PermissionError: the nearest existing folder cannot be written.
        OSError: ``ENOSPC`` when less than ``needed_bytes`` is free.
    """
    directory = Path(directory)
    existing = directory
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise NotADirectoryError(f"{what} {directory}: {existing} is a file, not a folder")
    probe = _temp_sibling(existing / "probe")
    try:
        with open(probe, "xb"):
            pass
    except OSError as err:
        raise PermissionError(f"{what} {directory}: cannot write in {existing} ({err.strerror or err})") from err
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)
    free = shutil.disk_usage(existing).free
    if needed_bytes > free:
        raise OSError(errno.ENOSPC, f"{what} {directory}: needs about {needed_bytes / 2**20:.1f} MiB but only "
                                    f"{free / 2**20:.1f} MiB are free on its disk")
