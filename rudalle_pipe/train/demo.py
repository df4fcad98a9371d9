"""Train the embedded demo model family from nothing and package it as a pipeline directory.

Five stages run in order, each in its own folder under ``out_dir`` (a rerun skips finished stages
and resumes an interrupted one from its last checkpoint)::

    tokenizer/bpe.model   1. BPE over the training captions          (rudalle_pipe.train.bpe)
    vqgan/final/          2. VQGAN on 64 px renders                    (rudalle_pipe.train.vqgan)
    dalle/final/          3. DalleModel on [caption | VQGAN codes]     (rudalle_pipe.train.dalle)
    clip/                 4. small open_clip reranker                  (rudalle_pipe.train.clip)
    realesrgan/           5. small x4 RRDBNet                          (rudalle_pipe.train.realesrgan)
    pipeline/             the shipped pipeline: fp16 safetensors + configs, loadable by load_pipeline
    timings.json          wall time per stage (summed over interrupted reruns) and in total

``install`` copies ``pipeline/`` to ``rudalle_pipe/weights/demo`` where ``load_pipeline("demo")`` finds it.
"""
from __future__ import annotations

import importlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import files
from ..pipeline import BUNDLED_DIR, FORMAT
from ..vae import VQGANConfig
from .common import LoopConfig, is_main_process, wait_for_everyone
from .scenes import all_captions, all_scenes
from .dalle import DalleTrainConfig
from .vqgan import VQGANTrainConfig

logger = logging.getLogger(__name__)

__all__ = ["DemoConfig", "DEMO_CONFIG", "QUICK_CONFIG", "MAX_PIPELINE_BYTES", "train_demo", "install"]

MAX_PIPELINE_BYTES = 30 * 1024 * 1024  # the shipped family must stay under 30 MB


@dataclass(frozen=True)
class DemoConfig:
    """All stage configs of the demo family. ``clip``/``sr`` of None take the stage module's own
    ``DEMO_CONFIG`` (or ``QUICK_CONFIG`` with ``quick=True``)."""

    bpe_vocab_size: int = 128  # BPE ids including pad/unk/bos/eos
    vqgan: VQGANTrainConfig = field(default_factory=VQGANTrainConfig)  # stage 2
    dalle: DalleTrainConfig = field(default_factory=DalleTrainConfig)  # stage 3
    clip: Any = None  # stage 4: a rudalle_pipe.train.clip.ClipTrainConfig, or None for its default
    sr: Any = None  # stage 5: a rudalle_pipe.train.realesrgan config, or None for its default
    quick: bool = False  # tiny sizes for tests (selects the CLIP/SR stages' QUICK_CONFIG)


DEMO_CONFIG = DemoConfig()
QUICK_CONFIG = DemoConfig(
    bpe_vocab_size=64,
    vqgan=VQGANTrainConfig(
        model=VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(), z_channels=32,
                          embed_dim=32, n_embed=64, resolution=64),
        loop=LoopConfig(steps=4, lr=2e-3, checkpoint_every=2, log_every=1), batch_size=4, max_images=32,
        eval_images=8, ae_steps=2, kmeans_images=8, kmeans_iters=2, decoder_steps=2, variants=0),
    dalle=DalleTrainConfig(num_layers=2, hidden_size=32, num_attention_heads=2, text_seq_length=40,
                           loop=LoopConfig(steps=4, lr=2e-3, checkpoint_every=2, log_every=1), batch_size=4,
                           max_scenes=32, eval_scenes=4),
    quick=True,
)


def _stage_module(name: str):
    """Import ``rudalle_pipe.train.<name>`` lazily; None (with a log line) when it does not exist yet."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}.{name}":
            raise
        logger.warning("stage %r skipped: %s.%s does not exist", name, __package__, name)
        return None


def _stage_config(module: Any, given: Any, quick: bool) -> Any:
    return given if given is not None else getattr(module, "QUICK_CONFIG" if quick else "DEMO_CONFIG")


def _to_fp16_copy(src: Path, dst: Path) -> None:
    """Copy a saved-model directory, storing floating-point safetensors as fp16 (loaders cast back)."""
    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        if path.suffix == ".safetensors":
            state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
            save_file({k: v.contiguous() for k, v in state.items()}, str(dst / path.name), metadata={"format": "pt"})
        elif path.name == "config.json":
            config = json.loads(path.read_text())
            if "dtype" in config:
                config["dtype"] = str(torch.float16).removeprefix("torch.")
            files.atomic_write(dst / path.name, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        elif path.is_file():
            shutil.copy2(path, dst / path.name)


def demo_vocabulary() -> list[str]:
    """Every word of every caption of every scene (both splits: held-out captions reuse the training
    words), sorted: what the demo generator was trained on, written to ``pipeline.json``."""
    import re

    words = {w for scene in all_scenes("all") for c in all_captions(scene) for w in re.findall(r"\w+", c)}
    return sorted(words)


def assemble(out_dir: Path, parts: dict[str, Path], name: str = "demo") -> Path:
    """Write ``out_dir`` as a pipeline directory from the stages' final outputs, check its size and
    that :func:`rudalle_pipe.pipeline.load_pipeline` loads it."""
    from ..pipeline import load_pipeline

    if out_dir.exists():  # an earlier assembly of this run's own stages
        shutil.rmtree(out_dir)
    with files.atomic_directory(out_dir) as tmp:  # never a half pipeline under the real name
        (tmp / "tokenizer").mkdir(parents=True)
        shutil.copy2(parts["tokenizer"], tmp / "tokenizer" / "bpe.model")
        for key in ("dalle", "vae", "clip", "upscaler"):
            if key in parts:
                _to_fp16_copy(parts[key], tmp / key)
        meta = {"format": FORMAT, "version": 1, "name": name, "vocabulary": demo_vocabulary()}
        files.atomic_write(tmp / "pipeline.json", json.dumps(meta, indent=2) + "\n")
    total = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    logger.info("pipeline %s: %.2f MB", out_dir, total / 2**20)
    if total > MAX_PIPELINE_BYTES:
        raise ValueError(f"the pipeline in {out_dir} takes {total / 2**20:.2f} MB, more than the "
                         f"{MAX_PIPELINE_BYTES / 2**20:.0f} MB allowed; shrink the models")
    pipe = load_pipeline(out_dir)
    missing = [k for k in ("clip", "upscaler") if k in parts and getattr(pipe, k) is None]
    if missing:
        raise RuntimeError(f"load_pipeline({out_dir}) did not load {missing}")
    return out_dir


def install(pipeline_dir: str | Path, *, overwrite: bool = False, name: str = "demo") -> Path:
    """Copy a pipeline directory into the package (``rudalle_pipe/weights/<name>``)."""
    target = BUNDLED_DIR / name
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
    staged = target.parent / f".{name}.install.tmp"
    if staged.exists():  # left by an interrupted install
        shutil.rmtree(staged)
    with files.atomic_directory(staged) as tmp:
        shutil.copytree(pipeline_dir, tmp, dirs_exist_ok=True)
    if target.exists():  # swap: the old pipeline stays whole until the new one is complete
        old = target.parent / f".{name}.old.tmp"
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
        staged.rename(target)
        shutil.rmtree(old)
    else:
        staged.rename(target)
    logger.info("installed %s -> %s", pipeline_dir, target)
    return target


def train_demo(out_dir: str | Path, *, quick: bool = False, progress: bool = True,
               config: DemoConfig | None = None, do_install: bool = False, overwrite: bool = False) -> Path:
    """Train the five stages in order (skipping finished ones) and assemble ``out_dir/pipeline``.

    Args:
        quick: use :data:`QUICK_CONFIG` (seconds; for tests) instead of :data:`DEMO_CONFIG`.
        config: explicit stage configs (overrides ``quick``'s choice).
        do_install: copy the pipeline into ``rudalle_pipe/weights/demo`` (``overwrite`` to replace).
    Returns:
        The pipeline directory.
    """
    from . import bpe, dalle, vqgan

    config = config or (QUICK_CONFIG if quick else DEMO_CONFIG)
    if do_install and (BUNDLED_DIR / "demo").exists() and not overwrite:
        raise FileExistsError(f"{BUNDLED_DIR / 'demo'} exists; pass overwrite=True (--overwrite) to replace it")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings_path = out_dir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {"stages": {}}
    parts: dict[str, Path] = {}
    t_start = time.perf_counter()

    def timed(stage: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - t0
        # summed over reruns: an interrupted stage's time counts, a skipped stage adds ~0
        timings["stages"][stage] = round(timings["stages"].get(stage, 0.0) + seconds, 1)
        if is_main_process():
            files.atomic_write(timings_path, json.dumps(timings, indent=2) + "\n")
        logger.info("stage %s: %.1f s", stage, seconds)
        return result

    # 1. tokenizer over every caption variant of the training scenes
    bpe_path = out_dir / "tokenizer" / "bpe.model"
    if not bpe_path.is_file():
        texts = [c for scene in all_scenes("train") for c in all_captions(scene)]
        if is_main_process():  # one writer; the others wait for the file
            timed("tokenizer", bpe.train_bpe, texts, config.bpe_vocab_size, bpe_path)
        wait_for_everyone()
    parts["tokenizer"] = bpe_path
    # 2. VQGAN, 3. generator
    parts["vae"] = timed("vqgan", vqgan.train, out_dir / "vqgan", config=config.vqgan, progress=progress)
    parts["dalle"] = timed("dalle", dalle.train, out_dir / "dalle", config=config.dalle, progress=progress,
                           tokenizer_path=bpe_path, vae_dir=parts["vae"])
    # 4. CLIP reranker, 5. x4 upscaler (written by their own modules; skipped while missing)
    for stage, key, extra in (("clip", "clip", {"tokenizer_path": bpe_path}), ("realesrgan", "upscaler", {})):
        module = _stage_module(stage)
        if module is None:
            continue
        stage_config = _stage_config(module, config.clip if stage == "clip" else config.sr, config.quick)
        parts[key] = timed(stage, module.train, out_dir / stage, config=stage_config, progress=progress, **extra)
    # package
    pipeline_dir = out_dir / "pipeline"
    if is_main_process():
        timed("package", assemble, pipeline_dir, parts)
        timings["total_s"] = round(sum(v for k, v in timings["stages"].items()), 1)
        timings["this_run_s"] = round(time.perf_counter() - t_start, 1)
        timings["pipeline_mb"] = round(sum(p.stat().st_size for p in pipeline_dir.rglob("*") if p.is_file())
                                       / 2**20, 2)
        files.atomic_write(timings_path, json.dumps(timings, indent=2) + "\n")
        if do_install:
            install(pipeline_dir, overwrite=overwrite)
    return pipeline_dir
