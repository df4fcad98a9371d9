"""Issue 10 for `rudalle-pipe generate`: checks before any model loads, atomic outputs with
results.json as the completion record, --overwrite that removes only a previous run's files, and an
interrupt or a full disk injected at every write of a run (the rerun gives the same files)."""
import errno
import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rudalle_pipe.files as files
import rudalle_pipe.generation
import rudalle_pipe.pipeline
from conftest import REPO_ROOT
from rudalle_pipe.cli import EXIT_FAILURE, EXIT_USAGE
from test_cli import SIZE, TEXT, bare_dir, pipe_dir, run  # noqa: F401 - fixtures
from test_realesrgan import NearestUpscaler, _random_image

INTERRUPTED = 130
NOTES = b"my own notes, not rudalle's\n"


@pytest.fixture
def no_load(monkeypatch):
    """Fail the run if any model is loaded: every check must come first."""
    calls = []

    def fake_load(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model was loaded before the command line was checked")

    monkeypatch.setattr(rudalle_pipe.pipeline, "load_pipeline", fake_load)
    return calls


def _one_line_error(stderr: str) -> str:
    assert stderr.startswith("rudalle-pipe: error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    return stderr


# ------------------------------------------------------------------------ bad command lines: exit 2
@pytest.mark.parametrize("extra, message", [
    (["--device", "meta"], "--device 'meta' is not a device this torch can run on"),
    (["--device", "xla"], "--device 'xla' is not a device this torch can run on"),
    (["--device", "cuda:7"], "--device 'cuda:7' is not a device this torch can run on"),
    (["--device", "tpu9"], "--device 'tpu9' is not a device this torch can run on"),
    (["--num-images", "100000000"], "--num-images must be in [1, 4096], got 100000000"),
    (["--batch-size", "100000000"], "--batch-size must be in [1, 4096], got 100000000"),
    (["--top-p", "1.5"], "--top-p must be a finite number in (0, 1], got 1.5"),
    (["--top-p", "nan"], "--top-p must be a finite number in (0, 1], got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number > 0, got inf"),
    (["--temperature", "nan"], "--temperature must be a finite number > 0, got nan"),
    (["--top-k", "0"], "--top-k must be in [1, 50], got 0"),
    (["--seed", "-1"], "--seed must be in [0, "),
])
def test_bad_values_exit_2_naming_the_flag_before_loading(pipe_dir, tmp_path, capsys, no_load, extra, message):
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "generate", TEXT, "--model", pipe_dir, "--out", out, *extra)
    assert code == EXIT_USAGE, stderr
    assert message in _one_line_error(stderr)
    if "--device" in extra:
        assert "valid choices: cpu" in stderr
    assert "top_p" not in stderr and "num_images" not in stderr and "temperature must" not in stderr.replace(
        "--temperature must", "")
    assert no_load == [] and stdout == "" and not out.exists()


def test_empty_text_and_unknown_model_name_their_argument(tmp_path, capsys, no_load):
    code, _, stderr = run(capsys, "generate", "  ", "--out", tmp_path / "o")
    assert code == EXIT_USAGE and _one_line_error(stderr).startswith("rudalle-pipe: error: TEXT is empty")
    code, _, stderr = run(capsys, "generate", TEXT, "--model", "Picasso", "--out", tmp_path / "o")
    assert code == EXIT_USAGE and "error: --model: unknown model 'Picasso'" in _one_line_error(stderr)
    assert no_load == []


def test_invalid_utf8_text_exits_2(pipe_dir, tmp_path, capsys, no_load):
    # Python turns undecodable argv bytes into lone surrogates (surrogateescape)
    code, _, stderr = run(capsys, "generate", "кот \udcff\udcfe", "--model", pipe_dir, "--out", tmp_path / "o")
    assert code == EXIT_USAGE
    assert "TEXT is not valid UTF-8" in _one_line_error(stderr) and "0xff" in stderr
    assert no_load == [] and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_invalid_utf8_argv_from_a_shell(bare_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "LC_ALL": "C.UTF-8"}
    argv = [sys.executable, "-m", "rudalle_pipe", "generate", b"\xd0\xba\xff", "--model", str(bare_dir),
            "--out", str(tmp_path / "o")]
    done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, timeout=120)
    assert done.returncode == EXIT_USAGE, done.stderr
    assert b"TEXT is not valid UTF-8" in done.stderr and done.stderr.count(b"\n") == 1
    assert not (tmp_path / "o").exists()


def test_an_error_message_is_never_empty(bare_dir, tmp_path, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(rudalle_pipe.generation, "generate_images", out_of_memory)
    code, _, stderr = run(capsys, "generate", TEXT, "--model", bare_dir, "--out", tmp_path / "o", "--no-progress")
    assert code == EXIT_FAILURE
    assert _one_line_error(stderr).strip() != "rudalle-pipe: error:"
    assert "MemoryError" in stderr


# ---------------------------------------------------------- the output folder, checked before loading
def test_out_below_a_file_fails_before_loading(pipe_dir, tmp_path, capsys, no_load):
    (tmp_path / "file").write_bytes(NOTES)
    code, _, stderr = run(capsys, "generate", TEXT, "--model", pipe_dir, "--out", tmp_path / "file" / "sub")
    assert code == EXIT_FAILURE
    assert "--out" in _one_line_error(stderr) and "is a file, not a folder" in stderr
    assert no_load == [] and (tmp_path / "file").read_bytes() == NOTES


@pytest.mark.parametrize("err", [errno.EACCES, errno.EROFS])
def test_read_only_out_fails_before_loading(pipe_dir, tmp_path, capsys, no_load, monkeypatch, err):
    """Tests run as root, for whom chmod does not make a folder read-only: opening a new file in
    --out fails instead, as it does on a read-only mount."""
    out = tmp_path / "out"
    out.mkdir()
    real_open = open

    def read_only_open(path, mode="r", *args, **kwargs):
        if str(path).startswith(str(out)) and any(c in mode for c in "wxa"):
            raise OSError(err, os.strerror(err), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only_open)
    code, _, stderr = run(capsys, "generate", TEXT, "--model", pipe_dir, "--out", out)
    assert code == EXIT_FAILURE
    assert f"--out {out}: cannot write in {out}" in _one_line_error(stderr)
    assert no_load == [] and list(out.iterdir()) == []


def test_full_disk_fails_before_loading(pipe_dir, tmp_path, capsys, no_load, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    code, _, stderr = run(capsys, "generate", TEXT, "--model", pipe_dir, "--out", tmp_path / "o")
    assert code == EXIT_FAILURE
    assert "--out" in _one_line_error(stderr) and "MiB are free" in stderr
    assert no_load == [] and not (tmp_path / "o").exists()


def test_png_size_bound_holds_for_incompressible_images():
    from rudalle_pipe.outputs import png_bytes, png_size_bound

    for size in [(1, 1), (37, 53), (256, 256), (700, 130)]:
        image = _random_image("RGB", size, seed=sum(size))
        with_png = len(png_bytes(image))
        bound = png_size_bound(*size)
        assert with_png <= bound <= with_png * 1.01 + 2048, (size, with_png, bound)


def test_space_estimate_covers_a_real_run(pipe_dir, tmp_path, capsys, monkeypatch):
    """The estimate is an upper bound of what the run writes, and exactly that much free space is enough."""
    from rudalle_pipe.outputs import estimate_bytes

    argv = ["generate", TEXT, "--model", pipe_dir, "--num-images", 3, "--rerank", 2, "--seed", 1, "--no-progress"]
    code, _, stderr = run(capsys, *argv, "--out", tmp_path / "a")
    assert code == 0, stderr
    written = sum(p.stat().st_size for p in (tmp_path / "a").iterdir())
    free = estimate_bytes(num_images=3, kept=2, side=SIZE, scale=4, text=TEXT)
    assert written <= free <= 64 * written  # tiny images: headers dominate
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - free, free))
    code, _, stderr = run(capsys, *argv, "--out", tmp_path / "b")
    assert code == 0, stderr
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, free - 1))
    code, _, stderr = run(capsys, *argv, "--out", tmp_path / "c")
    assert code == EXIT_FAILURE and "MiB are free" in stderr


# ------------------------------------------------------------------ finite numbers in and out
def test_api_refuses_non_finite_floats(bare_dir):
    from rudalle_pipe.generation import generate_images

    pipe = rudalle_pipe.pipeline.load_pipeline(bare_dir)
    for kwargs, match in [(dict(temperature=float("inf")), "temperature must be a finite number > 0, got inf"),
                          (dict(temperature=float("nan")), "temperature must be a finite number"),
                          (dict(top_p=float("nan")), r"top_p must be a finite number in \(0, 1\], got nan"),
                          (dict(num_images=4097), r"num_images must be in \[1, 4096\], got 4097")]:
        args = dict(top_k=10, top_p=0.9, num_images=1, progress=False) | kwargs
        with pytest.raises(ValueError, match=match):
            generate_images(TEXT, pipe.tokenizer, pipe.dalle, pipe.vae, **args)


def _strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text("utf-8"), parse_constant=refuse)


def test_non_finite_perplexity_is_written_as_null(pipe_dir, tmp_path, capsys, monkeypatch):
    real = rudalle_pipe.generation.generate_images

    def with_bad_numbers(*args, **kwargs):
        gen = real(*args, **kwargs)
        gen.perplexities[0], gen.perplexities[1] = float("nan"), float("inf")
        return gen

    monkeypatch.setattr(rudalle_pipe.generation, "generate_images", with_bad_numbers)
    out = tmp_path / "o"
    code, _, stderr = run(capsys, "generate", TEXT, "--model", pipe_dir, "--num-images", 3, "--seed", 1,
                          "--out", out, "--no-progress")
    assert code == 0, stderr
    results = _strict_json(out / "results.json")
    assert [c["perplexity"] for c in results["candidates"]][:2] == [None, None]
    assert math.isfinite(results["candidates"][2]["perplexity"])
    assert "perplexity of candidate 0 is nan" in stderr and "written as null" in stderr


# --------------------------------------------------------------------------------- tile sizes
def test_tiny_tiles_with_a_large_overlap_are_refused():
    from rudalle_pipe.realesrgan import super_resolution

    image = _random_image("RGB", (64, 64), seed=0)
    with pytest.raises(ValueError, match=r"tile_size \(25\) must be >= 96 = max\(16, 4 \* tile_overlap \(24\)\)"):
        super_resolution([image], NearestUpscaler(4), tile_size=25, tile_overlap=24, progress=False)
    with pytest.raises(ValueError, match=r"tile_size \(8\) must be >= 16"):
        super_resolution([image], NearestUpscaler(4), tile_size=8, tile_overlap=0, progress=False)
    with pytest.raises(TypeError, match="tile_size must be an int"):
        super_resolution([image], NearestUpscaler(4), tile_size=32.0, tile_overlap=0, progress=False)
    super_resolution([image], NearestUpscaler(4), tile_size=96, tile_overlap=24, progress=False)  # the bound
    super_resolution([image], NearestUpscaler(4), progress=False)  # the defaults (192, 24)


@pytest.mark.parametrize("multiple, per_side", [(1, 1.41), (2, 1.46), (4, 1.5)])
def test_allowed_tiles_cost_at_most_2_25x_the_untiled_work(multiple, per_side):
    """Over every length and overlap, the smallest allowed tile sends at most 1.5x the pixels of a side
    through the network (1.41x for x4 models), so at most 2.25x in 2-D; tile 25 / overlap 24 sent 600x."""
    from rudalle_pipe.realesrgan import MIN_TILE_SIZE, _tile_span, min_tile_size, super_resolution

    worst = 0.0
    for overlap in range(0, 61):
        tile = min_tile_size(overlap, multiple)
        assert tile % multiple == 0 and tile >= max(MIN_TILE_SIZE, 4 * overlap)
        for length in range(multiple, 800, multiple):
            size, starts = _tile_span(length, tile, overlap, multiple)
            worst = max(worst, size * len(starts) / length)
    assert worst <= per_side, worst
    # counted on the network's inputs: pixels through it vs the untiled (padded) image, 2-D
    image = _random_image("RGB", (130, 97), seed=3)
    for overlap in (0, 4, 24):
        up = NearestUpscaler(4, multiple)
        super_resolution([image], up, tile_size=min_tile_size(overlap, multiple), tile_overlap=overlap,
                         progress=False)
        tiled = sum(b * h * w for b, _, h, w in up.calls)
        untiled = (127 + -127 % multiple) * (160 + -160 % multiple)
        assert tiled <= per_side**2 * untiled, (overlap, tiled / untiled)
    up = NearestUpscaler(4, multiple)  # the defaults: 192 / 24
    super_resolution([image], up, progress=False)
    assert sum(b * h * w for b, _, h, w in up.calls) <= per_side**2 * untiled


# --------------------------------------------------------------------------------- --overwrite
def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_overwrite_removes_the_stale_files_of_a_larger_run(pipe_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_bytes(NOTES)
    base = ["generate", TEXT, "--model", pipe_dir, "--out", out, "--no-progress", "--upscale", "none"]
    code, _, stderr = run(capsys, *base, "--num-images", 3, "--rerank", 3, "--seed", 5)
    assert code == 0, stderr
    assert _listing(out) == ["contact_sheet.png", "image_000.png", "image_001.png", "image_002.png",
                             "notes.txt", "results.json"]
    code, _, stderr = run(capsys, *base, "--num-images", 1, "--rerank", 1, "--seed", 1, "--overwrite")
    assert code == 0, stderr
    assert _listing(out) == ["contact_sheet.png", "image_000.png", "notes.txt", "results.json"]
    assert (out / "notes.txt").read_bytes() == NOTES
    assert [im["file"] for im in _strict_json(out / "results.json")["images"]] == ["image_000.png"]


def test_overwrite_never_replaces_a_file_no_results_json_lists(pipe_dir, tmp_path, capsys, no_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "image_000.png").write_bytes(NOTES)  # the user's, with a name the run wants
    for extra in ([], ["--overwrite"]):
        code, _, stderr = run(capsys, "generate", TEXT, "--model", pipe_dir, "--out", out, *extra)
        assert code == EXIT_FAILURE
        assert str(out / "image_000.png") in _one_line_error(stderr) and "no results.json" in stderr
        assert (out / "image_000.png").read_bytes() == NOTES and _listing(out) == ["image_000.png"]
    assert no_load == []


def test_overwrite_removes_only_names_a_run_can_write(pipe_dir, tmp_path, capsys):
    """A results.json (edited, or from elsewhere) that lists the user's files never gets them deleted."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_bytes(NOTES)
    (tmp_path / "outside.png").write_bytes(NOTES)
    (out / "image_007.png").write_bytes(NOTES)
    record = {"images": [{"file": "notes.txt"}, {"file": "../outside.png"}, {"file": "image_007.png"}],
              "contact_sheet": {"file": "/etc/hostname"}}
    (out / "results.json").write_text(json.dumps(record))
    code, _, stderr = run(capsys, "generate", TEXT, "--model", pipe_dir, "--out", out, "--num-images", 1,
                          "--seed", 1, "--overwrite", "--no-progress")
    assert code == 0, stderr
    assert (out / "notes.txt").read_bytes() == NOTES and (tmp_path / "outside.png").read_bytes() == NOTES
    assert not (out / "image_007.png").exists()  # listed, and a name the run writes: the previous run's
    assert _listing(out) == ["contact_sheet.png", "image_000.png", "notes.txt", "results.json"]


def test_a_results_json_that_is_not_a_record_is_never_replaced(pipe_dir, tmp_path, capsys, no_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_bytes(b"{ my results")
    code, _, stderr = run(capsys, "generate", TEXT, "--model", pipe_dir, "--out", out, "--overwrite")
    assert code == EXIT_FAILURE
    assert "is not a results.json written by rudalle-pipe" in _one_line_error(stderr)
    assert (out / "results.json").read_bytes() == b"{ my results" and no_load == []


# ------------------------------------------------- an interrupt / a full disk at every write of a run
class Faults:
    """Counts the steps that write to disk (a file write, an fsync, a rename, link or unlink, and the
    moment after each of those) and fails the ``fail_at``-th with ``kind``: "interrupt"
    (KeyboardInterrupt, at every step) or "enospc" (a full disk, at writes and file fsyncs; a write
    then stores half its bytes first)."""

    def __init__(self, fail_at: int = 0, kind: str = "interrupt"):
        self.fail_at, self.kind, self.steps = fail_at, kind, []

    def step(self, what: str, partial=None) -> None:
        self.steps.append(what)
        if len(self.steps) == self.fail_at:
            if self.kind == "interrupt":
                raise KeyboardInterrupt
            if partial is not None:
                partial()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def install(self, monkeypatch) -> None:
        faults, real_open = self, open

        class File:
            def __init__(self, f):
                self._f = f

            def write(self, data):
                faults.step("write", lambda: (self._f.write(bytes(data)[: len(data) // 2]), self._f.flush()))
                return self._f.write(data)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

            def __getattr__(self, name):
                return getattr(self._f, name)

        monkeypatch.setattr(files, "open", lambda *a, **k: File(real_open(*a, **k)), raising=False)
        for name in ("fsync", "replace", "link", "rename", "unlink"):
            real = getattr(os, name)

            def wrapped(*args, _real=real, _name=name, **kwargs):
                if _name == "fsync" and stat.S_ISDIR(os.fstat(args[0]).st_mode):
                    _name = "fsync-dir"  # best effort: files._fsync_dir ignores its OSError
                faults.step(_name)
                result = _real(*args, **kwargs)
                faults.step(f"after {_name}")  # Ctrl-C between two steps (e.g. a link and its unlink)
                return result

            monkeypatch.setattr(os, name, wrapped)


def _contents(directory: Path) -> dict:
    """Every file's bytes; results.json parsed, without its timings."""
    found = {}
    for path in sorted(directory.iterdir()):
        if path.name == "results.json":
            record = _strict_json(path)
            record.pop("timings_s")
            found[path.name] = record
        else:
            found[path.name] = path.read_bytes()
    return found


def _assert_no_torn_file(directory: Path) -> None:
    """No temporary file left, every PNG whole, results.json valid and listing only present files.

    Tolerated: the empty hidden probe of files.check_writable_dir when Ctrl-C lands between its
    create and its unlink (it is never mistaken for an output, and a rerun ignores it)."""
    for path in list(directory.iterdir()):
        if re.fullmatch(r"\.probe\.[0-9a-f]{12}\.tmp", path.name) and path.stat().st_size == 0:
            path.unlink()
            continue
        assert not (path.name.startswith(".") and path.name.endswith(".tmp")), f"leftover {path.name}"
        if path.suffix == ".png":
            with Image.open(path) as image:
                image.load()  # a truncated PNG raises
        elif path.name == "results.json":
            record = _strict_json(path)
            for name in [im["file"] for im in record["images"]] + [record["contact_sheet"]["file"]]:
                assert (directory / name).is_file(), f"results.json lists a missing {name}"


def _run_with_faults(capsys, monkeypatch, argv, faults: Faults) -> int:
    with monkeypatch.context() as patch:
        faults.install(patch)
        code, _, stderr = run(capsys, *argv)
    return code, stderr


@pytest.fixture
def load_once(monkeypatch):
    """Loading and sampling write nothing, so they are not under test here: each pipeline is loaded
    once and each sampling call runs once (the same seeds give the same images anyway), so that the
    dozens of runs below take seconds. Reranking, upscaling and every write still run each time."""
    real_load, real_generate, loaded, generated = (rudalle_pipe.pipeline.load_pipeline,
                                                   rudalle_pipe.generation.generate_images, {}, {})

    def load(name, **kwargs):
        key = (str(name), *sorted((k, str(v)) for k, v in kwargs.items()))
        if key not in loaded:
            loaded[key] = real_load(name, **kwargs)
        return loaded[key]

    def generate(text, tokenizer, dalle, vae, **kwargs):
        key = (text, id(dalle), *sorted((k, str(v)) for k, v in kwargs.items()))
        if key not in generated:
            generated[key] = real_generate(text, tokenizer, dalle, vae, **kwargs)
        return generated[key]

    monkeypatch.setattr(rudalle_pipe.pipeline, "load_pipeline", load)
    monkeypatch.setattr(rudalle_pipe.generation, "generate_images", generate)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: idle OpenMP workers only slow a shared CPU down (30x seen)
    yield
    torch.set_num_threads(threads)


NEW = ["--num-images", 3, "--rerank", 2, "--upscale", "x4", "--seed", 1]
OLD = ["--num-images", 4, "--rerank", 4, "--upscale", "none", "--seed", 5]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["interrupt", "enospc"])
def test_fault_at_every_write_of_a_fresh_run(pipe_dir, tmp_path, capsys, monkeypatch, load_once, kind):
    out = tmp_path / "out"
    argv = ["generate", TEXT, "--model", pipe_dir, "--out", out, "--no-progress", *NEW]
    out.mkdir()
    (out / "notes.txt").write_bytes(NOTES)
    counter = Faults()
    code, stderr = _run_with_faults(capsys, monkeypatch, argv, counter)
    assert code == 0, stderr
    expected = _contents(out)
    assert set(expected) == {"notes.txt", "results.json", "contact_sheet.png", "image_000.png", "image_001.png"}
    points = [i + 1 for i, what in enumerate(counter.steps) if kind == "interrupt" or what in ("write", "fsync")]
    assert counter.steps.count("write") == 4 and len(points) >= 8, counter.steps  # 4 files, each written+fsynced
    for fail_at in points:
        shutil.rmtree(out)
        out.mkdir()
        (out / "notes.txt").write_bytes(NOTES)
        code, stderr = _run_with_faults(capsys, monkeypatch, argv, Faults(fail_at, kind))
        assert code == (INTERRUPTED if kind == "interrupt" else EXIT_FAILURE), (fail_at, stderr)
        if kind == "enospc":
            assert "No space left on device" in _one_line_error(stderr)
        _assert_no_torn_file(out)
        assert _listing(out) == ["notes.txt"], (fail_at, counter.steps[fail_at - 1])  # nothing of this run left
        code, _, stderr = run(capsys, *argv)  # the rerun, same arguments
        assert code == 0, (fail_at, stderr)
        assert _contents(out) == expected, fail_at


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["interrupt", "enospc"])
def test_fault_at_every_write_of_an_overwriting_run(pipe_dir, tmp_path, capsys, monkeypatch, load_once, kind):
    """--overwrite over a larger earlier run: a fault leaves that run whole, or (when it strikes
    while files are moved into place) neither run; the user's file always survives."""
    template, out = tmp_path / "template", tmp_path / "out"
    template.mkdir()
    (template / "notes.txt").write_bytes(NOTES)
    code, _, stderr = run(capsys, "generate", TEXT, "--model", pipe_dir, "--out", template, "--no-progress", *OLD)
    assert code == 0, stderr
    old = _contents(template)
    argv = ["generate", TEXT, "--model", pipe_dir, "--out", out, "--no-progress", "--overwrite", *NEW]
    shutil.copytree(template, out)
    counter = Faults()
    code, stderr = _run_with_faults(capsys, monkeypatch, argv, counter)
    assert code == 0, stderr
    expected = _contents(out)
    assert set(expected) == {"notes.txt", "results.json", "contact_sheet.png", "image_000.png", "image_001.png"}
    points = [i + 1 for i, what in enumerate(counter.steps) if kind == "interrupt" or what in ("write", "fsync")]
    outcomes = set()
    for fail_at in points:
        shutil.rmtree(out)
        shutil.copytree(template, out)
        code, stderr = _run_with_faults(capsys, monkeypatch, argv, Faults(fail_at, kind))
        assert code == (INTERRUPTED if kind == "interrupt" else EXIT_FAILURE), (fail_at, stderr)
        _assert_no_torn_file(out)
        now = _contents(out)
        assert now in (old, {"notes.txt": NOTES}), (fail_at, counter.steps[fail_at - 1], sorted(now))
        outcomes.add("old run kept" if now == old else "clean")
        code, _, stderr = run(capsys, *argv)
        assert code == 0, (fail_at, stderr)
        assert _contents(out) == expected, fail_at
    assert "old run kept" in outcomes


def test_an_interrupted_run_removes_the_folder_it_created(pipe_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "new" / "out"
    argv = ["generate", TEXT, "--model", pipe_dir, "--out", out, "--no-progress", *NEW]
    code, _ = _run_with_faults(capsys, monkeypatch, argv, Faults(1, "interrupt"))
    assert code == INTERRUPTED and not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------ show
def test_show_writes_atomically_and_removes_its_files_on_failure(tmp_path, monkeypatch):
    from rudalle_pipe.show import show

    images = [_random_image("RGB", (16, 16), seed=i) for i in range(3)]
    real_save, saves = Image.Image.save, []

    def full_disk_on_second_save(self, fp, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # part of the PNG lands, then the disk is full
            fp.write(b"\x89PNG\r\n\x1a\n")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk_on_second_save)
    (tmp_path / "notes.txt").write_bytes(NOTES)
    with pytest.raises(OSError, match="No space left"):
        show(images, save_dir=tmp_path, prefix="cat")
    assert _listing(tmp_path) == ["notes.txt"]
    monkeypatch.setattr(Image.Image, "save", real_save)
    show(images, save_dir=tmp_path, prefix="cat")
    assert _listing(tmp_path) == ["cat_000.png", "cat_001.png", "cat_002.png", "grid.png", "notes.txt"]
    with Image.open(tmp_path / "cat_001.png") as saved:
        assert np.array_equal(np.asarray(saved), np.asarray(images[1]))


# ------------------------------------------------------------------- a file system without hard links
def test_run_on_a_file_system_without_hard_links(pipe_dir, tmp_path, capsys, monkeypatch):
    """FAT and some network shares refuse os.link: new names are then reserved with an exclusive create
    and replaced, so a run still works and still never replaces a file it did not expect."""
    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "out"
    argv = ["generate", TEXT, "--model", pipe_dir, "--out", out, "--num-images", 1, "--seed", 1, "--no-progress"]
    code, _, stderr = run(capsys, *argv)
    assert code == 0, stderr
    assert _listing(out) == ["contact_sheet.png", "image_000.png", "results.json"]
    _assert_no_torn_file(out)
    (tmp_path / "x").write_bytes(NOTES)
    files.atomic_write(tmp_path / "y", b"new", overwrite=False)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        files.atomic_write(tmp_path / "x", b"new", overwrite=False)
    assert (tmp_path / "x").read_bytes() == NOTES and (tmp_path / "y").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
