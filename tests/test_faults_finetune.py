"""Fault injection for finetuning: an interrupt or a full disk at every write, torn and foreign state
in the run folder, data that is accepted but wrong, and command-line errors before any model loads.

The injector counts every write of a run (atomic writes, accelerate's checkpoint files, torch.save,
safetensors saves, config.json, loss-log rows, file copies, renames) and fails the N-th one part-way:
the half-written bytes really land where the write was going, then KeyboardInterrupt or
OSError(ENOSPC) is raised. The rerun with the same arguments must give the same model as an
uninterrupted run (torch.equal), and the user's own files in the run folder must survive."""
from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from PIL import Image

import rudalle_pipe.files as files_mod
from rudalle_pipe import finetune as ft
from rudalle_pipe.loader import get_rudalle_model
from rudalle_pipe.tokenizer import YTTMTokenizer
from rudalle_pipe.train import checkpoints, runs

from tiny import SIDE, tiny_dalle, tiny_vae

SIZE = SIDE * 8
RUN = {"steps": 3, "lr": 3e-3, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "keep_checkpoints": 1,
       "progress": False}


@pytest.fixture(autouse=True)
def one_thread():
    """Hundreds of tiny runs: one intra-op thread is several times faster than two on a busy 2-core CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer() -> YTTMTokenizer:
    from conftest import _fixtures_dir

    path = _fixtures_dir() / "tokenizer" / "bpe.model"
    if not path.is_file():
        pytest.skip(f"reference fixtures not found at {path}")
    return YTTMTokenizer.from_file(path)


def _data(folder: Path, n: int = 2) -> Path:
    """n coloured pictures with a captions.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [["file", "caption"]]
    for i in range(n):
        image = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
        image.paste(Image.new("RGB", (SIZE // 2, SIZE // 2), [(230, 40, 40), (40, 60, 230), (40, 200, 60)][i % 3]),
                    (SIZE // 4, SIZE // 4))
        image.save(folder / f"{i}.png")
        rows.append([f"{i}.png", ["красный квадрат", "синий квадрат", "зелёный квадрат"][i % 3]])
    with open(folder / "captions.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return folder


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


# ------------------------------------------------------------------------------- the injector
class Injector:
    """Counts writes; the ``fail_at``-th one writes half its bytes, then raises ``error()``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: Optional[int] = None,
                 error: Callable[[], BaseException] = lambda: KeyboardInterrupt("injected")) -> None:
        self.count, self.fail_at, self.error, self.fired, self.inside = 0, fail_at, error, None, False
        self.names: list[str] = []
        real_atomic = files_mod.atomic_write
        real_torch_save = torch.save
        real_copyfile = shutil.copyfile
        real_rename = os.rename
        real_write_text = Path.write_text
        real_log_row = checkpoints.write_log_row
        import accelerate.checkpointing as acc
        import huggingface_hub

        real_acc_save = acc.save
        real_hf_save = huggingface_hub.save_torch_state_dict

        def hit(name: str) -> bool:
            self.count += 1
            self.names.append(name)
            if self.count == self.fail_at:
                self.fired = name
                return True
            return False

        def half(path: Any) -> None:
            path = Path(path)
            if path.is_file():
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2])

        def atomic_write(path, data, **kw):
            if hit(f"atomic_write {Path(path).name}"):
                payload = io.BytesIO()
                if callable(data):
                    data(payload)
                else:
                    payload.write(data.encode() if isinstance(data, str) else data)

                def torn(f):
                    f.write(payload.getvalue()[: len(payload.getvalue()) // 2])
                    raise self.error()
                return real_atomic(path, torn, **kw)
            return real_atomic(path, data, **kw)

        def torch_save(obj, f, *args, **kw):
            real_torch_save(obj, f, *args, **kw)
            if not self.inside and hit("torch.save"):
                if isinstance(f, (str, os.PathLike)):
                    half(f)
                raise self.error()

        def acc_save(obj, f, *args, **kw):
            self.inside = True  # accelerate's save calls torch.save: one write, counted once
            try:
                real_acc_save(obj, f, *args, **kw)
            finally:
                self.inside = False
            if hit(f"accelerate save {Path(f).name}"):
                half(f)
                raise self.error()

        def hf_save(state, directory, *args, **kw):
            real_hf_save(state, directory, *args, **kw)
            if hit("save_torch_state_dict"):
                for p in Path(directory).glob("*.safetensors"):
                    half(p)
                raise self.error()

        def write_text(path, data, *args, **kw):
            if hit(f"write_text {Path(path).name}"):
                real_write_text(path, data[: len(data) // 2], *args, **kw)
                raise self.error()
            return real_write_text(path, data, *args, **kw)

        def log_row(log_file, row):
            if hit("loss-log row"):
                log_file.write(",".join(map(str, row))[:5])
                log_file.flush()
                raise self.error()
            real_log_row(log_file, row)

        def copyfile(src, dst, *args, **kw):
            result = real_copyfile(src, dst, *args, **kw)
            if hit(f"copyfile {Path(dst).name}"):
                half(dst)
                raise self.error()
            return result

        def rename(src, dst, *args, **kw):
            if hit(f"rename {Path(src).name} -> {Path(dst).name}"):
                raise self.error()
            return real_rename(src, dst, *args, **kw)

        monkeypatch.setattr(files_mod, "atomic_write", atomic_write)
        monkeypatch.setattr(torch, "save", torch_save)
        monkeypatch.setattr(acc, "save", acc_save)
        monkeypatch.setattr(huggingface_hub, "save_torch_state_dict", hf_save)
        monkeypatch.setattr(Path, "write_text", write_text)
        monkeypatch.setattr(checkpoints, "write_log_row", log_row)
        monkeypatch.setattr(shutil, "copyfile", copyfile)
        monkeypatch.setattr(os, "rename", rename)


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device (injected)")


def _interrupt() -> KeyboardInterrupt:
    return KeyboardInterrupt("injected")


def _user_files(out: Path) -> dict[Path, bytes]:
    """Files a user keeps in the run folder, under names close to the package's own."""
    made = {out / "notes.txt": b"my notes", out / "step-0" / "mine.txt": b"mine",
            out / "step-notes" / "plan.txt": b"plan"}
    for path, data in made.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return made


# ------------------------------------------------------------------- an interrupt at every write
def _finetune(tokenizer, data: Path, out: Path, **kw) -> ft.FinetuneResult:
    return ft.finetune(tiny_dalle(), tiny_vae(), tokenizer, data, out_dir=out, **{**RUN, **kw})


@pytest.mark.slow
def test_every_write_of_finetune_interrupted_or_out_of_space_then_rerun(tmp_path, tokenizer, monkeypatch):
    data = _data(tmp_path / "data")
    reference = _state(_finetune(tokenizer, data, tmp_path / "reference").model)
    with monkeypatch.context() as patch:
        counter = Injector(patch)
        _finetune(tokenizer, data, tmp_path / "count")
    total = counter.count
    kinds = " ".join(counter.names)
    for expected in ("atomic_write codes.pt", "atomic_write finetune.json", "atomic_write progress.json",
                     "accelerate save optimizer.bin", "torch.save", "save_torch_state_dict", "loss-log row",
                     "rename .checkpoint-new.tmp -> checkpoint", "atomic_write result.json"):
        assert expected in kinds, expected  # the injector sees every kind of write of a run
    assert total > 20
    for n in range(1, total + 1):
        for error in (_interrupt, _enospc):
            out = tmp_path / f"run{n}-{error.__name__}"
            mine = _user_files(out)
            with monkeypatch.context() as patch:
                injector = Injector(patch, fail_at=n, error=error)
                with pytest.raises((KeyboardInterrupt, OSError)):
                    _finetune(tokenizer, data, out)
            assert injector.fired, f"write {n} was not reached"
            result = _finetune(tokenizer, data, out)  # the same command again
            _assert_same(reference, _state(result.model), f"after {injector.fired} (write {n})")
            _assert_same(reference, _state(get_rudalle_model(str(out / "final"))), f"final/ after {injector.fired}")
            assert {p: p.read_bytes() for p in mine} == mine, f"user files after {injector.fired}"
            assert sorted(p.name for p in out.glob("step-*")) == ["step-0", "step-3", "step-notes"]
            assert json.loads((out / "result.json").read_text())["steps"] == 3
            with open(out / "loss_log.csv", newline="") as f:
                assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]


@pytest.mark.slow
def test_every_write_of_the_cli_after_final_then_rerun(tmp_path, fixtures_dir, monkeypatch, capsys):
    """`rudalle-pipe finetune` stopped anywhere while writing final/ and OUT/pipeline: the rerun
    completes the pipeline (never a half pipeline, never 'finished' without one)."""
    from rudalle_pipe.cli import main
    from rudalle_pipe.pipeline import load_pipeline, save_pipeline
    from tiny import tiny_pipeline

    base = save_pipeline(tiny_pipeline(fixtures_dir, tmp_path, clip=False, upscaler=False), tmp_path / "base")
    data = _data(tmp_path / "data")

    def argv(out: Path) -> list[str]:
        return ["finetune", str(data), "--out", str(out), "--model", str(base), "--steps", "2", "--lr", "3e-3",
                "--batch-size", "2", "--checkpoint-every", "2", "--no-progress"]

    assert main(argv(tmp_path / "reference")) == 0
    reference = _state(load_pipeline(tmp_path / "reference" / "pipeline").dalle)
    with monkeypatch.context() as patch:
        counter = Injector(patch)
        assert main(argv(tmp_path / "count")) == 0
    first = next(i for i, name in enumerate(counter.names, 1) if name.startswith("atomic_write result.json"))
    assert any(name.startswith("copyfile") for name in counter.names[first:])
    for n, error in [(n, e) for n in range(first, counter.count + 1) for e in (_interrupt, _enospc)]:
        out = tmp_path / f"run{n}-{error.__name__}"
        with monkeypatch.context() as patch:
            injector = Injector(patch, fail_at=n, error=error)
            assert main(argv(out)) == (130 if error is _interrupt else 1)
        assert injector.fired
        assert not (out / "pipeline").exists() or (out / "pipeline" / "dalle" / "model.safetensors").is_file()
        capsys.readouterr()
        assert main(argv(out)) == 0, f"rerun after {injector.fired}: {capsys.readouterr().err}"
        _assert_same(reference, _state(load_pipeline(out / "pipeline").dalle), f"pipeline after {injector.fired}")
    assert main(argv(out)) == 1
    assert "this run has finished" in capsys.readouterr().err


# ------------------------------------------------------------------------ torn and foreign state
def _stop_at(monkeypatch, step: int) -> None:
    from rudalle_pipe.train import common

    real = common.batch_indices

    def failing(s, *args, **kw):
        if s == step:
            raise KeyboardInterrupt(f"stopped at step {s}")
        return real(s, *args, **kw)

    monkeypatch.setattr(common, "batch_indices", failing)


def test_torn_or_corrupt_checkpoint_falls_back_or_starts_over(tmp_path, tokenizer, monkeypatch, caplog):
    data = _data(tmp_path / "data")
    kw = {"steps": 6, "keep_checkpoints": 0}
    reference = _state(_finetune(tokenizer, data, tmp_path / "reference", **kw).model)
    out = tmp_path / "run"
    with monkeypatch.context() as patch:  # checkpoint at step 2 ...
        _stop_at(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            _finetune(tokenizer, data, out, **kw)
    step2 = tmp_path / "step2"
    shutil.copytree(out / "checkpoint", step2)
    with monkeypatch.context() as patch:  # ... and at step 4
        _stop_at(patch, 5)
        with pytest.raises(KeyboardInterrupt):
            _finetune(tokenizer, data, out, **kw)
    assert json.loads((out / "checkpoint" / "progress.json").read_text())["step"] == 4
    assert not (out / "checkpoint-previous").exists()  # removed once the newer one was complete
    # issue case 3: model weights of step 4 beside a torn optimizer.bin; the previous checkpoint is whole
    shutil.copytree(step2, out / "checkpoint-previous")
    optimizer = out / "checkpoint" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    caplog.set_level(logging.WARNING)
    result = _finetune(tokenizer, data, out, **kw)
    assert "its files do not match progress.json (optimizer.bin)" in caplog.text
    assert "resuming from the previous checkpoint" in caplog.text and len(result.losses) == 4
    _assert_same(reference, _state(result.model), "after a torn checkpoint")

    # same size, garbage content: the load fails, the previous one is used
    shutil.rmtree(out / "final")
    (out / "result.json").unlink()
    shutil.copytree(step2, out / "checkpoint-previous")
    optimizer = out / "checkpoint" / "optimizer.bin"
    optimizer.write_bytes(b"\0" * optimizer.stat().st_size)
    caplog.clear()
    result = _finetune(tokenizer, data, out, **kw)
    assert "does not load" in caplog.text and len(result.losses) == 4
    _assert_same(reference, _state(result.model), "after a corrupt checkpoint")

    # an old-format checkpoint (progress.json without a manifest) is not trusted: start over
    shutil.rmtree(out / "final")
    marker = out / "checkpoint" / "progress.json"
    marker.write_text(json.dumps({"step": 2}))
    caplog.clear()
    result = _finetune(tokenizer, data, out, **kw)
    assert "no step and file manifest" in caplog.text and len(result.losses) == 6
    _assert_same(reference, _state(result.model), "after an untrusted checkpoint")
    with open(out / "loss_log.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]


def test_rotation_deletes_only_its_own_exports(tmp_path, tokenizer):
    data = _data(tmp_path / "data")
    out = tmp_path / "run"
    mine = _user_files(out)
    (out / "step-7").mkdir()  # named like an export of this package, but not one
    (out / "step-7" / "keep.txt").write_text("keep")
    result = _finetune(tokenizer, data, out, steps=4, checkpoint_every=1, keep_checkpoints=2)
    assert sorted(p.name for p in out.glob("step-*")) == ["step-0", "step-3", "step-4", "step-7", "step-notes"]
    assert {p: p.read_bytes() for p in mine} == mine and (out / "step-7" / "keep.txt").read_text() == "keep"
    assert result.path.is_dir()
    # a foreign folder that an export would replace: refused before any work, nothing touched
    clash = tmp_path / "clash"
    (clash / "step-2").mkdir(parents=True)
    (clash / "step-2" / "mine.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"step-2 would be replaced by checkpoint exports"):
        _finetune(tokenizer, data, clash, steps=4, checkpoint_every=2)
    assert (clash / "step-2" / "mine.txt").read_text() == "mine" and not (clash / "checkpoint").exists()


@pytest.mark.parametrize("content", ["epoch,accuracy\n1,0.5\n2,0.7\n", "step,loss,lr,seconds\nx,1,2,3\n1,2,3,4\n",
                                     "step,loss,lr,seconds\n1,2,3,4\nlast,1,2,3\n", "\xff\xfe not text", ""])
def test_a_foreign_loss_log_is_never_changed(tmp_path, tokenizer, content):
    data = _data(tmp_path / "data")
    out = tmp_path / "run"
    out.mkdir()
    log = out / "loss_log.csv"
    log.write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match=r"loss_log.csv was not written by rudalle_pipe"):
        _finetune(tokenizer, data, out)
    assert log.read_bytes() == content.encode("latin-1")
    assert not (out / "codes.pt").exists()  # refused before encoding


def test_a_foreign_checkpoint_folder_is_refused(tmp_path, tokenizer):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "my_model.bin").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=r"checkpoint exists but holds no progress.json"):
        _finetune(tokenizer, _data(tmp_path / "data"), out)
    assert (out / "checkpoint" / "my_model.bin").read_bytes() == b"mine"


def test_corrupt_codes_caches_are_rebuilt(tmp_path, tokenizer, caplog):
    pairs = ft.load_pairs(_data(tmp_path / "data"))
    dalle, vae = tiny_dalle(), tiny_vae()
    cache = tmp_path / "codes.pt"
    ids = ft.encode_pairs(dalle, vae, tokenizer, pairs, cache=cache)
    for torn in (cache.read_bytes()[: cache.stat().st_size // 2], b"", b"garbage" * 10):
        cache.write_bytes(torn)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert torch.equal(ft.encode_pairs(dalle, vae, tokenizer, pairs, cache=cache), ids)
        assert "is unreadable" in caplog.text
        assert torch.equal(torch.load(cache, weights_only=True)["codes"], ids[:, dalle.config.text_seq_length:])

    from rudalle_pipe.train import dalle as dalle_stage
    from rudalle_pipe.train.scenes import all_scenes
    from rudalle_pipe.vae import VQGAN

    from test_train import TINY_VQGAN

    torch.manual_seed(0)
    small = VQGAN(TINY_VQGAN).eval()
    scenes, variants = all_scenes("train")[:2], [0, None]  # a variation and a plain render
    path = tmp_path / "stage_codes.pt"
    codes = dalle_stage._load_or_encode(path, small, scenes, variants, 16, False)
    path.write_bytes(path.read_bytes()[:50])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert torch.equal(dalle_stage._load_or_encode(path, small, scenes, variants, 16, False), codes)
    assert "is unreadable" in caplog.text
    torch.manual_seed(1)  # another VQGAN of the same shape: the cache does not apply
    other = VQGAN(TINY_VQGAN).eval()
    assert torch.equal(dalle_stage._load_or_encode(path, other, scenes, variants, 16, False),
                       dalle_stage.encode_dataset(other, dalle_stage.render_scenes(scenes, 16, variants=variants)))
    # other variations of the same scenes: not the cached codes either
    assert torch.equal(dalle_stage._load_or_encode(path, other, scenes, [1, 2], 16, False),
                       dalle_stage.encode_dataset(other, dalle_stage.render_scenes(scenes, 16, variants=[1, 2])))


# ------------------------------------------------------------------------------ resume checks
def test_resume_refuses_other_data_weights_or_steps(tmp_path, tokenizer, monkeypatch):
    data = _data(tmp_path / "data")
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _stop_at(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            _finetune(tokenizer, data, out)
    other = _data(tmp_path / "other")
    (other / "captions.csv").write_text("file,caption\n0.png,другая подпись\n1.png,синий квадрат\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"other data \(2 pairs, sha256 .* the images, their file names or the captions"):
        _finetune(tokenizer, other, out)
    with pytest.raises(ValueError, match=r"other base weights"):
        ft.finetune(tiny_dalle(seed=1), tiny_vae(), tokenizer, data, out_dir=out, **RUN)
    with pytest.raises(ValueError, match=r"other settings \{'steps': \(3, 5\)\}"):
        _finetune(tokenizer, data, out, steps=5)
    log = (out / "loss_log.csv").read_bytes()
    _finetune(tokenizer, data, out, keep_checkpoints=2)  # free settings may change; the data folder may move
    assert (out / "loss_log.csv").read_bytes().startswith(log)
    record = json.loads((out / "finetune.json").read_text())
    assert record["format"] == 2 and record["pairs"] == 2 and len(record["base_weights_sha256"]) == 64
    assert record["base_weights_sha256"] == runs.weights_digest(tiny_dalle())


def test_weights_digest_is_stable():
    model = tiny_dalle()
    shuffled = torch.nn.Module()
    state = model.state_dict()
    digest = runs.weights_digest(model)
    assert digest == runs.weights_digest(tiny_dalle()) != runs.weights_digest(tiny_dalle(seed=1))
    assert digest != runs.weights_digest(tiny_dalle().half())  # dtype is part of the weights
    del shuffled, state


# ----------------------------------------------------------------------------------- the data
def test_data_errors_name_the_file(tmp_path, caplog):
    folder = _data(tmp_path / "data", 3)
    table = folder / "captions.csv"
    table.write_text("file,caption\n0.png,a\n2.png,b\n", encoding="utf-8")  # 1.png has no row
    with pytest.raises(ValueError, match=r"captions.csv has no row for 1.png"):
        ft.load_pairs(folder)
    with caplog.at_level(logging.WARNING):
        assert [Path(p).name for p, _ in ft.load_pairs(folder, skip_bad=True)] == ["0.png", "2.png"]
    assert "no row for 1.png" in caplog.text
    table.write_bytes("file,caption\n0.png,кот\n".encode("cp1251"))
    with pytest.raises(ValueError, match=r"captions file .*captions.csv is not UTF-8"):
        ft.load_pairs(folder)
    table.write_text("file,caption\n0.png\n1.png,b\n2.png,c\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"captions.csv line 2: 1 field\(s\)"):
        ft.load_pairs(folder)
    table.write_text('file,caption\n0.png,"unterminated\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"captions.csv"):
        ft.load_pairs(folder)
    table.write_text("file,caption\n../0.png,a\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"captions.csv line 2: the file name '../0.png' points outside"):
        ft.load_pairs(folder)
    table.unlink()
    for i, text in enumerate(["a", "", "c"]):
        (folder / f"{i}.txt").write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=r"caption file .*1.txt is empty"):
        ft.load_pairs(folder)
    (folder / "0.txt").write_bytes("кот".encode("cp1251"))
    with caplog.at_level(logging.WARNING):
        assert [Path(p).name for p, _ in ft.load_pairs(folder, skip_bad=True)] == ["2.png"]
    assert "0.txt is not UTF-8" in caplog.text and "1.txt is empty" in caplog.text
    (folder / "0.txt").write_text("a", encoding="utf-8")
    (folder / "1.txt").write_text("b", encoding="utf-8")
    png = (folder / "2.png").read_bytes()
    (folder / "2.png").write_bytes(png[: len(png) // 2])  # a truncated picture
    with pytest.raises(ValueError, match=r"image .*2.png cannot be decoded"):
        ft.load_pairs(folder)
    assert [Path(p).name for p, _ in ft.load_pairs(folder, skip_bad=True)] == ["0.png", "1.png"]
    with pytest.raises(ValueError, match=r"image .*2.png cannot be decoded"):
        ft.prepare_image(folder / "2.png", 16)


# ------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("extra, message", [
    (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    (["--caption", ""], "--caption is empty"),
    (["--caption", "  "], "--caption is empty"),
    (["--dtype", "float16"], "--dtype float16 needs --mixed-precision fp16 or bf16"),
    (["--lr", "inf"], "--lr must be a finite number in (0, 10.0], got inf"),
    (["--lr", "nan"], "--lr must be a finite number in (0, 10.0], got nan"),
    (["--lora-alpha", "nan"], "--lora-alpha must be a finite number > 0, got nan"),
    (["--lora-rank", "2", "--train", "head"], "--lora-rank=2 adapts attention/MLP linears"),
    (["--steps", "20000000"], "--steps must be in [1, 10000000], got 20000000"),
    (["--batch-size", "5000"], "--batch-size must be in [1, 4096], got 5000"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be in [1, 10000000], got 0"),
    (["--out", "FILE/below"], "--out"),  # exit 1 (the file system, not the syntax), as for generate
])
def test_cli_errors_come_before_any_model_loads(tmp_path, monkeypatch, capsys, extra, message):
    from rudalle_pipe import cli, pipeline

    data = _data(tmp_path / "data")
    (tmp_path / "FILE").write_text("a file")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = ["finetune", str(data), "--out", "run", "--model", "demo" if "demo" in pipeline.list_pipelines()
            else "Malevich", *extra]
    assert cli.main(argv) == (1 if extra[0] == "--out" else 2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_pipeline_export_is_atomic_and_stays_inside(tmp_path, monkeypatch):
    base = tmp_path / "base"
    (base / "vae").mkdir(parents=True)
    (base / "pipeline.json").write_text("{}")
    (base / "vae" / "model.safetensors").write_bytes(b"v" * 100)
    (base / "dalle").mkdir()
    model = tmp_path / "final"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"d" * 100)
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    (base / "vae" / "link.txt").symlink_to(secret)
    with pytest.raises(ValueError, match=r"vae/link.txt"):
        runs.export_pipeline(base, model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (base / "vae" / "link.txt").unlink()
    real = shutil.copyfile

    def failing(src, dst, *a, **k):
        if Path(src).parent == model:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copyfile", failing)
    with pytest.raises(OSError):
        runs.export_pipeline(base, model, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    monkeypatch.setattr(shutil, "copyfile", real)
    target = runs.export_pipeline(base, model, tmp_path / "out")
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == [
        "dalle/model.safetensors", "pipeline.json", "vae/model.safetensors"]


# ------------------------------------------------------------------------- accelerate launch
_LAUNCHED = r'''
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, sys.argv[2])
from rudalle_pipe import finetune as ft
from rudalle_pipe.tokenizer import YTTMTokenizer
from rudalle_pipe.train import common
from tiny import tiny_dalle, tiny_vae

torch.set_num_threads(1)
tokenizer = YTTMTokenizer.from_file(sys.argv[3])
pairs = [(Image.new("RGB", (32, 32), c), t) for c, t in [((200, 0, 0), "красный"), ((0, 0, 200), "синий")]]
root = Path(sys.argv[1])
kw = dict(steps=4, lr=3e-3, batch_size=2, checkpoint_every=2, log_every=1, keep_checkpoints=1, progress=False)
straight = ft.finetune(tiny_dalle(), tiny_vae(), tokenizer, pairs, out_dir=root / "a", **kw).model.state_dict()
real = common.batch_indices
common.batch_indices = lambda s, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()) if s == 3 else real(s, *a, **k)
try:
    ft.finetune(tiny_dalle(), tiny_vae(), tokenizer, pairs, out_dir=root / "b", **kw)
except KeyboardInterrupt:
    pass
common.batch_indices = real
resumed = ft.finetune(tiny_dalle(), tiny_vae(), tokenizer, pairs, out_dir=root / "b", **kw)
same = all(torch.equal(straight[k], v) for k, v in resumed.model.state_dict().items())
if common.is_main_process():
    from accelerate import PartialState
    print("RESULT", "same" if same else "different", len(resumed.losses), "world_size", PartialState().num_processes)
'''


@pytest.mark.slow
def test_finetune_resumes_under_a_two_process_launch(tmp_path):
    """Two CPU processes (torchrun, like `accelerate launch`): one writer, one RNG file per process,
    the schedule advancing once per step, and an interrupted run resuming to the same weights."""
    import subprocess
    import sys

    from conftest import REPO_ROOT, _fixtures_dir

    script = tmp_path / "launched.py"
    script.write_text(_LAUNCHED, encoding="utf-8")
    scratch = tmp_path / "scratch"  # torchrun's and torch's temporary folders, not /tmp
    scratch.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "TMPDIR": str(scratch),
           "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path), str(REPO_ROOT / "tests"),
                           str(_fixtures_dir() / "tokenizer" / "bpe.model")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("RESULT") == 1 and "RESULT same 2" in done.stdout, done.stdout
    assert "world_size 2" in done.stdout  # torchrun started two processes
    run = tmp_path / "b"
    assert sorted(p.name for p in (run / "checkpoint").glob("random_states_*.pkl")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    with open(run / "loss_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]  # one writer, the rows after step 2 replaced
    with open(tmp_path / "a" / "loss_log.csv", newline="") as f:
        assert [r["lr"] for r in csv.DictReader(f)] == ["3.000e-03", "2.325e-03", "9.750e-04", "3.000e-04"]


class _Payload:
    """Unpickling this calls ``Path.touch(marker)``: code execution, if anything fully unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_hostile_checkpoint_file_is_never_unpickled(tmp_path, tokenizer, monkeypatch, caplog):
    """accelerate < 1.2 (and any accelerate on torch < 2.4) reads optimizer.bin with a full unpickle;
    emulate that and check that resuming from a checkpoint whose optimizer.bin is hostile runs no
    code: the file is refused (the run falls back to starting over) and the marker never appears."""
    import accelerate

    data = _data(tmp_path / "data")
    kw = {"steps": 4, "keep_checkpoints": 0}
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _stop_at(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            _finetune(tokenizer, data, out, **kw)
    marker = tmp_path / "code-ran"
    optimizer = out / "checkpoint" / "optimizer.bin"
    torch.save({"state": _Payload(marker)}, optimizer)
    progress = out / "checkpoint" / "progress.json"
    record = json.loads(progress.read_text())
    record["files"]["optimizer.bin"] = optimizer.stat().st_size  # a consistent, complete-looking checkpoint
    progress.write_text(json.dumps(record))

    real_load_state = accelerate.Accelerator.load_state

    def old_accelerate_load_state(self, input_dir, **kwargs):  # what accelerate 0.30 does first
        torch.load(Path(input_dir) / "optimizer.bin", map_location="cpu", weights_only=False)
        return real_load_state(self, input_dir, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "load_state", old_accelerate_load_state)
    caplog.set_level(logging.WARNING)
    with pytest.raises(RuntimeError, match="no checkpoint"):
        _finetune(tokenizer, data, out, **kw)
    assert not marker.exists()
    assert "optimizer.bin is not a plain tensor/data pickle" in caplog.text
