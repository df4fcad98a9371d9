"""rudalle_pipe.files: atomic writes and folders (with injected interrupts and full disks), paths
that cannot leave their folder, bounded reads, and the writability check."""
import errno
import os
from pathlib import Path

import pytest

from rudalle_pipe.files import (UnsafePathError, atomic_directory, atomic_write, check_writable_dir, read_bounded,
                                resolve_inside)


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write(target, "old")
    atomic_write(target, b"new")
    assert target.read_text() == "new"
    assert _listing(tmp_path) == ["a.txt"]  # no temporary left


@pytest.mark.parametrize("fault", [KeyboardInterrupt, lambda: OSError(errno.ENOSPC, "No space left on device")])
def test_interrupted_or_full_disk_write_leaves_the_old_file(tmp_path, fault):
    target = tmp_path / "a.txt"
    atomic_write(target, "old")

    def writer(f):
        f.write(b"half of the new")
        raise fault()

    with pytest.raises((KeyboardInterrupt, OSError)):
        atomic_write(target, writer)
    assert target.read_text() == "old"
    assert _listing(tmp_path) == ["a.txt"]


def test_no_overwrite_refuses_even_a_file_that_appears_meanwhile(tmp_path):
    target = tmp_path / "a.txt"

    def writer(f):
        target.write_text("user's file")  # appears while we write
        f.write(b"ours")

    with pytest.raises(FileExistsError):
        atomic_write(target, writer, overwrite=False)
    assert target.read_text() == "user's file"
    assert _listing(tmp_path) == ["a.txt"]


def test_atomic_directory_appears_only_when_complete(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text("{}")
            raise KeyboardInterrupt
    assert _listing(tmp_path) == []
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("{}")
        assert not target.exists()
    assert _listing(target) == ["config.json"]
    with pytest.raises(FileExistsError):
        with atomic_directory(target):
            pass
    assert _listing(target) == ["config.json"]


def test_resolve_inside_refuses_escapes(tmp_path):
    root = tmp_path / "pipe"
    root.mkdir()
    (root / "ok.bin").write_bytes(b"x")
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"y")
    os.symlink(outside, root / "link.safetensors")
    assert resolve_inside(root, "ok.bin", what="index") == root / "ok.bin"
    for bad in ["../secret.safetensors", str(outside), "a/../../secret.safetensors", "link.safetensors", "",
                "..\\secret", 3]:
        with pytest.raises(UnsafePathError) as info:
            resolve_inside(root, bad, what="index")
        assert "index" in str(info.value)
    # a sandbox wider than the folder (a Hub snapshot linking into its repo's blobs/) is allowed
    assert resolve_inside(root, "link.safetensors", what="index", sandbox=tmp_path).name == "link.safetensors"


def test_read_bounded_refuses_devices_and_large_files(tmp_path):
    small = tmp_path / "small"
    small.write_bytes(b"abc")
    assert read_bounded(small, 3, what="bpe.model") == b"abc"
    with pytest.raises(ValueError, match="at most 2"):
        read_bounded(small, 2, what="bpe.model")
    with pytest.raises(ValueError, match="not a regular file"):
        read_bounded("/dev/zero", 10, what="bpe.model")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="not a regular file"):
        read_bounded(tmp_path / "fifo", 10, what="bpe.model")


def test_check_writable_dir(tmp_path):
    check_writable_dir(tmp_path / "new" / "deeper", what="--out")
    assert _listing(tmp_path) == []  # nothing created
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="--out"):
        check_writable_dir(tmp_path / "file" / "below", what="--out")
    with pytest.raises(OSError, match="MiB are free") as info:
        check_writable_dir(tmp_path, needed_bytes=2**62, what="--out")
    assert info.value.errno == errno.ENOSPC


def test_an_unfinished_run_is_cleared_of_its_own_files_only(tmp_path):
    """What a killed run leaves (its files, its staged and nested temporaries) goes; the user's files stay,
    and so do temporaries of names a run never writes."""
    from rudalle_pipe.files import temp_target
    from rudalle_pipe.outputs import remove_unfinished_run

    ours = ["image_000.png", "results.json", "contact_sheet.png", ".image_001.png.0123456789ab.tmp",
            "..results.json.aaaaaaaaaaaa.tmp.bbbbbbbbbbbb.tmp"]
    theirs = ["notes.txt", ".notes.txt.0123456789ab.tmp", "image_1.png", "image_000.png.bak"]
    for name in ours + theirs:
        (tmp_path / name).write_bytes(b"x")
    remove_unfinished_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)
    assert temp_target("..a.png.aaaaaaaaaaaa.tmp.bbbbbbbbbbbb.tmp") == "a.png" and temp_target("a.png") is None
