"""``rudalle-pipe generate --prompts FILE --out DIR``: many prompts, on one process or several.

FILE is plain text (one prompt a line; blank lines are skipped) or, when it ends in ``.jsonl``, one
JSON object a line with ``text`` and optionally ``num_images``, ``seed``, ``negative_prompt`` and
``guidance_scale`` (the command-line values are the defaults). The whole file is checked before any
model loads; an error names the line and the bad value.

Results, in ``DIR``:

* ``<index>-<slug>/``: one folder per prompt with the files of ``rudalle-pipe generate TEXT`` (PNGs
  best first, contact sheet, results.json), written by :func:`rudalle_pipe.cli_generate.run_chain`;
* ``results.jsonl``: the manifest, one line per finished prompt in index order (index, text, folder,
  seed, num_images, the kept images' files and seeds);
* ``run.json``: the settings, the prompts file's sha256, the base seed and the ``world_size`` of the
  last run that wrote there.

Seeds never depend on the process count: image ``j`` of prompt ``i`` gets ``seed_i + j``, where
``seed_i`` is the prompt's own ``seed`` or ``base + (images of the prompts before i)``. Without
``--seed`` the main process draws the base seed, shares it, and records it in run.json; a rerun reuses
it. A rerun skips prompts whose folder holds a results.json and redoes the others (a crash, a
pre-empted job). Under ``accelerate launch`` or ``torchrun`` (``WORLD_SIZE`` > 1) the pending prompts
are dealt out in rounds, one per process; after each round the main process gathers the records,
rewrites the manifest and advances one overall progress bar (images/s, ETA). Only the main process
writes results.jsonl and run.json, atomically (:func:`rudalle_pipe.files.atomic_write`); each
process writes its own prompts' folders. On several machines ``DIR`` must be on a shared filesystem.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

__all__ = ["PromptSpec", "read_prompts", "assign_seeds", "prompt_folder", "cmd_generate_prompts", "MANIFEST",
           "RUN_RECORD", "JSONL_KEYS"]

MANIFEST = "results.jsonl"
RUN_RECORD = "run.json"
JSONL_KEYS = ("text", "num_images", "seed", "negative_prompt", "guidance_scale")
MAX_PROMPTS = 1_000_000  # lines of a prompts file
_MAX_FILE_BYTES = 256 * 2**20
_RECORDED = ("model", "num_images", "top_k", "top_p", "temperature", "guidance_scale", "negative_prompt", "rerank",
             "rank_by", "rank_weight", "upscale", "dtype")  # settings a resumed run must keep


@dataclass(frozen=True)
class PromptSpec:
    """One prompt of the file, with its own settings filled in from the command line."""

    index: int  # 0-based position among the file's prompts
    line: int  # 1-based line of the file
    text: str
    num_images: int
    seed: Optional[int]  # the prompt's own seed (image j gets seed + j); None: from the base seed
    negative_prompt: Optional[str]
    guidance_scale: float


def _line_error(path: Path, line: int, message: str) -> ValueError:
    from .checks import one_line

    return ValueError(f"{path}:{line}: {one_line(message)}")


def read_prompts(path: Path, *, num_images: int, guidance_scale: float,
                 negative_prompt: Optional[str]) -> list[PromptSpec]:
    """Every prompt of ``path`` (see the module docstring), each checked; the defaults come from the
    command line. Raises ``ValueError`` naming ``path:line`` and the bad value."""
    from .checks import MAX_IMAGES, check_int
    from .files import read_bounded
    from .generation import _MAX_SEED, check_guidance

    raw = read_bounded(path, _MAX_FILE_BYTES, what="--prompts")
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"--prompts {path} is not UTF-8 text ({err})") from None
    jsonl = path.suffix.lower() == ".jsonl"
    specs: list[PromptSpec] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields: dict[str, Any] = {"text": line.strip()}
        if jsonl:
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as err:
                raise _line_error(path, number, f"not a JSON object ({err}): {line[:80]!r}") from None
            if not isinstance(fields, dict):
                raise _line_error(path, number, f"expected a JSON object with 'text', got {line[:80]!r}")
            unknown = sorted(set(fields) - set(JSONL_KEYS))
            if unknown:
                raise _line_error(path, number, f"unknown keys {unknown}; valid: {list(JSONL_KEYS)}")
        text = fields.get("text")
        if not isinstance(text, str) or not text.strip():
            raise _line_error(path, number, f"'text' must be a non-empty string, got {text!r}")
        spec = PromptSpec(index=len(specs), line=number, text=text.strip(),
                          num_images=fields.get("num_images", num_images), seed=fields.get("seed"),
                          negative_prompt=fields.get("negative_prompt", negative_prompt),
                          guidance_scale=fields.get("guidance_scale", guidance_scale))
        try:
            check_int("num_images", spec.num_images, high=MAX_IMAGES)
            check_guidance(spec.guidance_scale, spec.negative_prompt)
            if spec.seed is not None:
                check_int("seed", spec.seed, low=0, high=_MAX_SEED - spec.num_images)
        except (TypeError, ValueError) as err:
            raise _line_error(path, number, str(err)) from None
        specs.append(spec)
        if len(specs) > MAX_PROMPTS:
            raise ValueError(f"--prompts {path} has more than {MAX_PROMPTS} prompts; split it")
    if not specs:
        raise ValueError(f"--prompts {path} holds no prompt (only blank lines)")
    return specs


def assign_seeds(specs: list[PromptSpec], base: int) -> list[int]:
    """The first seed of every prompt: its own, or ``base`` + the images of the prompts before it."""
    seeds, offset = [], 0
    for spec in specs:
        seeds.append(spec.seed if spec.seed is not None else base + offset)
        offset += spec.num_images
    return seeds


def prompt_folder(spec: PromptSpec, count: int) -> str:
    """``<index>-<slug>``: the zero-padded index and up to 40 letters/digits of the prompt (any script)."""
    slug = re.sub(r"[^\w]+", "-", spec.text.lower(), flags=re.UNICODE).strip("-_")[:40].strip("-_") or "prompt"
    return f"{spec.index:0{max(4, len(str(count - 1)))}d}-{slug}"


def _dist():
    """``(state, world_size)``: accelerate's PartialState when launched on several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, 1
    try:
        from accelerate import PartialState
    except ImportError as err:
        raise ImportError("generate --prompts on several processes (WORLD_SIZE > 1) needs accelerate: pip install "
                          "'rudalle-pipe[train]', or run one process") from err
    import torch

    state = PartialState(cpu=not torch.cuda.is_available())
    return state, state.num_processes


def _settings(args: argparse.Namespace, source) -> dict[str, Any]:
    values = {**vars(args), "model": source.name}
    return {k: values.get(k) for k in _RECORDED}


def _plan(args: argparse.Namespace, out: Path, specs: list[PromptSpec], settings: dict[str, Any],
          digest: str, world: int) -> tuple[int, list[int]]:
    """On the main process: check run.json against this run, choose the base seed, list pending prompts,
    clear incomplete folders, write run.json. Returns ``(base_seed, pending indices)``."""
    from .files import atomic_write
    from .generation import _MAX_SEED
    from .outputs import RESULTS, remove_unfinished_run

    total = sum(s.num_images for s in specs)
    record_path = out / RUN_RECORD
    base = args.seed
    if record_path.exists():
        try:
            before = json.loads(record_path.read_text(encoding="utf-8"))
            old_settings, old_seed, old_digest = before["settings"], before["base_seed"], before["prompts_sha256"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise FileExistsError(f"{record_path} exists but is not a run.json of rudalle-pipe ({err}); move it "
                                  "away or choose another --out") from None
        changed = {k: (old_settings.get(k), v) for k, v in settings.items() if old_settings.get(k) != v}
        if old_digest != digest:
            changed["prompts file"] = ("sha256 " + str(old_digest)[:12], "sha256 " + digest[:12])
        if base is not None and base != old_seed:
            changed["seed"] = (old_seed, base)
        if changed:
            raise FileExistsError(f"{out} holds a run with other settings {changed} (before, now); resume it with "
                                  "the same ones, or choose another --out")
        base = old_seed
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} is not empty and holds no {RUN_RECORD}; choose an empty or new folder")
    if base is None:
        base = random.SystemRandom().randrange(0, _MAX_SEED - total + 1)
    pending = []
    for spec in specs:
        folder = out / prompt_folder(spec, len(specs))
        if (folder / RESULTS).is_file():
            continue
        pending.append(spec.index)
        if folder.is_dir():  # an interrupted prompt: drop the files a run writes there, then redo it
            remove_unfinished_run(folder)
    out.mkdir(parents=True, exist_ok=True)
    record = {"prompts_file": str(args.prompts), "prompts_sha256": digest, "prompts": len(specs),
              "images": total, "settings": settings, "base_seed": base, "world_size": world}
    atomic_write(record_path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return base, pending


def _manifest_line(spec: PromptSpec, folder: str, seed: int, images: list[dict[str, Any]]) -> dict[str, Any]:
    return {"index": spec.index, "text": spec.text, "folder": folder, "seed": seed, "num_images": spec.num_images,
            "guidance_scale": spec.guidance_scale, "negative_prompt": spec.negative_prompt, "images": images}


def _write_manifest(out: Path, specs: list[PromptSpec], seeds: list[int]) -> int:
    """Rewrite results.jsonl from the finished folders, in index order; returns how many are finished."""
    from .files import atomic_write
    from .outputs import RESULTS

    lines = []
    for spec in specs:
        folder = prompt_folder(spec, len(specs))
        path = out / folder / RESULTS
        if path.is_file():
            images = json.loads(path.read_text(encoding="utf-8"))["images"]
            kept = [{"file": e["file"], "seed": e["seed"]} for e in images]  # best first
            lines.append(json.dumps(_manifest_line(spec, folder, seeds[spec.index], kept), ensure_ascii=False))
    atomic_write(out / MANIFEST, "".join(line + "\n" for line in lines))
    return len(lines)


def cmd_generate_prompts(args: argparse.Namespace) -> int:
    """``rudalle-pipe generate --prompts FILE``: check everything, then generate each pending prompt."""
    import torch
    from tqdm.auto import tqdm

    from .cli import EXIT_OK, UsageError, _load_pipeline, _resolve_device, _resolve_model, default_model
    from .cli_generate import _check_guidance_args, _check_rank_args, _resolve_upscale, run_chain
    from .cli_image_prompt import check_image_prompt_args
    from .generation import check_sampling_args
    from .files import check_writable_dir
    from .outputs import estimate_bytes, image_name

    # 1. check everything that needs no weights, on every process (the same answer everywhere)
    if args.text:
        raise UsageError("give TEXT or --prompts FILE, not both")
    path = Path(args.prompts)
    if not path.is_file():
        raise UsageError(f"--prompts {path}: no such file")
    source = _resolve_model(args.model or default_model())
    if check_image_prompt_args(args, source) is not None:
        raise UsageError("--prompts does not combine with --image-prompt; run those prompts one by one")
    if args.top_k is None:
        from .cli import DEFAULT_TOP_K

        args.top_k = min(DEFAULT_TOP_K, source.image_vocab)
    _check_guidance_args(args)
    _resolve_upscale(args, source)
    try:
        specs = read_prompts(path, num_images=args.num_images, guidance_scale=args.guidance_scale,
                             negative_prompt=args.negative_prompt)
    except ValueError as err:
        raise UsageError(str(err)) from err
    per_prompt = []
    for spec in specs:
        one = argparse.Namespace(**{**vars(args), "text": [spec.text], "num_images": spec.num_images,
                                    "guidance_scale": spec.guidance_scale, "negative_prompt": spec.negative_prompt})
        try:
            _check_rank_args(one, source)
            check_sampling_args(top_k=one.top_k, top_p=one.top_p, temperature=one.temperature, vocab=source.image_vocab,
                                num_images=one.num_images, batch_size=one.batch_size, seed=None)
        except (TypeError, ValueError, UsageError) as err:
            raise UsageError(f"{path}:{spec.line}: {err}") from err
        per_prompt.append(one)
    from .generation import _MAX_SEED

    total = sum(s.num_images for s in specs)
    if args.seed is not None and not 0 <= args.seed <= _MAX_SEED - total:
        raise UsageError(f"--seed must be in [0, {_MAX_SEED - total}] ({total} images), got {args.seed}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    scale = 1 if args.upscale == "none" else int(args.upscale[1:])
    needed = sum(estimate_bytes(num_images=o.num_images, kept=o.rerank or o.num_images, side=source.image_side,
                                scale=scale, text=o.text[0]) for o in per_prompt)
    check_writable_dir(out, needed_bytes=needed, what="--out")  # room for every prompt (finished ones included)
    state, world = _dist()
    main = state is None or state.is_main_process
    settings = _settings(args, source)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    # 2. the main process plans (base seed, pending prompts) and shares the plan
    plan: list[Any] = [None]
    error: Optional[BaseException] = None
    if main:
        try:
            plan = [_plan(args, out, specs, settings, digest, world)]
        except Exception as err:  # noqa: BLE001 - told to every process, then raised here as it was
            error, plan = err, [("error", f"{type(err).__name__}: {err}")]
    if state is not None:
        from accelerate.utils import broadcast_object_list

        plan = broadcast_object_list(plan, from_process=0)
    if isinstance(plan[0], tuple) and plan[0] and plan[0][0] == "error":
        raise error if error is not None else FileExistsError(plan[0][1])
    base, pending = plan[0]
    seeds = assign_seeds(specs, base)
    if not pending:
        if main:
            _write_manifest(out, specs, seeds)
        if main:
            sys.stdout.write(f"every prompt of {path} is already done in {out} ({MANIFEST}); nothing to do\n")
        return EXIT_OK

    # 3. load the pipeline on this process's device
    rank = 0 if state is None else state.process_index
    if args.device is None and state is not None and torch.cuda.is_available():
        args.device = f"cuda:{state.local_process_index}"
    args.device = _resolve_device(args.device)
    pipe = _load_pipeline(source.name, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir,
                          clip=any(o.rerank and o.rank_by in ("clip", "combined") for o in per_prompt),
                          upscaler=False if args.upscale == "none" else (args.upscale if source.kind == "hub" else True))

    # 4. rounds: process k takes pending prompt round * world + k; the main process gathers and reports
    todo = sum(specs[i].num_images for i in pending)
    bar = tqdm(total=todo, unit="img", desc="prompts", disable=args.no_progress or not main)
    for first in range(0, len(pending), world):
        mine = pending[first:first + world]
        done = 0
        if rank < len(mine):
            spec = specs[mine[rank]]
            one = argparse.Namespace(**{**vars(per_prompt[spec.index]), "seed": seeds[spec.index],
                                        "device": args.device})
            kept = one.rerank or one.num_images
            run_chain(one, source, pipe, [image_name(j) for j in range(kept)],
                      out / prompt_folder(spec, len(specs)), frozenset(), progress=False, timings={},
                      start=time.perf_counter())
            done = spec.num_images
        if state is not None:
            from accelerate.utils import gather_object

            done = sum(gather_object([done]))
        if main:
            bar.update(done)
            _write_manifest(out, specs, seeds)
    bar.close()
    if state is not None:
        state.wait_for_everyone()
    if main:
        sys.stdout.write(f"wrote {todo} images for {len(pending)} of {len(specs)} prompts to {out} "
                         f"({MANIFEST}, {RUN_RECORD})\n")
    return EXIT_OK
